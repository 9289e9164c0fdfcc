"""LoRA adapters on a loaded pipeline: ``pipe.load_lora(path, scale=0.8)``, several at once, and unloading.

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3) adds ``scale * (alpha / r) *
B A x`` to a frozen linear layer ``W x``. Files are read in the two layouts users have:

* diffusers / peft: ``unet.<module>.lora.down.weight`` or ``unet.<module>.lora_A.weight`` (what
  ``train/finetune.py`` writes and diffusers' ``save_lora_weights`` writes), text-encoder keys under
  ``text_encoder.``;
* kohya / A1111: ``lora_unet_<module_with_underscores>.lora_down.weight`` with ``.alpha`` (most shared LoRAs),
  converted by diffusers' own converter (``lora_state_dict``); SDXL files' second text tower is ``lora_te2_``.

SDXL LoRAs may adapt both text towers (``text_encoder.`` and ``text_encoder_2.``); SD3 LoRAs adapt the MMDiT
(``transformer.``) and the CLIP towers.

Injection and scaling are peft's, through diffusers' loaders, so a file behaves here exactly as it does in
``StableDiffusionPipeline.load_lora_weights``. Before anything is injected, every LoRA matrix is checked against
the module it targets, so a file made for another architecture is refused with the first mismatch named.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"
_DOWN = re.compile(r"[._](lora\.down|lora_A|lora_linear_layer\.down)\.weight$")
_UP = re.compile(r"[._](lora\.up|lora_B|lora_linear_layer\.up)\.weight$")
# diffusers' kohya converter emits the older attention-processor names ("attn1.processor.to_k_lora.down"); the
# layers they stand for:
_DENOISER_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


class LoraError(ValueError):
    """A LoRA file that cannot be loaded into this model; the message says why."""


def read_lora_file(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA ``.safetensors`` file (or of ``pytorch_lora_weights.safetensors`` in a folder)."""
    from safetensors.torch import load_file

    from ldm.loading import PICKLE_SUFFIXES

    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoraError(f"{path} is a pickle file, which can run code when loaded; convert it to safetensors "
                            "or pass allow_pickle=True to read it with weights_only=True")
        return torch.load(path, map_location="cpu", weights_only=True)
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise LoraError(f"cannot read LoRA file {path}: {str(err).splitlines()[0]}") from None


