"""``python -m chaos`` (same as ``stickystate chaos``)."""

import sys

from chaos.cli import main

sys.exit(main())
