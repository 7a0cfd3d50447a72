"""The exception tree of resilient_db and the context every failure carries.

Every new exception also subclasses the SQLAlchemy exception a user already
catches for that fault, so existing ``except sqlalchemy.exc....`` handlers keep
working::

    ResilientDBError                   (mixin: .context, .diagnosis)
    ├── ConfigurationError             sqlalchemy.exc.ArgumentError, ValueError
    ├── CircuitOpenError               sqlalchemy.exc.OperationalError
    ├── AmbiguousCommitError           sqlalchemy.exc.OperationalError
    ├── NoPrimaryError                 sqlalchemy.exc.OperationalError
    ├── PortableOperationalError       sqlalchemy.exc.OperationalError
    └── PoolExhaustedError             sqlalchemy.exc.TimeoutError

Errors raised by drivers keep their own SQLAlchemy type; resilient_db attaches
an :class:`ErrorContext` to them, reachable with :func:`error_context`, and adds
the diagnosis as a PEP 678 note so a plain traceback shows it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import exc as sa_exc

__all__ = [
    "AmbiguousCommitError",
    "CircuitOpenError",
    "ConfigurationError",
    "ErrorContext",
    "NoPrimaryError",
    "PoolExhaustedError",
    "PortableOperationalError",
    "ResilientDBError",
    "error_context",
    "portable_error",
]

_CONTEXT_ATTR = "resilient_db_context"
_NOTE_PREFIX = "resilient_db: "


@dataclass(frozen=True, slots=True)
class ErrorContext:
    """Everything an operator needs to know about one failure.

    Never holds a password, token or bind parameter. Serialise it with
    :meth:`to_dict` for structured logs.
    """

    engine: str
    dialect: str | None = None
    driver: str | None = None
    host: str | None = None
    port: int | None = None
    database: str | None = None
    user: str | None = None
    phase: str = "execute"
    attempt: int = 1
    elapsed: float = 0.0
    breaker_state: str | None = None
    code: str | None = None
    kind: str = "unknown"
    retry: str = "never"
    diagnosis: str = ""
    history: tuple[str, ...] = ()
    retry_in: float | None = None
    extra: tuple[tuple[str, Any], ...] = field(default=())

    @classmethod
    def for_target(
        cls, engine: str, target: Any, verdict: Any, *, phase: str, **fields: Any
    ) -> ErrorContext:
        """A context for ``target`` (a :class:`~resilient_db.Target`) and a verdict.

        ``verdict`` is a :class:`~resilient_db.Classification` (or None for an
        application error without one); ``fields`` set or override the rest.
        """
        base: dict[str, Any] = {
            "dialect": target.dialect,
            "driver": target.driver,
            "host": target.host,
            "port": target.port,
            "database": target.database,
            "user": target.user,
        }
        if verdict is not None:
            base.update(
                code=verdict.code,
                kind=verdict.kind.value,
                retry=verdict.retry.value,
                diagnosis=verdict.diagnosis,
            )
        base.update(fields)
        return cls(engine=engine, phase=phase, **base)

    def to_dict(self) -> dict[str, Any]:
        """Return the context as a JSON-serialisable dict."""
        data = dataclasses.asdict(self)
        data["history"] = list(self.history)
        data["extra"] = dict(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ErrorContext:
        """The context :meth:`to_dict` serialised (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in names}
        fields["history"] = tuple(fields.get("history") or ())
        fields["extra"] = tuple(dict(fields.get("extra") or {}).items())
        return cls(**fields)


def _context(context: ErrorContext | dict[str, Any] | None) -> ErrorContext | None:
    return ErrorContext.from_dict(context) if isinstance(context, dict) else context


def _portable_args(exc: BaseException, message: str, context: ErrorContext | None) -> None:
    """``args`` that rebuild ``exc`` as ``type(exc)(*args)``, JSON-serialisable.

    Result backends that serialise exceptions as JSON (Celery's default) store the
    type's name and ``args`` and call ``type(*args)`` to rebuild them.
    """
    exc.args = (message,) if context is None else (message, context.to_dict())


class ResilientDBError(Exception):
    """Base of every exception resilient_db raises itself."""

    context: ErrorContext | None

    @property
    def diagnosis(self) -> str:
        """The one-line diagnosis, or the message when there is no context."""
        if self.context is not None and self.context.diagnosis:
            return self.context.diagnosis
        return str(self)


class _Reason(Exception):
    """Stand-in for the DBAPI error a DBAPIError subclass expects as ``orig``."""


