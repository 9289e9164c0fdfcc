"""A time-boxed training of the shapes UNet from scratch, for a lent GPU: one command, results in one folder.

A GPU lent to this project comes for one command of at most 10 minutes (15 minutes of device time in all, start
included) on a machine that starts bare, so the run has to fit a fixed time box and leave everything it made in
a folder that comes back. The shipped VAE, text encoder and tokenizer are kept (they are not the limit: the
default-model section of the README); only the denoiser is trained:

1. a probe run of ``--probe-steps`` steps builds the latent cache (renders made by every CPU, ``--render-workers``)
   and measures this machine's training rate;
2. the main run gets as many steps as the time left allows (``--seconds`` in all, less ``--reserve`` for saving
   and evaluating), so its warm-up and cosine decay span the whole box;
3. the EMA UNet is assembled with the shipped components into a model folder (float16, checked against the 40 MB
   budget and loaded by diffusers) and evaluated as ``ldm eval --cfg 3 --seeds 6`` would;
4. ``--output-dir`` receives ``report.json`` (rate, steps, timings, accuracies), the last sample grid and the UNet
   (``unet/``: config and float16 weights in shards below the device tool's 16 MiB file limit).

On a GPU, from the repository root (train/README.md, "On a lent GPU", has the whole device command)::

    python -m train.gpu_session --output-dir $OUT --work-dir /tmp/gs --seconds 480

The defaults train the ``large`` preset (8.75 M parameters) with a third of the captions colourless from the first
step, the two levers the README names for the held-out gap. On a CPU the same command runs at any size (tests use
a tiny one).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from train import common


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.gpu_session", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", required=True, help="where report.json, the sample grid and unet/ go")
    p.add_argument("--work-dir", default=None, help="scratch folder (default: <output-dir>/../gpu-session-work)")
    p.add_argument("--model", default=None, help="folder whose VAE, text encoder and tokenizer are used "
                                                 "(default: the shipped model)")
    p.add_argument("--seconds", type=common.positive_float, default=420.0,
                   help="the whole time box: probe, main run, saving and evaluation")
    p.add_argument("--reserve", type=float, default=60.0,
                   help="seconds kept from training for the main run's setup, saving and the evaluation")
    p.add_argument("--probe-steps", type=common.positive_int, default=50,
                   help="steps of the rate probe (logged every fifth; the rate leaves out the first fifth)")
    p.add_argument("--preset", default="large", help="UNet preset of train.train_denoiser")
    p.add_argument("--batch-size", type=common.positive_int, default=256)
    p.add_argument("--lr", type=common.positive_float, default=5e-4, help="peak; the recipe's own default")
    p.add_argument("--warmup-fraction", type=float, default=0.05, help="share of the main run's steps warming up")
    p.add_argument("--num-images", type=common.positive_int, default=100_000)
    p.add_argument("--caption-variants", type=common.positive_int, default=4)
    p.add_argument("--drop-color-prob", type=float, default=0.35)
    p.add_argument("--render-workers", type=common.non_negative_int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--mixed-precision", default="auto", choices=common.PRECISIONS)
    p.add_argument("--seed", type=common.non_negative_int, default=0)
    p.add_argument("--eval-seeds", type=common.non_negative_int, default=6, help="0 = no evaluation")
    p.add_argument("--image-size", type=common.positive_int, default=128)
    p.add_argument("--max-shard-mb", type=common.positive_float, default=12.0,
                   help="largest weight file written to --output-dir (the device tool returns files <= 16 MiB)")
    return p


def denoiser_args(args: argparse.Namespace, components: Path, output: Path, cache: Path, steps: int,
                  warmup: int, log_every: int = 50) -> list[str]:
    """The command line of one ``train.train_denoiser`` run of this session."""
    return ["--output-dir", str(output), "--vae", str(components / "vae"),
            "--text-encoder", str(components / "text_encoder"), "--tokenizer", str(components / "tokenizer"),
            "--preset", args.preset, "--image-size", str(args.image_size), "--num-images", str(args.num_images),
            "--caption-variants", str(args.caption_variants), "--drop-color-prob", str(args.drop_color_prob),
            "--render-workers", str(args.render_workers), "--latent-cache", str(cache),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--steps", str(steps),
            "--warmup", str(warmup), "--mixed-precision", args.mixed_precision, "--seed", str(args.seed),
            "--checkpoint-every", "0", "--sample-every", "0", "--log-every", str(log_every)]


def steady_rate(log_path: Path) -> float:
    """Steps per second between the first and the last training record of a run's ``log.jsonl``: the first
    steps (allocation, kernel selection) are left out, so the rate is the one a longer run keeps."""
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    steps = [record for record in records if "loss" in record and "step" in record]
    if len(steps) < 2:
        raise ValueError(f"{log_path} has {len(steps)} training records; the probe needs at least 2")
    first, last = steps[0], steps[-1]
    return (last["step"] - first["step"]) / (last["time"] - first["time"])


def planned_steps(rate: float, seconds_left: float) -> int:
    """Optimizer steps that fit ``seconds_left`` at ``rate`` steps per second (at least one)."""
    return max(1, int(rate * seconds_left))


def save_sharded_unet(unet_dir: Path, target: Path, max_shard_mb: float) -> list[str]:
    """The trained UNet as float16 safetensors in shards of at most ``max_shard_mb`` MB (diffusers' sharded
    layout with its index, which ``from_pretrained`` reads); returns the written file names."""
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(unet_dir), local_files_only=True)
    torch.nn.Module.to(unet, torch.float16).save_pretrained(str(target), safe_serialization=True,
                                                          max_shard_size=f"{max_shard_mb}MB")
    return sorted(path.name for path in target.iterdir())


def fresh(folder: Path) -> Path:
    """``folder``, with whatever an earlier session left there removed."""
    if folder.exists():
        shutil.rmtree(folder)
    return folder


def run(argv: list[str] | None = None) -> dict:
    """Probe, train, assemble, evaluate; returns the report also written to ``<output-dir>/report.json``."""
    from pipelines.text_to_image import DEFAULT_MODEL
    from train import train_denoiser
    from train.default_model import assemble

    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.warmup_fraction < 1.0:
        raise ValueError(f"--warmup-fraction must be in [0, 1), got {args.warmup_fraction}")
    if not 0.0 <= args.reserve < args.seconds:
        raise ValueError(f"--reserve must be in [0, --seconds), got {args.reserve}")
    components = Path(args.model) if args.model else DEFAULT_MODEL
    out = Path(args.output_dir)
    work = Path(args.work_dir) if args.work_dir else out.resolve().parent / "gpu-session-work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "latents.safetensors"

    probe_dir = fresh(work / "probe")
    train_denoiser.run(denoiser_args(args, components, probe_dir, cache, args.probe_steps, 0,
                                     log_every=max(1, args.probe_steps // 5)))
    rate = steady_rate(probe_dir / "log.jsonl")
    probe_seconds = time.perf_counter() - started
    steps = planned_steps(rate, args.seconds - probe_seconds - args.reserve)
    print(f"gpu_session: probe {args.probe_steps} steps at {rate:.2f} steps/s after {probe_seconds:.0f} s; "
          f"main run {steps} steps", flush=True)

    main_started = time.perf_counter()
    trained = train_denoiser.run(denoiser_args(args, components, fresh(work / "main"), cache, steps,
                                               int(args.warmup_fraction * steps)))
    train_seconds = time.perf_counter() - main_started
    model = fresh(work / "model")
    sizes = assemble(components / "vae", components / "text_encoder", trained["final_dir"] / "unet", model,
                     tokenizer_dir=components / "tokenizer")
    report = {"probe": {"steps": args.probe_steps, "steps_per_second": rate, "seconds": probe_seconds},
              "main": {"steps": steps, "seconds": train_seconds, "steps_per_second": trained["steps_per_second"],
                       "final_loss": trained["losses"][-1], "metrics": trained["metrics"]},
              "settings": vars(args), "sizes": sizes}
    report["unet files"] = save_sharded_unet(model / "unet", out / "unet", args.max_shard_mb)
    grids = sorted((work / "main" / "samples").glob("*.png"))
    if grids:
        shutil.copy(grids[-1], out / "samples.png")
    if args.eval_seeds:
        report["evaluation"] = evaluate(model, args.eval_seeds)
    report["seconds"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def evaluate(model: Path, seeds: int) -> dict:
    """``ldm eval --cfg 3 --seeds N``'s accuracies (overall / seen / held-out groups) of the assembled model."""
    from pipelines.cli import pick_device
    from pipelines.text_to_image import TextToImagePipeline
    from train.eval_model import evaluate_model

    pipe = TextToImagePipeline.from_pretrained(model, device=pick_device("auto"))
    return evaluate_model(pipe, seeds, progress=False, num_inference_steps=20, guidance_scale=3.0)


def main(argv: list[str] | None = None) -> int:
    report = run(argv)
    evaluation = report.get("evaluation", {}).get("overall", {})
    print(f"gpu_session: {report['main']['steps']} steps in {report['main']['seconds']:.0f} s; single objects "
          f"{100 * evaluation.get('single/all', float('nan')):.1f} %, two objects "
          f"{100 * evaluation.get('two/all', float('nan')):.1f} %; {report['seconds']:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
