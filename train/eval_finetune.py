"""The fine-tuning issue's DreamBooth table: a subject the base model never saw, learnt from 4 renders.

The subject is a purple ring (the renderer draws rings; the base vocabulary has none, so the base model never
saw one). DreamBooth (``train/finetune.py``) binds it to "sks" with full fine-tuning or LoRA, with or without
prior preservation. For each variant we report:

* placement: "a sks shape at <position> [on a <background> background]" over several seeds; the evaluator
  (all shapes, rings included) must find the subject — a purple ring — at the asked position (and the asked
  background);
* language drift: the base model's own single-object accuracy on the evaluation prompts, before and after;
* training time and the size of what was saved.

Two choices beyond the paper's recipe can be measured: ``--instance-captions described`` captions each subject
render with where it is ("a sks shape at the top left on a white background", kohya-style per-image captions)
instead of the bare "a sks shape"; ``--class-prompts captions`` makes the prior's class images from random
training captions of the shapes world (the model's own drawings of them; ``--class-images``, default 50, of them)
instead of the single class prompt "a shape".

A two-tone heart, the issue's other example, cannot serve: the shipped VAE, trained on flat colours, paints both
halves of it one colour, so no denoiser on its latents can draw the mark (the lighter right half was read on 3 of
the 4 subject renders and on none of their round trips; fine-tuned models drew plain red hearts).
``subject_survives_vae`` checks the ring: 4 of 4 round trips are still read as a purple ring at the same place.

Run: ``python -m train.eval_finetune --work-dir runs/dreambooth [--model weights/shapes-unet]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from train.finetune import CAPTION_DROPOUT_ON, EMBEDDING_FILE, PRIOR_TARGETS, UNET_PARAMS, run
from train.evaluate import BASE_SHAPES, aggregate_scores, detect_objects, parse_prompt, score
from train.shapes import EXTRA_SHAPES, Scene, caption, make_object, render, sample_scene

SUBJECT_COLOR, SUBJECT_SHAPE = "purple", "ring"
SUBJECT_POSITIONS = ("top left", "center", "bottom right", "top right")
SUBJECT_BACKGROUNDS = ("white", "gray", "black", "white")
PLACEMENT_PROMPTS = (("top left", None), ("bottom right", None), ("top right", "black"), ("bottom left", "gray"),
                     ("center", "white"), ("top", None), ("left", "black"), ("bottom", None))
VARIANTS = (("full", 1.0), ("full", 0.0), ("lora", 1.0), ("lora", 0.0))
EMBEDDING_WORD = "<sks>"  # textual inversion's new word (variant "embedding:0")


def subject_images(size: int = 128) -> list:
    """Four renders of the subject at different places and backgrounds."""
    return [render(Scene(background, (make_object(SUBJECT_COLOR, SUBJECT_SHAPE, position, "large", size),),
                         image_size=size))
            for position, background in zip(SUBJECT_POSITIONS, SUBJECT_BACKGROUNDS)]


def write_subject(folder: Path, size: int = 128, captions: str = "prompt", word: str = "sks") -> Path:
    """The subject renders as ``subject-<k>.png``; ``captions="prompt"``: none (they share the instance prompt),
    ``"described"``: a ``metadata.jsonl`` saying where each one is and on what background (naming the subject
    ``word``)."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for k, (image, position, background) in enumerate(zip(subject_images(size), SUBJECT_POSITIONS,
                                                          SUBJECT_BACKGROUNDS)):
        image.save(folder / f"subject-{k}.png")
        records.append({"file_name": f"subject-{k}.png", "text": placement_prompt(position, background, word)})
    if captions == "described":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def class_prompts(kind: str, count: int = 50, seed: int = 5) -> list[str]:
    """The prior's class prompts: ``"shape"``: the paper's single class prompt; ``"captions"``: ``count`` random
    captions of training scenes (the held-out combinations excluded, as in training)."""
    if kind == "shape":
        return ["a shape"]
    rng = np.random.default_rng([seed, 91])
    return [caption(sample_scene(rng, "train"), rng) for _ in range(count)]


def is_subject(found) -> bool:
    """The evaluator's largest object is the subject (its shape and colour)."""
    obj = found.objects[0] if found.objects else None
    return obj is not None and obj.shape == SUBJECT_SHAPE and obj.color == SUBJECT_COLOR


