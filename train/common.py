"""Shared pieces of the training recipes: flags, accelerate setup, seeded randomness, learning-rate schedule,
checkpoints that resume exactly, image grids and small file checks.

Randomness: every random draw of a recipe comes from a generator seeded by ``(seed, stream, step, micro-batch,
process)`` (:func:`numpy_rng`, :func:`torch_generator`), never from global state. A run resumed at step k therefore
draws exactly what the uninterrupted run drew from step k on, and a checkpoint needs only the weights, the
optimizer state and the step (the global RNG states are stored and restored as well, for code that uses them).

Checkpoints live in ``<output-dir>/checkpoints/step-XXXXXXX/``: one ``<name>.safetensors`` per model (float32),
``optimizer.pt`` and ``state.json`` (step, recipe, model config, RNG states). ``--resume latest`` picks the newest.
They hold full (unsharded) tensors keyed by parameter name, whatever the number of processes: the weights of an
FSDP-sharded model are gathered by every process and written by the first, and the optimizer state goes through
``torch.distributed.checkpoint``'s full state dict, so a checkpoint of an 8-GPU FSDP run resumes on one CPU and the
other way round. Every collective step (saving, validation samples, the final model) therefore runs on every
process; only the main process writes files.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PRECISIONS = ("auto", "no", "bf16", "fp16")

# Independent random streams; a draw is keyed by (seed, stream, step, micro-batch, process).
STREAM_DATA = 1
STREAM_NOISE = 2
STREAM_SAMPLE = 3
STREAM_EVAL = 4
STREAM_INIT = 5

# Dataset seeds used for held-out evaluation images are offset from the training data seed by this much, so
# that they are never among the training renders (item i depends only on (seed, i)).
EVAL_SEED_OFFSET = 1_000_003


# --------------------------------------------------------------------------- flags


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_common_args(parser: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float,
                    checkpoint_every: int, sample_every: int, warmup: int) -> None:
    """Flags every recipe has."""
    g = parser.add_argument_group("training")
    g.add_argument("--output-dir", required=True, help="run folder: checkpoints/, samples/, final/, log.jsonl")
    g.add_argument("--steps", type=positive_int, default=steps, help="optimizer steps (default %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help="per-process micro-batch (default %(default)s)")
    g.add_argument("--grad-accum", type=positive_int, default=1,
                   help="micro-batches per optimizer step (default %(default)s)")
    g.add_argument("--lr", type=positive_float, default=lr, help="peak learning rate (default %(default)s)")
    g.add_argument("--warmup", type=non_negative_int, default=warmup,
                   help="linear warm-up steps before the cosine decay (default %(default)s)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="cosine decay ends at this fraction of --lr (default %(default)s)")
    g.add_argument("--mixed-precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype; auto = bf16 where the hardware computes it natively, else fp32 "
                        "(default %(default)s, see resolve_precision)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed of every random draw (default 0)")
    g.add_argument("--checkpoint-every", type=non_negative_int, default=checkpoint_every,
                   help="save a resumable checkpoint every N steps; 0 = only at the end (default %(default)s)")
    g.add_argument("--keep-checkpoints", type=positive_int, default=2,
                   help="keep the newest N checkpoints (default %(default)s)")
    g.add_argument("--resume", default=None, metavar="PATH|latest",
                   help="continue from a checkpoint folder, or the newest one in --output-dir/checkpoints")
    g.add_argument("--stop-after", type=non_negative_int, default=0,
                   help="leave after N steps of this invocation with a checkpoint (0 = run to --steps); for "
                        "time-sliced jobs, continue with --resume latest")
    g.add_argument("--sample-every", type=non_negative_int, default=sample_every,
                   help="write samples / validation metrics every N steps; 0 = only at the end (default %(default)s)")
    g.add_argument("--log-every", type=positive_int, default=10, help="append to log.jsonl every N steps")
    g.add_argument("--model-config", default=None, metavar="JSON",
                   help="a JSON file with the model config (overrides --preset)")


def check_common_args(args: argparse.Namespace) -> None:
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        raise ValueError(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.warmup > args.steps:
        args.warmup = args.steps


def model_config_from_args(args: argparse.Namespace, presets: dict[str, dict]) -> dict:
    """The model config: ``--model-config FILE`` if given, else the named ``--preset``."""
    if args.model_config:
        path = Path(args.model_config)
        if not path.is_file():
            raise FileNotFoundError(f"--model-config file {path} does not exist")
        return json.loads(path.read_text())
    if args.preset not in presets:
        raise ValueError(f"unknown preset {args.preset!r}; known: {', '.join(presets)}")
    return json.loads(json.dumps(presets[args.preset]))  # a deep copy with JSON types (tuples -> lists)


# --------------------------------------------------------------------------- accelerate


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX-512 BF16 or AMX), read from /proc/cpuinfo's flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup(size: int = 768, repeats: int = 3) -> float:
    """How many times faster a ``size``-square matmul runs in bf16 than in fp32 on this CPU (best of ``repeats``).

    A CPU flag does not promise speed: on a 2-core Xeon that reports AVX-512 BF16 (torch 2.13) a 2048^2 bf16
    matmul ran at 110 GFLOP/s against 208 in fp32, and a 3x3 convolution at 112 against 184 -- training the
    default UNet in bf16 autocast was 0.78x the speed of fp32. So "auto" measures (~0.1 s, once per process).
    """
    def best_seconds(dtype: torch.dtype) -> float:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=gen).to(dtype)
        b = torch.randn(size, size, generator=gen).to(dtype)
        a @ b  # warm-up: kernel selection and packing
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best_seconds(torch.float32) / best_seconds(torch.bfloat16)


# bf16 autocast on a CPU must beat fp32 by this factor to be chosen by "auto" (it also costs accuracy).
CPU_BF16_MIN_SPEEDUP = 1.3


def resolve_precision(choice: str) -> str:
    """The mixed precision to train with: ``choice``, or for "auto" bf16 where it is native and faster, else "no".

    On a CUDA GPU: bf16 where supported, else fp16. On a CPU: bf16 only when it has bf16 matrix instructions
    (AVX-512 BF16 / AMX; elsewhere bf16 is emulated: 0.9 GFLOP/s against 137 in fp32 on a 2-core AVX2 EPYC) and
    a measured bf16 matmul is at least ``CPU_BF16_MIN_SPEEDUP`` times faster than fp32 (see ``cpu_bf16_speedup``).
    """
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if torch.backends.mps.is_available():
        return "no"
    if cpu_has_native_bf16() and cpu_bf16_speedup() >= CPU_BF16_MIN_SPEEDUP:
        return "bf16"
    return "no"


def make_accelerator(args: argparse.Namespace):
    """An ``Accelerator`` with the run's mixed precision and gradient accumulation. Accelerate's process-wide
    state is reset first, so several recipes can run one after another in one process (also in a multi-process
    launch)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # A recipe's end_training() ends the process group; the next recipe in the same process forms it again.
    distributed_ended = torch.distributed.is_available() and not torch.distributed.is_initialized()
    AcceleratorState._reset_state(reset_partial_state=distributed_ended)
    GradientState._reset_state()
    # Without a GPU, accelerate only forms a multi-process (gloo) group under torchrun when told it runs on CPU.
    cpu_only = not (torch.cuda.is_available() or torch.backends.mps.is_available()
                    or (hasattr(torch, "xpu") and torch.xpu.is_available()))
    return Accelerator(mixed_precision=resolve_precision(args.mixed_precision),
                       gradient_accumulation_steps=args.grad_accum, cpu=cpu_only)


