"""``ldm eval``: generate the fixed evaluation prompt set with a model and read the attributes back.

The prompts (``train.evaluate.evaluation_prompts``) cover single objects and two-object scenes, seen and held-out
attribute combinations; each is generated with several seeds and scored by the analytic evaluator. Sweeps give the
README tables: accuracy vs guidance scale, and vs sampler x steps. The VAE's reconstruction PSNR on held-out
renders is reported beside them (the upper bound of what the model can reproduce).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from PIL import Image
from tqdm.auto import tqdm

from train.evaluate import aggregate_scores, evaluate_pairs, evaluation_prompts, score
from train.shapes import ShapesDataset, expected_from_scene

HEADLINE = (("single/all", "seen", "single seen"), ("single/all", "heldout", "single held-out"),
            ("two/all", "seen", "two seen"), ("two/all", "heldout", "two held-out"))


def generate_evaluation_set(pipe, seeds: int = 4, batch: int = 8, progress: bool = True,
                            **settings) -> list[tuple[str, object]]:
    """(prompt, image) for every evaluation prompt with seeds 0..seeds-1; ``settings`` go to the pipeline
    (sampler, num_inference_steps, guidance_scale, ...). Images of another size than the model's (``height`` /
    ``width``, a hires fix) are resized to it with Lanczos for the evaluator."""
    prompts = [p.text for p in evaluation_prompts() for _ in range(seeds)]
    seed_of = [s for _ in evaluation_prompts() for s in range(seeds)]
    pairs = []
    for start in tqdm(range(0, len(prompts), batch), desc="evaluating", disable=not progress, leave=False):
        chunk, chunk_seeds = prompts[start:start + batch], seed_of[start:start + batch]
        generators = [torch.Generator().manual_seed(s) for s in chunk_seeds]
        images = pipe(chunk, generator=generators, progress=False, **settings).images
        if "height" in settings or "hires_scale" in settings:
            native = pipe.unet.config.sample_size * pipe.vae_scale_factor
            images = [image.resize((native, native), Image.LANCZOS) for image in images]
        pairs += list(zip(chunk, images))
    return pairs


def evaluate_model(pipe, seeds: int = 4, batch: int = 8, progress: bool = True, **settings) -> dict:
    """Generate the evaluation set and score it: ``evaluate_pairs``' groups of accuracies."""
    return evaluate_pairs(generate_evaluation_set(pipe, seeds, batch, progress, **settings))


