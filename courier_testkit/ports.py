"""Ports on 127.0.0.1: a free one to hand a child process; ``bound_port`` is ``service.net``'s."""

from __future__ import annotations

import socket

from service.net import bound_port

__all__ = ["LOOPBACK", "bound_port", "free_port", "free_port_pair"]

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the kernel's choice; free until someone binds it).

    Also what a test wants for "a port that refuses connections".
    """
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def free_port_pair(host: str = LOOPBACK) -> int:
    """A port p such that p and p + 1 are both free now (a daemon's HTTP and metrics ports)."""
    for _ in range(100):
        first = free_port(host)
        with socket.socket() as probe:
            try:
                probe.bind((host, first + 1))
            except OSError:
                continue
        return first
    raise RuntimeError("no two consecutive free ports")
