"""``python -m train``: the same command as ``wide-train``."""

import sys

from train.cli import main

sys.exit(main())
