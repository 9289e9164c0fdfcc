"""The ``ldm`` command line: ``ldm generate``, ``ldm bench``, ``ldm train``.

Errors in what the user typed (bad settings, missing or incomplete model folders, pickle checkpoints) print one
line, ``ldm: error: ...``, exit with status 2 and write nothing.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
TRAIN_RECIPES = {"vae": "train.train_vae", "text-encoder": "train.train_text_encoder",
                 "denoiser": "train.train_denoiser", "mmdit": "train.train_mmdit", "default": "train.default_model",
                 "dreambooth": "train.finetune:dreambooth", "lora": "train.finetune:lora",
                 "textual-inversion": "train.finetune:textual_inversion",
                 "controlnet": "train.train_controlnet", "inpainting": "train.train_inpainting"}


PREDICTIONS = {None: None, "v": "v_prediction", "epsilon": "epsilon"}


class UsageError(ValueError):
    """An error in what the user asked for."""


def parse_size(text: str) -> tuple[int, int]:
    """``"512"`` or ``"768x512"`` (width x height)."""
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height or width)
    except ValueError:
        raise UsageError(f"--size must be N or WxH, got {text!r}") from None


def pick_device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UsageError(f"unknown --dtype {name!r}; known: float32, bfloat16, float16")
    return getattr(torch, DTYPES[name])


def output_paths(output: Path, count: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png, out-1.png, ...`` for several."""
    if output.suffix.lower() != ".png":
        raise UsageError(f"output must be a .png file, got {output}")
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{k}{output.suffix}") for k in range(count)]


SETTING_ARGUMENTS = {"negative_prompt": "negative_prompt", "steps": "num_inference_steps",
                     "cfg_scale": "guidance_scale", "sampler": "sampler", "height": "height", "width": "width",
                     "seed": "seed", "eta": "eta", "guidance_rescale": "guidance_rescale",
                     "timestep_spacing": "timestep_spacing", "clip_skip": "clip_skip", "emphasis": "emphasis",
                     "pag_scale": "pag_scale", "pag_layers": "pag_layers", "variation_seed": "variation_seed",
                     "variation_strength": "variation_strength", "guidance": "guidance", "apg_eta": "apg_eta",
                     "apg_norm_threshold": "apg_norm_threshold", "apg_momentum": "apg_momentum",
                     "zero_init_steps": "zero_init_steps", "seamless": "seamless", "freeu": "freeu"}
HIRES_ARGUMENTS = {"hires_scale": "hires_scale", "hires_upscaler": "hires_upscaler", "hires_steps": "hires_steps",
                   "strength": "hires_strength"}
"""PNG-metadata names of a hires fix (whose second pass records its strength as "Denoising strength")."""


def sampling_settings(args) -> dict:
    """The sampling options the user typed (PNG-metadata names); unset ones are left out."""
    typed = {"negative_prompt": args.negative, "steps": args.steps, "cfg_scale": args.cfg,
             "sampler": args.sampler, "seed": args.seed, "timestep_spacing": args.spacing, "eta": args.eta,
             "guidance_rescale": args.rescale, "clip_skip": args.clip_skip, "emphasis": args.emphasis,
             "pag_scale": args.pag_scale, "pag_layers": " ".join(args.pag_layers) if args.pag_layers else None,
             "variation_seed": args.variation_seed, "variation_strength": args.variation_strength,
             "guidance": args.guidance, "apg_eta": args.apg_eta, "apg_norm_threshold": args.apg_norm_threshold,
             "apg_momentum": args.apg_momentum, "zero_init_steps": args.zero_init_steps, "seamless": args.seamless,
             "freeu": " ".join(f"{v:g}" for v in args.freeu) if args.freeu else None}
    return {k: v for k, v in typed.items() if v is not None}


