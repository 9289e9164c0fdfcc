"""Train the latent denoiser (diffusers ``UNet2DConditionModel``) on shapes-world renders.

Noise schedule: SD's scaled-linear betas (0.00085 -> 0.012, T = 1000) rescaled to zero terminal SNR, with
v-prediction (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"). The shapes world
has flat pure-white and pure-black backgrounds; with SD's original schedule the last training step still leaks
``sqrt(alpha_bar_T) ~ 0.068`` of the image, so a model never learns to produce an image whose mean is far from
the noise's (mean 0 = mid-gray) and pure white/black backgrounds come out washed out. Zero terminal SNR removes
the leak; at SNR 0 an epsilon target is degenerate (the input is pure noise), so the target is
``v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0`` (Salimans & Ho 2022), and samplers start at the last timestep
("trailing" spacing). ``ab_t`` comes from ``ldm.schedules.DiscreteSchedule`` (its last value clipped to 2^-24,
as diffusers does).

Data: ``--num-images`` renders are encoded once through the frozen VAE (posterior mean and std are cached in
``--latent-cache``); every step samples ``z = mean + std * n`` and multiplies it by the VAE's ``scaling_factor``.
Each image has ``--caption-variants`` captions (freshly worded descriptions of the same scene, pre-tokenized);
a random one is used per sample, replaced by the empty caption with probability ``--uncond-prob`` (for
classifier-free guidance). The frozen text encoder's states (all 77) of every cached caption are computed once
(``--text-states cached``) or in every step (``on-the-fly``).
An EMA of the weights (``--ema-decay``) is what ``final/unet`` holds. Sample grids use ``ldm.samplers.sample_ddim``
through ``ldm.denoiser.Denoiser`` and ``ldm.guidance.CFGDenoiser``.

    python -m train.train_denoiser --output-dir runs/unet --vae runs/vae/final \\
        --text-encoder runs/text/final/text_encoder --tokenizer runs/text/final/tokenizer
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from train import common
from train.shapes import ONE_OBJECT_PROBABILITY

SCHEDULE_CONFIG: dict = {
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
}

PRESETS: dict[str, dict] = {
    # sample_size, in/out_channels and cross_attention_dim are filled in from the VAE and the text encoder.
    "default": {
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        # attention_head_dim is diffusers' legacy name for the number of heads: 2 heads of 32 / 64 channels.
        # 32 channels at the 16x16 level: a training step is 3x cheaper than [64, 128, 128] (1.09 against 3.2 s
        # at batch 64 on the 2-core AVX2 CPU, fp32), so the same time buys 3x the samples.
        "block_out_channels": [32, 64, 128], "layers_per_block": 1, "attention_head_dim": 2,
        "norm_num_groups": 32,
    },
    # For a lent GPU (train/gpu_session.py): twice the channels at 16x16 and two layers per block, 8.75 M
    # parameters (17.5 MB in float16: the shipped folder stays under 40 MB with the shipped VAE and text encoder).
    "large": {
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [64, 128, 128], "layers_per_block": 2, "attention_head_dim": 4,
        "norm_num_groups": 32,
    },
    "tiny": {
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": 2, "norm_num_groups": 8,
    },
}

SAMPLE_PROMPTS = (
    "a red circle at the top left on a white background",
    "a blue square in the center on a black background",
    "a large yellow triangle at the bottom right on gray",
    "a green circle to the left of a purple square",
    "a small orange square at the top on white",
    "a red triangle above a blue circle on a black background",
    "a purple triangle in the center on a white background",  # a held-out combination
    "",  # unconditional
)

RECIPE = "denoiser"
TEXT_STATES = ("cached", "on-the-fly")


def add_caption_args(group) -> None:
    """Flags of the latent cache's captions and rendering, shared with ``train.train_mmdit``."""
    group.add_argument("--render-workers", type=common.non_negative_int, default=0,
                       help="processes rendering the latent cache's images (0: this one; a GPU run wants its CPUs)")
    group.add_argument("--drop-color-prob", type=float, default=0.0,
                       help="probability that a cached caption variant leaves out the colour words ('a circle at "
                            "the top'), so shape words are learnt apart from the colours seen with them")
    group.add_argument("--one-object-prob", type=float, default=ONE_OBJECT_PROBABILITY,
                       help="probability that a render shows one object rather than two (before the split's "
                            "held-out filter); lower it to train more on two-object scenes and their relations")


