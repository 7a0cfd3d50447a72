"""Recognising a COMMIT in client->server bytes (PostgreSQL and MySQL wire protocols).

The :class:`~resilient_db.testing.FaultProxy` commit faults fire on the chunk
that carries a COMMIT statement.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

# A COMMIT statement at the start of a query text or after a ';'.  Control bytes
# are skipped so that MySQL query-attribute prefixes do not hide the keyword;
# the word boundary keeps ``SET AUTOCOMMIT = 0`` and ``READ COMMITTED`` out.
_COMMIT_RE = re.compile(rb"(?:^|;)[\x00-\x20]*(?:XA[\x00-\x20]+)?COMMIT\b", re.IGNORECASE)
_PG_QUERY = ord("Q")
_PG_PARSE = ord("P")
_MYSQL_COM_QUERY = 0x03


def query_texts(data: bytes) -> Iterator[bytes]:
    """Yield SQL texts found in a client->server chunk (PostgreSQL Q/P, MySQL COM_QUERY)."""
    n = len(data)
    # PostgreSQL frontend messages: tag byte + 4-byte big-endian length (incl. itself).
    pos = 0
    while pos + 5 <= n:
        tag = data[pos]
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if length < 4 or not (0x41 <= tag <= 0x5A or 0x61 <= tag <= 0x7A):
            break
        body = data[pos + 5 : pos + 1 + length]
        if tag == _PG_QUERY:
            yield body.split(b"\0", 1)[0]
        elif tag == _PG_PARSE:
            parts = body.split(b"\0", 2)
            if len(parts) >= 2:
                yield parts[1]
        pos += 1 + length
    # MySQL packets: 3-byte little-endian payload length + sequence id + payload.
    pos = 0
    while pos + 5 <= n:
        length = int.from_bytes(data[pos : pos + 3], "little")
        if length == 0:
            break
        if data[pos + 3] == 0 and data[pos + 4] == _MYSQL_COM_QUERY:
            yield data[pos + 5 : pos + 4 + length]
        pos += 4 + length


def is_commit(data: bytes) -> bool:
    """Whether a client->server chunk carries a COMMIT statement."""
    if b"commit" not in data.lower():
        return False
    return any(_COMMIT_RE.search(text) for text in query_texts(data))
