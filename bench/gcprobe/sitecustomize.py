"""Diagnostics for the servers a benchmark starts: put this folder on PYTHONPATH, and

- STICKYSTATE_GC_LOG=<prefix> (``python -m stickystate.bench.tailprobe --gc-log`` sets it): every
  Python process started so logs its cyclic-GC passes to ``<prefix>.<pid>``, one JSON row per
  pass that took over 2 ms or was a full (generation 2) one: [monotonic start, wall ms,
  generation, collected, objects tracked in generation 2 after a full pass (else -1), CPU ms
  of the pass];
- STICKYSTATE_CPROFILE=<prefix>: every ``stickystate.cli <role>`` process (role from
  STICKYSTATE_CPROFILE_ROLE, default ``node``) runs under cProfile from start to exit and
  writes ``<prefix>.<pid>`` (``pstats``) when it exits. An on-CPU profile by function where
  py-spy's sampling cannot tell running from runnable (two shared cores, docs/BENCHMARKS.md);
  it slows the process (~1.3x on a node), so read shares, not times. A coroutine's own time
  includes the C calls it makes that cProfile does not see, socket writes among them.

      PYTHONPATH=bench/gcprobe STICKYSTATE_CPROFILE=/tmp/prof/node \
          python -m stickystate.bench --systems direct-raw --mixes write-heavy --rates 2000 --step-seconds 20
      python -c "import pstats; pstats.Stats('/tmp/prof/node.<pid>').sort_stats('cumtime').print_stats(40)"
"""

import os

if os.environ.get("STICKYSTATE_GC_LOG"):
    import gc
    import json
    import time

    _path = os.environ["STICKYSTATE_GC_LOG"] + f".{os.getpid()}"
    _start: list[float] = [0.0, 0.0]

    def _on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            _start[0], _start[1] = time.monotonic(), time.thread_time()
            return
        wall = time.monotonic() - _start[0]
        cpu = time.thread_time() - _start[1]
        gen = info["generation"]
        if gen == 2 or wall > 0.002:
            tracked = len(gc.get_objects(generation=2)) if gen == 2 else -1
            with open(_path, "a") as f:
                f.write(json.dumps([_start[0], round(wall * 1e3, 2), gen, info["collected"], tracked,
                                    round(cpu * 1e3, 2)]) + "\n")

    gc.callbacks.append(_on_gc)

if os.environ.get("STICKYSTATE_CPROFILE"):
    with open("/proc/self/cmdline", "rb") as _f:
        _argv = _f.read().split(b"\0")
    if b"stickystate.cli" in _argv and os.environ.get("STICKYSTATE_CPROFILE_ROLE", "node").encode() in _argv:
        import atexit
        import cProfile

        _profile = cProfile.Profile()
        _profile.enable()

        def _dump_profile() -> None:
            _profile.disable()
            _profile.dump_stats(os.environ["STICKYSTATE_CPROFILE"] + f".{os.getpid()}")

        atexit.register(_dump_profile)
