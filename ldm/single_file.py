"""Single-file checkpoints in the original CompVis / Stability layout, read and written offline.

A Stable Diffusion 1.x ``.safetensors`` file holds the UNet under ``model.diffusion_model.``, the VAE under
``first_stage_model.`` and the CLIP text encoder under ``cond_stage_model.transformer.``. The key names are those
of the original ``ldm`` code (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, ``encoder.down.0.block.1``,
...). We map every key of diffusers' modules to its original name from the model config (the rules below), so a
file loads into diffusers' own classes with no download: the configs come from ``ldm/configs.py`` (Stable
Diffusion 1.5's) or from a folder the caller names (``config=``), never from a hub. The same map writes files
(``ldm convert``), and the tests check it against diffusers' own single-file loader.

SD 2.x files keep their OpenCLIP text tower under ``cond_stage_model.model.`` (``transformer.resblocks.N`` with
fused ``attn.in_proj_weight``); SD 2 uses the penultimate layer, so diffusers' text encoder has one layer fewer
than the file (the last resblock is not read). Whether an SD 2.x file is v-prediction (the 768 models) is not in
its keys: we take it from the file name ("768" or "-v") unless ``prediction=`` says.

Family detection is by keys: ``conditioner.embedders.*`` is SDXL, ``cond_stage_model.model.*`` is SD 2.x
(OpenCLIP), ``model.diffusion_model.joint_blocks.*`` is SD3, ``cond_stage_model.transformer.*`` is SD 1.x (a
9-channel ``input_blocks.0.0`` is its inpainting variant). SDXL files hold CLIP-L under
``conditioner.embedders.0.transformer.`` and the OpenCLIP bigG tower (with its ``text_projection``) under
``conditioner.embedders.1.model.``; the UNet's added-condition MLP is ``label_emb``.

SD3 files hold the MMDiT under ``model.diffusion_model.`` in Stability's names (``joint_blocks.N.x_block`` /
``context_block`` with fused ``attn.qkv``, ``adaLN_modulation.1``, ``final_layer``), the 16-channel VAE under
``first_stage_model.`` and, when included, the text towers in transformers' names under
``text_encoders.clip_l.transformer.``, ``text_encoders.clip_g.transformer.`` and ``text_encoders.t5xxl.transformer.``.
The MMDiT's sizes are read from the tensors' shapes (SD3 medium, 3.5 medium/large alike), the VAE's and towers'
too. The T5 is loaded only when ``config=`` names a folder with ``tokenizer_3/`` (its tokenizer is not shipped);
otherwise the model runs without it, as diffusers allows.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
FAMILIES = {"sd1": "Stable Diffusion 1.x", "sd1-inpaint": "Stable Diffusion 1.x inpainting",
            "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL", "sd3": "Stable Diffusion 3"}
LOADABLE = ("sd1", "sd1-inpaint", "sd2", "sdxl", "sd3")
SD3_TEXT_PREFIXES = {"text_encoder": "text_encoders.clip_l.transformer.",
                     "text_encoder_2": "text_encoders.clip_g.transformer.",
                     "text_encoder_3": "text_encoders.t5xxl.transformer."}
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}


class SingleFileError(ValueError):
    """A single-file checkpoint that cannot be read; the message says what was found."""


# --------------------------------------------------------------------------- key maps (diffusers -> original)


def _resnet_part(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_RESNET.get(name, name)}.{tail}"


def unet_original_key(key: str, config: dict) -> str:
    """The original name of a UNet2DConditionModel key (SD 1.x/2.x layout: ``layers_per_block + 1`` input blocks
    per level, the downsampler in its own input block, ``layers_per_block + 1`` output blocks per level)."""
    per_level = config["layers_per_block"] + 1
    simple = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
              "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
              "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}  # SDXL
    for ours, theirs in simple.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        place = block * per_level + index + 1
        return f"input_blocks.{place}.0.{_resnet_part(rest)}" if kind == "resnets" else f"input_blocks.{place}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, index, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * index}.{_resnet_part(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        place = block * per_level + index
        return f"output_blocks.{place}.0.{_resnet_part(rest)}" if kind == "resnets" else f"output_blocks.{place}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        slot = 2 if config["up_block_types"][block].startswith("CrossAttn") else 1
        return f"output_blocks.{block * per_level + per_level - 1}.{slot}.conv.{m[2]}"
    raise SingleFileError(f"no original-layout name for UNet key {key}")


def vae_original_key(key: str, config: dict) -> str:
    """The original name of an AutoencoderKL key (``encoder.down.i.block.j``, ``decoder.up.{n-1-i}``, ``mid.attn_1``)."""
    levels = len(config["block_out_channels"])
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    side, _, rest = key.partition(".")
    for ours, theirs in (("conv_in.", "conv_in."), ("conv_out.", "conv_out."), ("conv_norm_out.", "norm_out.")):
        if rest.startswith(ours):
            return f"{side}.{theirs}{rest[len(ours):]}"
    if m := re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        level = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
        return f"{side}.{m[1]}.{level}.block.{m[3]}.{m[4].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.(.+)", rest):
        level = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
        return f"{side}.{m[1]}.{level}.{m[1]}sample.{m[4]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        return f"{side}.mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", rest):
        return f"{side}.mid.attn_1.{_VAE_ATTENTION[m[1]]}.{m[2]}"
    raise SingleFileError(f"no original-layout name for VAE key {key}")


def clip_original_key(key: str, prefix: str = CLIP_PREFIX) -> str:
    """CLIPTextModel keys sit under ``cond_stage_model.transformer.text_model.`` (SDXL:
    ``conditioner.embedders.0.transformer.text_model.``), in transformers 4 and 5 names."""
    return prefix + key.removeprefix("text_model.")


def openclip_to_diffusers(tensors: dict, layers: int, p: str = OPENCLIP_PREFIX,
                          projection: bool = False) -> dict[str, torch.Tensor]:
    """CLIPTextModel tensors from an OpenCLIP text tower under prefix ``p`` (SD 2.x, SDXL's second tower): the
    first ``layers`` resblocks, the fused ``in_proj`` split into q, k, v; with ``projection``, the
    ``text_projection`` matrix ``(D, P)`` as CLIPTextModelWithProjection's linear weight ``(P, D)``."""
    out = {} if not projection else {"text_projection.weight": tensors[p + "text_projection"].T.contiguous()}
    out |= {"embeddings.token_embedding.weight": tensors[p + "token_embedding.weight"],
           "embeddings.position_embedding.weight": tensors[p + "positional_embedding"],
           "final_layer_norm.weight": tensors[p + "ln_final.weight"], "final_layer_norm.bias": tensors[p + "ln_final.bias"]}
    for i in range(layers):
        block = f"{p}transformer.resblocks.{i}."
        for theirs, ours in _OPENCLIP_LAYER.items():
            for kind in ("weight", "bias"):
                out[f"encoder.layers.{i}.{ours}.{kind}"] = tensors[f"{block}{theirs}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = tensors[f"{block}attn.in_proj_{kind}"].chunk(3, dim=0)
            for name, value in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"encoder.layers.{i}.self_attn.{name}.{kind}"] = value
    return out


def diffusers_to_openclip(state: dict, layers: int, p: str = OPENCLIP_PREFIX) -> dict[str, torch.Tensor]:
    """The inverse of :func:`openclip_to_diffusers` (the file gets the ``layers`` resblocks the model has)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {} if "text_projection.weight" not in state else {p + "text_projection": state["text_projection.weight"].T}
    out |= {p + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           p + "positional_embedding": state["embeddings.position_embedding.weight"],
           p + "ln_final.weight": state["final_layer_norm.weight"], p + "ln_final.bias": state["final_layer_norm.bias"]}
    for i in range(layers):
        block = f"{p}transformer.resblocks.{i}."
        for theirs, ours in _OPENCLIP_LAYER.items():
            for kind in ("weight", "bias"):
                out[f"{block}{theirs}.{kind}"] = state[f"encoder.layers.{i}.{ours}.{kind}"]
        for kind in ("weight", "bias"):
            out[f"{block}attn.in_proj_{kind}"] = torch.cat([state[f"encoder.layers.{i}.self_attn.{n}.{kind}"]
                                                            for n in ("q_proj", "k_proj", "v_proj")])
    return out


_MMDIT_SIMPLE = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj.": "x_embedder.proj.",
                 "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
                 "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
                 "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
                 "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.",
                 "context_embedder.": "context_embedder.", "proj_out.": "final_layer.linear."}
# block part -> (stream, original name, third of a fused qkv tensor or None)
_MMDIT_BLOCK = {"attn.to_q.": ("x", "attn.qkv.", 0), "attn.to_k.": ("x", "attn.qkv.", 1),
                "attn.to_v.": ("x", "attn.qkv.", 2), "attn.add_q_proj.": ("context", "attn.qkv.", 0),
                "attn.add_k_proj.": ("context", "attn.qkv.", 1), "attn.add_v_proj.": ("context", "attn.qkv.", 2),
                "attn2.to_q.": ("x", "attn2.qkv.", 0), "attn2.to_k.": ("x", "attn2.qkv.", 1),
                "attn2.to_v.": ("x", "attn2.qkv.", 2), "attn.norm_q.": ("x", "attn.ln_q.", None),
                "attn.norm_k.": ("x", "attn.ln_k.", None), "attn.norm_added_q.": ("context", "attn.ln_q.", None),
                "attn.norm_added_k.": ("context", "attn.ln_k.", None), "attn2.norm_q.": ("x", "attn2.ln_q.", None),
                "attn2.norm_k.": ("x", "attn2.ln_k.", None), "attn.to_out.0.": ("x", "attn.proj.", None),
                "attn.to_add_out.": ("context", "attn.proj.", None), "attn2.to_out.0.": ("x", "attn2.proj.", None),
                "norm1.linear.": ("x", "adaLN_modulation.1.", None),
                "norm1_context.linear.": ("context", "adaLN_modulation.1.", None),
                "ff.net.0.proj.": ("x", "mlp.fc1.", None), "ff.net.2.": ("x", "mlp.fc2.", None),
                "ff_context.net.0.proj.": ("context", "mlp.fc1.", None), "ff_context.net.2.": ("context", "mlp.fc2.", None)}


def mmdit_original_key(key: str, num_layers: int) -> tuple[str, int | None, bool]:
    """The original name of an ``SD3Transformer2DModel`` key, which third of that fused ``qkv`` tensor it is (or
    None), and whether its (shift, scale) halves are stored the other way round: diffusers' ``AdaLayerNormContinuous``
    (the final layer, and the last block's pre-only context norm) takes (scale, shift), Stability's code (shift,
    scale)."""
    if key.startswith("norm_out.linear."):
        return "final_layer.adaLN_modulation.1." + key.removeprefix("norm_out.linear."), None, True
    for ours, theirs in _MMDIT_SIMPLE.items():
        if key.startswith(ours):
            return theirs + key[len(ours):], None, False
    if m := re.match(r"transformer_blocks\.(\d+)\.(.+)", key):
        block, rest = int(m[1]), m[2]
        for ours, (stream, theirs, part) in _MMDIT_BLOCK.items():
            if rest.startswith(ours):
                swap = ours == "norm1_context.linear." and block == num_layers - 1
                return f"joint_blocks.{block}.{stream}_block.{theirs}{rest[len(ours):]}", part, swap
    raise SingleFileError(f"no original-layout name for MMDiT key {key}")


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift) along the output dimension (its own inverse)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def mmdit_from_original(tensors: dict, config: dict, source) -> dict[str, torch.Tensor]:
    """The MMDiT state dict in diffusers' names from an original-layout file (``model.diffusion_model.``)."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        names = list(SD3Transformer2DModel.from_config(config).state_dict())
    out, missing = {}, []
    for key in names:
        name, part, swap = mmdit_original_key(key, config["num_layers"])
        value = tensors.get(UNET_PREFIX + name)
        if value is None:
            missing.append(UNET_PREFIX + name)
            continue
        value = value.chunk(3, dim=0)[part] if part is not None else value
        out[key] = swap_halves(value) if swap else value
    if missing:
        raise SingleFileError(f"{source}: the MMDiT lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    return out


def mmdit_to_original(transformer) -> dict[str, torch.Tensor]:
    """The inverse of :func:`mmdit_from_original`: fused ``qkv`` tensors concatenated from their thirds."""
    out, fused = {}, {}
    for key, value in transformer.state_dict().items():
        name, part, swap = mmdit_original_key(key, transformer.config.num_layers)
        value = swap_halves(value) if swap else value
        if part is None:
            out[UNET_PREFIX + name] = value
        else:
            fused.setdefault(UNET_PREFIX + name, {})[part] = value
    out.update({name: torch.cat([parts[0], parts[1], parts[2]]) for name, parts in fused.items()})
    return out


def mmdit_config(tensors: dict) -> dict:
    """SD3Transformer2DModel config read from an original file's tensor shapes (64-wide heads, as in every SD3)."""
    t = {k.removeprefix(UNET_PREFIX): v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    patch = t["x_embedder.proj.weight"]  # (inner, C, p, p)
    inner, channels, size = patch.shape[0], patch.shape[1], patch.shape[2]
    if inner % 64:
        raise SingleFileError(f"an MMDiT of width {inner} does not have SD3's 64-wide heads; pass config= a "
                              f"diffusers folder with its transformer/config.json")
    layers = 1 + max(int(k.split(".")[1]) for k in t if k.startswith("joint_blocks."))
    config = {"sample_size": 128, "patch_size": size, "in_channels": channels, "num_layers": layers,
              "attention_head_dim": 64, "num_attention_heads": inner // 64,
              "joint_attention_dim": t["context_embedder.weight"].shape[1],
              "caption_projection_dim": t["context_embedder.weight"].shape[0],
              "pooled_projection_dim": t["y_embedder.mlp.0.weight"].shape[1],
              "out_channels": t["final_layer.linear.weight"].shape[0] // size**2,
              "pos_embed_max_size": round(t["pos_embed"].shape[1] ** 0.5),
              "dual_attention_layers": sorted({int(k.split(".")[1]) for k in t if ".x_block.attn2." in k})}
    if any(".attn.ln_q." in k for k in t):
        config["qk_norm"] = "rms_norm"
    return config


def clip_config(tensors: dict, prefix: str) -> dict:
    """A CLIPTextConfig (dict) read from a transformers-named text tower's tensor shapes under ``prefix``; CLIP-L
    (width 768) uses quick_gelu, OpenCLIP towers gelu; heads are 64 wide."""
    p = prefix + "text_model."
    tokens, width = tensors[p + "embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(k[len(p):].split(".")[2]) for k in tensors if k.startswith(p + "encoder.layers."))
    config = {"vocab_size": tokens, "hidden_size": width, "num_hidden_layers": layers,
              "intermediate_size": tensors[p + "encoder.layers.0.mlp.fc1.weight"].shape[0],
              "num_attention_heads": max(width // 64, 1),
              "max_position_embeddings": tensors[p + "embeddings.position_embedding.weight"].shape[0],
              "hidden_act": "quick_gelu" if width == 768 else "gelu", "bos_token_id": 49406, "eos_token_id": 49407,
              "pad_token_id": 49407}
    projection = tensors.get(prefix + "text_projection.weight")
    config["projection_dim"] = projection.shape[0] if projection is not None else width
    return config


def _is_vae_attention_weight(original: str) -> bool:
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", original))


# --------------------------------------------------------------------------- detection


def detect_family(keys) -> str:
    """The model family of an original-layout state dict, from its key names (see the module docstring)."""
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith(UNET_PREFIX + "joint_blocks.") for k in keys):
        return "sd3"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys) and any(k.startswith(UNET_PREFIX)
                                                                               for k in keys):
        return "sd1"
    prefixes = sorted({".".join(k.split(".")[:2]) for k in keys})[:6]
    raise SingleFileError(f"unknown checkpoint layout: no Stable Diffusion family matches its keys (found "
                          f"{', '.join(prefixes) or 'no keys'})")


# --------------------------------------------------------------------------- reading


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: safetensors (whatever its suffix), or a pickle (``.ckpt``, ``.pt``, ...; any
    case) only with ``allow_pickle``, read weights only. A file of another suffix is never unpickled."""
    from safetensors.torch import load_file

    from ldm.loading import PICKLE_SUFFIXES, ModelLoadError, refuse_pickle

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file not found: {path}")
    refuse_pickle(path, allow_pickle)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # not a zip/pickle, truncated, or objects weights_only refuses
            raise ModelLoadError(f"cannot read {path} as a weights-only pickle: {str(err).strip().splitlines()[0]}") \
                from None
        if not isinstance(state, dict):
            raise ModelLoadError(f"{path} holds a {type(state).__name__}, not a state dict")
        return state.get("state_dict", state)
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own types for truncated or foreign files
        raise ModelLoadError(f"cannot read {path}: {str(err).splitlines()[0]} (truncated or not safetensors?)") \
            from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header ({} for a pickle or a file without metadata)."""
    from safetensors import safe_open

    from ldm.loading import PICKLE_SUFFIXES

    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        return {}
    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata() or {})


V_PRED_MARKER, ZERO_SNR_MARKER = "v_pred", "ztsnr"  # ComfyUI's empty marker tensors in single files
MODELSPEC_PREDICTION = "modelspec.prediction_type"  # the SAI model spec's header field: "epsilon" or "v"


def declared_schedule(tensors: dict, metadata: dict) -> dict:
    """Scheduler settings a single file declares, since its weights do not: ComfyUI's marker keys (``v_pred``:
    v-prediction; ``ztsnr``: zero terminal SNR, Lin et al. 2023, with trailing timesteps) and the SAI model spec's
    ``modelspec.prediction_type`` header field. {} when it declares nothing."""
    out = {}
    spec = metadata.get(MODELSPEC_PREDICTION, "").strip().lower()
    if spec in ("v", "v_prediction", "v-prediction"):
        out["prediction_type"] = "v_prediction"
    elif spec in ("epsilon", "eps"):
        out["prediction_type"] = "epsilon"
    if V_PRED_MARKER in tensors:
        out["prediction_type"] = "v_prediction"
    if ZERO_SNR_MARKER in tensors:
        out.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return out


def schedule_declaration(scheduler_config: dict) -> tuple[dict, dict]:
    """The marker tensors and header fields that :func:`declared_schedule` reads back, for a discrete-time
    (UNet) model's scheduler config."""
    v = scheduler_config.get("prediction_type") == "v_prediction"
    markers = {V_PRED_MARKER: torch.tensor([])} if v else {}
    if scheduler_config.get("rescale_betas_zero_snr"):
        markers[ZERO_SNR_MARKER] = torch.tensor([])
    return markers, {MODELSPEC_PREDICTION: "v" if v else "epsilon"}


def _fill(module: torch.nn.Module, tensors: dict, original_key, what: str, source) -> None:
    """Copy each of ``module``'s tensors from ``tensors[original_key(key)]``; errors name what is wrong."""
    state = module.state_dict()
    missing, loaded = [], {}
    for key, target in state.items():
        name = original_key(key)
        if name not in tensors:
            if key.endswith("position_ids"):
                loaded[key] = target
                continue
            missing.append(name)
            continue
        value = tensors[name]
        if _is_vae_attention_weight(name) and value.dim() == 4:
            value = value[:, :, 0, 0]  # original 1x1 convolutions -> diffusers' linear layers
        if tuple(value.shape) != tuple(target.shape):
            raise SingleFileError(f"{source}: {name} has shape {tuple(value.shape)} but this {what} expects "
                                  f"{tuple(target.shape)} (components of different models?)")
        loaded[key] = value.to(target.dtype)
    if missing:
        raise SingleFileError(f"{source}: the {what} lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    module.load_state_dict(loaded)


def load_single_file(path: str | Path, config: str | Path | None = None, prediction: str | None = None,
                     allow_pickle: bool = False):
    """Load an original-layout checkpoint as :class:`ldm.loading.Components`, offline. ``config``: a diffusers
    folder whose ``unet/``, ``vae/``, ``text_encoder/`` configs (and ``scheduler/``, ``tokenizer/``) describe the
    file; default: Stable Diffusion 1.5's, shipped in ``ldm/configs.py``. ``prediction`` (``epsilon`` or
    ``v_prediction``) overrides the scheduler's, since the keys do not tell."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ldm import configs
    from ldm.loading import Components, read_json
    from ldm.text import EOS, OPENCLIP_PAD, load_tokenizer

    path = Path(path)
    tensors = read_state_dict(path, allow_pickle)
    family = detect_family(tensors)
    if family == "sd1" and tensors[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1] == 9:
        family = "sd1-inpaint"
    if family not in LOADABLE:
        raise SingleFileError(f"{path} is a {FAMILIES[family]} checkpoint, which this version does not load")
    if family == "sd3":
        return load_sd3_file(tensors, path, config)
    sdxl = family == "sdxl"
    if config is not None:
        folder = Path(config)
        unet_config = read_json(folder / "unet" / "config.json")
        vae_config = read_json(folder / "vae" / "config.json")
        text_configs = [read_json(folder / "text_encoder" / "config.json")]
        if sdxl:
            text_configs.append(read_json(folder / "text_encoder_2" / "config.json"))
        scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
        tokenizer_dirs = [folder / "tokenizer", folder / "tokenizer_2"]
    else:
        unet_config, vae_config, text_configs, scheduler = configs.family_configs(family, path.name)
        tokenizer_dirs = [None, None]
    declared = declared_schedule(tensors, read_metadata(path))
    scheduler.update(declared)
    if prediction is None and config is None and family == "sd2" and "prediction_type" not in declared:
        prediction = configs.sd2_prediction(path.name)
    if prediction is not None:
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction must be epsilon or v_prediction, got {prediction!r}")
        scheduler["prediction_type"] = prediction
    unet = UNet2DConditionModel.from_config(unet_config)
    vae = AutoencoderKL.from_config(vae_config)
    _fill(unet, tensors, lambda k: UNET_PREFIX + unet_original_key(k, unet.config), "UNet", path)
    _fill(vae, tensors, lambda k: VAE_PREFIX + vae_original_key(k, vae.config), "VAE", path)
    text_encoder = _text_model(text_configs[0], projection=False)
    if family == "sd2":
        _fill_openclip(text_encoder, tensors, OPENCLIP_PREFIX, path)
    else:
        prefix = SDXL_CLIP_PREFIX if sdxl else CLIP_PREFIX
        _fill(text_encoder, tensors, lambda k: clip_original_key(k, prefix), "text encoder", path)
    text_encoder_2 = tokenizer_2 = None
    if sdxl:
        text_encoder_2 = _text_model(text_configs[1], projection=True)
        _fill_openclip(text_encoder_2, tensors, SDXL_OPENCLIP_PREFIX, path)
        tokenizer_2 = load_tokenizer(tokenizer_dirs[1], OPENCLIP_PAD)  # shipped CLIP BPE when the folder is absent
    tokenizer = load_tokenizer(tokenizer_dirs[0], OPENCLIP_PAD if family == "sd2" else EOS)
    return Components(unet.eval(), vae.eval(), text_encoder.eval(), tokenizer, scheduler, path,
                      text_encoder_2.eval() if sdxl else None, tokenizer_2, sdxl)


def load_sd3_file(tensors: dict, path: Path, config: str | Path | None = None):
    """An SD3 single file as :class:`ldm.loading.Components`: the MMDiT (sizes from its shapes), the VAE, CLIP-L
    and CLIP-G with projections (from the file, else from ``config``'s folders), the T5 when the file has it and
    ``config`` gives ``tokenizer_3/``; the flow scheduler with shift 3 unless ``config`` has one."""
    import transformers
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from ldm import configs
    from ldm.loading import Components, read_json
    from ldm.text import EOS, OPENCLIP_PAD, load_tokenizer

    folder = Path(config) if config is not None else None
    if folder is not None and (folder / "transformer" / "config.json").is_file():
        mmdit = read_json(folder / "transformer" / "config.json")
    else:
        try:
            mmdit = mmdit_config(tensors)
        except KeyError as err:
            raise SingleFileError(f"{path}: the MMDiT lacks {UNET_PREFIX}{err.args[0]}") from None
    transformer = SD3Transformer2DModel.from_config(mmdit)
    transformer.load_state_dict(mmdit_from_original(tensors, transformer.config, path))
    vae_config = read_json(folder / "vae" / "config.json") if folder is not None else configs.sd3_vae_config(
        tensors[VAE_PREFIX + "encoder.conv_out.weight"].shape[0] // 2,
        VAE_PREFIX + "quant_conv.weight" in tensors)
    vae = AutoencoderKL.from_config(vae_config)
    _fill(vae, tensors, lambda k: VAE_PREFIX + vae_original_key(k, vae.config), "VAE", path)
    towers = []
    for name, pad in (("text_encoder", EOS), ("text_encoder_2", OPENCLIP_PAD)):
        prefix = SD3_TEXT_PREFIXES[name]
        if prefix + "text_model.embeddings.token_embedding.weight" in tensors:
            own = folder / name / "config.json" if folder is not None else None
            tower_config = read_json(own) if own is not None and own.is_file() else clip_config(tensors, prefix)
            tower = _text_model(tower_config, projection=True)
            if prefix + "text_projection.weight" not in tensors:  # SD3 files keep no projection for CLIP-L: the
                tensors[prefix + "text_projection.weight"] = torch.eye(  # pooled output is used as it is (identity)
                    tower.config.projection_dim, tower.config.hidden_size)
            _fill(tower, tensors, lambda k, p=prefix: p + k, name.replace("_", " "), path)
        elif folder is not None and (folder / name).is_dir():
            tower = transformers.CLIPTextModelWithProjection.from_pretrained(str(folder / name), local_files_only=True)
        else:
            raise SingleFileError(f"{path} has no {name.replace('_', ' ')} ({prefix}...); pass config= a diffusers "
                                  f"SD3 folder that has {name}/")
        towers.append((tower.eval(), load_tokenizer(folder / name.replace("text_encoder", "tokenizer")
                                                    if folder is not None else None, pad)))
    t5 = t5_tokenizer = None
    t5_prefix = SD3_TEXT_PREFIXES["text_encoder_3"]
    if folder is not None and (folder / "tokenizer_3").is_dir() and any(k.startswith(t5_prefix) for k in tensors):
        t5_config = transformers.T5Config.from_pretrained(str(folder / "text_encoder_3"), local_files_only=True)
        t5 = transformers.T5EncoderModel(t5_config)
        tied = t5_prefix + "encoder.embed_tokens.weight"  # tied to shared.weight; original files store it once
        _fill(t5, tensors, lambda k: t5_prefix + ("shared.weight" if t5_prefix + k == tied and tied not in tensors
                                                  else k), "T5 encoder", path)
        t5_tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder / "tokenizer_3"), local_files_only=True)
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json") if folder is not None else dict(
        configs.SD3_SCHEDULER)
    (text_encoder, tokenizer), (text_encoder_2, tokenizer_2) = towers
    return Components(transformer.eval(), vae.eval(), text_encoder, tokenizer, scheduler, path, text_encoder_2,
                      tokenizer_2, False, t5.eval() if t5 is not None else None, t5_tokenizer)


def _text_model(config: dict, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))


def _fill_openclip(text_encoder, tensors: dict, prefix: str, source) -> None:
    """Load an OpenCLIP tower (``prefix``) into a transformers CLIP text model, checking names and shapes."""
    projection = hasattr(text_encoder, "text_projection")
    try:
        ours = openclip_to_diffusers(tensors, text_encoder.config.num_hidden_layers, prefix, projection)
    except KeyError as err:
        raise SingleFileError(f"{source}: the OpenCLIP text encoder lacks {err.args[0]}") from None
    _fill(text_encoder, {CLIP_PREFIX + k: v for k, v in ours.items()},
          lambda k: CLIP_PREFIX + k.removeprefix("text_model."), "text encoder", source)


# --------------------------------------------------------------------------- writing


def original_state_dict(unet, vae, text_encoder, family: str = "sd1", text_encoder_2=None) -> dict[str, torch.Tensor]:
    """The networks' tensors under their original single-file names (VAE attention as 1x1 convs; the text
    encoder as CLIP (``sd1``) or OpenCLIP (``sd2``); SDXL: CLIP-L then OpenCLIP under ``conditioner.embedders``)."""
    out = {}
    for key, value in unet.state_dict().items():
        out[UNET_PREFIX + unet_original_key(key, unet.config)] = value
    for key, value in vae.state_dict().items():
        name = VAE_PREFIX + vae_original_key(key, vae.config)
        out[name] = value[:, :, None, None] if _is_vae_attention_weight(name) else value
    if family == "sd2":
        out.update(diffusers_to_openclip(text_encoder.state_dict(), text_encoder.config.num_hidden_layers))
    else:
        prefix = SDXL_CLIP_PREFIX if family == "sdxl" else CLIP_PREFIX
        for key, value in text_encoder.state_dict().items():
            if not key.endswith("position_ids"):
                out[clip_original_key(key, prefix)] = value
    if family == "sdxl":
        out.update(diffusers_to_openclip(text_encoder_2.state_dict(), text_encoder_2.config.num_hidden_layers,
                                         SDXL_OPENCLIP_PREFIX))
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def sd3_state_dict(components) -> dict[str, torch.Tensor]:
    """An SD3 model's tensors under the original single-file names (MMDiT, VAE, the text towers it has)."""
    out = mmdit_to_original(components.unet)
    for key, value in components.vae.state_dict().items():
        name = VAE_PREFIX + vae_original_key(key, components.vae.config)
        out[name] = value[:, :, None, None] if _is_vae_attention_weight(name) else value
    for name, prefix in SD3_TEXT_PREFIXES.items():
        tower = getattr(components, name)
        if tower is None:
            continue
        stored = set()  # tied tensors (T5's encoder.embed_tokens is shared.weight) are written once, as originals do
        for key, value in tower.state_dict().items():
            if key.endswith("position_ids") or value.data_ptr() in stored:
                continue
            stored.add(value.data_ptr())
            out[prefix + key] = value
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def save_single_file(components, path: str | Path) -> Path:
    """Write a model's denoiser, VAE and text encoder(s) as one original-layout ``.safetensors`` file."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"single files are written as .safetensors, got {path}")
    metadata = {"format": "pt"}
    if components.text_encoder is None:
        raise SingleFileError("an SDXL refiner is written as a diffusers folder only (this version reads no "
                              "single-file refiners); give an output path without .safetensors")
    if "joint_attention_dim" in components.unet.config:
        tensors = sd3_state_dict(components)
    else:
        if components.text_encoder_2 is not None:
            family = "sdxl"
        else:
            family = "sd2" if components.text_encoder.config.hidden_act == "gelu" else "sd1"  # OpenCLIP vs CLIP-L
        tensors = original_state_dict(components.unet, components.vae, components.text_encoder, family,
                                      components.text_encoder_2)
        markers, header = schedule_declaration(components.scheduler_config)
        tensors.update(markers)
        metadata.update(header)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_folder(components, folder: str | Path) -> Path:
    """Write components as a diffusers folder (model_index.json, subfolders, safetensors)."""
    import json

    from ldm.text import save_tokenizer

    folder = Path(folder)
    mmdit = "joint_attention_dim" in components.unet.config
    denoiser = "transformer" if mmdit else "unet"
    components.unet.save_pretrained(folder / denoiser, safe_serialization=True)
    components.vae.save_pretrained(folder / "vae", safe_serialization=True)
    if components.text_encoder is not None:  # an SDXL refiner has the second tower only
        components.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        save_tokenizer(components.tokenizer, folder / "tokenizer")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(components.scheduler_config, indent=1))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             denoiser: ["diffusers", type(components.unet).__name__], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", type(components.text_encoder).__name__]
             if components.text_encoder is not None else [None, None],
             "tokenizer": ["transformers", "CLIPTokenizer"] if components.text_encoder is not None else [None, None],
             "scheduler": ["diffusers", components.scheduler_config.get("_class_name", "DDIMScheduler")],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    if components.text_encoder_2 is not None:  # SDXL, SD3
        components.text_encoder_2.save_pretrained(folder / "text_encoder_2", safe_serialization=True)
        save_tokenizer(components.tokenizer_2, folder / "tokenizer_2")
        index = {k: v for k, v in index.items() if k not in ("safety_checker", "feature_extractor",
                                                              "requires_safety_checker")}
        index.update({"_class_name": "StableDiffusionXLPipeline",
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"],
                      "force_zeros_for_empty_prompt": components.force_zeros_for_empty_prompt})
        if components.requires_aesthetics_score:  # the refiner: diffusers' image-to-image SDXL pipeline
            index.update({"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True})
    if mmdit:  # SD3, with its T5 when it has one
        index = {k: v for k, v in index.items() if k != "force_zeros_for_empty_prompt"}
        t5 = [None, None], [None, None]
        if components.text_encoder_3 is not None:
            components.text_encoder_3.save_pretrained(folder / "text_encoder_3", safe_serialization=True)
            components.tokenizer_3.save_pretrained(str(folder / "tokenizer_3"))
            t5 = ["transformers", "T5EncoderModel"], ["transformers", type(components.tokenizer_3).__name__]
        index.update({"_class_name": "StableDiffusion3Pipeline", "text_encoder_3": t5[0], "tokenizer_3": t5[1],
                      "image_encoder": [None, None], "feature_extractor": [None, None]})
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder
