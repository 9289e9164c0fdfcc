"""``ldm train inpainting``: a 9-channel inpainting UNet, as SD-inpainting, from a text-to-image UNet model.

The UNet's input gains the mask and the masked image's latents (``in_channels`` 4 + 1 + 4, in the order diffusers'
``StableDiffusionInpaintPipeline`` and ``pipe.inpaint`` concatenate them). The new input channels of ``conv_in``
start at zero, so training starts exactly at the base model (tested), the way Stable Diffusion's inpainting model
was initialised from its text-to-image weights (Rombach et al. 2022, sec. 4.5 and the SD 1.5 inpainting model
card). Training pairs are shapes-world renders with masks drawn per image (:data:`MASK_KINDS`): an object's
bounding box grown by 4-12 px (what a user paints; the editing table's box mask grows it 8 px), its silhouette
dilated 2-6 px, a random rectangle, or the whole image (text-to-image; SD-inpainting masked everything 25 % of
the time). The masked image is the render with masked pixels set to 0 (mid-grey in [-1, 1]), encoded by the
frozen VAE to its posterior mean, and the mask reaches latent size by nearest-neighbour sampling: both as the
pipeline prepares them at inference. Every UNet weight trains on the base model's own target (eps, v or x0), with
an EMA; captions are dropped with probability ``--uncond-prob`` for classifier-free guidance.

    python -m train.train_inpainting --output-dir runs/inpainting            # on the shipped default model
    ldm eval --task editing --tables inpaint --model runs/inpainting/final/model
"""
from __future__ import annotations

import argparse
import copy
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from train import common
from train.finetune import encode_images, to_network_units, training_target

RECIPE = "inpainting"
MASK_KINDS: dict[str, float] = {"box": 0.45, "object": 0.15, "rectangle": 0.2, "full": 0.2}
"""Mask kind -> probability."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm train inpainting", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p, steps=4000, batch_size=64, lr=1e-4, checkpoint_every=250, sample_every=1000,
                           warmup=100)
    g = p.add_argument_group("inpainting")
    g.add_argument("--model", default=None, help="base text-to-image model folder (default: the shipped model)")
    g.add_argument("--num-images", type=common.positive_int, default=4000, help="rendered training images")
    g.add_argument("--masks-per-image", type=common.positive_int, default=2, help="masks drawn (and encoded) per image")
    g.add_argument("--data-seed", type=common.non_negative_int, default=None, help="dataset seed (default --seed)")
    g.add_argument("--uncond-prob", type=float, default=0.1, help="probability of the empty caption")
    g.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights; 0 = no EMA")
    common.add_loss_weighting_args(g, "min_snr", "per-timestep weight of the loss (see common.loss_weights)")
    g.add_argument("--validation-count", type=common.positive_int, default=4, help="renders repainted in the grids")
    g.add_argument("--validation-steps", type=common.positive_int, default=20)
    g.add_argument("--validation-guidance", type=float, default=7.5)
    return p


def inpainting_unet(unet, extra_channels: int):
    """A copy of ``unet`` whose ``conv_in`` takes ``extra_channels`` more input channels, with zero weights: its
    prediction ignores them, so it equals the base UNet's until trained."""
    from diffusers import UNet2DConditionModel

    config = {**unet.config, "in_channels": unet.config.in_channels + extra_channels}
    wide = UNet2DConditionModel.from_config(config)
    state = {k: v.float() for k, v in unet.state_dict().items()}
    weight = state["conv_in.weight"]  # (C_out, C_in, 3, 3)
    state["conv_in.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], extra_channels,
                                                                  *weight.shape[2:])], dim=1)
    wide.load_state_dict(state)
    return torch.nn.Module.to(wide, torch.float32)


def trainable_unet(pipe):
    """The UNet this recipe trains, in float32: a text-to-image base widened by :func:`inpainting_unet`, or a copy of
    the UNet of a base that is already an inpainting model (9 channels, as SD-inpainting), fine-tuned further as it
    is, as diffusers' inpainting fine-tunes start from SD-inpainting."""
    if pipe.is_inpainting_unet:
        return copy.deepcopy(pipe.unet).float().requires_grad_(True)
    return inpainting_unet(pipe.unet, 1 + pipe.vae.config.latent_channels)


def draw_mask(rng: np.random.Generator, scene, size: int) -> np.ndarray:
    """One training mask ``(S, S)`` bool (True = repaint) of a random :data:`MASK_KINDS` kind for ``scene``."""
    from train.eval_editing import inpaint_mask
    from train.shapes import render_masks

    kind = rng.choice(list(MASK_KINDS), p=list(MASK_KINDS.values()))
    if kind == "full":
        return np.ones((size, size), dtype=bool)
    if kind == "rectangle":
        height, width = (rng.uniform(0.2, 0.8, size=2) * size).astype(int)
        top, left = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
        mask = np.zeros((size, size), dtype=bool)
        mask[top:top + height, left:left + width] = True
        return mask
    objects = render_masks(scene, size)
    margin = int(rng.integers(2, 7)) if kind == "object" else int(rng.integers(4, 13))
    return inpaint_mask(objects[rng.integers(len(objects))], str(kind), margin)


