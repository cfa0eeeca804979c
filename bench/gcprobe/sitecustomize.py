"""Diagnostic, for ``python -m stickystate.bench.tailprobe --gc-log``: put this folder on PYTHONPATH and
set STICKYSTATE_GC_LOG=<prefix>, and every Python process started so logs its cyclic-GC
passes to ``<prefix>.<pid>``, one JSON row per pass that took over 2 ms or was a full
(generation 2) one: [monotonic start, wall ms, generation, collected, objects tracked in
generation 2 after a full pass (else -1), CPU ms of the pass]."""

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