# Blocks that accelerate's FSDP (TRANSFORMER_BASED_WRAP with no class list, as train/accelerate_configs/fsdp.yaml)
# shards one by one, when the model holds them.
FSDP_UNITS = ("BasicTransformerBlock", "JointTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer")


def declare_fsdp_units(model: torch.nn.Module) -> torch.nn.Module:
    """Set ``model._no_split_modules`` (what accelerate's transformer-based FSDP wrapping reads) to the
    :data:`FSDP_UNITS` it contains, so that any recipe's model (a UNet, an MMDiT, a ControlNet, a UNet and text
    encoder together) is sharded block by block; ignored without FSDP."""
    present = {type(module).__name__ for module in model.modules()}
    model._no_split_modules = [name for name in FSDP_UNITS if name in present]
    return model


# --------------------------------------------------------------------------- randomness


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A numpy Generator determined by ``seed`` and ``keys`` (stream, step, ...)."""
    return np.random.default_rng([int(seed), *(int(k) for k in keys)])


def torch_generator(seed: int, *keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch Generator determined by ``seed`` and ``keys``."""
    value = int(numpy_rng(seed, *keys).integers(0, 2**63 - 1))
    return torch.Generator(device=device).manual_seed(value)


def seeded_init(seed: int, build):
    """Build a model with its random initialisation drawn from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(numpy_rng(seed, STREAM_INIT).integers(0, 2**63 - 1)))
        return build()


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to ``--lr`` over ``--warmup`` steps, then cosine decay to ``lr * min_lr_ratio``."""
    if args.warmup and step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    span = max(1, args.steps - args.warmup)
    progress = min(1.0, (step - args.warmup) / span)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------- checkpoints


