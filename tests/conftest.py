import socket

import pytest

from pipelines.random_models import save_random_model


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs with outgoing connections refused: nothing may reach a hub."""
    def refuse(*args, **kwargs):
        raise OSError("network access is blocked in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
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