def generation_settings(args) -> dict:
    """The generation parameters from the command line, on top of those read from ``--from`` if given."""
    from pipelines.metadata import read_parameters

    settings = read_parameters(args.from_image) if args.from_image else {}
    if args.prompt is not None:
        settings["prompt"] = args.prompt
    if "prompt" not in settings:
        raise UsageError("give a prompt, or --from an image that has generation parameters")
    settings.update(sampling_settings(args))
    if args.guidance is not None:  # another method's settings from --from do not carry over
        for key in ("apg_eta", "apg_norm_threshold", "apg_momentum", "zero_init_steps"):
            if getattr(args, key) is None:
                settings.pop(key, None)
    typed_hires = {"hires_scale": args.hires_scale, "hires_upscaler": args.hires_upscaler,
                   "hires_steps": args.hires_steps, "strength": args.hires_strength}
    settings.update({k: v for k, v in typed_hires.items() if v is not None})
    if settings.get("hires_steps") == 0:  # the web UI's "same as the first pass"
        settings["hires_steps"] = None
    if args.size:
        settings["width"], settings["height"] = parse_size(args.size)
    return settings


def pipeline_arguments(settings: dict) -> dict:
    """PNG-metadata names to pipeline keyword arguments; unset ones keep the pipeline's defaults."""
    if settings.get("pag_layers") and not settings.get("pag_scale"):
        raise UsageError("--pag-layers chooses where PAG acts; give --pag-scale too")
    return {arg: settings[key] for key, arg in SETTING_ARGUMENTS.items() if settings.get(key) not in (None, "")}


def resolve_model(args, settings: dict) -> Path | None:
    """``--model``, else the model named in ``--from`` metadata if it is a folder, else the shipped default."""
    from pipelines.text_to_image import DEFAULT_MODEL

    if args.model:
        return Path(args.model)
    named = settings.get("model")
    if named and Path(named).is_dir():
        return Path(named)
    if not DEFAULT_MODEL.is_dir():
        raise UsageError("no default model is shipped in this version: pass --model PATH (a diffusers folder)")
    return None


def load_pipeline(args, settings: dict | None = None):
    from pipelines.text_to_image import TextToImagePipeline

    device, dtype = pick_device(args.device), pick_dtype(args.dtype)
    pipe = TextToImagePipeline.from_pretrained(resolve_model(args, settings or {}), allow_pickle=args.allow_pickle,
                                               config=args.config, prediction=PREDICTIONS[args.prediction])
    pipe.to(device, dtype)
    if args.model:
        pipe.name = str(args.model)
    for spec in args.lora:
        path, scale = parse_lora_spec(spec)
        pipe.load_lora(path, scale, allow_pickle=args.allow_pickle)
    for spec in args.embedding:
        pipe.load_textual_inversion(*parse_embedding_spec(spec), allow_pickle=args.allow_pickle)
    if getattr(args, "controlnet", None):
        pipe.load_controlnet(args.controlnet, allow_pickle=args.allow_pickle)
    return pipe


def control_arguments(args) -> dict:
    """``--control IMAGE --control-scale S`` as pipeline keyword arguments."""
    if not args.control:
        return {}
    return {"control_image": args.control, "controlnet_conditioning_scale": args.control_scale}


def parse_lora_spec(text: str) -> tuple[str, float]:
    """``"file.safetensors"`` or ``"file.safetensors:0.8"``."""
    path, colon, scale = text.rpartition(":")
    if colon:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def parse_embedding_spec(text: str) -> tuple[str, str | None]:
    """``"file.safetensors"`` or ``"file.safetensors:word"`` (a colon is part of the path if the path exists)."""
    path, colon, word = text.rpartition(":")
    if colon and word and Path(path).exists():
        return path, word
    return text, None


def save_images(result, paths: list[Path]) -> None:
    from pipelines.metadata import save_png

    for image, params, path in zip(result.images, result.parameters, paths):
        save_png(image, path, params)
        print(f"{path}  (seed {params['seed']})")


