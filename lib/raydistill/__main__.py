"""`python -m raydistill ...`: the same as the `raydistill` command."""

import sys

from raydistill.cli import main

sys.exit(main())
