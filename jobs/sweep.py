"""Entry point for `ray job submit ... -- python jobs/sweep.py --config C [--set k=v ...]`.

Same flags as `raydistill sweep`; all logic lives in lib/raydistill.
"""

import sys

from raydistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