def cmd_generate(args) -> int:
    settings = generation_settings(args)
    paths = output_paths(Path(args.output), args.n)
    if settings.get("hires_scale") is None and any(
            v is not None for v in (args.hires_upscaler, args.hires_strength, args.hires_steps)):
        raise UsageError("--hires-upscaler, --hires-strength and --hires-steps set up a hires fix; give --hires-scale")
    pipe = load_pipeline(args, settings)
    refiner = {}
    if args.refiner:
        from pipelines.text_to_image import TextToImagePipeline

        refiner = {"refiner": TextToImagePipeline.from_pretrained(args.refiner).to(pipe.device, pipe.dtype),
                   "refiner_switch": args.refiner_switch}
        refiner["refiner"].name = str(args.refiner)
        for spec in args.embedding:  # the web UI gives an SDXL embedding's clip_g vectors to the refiner too
            refiner["refiner"].load_textual_inversion(*parse_embedding_spec(spec), allow_pickle=args.allow_pickle)
    hires = {}
    if settings.get("hires_scale") is not None:
        hires = {arg: settings[key] for key, arg in HIRES_ARGUMENTS.items() if settings.get(key) is not None}
    save_images(pipe(settings["prompt"], num_images_per_prompt=args.n, **pipeline_arguments(settings),
                     **control_arguments(args), **refiner, **hires), paths)
    return 0


def cmd_img2img(args) -> int:
    paths = output_paths(Path(args.output), 1)
    pipe = load_pipeline(args)
    result = pipe.img2img(args.image, args.prompt, strength=args.strength,
                          **pipeline_arguments(sampling_settings(args)), **control_arguments(args))
    save_images(result, paths)
    return 0


def cmd_inpaint(args) -> int:
    paths = output_paths(Path(args.output), 1)
    pipe = load_pipeline(args)
    result = pipe.inpaint(args.image, args.mask, args.prompt, strength=args.strength, feather=args.feather,
                          jump_length=args.jump_length, jump_n_sample=args.jump_n_sample, mask_mode=args.mask_mode,
                          **pipeline_arguments(sampling_settings(args)), **control_arguments(args))
    save_images(result, paths)
    return 0


def cmd_invert(args) -> int:
    from pipelines.editing import save_inversion

    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise UsageError(f"the inversion is written as .safetensors, got {output}")
    recon_paths = output_paths(Path(args.reconstruction), 1) if args.reconstruction else []
    pipe = load_pipeline(args)
    inversion = pipe.invert(args.image, args.prompt, args.steps, args.cfg, null_text=args.null_text,
                            fixed_point_iterations=args.fixed_point, clip_skip=args.clip_skip)
    reconstruction = pipe.reconstruct(inversion) if recon_paths else None  # all work done before any write
    save_inversion(inversion, output)
    print(output)
    if reconstruction is not None:
        save_images(reconstruction, recon_paths)
    return 0


def parse_equalizer(items: list[str] | None) -> dict[str, float] | None:
    """``["red=2", "circle=0.5"]`` -> ``{"red": 2.0, "circle": 0.5}``."""
    if not items:
        return None
    equalizer = {}
    for item in items:
        word, _, weight = item.partition("=")
        try:
            equalizer[word] = float(weight)
        except ValueError:
            raise UsageError(f"--reweight takes WORD=WEIGHT, got {item!r}") from None
    return equalizer


def cmd_edit(args) -> int:
    from pipelines.editing import load_inversion

    if args.image and args.inversion:
        raise UsageError("give either --image (inverted first) or --inversion, not both")
    if args.null_text and not args.image:
        raise UsageError("--null-text is for --image (how the image is inverted)")
    edited_path = output_paths(Path(args.output), 1)[0]
    source_path = edited_path.with_name(f"{edited_path.stem}-source{edited_path.suffix}")
    if args.method == "flowedit":
        return flow_edit_command(args, source_path, edited_path)
    options = dict(edit=args.edit, cross_replace_steps=args.cross, self_replace_steps=args.self_steps,
                   equalizer=parse_equalizer(args.reweight), local_blend=args.blend)
    pipe = load_pipeline(args)
    settings = pipeline_arguments(sampling_settings(args))
    if args.image or args.inversion:
        if args.seamless or args.freeu:
            raise UsageError("--seamless and --freeu are for edits of generated images; an inversion is sampled "
                             "with the networks as trained")
        if args.inversion:
            inversion = load_inversion(args.inversion)
        else:
            inversion = pipe.invert(args.image, args.source, settings.get("num_inference_steps", 50),
                                    settings.get("guidance_scale", 7.5), null_text=args.null_text,
                                    clip_skip=settings.get("clip_skip"))
        result = pipe.edit(inversion, args.target, **options)
    else:
        result = pipe.prompt_to_prompt([args.source, args.target], **settings, **options)
    save_images(result, [source_path, edited_path])
    return 0


