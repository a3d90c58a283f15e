"""Entry point for `ray job submit ... -- python jobs/deploy.py --config C [--set k=v ...]`.

Same flags as `raydistill deploy`; all logic lives in lib/raydistill.
"""

import sys

from raydistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["deploy", *sys.argv[1:]]))
