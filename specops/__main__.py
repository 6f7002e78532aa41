"""``python -m specops``: the same as the ``specops`` console script."""

import sys

from specops.cli import main

if __name__ == "__main__":
    sys.exit(main())