def flow_edit_command(args, source_path: Path, edited_path: Path) -> int:
    """``ldm edit --method flowedit``: FlowEdit of ``--image``, or of the source prompt's generation (saved as the
    source); the attention options are prompt-to-prompt's and are refused here."""
    if args.inversion or args.null_text:
        raise UsageError("--method flowedit needs no inversion: give --image, or nothing to edit a generation")
    settings = pipeline_arguments(sampling_settings(args))
    if settings.get("variation_strength"):
        raise UsageError("--method flowedit draws fresh noise at every step; a variation seed does not apply")
    pipe = load_pipeline(args)
    options = dict(strength=args.strength, source_guidance_scale=args.source_cfg, **settings)
    if args.image:
        result = pipe.flow_edit(args.image, args.source, args.target, **options)
        save_images(result, [edited_path])
        return 0
    source = pipe(args.source, **{**settings, "output_type": "latent"})
    result = pipe.flow_edit(source.images, args.source, args.target, **options)
    save_images(SimpleNamespace(images=pipe.to_pil(pipe.decode(source.images)), parameters=source.parameters),
                [source_path])
    save_images(result, [edited_path])
    return 0


def cmd_convert(args) -> int:
    """Single file -> diffusers folder, or folder -> single file (original layout), offline."""
    from ldm.loading import load_components
    from ldm.single_file import save_folder, save_single_file

    source, target = Path(args.source), Path(args.target)
    if target.exists():
        raise UsageError(f"{target} exists; convert to a new path")
    if not source.is_file() and target.suffix.lower() != ".safetensors":
        raise UsageError(f"a folder converts to a single .safetensors file, got {target}")
    components = load_components(source, args.allow_pickle, args.config, PREDICTIONS[args.prediction])
    write_new_path(target, lambda path: (save_folder if source.is_file() else save_single_file)(components, path))
    print(target)
    return 0


def cmd_merge(args) -> int:
    """A (1 - M) + B M, or A + (B - C) M, written as a new folder or single file (``pipelines/merge.py``)."""
    from pipelines.merge import merge_models

    print(merge_models(args.a, args.b, args.output, args.alpha, args.method, args.base, args.allow_pickle,
                       args.config, args.dtype))
    return 0


def write_new_path(target: Path, write: Callable[[Path], object]) -> Path:
    """Run ``write(path)`` on a path in a fresh hidden folder beside ``target`` and move the result to ``target``
    only when it is complete: an error or interruption leaves nothing behind, and nothing else is touched."""
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".partial-{target.name}-", dir=target.parent))
    try:
        write(scratch / target.name)
        os.replace(scratch / target.name, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def cmd_bench(args) -> int:
    from pipelines.bench import main as bench_main

    return bench_main(args)


def cmd_train(args) -> int:
    module_name, _, recipe = TRAIN_RECIPES[args.recipe].partition(":")
    module = importlib.import_module(module_name)
    return (module.main(args.recipe_args, recipe) if recipe else module.main(args.recipe_args)) or 0


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="diffusers model folder (default: the shipped model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow pickle checkpoints (.ckpt/.bin/.pt), loaded with weights_only=True")
    parser.add_argument("--config", help="for a single-file checkpoint: a diffusers folder with its configs "
                                         "(default: Stable Diffusion 1.5's, shipped)")
    parser.add_argument("--prediction", choices=["v", "epsilon"], default=None,
                        help="for a single-file checkpoint: v (SD 2.x 768 models) or epsilon; the keys do not tell")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="load a LoRA file (diffusers or kohya layout) at SCALE (default 1); repeatable")
    parser.add_argument("--embedding", action="append", default=[], metavar="PATH[:WORD]",
                        help="load a textual-inversion embedding (diffusers, A1111 or SDXL layout) as WORD (default: "
                             "the file's own token, else its name); repeatable")


