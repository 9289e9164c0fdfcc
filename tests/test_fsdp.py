"""Checkpoints and EMA under FSDP2 sharding (``fully_shard``; two CPU processes over gloo, as accelerate's FSDP
plugin shards a model on GPUs): a sharded run resumed from its checkpoint equals the uninterrupted run bit for bit,
the checkpoint holds the full weights (it loads into one unsharded process), and the EMA / final model come back
unsharded."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines.random_models import random_components
from train import common

STEPS, HALF = 4, 2


def train_steps(unet, optimizer, ema, steps: range) -> None:
    """AdamW steps on a random denoising-shaped loss; each process draws its own batch (keyed by step and rank)."""
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * step + dist.get_rank())
        x = torch.randn(2, 4, 8, 8, generator=gen)
        cond = torch.randn(2, 3, 32, generator=gen)
        loss = unet(x, torch.tensor([10, 500]), encoder_hidden_states=cond).sample.square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(step)


def sharded_run(seed: int):
    from torch.distributed.fsdp import fully_shard

    unet, _, _ = random_components("tiny", seed=seed)
    unet.train()
    for block in (*unet.down_blocks, *unet.up_blocks):
        fully_shard(block)
    fully_shard(unet)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    return unet, optimizer, common.EMA(unet, 0.9)


def worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        unet, optimizer, ema = sharded_run(seed=0)
        assert common.full_model(None, unet) is not unet  # sharded: the full model is an unsharded copy
        train_steps(unet, optimizer, ema, range(HALF))
        common.save_checkpoint(out, HALF, "fsdp-test", {}, ema.checkpoint_models(unet), optimizer)
        half = common.gather_tensors(unet.state_dict())
        train_steps(unet, optimizer, ema, range(HALF, STEPS))
        whole = common.gather_tensors(unet.state_dict())
        whole_ema = ema.averaged()

        unet, optimizer, ema = sharded_run(seed=1)  # other weights, overwritten by the checkpoint
        path = common.checkpoint_dir(out) / f"step-{HALF:07d}"
        common.load_checkpoint(path, "fsdp-test", {}, ema.checkpoint_models(unet), optimizer)
        train_steps(unet, optimizer, ema, range(HALF, STEPS))
        resumed = common.gather_tensors(unet.state_dict())
        resumed_ema = ema.averaged()
        if rank == 0:
            from torch.distributed.fsdp import FSDPModule

            assert not isinstance(resumed_ema, FSDPModule) and type(resumed_ema).__name__ == "UNet2DConditionModel"
            torch.save({"half": half, "whole": whole, "resumed": resumed, "whole_ema": whole_ema.state_dict(),
                        "resumed_ema": resumed_ema.state_dict()}, f"{out}/result.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp_checkpoint_resumes_exactly_and_loads_unsharded(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    for a, b in (("whole", "resumed"), ("whole_ema", "resumed_ema")):
        assert result[a].keys() == result[b].keys()
        assert all(torch.equal(result[a][k], result[b][k]) for k in result[a])
    # the sharded run's checkpoint loads into one unsharded process: full weights, optimizer state by name
    unet, _, _ = random_components("tiny", seed=1)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    ema = common.EMA(unet, 0.9)
    path = common.checkpoint_dir(tmp_path) / f"step-{HALF:07d}"
    assert common.load_checkpoint(path, "fsdp-test", {}, ema.checkpoint_models(unet), optimizer)["step"] == HALF
    state = optimizer.state_dict()["state"]
    assert len(state) == len(list(unet.parameters())) and all(float(s["step"]) == HALF for s in state.values())
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in result["half"].items())


def test_checkpoints_with_index_keyed_optimizer_state_still_resume(tmp_path):
    """Checkpoints written before the state-by-name format (``optimizer.state_dict()`` as is) load unchanged."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = common.save_checkpoint(tmp_path, 1, "old", {}, {"model": model}, optimizer)
    torch.save(optimizer.state_dict(), path / "optimizer.pt")  # the older layout: parameters by index
    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    common.load_checkpoint(path, "old", {}, {"model": fresh}, fresh_optimizer)
    assert torch.equal(fresh.weight, model.weight)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(fresh_optimizer.state_dict()["state"][0][key], optimizer.state_dict()["state"][0][key])


def fsdp_accelerator(make_accelerator):
    """``make_accelerator`` with accelerate's FSDP2 plugin (transformer-based wrapping, as
    train/accelerate_configs/fsdp.yaml) switched on: accelerate applies it only to GPUs, but its FSDP code runs on
    CPUs."""
    def make(args):
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        accelerator = make_accelerator(args)
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT",
            reshard_after_forward=True)
        return accelerator
    return make


def recipe_worker(rank: int, ports: list[int], runs: list[list[str]]) -> None:
    """One process of ``accelerate launch`` with FSDP: each run forms its process group (accelerate reads these
    variables) and ends it."""
    import os

    from train.finetune import run

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", LDM_NO_PROGRESS="1")
    common.make_accelerator = fsdp_accelerator(common.make_accelerator)
    for port, argv in zip(ports, runs):
        os.environ["MASTER_PORT"] = str(port)
        run(argv, "dreambooth")


def test_dreambooth_lora_under_accelerate_fsdp_resumes_exactly(tmp_path):
    """DreamBooth (LoRA, prior preservation, validation samples) through accelerate's FSDP2 on two processes: the
    run resumed from its checkpoint saves the same LoRA file as the uninterrupted one, and it is trained."""
    from pipelines.random_models import save_random_model
    from safetensors.torch import load_file
    from test_lora import render_subjects

    model, subjects = save_random_model(tmp_path / "model", "tiny"), render_subjects(tmp_path / "subject")
    args = ["--model", str(model), "--instance-data", str(subjects), "--instance-prompt", "a sks shape",
            "--class-prompt", "a shape", "--num-class-images", "2", "--class-steps", "1", "--sample-every", "2",
            "--validation-steps", "1", "--mixed-precision", "no", "--lr", "1e-3", "--method", "lora", "--steps", "3"]
    runs = [args + ["--output-dir", str(tmp_path / "whole")],
            args + ["--output-dir", str(tmp_path / "parts"), "--stop-after", "2"],
            args + ["--output-dir", str(tmp_path / "parts"), "--resume", "latest"]]
    mp.spawn(recipe_worker, args=([free_port() for _ in runs], runs), nprocs=2, join=True)
    whole = load_file(str(tmp_path / "whole" / "final" / "pytorch_lora_weights.safetensors"))
    parts = load_file(str(tmp_path / "parts" / "final" / "pytorch_lora_weights.safetensors"))
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    up = [v for k, v in whole.items() if "lora_B" in k or "lora.up" in k]  # zero-initialised, so nonzero = trained
    assert up and all(float(v.abs().sum()) > 0 for v in up)
    assert (tmp_path / "whole" / "samples" / "step-0000002.png").is_file()