def _canonical(config: Any) -> Any:
    return json.loads(json.dumps(config, sort_keys=True))


def config_difference(saved: dict, current: dict) -> str | None:
    """First differing key of two model configs as ``"key: saved != current"``, or None if they match."""
    saved, current = _canonical(saved), _canonical(current)
    for key in sorted(set(saved) | set(current)):
        if saved.get(key, "<missing>") != current.get(key, "<missing>"):
            return f"{key}: {saved.get(key, '<missing>')!r} != {current.get(key, '<missing>')!r}"
    return None


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    # a finished checkpoint: step-XXXXXXX (not a .tmp one being written) with its state.json, written last
    return sorted(p for p in folder.glob("step-*")
                  if re.fullmatch(r"step-\d{7}", p.name) and (p / "state.json").is_file())


def find_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint folder ``--resume`` names: None, ``latest`` (None if there is none yet) or a path."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint there (expected {path / 'state.json'})")
    return path


def _unwrap(accelerator, model):
    return accelerator.unwrap_model(model) if accelerator is not None else model


def _is_main_process(accelerator) -> bool:
    if accelerator is not None:
        return accelerator.is_main_process
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


def _is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def gather_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full float32 CPU copies of named tensors; FSDP shards (DTensors) are all-gathered, so under FSDP every process
    must call this, in the same order."""
    return {k: (v.full_tensor() if _is_sharded(v) else v).detach().float().contiguous().cpu()
            for k, v in tensors.items()}


def _unsharded_class(network: torch.nn.Module) -> type:
    """The class FSDP2's ``fully_shard`` derived ``type(network)`` from (the class itself when not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(network).__mro__ if not issubclass(c, FSDPModule))