def to_diffusers_layout(tensors: dict[str, torch.Tensor], family: str = "sd",
                        unet_config=None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """``(state_dict, network_alphas)`` in diffusers' layout for ``family`` (``sd``, ``sdxl``, ``sd3``); kohya
    files go through diffusers' converter (SDXL's with the UNet config, to map original block numbers)."""
    from diffusers.loaders import SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    try:
        if family == "sd3":
            return SD3LoraLoaderMixin.lora_state_dict(dict(tensors)), None
        if family == "sdxl":
            return StableDiffusionXLLoraLoaderMixin.lora_state_dict(dict(tensors), unet_config=unet_config)
        return StableDiffusionLoraLoaderMixin.lora_state_dict(dict(tensors))
    except (ValueError, KeyError) as err:
        raise LoraError(f"unrecognised LoRA key layout (first keys: {', '.join(list(tensors)[:3])}): "
                        f"{str(err).splitlines()[0]}") from None


def check_lora_fits(state_dict: dict[str, torch.Tensor], networks: dict[str, torch.nn.Module], source: str) -> None:
    """Every ``down`` matrix ``(r, in)`` and ``up`` matrix ``(out, r)`` must match the linear (or 1x1 conv) layer it
    targets in ``networks`` (``{"unet": ..., "text_encoder": ...}``, see ``LoraMixin.lora_networks``); LoraError
    naming the first mismatch."""
    matched = 0
    for key, tensor in state_dict.items():
        match = _DOWN.search(key) or _UP.search(key)
        if match is None:
            continue
        is_down = match.re is _DOWN
        prefix, _, module_path = key[:match.start()].partition(".")
        if prefix not in networks:
            raise LoraError(f"{source}: key {key} targets {prefix!r}, which this pipeline does not have")
        if key[match.start()] == "_":  # processor-style name
            parent, _, name = module_path.rpartition(".")
            parent = parent.removesuffix(".processor")
            names = _TEXT_NAMES if prefix.startswith("text_encoder") else _DENOISER_NAMES
            module_path = f"{parent}.{names.get(name, name)}"
        network = networks[prefix]
        module = _find_module(network, module_path)
        if module is None:
            raise LoraError(f"{source} does not fit this model: it targets {prefix}.{module_path}, which this "
                            f"model does not have (a LoRA made for another architecture?)")
        module = getattr(module, "base_layer", module)
        weight = module.weight  # (out, in[, 1, 1])
        expected = weight.shape[1] if is_down else weight.shape[0]
        got = tensor.shape[1] if is_down else tensor.shape[0]
        if expected != got:
            side = "input" if is_down else "output"
            raise LoraError(f"{source} does not fit this model: {prefix}.{module_path} has {expected} {side} "
                            f"features, the LoRA has {got} (a LoRA made for another architecture?)")
        matched += 1
    if not matched:
        raise LoraError(f"{source} holds no LoRA matrices this pipeline understands")


def _find_module(network: torch.nn.Module, path: str) -> torch.nn.Module | None:
    candidates = [path, path.removeprefix("text_model.")]
    for candidate in candidates:
        try:
            return network.get_submodule(candidate)
        except AttributeError:
            continue
    return None


class LoraMixin:
    """``load_lora`` / ``set_lora_scale`` / ``unload_lora`` for :class:`TextToImagePipeline`."""

    @property
    def lora_networks(self) -> dict[str, torch.nn.Module]:
        """The networks a LoRA file may adapt, under the key prefixes diffusers gives them."""
        denoiser = "transformer" if self.is_mmdit else "unet"
        networks = {denoiser: self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {name: network for name, network in networks.items() if network is not None}

    @property
    def loras(self) -> dict[str, float]:
        """Loaded adapters and their scales, in load order."""
        return dict(self.__dict__.setdefault("_lora_scales", {}))

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0, name: str | None = None,
                  allow_pickle: bool = False) -> str:
        """Load a LoRA file (diffusers/peft or kohya layout) as adapter ``name`` active at ``scale``; returns the
        name. Several LoRAs add up, each with its own scale."""
        from diffusers.loaders import SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin

        from pipelines.checks import check_finite

        scale = check_finite("LoRA scale", scale, -10.0, 10.0)
        scales = self.__dict__.setdefault("_lora_scales", {})
        name = name or f"lora{len(scales)}_{Path(path).stem}"
        if name in scales:
            raise LoraError(f"a LoRA named {name!r} is already loaded; unload it first or pass another name")
        family = "sd3" if self.is_mmdit else "sdxl" if self.is_sdxl else "sd"
        state_dict, alphas = to_diffusers_layout(read_lora_file(path, allow_pickle), family, self.unet.config)
        networks = self.lora_networks
        denoiser = next(iter(networks))
        known = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.")
        if not any(k.startswith(known) for k in state_dict):
            state_dict = {f"{denoiser}.{k}": v for k, v in state_dict.items()}  # a bare denoiser state dict
        check_lora_fits(state_dict, networks, str(path))
        if any(k.startswith(denoiser + ".") for k in state_dict):
            if denoiser == "transformer":
                SD3LoraLoaderMixin.load_lora_into_transformer(state_dict, transformer=self.unet, adapter_name=name)
            else:
                StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, unet=self.unet,
                                                                   adapter_name=name)
        for prefix in ("text_encoder", "text_encoder_2"):
            if any(k.startswith(prefix + ".") for k in state_dict):
                StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(
                    state_dict, alphas, text_encoder=networks[prefix], prefix=prefix, adapter_name=name)
        for network in networks.values():
            network.requires_grad_(False)
        scales[name] = scale
        self._apply_lora_scales()
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change the scale of a loaded LoRA."""
        from pipelines.checks import check_finite

        if name not in self.loras:
            raise LoraError(f"no LoRA named {name!r} is loaded; loaded: {', '.join(self.loras) or 'none'}")
        self._lora_scales[name] = check_finite("LoRA scale", scale, -10.0, 10.0)
        self._apply_lora_scales()

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (or all); with none left the networks are back to their original layers."""
        from diffusers.utils.peft_utils import delete_adapter_layers, recurse_remove_peft_layers

        scales = self.__dict__.setdefault("_lora_scales", {})
        if name is not None and name not in scales:
            raise LoraError(f"no LoRA named {name!r} is loaded; loaded: {', '.join(scales) or 'none'}")
        for adapter in [name] if name is not None else list(scales):
            for network in self.lora_networks.values():
                if adapter in _adapters_of(network):
                    delete_adapter_layers(network, adapter)
            del scales[adapter]
        if not scales:
            for network in self.lora_networks.values():
                recurse_remove_peft_layers(network)
                network.__dict__.pop("_hf_peft_config_loaded", None)
                if hasattr(network, "peft_config"):
                    del network.peft_config
        else:
            self._apply_lora_scales()

    def _apply_lora_scales(self) -> None:
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        for network in self.lora_networks.values():
            present = _adapters_of(network)
            names = [n for n in self._lora_scales if n in present]
            if names:
                set_weights_and_activate_adapters(network, names, [self._lora_scales[n] for n in names])


def _adapters_of(network: torch.nn.Module) -> set[str]:
    return set(getattr(network, "peft_config", {}) or {})
