"""``ldm train controlnet``: a ControlNet (Zhang et al. 2023) for a loaded UNet model, on shapes-world triples.

The ControlNet is diffusers' ``ControlNetModel.from_unet``: a copy of the UNet's encoder and middle block (their
trained weights), a small convolutional encoder of the control image, and zero-initialised 1x1 output convolutions
("zero convolutions", sec. 3.1), so training starts exactly at the frozen base model. Training pairs are rendered:
``(control image, image, caption)`` with the control made by a :data:`pipelines.controls.CONTROL_TYPES` extractor
(``canny`` edges of the render, or the exact object ``mask``). Captions are replaced by the empty prompt with
probability 0.5, as the paper does (sec. 3.2), so the ControlNet learns to read the control without the text.
Only the ControlNet trains; the loss is the base model's own target (eps, v or x0).

Evaluation (``evaluate_iou``): for held-out scenes, generate with the scene's control and caption and compare the
objects the evaluator finds in the image with the scene's object mask (intersection over union).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from train import common
from train.finetune import encode_images, to_network_units, training_target

RECIPE = "controlnet"


def build_parser() -> argparse.ArgumentParser:
    from pipelines.controls import CONTROL_TYPES

    p = argparse.ArgumentParser(prog="ldm train controlnet", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p, steps=1500, batch_size=32, lr=1e-4, checkpoint_every=250, sample_every=500,
                           warmup=50)
    g = p.add_argument_group("controlnet")
    g.add_argument("--model", default=None, help="base model folder (default: the shipped default model)")
    g.add_argument("--control", default="mask", choices=sorted(CONTROL_TYPES), help="control type")
    g.add_argument("--num-images", type=common.positive_int, default=2000, help="rendered training triples")
    g.add_argument("--data-seed", type=common.non_negative_int, default=None, help="dataset seed (default --seed)")
    g.add_argument("--uncond-prob", type=float, default=0.5, help="probability of the empty caption (paper: 0.5)")
    g.add_argument("--validation-count", type=common.positive_int, default=4, help="held-out scenes in the grids")
    g.add_argument("--validation-steps", type=common.positive_int, default=20)
    g.add_argument("--validation-guidance", type=float, default=7.5)
    return p


def embedding_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Widths of the control-image encoder: one stride-2 stage per VAE halving (SD's (16, 32, 96, 256) for 8x)."""
    stages = int(math.log2(vae_scale_factor))
    return ((16, 32, 96) + (256,) * max(1, stages - 2))[:stages + 1]


def build_controlnet(unet, vae_scale_factor: int, seed: int):
    from diffusers import ControlNetModel

    channels = embedding_channels(vae_scale_factor)
    return common.seeded_init(seed, lambda: ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels))


