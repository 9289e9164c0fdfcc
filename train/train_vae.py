"""Train the KL autoencoder (diffusers ``AutoencoderKL``) on shapes-world renders.

Loss per micro-batch (Rombach et al. 2022, sec. 3 and appendix G, without the GAN and LPIPS terms):
``l1 * |x - D(z)| + mse * (x - D(z))^2`` averaged over pixels, plus ``kl * KL(q(z|x) || N(0, I))`` where the KL is
summed over the latent and divided by the number of pixel values, so ``--kl-weight`` means what SD's 1e-6 means
(their losses are both summed per image). ``z`` is sampled from the posterior with a seeded generator.

The reconstruction loss weighs pixels near objects ``1 + --object-weight`` (``pixel_weights``); training runs on
``--crop-size`` crops placed around an object (``object_crop_offsets``; the preset's mid block has no attention,
so the network is fully convolutional), and the last ``--whole-image-steps`` on whole images, whose GroupNorm
statistics differ from the crops'. Evaluation is always on whole images. After training, the latent scaling
factor is 1 / std of posterior samples over ``--scale-images`` renders (as SD did), stored in the config as
``scaling_factor``; reconstruction PSNR (posterior mode, float32) on held-out renders goes to ``metrics.json``.

    python -m train.train_vae --output-dir runs/vae --steps 1900 --batch-size 16 --crop-size 64
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from train import common

PRESETS: dict[str, dict] = {
    # x8 downsampling to 4 channels: 128x128x3 -> 16x16x4.
    "default": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        # 16 channels at full resolution: flat-coloured shapes need few there, and it makes a training step 3.2x
        # cheaper than [32, 64, 128, 128] (0.95 against 3.05 s at batch 8 on the 2-core AVX2 CPU, fp32).
        "block_out_channels": [16, 32, 64, 128], "layers_per_block": 1, "norm_num_groups": 16,
        # No attention in the mid block: the network is then fully convolutional, so training on crops trains
        # exactly the computation whole images get at inference.
        "mid_block_add_attention": False, "sample_size": 128,
    },
    # x2 downsampling, for tests.
    "tiny": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
        "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 16,
    },
}

RECIPE = "vae"
INFINITE = 2**31 - 1  # dataset length standing for "a fresh render every time"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.train_vae", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p, steps=1900, batch_size=16, lr=1e-3, checkpoint_every=500, sample_every=500,
                           warmup=100)
    g = p.add_argument_group("vae")
    g.add_argument("--preset", default="default", choices=sorted(PRESETS), help="model size")
    g.add_argument("--image-size", type=int, default=128, help="render size")
    g.add_argument("--crop-size", type=int, default=64,
                   help="train on crops of this size around an object (0 = whole images)")
    g.add_argument("--num-images", type=common.non_negative_int, default=0,
                   help="train on the first N renders of --data-seed; 0 = a fresh render for every sample")
    g.add_argument("--data-seed", type=common.non_negative_int, default=None, help="dataset seed (default --seed)")
    g.add_argument("--split", default="train", choices=("train", "heldout", "all"), help="shapes-world split")
    g.add_argument("--l1-weight", type=float, default=1.0)
    g.add_argument("--mse-weight", type=float, default=1.0)
    g.add_argument("--kl-weight", type=float, default=1e-6, help="relative to per-image summed reconstruction")
    g.add_argument("--whole-image-steps", type=common.non_negative_int, default=400,
                   help="the last N steps train on whole images, batch-size x (crop / image-size)^2 of them")
    g.add_argument("--object-weight", type=float, default=10.0,
                   help="extra reconstruction weight on pixels within 2 px of an object (see pixel_weights)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--scale-images", type=common.positive_int, default=512,
                   help="renders used to measure the latent std for scaling_factor")
    g.add_argument("--eval-images", type=common.non_negative_int, default=256,
                   help="held-out renders for the final reconstruction PSNR (0 = skip)")
    return p


class VAEWithPosterior(torch.nn.Module):
    """One forward through encoder and decoder returning ``(reconstruction, mean, logvar)`` (so accelerate's
    wrappers see the whole computation)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None):
        moments = self.vae.encoder(x)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean if noise is None else mean + (0.5 * logvar).exp() * noise.to(mean.dtype)
        return self.vae.decode(z).sample, mean, logvar


