"""Startup validation: will this URL and policy work, and if not, why not?

:func:`validate` runs small checks, layer by layer, and returns a
:class:`Report` of :class:`Finding` values with stable codes (the full list,
with causes and fixes, is in ``docs/checks.md``)::

    RDB1xx  URL and driver          RDB4xx  server capacity and version
    RDB2xx  network: DNS, TCP, TLS  RDB5xx  policy timeouts vs the server's
    RDB3xx  login, database, role   RDB6xx  hygiene

Once a layer fails, the checks that need the server are reported as skipped,
so the first error is the root cause. The whole run is bounded by its
deadline: each network step gets the policy's connect timeout or what is left
of the deadline, and the checks run in a worker thread that is abandoned if a
driver ignores its timeout.

Validation opens its own short-lived connections (a throw-away engine with
``NullPool`` and the engine's connect arguments), never the engine's pool, so
its failures do not count for the circuit breaker. No password appears in a
report.

Modules: :mod:`.report` (findings, report, codes), :mod:`.context` (the state
of one run), :mod:`.local` (URL, driver, policy, hygiene, SQLite file),
:mod:`.network` (DNS, TCP), :mod:`.connect` (the throw-away connection and
what its failure means), :mod:`.server` (server-side checks), :mod:`.runner`
(the plan, the deadline, :func:`startup_check`) and :mod:`.cli`
(``resilient-db check``).
"""

from .report import CHECKS, SCHEMA_VERSION, Finding, Report
from .runner import CONFIG_CODES, is_configuration_error, startup_check, validate

__all__ = [
    "CHECKS",
    "CONFIG_CODES",
    "SCHEMA_VERSION",
    "Finding",
    "Report",
    "is_configuration_error",
    "startup_check",
    "validate",
]
