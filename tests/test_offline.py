import socket

import pytest

from tests.offline import NetworkBlocked, is_local


def test_a_connection_off_this_machine_is_refused_by_name() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock,
        pytest.raises(NetworkBlocked, match="192.0.2.1"),
    ):
        sock.connect(("192.0.2.1", 80))


def test_local_addresses_are_allowed_and_names_are_not() -> None:
    assert is_local(("127.0.0.1", 8000)) and is_local(("::1", 8000, 0, 0))
    assert is_local("/tmp/ray/session/sockets/raylet")
    assert not is_local(("pypi.org", 443)) and not is_local(("198.51.100.7", 80))


def test_a_local_server_still_answers() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, _ = server.accept()
            conn.close()