def build_vae(config: dict, seed: int):
    from diffusers import AutoencoderKL

    return common.seeded_init(seed, lambda: AutoencoderKL(**config))


def downsample_factor(config: dict) -> int:
    return 2 ** (len(config["block_out_channels"]) - 1)


def check_args(args: argparse.Namespace, config: dict) -> None:
    common.check_common_args(args)
    from train.shapes import check_image_size

    check_image_size(args.image_size)
    factor = downsample_factor(config)
    crop = args.crop_size or args.image_size
    if not 0 < crop <= args.image_size or crop % factor:
        raise ValueError(f"--crop-size must be 0 or a multiple of {factor} in (0, --image-size={args.image_size}], "
                         f"got {args.crop_size}")
    if args.image_size % factor:
        raise ValueError(f"--image-size must be a multiple of the VAE's downsampling factor {factor}")
    if args.data_seed is None:
        args.data_seed = args.seed


def batch_indices(rng, num_images: int, batch: int):
    """Dataset indices of one micro-batch: fresh renders, or draws from the first ``num_images``."""
    if num_images == 0:
        return rng.integers(0, INFINITE, size=batch)
    return rng.choice(num_images, size=batch, replace=num_images < batch)


def load_images(dataset, indices) -> torch.Tensor:
    return torch.stack([dataset[int(i)]["image"] for i in indices])  # (B, 3, H, W)


def object_crop_offsets(rng, scenes, image_size: int, crop: int) -> list[tuple[int, int]]:
    """(top, left) of one ``crop`` x ``crop`` window per scene, placed so that the centre of one of its objects
    (chosen at random) lies in the window's middle half: every crop shows an object, most of the image's
    background is skipped."""
    offsets = []
    for scene in scenes:
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        cx, cy = (c * image_size / scene.image_size for c in obj.center)
        top, left = (int(np.clip(c - crop * rng.uniform(0.25, 0.75), 0, image_size - crop)) for c in (cy, cx))
        offsets.append((top, left))
    return offsets


def pixel_weights(x: torch.Tensor, object_weight: float) -> torch.Tensor:
    """``(B, 1, H, W)`` loss weights ``1 + object_weight`` on pixels within 2 px of one that differs from the
    background, else 1. The background is flat and the corner pixel shows it (objects keep a margin from the
    border, and a crop is rescaled nowhere). Objects cover a few percent of an image: without the weight the
    loss is met by the background long before the objects' colours and outlines are learnt (measured: after
    1500 steps of whole 128^2 images the evaluator read back 7 % of single-object reconstructions)."""
    background = x[:, :, :1, :1]  # (B, 3, 1, 1)
    foreground = ((x - background).abs().amax(1, keepdim=True) > 0.05).float()  # (B, 1, H, W)
    near = torch.nn.functional.max_pool2d(foreground, kernel_size=5, stride=1, padding=2)
    return 1.0 + object_weight * near


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch: int = 32, autocast=None):
    """Posterior means and stds ``(N, C, h, w)`` float32 of images in [-1, 1]."""
    from contextlib import nullcontext

    means, stds = [], []
    device = next(vae.parameters()).device
    for i in range(0, len(images), batch):
        with autocast() if autocast is not None else nullcontext():
            dist = vae.encode(images[i:i + batch].to(device)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 32, autocast=None) -> torch.Tensor:
    from contextlib import nullcontext

    out = []
    device = next(vae.parameters()).device
    for i in range(0, len(images), batch):
        with autocast() if autocast is not None else nullcontext():
            z = vae.encode(images[i:i + batch].to(device)).latent_dist.mode()
            out.append(vae.decode(z).sample.float().cpu())
    return torch.cat(out)