def check_probabilities(args: argparse.Namespace,
                        flags: tuple[str, ...] = ("uncond_prob", "drop_color_prob", "one_object_prob")):
    """A clear error for a probability flag outside [0, 1] (or NaN)."""
    for flag in flags:
        if not 0.0 <= getattr(args, flag) <= 1.0:
            raise ValueError(f"--{flag.replace('_', '-')} must be in [0, 1], got {getattr(args, flag)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.train_denoiser", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p, steps=1600, batch_size=64, lr=5e-4, checkpoint_every=500, sample_every=1000,
                           warmup=200)
    g = p.add_argument_group("denoiser")
    g.add_argument("--vae", required=True, help="folder of the trained AutoencoderKL (config.json + weights)")
    g.add_argument("--text-encoder", required=True, help="folder of the trained CLIPTextModel")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: <text-encoder>/../tokenizer if present, else standard CLIP BPE)")
    g.add_argument("--preset", default="default", choices=sorted(PRESETS), help="UNet size")
    g.add_argument("--image-size", type=int, default=128, help="render size (latents are this / VAE factor)")
    g.add_argument("--num-images", type=common.positive_int, default=8000, help="renders encoded once")
    g.add_argument("--caption-variants", type=common.positive_int, default=4, help="captions per image")
    g.add_argument("--data-seed", type=common.non_negative_int, default=None, help="dataset seed (default --seed)")
    g.add_argument("--split", default="train", choices=("train", "heldout", "all"), help="shapes-world split")
    g.add_argument("--latent-cache", default=None,
                   help="safetensors file of encoded latents (default <output-dir>/latents.safetensors); "
                        "rebuilt when it does not match the VAE/data flags")
    g.add_argument("--uncond-prob", type=float, default=0.1, help="probability of training on the empty caption")
    g.add_argument("--text-states", default="cached", choices=TEXT_STATES,
                   help="cached: encode every cached caption once before training (~14%% faster steps on the "
                        "2-core CPU); on-the-fly: run the frozen text encoder in every step")
    add_caption_args(g)
    g.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights; 0 = no EMA")
    g.add_argument("--init-unet", default=None,
                   help="start from this diffusers UNet folder (e.g. weights/shapes-unet/unet) instead of a seeded "
                        "init; its config must match the preset's. Optimizer and EMA start fresh")
    common.add_loss_weighting_args(g, "min_snr", "per-timestep weight of the v loss (see common.loss_weights)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--sample-steps", type=common.positive_int, default=25, help="DDIM steps for the sample grids")
    g.add_argument("--sample-guidance", type=float, default=5.0, help="CFG scale for the sample grids")
    return p


# --------------------------------------------------------------------------- the forward process


def alphas_cumprod() -> torch.Tensor:
    from ldm.schedules import DiscreteSchedule

    return DiscreteSchedule.from_config(SCHEDULE_CONFIG).alphas_cumprod  # (T,)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor):
    """``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`` and the v target ``sqrt(ab) eps - sqrt(1 - ab) x0``
    (Salimans & Ho 2022, sec. 4); ``alpha_bar`` is ``(B,)``."""
    a = alpha_bar.sqrt().view(-1, 1, 1, 1)
    s = (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)
    return a * x0 + s * noise, a * noise - s * x0


# --------------------------------------------------------------------------- components


def resolve_tokenizer_dir(args: argparse.Namespace) -> Path | None:
    if args.tokenizer is not None:
        folder = Path(args.tokenizer)
        if not folder.is_dir():
            raise FileNotFoundError(f"--tokenizer folder {folder} does not exist")
        return folder
    sibling = Path(args.text_encoder).parent / "tokenizer"
    return sibling if sibling.is_dir() else None


