"""Train a tiny SD3-style MMDiT (diffusers ``SD3Transformer2DModel``) with rectified flow on shapes-world renders.

Rectified flow (Liu et al. 2022; Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3): ``x_t = (1 - t) x0
+ t eps`` and the network predicts the velocity ``v = eps - x0`` (eq. 1-3 with ``a_t = 1 - t``, ``b_t = t``), at
flow times drawn from the logit-normal distribution ``t = sigmoid(u), u ~ N(m, s^2)`` (sec. 3.1, "rf/lognorm(0.00,
1.00)", their best sampler of t), with the plain (unweighted) velocity loss. The network sees the timestep
``1000 t``, as diffusers' ``FlowMatchEulerDiscreteScheduler`` feeds it; inference uses that scheduler's flow
schedule with shift 1 (16 x 16 latents are far below the resolutions SD3 shifts for, sec. 5.3.2).

Conditioning, built the way SD3's pipeline builds it from two CLIP towers and no T5 (so diffusers'
``StableDiffusion3Pipeline`` loads the result): the penultimate hidden states of both towers side by side (77
tokens), then 256 all-zero T5 tokens; pooled: both towers' projected pooled embeddings side by side. Both towers
are the shapes CLIP's text tower with its projection (``--clip``: the full CLIPModel folder of the text recipe);
the second is a copy, since diffusers' SD3 pipeline requires two. The 256 zero tokens are computed as one token
that stands for 256 (``ldm.attention.JointControlledAttnProcessor``, exact), which keeps the context 78 tokens long.

Data, caption dropout (``--uncond-prob``, the empty caption) and the EMA are as in ``train.train_denoiser``; the
latent cache of that recipe is reused when its VAE and data flags match (``--latent-cache``).

    python -m train.train_mmdit --output-dir runs/default/mmdit --vae runs/default/vae/final \\
        --clip runs/default/text/final/clip --tokenizer runs/default/text/final/tokenizer \\
        --latent-cache runs/default/unet/latents.safetensors
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from train import common
from train.train_denoiser import (SAMPLE_PROMPTS, LatentBatches, add_caption_args, check_probabilities,
                                  load_or_build_cache)

FLOW_SHIFT = 1.0
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                    "shift": FLOW_SHIFT}

PRESETS: dict[str, dict] = {
    # sample_size, in/out_channels, joint_attention_dim and pooled_projection_dim are filled in from the VAE and
    # the text towers. 3 joint blocks of width 128 (1.7 M parameters, 3.6 MB in fp16): the shapes CLIP tower
    # (14.3 MB, stored once for both SD3 text slots), the VAE (5.2 MB) and the tokenizer dominate the folder.
    "default": {"patch_size": 2, "num_layers": 3, "attention_head_dim": 32, "num_attention_heads": 4,
                "caption_projection_dim": 128, "pos_embed_max_size": 16},
    "tiny": {"patch_size": 2, "num_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
             "caption_projection_dim": 32, "pos_embed_max_size": 8},
}

RECIPE = "mmdit"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.train_mmdit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p, steps=6000, batch_size=64, lr=5e-4, checkpoint_every=500, sample_every=1000,
                           warmup=200)
    g = p.add_argument_group("mmdit")
    g.add_argument("--vae", required=True, help="folder of the trained AutoencoderKL (config.json + weights)")
    g.add_argument("--clip", required=True,
                   help="folder of the trained CLIPModel (the text recipe's final/clip), or of a "
                        "CLIPTextModelWithProjection (a shipped SD3 folder's text_encoder)")
    g.add_argument("--init-transformer", default=None,
                   help="start from this SD3Transformer2DModel folder (e.g. weights/shapes-mmdit/transformer) "
                        "instead of a seeded init; its config must match the preset")
    g.add_argument("--tokenizer", required=True, help="tokenizer folder of the text recipe")
    g.add_argument("--preset", default="default", choices=sorted(PRESETS), help="MMDiT size")
    g.add_argument("--image-size", type=int, default=128, help="render size (latents are this / VAE factor)")
    g.add_argument("--num-images", type=common.positive_int, default=8000, help="renders encoded once")
    g.add_argument("--caption-variants", type=common.positive_int, default=4, help="captions per image")
    g.add_argument("--data-seed", type=common.non_negative_int, default=None, help="dataset seed (default --seed)")
    g.add_argument("--split", default="train", choices=("train", "heldout", "all"), help="shapes-world split")
    g.add_argument("--latent-cache", default=None,
                   help="safetensors file of encoded latents (default <output-dir>/latents.safetensors); "
                        "rebuilt when it does not match the VAE/data flags")
    g.add_argument("--uncond-prob", type=float, default=0.1, help="probability of training on the empty caption")
    add_caption_args(g)
    g.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights; 0 = no EMA")
    g.add_argument("--logit-mean", type=float, default=0.0, help="m of the logit-normal flow-time density")
    g.add_argument("--logit-std", type=float, default=1.0, help="s of the logit-normal flow-time density")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--sample-steps", type=common.positive_int, default=25, help="flow Euler steps for the grids")
    g.add_argument("--sample-guidance", type=float, default=5.0, help="CFG scale for the sample grids")
    g.add_argument("--output", default=None,
                   help="after training, also write the StableDiffusion3Pipeline folder here (see assemble)")
    return p


# --------------------------------------------------------------------------- rectified flow


def logit_normal_times(batch: int, mean: float, std: float, generator: torch.Generator) -> torch.Tensor:
    """Flow times ``t = sigmoid(u)``, ``u ~ N(mean, std^2)`` (Esser et al. 2024, eq. 19); ``(B,)``."""
    return torch.sigmoid(mean + std * torch.randn(batch, generator=generator))


def flow_pair(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """``x_t = (1 - t) x0 + t eps`` and the velocity target ``eps - x0`` (Esser et al. 2024, eq. 1-3)."""
    tt = t.view(-1, 1, 1, 1)
    return (1 - tt) * x0 + tt * noise, noise - x0


# --------------------------------------------------------------------------- components


def text_tower_with_projection(clip_dir: str | Path):
    """The text tower of a trained ``CLIPModel`` as a ``CLIPTextModelWithProjection`` (its ``text_projection``
    gives the pooled embedding SD3 conditions on), float32; a ``CLIPTextModelWithProjection`` folder (what
    :func:`assemble` ships) is loaded as it is."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextModelWithProjection

    folder = common.require_model_folder(clip_dir, "--clip")
    if "CLIPTextModelWithProjection" in (CLIPConfig.get_config_dict(str(folder))[0].get("architectures") or ()):
        tower = CLIPTextModelWithProjection.from_pretrained(str(folder), local_files_only=True)
        return torch.nn.Module.to(tower, torch.float32).eval().requires_grad_(False)
    clip = CLIPModel.from_pretrained(str(folder), local_files_only=True).float()
    config = clip.config.text_config
    config.projection_dim = clip.config.projection_dim
    tower = CLIPTextModelWithProjection(config)
    tower.text_model.load_state_dict(clip.text_model.state_dict())
    tower.text_projection.load_state_dict(clip.text_projection.state_dict())
    return tower.eval().requires_grad_(False)


