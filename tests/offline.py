"""Tests never touch the network: TCP connections from the test process go to this machine only.

HTTP tests (the service, the job server) talk to servers the tests started on this machine; any
other destination raises `NetworkBlocked` naming it. UDP `connect` sends nothing (Ray uses it to
find the local interface) and stays allowed.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Callable
from typing import Any


class NetworkBlocked(RuntimeError):
    pass


@functools.cache
def _own_addresses() -> frozenset[str]:
    """The addresses of this machine's interfaces that its host name resolves to."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        return frozenset()
    return frozenset(str(info[4][0]) for info in infos)


def is_local(address: Any) -> bool:
    """Whether a socket address is a unix path, a loopback address or one of this machine's."""
    if not isinstance(address, tuple):
        return True  # AF_UNIX paths
    host = str(address[0])
    if host in ("localhost", "") or host in _own_addresses():
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False  # a name that would need DNS


def _guarded(connect: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(connect)
    def checked(self: socket.socket, address: Any) -> Any:
        if self.type == socket.SOCK_STREAM and not is_local(address):
            raise NetworkBlocked(f"a test tried to reach {address!r}: tests must stay offline")
        return connect(self, address)

    return checked


def block_network() -> None:
    """Refuse TCP connections that leave this machine, for the rest of the process."""
    socket.socket.connect = _guarded(socket.socket.connect)  # type: ignore[method-assign]
    socket.socket.connect_ex = _guarded(socket.socket.connect_ex)  # type: ignore[method-assign]