class _OperationalFault(ResilientDBError, sa_exc.OperationalError):
    def __init__(self, message: str, context: ErrorContext | dict[str, Any] | None = None) -> None:
        sa_exc.OperationalError.__init__(self, None, None, _Reason(message), hide_parameters=True)
        self.message = message
        self.context = context = _context(context)
        _portable_args(self, message, context)
        if context is not None:
            attach(self, context)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.context))


class CircuitOpenError(_OperationalFault):
    """The engine's circuit breaker is open: the call was rejected without I/O.

    ``context.retry_in`` says how long until the next probe is let through and
    ``context.diagnosis`` repeats the last underlying failure's diagnosis.

    A rejection by the engine's breaker is cheap: its message, context and
    note are rendered from values taken at the rejection, on first access.
    """

    _render: Callable[[], tuple[str, ErrorContext]] | None = None

    @classmethod
    def deferred(cls, render: Callable[[], tuple[str, ErrorContext]]) -> CircuitOpenError:
        """An error whose ``(message, context)`` ``render`` returns when first needed."""
        e = cls.__new__(cls)
        e._render = render
        return e

    def _materialize(self) -> bool:
        render = self._render
        if render is None:
            return False
        self._render = None
        message, context = render()
        _OperationalFault.__init__(self, message, context)
        return True

    def __getattr__(self, name: str) -> Any:
        # called only for an attribute not set yet: a deferred error's appear when rendered
        if self._materialize():
            return getattr(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property  # type: ignore[override]
    def orig(self) -> BaseException | None:  # set by SQLAlchemy's __init__, class default None
        self._materialize()
        orig: BaseException | None = self.__dict__.get("orig")
        return orig

    @orig.setter
    def orig(self, value: BaseException | None) -> None:
        self.__dict__["orig"] = value

    @property
    def args(self) -> tuple[Any, ...]:
        self._materialize()
        args: tuple[Any, ...] = BaseException.args.__get__(self)  # type: ignore[attr-defined]
        return args

    @args.setter
    def args(self, value: tuple[Any, ...]) -> None:
        BaseException.args.__set__(self, value)  # type: ignore[attr-defined]

    def __str__(self) -> str:
        self._materialize()
        return self.message

    def __repr__(self) -> str:
        self._materialize()
        return super().__repr__()

    def __reduce__(self) -> tuple[Any, ...]:
        self._materialize()
        return super().__reduce__()


class AmbiguousCommitError(_OperationalFault):
    """The connection was lost while COMMIT was in flight; the outcome is unknown.

    ``orig`` is the driver's error, as on any SQLAlchemy ``DBAPIError``
    (``.orig.sqlstate``, ``.orig.pgcode``, ``.orig.args``), when the engine
    raised it; ``connection_invalidated`` is True then.
    """

    def __init__(
        self,
        message: str,
        context: ErrorContext | None = None,
        *,
        orig: Exception | None = None,
    ) -> None:
        super().__init__(message, context)
        if orig is not None:
            self.orig = orig
            self.connection_invalidated = True


class NoPrimaryError(_OperationalFault):
    """A multi-host engine reached hosts, but none has the wanted role (no writable primary).

    A failover is in progress or the primary is down; classified ``read_only``
    and retried at connect like a refused connection. The message lists what
    each host answered.
    """


class PortableOperationalError(_OperationalFault):
    """A driver's database error with its context, in a form that crosses process boundaries.

    A plain :class:`sqlalchemy.exc.OperationalError` cannot be rebuilt from its
    ``args`` (Celery's JSON result backend turns it into ``builtins.Exception``)
    and pickling drops its :class:`ErrorContext`. :func:`portable_error` turns it
    into this one: still an ``OperationalError``, message and context kept.
    """


def portable_error(exc: BaseException) -> BaseException:
    """``exc`` in a form that survives pickling and JSON result backends with its context.

    A SQLAlchemy ``OperationalError``, ``InterfaceError`` or ``TimeoutError`` that
    carries an :class:`ErrorContext` becomes a :class:`PortableOperationalError`
    (raise it ``from exc``); anything else, resilient_db's own errors included, is
    returned unchanged.
    """
    if isinstance(exc, ResilientDBError):
        return exc
    if not isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)):
        return exc
    ctx = error_context(exc)
    if ctx is None:
        return exc
    return PortableOperationalError(f"{type(exc).__name__}: {exc}", ctx)


class PoolExhaustedError(ResilientDBError, sa_exc.TimeoutError):
    """No pooled connection became free in time, or too many callers were waiting."""

    def __init__(self, message: str, context: ErrorContext | dict[str, Any] | None = None) -> None:
        sa_exc.TimeoutError.__init__(self, message)
        self.message = message
        self.context = context = _context(context)
        _portable_args(self, message, context)
        if context is not None:
            attach(self, context)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.context))


