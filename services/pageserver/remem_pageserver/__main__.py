"""`python -m remem_pageserver` runs a page server (same as `remem pageserver`)."""

import sys

from remem_pageserver.cli import main

sys.exit(main())
