"""The Redis side of the fleet breaker store (:mod:`resilient_db.fleet`).

The Lua scripts that read and change a breaker's shared state, one round trip
each (keys in one Redis Cluster slot, see the fleet module), and the client
built from a URL: short timeouts, no retries, its password remembered so that
errors can be scrubbed of it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from .errors import ConfigurationError

# KEYS: open, tripped. Returns {PTTL open (ms, <0: absent), tripped's reason or ''}.
_READ = """
local why = redis.call('GET', KEYS[2])
if not why then why = '' end
return {redis.call('PTTL', KEYS[1]), why}
"""

# KEYS: open, tripped, ok. ARGV: holder, open ms, tripped ms, reason.
# A later deadline already set by another replica is kept.
_OPEN = """
local ms = tonumber(ARGV[2])
if ms > 0 and redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ms)
end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[3])
redis.call('DEL', KEYS[3])
return 1
"""

# KEYS: every key of the breaker.
_CLOSE = """
return redis.call('DEL', unpack(KEYS))
"""

# KEYS: open, tripped, lease 1..n. ARGV: holder, lease ms.
# Returns {slot, 0} granted; {0, ms} all slots taken (soonest expiry);
# {-1, ms} open; {-2, 0} closed.
_ACQUIRE = """
local open = redis.call('PTTL', KEYS[1])
if open > 0 then return {-1, open} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {-2, 0} end
for i = 3, #KEYS do
  if redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then return {i - 2, 0} end
end
local wait = -1
for i = 3, #KEYS do
  local t = redis.call('PTTL', KEYS[i])
  if t > 0 and (wait < 0 or t < wait) then wait = t end
end
return {0, wait}
"""

# KEYS: lease. ARGV: holder, lease ms (0: release).
_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('DEL', KEYS[1])
"""

# KEYS: lease, open, tripped, ok, then every key of the breaker.
# ARGV: holder, success threshold, tripped ms. Returns 1 when this closed the fleet.
_PROBE_OK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
local n = redis.call('INCR', KEYS[4])
redis.call('PEXPIRE', KEYS[4], ARGV[3])
if n < tonumber(ARGV[2]) then return 0 end
redis.call('DEL', unpack(KEYS, 2))
return 1
"""

_SCRIPTS = (
    ("read", _READ),
    ("open", _OPEN),
    ("close", _CLOSE),
    ("acquire", _ACQUIRE),
    ("lease", _LEASE),
    ("probe_ok", _PROBE_OK),
)


def register_scripts(client: Any) -> dict[str, Any]:
    """The store's scripts registered on ``client``, by name."""
    return {n: client.register_script(src) for n, src in _SCRIPTS}


def client_secrets(client: Any) -> tuple[str, ...]:
    """The password of a ready client, to scrub from its errors."""
    pw = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    if isinstance(pw, dict) and pw.get("password"):
        return (str(pw["password"]),)
    return ()


def client_from_url(url: str, socket_timeout: float) -> tuple[Any, tuple[str, ...]]:
    """A client for ``url`` with every call bounded by ``socket_timeout``, and its secrets."""
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:  # pragma: no cover - the extra is not installed
        raise ConfigurationError(
            "redis", "needs the redis package.", "pip install 'resilient-db[redis]'"
        ) from None
    secrets: tuple[str, ...] = ()
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        secrets = (password, unquote(password))
    try:
        client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
    except ValueError:
        raise ConfigurationError(
            "redis",
            "is not a valid Redis URL.",
            "Use redis://[:password@]host:port/db or rediss://...",
        ) from None
    return client, secrets
