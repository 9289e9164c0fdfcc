import json
import shutil
import socket

import pytest
import torch

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


@pytest.fixture(scope="session")
def full_lcm_folder(tiny_model_factory, tmp_path_factory):
    """The tiny model with a guidance-distilled UNet (``time_cond_proj_dim``: a full LCM), seeded weights."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("full-lcm") / "model"
    shutil.copytree(tiny_model_factory(), folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    with torch.random.fork_rng():  # diffusers initialises from the global generator
        torch.manual_seed(3)
        unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 8})
    unet.save_pretrained(folder / "unet")
    return folder
