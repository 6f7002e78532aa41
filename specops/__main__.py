"""``python -m specops``: the same as the ``specops`` console script."""

import sys

from specops.cli import main

sys.exit(main())