def plain_copy(network: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unsharded network of ``network``'s class and config holding the full ``state`` (diffusers and
    transformers models), for sampling and saving what FSDP trained."""
    cls = _unsharded_class(network)
    if hasattr(cls, "from_config"):  # diffusers
        copy = cls.from_config(network.config)
    elif hasattr(cls, "config_class"):  # transformers
        copy = cls(network.config)
    else:
        raise TypeError(f"cannot rebuild an FSDP-sharded {cls.__name__} unsharded: FSDP runs of this recipe are not "
                        f"supported (train it with one process or DDP)")
    copy.load_state_dict(state)
    return copy.to(next(iter(state.values())).device)


def full_model(accelerator, model) -> torch.nn.Module:
    """The trained network with all its weights: the unwrapped model itself, or under FSDP an unsharded copy (every
    process must call this; every process gets the copy)."""
    network = _unwrap(accelerator, model)
    if not any(_is_sharded(p) for p in network.parameters()):
        return network
    return plain_copy(network, gather_tensors(network.state_dict())).train(network.training)


@contextlib.contextmanager
def unsharded(model: torch.nn.Module):
    """Under FSDP2, hold every unit's parameters gathered for the duration, so that submodules can be called
    directly (a pipeline sampling with the trained UNet and text encoder); every process must enter it and make the
    same calls. Without FSDP it does nothing."""
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()


def _trained_module(accelerator, models: dict, trained) -> torch.nn.Module:
    """The (unwrapped) module the optimizer trains: ``trained``, else the only module among ``models``."""
    if trained is None:
        (trained,) = [model for model in models.values() if not isinstance(model, dict)]
    return _unwrap(accelerator, trained)


def _optimizer_state(trained: torch.nn.Module, optimizer) -> dict:
    """The optimizer's full state keyed by parameter name (``torch.distributed.checkpoint``; gathers FSDP shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(trained, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_optimizer_state(trained: torch.nn.Module, optimizer, saved: dict) -> None:
    """Restore :func:`_optimizer_state` (or an older checkpoint's index-keyed ``optimizer.state_dict()``)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    if any(isinstance(p, int) for group in saved["param_groups"] for p in group["params"]):
        inner.load_state_dict(saved)
        return
    distributed = dist.is_available() and dist.is_initialized()
    set_optimizer_state_dict(trained, inner, saved, options=StateDictOptions(full_state_dict=distributed))


def save_checkpoint(output_dir: str | Path, step: int, recipe: str, model_config: dict, models: dict,
                    optimizer, accelerator=None, keep: int = 2, trained=None) -> Path:
    """Write ``checkpoints/step-XXXXXXX`` atomically (a temporary folder renamed at the end) and prune old ones.
    ``models`` maps names to modules or to plain state dicts (an EMA copy, say); ``trained`` is the module the
    optimizer trains (default: the only module of ``models``). Every process calls this (FSDP gathers); the main
    process writes."""
    from safetensors.torch import save_file

    states = {name: gather_tensors(model if isinstance(model, dict) else _unwrap(accelerator, model).state_dict())
              for name, model in models.items()}
    optimizer_state = _optimizer_state(_trained_module(accelerator, models, trained), optimizer)
    final = checkpoint_dir(output_dir) / f"step-{step:07d}"
    if not _is_main_process(accelerator):
        return final
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, state in states.items():
        save_file(state, str(tmp / f"{name}.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    state = {
        "recipe": recipe,
        "step": step,
        "model_config": _canonical(model_config),
    }
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))  # last: marks the checkpoint complete
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def read_checkpoint_state(path: str | Path, recipe: str, model_config: dict) -> dict:
    """``state.json`` of a checkpoint, after checking it belongs to this recipe and model config."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if state.get("recipe") != recipe:
        raise ValueError(f"checkpoint {path} is from recipe {state.get('recipe')!r}, not {recipe!r}")
    diff = config_difference(state["model_config"], model_config)
    if diff is not None:
        raise ValueError(f"checkpoint {path} was made for a different model config ({diff}); "
                         f"resume with the same --preset/--model-config or use a new --output-dir")
    return state


# What unpickling numpy's RNG state (a uint32 array) needs: checkpoints' pickled files (optimizer state, RNG states)
# are read with ``weights_only=True`` and these allowed, so a shared checkpoint cannot run code on resume.
_NUMPY_CORE = getattr(np, "_core", None) or np.core
NUMPY_ARRAY_GLOBALS = [_NUMPY_CORE.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_plain(file: Path):
    """A checkpoint's pickled file read with ``weights_only=True`` (tensors, numbers, strings, containers and numpy
    arrays only); anything else is refused with a one-line error."""
    import pickle

    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).splitlines()[-1].strip() if str(error) else "unreadable"
        raise ValueError(f"refusing to unpickle {file}: it holds more than tensors and plain data ({first})") from None


def _copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into ``target``, or into this process's shard of it when ``target`` is FSDP-sharded."""
    if _is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements)
        target.to_local().copy_(full.to_local())
    else:
        target.copy_(full)


