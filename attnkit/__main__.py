"""``python -m attnkit``: the command line (see :mod:`attnkit.cli`)."""

import sys

from attnkit.cli import main

sys.exit(main())
