"""Bare network probes: DNS (RDB201) and TCP (RDB202/RDB203), before any driver runs."""

from __future__ import annotations

import ipaddress
import socket

from .context import _Run, _secs


def _check_dns(run: _Run) -> None:
    """RDB201: the host name resolves."""
    host = run.target.host
    if not host or host.startswith("/"):
        run.ok("RDB201", "No host name: the driver connects over a Unix socket.")
        return
    port = run.target.port or 0
    try:
        ipaddress.ip_address(host)
        literal = True
    except ValueError:
        literal = False
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        temporary = exc.errno == socket.EAI_AGAIN
        run.add(
            "RDB201",
            "error",
            (
                f"The DNS lookup of '{host}' failed temporarily ({exc.strerror}): the "
                "resolver is unreachable or overloaded."
                if temporary
                else f"The host name '{host}' does not resolve ({exc.strerror})."
            ),
            "Check the host in the URL (a typo, a missing DNS record, or a name that only "
            "resolves inside another network or VPN) and this machine's resolver.",
            "url",
            temporary=temporary,
        )
        run.block("RDB201", "network", "connection")
        return
    run.addrs = list(infos)
    shown = sorted({str(i[4][0]) for i in infos})
    if literal:
        run.ok("RDB201", f"{host} is an IP address.")
    else:
        run.ok("RDB201", f"{host} resolves to {', '.join(shown[:4])}.", addresses=len(shown))


def _check_tcp(run: _Run) -> None:
    """RDB202/RDB203: something accepts TCP connections at host:port."""
    if "network" in run.blocked:
        run.skip("RDB202", run.blocked["network"])
        return
    if not run.addrs:
        return
    refused = unreachable = 0
    reason = ""
    for family, socktype, proto, _name, sockaddr in run.addrs:
        step = run.step_timeout()
        if step is None:
            run.abandon()
            return
        s = socket.socket(family, socktype, proto)
        s.settimeout(step)
        t = run.clock()
        try:
            s.connect(sockaddr)
        except ConnectionRefusedError:
            refused += 1
        except TimeoutError:
            unreachable += 1
            reason = f"no answer within {_secs(round(step, 2))}"
        except OSError as exc:  # no route, network down...
            unreachable += 1
            reason = exc.strerror or str(exc)
        else:
            run.tcp_ok = True
            run.ok(
                "RDB202",
                f"{run.target.where} accepts TCP connections ({(run.clock() - t) * 1000:.1f} ms).",
            )
            return
        finally:
            s.close()
    run.tcp_ok = False
    where = run.target.where
    if unreachable or not refused:
        run.add(
            "RDB203",
            "error",
            f"{where} did not answer the TCP connection ({reason}): the "
            "host is down or unreachable, or a firewall drops the packets (blackholed).",
            "Check the host and port in the URL, routing, and firewall or security-group "
            "rules between this machine and the database.",
            "url",
        )
        run.block("RDB203", "network", "connection")
    else:
        run.add(
            "RDB202",
            "error",
            f"Nothing accepts connections at {where}: connection refused. The server is "
            "down or restarting, the port is wrong, or it listens on another address.",
            "Check the host and port in the URL, and that the server runs and listens on "
            "that address (PostgreSQL listen_addresses, MariaDB bind-address).",
            "url",
        )
        run.block("RDB202", "network", "connection")