def encode_captions(tower, ids: torch.Tensor):
    """SD3's conditioning from token ids ``(B, 77)`` with two copies of one tower: ``context (B, 78, 2D)`` (the
    penultimate states side by side, then one zero token standing for the 256 T5 tokens) and ``pooled (B, 2P)``."""
    from ldm.text import sd3_context

    out = tower(ids, output_hidden_states=True)
    hidden = out.hidden_states[-2]  # (B, 77, D)
    return sd3_context([hidden, hidden], 2 * hidden.shape[-1]), torch.cat([out.text_embeds, out.text_embeds], -1)


def transformer_config(preset: dict, vae_config, tower_config, image_size: int) -> dict:
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    latent = image_size // factor
    if image_size % factor or latent % preset["patch_size"]:
        raise ValueError(f"--image-size {image_size}: latents of {latent} are not divisible by the patch size "
                         f"{preset['patch_size']}")
    return {**preset, "sample_size": latent, "in_channels": vae_config.latent_channels,
            "out_channels": vae_config.latent_channels, "joint_attention_dim": 2 * tower_config.hidden_size,
            "pooled_projection_dim": 2 * tower_config.projection_dim}


def build_transformer(config: dict, seed: int, init_folder: str | None = None):
    """The MMDiT, seeded fresh or the float32 weights of ``init_folder`` if its config agrees, with
    :class:`ldm.attention.JointControlledAttnProcessor` installed; returns (model, hook)."""
    from diffusers import SD3Transformer2DModel

    from ldm.attention import install_attention_hook
    from ldm.text import T5_TOKENS

    if init_folder is None:
        model = common.seeded_init(seed, lambda: SD3Transformer2DModel(**config))
    else:
        folder = common.require_model_folder(init_folder, "--init-transformer")
        saved = SD3Transformer2DModel.load_config(str(folder))
        diff = common.config_difference({key: saved.get(key) for key in config}, config)
        if diff:
            raise ValueError(f"--init-transformer {folder} does not match the MMDiT config ({diff})")
        model = torch.nn.Module.to(SD3Transformer2DModel.from_pretrained(str(folder), local_files_only=True),
                                   torch.float32)
    hook = install_attention_hook(model)
    hook.tail_repeats = T5_TOKENS
    return model, hook


