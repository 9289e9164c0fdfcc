"""The fine-tuning issue's DreamBooth table: a subject the base model never saw, learnt from 4 renders.

The subject is a two-tone red heart (the renderer can draw it; the base vocabulary has no hearts). DreamBooth
(``train/finetune.py``) binds it to "sks" with full fine-tuning or LoRA, with or without prior preservation.
For each variant we report:

* placement: "a sks shape at <position> [on a <background> background]" over several seeds; the evaluator
  (all shapes, hearts included) must find the subject — a heart whose right half is a lighter tint of its left
  half (the two-tone mark; a heart alone is not enough, since the evaluator reads many blobs as hearts) — at the
  asked position (and the asked background);
* language drift: the base model's own single-object accuracy on the evaluation prompts, before and after;
* training time and the size of what was saved.

Run: ``python -m train.eval_finetune --work-dir runs/dreambooth [--model weights/shapes-unet]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from train.evaluate import BASE_SHAPES, detect_objects, evaluate_pairs
from train.shapes import EXTRA_SHAPES, Scene, make_object, render

SUBJECT_POSITIONS = ("top left", "center", "bottom right", "top right")
PLACEMENT_PROMPTS = (("top left", None), ("bottom right", None), ("top right", "black"), ("bottom left", "gray"),
                     ("center", "white"), ("top", None), ("left", "black"), ("bottom", None))
VARIANTS = (("full", 1.0), ("full", 0.0), ("lora", 1.0), ("lora", 0.0))


def write_subject(folder: Path, size: int = 128) -> Path:
    """Four renders of the subject (two-tone red heart) at different places and backgrounds."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, (position, background) in enumerate(zip(SUBJECT_POSITIONS, ("white", "gray", "black", "white"))):
        scene = Scene(background, (make_object("red", "heart", position, "large", size, two_tone=True),),
                      image_size=size)
        render(scene).save(folder / f"subject-{k}.png")
    return folder


def placement_prompt(position: str, background: str | None) -> str:
    where = "in the center" if position == "center" else f"at the {position}"
    return f"a sks shape {where}" + (f" on a {background} background" if background else "")


TWO_TONE_CONTRAST = 40.0  # RGB distance between the halves' median colours (a render's is ~120)


def is_two_tone(image, obj) -> bool:
    """The subject's mark: the right half of the object is clearly lighter than the left half."""
    pixels = np.asarray(image, dtype=np.float64)[..., :3]
    columns = np.arange(obj.mask.shape[1])[None, :]
    left = pixels[obj.mask & (columns < obj.centroid[0] - 1)]
    right = pixels[obj.mask & (columns > obj.centroid[0] + 1)]
    if len(left) < 4 or len(right) < 4:
        return False
    lighter = np.median(right, axis=0) - np.median(left, axis=0)
    return bool(np.linalg.norm(lighter) > TWO_TONE_CONTRAST and lighter.sum() > 0)


def placement(pipe, seeds: int = 4, steps: int = 20, guidance: float = 7.5) -> dict:
    """Fractions of generations where the evaluator finds the subject (a two-tone heart) at the asked position
    (and background), and where it finds any heart."""
    hits, hearts, subjects = [], [], []
    for position, background in PLACEMENT_PROMPTS:
        images = pipe([placement_prompt(position, background)] * seeds, seed=0, num_inference_steps=steps,
                      guidance_scale=guidance, progress=False).images
        for image in images:
            found = detect_objects(image, BASE_SHAPES + EXTRA_SHAPES)
            obj = found.objects[0] if found.objects else None
            is_heart = obj is not None and obj.shape == "heart"
            is_subject = is_heart and is_two_tone(image, obj)
            hearts.append(is_heart)
            subjects.append(is_subject)
            hits.append(is_subject and obj.position == position and background in (None, found.background))
    return {"placement": float(np.mean(hits)), "subject": float(np.mean(subjects)), "heart": float(np.mean(hearts)),
            "count": len(hits)}


def base_accuracy(pipe, seeds: int = 2) -> float:
    """Single-object colour+shape+position accuracy on the evaluation prompts (seen and held-out)."""
    from train.eval_model import generate_evaluation_set

    result = evaluate_pairs(generate_evaluation_set(pipe, seeds, progress=False, num_inference_steps=20))
    return float(result["overall"]["single/all"])


def load_variant(base: Path, saved: Path, method: str):
    from pipelines.text_to_image import TextToImagePipeline

    if method == "full":
        return TextToImagePipeline.from_pretrained(saved)
    pipe = TextToImagePipeline.from_pretrained(base)
    pipe.load_lora(saved)
    return pipe


def main(argv: list[str] | None = None) -> int:
    from pipelines.text_to_image import DEFAULT_MODEL, TextToImagePipeline
    from train.common import folder_size
    from train.finetune import run

    parser = argparse.ArgumentParser(prog="python -m train.eval_finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--model", default=None, help="base model (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr-full", default="1e-4", help="full fine-tune learning rate (this UNet is ~300x "
                        "smaller than SD's, whose DreamBooth default is 5e-6)")
    parser.add_argument("--lr-lora", default="1e-3", help="LoRA learning rate")
    parser.add_argument("--rank", default="8")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per placement prompt")
    parser.add_argument("--drift-seeds", type=int, default=2, help="seeds per evaluation prompt for the drift")
    parser.add_argument("--variants", nargs="+", default=[f"{m}:{p}" for m, p in VARIANTS],
                        help="METHOD:PRIOR_WEIGHT, e.g. full:1 lora:0")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    base = Path(args.model) if args.model else DEFAULT_MODEL
    subject = write_subject(work / "subject")
    base_pipe = TextToImagePipeline.from_pretrained(base)
    rows = {"base model": {"placement": placement(base_pipe, args.seeds)["placement"],
                           "base accuracy": base_accuracy(base_pipe, args.drift_seeds)}}
    for variant in args.variants:
        method, _, prior = variant.partition(":")
        out = work / f"{method}-prior{prior}"
        started = time.perf_counter()
        result = run(["--model", str(base), "--instance-data", str(subject), "--instance-prompt", "a sks shape",
                      "--class-prompt", "a shape", "--prior-loss-weight", prior, "--method", method,
                      "--steps", str(args.steps), "--output-dir", str(out), "--sample-every", "0",
                      "--lr", args.lr_full if method == "full" else args.lr_lora, "--rank", args.rank,
                      "--class-data-dir", str(work / "class_images")], "dreambooth")
        seconds = time.perf_counter() - started
        pipe = load_variant(base, result["saved"], method)
        saved = result["saved"]
        size = saved.stat().st_size if saved.is_file() else folder_size(saved / "unet")
        rows[f"{method}, prior weight {prior}"] = {**placement(pipe, args.seeds),
                                                   "base accuracy": base_accuracy(pipe, args.drift_seeds),
                                                   "train seconds": seconds, "saved MB": size / 1e6}
        print(variant, json.dumps(rows[f"{method}, prior weight {prior}"]))
    print(json.dumps(rows, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