def load_components(args: argparse.Namespace):
    """The frozen VAE, text encoder and tokenizer, with clear errors for missing files."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from ldm.text import load_tokenizer

    vae_dir = common.require_model_folder(args.vae, "--vae")
    text_dir = common.require_model_folder(args.text_encoder, "--text-encoder")
    vae = torch.nn.Module.to(AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True), torch.float32)
    # transformers 5 loads in the saved dtype by default; train against float32 weights whatever was saved.
    text_encoder = CLIPTextModel.from_pretrained(str(text_dir), local_files_only=True).float()
    vae.eval()
    text_encoder.eval()
    tokenizer = load_tokenizer(resolve_tokenizer_dir(args))
    if len(tokenizer) > text_encoder.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the text encoder only "
                         f"{text_encoder.config.vocab_size}")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    return vae, text_encoder, tokenizer


def unet_config(preset: dict, vae_config, text_config, image_size: int) -> dict:
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    if image_size % factor:
        raise ValueError(f"--image-size {image_size} is not a multiple of the VAE's downsampling factor {factor}")
    levels = len(preset["block_out_channels"]) - 1
    if (image_size // factor) % (2**levels):
        raise ValueError(f"latent size {image_size // factor} is not divisible by the UNet's {2**levels}x "
                         f"downsampling")
    return {**preset, "sample_size": image_size // factor, "in_channels": vae_config.latent_channels,
            "out_channels": vae_config.latent_channels, "cross_attention_dim": text_config.hidden_size}


def build_unet(config: dict, seed: int, init_folder: str | None = None):
    """A seeded fresh UNet of ``config``, or the float32 weights of ``init_folder`` if its config agrees."""
    from diffusers import UNet2DConditionModel

    if init_folder is None:
        return common.seeded_init(seed, lambda: UNet2DConditionModel(**config))
    folder = common.require_model_folder(init_folder, "--init-unet")
    saved = UNet2DConditionModel.load_config(str(folder))
    diff = common.config_difference({key: saved.get(key) for key in config}, config)  # the folder holds more keys
    if diff:
        raise ValueError(f"--init-unet {folder} does not match the UNet config ({diff})")
    unet = UNet2DConditionModel.from_pretrained(str(folder), local_files_only=True)
    return torch.nn.Module.to(unet, torch.float32)


# --------------------------------------------------------------------------- latent cache


def _cache_meta(args: argparse.Namespace, vae) -> dict:
    weights = sum(float(p.double().abs().sum()) for p in vae.parameters())
    return {"vae_config": {k: v for k, v in dict(vae.config).items() if not k.startswith("_")},
            "vae_weights_abs_sum": round(weights, 3), "num_images": args.num_images,
            "caption_variants": args.caption_variants, "data_seed": args.data_seed, "image_size": args.image_size,
            "split": args.split, "drop_color_prob": args.drop_color_prob, "one_object_prob": args.one_object_prob,
            "version": 1}


class CaptionedRenders(torch.utils.data.Dataset):
    """Render ``i`` of the shapes world and the token ids ``(V, 77)`` of its ``--caption-variants`` cached captions:
    variant 0 is the dataset's own caption, the others freshly worded, each colourless with probability
    ``--drop-color-prob``. Every draw depends only on ``(data seed, i, variant)``, so worker processes give the
    items this process would."""

    def __init__(self, args: argparse.Namespace, tokenizer):
        from train.shapes import ShapesDataset

        self.dataset = ShapesDataset(args.num_images, args.data_seed, args.image_size, args.split,
                                     args.one_object_prob)
        self.args, self.tokenizer = args, tokenizer

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np

        from ldm.text import token_windows
        from train.shapes import caption

        args, item = self.args, self.dataset[index]
        ids = []
        for v in range(args.caption_variants):
            rng = np.random.default_rng([args.data_seed, common.STREAM_DATA, index, v])
            if args.drop_color_prob > 0 and rng.random() < args.drop_color_prob:
                text = caption(item["scene"], rng, omit=("color",))
            else:
                text = item["caption"] if v == 0 else caption(item["scene"], rng)
            windows = token_windows(self.tokenizer, text)
            if len(windows) != 1:
                raise ValueError(f"a caption is longer than one 77-token window: {text!r}")
            ids.append(windows[0])
        return item["image"], torch.tensor(ids, dtype=torch.int32)  # (3, H, W) in [-1, 1], (V, 77)


@torch.no_grad()
def build_latent_cache(args: argparse.Namespace, vae, tokenizer, autocast, device) -> dict:
    """Encode ``--num-images`` renders: posterior mean/std (N, C, h, w) and caption token ids (N, V, 77). Renders
    and token ids come from ``--render-workers`` processes (0: this one); the VAE encodes 8 at a time on a CPU (its
    encoder runs ~2x faster per image at batch 8 than at 64 on the 2-core CPU) and 256 on a GPU."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(CaptionedRenders(args, tokenizer), num_workers=args.render_workers,
                                         batch_size=8 if device.type == "cpu" else 256)
    means, stds, ids = [], [], []
    vae = vae.to(device)
    for images, tokens in tqdm(loader, desc="encoding renders", dynamic_ncols=True):
        with autocast():
            dist = vae.encode(images.to(device)).latent_dist
        means.append(dist.mean.float().cpu().contiguous())  # (b, C, h, w); chunk() views are strided
        stds.append(dist.std.float().cpu().contiguous())
        ids.append(tokens)  # (b, V, 77)
    return {"mean": torch.cat(means), "std": torch.cat(stds), "ids": torch.cat(ids)}


