"""Benchmark harness (issue 4): stickystate vs a Redis-backed server vs client-side state.

Entry point: ``bench.cli:main(argv)`` (``python -m stickystate.bench --help``).
"""
