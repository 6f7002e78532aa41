"""``python -m specops.cli.study [options]``, the same as ``specops study [options]``."""

import sys

from specops.cli.study import main

sys.exit(main())
