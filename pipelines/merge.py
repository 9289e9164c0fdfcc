"""Checkpoint merging, as the A1111 web UI's checkpoint merger and ComfyUI's model-merge nodes do it:
``ldm merge A B -o OUT [--alpha 0.3] [--method weighted_sum|add_difference --base C]``.

* ``weighted_sum``: ``A (1 - alpha) + B alpha`` (the web UI's "Weighted sum"; weight interpolation, Wortsman et al.
  2022, "Robust fine-tuning of zero-shot models", WiSE-FT, eq. 1);
* ``add_difference``: ``A + (B - C) alpha`` (the web UI's "Add difference": what fine-tuning C into B changed, added
  to A; a task vector, Ilharco et al. 2023, "Editing Models with Task Arithmetic", sec. 2).

Every network of the model (denoiser, VAE, text towers) is merged tensor by tensor in float32 and written in one
dtype (``--dtype``; by default the dtype the inputs are stored in when they agree, as the web UI keeps float16
checkpoints float16, else float32); the result keeps A's configs, scheduler and tokenizers, and is written as a
diffusers folder or, for a ``.safetensors`` path, an original-layout single file (``ldm convert``'s writers; it
declares v-prediction and zero terminal SNR as ComfyUI's and the SAI model spec's single files do). Models of
different architectures are refused, naming the first tensor that does not match.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

MERGE_METHODS = ("weighted_sum", "add_difference")
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


class MergeError(ValueError):
    """Models that cannot be merged, or a bad merge setting; the message says why."""


def merged_tensor(a: torch.Tensor, b: torch.Tensor, alpha: float, method: str,
                  c: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor of the merge, in float32 (integer tensors, such as position ids, are ``a``'s)."""
    if not a.is_floating_point():
        return a
    a32, b32 = a.float(), b.float()
    if method == "weighted_sum":
        out = a32 * (1.0 - alpha) + b32 * alpha
    else:
        out = a32 + (b32 - c.float()) * alpha
    return out


def check_same_architecture(states: dict[str, dict[str, torch.Tensor]], network: str) -> None:
    """MergeError unless every model's ``network`` has the same tensor names and shapes (``states``: model
    label -> state dict)."""
    (first, reference), *others = states.items()
    for label, state in others:
        missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
        if missing or extra:
            name = (missing or extra)[0]
            raise MergeError(f"{network} of {label} does not match {first}'s: {name} is in "
                             f"{first if missing else label} only")
        for name, tensor in reference.items():
            if state[name].shape != tensor.shape:
                raise MergeError(f"{network} of {label} does not match {first}'s: {name} has shape "
                                 f"{tuple(state[name].shape)}, not {tuple(tensor.shape)}")


def check_merge_settings(alpha: float, method: str, has_base: bool) -> float:
    """MergeError for an unknown method or a third model where the method takes none (or none where it needs
    one); ValueError for ``alpha`` outside [0, 1] or NaN. Returns ``alpha``."""
    from pipelines.checks import check_finite

    if method not in MERGE_METHODS:
        raise MergeError(f"unknown merge method {method!r}; known: {', '.join(MERGE_METHODS)}")
    if (method == "add_difference") != has_base:
        raise MergeError("add_difference needs a third model (--base C, the model B was fine-tuned from); "
                         "weighted_sum takes none")
    return check_finite("alpha", alpha, 0.0, 1.0)


def stored_dtype(path: Path) -> torch.dtype | None:
    """The floating dtype most of a model's denoiser weights are stored in, read from safetensors headers only
    (a single file, or the ``unet/`` / ``transformer/`` folder); None for pickles."""
    from collections import Counter

    from safetensors import safe_open

    if path.is_file():
        files = [path] if path.suffix.lower() == ".safetensors" else []
    else:
        files = sorted((path / ("transformer" if (path / "transformer").is_dir() else "unet")).glob("*.safetensors"))
    counts = Counter()
    for file in files:
        try:
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():
                    counts[handle.get_slice(key).get_dtype()] += 1
        except Exception:  # a truncated or foreign file: loading it reports the error
            return None
    floating = [(n, name) for name, n in counts.items() if name in SAFETENSORS_DTYPES]
    return SAFETENSORS_DTYPES[max(floating)[1]] if floating else None