def run(argv: list[str] | None = None) -> dict:
    """Run the recipe with command-line ``argv``; returns losses, throughput, metrics and the output folder."""
    from train.shapes import ShapesDataset

    args = build_parser().parse_args(argv)
    config = common.model_config_from_args(args, PRESETS)
    check_args(args, config)
    out = common.ensure_output_dir(args)
    accelerator = common.make_accelerator(args)
    log = common.RunLog(out, accelerator.is_main_process)

    dataset = ShapesDataset(args.num_images or INFINITE, args.data_seed, args.image_size, args.split)
    eval_dataset = ShapesDataset(max(args.eval_images, 8), args.data_seed + common.EVAL_SEED_OFFSET,
                                 args.image_size, args.split)
    crop = args.crop_size or args.image_size

    vae = build_vae(config, args.seed)
    model = VAEWithPosterior(vae)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(common.declare_fsdp_units(model), optimizer)
    rank = accelerator.process_index

    def loss_fn(step: int, micro: int) -> torch.Tensor:
        rng = common.numpy_rng(args.seed, common.STREAM_DATA, step, micro, rank)
        # GroupNorm normalises over the whole input, so crops (a large object share) and whole images (a few
        # percent) see different statistics: the last steps adapt to whole images, with the same pixels per step.
        size, batch = crop, args.batch_size
        if step >= args.steps - args.whole_image_steps:
            size, batch = args.image_size, max(1, args.batch_size * crop * crop // args.image_size**2)
        items = [dataset[int(i)] for i in batch_indices(rng, args.num_images, batch)]
        offsets = object_crop_offsets(rng, [it["scene"] for it in items], args.image_size, size)
        x = torch.stack([it["image"][:, oy:oy + size, ox:ox + size] for it, (oy, ox) in zip(items, offsets)])
        x = x.to(accelerator.device)  # (B, 3, crop, crop)
        gen = common.torch_generator(args.seed, common.STREAM_NOISE, step, micro, rank)
        factor = downsample_factor(config)
        noise = torch.randn((len(x), config["latent_channels"], size // factor, size // factor), generator=gen)
        with accelerator.autocast():
            rec, mean, logvar = model(x, noise.to(accelerator.device))
        rec, mean, logvar = rec.float(), mean.float(), logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean() / x[0].numel()
        diff = rec - x  # (B, 3, H, W)
        weights = pixel_weights(x, args.object_weight)  # (B, 1, H, W)
        per_pixel = args.l1_weight * diff.abs() + args.mse_weight * diff.pow(2)
        return (weights * per_pixel).mean() / weights.mean() + args.kl_weight * kl

    val_images = load_images(eval_dataset, range(8))

    def sample_fn(step: int) -> None:
        unwrapped = common.full_model(None, accelerator.unwrap_model(model).vae)
        unwrapped.eval()
        rec = reconstruct(unwrapped, val_images, autocast=accelerator.autocast)
        if accelerator.is_main_process:
            common.save_grid(torch.cat([val_images, rec]), out / "samples" / f"step-{step:07d}.png", nrow=8)
        log.write(step=step, val_psnr=float(common.psnr(val_images, rec).mean()))

    result = common.train_loop(args=args, accelerator=accelerator, recipe=RECIPE, model_config=config,
                               model=model, optimizer=optimizer, loss_fn=loss_fn,
                               checkpoint_models={"model": model}, log=log, desc="vae", sample_fn=sample_fn)
    if common.stopped_early(accelerator, result, args.steps):
        return result
    vae = common.full_model(None, accelerator.unwrap_model(model).vae).eval()  # every process: FSDP gathers
    metrics = {"steps": args.steps, "params": common.count_parameters(vae),
               "steps_per_second": result["steps_per_second"], "batch_size": args.batch_size,
               "crop_size": crop}
    if accelerator.is_main_process:
        scale_dataset = ShapesDataset(args.scale_images, args.data_seed, args.image_size, args.split)
        images = load_images(scale_dataset, range(args.scale_images))
        mean, std = encode_images(vae, images, autocast=accelerator.autocast)
        gen = common.torch_generator(args.seed, common.STREAM_EVAL)
        latents = mean + std * torch.randn(mean.shape, generator=gen)
        scaling_factor = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scaling_factor)
        metrics["scaling_factor"] = scaling_factor
        metrics["latent_mean"] = float(latents.mean())
        if args.eval_images:
            held_out = load_images(eval_dataset, range(args.eval_images))
            rec = reconstruct(vae.float(), held_out)  # float32, posterior mode
            metrics["psnr_heldout"] = float(common.psnr(held_out, rec).mean())
            metrics["eval_images"] = args.eval_images
        vae.save_pretrained(out / "final", safe_serialization=True)
        common.finish_run(accelerator, log, out, "vae", metrics, out / "final")
    accelerator.end_training()
    return {**result, "metrics": metrics, "final_dir": out / "final"}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (``ldm train ...`` calls this): runs :func:`run`, returns the exit status 0."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
