"""`python -m remem_cli` is the `remem` command."""

import sys

from remem_cli.main import main

sys.exit(main())
