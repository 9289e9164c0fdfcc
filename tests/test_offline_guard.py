"""The test suite's network guard (conftest.no_network): internet connections fail, local sockets work."""
import socket

import pytest


def test_internet_connections_are_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(OSError, match="network access is blocked"):
            sock.connect(("127.0.0.1", 9))
    with pytest.raises(OSError, match="network access is blocked"):
        socket.create_connection(("huggingface.co", 443))


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no AF_UNIX sockets")
def test_local_sockets_connect(tmp_path):
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        server.bind(path)
        server.listen(1)
        client.connect(path)
        connection, _ = server.accept()
        with connection:
            client.sendall(b"x")
            assert connection.recv(1) == b"x"
