import socket

import pytest

from pipelines.random_models import save_random_model


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs with outgoing internet connections refused: nothing may reach a hub. Local (AF_UNIX)
    sockets stay open: worker processes pass tensors through them."""
    local_connect = socket.socket.connect

    def refuse(*args, **kwargs):
        raise OSError("network access is blocked in tests")

    def connect(sock, address):
        if sock.family == getattr(socket, "AF_UNIX", None):
            return local_connect(sock, address)
        refuse()

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Build (once per scheduler config) a tiny random model folder and return its path."""
    cache = {}

    def make(**scheduler):
        key = tuple(sorted(scheduler.items()))
        if key not in cache:
            folder = tmp_path_factory.mktemp("tiny-model")
            cache[key] = save_random_model(folder, "tiny", scheduler)
        return cache[key]

    return make
