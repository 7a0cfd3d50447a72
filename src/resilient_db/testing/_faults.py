"""The faults a :class:`~resilient_db.testing.FaultProxy` applies, by name."""

from __future__ import annotations

import enum
from typing import TypeAlias


class Fault(str, enum.Enum):
    """Names of the faults a :class:`FaultProxy` can apply (usable in :meth:`FaultProxy.schedule`).

    ``PASSTHROUGH``, ``REFUSE`` and ``BLACKHOLE`` are also the values of
    :attr:`FaultProxy.mode`.
    """

    PASSTHROUGH = "passthrough"
    REFUSE = "refuse"
    BLACKHOLE = "blackhole"
    RESET_ALL = "reset_all"
    LATENCY = "latency"
    BANDWIDTH = "bandwidth"
    RESET_AFTER = "reset_after"
    DROP_COMMIT_REPLY = "drop_commit_reply"
    RESET_BEFORE_COMMIT = "reset_before_commit"
    LOSE_COMMIT_REPLY = "lose_commit_reply"


ScheduleStep: TypeAlias = (
    tuple[float, Fault | str]
    | tuple[float, Fault | str, float | None]
    | tuple[float, Fault | str, float, float]
)
"""One step of :meth:`FaultProxy.schedule`: ``(delay_s, fault, *args)``."""
