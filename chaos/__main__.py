"""``python -m stickystate.chaos`` (same as ``stickystate chaos``)."""

import sys

from stickystate.chaos.cli import main

sys.exit(main())
