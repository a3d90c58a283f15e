"""Entry point for `ray job submit ... -- python jobs/train.py --config C [--set k=v ...]`.

Same flags as `raydistill train`; all logic lives in lib/raydistill.
"""

import sys

from raydistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
