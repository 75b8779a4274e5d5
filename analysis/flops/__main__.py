"""``python -m analysis.flops``: see :mod:`analysis.flops.cli`."""

import sys

from analysis.flops.cli import main

sys.exit(main())