# --------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_images(transformer, vae, tower, tokenizer, prompts, generator: torch.Generator, steps: int = 25,
                  guidance: float = 5.0, autocast=None) -> torch.Tensor:
    """Generate one image per prompt with the flow Euler sampler and CFG; ``(N, 3, H, W)`` in [-1, 1]."""
    from contextlib import nullcontext

    from ldm.denoiser import Denoiser
    from ldm.guidance import CFGDenoiser
    from ldm.samplers import randn_like, sample_flow_euler
    from ldm.schedules import FlowSchedule
    from ldm.text import tokenize_batch

    autocast = autocast or nullcontext
    device = next(transformer.parameters()).device
    ids = tokenize_batch(tokenizer, list(prompts) + [""] * len(prompts))[:, 0].to(device)  # (2N, 77)
    with autocast():
        context, pooled = encode_captions(tower, ids)
    cond = {"hidden": context[:len(prompts)].float(), "pooled": pooled[:len(prompts)].float()}
    uncond = {"hidden": context[len(prompts):].float(), "pooled": pooled[len(prompts):].float()}

    def network(x_in, t, c):
        with autocast():
            return transformer(hidden_states=x_in, timestep=t.to(device), encoder_hidden_states=c["hidden"],
                               pooled_projections=c["pooled"]).sample

    schedule = FlowSchedule(shift=FLOW_SHIFT)
    denoiser = Denoiser(network, schedule, "flow")
    model = CFGDenoiser(denoiser, cond, uncond, scale=guidance)
    sigmas = schedule.sigma_list(steps)
    size = transformer.config.sample_size
    shape = torch.empty(len(prompts), transformer.config.in_channels, size, size, device=device)
    x = randn_like(shape, generator) * denoiser.noise_scale(float(sigmas[0]))
    latents = sample_flow_euler(model, x, sigmas)
    with autocast():
        images = vae.decode(latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample
    return images.float().clamp(-1, 1)


# --------------------------------------------------------------------------- the shipped folder


def assemble(final_dir, vae_dir, tokenizer_dir, output, dtype=torch.float16, max_bytes: int | None = 40_000_000,
             verify: bool = True, card: str | None = None) -> dict:
    """Write a diffusers ``StableDiffusion3Pipeline`` folder (transformer, vae, text_encoder and text_encoder_2 =
    links to the same tower, tokenizer and tokenizer_2, flow scheduler; no T5) in ``dtype``; check its size and, with
    ``verify``, that diffusers loads it offline and generates finite pixels. Returns sizes and parameter counts."""
    import shutil

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from ldm.text import load_tokenizer
    from train.default_model import save_text_encoder, save_tokenizer_files

    final_dir = Path(final_dir)
    transformer = SD3Transformer2DModel.from_pretrained(
        str(common.require_model_folder(final_dir / "transformer", "transformer",
                                        ("diffusion_pytorch_model.safetensors",))), local_files_only=True)
    tower = CLIPTextModelWithProjection.from_pretrained(
        str(common.require_model_folder(final_dir / "text_encoder", "text encoder")), local_files_only=True)
    vae = AutoencoderKL.from_pretrained(str(common.require_model_folder(vae_dir, "vae", (
        "diffusion_pytorch_model.safetensors",))), local_files_only=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    if vae.config.shift_factor is None:  # diffusers' SD3 pipeline adds it unconditionally; training used 0
        vae.register_to_config(shift_factor=0.0)
    if transformer.config.joint_attention_dim != 2 * tower.config.hidden_size:
        raise ValueError(f"transformer joint_attention_dim {transformer.config.joint_attention_dim} != twice the "
                         f"text tower's hidden_size {tower.config.hidden_size}")
    output = Path(output)
    tmp = output.with_name(output.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.nn.Module.to(transformer, dtype).save_pretrained(str(tmp / "transformer"), safe_serialization=True)
    torch.nn.Module.to(vae, dtype).save_pretrained(str(tmp / "vae"), safe_serialization=True)
    save_text_encoder(torch.nn.Module.to(tower, dtype), tmp / "text_encoder")
    save_tokenizer_files(tokenizer, tmp / "tokenizer")
    # Both SD3 text slots hold the same tower and tokenizer: the second slots are relative links to the first, so
    # the folder stores them once (diffusers and transformers read through the links; a copy of the folder made
    # with shutil.copytree or cp -rL holds two real copies and loads the same).
    for link, target in (("text_encoder_2", "text_encoder"), ("tokenizer_2", "tokenizer")):
        (tmp / link).symlink_to(target, target_is_directory=True)
    FlowMatchEulerDiscreteScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "_class_name"}
                                    ).save_pretrained(str(tmp / "scheduler"))
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": __import__("diffusers").__version__,
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "text_encoder_3": [None, None], "tokenizer_3": [None, None],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    common.write_json(tmp / "model_index.json", index)
    if card:
        (tmp / "README.md").write_text(card)
    parts = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")  # the stored ones, not the links
    report = {"params": {"transformer": common.count_parameters(transformer), "vae": common.count_parameters(vae),
                         "text_encoder": common.count_parameters(tower)},
              "bytes": {sub: common.folder_size(tmp / sub) for sub in parts}, "total_bytes": common.folder_size(tmp)}
    return common.publish_folder(tmp, output, report, max_bytes, verify_folder if verify else None)


def model_card(run_dir: str | Path) -> str:
    """The shipped folder's README: what it is, how it was trained, the run's metrics."""
    import json

    metrics_file = Path(run_dir) / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    shown = ", ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in sorted(metrics.items()))
    return "\n".join([
        "# shapes-mmdit", "",
        "A tiny SD3-style MMDiT (diffusers SD3Transformer2DModel, 3 joint blocks of width 128, patch 2) trained",
        "from scratch with rectified flow and logit-normal flow times on the procedural shapes world by",
        "`python -m train.train_mmdit` (see train/README.md), on the VAE and CLIP text tower of shapes-unet",
        "(both SD3 text towers are that tower; no T5). Load it with `ldm` or with diffusers'",
        "`StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)`.", "",
        "## Training metrics", "", f"- mmdit: {shown}", ""])


def verify_folder(folder) -> dict:
    """Load the folder offline with diffusers' StableDiffusion3Pipeline (told there is no T5, as for SD3 checkpoints
    used without one) and generate one small image."""
    import numpy as np
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), local_files_only=True, text_encoder_3=None,
                                                    tokenizer_3=None)
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    image = pipe("a red circle at the top left", num_inference_steps=2, guidance_scale=3.0, height=size,
                 width=size, output_type="np", generator=torch.Generator().manual_seed(0)).images
    if not np.isfinite(image).all():
        raise ValueError(f"{folder}: diffusers generated non-finite pixels")
    return {"image_shape": list(image.shape), "scheduler": type(pipe.scheduler).__name__}


