"""`python -m remem_client` is `remem client`."""

import sys

from remem_client.cli import main

sys.exit(main())