def load_or_build_cache(args: argparse.Namespace, vae, tokenizer, accelerator, path: Path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    meta = _cache_meta(args, vae)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            saved = json.loads((f.metadata() or {}).get("meta", "null"))
        if saved == json.loads(json.dumps(meta)):
            return load_file(str(path))
        accelerator.print(f"latent cache {path} was made with other VAE/data settings; rebuilding it")
    cache = build_latent_cache(args, vae, tokenizer, accelerator.autocast, accelerator.device)
    if accelerator.is_main_process:
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in cache.items()}, str(tmp), metadata={"meta": json.dumps(meta)})
        tmp.replace(path)
    return cache


class LatentBatches:
    """Training batches from the latent cache, reproducible per (step, micro-batch, rank): latents sampled from the
    cached posteriors, shifted and scaled as the VAE config says, and one caption row per image: a caption variant
    of it, or the empty caption with probability ``--uncond-prob``. Caption rows index ``caption_ids``, every cached
    caption ``(N * V, 77)`` with the empty one last; the posteriors live on ``device``."""

    def __init__(self, args: argparse.Namespace, cache: dict, vae_config, empty_ids: list[int], rank: int,
                 device: torch.device = torch.device("cpu")):
        # Contiguous, so a fresh cache and one loaded from disk give the network identically laid-out inputs
        # (oneDNN's bf16 kernels depend on memory layout, and exact resumes depend on that).
        self.mean = cache["mean"].float().contiguous().to(device)
        self.std = cache["std"].float().contiguous().to(device)
        ids = cache["ids"].long()  # (N, V, 77)
        self.caption_ids = torch.cat([ids.reshape(-1, ids.shape[-1]), torch.tensor([empty_ids])])  # (N * V + 1, 77)
        self.scaling, self.shift = float(vae_config.scaling_factor), float(getattr(vae_config, "shift_factor", 0) or 0)
        self.args, self.rank, self.device = args, rank, device

    def draw(self, step: int, micro: int):
        """``(x0 (B, C, h, w) on the device, caption rows (B,), the noise generator of this micro-batch)``."""
        args = self.args
        rng = common.numpy_rng(args.seed, common.STREAM_DATA, step, micro, self.rank)
        idx = torch.from_numpy(rng.integers(0, len(self.mean), size=args.batch_size))
        variant = torch.from_numpy(rng.integers(0, args.caption_variants, size=args.batch_size))
        drop = torch.from_numpy(rng.random(args.batch_size) < args.uncond_prob)
        rows = torch.where(drop, len(self.caption_ids) - 1, idx * args.caption_variants + variant)  # (B,)
        gen = common.torch_generator(args.seed, common.STREAM_NOISE, step, micro, self.rank)
        n = torch.randn((args.batch_size, *self.mean.shape[1:]), generator=gen).to(self.device)
        idx = idx.to(self.device)
        x0 = (self.mean[idx] + self.std[idx] * n - self.shift) * self.scaling
        return x0, rows, gen

    def token_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, 77)`` of caption rows."""
        return self.caption_ids[rows]


class CachedTextStates:
    """The frozen text encoder's last hidden states of every cached caption, computed once (each distinct caption
    once) and kept on the encoder's device: ``states(rows)`` for caption rows ``(B,)`` of ``LatentBatches`` gives
    ``(B, 77, D)``, what the encoder would give for their token ids."""

    def __init__(self, text_encoder, caption_ids: torch.Tensor, autocast):
        from tqdm.auto import tqdm

        unique, row_of = torch.unique(caption_ids, dim=0, return_inverse=True)  # (U, 77), (R,)
        device = next(text_encoder.parameters()).device
        batch = 256 if device.type == "cpu" else 4096
        chunks = []
        with torch.no_grad():
            for chunk in tqdm(unique.split(batch), desc="encoding captions", dynamic_ncols=True,
                              disable=bool(os.environ.get("LDM_NO_PROGRESS"))):
                with autocast():
                    chunks.append(text_encoder(chunk.to(device))[0].float())
        self.table = torch.cat(chunks)  # (U, 77, D)
        self.row_of = row_of.to(device)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.table[self.row_of[rows.to(self.row_of.device)]]  # (B, 77, D)


# --------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_images(unet, vae, text_encoder, tokenizer, prompts, generator: torch.Generator, steps: int = 25,
                  guidance: float = 5.0, autocast=None) -> torch.Tensor:
    """Generate one image per prompt with DDIM (trailing spacing, ends at sigma 0) and CFG; ``(N, 3, H, W)``."""
    from contextlib import nullcontext

    from ldm.denoiser import Denoiser
    from ldm.guidance import CFGDenoiser
    from ldm.samplers import randn_like, sample_ddim
    from ldm.schedules import DiscreteSchedule
    from ldm.text import encode_tokens, tokenize_batch

    autocast = autocast or nullcontext
    device = next(unet.parameters()).device
    with autocast():
        cond = encode_tokens(text_encoder, tokenize_batch(tokenizer, list(prompts))).float()
        uncond = encode_tokens(text_encoder, tokenize_batch(tokenizer, [""] * len(prompts))).float()

    def network(x_in, t, c):
        with autocast():
            return unet(x_in, t.to(device), encoder_hidden_states=c).sample

    schedule = DiscreteSchedule.from_config(SCHEDULE_CONFIG)
    denoiser = Denoiser(network, schedule, "v_prediction")
    model = CFGDenoiser(denoiser, cond, uncond, scale=guidance)
    sigmas = schedule.sigma_list(steps, "trailing", final_sigma="zero")
    size = unet.config.sample_size
    shape = torch.empty(len(prompts), unet.config.in_channels, size, size, device=device)
    x = randn_like(shape, generator) * denoiser.noise_scale(float(sigmas[0]))
    latents = sample_ddim(model, x, sigmas)
    with autocast():
        images = vae.decode(latents / vae.config.scaling_factor).sample
    return images.float().clamp(-1, 1)


# --------------------------------------------------------------------------- main


def run(argv: list[str] | None = None) -> dict:
    """Run the recipe with command-line ``argv``; returns losses, throughput, metrics and the output folder."""
    from ldm.text import token_windows
    from train.shapes import check_image_size

    args = build_parser().parse_args(argv)
    common.check_common_args(args)
    check_probabilities(args)
    common.check_loss_weighting(args)
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    check_image_size(args.image_size)
    if args.data_seed is None:
        args.data_seed = args.seed
    vae, text_encoder, tokenizer = load_components(args)
    preset = common.model_config_from_args(args, PRESETS)
    config = unet_config(preset, vae.config, text_encoder.config, args.image_size)
    out = common.ensure_output_dir(args)
    accelerator = common.make_accelerator(args)
    log = common.RunLog(out, accelerator.is_main_process)
    device = accelerator.device

    cache = load_or_build_cache(args, vae, tokenizer, accelerator, Path(args.latent_cache or out / "latents.safetensors"))
    batches = LatentBatches(args, cache, vae.config, token_windows(tokenizer, "")[0], accelerator.process_index,
                            device)
    text_encoder.to(device)
    vae.to(device)
    ab = alphas_cumprod().to(device)
    cached_states = None
    if args.text_states == "cached":
        cached_states = CachedTextStates(text_encoder, batches.caption_ids, accelerator.autocast)

    unet = build_unet(config, args.seed, args.init_unet)
    if device.type == "cpu":
        # On CPU, PyTorch's fused SDPA kernels are ~2x slower than plain matmul-softmax-matmul for these small
        # heads (measured on the 2-core bf16 box); the choice does not change the weights' meaning.
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(common.declare_fsdp_units(unet), optimizer)
    unwrapped = accelerator.unwrap_model(model)
    ema = common.EMA(unwrapped, args.ema_decay)

    def loss_fn(step: int, micro: int) -> torch.Tensor:
        x0, rows, gen = batches.draw(step, micro)  # (B, C, h, w), (B,)
        t = torch.randint(0, len(ab), (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        noise, t = noise.to(device), t.to(device)
        x_t, v = add_noise(x0, noise, ab[t])
        with accelerator.autocast():
            with torch.no_grad():
                cond = (cached_states(rows) if cached_states is not None
                        else text_encoder(batches.token_ids(rows).to(device))[0])  # (B, 77, D)
            pred = model(x_t, t, encoder_hidden_states=cond).sample
        per_sample = (pred.float() - v).square().mean(dim=(1, 2, 3))  # (B,)
        return (per_sample * common.loss_weights(ab[t], args.loss_weighting, args.min_snr_gamma)).mean()

    def sample_fn(step: int) -> None:
        gen = common.torch_generator(args.seed, common.STREAM_SAMPLE)
        images = sample_images(ema.averaged(), vae, text_encoder, tokenizer, SAMPLE_PROMPTS, gen,
                               args.sample_steps, args.sample_guidance, accelerator.autocast)
        if accelerator.is_main_process:
            common.save_grid(images, out / "samples" / f"step-{step:07d}.png", nrow=len(SAMPLE_PROMPTS))

    result = common.train_loop(args=args, accelerator=accelerator, recipe=RECIPE, model_config=config,
                               model=model, optimizer=optimizer, loss_fn=loss_fn,
                               checkpoint_models=ema.checkpoint_models(model),
                               log=log, desc="denoiser", after_step=ema.update, sample_fn=sample_fn)
    if common.stopped_early(accelerator, result, args.steps):
        return result
    metrics = {"steps": args.steps, "params": common.count_parameters(unwrapped), "batch_size": args.batch_size,
               "steps_per_second": result["steps_per_second"], "num_images": len(cache["mean"]),
               "final_loss": result["losses"][-1] if result["losses"] else None}
    final = ema.averaged()  # every process: FSDP gathers
    if accelerator.is_main_process:
        final.save_pretrained(out / "final" / "unet", safe_serialization=True)
        common.write_json(out / "final" / "schedule.json", SCHEDULE_CONFIG)
        common.finish_run(accelerator, log, out, "denoiser", metrics, out / "final" / "unet")
    accelerator.end_training()
    return {**result, "metrics": metrics, "final_dir": out / "final"}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (``ldm train ...`` calls this): runs :func:`run`, returns the exit status 0."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