def subject_survives_vae(pipe, images) -> float:
    """Fraction of ``images`` whose VAE round trip (posterior mean) the evaluator still reads as the subject at
    the same place: the ceiling on what any denoiser on these latents can learn to draw."""
    import torch

    from pipelines.images import image_tensor

    pixels = torch.cat([image_tensor(image, pipe.vae_scale_factor) for image in images])  # (N, 3, H, W)
    decoded = pipe.to_pil(pipe.decode(pipe.encode(pixels)))  # encode / decode run without gradients
    kept = []
    for image, back in zip(images, decoded):
        before, after = (detect_objects(x, BASE_SHAPES + EXTRA_SHAPES) for x in (image, back))
        kept.append(is_subject(before) and is_subject(after)
                    and after.objects[0].position == before.objects[0].position)
    return float(np.mean(kept))


def placement_prompt(position: str, background: str | None, word: str = "sks") -> str:
    where = "in the center" if position == "center" else f"at the {position}"
    return f"a {word} shape {where}" + (f" on a {background} background" if background else "")


def placement(pipe, seeds: int = 4, steps: int = 20, guidance: float = 7.5, word: str = "sks") -> dict:
    """Fractions of generations where the evaluator finds the subject at the asked position (and background),
    finds the subject anywhere, and finds any ring."""
    hits, subjects, rings = [], [], []
    for position, background in PLACEMENT_PROMPTS:
        images = pipe([placement_prompt(position, background, word)] * seeds, seed=0, num_inference_steps=steps,
                      guidance_scale=guidance, progress=False).images
        for image in images:
            found = detect_objects(image, BASE_SHAPES + EXTRA_SHAPES)
            subject = is_subject(found)
            rings.append(bool(found.objects) and found.objects[0].shape == SUBJECT_SHAPE)
            subjects.append(subject)
            hits.append(subject and found.objects[0].position == position and background in (None, found.background))
    return {"placement": float(np.mean(hits)), "subject": float(np.mean(subjects)), "ring": float(np.mean(rings)),
            "count": len(hits)}


def base_accuracy(pipe, seeds: int = 2, guidance: tuple[float, ...] = (7.5,)) -> dict:
    """The base model's own single-object accuracy on the evaluation prompts (seen and held-out): all attributes
    right ("base accuracy", the drift measure), and shape, colour and position alone (where drift shows), at each
    CFG scale in ``guidance`` (the keys of scales after the first end in " @cfg<scale>"). "base hits<suffix>" lists
    each image's "all" in generation order (fixed prompts and seeds), for ``paired_drift``."""
    from train.eval_model import generate_evaluation_set

    row = {}
    for k, scale in enumerate(guidance):
        pairs = generate_evaluation_set(pipe, seeds, progress=False, num_inference_steps=20, guidance_scale=scale)
        items = [(expected, score(expected, image)) for expected, image in
                 ((parse_prompt(prompt), image) for prompt, image in pairs) if len(expected.objects) == 1]
        result = aggregate_scores(items)
        suffix = "" if k == 0 else f" @cfg{scale:g}"
        row |= {f"base accuracy{suffix}": float(result["single/all"]),
                f"base shape{suffix}": float(result["single/shape"]),
                f"base colour{suffix}": float(result["single/color"]),
                f"base position{suffix}": float(result["single/position"]),
                f"base hits{suffix}": [int(scores["all"]) for _, scores in items]}
    return row


def paired_drift(row: dict, base_row: dict) -> dict:
    """Drift of each "base hits<suffix>" of a fine-tuned model's row from the base model's on the same prompts and
    seeds: the mean per-image difference and its standard error (sample sd / sqrt(n)), which is smaller than the
    two accuracies' own errors because both models meet the same noise."""
    drift = {}
    for key in [k for k in row if k.startswith("base hits")]:
        difference = np.asarray(row[key], float) - np.asarray(base_row[key], float)  # (n,)
        suffix = key[len("base hits"):]
        drift[f"drift{suffix}"] = float(difference.mean())
        drift[f"drift se{suffix}"] = float(difference.std(ddof=1) / np.sqrt(len(difference)))
    return drift


def without_hits(row: dict) -> dict:
    """A row without its per-image hit lists, for printing."""
    return {key: value for key, value in row.items() if not key.startswith("base hits")}


def cached_base_row(work: Path, key: dict, compute) -> dict:
    """The base model's row, computed once per work dir and settings ``key`` (generation is deterministic in the
    seeds, so repeats of a variant share it) and kept in ``work/base-row.json``."""
    path = work / "base-row.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["key"] == key:
            return cached["row"]
    row = compute()
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "row": row}))
    return row


