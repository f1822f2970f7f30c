"""Byte forwarding between two connected sockets (the scale-from-outside test's bridges to the dashboard)."""

from __future__ import annotations

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
