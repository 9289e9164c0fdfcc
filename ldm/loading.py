"""Loading diffusers-format model folders, offline, with clear errors.

A folder holds ``model_index.json`` and the subfolders ``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``
(``tokenizer/`` is optional: the standard CLIP BPE is used when it is missing). Nothing here touches the network:
every load is from a local path with ``local_files_only=True``. Weights must be safetensors unless the caller
passes ``allow_pickle=True``; pickle files are then read with ``torch.load(weights_only=True)`` (diffusers' and
transformers' loaders do so).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
REQUIRED_COMPONENTS = ("vae", "scheduler")  # and a denoiser (unet/ or transformer/) and a text encoder (SDXL's
# refiner has only text_encoder_2/)


class ModelLoadError(ValueError):
    """A model folder or file that cannot be loaded; the message says which file and why."""


@dataclass
class Components:
    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    scheduler_config: dict
    path: Path
    text_encoder_2: object = None  # SDXL's / SD3's OpenCLIP bigG tower (CLIPTextModelWithProjection)
    tokenizer_2: object = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: an empty negative prompt is the zero embedding
    text_encoder_3: object = None  # SD3's optional T5 encoder
    tokenizer_3: object = None
    requires_aesthetics_score: bool = False  # SDXL refiner: time_ids end with an aesthetic score


def refuse_pickle(path: Path, allow_pickle: bool) -> None:
    """Pickle checkpoints can run code when loaded: refuse them unless explicitly allowed."""
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(f"{path} is a pickle checkpoint, which can run code when loaded; convert it to "
                             "safetensors, or pass allow_pickle=True (--allow-pickle) to load it with weights_only=True")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None


def component_weights(folder: Path, allow_pickle: bool) -> bool:
    """Check that a component folder has a config and weights; return whether they are safetensors."""
    for name in ("config.json",):
        if not (folder / name).is_file():
            raise ModelLoadError(f"missing file: {folder / name}")
    if any(folder.glob("*.safetensors")):
        return True
    pickles = [p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
    if not pickles:
        raise ModelLoadError(f"missing weights: no .safetensors file in {folder}")
    refuse_pickle(pickles[0], allow_pickle)
    return False


def check_model_folder(path: str | Path, allow_pickle: bool = False) -> Path:
    """Validate a model folder before loading anything; raise :class:`ModelLoadError` naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    read_json(path / "model_index.json")
    for name in REQUIRED_COMPONENTS:
        if not (path / name).is_dir():
            raise ModelLoadError(f"missing folder: {path / name}")
    denoiser = "transformer" if (path / "transformer").is_dir() else "unet"
    if not (path / denoiser).is_dir():
        raise ModelLoadError(f"missing folder: {path / 'unet'} (or transformer/ for an MMDiT model)")
    read_json(path / "scheduler" / "scheduler_config.json")
    text = "text_encoder" if (path / "text_encoder").is_dir() or not (path / "text_encoder_2").is_dir() \
        else "text_encoder_2"
    if not (path / text).is_dir():
        raise ModelLoadError(f"missing folder: {path / 'text_encoder'}")
    for name in (denoiser, "vae", text):
        component_weights(path / name, allow_pickle)
    return path


def load_components(path: str | Path, allow_pickle: bool = False, config: str | Path | None = None,
                    prediction: str | None = None) -> Components:
    """Load UNet, VAE, CLIP text encoder, tokenizer and scheduler config from a diffusers folder, or from an
    original-layout single file (``ldm.single_file``; ``config`` and ``prediction`` apply to those), offline."""
    import transformers
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

    from ldm.text import OPENCLIP_PAD, load_tokenizer

    if Path(path).is_file():
        from ldm.single_file import load_single_file

        return load_single_file(path, config, prediction, allow_pickle)
    path = check_model_folder(path, allow_pickle)

    def load(cls, name):
        safetensors = component_weights(path / name, allow_pickle)
        try:
            return cls.from_pretrained(str(path / name), local_files_only=True, use_safetensors=safetensors)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelLoadError(f"cannot load {path / name}: {first_line}") from None

    index = read_json(path / "model_index.json")

    def text_class(name):  # CLIPTextModel, or CLIPTextModelWithProjection (SD3's first tower)
        entry = index.get(name) or [None, "CLIPTextModel"]
        if entry[1] not in ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"):
            raise ModelLoadError(f"{path}: {name} is a {entry[1]}, which this version does not load")
        return getattr(transformers, entry[1])

    mmdit = (path / "transformer").is_dir()
    unet = load(SD3Transformer2DModel, "transformer") if mmdit else load(UNet2DConditionModel, "unet")
    vae = load(AutoencoderKL, "vae")
    text_encoder = tokenizer = None
    if (path / "text_encoder").is_dir():
        text_encoder = load(text_class("text_encoder"), "text_encoder")
        # Without a tokenizer/ folder, the pad token follows the encoder family: OpenCLIP ViT-H / bigG pad with "!".
        pad = OPENCLIP_PAD if text_encoder.config.hidden_size in (1024, 1280) else "<|endoftext|>"
        tokenizer = load_tokenizer(path / "tokenizer", pad_token=pad)
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json")
    text_encoder_2 = tokenizer_2 = text_encoder_3 = tokenizer_3 = None
    if (path / "text_encoder_2").is_dir():  # SDXL, SD3
        text_encoder_2 = load(transformers.CLIPTextModelWithProjection, "text_encoder_2")
        tokenizer_2 = load_tokenizer(path / "tokenizer_2", pad_token=OPENCLIP_PAD)
    if (path / "text_encoder_3").is_dir():  # SD3's T5 (optional)
        text_encoder_3 = load(transformers.T5EncoderModel, "text_encoder_3")
        tokenizer_3 = transformers.AutoTokenizer.from_pretrained(str(path / "tokenizer_3"), local_files_only=True)
    force_zeros = bool(index.get("force_zeros_for_empty_prompt", text_encoder_2 is not None and not mmdit))
    return Components(unet, vae, text_encoder, tokenizer, scheduler_config, path, text_encoder_2, tokenizer_2,
                      force_zeros, text_encoder_3, tokenizer_3, bool(index.get("requires_aesthetics_score", False)))
