"""`python -m msakit ...` (and `torchrun ... -m msakit train ...`): the same as the `msakit` command."""

import sys

from msakit.cli import main

if __name__ == "__main__":
    sys.exit(main())
