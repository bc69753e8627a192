"""`python -m remem_placement` runs placement (same as `remem placement`)."""

import sys

from remem_placement.cli import main

sys.exit(main())
