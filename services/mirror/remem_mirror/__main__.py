"""`python -m remem_mirror` runs the mirror (same as `remem mirror`)."""

import sys

from remem_mirror.cli import main

sys.exit(main())