def image_grid(images: list, columns: int) -> Image.Image:
    """Images of one size in a grid, row-major."""
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for k, image in enumerate(images):
        grid.paste(image, ((k % columns) * width, (k // columns) * height))
    return grid


@torch.no_grad()
def vae_round_trip(pipe, count: int = 64, seed: int = 12345) -> dict:
    """Encode/decode ``count`` rendered scenes never used in training (posterior mean) and report the mean PSNR
    (dB) and the evaluator's accuracy on the reconstructions: together, the upper bound of what the denoiser can
    show the evaluator through this VAE."""
    pipe.apply_seamless("none")  # the VAE as trained, whatever the last request's padding
    data = ShapesDataset(count, seed, size=pipe.unet.config.sample_size * pipe.vae_scale_factor, split="all")
    items = [data[i] for i in range(count)]
    images = torch.stack([item["image"] for item in items])  # (N, 3, H, W) in [-1, 1]
    vae = pipe.vae
    latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    decoded = pipe.decode(latents).cpu()  # (N, 3, H, W) in [0, 1]
    mse = ((decoded - (images / 2 + 0.5)) ** 2).flatten(1).mean(1)
    expected = [expected_from_scene(item["scene"]) for item in items]
    scores = [(wanted, score(wanted, image)) for wanted, image in zip(expected, pipe.to_pil(decoded))]
    accuracy = aggregate_scores(scores)
    return {"psnr": float((10 * torch.log10(1 / mse)).mean()),
            "single/all": accuracy.get("single/all", math.nan), "two/all": accuracy.get("two/all", math.nan)}


def headline(result: dict) -> list[str]:
    return [f"{100 * result[group].get(key, math.nan):.1f}" for key, group, _ in HEADLINE]


def markdown_table(rows: list[tuple[str, dict]], first_column: str) -> str:
    head = f"| {first_column} | " + " | ".join(label for _, _, label in HEADLINE) + " |"
    lines = [head, "|" + "---|" * (len(HEADLINE) + 1)]
    lines += [f"| {name} | " + " | ".join(headline(result)) + " |" for name, result in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ldm.samplers import get_sampler
    from ldm.schedules import TIMESTEP_SPACINGS
    from pipelines.cli import pick_device, pick_dtype
    from pipelines.text_to_image import TextToImagePipeline

    parser = argparse.ArgumentParser(prog="ldm eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the shipped model)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale; the editing "
                        "tables use it too, except the resample table's own CFG 1 and 7.5")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--spacing", help="timestep spacing (default: the model's)")
    parser.add_argument("--seamless", default="none", help="none, x, y or xy: circular padding along those axes")
    parser.add_argument("--freeu", type=float, nargs=4, metavar=("S1", "S2", "B1", "B2"), help="FreeU's factors")
    parser.add_argument("--guidance-rescale", type=float, default=0.0,
                        help="phi of guidance rescale (Lin et al. 2023, eq. 16)")
    parser.add_argument("--pag-scale", type=float, default=0.0,
                        help="perturbed-attention guidance scale (Ahn et al. 2024; 0 = off)")
    parser.add_argument("--pag-layers", nargs="+", default=["mid"], help="self-attention layers PAG perturbs")
    parser.add_argument("--guidance", default="cfg", help="cfg; apg: adaptive projected guidance (Sadat et al. "
                                                          "2024) with the --apg-* settings; cfg_zero_star: CFG-Zero* "
                                                          "(Fan et al. 2025); also in the sweeps")
    parser.add_argument("--apg-eta", type=float, default=0.0)
    parser.add_argument("--apg-norm-threshold", type=float, default=0.0)
    parser.add_argument("--apg-momentum", type=float, default=0.0)
    parser.add_argument("--zero-init-steps", type=int, help="with --guidance cfg_zero_star (default 1)")
    parser.add_argument("--sweep", choices=["none", "guidance", "samplers", "spacings", "rescale", "hires"],
                        default="none",
                        help="guidance: CFG 1 / 3 / 5 / 7.5; samplers: --sweep-samplers x --sweep-steps; spacings: "
                             "--sweep-spacings x --sweep-steps with --sampler; rescale: "
                             "guidance rescale phi 0 / 0.3 / 0.7 / 1 at --cfg; hires: twice the native size, "
                             "generated directly or by a hires fix (latent / lanczos upscaler, strength 0.3 / 0.5 / "
                             "0.7), read back at the native size")
    parser.add_argument("--sweep-samplers", nargs="+", default=["ddim", "euler", "heun", "dpmpp_2m", "unipc"],
                        help="with --sweep samplers: the samplers compared")
    parser.add_argument("--sweep-spacings", nargs="+", default=list(TIMESTEP_SPACINGS),
                        help="with --sweep spacings: the spacings compared (default all)")
    parser.add_argument("--sweep-steps", type=int, nargs="+", default=[5, 10, 20, 50],
                        help="with --sweep samplers or spacings: the step counts compared")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", help="also write all results to this JSON file")
    parser.add_argument("--grid", help="write the first setting's images (seed 0 of every prompt) to this PNG")
    parser.add_argument("--task", choices=["generation", "editing", "controlnet", "composition"],
                        default="generation",
                        help="editing: inversion, prompt-to-prompt, inpainting and SDEdit tables "
                             "(train/eval_editing.py); controlnet: mask IoU of held-out scenes vs conditioning scale "
                             "(needs --controlnet); composition: each colour x shape pair's nearest seen pair in the "
                             "text encoder's states and the shapes drawn for it (train/eval_text.py)")
    parser.add_argument("--controlnet", help="with --task controlnet: the trained ControlNet folder")
    parser.add_argument("--control", default="mask", help="with --task controlnet: its control type")
    parser.add_argument("--scenes", type=int, default=16, help="with --task controlnet: held-out scenes per scale")
    parser.add_argument("--control-scales", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5],
                        help="with --task controlnet: the conditioning scales measured (0 = the base model)")
    parser.add_argument("--tables", nargs="+", default=None, help="with --task editing: which tables "
                        "(inversion p2p flowedit p2p_real inpaint sdedit resample photos; default all)")
    args = parser.parse_args(argv)
    if args.sweep in ("samplers", "spacings"):  # before the model loads and the first runs take minutes
        for name in args.sweep_samplers:
            get_sampler(name)
        unknown = [name for name in args.sweep_spacings if name not in TIMESTEP_SPACINGS]
        if unknown:
            raise ValueError(f"unknown spacing {unknown[0]!r}; known: {', '.join(TIMESTEP_SPACINGS)}")
        if min(args.sweep_steps) < 1:
            raise ValueError(f"--sweep-steps must be positive, got {min(args.sweep_steps)}")
    pipe = TextToImagePipeline.from_pretrained(args.model, device=pick_device(args.device),
                                               dtype=pick_dtype(args.dtype))
    if args.task == "editing":
        return editing_main(pipe, args)
    if args.task == "controlnet":
        return controlnet_main(pipe, args)
    if args.task == "composition":
        return composition_main(pipe, args)
    base = dict(sampler=args.sampler, timestep_spacing=args.spacing, num_inference_steps=args.steps,
                guidance_scale=args.cfg, seamless=args.seamless, freeu=args.freeu,
                guidance_rescale=args.guidance_rescale, pag_scale=args.pag_scale, pag_layers=args.pag_layers)
    base.update(guidance=args.guidance, apg_eta=args.apg_eta, apg_norm_threshold=args.apg_norm_threshold,
                apg_momentum=args.apg_momentum, zero_init_steps=args.zero_init_steps)  # the pipeline checks them
    if args.sweep == "guidance":
        runs = [(f"CFG {g}", {**base, "guidance_scale": g}) for g in (1.0, 3.0, 5.0, 7.5)]
    elif args.sweep == "samplers":
        runs = [(f"{s}, {n} steps", {**base, "sampler": s, "num_inference_steps": n})
                for s in args.sweep_samplers for n in args.sweep_steps]
    elif args.sweep == "spacings":
        runs = [(f"{args.sampler}, {spacing}, {n} steps", {**base, "timestep_spacing": spacing,
                                                            "num_inference_steps": n})
                for spacing in args.sweep_spacings for n in args.sweep_steps]
    elif args.sweep == "hires":
        double = 2 * pipe.unet.config.sample_size * pipe.vae_scale_factor
        runs = [("native size", base), (f"{double}² directly", {**base, "height": double, "width": double})]
        runs += [(f"{double}² hires fix, {upscaler}, strength {strength}",
                  {**base, "hires_scale": 2.0, "hires_upscaler": upscaler, "hires_strength": strength})
                 for upscaler in ("latent", "lanczos") for strength in (0.3, 0.5, 0.7)]
    elif args.sweep == "rescale":
        runs = [(f"CFG {args.cfg}, rescale {phi}", {**base, "guidance_rescale": phi})
                for phi in (0.0, 0.3, 0.7, 1.0)]
    else:
        pag = f", PAG {args.pag_scale} ({' '.join(args.pag_layers)})" if args.pag_scale else ""
        apg = (f", APG eta {args.apg_eta} r {args.apg_norm_threshold} momentum {args.apg_momentum}"
               if args.guidance == "apg" else f", {args.guidance}" if args.guidance != "cfg" else "")
        seamless = f", seamless {args.seamless}" if args.seamless != "none" else ""
        seamless += f", FreeU {' '.join(f'{v:g}' for v in args.freeu)}" if args.freeu else ""
        runs = [(f"{args.sampler}, {args.steps} steps, CFG {args.cfg}{pag}{apg}{seamless}", base)]
    for _, settings in runs:  # what this model refuses (a spacing, a sampler) fails here, not after other runs
        pipe.prepare("a red circle", **{k: v for k, v in settings.items() if not k.startswith("hires_")})
    rows = []
    for k, (name, settings) in enumerate(runs):
        pairs = generate_evaluation_set(pipe, args.seeds, **settings)
        rows.append((name, evaluate_pairs(pairs)))
        if args.grid and k == 0:
            image_grid([image for _, image in pairs[::args.seeds]], columns=8).save(args.grid)
    print(f"model {pipe.path} | {args.seeds} seeds x {len(evaluation_prompts())} prompts | accuracy (%)")
    print(markdown_table(rows, "setting"))
    round_trip = vae_round_trip(pipe)
    print(f"VAE round trip of held-out renders: PSNR {round_trip['psnr']:.2f} dB, evaluator reads back "
          f"{100 * round_trip['single/all']:.1f}% single / {100 * round_trip['two/all']:.1f}% two-object scenes")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({**{name: result for name, result in rows}, "vae_round_trip": round_trip}, file, indent=1)
    return 0


def editing_main(pipe, args) -> int:
    """``ldm eval --task editing``: print each editing table (percentages and dB) and optionally write JSON."""
    from train.eval_editing import TABLES, evaluate_editing

    tables = args.tables or list(TABLES)
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise ValueError(f"unknown editing table {unknown[0]!r}; known: {', '.join(TABLES)}")
    results = {}
    for name in tables:
        results[name] = evaluate_editing(pipe, [name], guidance=args.cfg)[name]
        print(f"## {name}")
        print(json.dumps(results[name], indent=1))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)
    return 0


def controlnet_main(pipe, args) -> int:
    """``ldm eval --task controlnet``: mean IoU between each held-out scene's object mask and the objects the
    evaluator finds in the image generated from its control and caption, at each of ``--control-scales`` (default
    0 = the base model, 0.5, 1 and 1.5; ``train.train_controlnet.evaluate_iou``)."""
    from train.train_controlnet import evaluate_iou

    if not args.controlnet:
        raise ValueError("--task controlnet needs --controlnet FOLDER")
    pipe.load_controlnet(args.controlnet)
    results = {}
    for scale in args.control_scales:
        results[scale] = evaluate_iou(pipe, args.control, count=args.scenes, scale=scale, steps=args.steps,
                                      guidance=args.cfg)
        print(f"scale {scale}: mean IoU {results[scale]['mean_iou']:.3f}, IoU >= 0.8 in "
              f"{100 * results[scale]['iou>=0.8']:.0f} % of {args.scenes} scenes", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)
    return 0


def composition_main(pipe, args) -> int:
    """``ldm eval --task composition``: per colour x shape pair, the nearest seen pair in the text encoder's states
    (``train.eval_text.composition_probe``) and the shapes read back from ``--seeds`` images at ``--cfg``."""
    from train.eval_text import composition_probe, drawn_shapes

    probe = composition_probe(pipe.text_encoder, pipe.tokenizer)
    drawn = drawn_shapes(pipe, args.seeds, args.cfg, args.steps)
    print(f"model {pipe.path} | text-encoder neighbours over 24 captions per pair | shapes drawn for 'a large <colour> "
          f"<shape> in the center on a white background', {args.seeds} seeds, CFG {args.cfg}, {args.steps} steps")
    print("| pair | nearest seen pair (cosine) | shapes drawn |\n|---|---|---|")
    for row in probe["pairs"]:
        name = f"**{row['pair']}** (held out)" if row["heldout"] else row["pair"]
        shapes = ", ".join(f"{shape} {count}" for shape, count in sorted(drawn[row["pair"]].items()))
        print(f"| {name} | {row['nearest_seen']} ({row['cosine']:.2f}) | {shapes} |")
    print(f"nearest seen pair shares the shape: seen {100 * probe['seen_shares_shape']:.0f} %, held-out "
          f"{100 * probe['heldout_shares_shape']:.0f} %; additive model a(colour) + b(shape) fitted on seen pairs "
          f"reads the shape of {100 * probe['additive_shape_read']['seen']:.0f} % of seen and "
          f"{100 * probe['additive_shape_read']['heldout']:.0f} % of held-out captions")
    word = probe["shape_word_read"]
    print(f"at the shape word's own token (the last-layer state cross-attention reads), the nearest seen shape reads "
          f"{100 * word['seen']:.0f} % of seen and {100 * word['heldout']:.0f} % of held-out captions right; held-out "
          f"states' cosine to the same shape {word['heldout_cosine_same_shape']:.2f}, to the same colour "
          f"{word['heldout_cosine_same_colour']:.2f}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"probe": probe, "drawn": drawn}, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
