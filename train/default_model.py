"""The whole recipe of the shipped default model: VAE, then text encoder, then denoiser, then one folder.

Stages run in order into ``--work-dir`` (``vae/``, ``text/``, ``unet/``, each a normal run folder of its recipe
with checkpoints, samples, ``log.jsonl`` and ``metrics.json``). Every stage is started with ``--resume latest``
and a finished stage (its ``final/`` present with the requested step count) is skipped, so re-running the same
command after an interruption continues where it stopped. Then :func:`assemble` writes a diffusers
``StableDiffusionPipeline`` folder in float16 safetensors to ``--output``: model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/ (DDIM, v-prediction, zero terminal SNR, trailing spacing), checks that
it loads offline with diffusers and ``ldm.text.load_tokenizer`` and that it stays within ``--max-mb``.

    python -m train.default_model --work-dir runs/default --output weights/shapes-unet
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from train import common, train_denoiser, train_text_encoder, train_vae

MAX_BYTES = 40_000_000

# Defaults: ~72 minutes on a 2-core AVX2 CPU in float32 (measured; see train/README.md for the numbers).
FULL = {"vae_steps": 1900, "vae_batch_size": 16, "text_steps": 2000, "text_batch_size": 128,
        "denoiser_steps": 1600, "denoiser_batch_size": 64, "num_images": 8000}

SCHEDULER_CONFIG = {
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
    "steps_offset": 0, "set_alpha_to_one": False, "clip_sample": False,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.default_model", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work-dir", required=True, help="folder for the three stage runs")
    p.add_argument("--output", required=True, help="the diffusers folder to write (replaced if present)")
    p.add_argument("--preset", default="default", choices=("default", "tiny"), help="model sizes of all stages")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--crop-size", type=int, default=64, help="VAE training crop around an object (0 = whole images)")
    p.add_argument("--mixed-precision", choices=common.PRECISIONS, default="auto")
    p.add_argument("--seed", type=common.non_negative_int, default=0)
    p.add_argument("--grad-accum", type=common.positive_int, default=1)
    for name, value in FULL.items():
        p.add_argument("--" + name.replace("_", "-"), type=common.positive_int, default=value)
    train_denoiser.add_caption_args(p)  # --drop-color-prob, --one-object-prob: to the denoiser stage
    p.add_argument("--checkpoint-every", type=common.non_negative_int, default=500)
    p.add_argument("--sample-every", type=common.non_negative_int, default=1000)
    p.add_argument("--max-mb", type=float, default=MAX_BYTES / 1e6, help="size limit of --output in MB (1e6 bytes)")
    p.add_argument("--skip-verify", action="store_true", help="do not load the result with diffusers")
    return p


# --------------------------------------------------------------------------- stages


def _stage_done(run: Path, steps: int) -> bool:
    metrics = run / "metrics.json"
    return (run / "final").is_dir() and metrics.is_file() and json.loads(metrics.read_text()).get("steps") == steps


def _common_flags(args: argparse.Namespace, run: Path, steps: int, batch: int) -> list[str]:
    return ["--output-dir", str(run), "--steps", str(steps), "--batch-size", str(batch),
            "--grad-accum", str(args.grad_accum), "--mixed-precision", args.mixed_precision,
            "--seed", str(args.seed), "--checkpoint-every", str(args.checkpoint_every),
            "--sample-every", str(args.sample_every), "--preset", args.preset, "--resume", "latest"]


def run_stages(args: argparse.Namespace) -> dict[str, Path]:
    work = Path(args.work_dir)
    runs = {"vae": work / "vae", "text": work / "text", "unet": work / "unet"}
    timings = {}
    stages = [
        ("vae", args.vae_steps, train_vae.run, _common_flags(args, runs["vae"], args.vae_steps, args.vae_batch_size)
         + ["--image-size", str(args.image_size), "--crop-size", str(args.crop_size)]),
        ("text", args.text_steps, train_text_encoder.run,
         _common_flags(args, runs["text"], args.text_steps, args.text_batch_size)),
        ("unet", args.denoiser_steps, train_denoiser.run,
         _common_flags(args, runs["unet"], args.denoiser_steps, args.denoiser_batch_size)
         + ["--vae", str(runs["vae"] / "final"), "--text-encoder", str(runs["text"] / "final" / "text_encoder"),
            "--tokenizer", str(runs["text"] / "final" / "tokenizer"), "--image-size", str(args.image_size),
            "--num-images", str(args.num_images), "--drop-color-prob", str(args.drop_color_prob),
            "--one-object-prob", str(args.one_object_prob)]),
    ]
    for name, steps, stage_run, flags in stages:
        if _stage_done(runs[name], steps):
            print(f"[default_model] stage {name}: already finished in {runs[name]}, skipping")
            continue
        print(f"[default_model] stage {name}: {' '.join(flags)}")
        start = time.perf_counter()
        stage_run(flags)
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"[default_model] stage {name} took {timings[name]:.0f} s")
    timings_file = work / "timings.json"
    previous = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    common.write_json(timings_file, {**previous, **timings})
    return runs


# --------------------------------------------------------------------------- assembly


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def save_text_encoder(text_encoder, folder: Path) -> None:
    """Save a CLIPTextModel with the standard key names (``text_model.embeddings...``) that transformers 4 and 5,
    diffusers and the single-file converters all read, whatever layout this transformers version uses."""
    from safetensors.torch import save_file

    text_encoder.save_pretrained(str(folder), safe_serialization=True)
    # Record float32 as the dtype to load with: transformers 5 loads with dtype="auto" (the config's dtype, else
    # the weights'), diffusers loads its models in float32, and StableDiffusionPipeline.from_pretrained(folder)
    # without a dtype then fails on a float16 text encoder feeding a float32 UNet. The weights stay float16.
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = "float32"
    if "torch_dtype" in config:
        config["torch_dtype"] = "float32"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = text_encoder.state_dict()
    prefixed = {(k if k.startswith("text_model.") else "text_model." + k): v.contiguous() for k, v in state.items()}
    for file in folder.glob("*.safetensors"):
        file.unlink()
    save_file(prefixed, str(folder / "model.safetensors"), metadata={"format": "pt"})


def save_tokenizer_files(tokenizer, folder: Path) -> None:
    """The tokenizer as ``vocab.json`` + ``merges.txt`` + configs: loadable by transformers 4 (slow and fast
    CLIPTokenizer) and 5, and 1.5 MB instead of the 3.6 MB ``tokenizer.json`` transformers 5 writes."""
    from ldm.text import clip_vocab_files, load_tokenizer, save_tokenizer

    save_tokenizer(tokenizer, folder)
    vocab, merges = clip_vocab_files()
    standard = load_tokenizer()
    if tokenizer.get_vocab() != standard.get_vocab():
        return  # not the standard CLIP vocabulary: keep what save_tokenizer wrote
    shutil.copy(vocab, folder / "vocab.json")
    shutil.copy(merges, folder / "merges.txt")
    (folder / "tokenizer.json").unlink(missing_ok=True)


def check_compatible(vae, text_encoder, unet) -> None:
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(f"unet in_channels {unet.config.in_channels} != vae latent_channels "
                         f"{vae.config.latent_channels}")
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ValueError(f"unet cross_attention_dim {unet.config.cross_attention_dim} != text encoder hidden_size "
                         f"{text_encoder.config.hidden_size}")


def assemble(vae_dir, text_encoder_dir, unet_dir, output, tokenizer_dir=None, dtype=torch.float16,
             max_bytes: int | None = MAX_BYTES, verify: bool = True, card: str | None = None) -> dict:
    """Write a StableDiffusionPipeline folder from trained components; returns sizes and parameter counts."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ldm.text import load_tokenizer

    vae_dir = common.require_model_folder(vae_dir, "vae")
    text_encoder_dir = common.require_model_folder(text_encoder_dir, "text encoder")
    unet_dir = common.require_model_folder(unet_dir, "unet")
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} does not exist")
    vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(str(text_encoder_dir), local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(str(unet_dir), local_files_only=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_compatible(vae, text_encoder, unet)
    # Round float32 training weights to ``dtype`` (nn.Module.to: diffusers' own .to() warns about nothing here).
    vae, text_encoder, unet = (torch.nn.Module.to(m, dtype) for m in (vae, text_encoder, unet))

    output = Path(output)
    tmp = output.with_name(output.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    # StableDiffusionPipeline's constructor rewrites steps_offset to 1 (a fix for old SD 1.x configs); with
    # trailing spacing it is unused, but we ship the config as trained.
    shutil.rmtree(tmp / "scheduler")
    make_scheduler().save_pretrained(str(tmp / "scheduler"))
    shutil.rmtree(tmp / "text_encoder")
    save_text_encoder(text_encoder, tmp / "text_encoder")
    shutil.rmtree(tmp / "tokenizer")
    save_tokenizer_files(tokenizer, tmp / "tokenizer")
    if card:
        (tmp / "README.md").write_text(card)
    report = {
        "params": {"unet": common.count_parameters(unet), "vae": common.count_parameters(vae),
                   "text_encoder": common.count_parameters(text_encoder)},
        "bytes": {sub: common.folder_size(tmp / sub) for sub in
                  ("unet", "vae", "text_encoder", "tokenizer", "scheduler")},
        "total_bytes": common.folder_size(tmp),
    }
    return common.publish_folder(tmp, output, report, max_bytes, verify_folder if verify else None)


def verify_folder(folder) -> dict:
    """Load the folder offline with diffusers and with ``ldm.text.load_tokenizer``, generate one small image with
    diffusers' DDIM, and check the tokenizer matches the standard CLIP BPE."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from ldm.text import load_tokenizer

    folder = Path(folder)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    tokenizer = load_tokenizer(folder / "tokenizer")
    prompt = "a red circle at the top left on a white background"
    if tokenizer(prompt).input_ids != load_tokenizer()(prompt).input_ids:
        raise ValueError(f"the tokenizer in {folder} does not tokenize like the standard CLIP BPE")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    image = pipe(prompt, num_inference_steps=2, guidance_scale=3.0, height=size, width=size, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    if not np.isfinite(image).all():
        raise ValueError(f"{folder}: diffusers generated non-finite pixels")
    return {"image_shape": list(image.shape), "scheduler": type(pipe.scheduler).__name__}


def model_card(runs: dict[str, Path]) -> str:
    metrics = {name: json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
               for name, run in runs.items()}
    lines = ["# shapes-unet", "",
             "A small latent text-to-image model of the procedural shapes world, trained from scratch by",
             "`python -m train.default_model` (see train/README.md): a KL-VAE (x8, 4 latent channels),",
             "a CLIP text encoder trained contrastively on shapes-world captions, and a UNet trained with",
             "v-prediction on a zero-terminal-SNR schedule. Load it with diffusers' StableDiffusionPipeline or `ldm`.",
             "", "## Training metrics", ""]
    for name, values in metrics.items():
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in values.items()}
        lines.append(f"- {name}: " + ", ".join(f"{k}={v}" for k, v in sorted(shown.items())))
    return "\n".join(lines) + "\n"


def run(argv: list[str] | None = None) -> dict:
    """Run the recipe with command-line ``argv``; returns losses, throughput, metrics and the output folder."""
    args = build_parser().parse_args(argv)
    train_denoiser.check_probabilities(args, ("drop_color_prob", "one_object_prob"))  # before any stage writes anything
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    runs = run_stages(args)
    report = assemble(runs["vae"] / "final", runs["text"] / "final" / "text_encoder", runs["unet"] / "final" / "unet",
                      args.output, tokenizer_dir=runs["text"] / "final" / "tokenizer",
                      max_bytes=int(args.max_mb * 1e6), verify=not args.skip_verify, card=model_card(runs))
    common.write_json(Path(args.work_dir) / "assembly.json", report)
    print(f"[default_model] wrote {args.output}: {report['total_bytes'] / 1e6:.2f} MB; "
          + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in report["bytes"].items()))
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (``ldm train ...`` calls this): runs :func:`run`, returns the exit status 0."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
