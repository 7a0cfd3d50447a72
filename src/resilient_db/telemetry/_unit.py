"""The span of a unit of work, for hand-written retry loops: :func:`unit_of_work`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Span

from ..classify import Classification, classify
from ..errors import error_context
from . import tracing
from ._engine import EngineTelemetry, telemetry_of

if TYPE_CHECKING:
    from .._types import EngineLike

__all__ = ["UnitOfWork", "unit_of_work"]


class UnitOfWork:
    """The span of one unit of work; report each replay with :meth:`retry`."""

    def __init__(self, tel: EngineTelemetry, span: Span) -> None:
        self.tel = tel
        self.span = span
        self.attempts = 1

    def retry(self, exc: BaseException, delay: float) -> None:
        """The attempt failed with ``exc`` and the unit of work will be replayed."""
        c = _classification(self.tel, exc)
        with trace.use_span(self.span, end_on_exit=False):
            self.tel.retried(c, "transaction", attempt=self.attempts, delay=delay)
        self.attempts += 1


def _classification(tel: EngineTelemetry, exc: BaseException) -> Classification:
    return classify(exc, target=tel.resilience.target)


@contextlib.contextmanager
def unit_of_work(engine: EngineLike, name: str | None = None) -> Iterator[UnitOfWork]:
    """A span around one unit of work (all its attempts), current while it runs.

    The unit-of-work retry calls :meth:`UnitOfWork.retry` before each replay;
    an exception leaving the block sets status ERROR with its classification.
    """
    tel = telemetry_of(engine)
    attrs: dict[str, Any] = {**tel.pool_attrs, **tel.op_attrs()}
    if name:
        attrs["resilient_db.unit_of_work"] = name
    span = tracing.start_span(tel.tracer, tracing.UNIT_OF_WORK_SPAN, attrs, client=False)
    uow = UnitOfWork(tel, span)
    try:
        with trace.use_span(
            span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        ):
            yield uow
    except BaseException as e:
        if isinstance(e, Exception):
            c = _classification(tel, e)
            error = tracing.error_attributes(c, error_context(e))
        else:
            error = None
        tracing.end_span(span, {"resilient_db.attempts": uow.attempts}, error)
        raise
    tracing.end_span(span, {"resilient_db.attempts": uow.attempts}, None)