class ConfigurationError(ResilientDBError, sa_exc.ArgumentError, ValueError):
    """A setting is invalid. ``field`` names it and ``fix`` says what to do."""

    def __init__(self, field: str, problem: str, fix: str = "", *, report: Any = None) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        self.report = report
        self.context = None
        message = f"{field}: {problem}"
        if fix:
            message += f" Fix: {fix}"
        sa_exc.ArgumentError.__init__(self, message)
        self.message = message
        self.args = (field, problem, fix)  # type(exc)(*args) rebuilds it (Celery's JSON)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.field, self.problem, self.fix))


def attach(exc: BaseException, context: ErrorContext) -> None:
    """Attach ``context`` to ``exc`` and add its diagnosis as a note (once)."""
    try:
        setattr(exc, _CONTEXT_ATTR, context)
    except (AttributeError, TypeError):  # pragma: no cover - exotic exception types
        return
    if not context.diagnosis:
        return
    note = f"{_NOTE_PREFIX}[{context.kind}] {context.diagnosis}"
    notes: list[str] = list(getattr(exc, "__notes__", ()))
    notes = [n for n in notes if not n.startswith(_NOTE_PREFIX)]
    notes.append(note)
    exc.__notes__ = notes  # type: ignore[attr-defined,unused-ignore]


REDACTED = "[redacted]"
#: shorter bind values are left alone: redacting "1" or "ab" would mangle the message
_MIN_REDACT = 4


def _bind_values(parameters: Any, depth: int = 0) -> set[str]:
    values: set[str] = set()
    if depth > 3 or parameters is None:
        return values
    if isinstance(parameters, dict):
        items: Any = parameters.values()
    elif isinstance(parameters, (list, tuple)):
        items = parameters
    else:
        items = (parameters,)
    for v in items:
        if isinstance(v, (dict, list, tuple)):
            values |= _bind_values(v, depth + 1)
        elif v is not None and not isinstance(v, bool):
            # any scalar: UUID, Decimal, date and datetime keys are echoed in DETAIL lines too
            try:
                if isinstance(v, (bytes, bytearray, memoryview)):
                    text = bytes(v).decode("utf-8", "replace")
                else:
                    text = str(v)
            except Exception:  # pragma: no cover - a value whose str() fails
                continue
            if len(text) >= _MIN_REDACT:
                values.add(text)
    return values


def redact_parameters(parameters: Any, *excs: BaseException | None) -> None:
    """Remove bind values echoed by the server from the messages of ``excs``.

    ``hide_parameters`` keeps SQLAlchemy from printing bind values, but servers
    quote them in their own messages (PostgreSQL: ``invalid input syntax for
    type integer: "..."``; unique violations: ``Key (email)=(...)``). Every
    string argument of each exception has those values replaced.
    """
    values = sorted(_bind_values(parameters), key=len, reverse=True)
    if not values:
        return
    for exc in excs:
        if exc is None or not exc.args:
            continue
        args = list(exc.args)
        changed = False
        for i, arg in enumerate(args):
            if isinstance(arg, str):
                new = arg
                for v in values:
                    new = new.replace(v, REDACTED)
                if new != arg:
                    args[i] = new
                    changed = True
        if changed:
            try:
                exc.args = tuple(args)
            except (AttributeError, TypeError):  # pragma: no cover - exotic exceptions
                continue


def error_context(exc: BaseException | None) -> ErrorContext | None:
    """Return the :class:`ErrorContext` attached to ``exc`` or to its causes.

    Follows a SQLAlchemy error's ``orig`` and explicit causes (``raise ... from``),
    never ``__context__``: an error raised inside an ``except`` block is not caused
    by the error being handled and must not take its context.
    """
    if exc is not None and not isinstance(exc, BaseException):
        raise ConfigurationError(
            "exc",
            f"must be an exception or None, got {type(exc).__name__}.",
            "Pass the exception you caught: error_context(exc).",
        )
    for e in chain(exc):
        ctx = getattr(e, _CONTEXT_ATTR, None)
        if isinstance(ctx, ErrorContext):
            return ctx
    return None


def chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc``, its DBAPI ``orig`` and their explicit causes, nearest first, without repeats.

    The one walk of an error chain in the package (classification, context
    lookup, redaction). ``__context__`` is never followed: an error raised while
    handling another was not caused by it.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        orig = getattr(e, "orig", None)
        if isinstance(orig, BaseException):
            todo.append(orig)
        todo.append(e.__cause__)
