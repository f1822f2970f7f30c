"""Sockets for the tests that start their own Ray head: byte forwarding between two connected sockets (the
scale-from-outside test's bridges to the dashboard) and the fixed ports such a head listens on."""

from __future__ import annotations

import random
import socket


def pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy `src` to `dst` until `src` closes, then close `dst`'s sending side (errors end the copy)."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def listen_ports(n: int) -> list[int]:
    """`n` distinct ports free now on 127.0.0.1, drawn between Ray's worker ports and the kernel's ephemeral range.

    A port from `bind(("", 0))` is ephemeral: once closed, any outgoing connection on the machine may take it before
    the server it was picked for binds it. Below the range only another explicit bind can, so a server started
    seconds later (a Ray head's GCS or dashboard) still finds its port free. Ray refuses a component port among its
    workers' (10002-19999 by default), hence the floor."""
    floor = 20_000
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    if low <= floor:
        raise RuntimeError(
            f"the ephemeral range starts at {low}: no ports between {floor} and it to draw from"
        )
    ports: list[int] = []
    for port in random.sample(range(floor, low), k=min(500, low - floor)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free ports between {floor} and {low}")