def render_triples(kind: str, count: int, seed: int, size: int, split: str = "train"):
    """``count`` shapes-world items: images ``(N, 3, S, S)`` in [-1, 1], controls ``(N, 3, S, S)`` uint8,
    captions and scenes."""
    from pipelines.controls import make_control
    from train.shapes import ShapesDataset

    dataset = ShapesDataset(count, seed, size, split)
    images, controls, captions, scenes = [], [], [], []
    for i in range(count):
        item = dataset[i]
        pil = Image.fromarray(((item["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
        controls.append(torch.from_numpy(np.array(make_control(kind, pil, item["scene"]))).permute(2, 0, 1))
        images.append(item["image"])
        captions.append(item["caption"])
        scenes.append(item["scene"])
    return torch.stack(images), torch.stack(controls), captions, scenes


def load_or_build_data(args, pipe, size: int, path: Path) -> dict:
    """Latent mean/std, controls and token ids of the training triples, cached in ``path`` (rebuilt when the
    base model or data settings differ)."""
    from ldm.text import tokenize_batch

    def build() -> dict:
        images, controls, captions, _ = render_triples(args.control, args.num_images, args.data_seed, size)
        mean, std = encode_images(pipe, images)
        return {"mean": mean, "std": std, "control": controls.contiguous(),
                "ids": tokenize_batch(pipe.tokenizer, captions)[:, 0].to(torch.int32).contiguous()}

    meta = {"model": str(pipe.path.resolve()), "control": args.control, "num_images": args.num_images,
            "data_seed": args.data_seed, "size": size, "version": 1}
    return common.cached_tensors(path, meta, build)


@torch.no_grad()
def evaluate_iou(pipe, kind: str, count: int = 16, seed: int = 0, scale: float = 1.0, steps: int = 20,
                 guidance: float = 7.5, progress: bool = False) -> dict:
    """Mean IoU between the scene mask and the evaluator's objects for ``count`` held-out scenes generated with
    their control and caption at ``controlnet_conditioning_scale=scale``; also the fraction with IoU >= 0.8."""
    from train.evaluate import detect_objects
    from train.shapes import render_masks

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    _, controls, captions, scenes = render_triples(kind, count, seed + common.EVAL_SEED_OFFSET, size, "all")
    ious = []
    for k in range(count):
        control = controls[k].permute(1, 2, 0).numpy()
        image = pipe(captions[k], control_image=control, controlnet_conditioning_scale=scale, seed=seed + k,
                     num_inference_steps=steps, guidance_scale=guidance, progress=progress).images[0]
        found = np.zeros((size, size), dtype=bool)
        for obj in detect_objects(image).objects:
            found |= obj.mask
        truth = render_masks(scenes[k]).any(axis=0)
        ious.append(float((found & truth).sum() / max(1, (found | truth).sum())))
    return {"mean_iou": float(np.mean(ious)), "iou>=0.8": float(np.mean([i >= 0.8 for i in ious])), "count": count}


def run(argv: list[str] | None = None) -> dict:
    """Run the recipe with command-line ``argv``; returns losses, metrics and the output folder."""
    from ldm.text import tokenize_batch
    from pipelines.text_to_image import DEFAULT_MODEL, TextToImagePipeline

    args = build_parser().parse_args(argv)
    common.check_common_args(args)
    if not 0.0 <= args.uncond_prob <= 1.0:
        raise ValueError(f"--uncond-prob must be in [0, 1], got {args.uncond_prob}")
    args.data_seed = args.seed if args.data_seed is None else args.data_seed
    pipe = TextToImagePipeline.from_pretrained(Path(args.model) if args.model else DEFAULT_MODEL)
    if pipe.is_flow:
        raise ValueError(f"{pipe.path} is a flow-matching model; this recipe trains ControlNets for UNet models")
    common.check_standard_unet(pipe)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    controlnet = build_controlnet(pipe.unet, pipe.vae_scale_factor, args.seed)
    config = {"base": str(pipe.path.resolve()), "control": args.control,
              "controlnet": {k: v for k, v in dict(controlnet.config).items() if not k.startswith("_")}}
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

    controlnet.train()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=args.lr, weight_decay=1e-2)
    model, optimizer = accelerator.prepare(common.declare_fsdp_units(controlnet), optimizer)
    unet, text_encoder = pipe.unet.to(device), pipe.text_encoder.to(device)
    alpha_bar = pipe.schedule("ddim").alphas_cumprod.to(device)  # (T,)
    empty_ids = tokenize_batch(pipe.tokenizer, [""])[0, 0]  # (77,)

    def loss_fn(step: int, micro: int) -> torch.Tensor:
        rng = common.numpy_rng(args.seed, common.STREAM_DATA, step, micro, accelerator.process_index)
        idx = torch.from_numpy(rng.integers(0, len(data["mean"]), size=args.batch_size))
        ids = data["ids"][idx].long()
        ids[torch.from_numpy(rng.random(args.batch_size) < args.uncond_prob)] = empty_ids
        gen = common.torch_generator(args.seed, common.STREAM_NOISE, step, micro, accelerator.process_index)
        mean, std = data["mean"][idx], data["std"][idx]
        x0 = to_network_units(mean + std * torch.randn(mean.shape, generator=gen), pipe.vae.config)  # (B, C, h, w)
        t = torch.randint(0, len(alpha_bar), (len(x0),), generator=gen).to(device)
        x_t, target = training_target(x0.to(device), torch.randn(x0.shape, generator=gen).to(device),
                                      alpha_bar[t], pipe.prediction_type)
        control = data["control"][idx].to(device).float() / 255.0  # (B, 3, H, W) in [0, 1]
        with accelerator.autocast():
            with torch.no_grad():
                cond = text_encoder(ids.to(device))[0]  # (B, 77, D)
            down, mid = model(x_t, t, encoder_hidden_states=cond, controlnet_cond=control, return_dict=False)
            pred = unet(x_t, t, encoder_hidden_states=cond, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
        return (pred.float() - target).square().mean()

    def sample_fn(step: int) -> None:
        model.eval()
        pipe.controlnet, pipe.controlnet_name = common.full_model(accelerator, model), "training"
        _, controls, captions, _ = render_triples(args.control, args.validation_count,
                                                  args.data_seed + common.EVAL_SEED_OFFSET, size, "all")
        images = pipe(captions, control_image=[c.permute(1, 2, 0).numpy() for c in controls], seed=args.seed,
                      num_inference_steps=args.validation_steps, guidance_scale=args.validation_guidance,
                      output_type="pt", progress=False).images  # (N, 3, H, W) in [0, 1]
        grid = torch.cat([controls.float() / 255.0, images.cpu()]) * 2 - 1
        if accelerator.is_main_process:
            common.save_grid(grid, out / "samples" / f"step-{step:07d}.png", nrow=args.validation_count)
        pipe.controlnet = None

    result = common.train_loop(args=args, accelerator=accelerator, recipe=RECIPE, model_config=config, model=model,
                               optimizer=optimizer, loss_fn=loss_fn, checkpoint_models={"controlnet": model},
                               log=log, desc=RECIPE, sample_fn=sample_fn)
    if common.stopped_early(accelerator, result, args.steps):
        return result
    final = out / "final" / "controlnet"
    metrics = {"steps": args.steps, "control": args.control, "params": common.count_parameters(model),
               "num_images": args.num_images, "steps_per_second": result["steps_per_second"],
               "final_loss": result["losses"][-1] if result["losses"] else None}
    trained = common.full_model(accelerator, model)  # every process: FSDP gathers
    if accelerator.is_main_process:
        trained.save_pretrained(final, safe_serialization=True)
        common.finish_run(accelerator, log, out, RECIPE, metrics, final)
    accelerator.end_training()
    return {**result, "metrics": metrics, "final_dir": final}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (``ldm train controlnet`` calls this)."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
