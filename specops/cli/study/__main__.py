"""``python -m specops.cli.study [options]``, the same as ``specops study [options]``."""

import sys

from specops.cli.study import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