def load_checkpoint(path: str | Path, recipe: str, model_config: dict, models: dict, optimizer,
                    accelerator=None, trained=None) -> dict:
    """Restore models, optimizer and RNG states; returns ``state.json``. Dict entries of ``models`` are
    updated in place (their tensors are copied into). Every process calls this and reads the files."""
    from safetensors.torch import load_file

    path = Path(path)
    state = read_checkpoint_state(path, recipe, model_config)
    for name, model in models.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint {path} lacks {file.name}")
        tensors = load_file(str(file))
        target = model if isinstance(model, dict) else _unwrap(accelerator, model).state_dict()
        missing, unexpected = sorted(set(target) - set(tensors)), sorted(set(tensors) - set(target))
        if missing or unexpected:
            raise ValueError(f"checkpoint {file} does not fit the model (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]})")
        with torch.no_grad():
            for key, value in tensors.items():
                _copy_into(target[key], value)
    _load_optimizer_state(_trained_module(accelerator, models, trained), optimizer, load_plain(path / "optimizer.pt"))
    rng_file = path / "rng.pt"
    if rng_file.is_file():
        rng = load_plain(rng_file)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return state


class EMA:
    """An exponential moving average of a model's weights (float32), with the warm-up ``min(decay, (1 + step) /
    (10 + step))`` (as diffusers' EMAModel); ``state`` is the dict checkpoints save and restore in place (FSDP shards
    when the model is sharded). ``decay = 0`` keeps no average: ``averaged()`` is then a copy of the model itself."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model, self.decay = model, decay
        self.state = {k: v.detach().clone().float() for k, v in model.state_dict().items()} if decay else None

    @torch.no_grad()
    def update(self, step: int) -> None:
        if self.state is None:
            return
        decay = min(self.decay, (1 + step) / (10 + step))
        params = [v.float() for v in self.model.state_dict().values()]
        torch._foreach_lerp_(list(self.state.values()), params, 1.0 - decay)

    def averaged(self) -> torch.nn.Module:
        """A copy of the model holding the averaged weights, in eval mode (under FSDP an unsharded copy: every
        process must call this)."""
        import copy

        state = self.state if self.state is not None else self.model.state_dict()
        if any(_is_sharded(v) for v in state.values()):
            return plain_copy(self.model, gather_tensors(state)).eval()
        net = copy.deepcopy(self.model)
        if self.state is not None:
            net.load_state_dict(self.state)
        return net.eval()

    def checkpoint_models(self, model) -> dict:
        """What a checkpoint saves: the (prepared) model, and the average when there is one."""
        return {"model": model} if self.state is None else {"model": model, "ema": self.state}


def publish_folder(tmp: Path, output: Path, report: dict, max_bytes: int | None, verify) -> dict:
    """Finish an assembled model folder written to ``tmp``: refuse it when ``report["total_bytes"]`` is over
    ``max_bytes`` (removing it), run ``verify(tmp)`` into ``report["verify"]`` if given, then replace ``output``."""
    if max_bytes is not None and report["total_bytes"] > max_bytes:
        shutil.rmtree(tmp)
        raise ValueError(f"the assembled model is {report['total_bytes'] / 1e6:.2f} MB, over the "
                         f"{max_bytes / 1e6:.2f} MB limit: {report['bytes']}")
    if verify is not None:
        report["verify"] = verify(tmp)
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    return report


# --------------------------------------------------------------------------- logging, images, files


class RunLog:
    """Appends JSON lines to ``<output-dir>/log.jsonl`` and tracks throughput."""

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.path = Path(output_dir) / "log.jsonl"
        self.enabled = enabled
        self.start = time.perf_counter()

    def write(self, **record) -> None:
        if self.enabled:
            record.setdefault("time", round(time.perf_counter() - self.start, 3))
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> None:
    """Save ``(N, 3, H, W)`` images in [-1, 1] as one PNG grid with ``nrow`` images per row."""
    from PIL import Image

    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, _, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.full((3, rows * (h + 2) + 2, nrow * (w + 2) + 2), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = images[i]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def add_loss_weighting_args(group, default: str, help: str) -> None:
    """``--loss-weighting`` (see :func:`loss_weights`) and ``--min-snr-gamma``, for the recipes that train a UNet."""
    group.add_argument("--loss-weighting", default=default, choices=("uniform", "min_snr"), help=help)
    group.add_argument("--min-snr-gamma", type=float, default=5.0, help="gamma of --loss-weighting min_snr")


def check_standard_unet(pipe) -> None:
    """Refuse a guidance-distilled base UNet (a full LCM): it needs its guidance embedding in every forward pass,
    which the training recipes do not give (without it the network sees an all-zero embedding)."""
    if pipe.is_guidance_distilled:
        raise ValueError(f"{pipe.path} has a guidance-distilled UNet (a full LCM); the recipes train standard UNets "
                         "(LCM-LoRA runs on a standard base)")


def check_loss_weighting(args: argparse.Namespace) -> None:
    if not args.min_snr_gamma >= 1.0:
        raise ValueError(f"--min-snr-gamma must be >= 1, got {args.min_snr_gamma}")


def loss_weights(alpha_bar: torch.Tensor, weighting: str, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weights ``(B,)`` of the v loss.

    ``uniform``: 1. The v loss is ``(SNR + 1)`` times the x0 loss (``x0 - x0_hat = sigma (v_hat - v)`` with
    ``sigma^2 = 1 / (SNR + 1)``), so it spends most of its weight on nearly clean inputs. ``min_snr``: the
    Min-SNR-gamma strategy (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
    eq. 9) caps that x0 weight at gamma, in its ``SNR + 1`` form: weight ``min(SNR + 1, gamma) / (SNR + 1)`` on the
    v loss. The plain ``min(SNR, gamma)`` would give the zero-SNR step (where the model must make the whole
    image from pure noise) weight 0; this keeps it at 1 and only down-weights steps with SNR > gamma - 1.
    """
    if weighting == "uniform":
        return torch.ones_like(alpha_bar)
    snr_plus_one = 1.0 / (1.0 - alpha_bar)  # SNR + 1 = ab / (1 - ab) + 1
    return snr_plus_one.clamp(max=gamma) / snr_plus_one


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2), ``(N,)``."""
    mse = (reference.float().clamp(-1, 1) - estimate.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


def require_model_folder(folder: str | Path, what: str, weights: tuple[str, ...] = ("model.safetensors",
                         "diffusion_pytorch_model.safetensors")) -> Path:
    """Check a saved model folder has ``config.json`` and a weights file; FileNotFoundError otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what} folder {folder} has no config.json")
    if not any((folder / w).is_file() for w in weights):
        raise FileNotFoundError(f"{what} folder {folder} has no weights ({' or '.join(weights)})")
    return folder


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def folder_size(folder: str | Path) -> int:
    """Bytes of the regular files under ``folder``; symbolic links (a second name for a part stored once) are not
    followed or counted."""
    paths = (os.path.join(root, name) for root, _, files in os.walk(folder) for name in files)
    return sum(os.lstat(path).st_size for path in paths if not os.path.islink(path))