def add_control_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--controlnet", help="a diffusers-format ControlNet folder")
    parser.add_argument("--control", help="the control image (edges, mask, ...) for --controlnet")
    parser.add_argument("--control-scale", type=float, default=1.0, help="ControlNet conditioning scale")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--negative", help="negative prompt")
    parser.add_argument("--steps", type=int, help="sampling steps (default 30)")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--sampler", help="ddpm, ddim, dpmpp_2m (default), dpmpp_2m_sde, dpmpp_2m_sde_heun, dpmpp_3m, "
                                          "dpmpp_3m_sde, dpmpp_2s_a, dpmpp_sde, euler, euler_a, heun, lms, dpm_2, "
                                          "dpm_2_a, plms, unipc, unipc_bh1, lcm, restart, flow_euler")
    parser.add_argument("--spacing", help="timestep spacing: leading, trailing, linspace, karras, exponential, "
                                          "beta, kl_optimal, align_your_steps (default: the model's)")
    parser.add_argument("--seamless", help="none (default), x, y or xy: images that tile along those axes "
                                           "(circular padding, the A1111 web UI's Tiling)")
    parser.add_argument("--freeu", type=float, nargs=4, metavar=("S1", "S2", "B1", "B2"),
                        help="FreeU (Si et al. 2024): skip and backbone factors of the first two decoder stages, "
                             "e.g. 0.9 0.2 1.5 1.6 for SD 1.x")
    parser.add_argument("--eta", type=float, help="DDIM eta (default 0)")
    parser.add_argument("--rescale", type=float, help="guidance rescale phi in [0, 1] (default 0)")
    parser.add_argument("--guidance", help="cfg (default); apg: adaptive projected guidance (Sadat et al. 2024); "
                                           "cfg_zero_star: CFG-Zero* (Fan et al. 2025)")
    parser.add_argument("--zero-init-steps", type=int, help="CFG-Zero*: first steps that predict zero (default 1)")
    parser.add_argument("--apg-eta", type=float, help="APG: weight of the guidance parallel to x0 (default 0)")
    parser.add_argument("--apg-norm-threshold", type=float, help="APG: largest guidance norm (default 0: no limit)")
    parser.add_argument("--apg-momentum", type=float, help="APG: momentum of the guidance, e.g. -0.5 (default 0)")
    parser.add_argument("--pag-scale", type=float, help="perturbed-attention guidance scale (default 0: off)")
    parser.add_argument("--pag-layers", nargs="+", help="self-attention layers PAG perturbs, as regular expressions "
                                                        "over module names (default: mid)")
    parser.add_argument("--seed", type=int, help="seed of the first image; image k uses seed + k (default: random)")
    parser.add_argument("--variation-seed", type=int, help="seed of the image to move towards (image k: + k; "
                                                           "default: random), as the A1111 web UI's variation seed")
    parser.add_argument("--variation-strength", type=float,
                        help="0 (default) keeps the --seed image, 1 gives the --variation-seed one")
    add_clip_skip_option(parser)
    parser.add_argument("--emphasis", help="none (default): brackets are text, as diffusers; a1111: (word:1.2), "
                                           "(word), [word] and BREAK weigh tokens and 'p AND q:0.5' composes "
                                           "sub-prompts, as the A1111 web UI")