def load_variant(base: Path, saved: Path, method: str, device=None):
    """The fine-tuned model: a full fine-tune's folder, or the base with the saved embedding or LoRA (and the
    embedding a pivotal LoRA run copied beside it)."""
    from pipelines.text_to_image import TextToImagePipeline

    if method == "full":
        return TextToImagePipeline.from_pretrained(saved, device=device)
    pipe = TextToImagePipeline.from_pretrained(base, device=device)
    if method == "embedding":
        pipe.load_textual_inversion(saved)
        return pipe
    if (saved.parent / EMBEDDING_FILE).is_file():
        pipe.load_textual_inversion(saved.parent / EMBEDDING_FILE)
    pipe.load_lora(saved)
    return pipe


def fine_tune_args(args, base: Path, method: str, prior: str, work: Path, prompts: list[str], out: Path,
                   train_seed: int | None) -> tuple[list[str], str]:
    """The fine-tuning command line of one variant and its recipe: DreamBooth (``full`` / ``lora``) binds the
    subject to "sks"; textual inversion (``embedding``; the prior weight is unused) learns the new word
    :data:`EMBEDDING_WORD`, leaving the model as it was."""
    word = EMBEDDING_WORD if method == "embedding" or args.pivot else "sks"
    folder = f"subject-{args.instance_captions}" + ("-embedding" if word == EMBEDDING_WORD else "")
    subject = write_subject(work / folder, captions=args.instance_captions, word=word)
    shared = ["--model", str(base), "--instance-data", str(subject), "--instance-prompt", f"a {word} shape",
              "--steps", str(args.steps), "--output-dir", str(out), "--sample-every", "0",
              "--batch-size", args.batch_size, "--loss-weighting", args.loss_weighting,
              "--min-snr-gamma", str(args.min_snr_gamma), *(["--seed", str(train_seed)] if train_seed is not None
                                                             else [])]
    if method == "embedding":
        return shared + ["--identifier", word, "--initializer-token", args.initializer_token,
                         "--num-vectors", args.num_vectors, "--lr", args.lr_embedding], "textual_inversion"
    return shared + ["--class-prompt", *prompts, "--prior-loss-weight", prior, "--method", method,
                     "--num-class-images", str(args.class_images),
                     "--caption-dropout", args.caption_dropout, "--caption-dropout-on", args.caption_dropout_on,
                     "--prior-target", args.prior_target,
                     *(["--ema-decay", args.ema_decay, "--unet-params", args.unet_params] if method == "full"
                       else []),
                     *(["--class-batch-size", args.class_batch_size] if args.class_batch_size else []),
                     "--lr", args.lr_full if method == "full" else args.lr_lora, "--rank", args.rank,
                     "--class-data-dir", str(work / f"class_images-{args.class_prompts}"),
                     *(["--embedding", args.pivot, "--identifier", word] if args.pivot else [])], "dreambooth"


