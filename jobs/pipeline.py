"""Entry point for `ray job submit ... -- python jobs/pipeline.py --config C [--set k=v ...]`.

Same flags as `raydistill run`; all logic lives in lib/raydistill.
"""

import sys

from raydistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
