"""Per-call histogram values held until a reader collects them.

The OpenTelemetry Python SDK spends 6 to 10 µs in every ``Histogram.record()``
(it cleans, copies and hashes the attributes and takes locks), more than a
whole resilience layer is allowed to cost on a fast query. A :class:`Deferred`
keeps the values of one histogram with one fixed attribute set in a bounded
``array('d')`` instead, an append of about 0.1 µs, and hands them to the SDK
in :meth:`Deferred.flush`, which the observable instruments' callbacks call at
the start of every collection, on the collecting thread (the periodic reader's,
the Prometheus scrape's). The SDK aggregates them before that collection reads
its storage, so each collection still reports every value up to its own start.

Like a ``BatchSpanProcessor``, this moves the SDK's CPU off the request path,
not out of the process. When ``capacity`` values are waiting (no reader has
collected for a long time), further values are recorded at once, so nothing is
lost and memory stays bounded (8 bytes per value). Values recorded later get
a context of their own, with no span in it, so the SDK attaches no exemplars
to them (rather than the collecting request's trace); ``capacity=0`` records every
value at once (see ``docs/observability.md``). A flush gives up the GIL every
:data:`BATCH` values, so the threads waiting on database replies meanwhile
are not held up for the whole flush.

A :class:`DeferredCount` does the same for a counter: the calls rejected by an
open breaker come by the thousand, and each costs one atomic increment.
"""

from __future__ import annotations

import itertools
import threading
import time
from array import array
from collections.abc import Callable
from typing import Any

from opentelemetry.context import Context

__all__ = ["BATCH", "DEFAULT_CAPACITY", "Deferred", "DeferredCount"]

#: Values held per histogram (and engine) between two collections: 512 KiB at most.
DEFAULT_CAPACITY = 65_536
#: Values recorded between two yields of the GIL during a flush (about 0.5 ms of SDK work).
BATCH = 64
# Not the collecting thread's context, so no exemplar points at its trace. Not empty:
# the SDK takes an empty (falsy) context for "none given" and uses the current one.
_NO_CONTEXT = Context({"resilient_db.held_timing": True})


class Deferred:
    """The not yet recorded values of one histogram, all with the same attributes."""

    __slots__ = ("_lock", "attributes", "capacity", "histogram", "values")

    def __init__(
        self, histogram: Any, attributes: Callable[[], dict[str, Any]], capacity: int
    ) -> None:
        self.histogram = histogram
        #: called at record time: the attributes may be known only after the first connect
        self.attributes = attributes
        self.capacity = capacity
        self.values = array("d")
        self._lock = threading.Lock()  # two readers may collect at once

    def add(self, value: float) -> None:
        """Hold ``value`` for the next collection (record it now if the buffer is full)."""
        values = self.values
        if len(values) < self.capacity:
            values.append(value)
        else:
            self.histogram.record(value, self.attributes())

    def flush(self) -> int:
        """Record every held value; returns how many.

        :meth:`add` takes no lock: a value appended while this runs lands after
        the slice taken here and stays for the next flush (``array`` slicing
        and deletion are single C calls under the GIL).
        """
        values = self.values
        if not values:
            return 0
        attributes = self.attributes()  # before taking the values: if it fails, none are lost
        with self._lock:
            n = len(values)
            taken = values[:n]
            del values[:n]
        record = self.histogram.record
        for i, v in enumerate(taken, 1):
            record(v, attributes, _NO_CONTEXT)
            if not i % BATCH:
                time.sleep(0)  # let threads whose database reply came in run
        return n


class DeferredCount:
    """Increments of one counter with one attribute set, added at the next flush."""

    __slots__ = ("_count", "_flushed", "_lock", "add_one", "attributes", "counter")

    def __init__(self, counter: Any, attributes: dict[str, Any]) -> None:
        self.counter = counter
        self.attributes = attributes
        self._count = itertools.count()
        self._flushed = 0
        self._lock = threading.Lock()
        #: Count one: the count's own ``__next__``, a single C call (no lock, no Python frame).
        self.add_one: Callable[[], object] = self._count.__next__

    def flush(self) -> int:
        """Add what was counted since the last flush to the counter; returns how many."""
        with self._lock:
            seen = next(self._count)  # this call's own number: not counted next time
            n, self._flushed = seen - self._flushed, seen + 1
        if n:
            self.counter.add(n, self.attributes)
        return n
