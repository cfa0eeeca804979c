"""``python -m stickystate.bench``: see bench/cli.py."""

from stickystate.bench.cli import main

raise SystemExit(main())
