"""Entry point for `ray job submit ... -- python jobs/distill.py --config C [--set k=v ...]`.

Same flags as `raydistill distill`; all logic lives in lib/raydistill.
"""

import sys

from raydistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
