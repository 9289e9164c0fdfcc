"""Random-weight models of named sizes, saved as diffusers folders: for tests (``tiny``, ``tiny-sdxl``,
``tiny-sd3``) and for benchmarks (``shapes``: the shipped default model's architecture; ``sd15``, ``sdxl``, ``sd3``:
Stable Diffusion 1.5's, SDXL base's and SD3 medium's). Seeded; nothing is downloaded. A small registry of size
presets in the manner of DiT's ``DiT_models``."""
from __future__ import annotations

import functools
from pathlib import Path

import torch


# preset -> (UNet kwargs, VAE kwargs, CLIP text kwargs)
PRESETS = {
    "tiny": (
        dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
             attention_head_dim=8),
        dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16),
        dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
    ),
    "tiny-sd2": (  # SD 2.x's structure: linear projections, per-level heads, an OpenCLIP-like (gelu) text tower
        dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
             attention_head_dim=(2, 4), use_linear_projection=True),
        dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16),
        dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu"),
    ),
    "shapes": (
        dict(sample_size=16, layers_per_block=1, block_out_channels=(64, 128, 256), cross_attention_dim=128,
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=32),
        dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, sample_size=128),
        dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
    ),
    "sd15": (
        dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
             down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8),
        dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    ),
}


def keeps_global_rng(build):
    """Run a builder that seeds torch's global generator (``torch.manual_seed(seed)``, so that the weights are a
    function of the seed) inside ``fork_rng``: the caller's global RNG state is left as it was."""
    @functools.wraps(build)
    def wrapped(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return build(*args, **kwargs)
    return wrapped


@keeps_global_rng
def random_components(preset: str = "tiny", seed: int = 0):
    """UNet2DConditionModel, AutoencoderKL and CLIPTextModel of a preset's sizes, from ``torch.manual_seed(seed)``;
    the text model uses the real CLIP vocabulary (49 408 tokens)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {', '.join(PRESETS)}")
    unet_kwargs, vae_kwargs, text_kwargs = PRESETS[preset]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, norm_num_groups=32, **unet_kwargs)
    blocks = len(vae_kwargs["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                        **vae_kwargs)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                                eos_token_id=49407, pad_token_id=49407, **text_kwargs))
    return unet.eval(), vae.eval(), text_encoder.eval()


def _vae_kwargs(block_out_channels: tuple, layers_per_block: int, sample_size: int, **extra) -> dict:
    blocks = len(block_out_channels)
    return dict(block_out_channels=block_out_channels, layers_per_block=layers_per_block, sample_size=sample_size,
                down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                norm_num_groups=32, **extra)


def _clip_text_kwargs(hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int,
                      hidden_act: str, projection_dim: int) -> dict:
    return dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads, hidden_act=hidden_act,
                projection_dim=projection_dim)


TINY_TEXT = _clip_text_kwargs(32, 37, 3, 4, "gelu", 32)
CLIP_L = _clip_text_kwargs(768, 3072, 12, 12, "quick_gelu", 768)  # SD 1.x's, SDXL's and SD3's first tower
CLIP_BIG_G = _clip_text_kwargs(1280, 5120, 32, 20, "gelu", 1280)  # OpenCLIP ViT-bigG/14: SDXL's and SD3's second

# size -> architecture: "tiny" is diffusers' own test sizes; "full" the released models' (stabilityai's
# stable-diffusion-xl-base-1.0 and stable-diffusion-3-medium-diffusers configs), for GPU benchmarks.
SDXL_SIZES = {
    "tiny": dict(
        unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                  transformer_layers_per_block=(1, 2), norm_num_groups=32),
        vae=_vae_kwargs((32, 64), 1, 16, latent_channels=4, scaling_factor=0.13025),
        text=TINY_TEXT, text_2=TINY_TEXT),
    "full": dict(
        unet=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=256, transformer_layers_per_block=(1, 2, 10), norm_num_groups=32),
        vae=_vae_kwargs((128, 256, 512, 512), 2, 1024, latent_channels=4, scaling_factor=0.13025),
        text=CLIP_L, text_2=CLIP_BIG_G),
}
SD3_SIZES = {
    "tiny": dict(
        transformer=dict(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                         num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                         pooled_projection_dim=64, out_channels=4),
        vae=_vae_kwargs((32, 64), 1, 16, latent_channels=4, scaling_factor=1.5035, shift_factor=0.0609),
        text=TINY_TEXT, text_2=TINY_TEXT),
    "full": dict(  # SD3 medium; its T5 (4.7 B parameters) is optional and left out, as everywhere here
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, caption_projection_dim=1536, joint_attention_dim=4096,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
        vae=_vae_kwargs((128, 256, 512, 512), 2, 1024, latent_channels=16, scaling_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text=CLIP_L, text_2=CLIP_BIG_G),
}


def _check_size(size: str, sizes: dict) -> dict:
    if size not in sizes:
        raise ValueError(f"unknown model size {size!r}; known: {', '.join(sizes)}")
    return sizes[size]


def _sdxl_unet_and_vae(size: str, cross_attention_dim: int, time_ids: int, pooled: int):
    """An SDXL-shaped UNet (``text_time`` added conditioning: ``time_ids`` embeddings and a ``pooled``-wide text
    embedding; the base has 6 time ids, the refiner 5) and VAE of ``SDXL_SIZES[size]``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    sizes = _check_size(size, SDXL_SIZES)
    time_embed = sizes["unet"]["addition_time_embed_dim"]
    unet = UNet2DConditionModel(**sizes["unet"], cross_attention_dim=cross_attention_dim,
                                projection_class_embeddings_input_dim=time_ids * time_embed + pooled)
    return unet, AutoencoderKL(**sizes["vae"])


@keeps_global_rng
def save_random_sdxl(folder: str | Path, scheduler: dict | None = None, seed: int = 0, size: str = "tiny",
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """An SDXL-shaped model folder (two text towers, pooled embedding, size/crop micro-conditioning): ``"tiny"``
    at the sizes of diffusers' own SDXL tests, ``"full"`` at SDXL base 1.0's (2.6 B-parameter UNet, 13.9 GB of
    weights in float32: build it on a GPU ``device`` and save it in float16 ``dtype``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldm.configs import SD15_SCHEDULER
    from ldm.loading import Components
    from ldm.single_file import save_folder
    from ldm.text import EOS, OPENCLIP_PAD, load_tokenizer

    sizes = _check_size(size, SDXL_SIZES)
    text, text_2 = CLIPTextConfig(**sizes["text"]), CLIPTextConfig(**sizes["text_2"])
    torch.manual_seed(seed)
    with torch.device(device):
        unet, vae = _sdxl_unet_and_vae(size, text.hidden_size + text_2.hidden_size, 6, text_2.projection_dim)
        networks = [unet, vae, CLIPTextModel(text), CLIPTextModelWithProjection(text_2)]
    unet, vae, text_encoder, text_encoder_2 = (network.to(dtype).eval() for network in networks)
    components = Components(unet, vae, text_encoder, load_tokenizer(pad_token=EOS),
                            {**SD15_SCHEDULER, **(scheduler or {})}, Path(folder),
                            text_encoder_2, load_tokenizer(pad_token=OPENCLIP_PAD), True)
    return save_folder(components, folder)


@keeps_global_rng
def save_random_sdxl_refiner(folder: str | Path, seed: int = 1) -> Path:
    """A tiny SDXL-refiner-shaped model folder: the second text tower only, and ``time_ids`` of (original size,
    crop, aesthetic score) (``requires_aesthetics_score``), the sizes of diffusers' own refiner tests."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ldm.text import OPENCLIP_PAD, load_tokenizer, save_tokenizer

    torch.manual_seed(seed)
    text = CLIPTextConfig(**TINY_TEXT)
    unet, vae = _sdxl_unet_and_vae("tiny", text.hidden_size, 5, text.projection_dim)
    folder = Path(folder)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    CLIPTextModelWithProjection(text).save_pretrained(folder / "text_encoder_2", safe_serialization=True)
    save_tokenizer(load_tokenizer(pad_token=OPENCLIP_PAD), folder / "tokenizer_2")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    from ldm.configs import SD15_SCHEDULER

    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    index = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": [None, None], "tokenizer": [None, None],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
             "requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


@keeps_global_rng
def save_random_sd3(folder: str | Path, seed: int = 0, size: str = "tiny", device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> Path:
    """An SD3-shaped model folder: an MMDiT (SD3Transformer2DModel), two CLIP towers with projections, no T5,
    a VAE with shift and scaling factors and the flow-matching scheduler (shift 3); ``"tiny"`` at diffusers' SD3
    test sizes, ``"full"`` at SD3 medium's (2.0 B-parameter MMDiT, 16-channel VAE; build it on a GPU ``device``)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ldm.loading import Components
    from ldm.single_file import save_folder
    from ldm.text import EOS, OPENCLIP_PAD, load_tokenizer

    sizes = _check_size(size, SD3_SIZES)
    torch.manual_seed(seed)
    with torch.device(device):
        networks = [SD3Transformer2DModel(**sizes["transformer"]), AutoencoderKL(**sizes["vae"]),
                    CLIPTextModelWithProjection(CLIPTextConfig(**sizes["text"])),
                    CLIPTextModelWithProjection(CLIPTextConfig(**sizes["text_2"]))]
    transformer, vae, text_encoder, text_encoder_2 = (network.to(dtype).eval() for network in networks)
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    components = Components(transformer, vae, text_encoder, load_tokenizer(pad_token=EOS), scheduler, Path(folder),
                            text_encoder_2, load_tokenizer(pad_token=OPENCLIP_PAD))
    return save_folder(components, folder)


# the SDXL- and SD3-shaped models by name (the other names are PRESETS, SD 1.x-shaped): family, size
FAMILY_MODELS = {"tiny-sdxl": ("sdxl", "tiny"), "sdxl": ("sdxl", "full"), "tiny-sd3": ("sd3", "tiny"),
                 "sd3": ("sd3", "full")}
RANDOM_MODELS = (*PRESETS, *FAMILY_MODELS)


def save_random_model(folder: str | Path, preset: str = "tiny", scheduler: dict | None = None, seed: int = 0,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """Write a complete random-weight model folder: a ``PRESETS`` size as a StableDiffusionPipeline
    (``scheduler`` overrides SD's scheduler config), or an SDXL / SD3 one (``FAMILY_MODELS``). The networks are
    built on ``device`` (a GPU builds full-size ones in seconds) and saved in ``dtype``."""
    from ldm.configs import SD15_SCHEDULER
    from ldm.loading import Components
    from ldm.single_file import save_folder
    from ldm.text import EOS, OPENCLIP_PAD, load_tokenizer

    if preset in FAMILY_MODELS:
        family, size = FAMILY_MODELS[preset]
        if family == "sdxl":
            return save_random_sdxl(folder, scheduler, seed, size, device, dtype)
        return save_random_sd3(folder, seed, size, device, dtype)
    with torch.device(device):
        unet, vae, text_encoder = (network.to(dtype) for network in random_components(preset, seed))
    tokenizer = load_tokenizer(pad_token=OPENCLIP_PAD if text_encoder.config.hidden_act == "gelu" else EOS)
    components = Components(unet, vae, text_encoder, tokenizer, {**SD15_SCHEDULER, **(scheduler or {})},
                            Path(folder))
    return save_folder(components, folder)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.random_models FOLDER [--preset NAME]``: write a random-weight model."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder")
    parser.add_argument("--preset", default="tiny", choices=RANDOM_MODELS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(save_random_model(args.folder, args.preset, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