def cached_tensors(path: Path, meta: dict, build) -> dict:
    """The tensors saved in ``path`` if they were made with the same ``meta`` (a JSON-able dict of settings), else
    ``build()``'s, saved there whole (written aside, then renamed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    stamp = json.dumps(meta, sort_keys=True)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("meta") == stamp:
                return load_file(str(path))
    data = build()
    save_file(data, str(path.with_suffix(".tmp")), metadata={"meta": stamp})
    path.with_suffix(".tmp").replace(path)
    return data


def write_json(path: str | Path, data: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def progress_bar(accelerator, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                disable=not accelerator.is_local_main_process or bool(os.environ.get("LDM_NO_PROGRESS")))


def ensure_output_dir(args: argparse.Namespace) -> Path:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


# --------------------------------------------------------------------------- the loop


def check_resumable(args: argparse.Namespace, recipe: str, model_config: dict) -> Path | None:
    """The checkpoint ``--resume`` names (checked to come from this recipe and model config), or None; a folder
    that already holds checkpoints is only continued with ``--resume``. Recipes that write data before training
    (class images, caches) call this first, so a bad resume writes nothing."""
    found = find_checkpoint(args.output_dir, args.resume)
    if found is not None:
        read_checkpoint_state(found, recipe, model_config)
    elif args.resume is None and list_checkpoints(args.output_dir):
        raise ValueError(f"{args.output_dir} already holds checkpoints of a run; continue it with --resume latest "
                         f"or use a new --output-dir")
    return found


def train_loop(*, args: argparse.Namespace, accelerator, recipe: str, model_config: dict, model, optimizer,
               loss_fn, checkpoint_models: dict, log: RunLog, desc: str, after_step=None, sample_fn=None,
               max_grad_norm: float | None = 1.0) -> dict:
    """Run optimizer steps ``start..args.steps-1`` (or ``--stop-after`` of them); returns ``{"losses",
    "start_step", "end_step", "finished", "steps_per_second"}``.

    ``loss_fn(step, micro)`` returns the scalar loss of one micro-batch (its data and noise drawn from generators
    keyed by step and micro); ``after_step(step)`` runs after each optimizer step (EMA, clamps);
    ``sample_fn(step)`` writes samples or validation numbers every ``--sample-every`` steps and at the end; it runs
    on every process and must write only on the main one.
    Checkpoints: every ``--checkpoint-every`` steps and at the end; ``--resume`` restores before the first step.
    """
    start = 0
    resume_from = check_resumable(args, recipe, model_config)
    if resume_from is not None:
        state = load_checkpoint(resume_from, recipe, model_config, checkpoint_models, optimizer, accelerator,
                                trained=model)
        start = int(state["step"])
        accelerator.print(f"resumed from {resume_from} at step {start}")
    end = min(args.steps, start + args.stop_after) if args.stop_after else args.steps
    losses: list[float] = []
    bar = progress_bar(accelerator, args.steps, start, desc)
    t0, done = time.perf_counter(), 0
    running = None
    for step in range(start, end):
        lr = lr_at(step, args)
        set_lr(optimizer, lr)
        model.train()
        total = 0.0
        for micro in range(args.grad_accum):
            with accelerator.accumulate(model):
                loss = loss_fn(step, micro)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{recipe}: loss became {loss.item()} at step {step}; "
                                             f"lower --lr or use --mixed-precision bf16/no")
                accelerator.backward(loss)
                if accelerator.sync_gradients and max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach()) / args.grad_accum
        if after_step is not None:
            after_step(step)
        losses.append(total)
        done += 1
        running = total if running is None else 0.95 * running + 0.05 * total
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}")
        number = step + 1
        if number % args.log_every == 0 or number == args.steps:
            log.write(step=number, loss=total, loss_avg=running, lr=lr,
                      steps_per_second=done / (time.perf_counter() - t0))
        if number == end or (args.checkpoint_every and number % args.checkpoint_every == 0):
            save_checkpoint(args.output_dir, number, recipe, model_config, checkpoint_models, optimizer,
                            accelerator, keep=args.keep_checkpoints, trained=model)
        if sample_fn is not None and (number == args.steps or (
                args.sample_every and number % args.sample_every == 0)):
            sample_fn(number)  # on every process (an FSDP model's forward is collective); the main one writes
    bar.close()
    elapsed = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    return {"losses": losses, "start_step": start, "end_step": max(start, end), "finished": end >= args.steps,
            "steps_per_second": done / elapsed if done else None}


def stopped_early(accelerator, result: dict, total_steps: int) -> bool:
    """After :func:`train_loop`: True when ``--stop-after`` cut the run short; then it has said how to continue and
    ended the run, and the recipe returns without saving a final model."""
    if result["finished"]:
        return False
    accelerator.print(f"stopped at step {result['end_step']} of {total_steps}; continue with --resume latest")
    accelerator.end_training()
    return True


def finish_run(accelerator, log: "RunLog", out: Path, label: str, metrics: dict, saved: Path) -> None:
    """Write ``metrics.json``, the final log record and a one-line summary of what was saved where."""
    write_json(out / "metrics.json", metrics)
    log.write(**{k: v for k, v in metrics.items() if k != "steps"}, final=True)
    summary = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    accelerator.print(f"{label}: saved {saved}; {summary}")
