"""Is a node that has stopped answering dead, or only slow? A phi accrual failure detector
(Hayashibara et al. 2004, as Akka and Cassandra use it), pure: the clock is passed in.

The router probes every node (router/cluster.py); each answer is a heartbeat. The detector
keeps the intervals between a node's recent heartbeats and, at any moment, turns the time
since the last one into ``phi = -log10(P(an interval this long or longer))`` under a normal
distribution fitted to those intervals. A node is suspected when phi reaches
``threshold``. A node whose answers come regularly is suspected soon after it falls
silent; one whose answers are irregular (busy: its event loop runs late, now and then
much later) widens its own distribution and so gets more time, instead of being failed
over for being busy. ``min_std_s`` and ``acceptable_pause_s`` bound how quick it can get.

With the defaults, a node probed every 0.1 s that answers within a few milliseconds is
suspected about 0.57 s after its last answer (phi 8 is about 5.3 standard deviations past
the mean: 0.1 s + the 0.1 s pause + 5.3 x the 0.07 s floor).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


def phi(elapsed_s: float, mean_s: float, std_s: float) -> float:
    """-log10 of the probability that an interval is longer than ``elapsed_s`` (the logistic
    approximation of the normal tail Akka uses: the probability is off by less than 0.0002)."""
    y = max(-10.0, min(10.0, (elapsed_s - mean_s) / std_s))
    e = math.exp(-y * (1.5976 + 0.070566 * y * y))
    if elapsed_s > mean_s:
        return -math.log10(e / (1.0 + e))
    return -math.log10(1.0 - 1.0 / (1.0 + e))


@dataclass
class PhiAccrual:
    threshold: float = 8.0
    window: int = 200  # intervals kept
    min_std_s: float = 0.07
    acceptable_pause_s: float = 0.1
    first_interval_s: float = 0.1  # assumed until two heartbeats were seen (std: a quarter of it)
    min_samples: int = 10  # judge nobody before this many intervals were learned (start-up is busy)
    intervals: deque[float] = field(default_factory=deque)
    last: float | None = None
    _sum: float = 0.0
    _sq: float = 0.0

    def heartbeat(self, now: float) -> None:
        if self.last is not None and now >= self.last:
            self._add(now - self.last)
        self.last = now

    def forget_last(self) -> None:
        """After the node was declared down: its silence is not an interval to learn from."""
        self.last = None

    def watch_from(self, now: float) -> None:
        """Start counting silence now (when probing starts), learning no interval from it."""
        self.last = now

    def excuse(self, stall_s: float) -> None:
        """The observer itself stalled this long (its event loop ran late): the node's answers
        could not be read meanwhile, so that time is not the node's silence."""
        if self.last is not None and stall_s > 0:
            self.last += stall_s

    def _add(self, interval: float) -> None:
        self.intervals.append(interval)
        self._sum += interval
        self._sq += interval * interval
        if len(self.intervals) > self.window:
            old = self.intervals.popleft()
            self._sum -= old
            self._sq -= old * old

    def stats(self) -> tuple[float, float]:
        """(mean, standard deviation) of the intervals, before the pause and the floor."""
        n = len(self.intervals)
        if n < 2:
            return self.first_interval_s, self.first_interval_s / 4
        mean = self._sum / n
        return mean, math.sqrt(max(0.0, self._sq / n - mean * mean))

    def phi(self, now: float) -> float:
        if self.last is None:
            return 0.0
        mean, std = self.stats()
        return phi(now - self.last, mean + self.acceptable_pause_s, max(std, self.min_std_s))

    def suspect(self, now: float) -> bool:
        return len(self.intervals) >= self.min_samples and self.phi(now) >= self.threshold

    def silence_s(self, now: float) -> float:
        return 0.0 if self.last is None else now - self.last
