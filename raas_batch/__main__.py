"""`python -m raas_batch`: the batch job command line (see raas_batch.cli)."""

import sys

from raas_batch.cli import main

if __name__ == "__main__":
    sys.exit(main())