# --------------------------------------------------------------------------- main


def run(argv: list[str] | None = None) -> dict:
    """Run the recipe with command-line ``argv``; returns losses, throughput, metrics and the output folder."""
    from diffusers import AutoencoderKL

    from ldm.text import load_tokenizer, token_windows
    from train.shapes import check_image_size

    args = build_parser().parse_args(argv)
    common.check_common_args(args)
    check_probabilities(args)
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not args.logit_std > 0:
        raise ValueError(f"--logit-std must be positive, got {args.logit_std}")
    check_image_size(args.image_size)
    if args.data_seed is None:
        args.data_seed = args.seed
    vae_dir = common.require_model_folder(args.vae, "--vae")
    vae = torch.nn.Module.to(AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True), torch.float32)
    vae.eval().requires_grad_(False)
    tower = text_tower_with_projection(args.clip)
    if not Path(args.tokenizer).is_dir():
        raise FileNotFoundError(f"--tokenizer folder {args.tokenizer} does not exist")
    tokenizer = load_tokenizer(args.tokenizer)
    preset = common.model_config_from_args(args, PRESETS)
    config = transformer_config(preset, vae.config, tower.config, args.image_size)
    out = common.ensure_output_dir(args)
    accelerator = common.make_accelerator(args)
    log = common.RunLog(out, accelerator.is_main_process)
    device = accelerator.device

    cache_file = Path(args.latent_cache or out / "latents.safetensors")
    cache = load_or_build_cache(args, vae, tokenizer, accelerator, cache_file)
    batches = LatentBatches(args, cache, vae.config, token_windows(tokenizer, "")[0], accelerator.process_index,
                            device)
    tower.to(device)
    vae.to(device)

    transformer, _ = build_transformer(config, args.seed, args.init_transformer)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(common.declare_fsdp_units(transformer), optimizer)
    unwrapped = accelerator.unwrap_model(model)
    ema = common.EMA(unwrapped, args.ema_decay)

    def loss_fn(step: int, micro: int) -> torch.Tensor:
        x0, rows, gen = batches.draw(step, micro)  # (B, C, h, w) on the device, (B,)
        t = logit_normal_times(args.batch_size, args.logit_mean, args.logit_std, gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = t.to(device)
        x_t, v = flow_pair(x0, noise.to(device), t)
        ids = batches.token_ids(rows)  # (B, 77)
        with accelerator.autocast():
            with torch.no_grad():
                context, pooled = encode_captions(tower, ids.to(device))
            pred = model(hidden_states=x_t, timestep=1000 * t, encoder_hidden_states=context,
                         pooled_projections=pooled).sample
        return (pred.float() - v).square().mean()

    def sample_fn(step: int) -> None:
        gen = common.torch_generator(args.seed, common.STREAM_SAMPLE)
        images = sample_images(ema.averaged(), vae, tower, tokenizer, SAMPLE_PROMPTS, gen, args.sample_steps,
                               args.sample_guidance, accelerator.autocast)
        if accelerator.is_main_process:
            common.save_grid(images, out / "samples" / f"step-{step:07d}.png", nrow=len(SAMPLE_PROMPTS))

    result = common.train_loop(args=args, accelerator=accelerator, recipe=RECIPE, model_config=config,
                               model=model, optimizer=optimizer, loss_fn=loss_fn,
                               checkpoint_models=ema.checkpoint_models(model),
                               log=log, desc="mmdit", after_step=ema.update, sample_fn=sample_fn)
    if common.stopped_early(accelerator, result, args.steps):
        return result
    metrics = {"steps": args.steps, "params": common.count_parameters(unwrapped), "batch_size": args.batch_size,
               "steps_per_second": result["steps_per_second"], "num_images": len(cache["mean"]),
               "final_loss": result["losses"][-1] if result["losses"] else None}
    final = ema.averaged()  # every process: FSDP gathers
    if accelerator.is_main_process:
        final.save_pretrained(out / "final" / "transformer", safe_serialization=True)
        tower.save_pretrained(out / "final" / "text_encoder", safe_serialization=True)
        common.write_json(out / "final" / "scheduler_config.json", SCHEDULER_CONFIG)
        common.finish_run(accelerator, log, out, "mmdit", metrics, out / "final" / "transformer")
        if args.output:
            report = assemble(out / "final", args.vae, args.tokenizer, args.output, card=model_card(out))
            accelerator.print(f"wrote {args.output}: {report['total_bytes'] / 1e6:.2f} MB")
    accelerator.end_training()
    return {**result, "metrics": metrics, "final_dir": out / "final"}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (``ldm train mmdit`` calls this): runs :func:`run`, returns the exit status 0."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