def render_masked(count: int, seed: int, size: int, masks_per_image: int):
    """``count`` training renders ``(N, 3, S, S)`` in [-1, 1], their masks ``(N, M, S, S)`` bool and captions."""
    from train.shapes import ShapesDataset

    dataset = ShapesDataset(count, seed, size, "train")
    images, masks, captions = [], [], []
    for i in range(count):
        item = dataset[i]
        rng = np.random.default_rng([seed, common.STREAM_DATA, i])
        images.append(item["image"])
        masks.append(np.stack([draw_mask(rng, item["scene"], size) for _ in range(masks_per_image)]))
        captions.append(item["caption"])
    return torch.stack(images), torch.from_numpy(np.stack(masks)), captions


def masked_inputs(pipe, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's extra inputs for each (image, mask), as ``pipe.inpaint`` makes them: the latent-size mask
    ``(N, M, 1, h, w)`` (nearest) and the masked image's latents ``(N, M, C, h, w)`` (posterior mean, network
    units)."""
    count, per_image, size = masks.shape[0], masks.shape[1], masks.shape[-1]
    flat = masks.reshape(count * per_image, 1, size, size).float()  # (N M, 1, S, S)
    masked = images.repeat_interleave(per_image, dim=0) * (flat < 0.5)
    mean, _ = encode_images(pipe, masked)
    latent_mask = F.interpolate(flat, size=mean.shape[2:])  # nearest, as the pipeline
    latents = to_network_units(mean, pipe.vae.config)
    return (latent_mask.reshape(count, per_image, *latent_mask.shape[1:]),
            latents.reshape(count, per_image, *latents.shape[1:]))


def load_or_build_data(args, pipe, size: int, path: Path) -> dict:
    """Latent posteriors, extra inputs and token ids of the training renders, cached in ``path`` (rebuilt when the
    base model or data settings differ)."""
    from tqdm.auto import tqdm

    from ldm.text import tokenize_batch

    @torch.no_grad()
    def build() -> dict:
        images, masks, captions = render_masked(args.num_images, args.data_seed, size, args.masks_per_image)
        parts = {"mean": [], "std": [], "mask": [], "masked": []}
        for start in tqdm(range(0, len(images), 64), desc="encoding renders", dynamic_ncols=True):
            chunk = slice(start, start + 64)
            mean, std = encode_images(pipe, images[chunk])
            mask, masked = masked_inputs(pipe, images[chunk], masks[chunk])
            for key, value in zip(parts, (mean, std, mask, masked)):
                parts[key].append(value)
        data = {key: torch.cat(value).contiguous() for key, value in parts.items()}
        return data | {"ids": tokenize_batch(pipe.tokenizer, captions)[:, 0].to(torch.int32).contiguous()}

    meta = {"model": str(pipe.path.resolve()), "num_images": args.num_images, "masks_per_image": args.masks_per_image,
            "data_seed": args.data_seed, "size": size, "version": 1}
    return common.cached_tensors(path, meta, build)


def validation_grid(components, unet, count: int, seed: int, steps: int, guidance: float) -> torch.Tensor:
    """Inputs, masks and repaintings ``(3 count, 3, S, S)`` in [-1, 1]: held-out single-object renders with their
    object's box (+8 px) repainted as another colour and shape, as the editing table does; ``components`` are the
    base model's (``ldm.loading.Components``), with ``unet`` in place of its UNet."""
    from PIL import Image

    from pipelines.text_to_image import TextToImagePipeline
    from train.eval_editing import inpaint_mask, single_object_scenes, swapped
    from train.shapes import render, render_masks

    trial = TextToImagePipeline(replace(components, unet=unet), name="training")
    size = unet.config.sample_size * trial.vae_scale_factor
    rows = [[], [], []]
    for k, (scene, caption) in enumerate(single_object_scenes(count, seed, size)):
        target = swapped(swapped(caption, "color")[0], "shape")[0]
        mask = inpaint_mask(render_masks(scene)[0], "box")
        image = render(scene)
        out = trial.inpaint(image, Image.fromarray(mask.astype(np.uint8) * 255), target, seed=k,
                            num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                            progress=False).images[0]  # (3, S, S)
        rows[0].append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1))
        rows[1].append(torch.from_numpy(mask).float().expand(3, -1, -1))
        rows[2].append(out.cpu())
    return torch.stack(rows[0] + rows[1] + rows[2]) * 2 - 1


def save_model_folder(base: Path, unet, folder: Path) -> None:
    """The base model folder with ``unet`` in place of its UNet: a diffusers folder ``pipe.inpaint`` (and
    diffusers' ``StableDiffusionInpaintPipeline``) load as an inpainting model."""
    partial = folder.with_name(f".partial-{folder.name}")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(base, partial, ignore=shutil.ignore_patterns("unet", "README.md"))
    unet.save_pretrained(partial / "unet", safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)