def add_clip_skip_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clip-skip", type=int, help="CLIP layers to skip from the end, as diffusers' clip_skip "
                                                      "(1 = A1111's 'Clip skip: 2'; default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent text-to-image diffusion, offline.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt", nargs="?", help="the prompt ('' for unconditional)")
    gen.add_argument("-o", "--output", default="out.png", help="output PNG (several images: out-0.png, ...)")
    gen.add_argument("--from", dest="from_image", help="regenerate from the parameters stored in this PNG")
    gen.add_argument("--n", type=int, default=1, help="number of images")
    gen.add_argument("--size", help="N or WxH (default: the model's native size)")
    gen.add_argument("--refiner", help="a second model folder (SDXL's refiner) that finishes the sampling")
    gen.add_argument("--refiner-switch", type=float, default=0.8,
                     help="fraction of the schedule after which --refiner takes over (default 0.8)")
    gen.add_argument("--hires-scale", type=float, help="hires fix: enlarge by this factor and repaint (img2img)")
    gen.add_argument("--hires-upscaler", help="latent (default), latent_antialiased, latent_bicubic, "
                                              "latent_bicubic_antialiased, latent_nearest, latent_nearest_exact, "
                                              "lanczos, nearest")
    gen.add_argument("--hires-strength", type=float, help="the hires pass's img2img strength (default 0.7)")
    gen.add_argument("--hires-steps", type=int, help="the hires pass's steps (default: --steps)")
    add_sampling_options(gen)
    add_model_options(gen)
    add_control_options(gen)
    gen.set_defaults(run=cmd_generate)

    img2img = commands.add_parser("img2img", help="SDEdit: repaint an image towards a prompt")
    img2img.add_argument("image")
    img2img.add_argument("prompt")
    img2img.add_argument("-o", "--output", default="out.png")
    img2img.add_argument("--strength", type=float, default=0.6, help="0 keeps the image, 1 is text-to-image")
    add_sampling_options(img2img)
    add_model_options(img2img)
    add_control_options(img2img)
    img2img.set_defaults(run=cmd_img2img)

    inpaint = commands.add_parser("inpaint", help="repaint the white part of a mask")
    inpaint.add_argument("image")
    inpaint.add_argument("mask", help="white = repaint, black = keep (grey = partly)")
    inpaint.add_argument("prompt")
    inpaint.add_argument("-o", "--output", default="out.png")
    inpaint.add_argument("--strength", type=float, default=1.0)
    inpaint.add_argument("--feather", type=float, default=0.0, help="soften the mask's inner edge (pixels)")
    inpaint.add_argument("--mask-mode", default="blend", help="blend (default): grey mixes input and repainting; "
                                                              "differential: grey is how much a pixel may change "
                                                              "(differential diffusion)")
    inpaint.add_argument("--jump-n-sample", type=int, default=1,
                         help="RePaint resampling: go back up --jump-length steps this many times minus one "
                              "(about this many times the network evaluations; 1 = off)")
    inpaint.add_argument("--jump-length", type=int, default=1, help="steps per RePaint jump")
    add_sampling_options(inpaint)
    add_model_options(inpaint)
    add_control_options(inpaint)
    inpaint.set_defaults(run=cmd_inpaint)

    invert = commands.add_parser("invert", help="DDIM / null-text inversion of an image, saved for `ldm edit`")
    invert.add_argument("image")
    invert.add_argument("prompt", help="a prompt describing the image")
    invert.add_argument("-o", "--output", default="inversion.safetensors")
    invert.add_argument("--reconstruction", help="also write the image sampled back from the inversion (PNG)")
    invert.add_argument("--steps", type=int, default=50)
    invert.add_argument("--cfg", type=float, default=1.0)
    invert.add_argument("--null-text", action="store_true", help="null-text inversion (for --cfg > 1)")
    invert.add_argument("--fixed-point", type=int, default=0, help="fixed-point refinements per step")
    add_clip_skip_option(invert)
    add_model_options(invert)
    invert.set_defaults(run=cmd_invert)

    edit = commands.add_parser("edit", help="prompt-to-prompt or FlowEdit: edit a generated or a real image")
    edit.add_argument("--method", default="p2p", choices=["p2p", "flowedit"],
                      help="p2p: attention control (through an inversion for --image); flowedit: inversion-free "
                           "(Kulikov et al. 2024)")
    edit.add_argument("--strength", type=float, default=0.8, help="flowedit: the fraction of the schedule edited")
    edit.add_argument("--source-cfg", type=float, default=3.5, help="flowedit: guidance of the source branch")
    edit.add_argument("--source", required=True, help="the source prompt (describing the image with --image)")
    edit.add_argument("--target", required=True, help="the edited prompt")
    edit.add_argument("--image", help="edit this real image (inverted first) instead of a generated one")
    edit.add_argument("--inversion", help="edit through an inversion file written by `ldm invert`")
    edit.add_argument("-o", "--output", default="edit.png", help="the edited image; the source goes to *-source.png")
    edit.add_argument("--edit", default="replace", help="replace, refine, reweight")
    edit.add_argument("--cross", type=float, default=0.8, help="fraction of steps with cross-attention replaced")
    edit.add_argument("--self", dest="self_steps", type=float, default=0.4,
                      help="fraction of steps with self-attention injected")
    edit.add_argument("--blend", nargs="+", help="local blend: words whose region may change")
    edit.add_argument("--reweight", nargs="+", metavar="WORD=W", help="equalizer, e.g. red=2.0")
    edit.add_argument("--null-text", action="store_true", help="null-text inversion for --image")
    add_sampling_options(edit)
    add_model_options(edit)
    edit.set_defaults(run=cmd_edit)

    bench = commands.add_parser("bench", help="time our pipeline against diffusers' on the same weights")
    bench.add_argument("--model", help="diffusers model folder (default: the shipped model)")
    bench.add_argument("--random-model", metavar="NAME",
                       help="benchmark a random-weight model of this architecture instead of a folder: tiny, shapes, "
                            "or full-size sd15, sdxl, sd3 (built on --device), or tiny-sdxl, tiny-sd3")
    bench.add_argument("--steps", type=int, default=20)
    bench.add_argument("--cfg", type=float, default=7.5)
    bench.add_argument("--sampler", help="default: dpmpp_2m, or flow_euler on flow-matching models")
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per pipeline (after one warm-up)")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--dtype", default="float32")
    bench.add_argument("--size", help="N or WxH (default: the model's native size)")
    bench.add_argument("--compile", default="eager", choices=["eager", "inductor"],
                       help="inductor: torch.compile both pipelines' UNet and VAE decoder with weight freezing "
                            "(ours through pipe.compile(); the first call compiles, about a minute on 2 cores)")
    bench.set_defaults(run=cmd_bench)

    convert = commands.add_parser("convert", help="single-file checkpoint <-> diffusers folder")
    convert.add_argument("source", help="an original-layout .safetensors file, or a diffusers folder")
    convert.add_argument("target", help="the folder (from a file) or .safetensors file (from a folder) to write")
    convert.add_argument("--config", help="a diffusers folder with the file's configs (default: SD 1.5's)")
    convert.add_argument("--prediction", choices=["v", "epsilon"], default=None)
    convert.add_argument("--allow-pickle", action="store_true", help="read a .ckpt pickle (weights only)")
    convert.set_defaults(run=cmd_convert)

    merge = commands.add_parser("merge", help="merge checkpoints (the A1111 checkpoint merger)")
    merge.add_argument("a", help="model A (folder or single file): configs and tokenizers come from it")
    merge.add_argument("b", help="model B")
    merge.add_argument("-o", "--output", required=True, help="a new folder, or a .safetensors single file")
    merge.add_argument("--alpha", type=float, default=0.5, help="the multiplier M in [0, 1]")
    merge.add_argument("--method", default="weighted_sum", choices=["weighted_sum", "add_difference"],
                       help="A (1 - M) + B M, or A + (B - C) M")
    merge.add_argument("--base", help="model C for add_difference (the model B was fine-tuned from)")
    merge.add_argument("--config", help="for single files: a diffusers folder with their configs")
    merge.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                       help="dtype the merged weights are written in (the merge itself is float32); auto: the "
                            "inputs' stored dtype when they agree, else float32")
    merge.add_argument("--allow-pickle", action="store_true", help="read .ckpt pickles (weights only)")
    merge.set_defaults(run=cmd_merge)

    commands.add_parser("eval", help="score a model with the shapes-world evaluator (ldm eval -h)", add_help=False)

    train = commands.add_parser("train", help="training recipes (see train/README.md)")
    train.add_argument("recipe", choices=sorted(TRAIN_RECIPES))
    train.add_argument("recipe_args", nargs=argparse.REMAINDER, help="the recipe's own options")
    train.set_defaults(run=cmd_train)
    return parser


def quiet_libraries() -> None:
    """Keep diffusers' and transformers' loading chatter (and their progress bars) off the terminal."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # its options belong to train/eval_model.py
        from train.eval_model import main as eval_main

        quiet_libraries()
        return run_reporting_errors(eval_main, argv[1:])
    args = build_parser().parse_args(argv)
    if args.command != "train":
        quiet_libraries()
    if getattr(args, "n", 1) < 1:
        print("ldm: error: --n must be >= 1", file=sys.stderr)
        return 2
    return run_reporting_errors(args.run, args)


def run_reporting_errors(command, arguments) -> int:
    """Run a command; an error in what the user asked for becomes one line on stderr and exit status 2."""
    try:
        return command(arguments)
    except (ValueError, FileNotFoundError) as err:
        print(f"ldm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