def output_dtype(dtype: str, paths: list[Path]) -> torch.dtype:
    """``dtype`` by name; ``auto``: the inputs' common stored dtype, float32 when they differ or are pickles."""
    if dtype != "auto":
        if dtype not in OUTPUT_DTYPES:
            raise MergeError(f"unknown dtype {dtype!r}; known: auto, {', '.join(OUTPUT_DTYPES)}")
        return OUTPUT_DTYPES[dtype]
    stored = {stored_dtype(p) for p in paths}
    return stored.pop() if len(stored) == 1 and None not in stored else torch.float32


def merge_components(a, b, alpha: float, method: str = "weighted_sum", c=None):
    """Merge loaded ``Components`` ``b`` (and ``c`` for ``add_difference``) into ``a`` in place, whose networks
    become float32; returns ``a``."""
    alpha = check_merge_settings(alpha, method, c is not None)
    models = {"A": a, "B": b, **({"C": c} if c is not None else {})}
    for network in NETWORKS:
        present = {label: getattr(m, network) is not None for label, m in models.items()}
        if len(set(present.values())) > 1:
            raise MergeError(f"only {', '.join(k for k, v in present.items() if v)} of the models has a {network}")
    plans = []
    for network in NETWORKS:  # every check before any weight changes
        if getattr(a, network) is None:
            continue
        states = {label: getattr(m, network).state_dict() for label, m in models.items()}
        check_same_architecture(states, network)
        plans.append((getattr(a, network), states))
    with torch.no_grad():
        for module, states in plans:
            torch.nn.Module.to(module, torch.float32)  # a float16 tower would round the float32 merge
            merged = {name: merged_tensor(tensor, states["B"][name], alpha, method, states.get("C", {}).get(name))
                      for name, tensor in states["A"].items()}
            module.load_state_dict(merged)
    return a


def merge_models(a: str | os.PathLike, b: str | os.PathLike, output: str | os.PathLike, alpha: float = 0.5,
                 method: str = "weighted_sum", c: str | os.PathLike | None = None, allow_pickle: bool = False,
                 config: str | os.PathLike | None = None, dtype: str = "auto") -> Path:
    """Load the models (folders or single files, offline), merge them (:func:`merge_components`) and write the
    result in ``dtype`` (:func:`output_dtype`) to ``output``: a ``.safetensors`` single file, else a diffusers
    folder. Settings are checked before anything loads; nothing is written if the models cannot be merged, and
    the output appears only when complete."""
    from ldm.loading import PICKLE_SUFFIXES, load_components
    from ldm.single_file import save_folder, save_single_file
    from pipelines.cli import write_new_path

    output = Path(output)
    if output.exists():
        raise MergeError(f"{output} exists; merge into a new path")
    if output.suffix.lower() in PICKLE_SUFFIXES:
        raise MergeError(f"{output}: merges are written as a .safetensors single file or a folder, not a pickle")
    check_merge_settings(alpha, method, c is not None)
    paths = [Path(p) for p in (a, b, c) if p is not None]
    target_dtype = output_dtype(dtype, [p for p in paths if p.exists()])
    loaded = [load_components(Path(p), allow_pickle, config) if p is not None else None for p in (a, b, c)]
    merged = merge_components(loaded[0], loaded[1], alpha, method, loaded[2])
    for network in NETWORKS:
        if getattr(merged, network) is not None:
            torch.nn.Module.to(getattr(merged, network), target_dtype)
    single_file = output.suffix.lower() == ".safetensors"
    return write_new_path(output, lambda path: (save_single_file if single_file else save_folder)(merged, path))
