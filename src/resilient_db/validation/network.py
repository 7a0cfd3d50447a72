"""Bare network probes: DNS (RDB201) and TCP (RDB202/RDB203), before any driver runs."""

from __future__ import annotations

import ipaddress
import socket

from ..classify import Kind, explain
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
        what, fix = explain("dns_temporary" if temporary else Kind.DNS, run.target)
        said = f" The resolver said: {exc.strerror}."
        run.add("RDB201", "error", what + said, fix, "url", temporary=temporary)
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
            reason = f"No answer within {_secs(round(step, 2))}."
        except OSError as exc:  # no route, network down...
            unreachable += 1
            reason = f"The system said: {exc.strerror or exc}."
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
    if unreachable or not refused:
        what, fix = explain("tcp_timeout", run.target)
        run.add("RDB203", "error", f"{what} {reason}".rstrip(), fix, "url")
        run.block("RDB203", "network", "connection")
    else:
        what, fix = explain(Kind.REFUSED, run.target)
        run.add("RDB202", "error", f"{what} The connection was refused.", fix, "url")
        run.block("RDB202", "network", "connection")
