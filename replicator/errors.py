"""Errors of the replicator, translated from aiokafka at one seam.

    ReplicationError (retriable)
    ├── QueueFull        the bounded send queue is full
    └── KafkaStalled     the oldest unacknowledged event is older than the deadline
"""

from __future__ import annotations


class ReplicationError(Exception):
    retriable = True


class QueueFull(ReplicationError):
    pass


class KafkaStalled(ReplicationError):
    pass