def run(argv: list[str] | None = None) -> dict:
    """Run the recipe with command-line ``argv``; returns losses, metrics and the output folder."""
    from ldm.loading import load_components
    from pipelines.text_to_image import DEFAULT_MODEL, TextToImagePipeline
    from train.train_denoiser import CachedTextStates

    args = build_parser().parse_args(argv)
    common.check_common_args(args)
    common.check_loss_weighting(args)
    if not 0.0 <= args.uncond_prob <= 1.0:
        raise ValueError(f"--uncond-prob must be in [0, 1], got {args.uncond_prob}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    args.data_seed = args.seed if args.data_seed is None else args.data_seed
    base = Path(args.model) if args.model else DEFAULT_MODEL
    components = load_components(base)
    pipe = TextToImagePipeline(components)
    if pipe.is_flow or pipe.is_mmdit or pipe.is_sdxl:
        raise ValueError(f"{pipe.path} is not a single-tower UNet model; this recipe trains SD 1.x/2.x-style UNets")
    common.check_standard_unet(pipe)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    unet = trainable_unet(pipe)
    config = {"base": str(pipe.path.resolve()),
              "unet": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}}
    common.check_resumable(args, RECIPE, config)
    out = common.ensure_output_dir(args)
    accelerator = common.make_accelerator(args)
    log = common.RunLog(out, accelerator.is_main_process)
    cache = out / "data.safetensors"
    data = load_or_build_data(args, pipe, size, cache) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()  # one process renders and encodes, the others read its cache
    if data is None:
        data = load_or_build_data(args, pipe, size, cache)
    device = accelerator.device

    from ldm.text import tokenize_batch

    empty_ids = tokenize_batch(pipe.tokenizer, [""])[0]  # (1, 77)
    caption_ids = torch.cat([data["ids"].long(), empty_ids])  # (N + 1, 77): the empty caption last
    text_encoder = pipe.text_encoder.to(device)
    states = CachedTextStates(text_encoder, caption_ids, accelerator.autocast)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-2)
    model, optimizer = accelerator.prepare(common.declare_fsdp_units(unet), optimizer)
    ema = common.EMA(accelerator.unwrap_model(model), args.ema_decay)
    alpha_bar = pipe.schedule("ddim").alphas_cumprod.to(device)  # (T,)

    def loss_fn(step: int, micro: int) -> torch.Tensor:
        rng = common.numpy_rng(args.seed, common.STREAM_DATA, step, micro, accelerator.process_index)
        idx = torch.from_numpy(rng.integers(0, len(data["mean"]), size=args.batch_size))
        which = torch.from_numpy(rng.integers(0, args.masks_per_image, size=args.batch_size))
        drop = torch.from_numpy(rng.random(args.batch_size) < args.uncond_prob)
        rows = torch.where(drop, len(caption_ids) - 1, idx)  # (B,)
        gen = common.torch_generator(args.seed, common.STREAM_NOISE, step, micro, accelerator.process_index)
        mean, std = data["mean"][idx], data["std"][idx]
        x0 = to_network_units(mean + std * torch.randn(mean.shape, generator=gen), pipe.vae.config)  # (B, C, h, w)
        t = torch.randint(0, len(alpha_bar), (len(x0),), generator=gen).to(device)
        x_t, target = training_target(x0.to(device), torch.randn(x0.shape, generator=gen).to(device),
                                      alpha_bar[t], pipe.prediction_type)
        extra = torch.cat([data["mask"][idx, which], data["masked"][idx, which]], dim=1).to(device)  # (B, 1 + C, h, w)
        with accelerator.autocast():
            pred = model(torch.cat([x_t, extra], dim=1), t, encoder_hidden_states=states(rows)).sample
        per_sample = (pred.float() - target).square().mean(dim=(1, 2, 3))  # (B,)
        return (per_sample * common.loss_weights(alpha_bar[t], args.loss_weighting, args.min_snr_gamma)).mean()

    def sample_fn(step: int) -> None:
        grid = validation_grid(components, ema.averaged().to(device), args.validation_count,
                               args.data_seed + common.EVAL_SEED_OFFSET, args.validation_steps,
                               args.validation_guidance)
        if accelerator.is_main_process:
            common.save_grid(grid, out / "samples" / f"step-{step:07d}.png", nrow=args.validation_count)

    result = common.train_loop(args=args, accelerator=accelerator, recipe=RECIPE, model_config=config, model=model,
                               optimizer=optimizer, loss_fn=loss_fn, checkpoint_models=ema.checkpoint_models(model),
                               log=log, desc=RECIPE, after_step=ema.update, sample_fn=sample_fn)
    if common.stopped_early(accelerator, result, args.steps):
        return result
    final = out / "final" / "model"
    metrics = {"steps": args.steps, "params": common.count_parameters(model), "num_images": args.num_images,
               "masks_per_image": args.masks_per_image, "steps_per_second": result["steps_per_second"],
               "final_loss": result["losses"][-1] if result["losses"] else None}
    trained = ema.averaged()  # every process: FSDP gathers
    if accelerator.is_main_process:
        save_model_folder(pipe.path, trained, final)
        common.finish_run(accelerator, log, out, RECIPE, metrics, final)
    accelerator.end_training()
    return {**result, "metrics": metrics, "final_dir": final}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (``ldm train inpainting`` calls this)."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