def build_parser() -> argparse.ArgumentParser:
    from train.common import add_loss_weighting_args

    parser = argparse.ArgumentParser(prog="python -m train.eval_finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--model", default=None, help="base model (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--lr-full", default="3e-4", help="full fine-tune learning rate (this UNet is ~300x "
                        "smaller than SD's, whose DreamBooth default is 5e-6)")
    parser.add_argument("--lr-lora", default="1e-3", help="LoRA learning rate")
    parser.add_argument("--rank", default="8")
    parser.add_argument("--lr-embedding", default="5e-3", help="textual inversion's learning rate")
    parser.add_argument("--initializer-token", default="circle", help="textual inversion's starting word")
    parser.add_argument("--num-vectors", default="4", help="textual inversion's vectors")
    parser.add_argument("--pivot", default=None,
                        help=f"pivotal tuning: DreamBooth variants start from this textual-inversion file of the "
                             f"word {EMBEDDING_WORD} (an embedding variant's learned_embeds.safetensors)")
    parser.add_argument("--batch-size", default="1", help="subject images per step (as many class images join them)")
    add_loss_weighting_args(parser, "uniform", "per-timestep loss weight of the fine-tune (min_snr: as the shipped "
                            "UNet was trained)")
    parser.add_argument("--caption-dropout", default="0", help="probability of the empty caption per training example")
    parser.add_argument("--caption-dropout-on", default="all", choices=CAPTION_DROPOUT_ON)
    parser.add_argument("--class-batch-size", default=None, help="class examples per step (default: --batch-size)")
    parser.add_argument("--ema-decay", default="0", help="EMA of the full fine-tune's UNet (0 = none)")
    parser.add_argument("--unet-params", default="all", choices=UNET_PARAMS,
                        help="which UNet weights the full fine-tunes train (cross_attention_kv: Custom Diffusion)")
    parser.add_argument("--prior-target", default="images", choices=PRIOR_TARGETS,
                        help="class examples trained towards their image (eq. 2) or the frozen base's prediction")
    parser.add_argument("--drift-guidance", type=float, nargs="+", default=[7.5],
                        help="CFG scales of the drift measure (the first is the table's)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per placement prompt")
    parser.add_argument("--drift-seeds", type=int, default=2, help="seeds per evaluation prompt for the drift")
    parser.add_argument("--train-seed", type=int, nargs="+", default=[None],
                        help="seeds of the fine-tunes (default: the recipe's); several repeat every variant "
                             "independently")
    parser.add_argument("--variants", nargs="+", default=[f"{m}:{p}" for m, p in VARIANTS],
                        help="METHOD:PRIOR_WEIGHT, e.g. full:1 lora:0 embedding:0 (textual inversion)")
    parser.add_argument("--instance-captions", default="prompt", choices=("prompt", "described"),
                        help="subject renders trained with the bare instance prompt, or captioned with their "
                             "position and background")
    parser.add_argument("--class-prompts", default="shape", choices=("shape", "captions"),
                        help='prior class images from "a shape", or from 50 random training captions')
    parser.add_argument("--class-images", type=int, default=50,
                        help="number of prior class images (with --class-prompts captions: one caption each)")
    parser.add_argument("--device", default="auto", help="where the evaluations generate (training: accelerate's)")
    parser.add_argument("--json", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import pick_device
    from pipelines.text_to_image import DEFAULT_MODEL, TextToImagePipeline
    from train.common import folder_size

    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    work = Path(args.work_dir)
    base = Path(args.model) if args.model else DEFAULT_MODEL
    prompts = class_prompts(args.class_prompts, args.class_images)
    suffix = "".join([", described instances" if args.instance_captions == "described" else "",
                      ", pivotal (from a learnt word)" if args.pivot else "",
                      f", {len(prompts)} caption class prompts" if args.class_prompts == "captions" else "",
                      f", {args.class_images} class images" if args.class_prompts == "shape" and
                      args.class_images != 50 else "",
                      ", min-SNR weighting" if args.loss_weighting == "min_snr" else "",
                      ", prior towards the base's predictions" if args.prior_target == "base" else "",
                      f", EMA {args.ema_decay}" if float(args.ema_decay) else "",
                      ", cross-attention K/V only" if args.unet_params != "all" else "",
                      f", {args.class_batch_size} class examples per step" if args.class_batch_size else "",
                      f", caption dropout {args.caption_dropout} on {args.caption_dropout_on}"
                      if float(args.caption_dropout) else ""])
    def base_row() -> dict:
        base_pipe = TextToImagePipeline.from_pretrained(base, device=device)
        return {**placement(base_pipe, args.seeds), **base_accuracy(base_pipe, args.drift_seeds, args.drift_guidance),
                "subject survives the VAE": subject_survives_vae(base_pipe, subject_images())}

    rows = {"base model": cached_base_row(work, {"model": str(base), "seeds": args.seeds, "drift seeds":
                                                 args.drift_seeds, "guidance": args.drift_guidance}, base_row)}
    for train_seed, variant in [(seed, variant) for seed in args.train_seed for variant in args.variants]:
        method, _, prior = variant.partition(":")
        seeded = "" if train_seed is None else f", training seed {train_seed}"
        name = f"{method}, prior weight {prior}{suffix}{seeded}"
        out = work / (f"{method}-prior{prior}" + ("-pivot" if args.pivot else "")
                      + ("" if train_seed is None else f"-seed{train_seed}"))
        started = time.perf_counter()
        result = run(*fine_tune_args(args, base, method, prior, work, prompts, out, train_seed))
        seconds = time.perf_counter() - started
        pipe = load_variant(base, result["saved"], method, device)
        saved = result["saved"]
        size = saved.stat().st_size if saved.is_file() else folder_size(saved / "unet")
        word = EMBEDDING_WORD if method == "embedding" or args.pivot else "sks"
        row = {**placement(pipe, args.seeds, word=word), **base_accuracy(pipe, args.drift_seeds, args.drift_guidance),
               "train seconds": seconds, "saved MB": size / 1e6}
        rows[name] = row | paired_drift(row, rows["base model"])
        print(variant, seeded, json.dumps(without_hits(rows[name])))
    print(json.dumps({name: without_hits(row) for name, row in rows.items()}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
