"""``ldm bench``: our pipeline against diffusers' own pipeline for the model's family (StableDiffusionPipeline,
StableDiffusionXLPipeline or StableDiffusion3Pipeline, as the folder's model_index.json names it) on the same
weights, in one process.

First both generate from the same starting noise at identical settings (same sampler, steps, CFG, size, dtype) and
the largest pixel difference is reported, so the timings compare the same computation. Timed runs are alternated
(ours, theirs, ours, ...) after one warm-up each, so both see the same machine state; the report gives median
seconds per image and the ratio, at identical settings and then each pipeline at its own defaults, and on a GPU
each pipeline's weights and peak working memory. A benchmark, never a test.
"""
from __future__ import annotations

import inspect
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

# our sampler -> (diffusers scheduler class name, extra config)
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    # diffusers weighs the third-order curvature term otherwise (see ldm.samplers.dpmpp_multistep_update):
    # the same work per step, a different result
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "lcm": ("LCMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc_bh1": ("UniPCMultistepScheduler", {"solver_type": "bh1"}),
}
# on flow-matching models (SD3)
DIFFUSERS_FLOW_SCHEDULERS = {
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
}
PROMPT = "a red circle at the top left"
GIB = 2**30


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def diffusers_pipeline(folder, sampler: str | None, device, dtype, flow: bool = False):
    """diffusers' pipeline class named by the folder's model_index.json, with the scheduler matching ``sampler``
    (None: the folder's own scheduler)."""
    import diffusers

    index = json.loads((Path(folder) / "model_index.json").read_text())
    absent = {name: None for name, value in index.items() if value == [None, None]}  # e.g. SD3 without its T5
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(str(folder), local_files_only=True,
                                                                    torch_dtype=dtype, **absent)
    if sampler is not None:
        name, extra = matching_scheduler(sampler, flow)
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def matching_scheduler(sampler: str, flow: bool) -> tuple[str, dict]:
    """The diffusers scheduler class name and extra config that run ``sampler``'s method."""
    table = DIFFUSERS_FLOW_SCHEDULERS if flow else DIFFUSERS_SCHEDULERS
    if sampler not in table:
        kind = "a flow-matching" if flow else "this"
        raise ValueError(f"no diffusers scheduler to compare sampler {sampler!r} with on {kind} model; "
                         f"use one of: {', '.join(table)}")
    return table[sampler]


def weight_bytes(networks) -> int:
    """Bytes of every parameter and buffer of ``networks``."""
    return sum(t.numel() * t.element_size() for network in networks
               for t in (*network.parameters(), *network.buffers()))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(runs: dict, repeats: int, device) -> tuple[dict[str, float], dict[str, int]]:
    """Median seconds of each zero-argument callable in ``runs``, alternating between them; on a GPU also each
    one's peak memory beyond what was allocated before it ran (activations and workspace), in bytes."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    peaks = {name: 0 for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            run()
            sync(device)
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) - before)
    return {name: statistics.median(values) for name, values in times.items()}, peaks


def main(args) -> int:
    from pipelines.cli import UsageError, pick_device, pick_dtype
    from pipelines.text_to_image import TextToImagePipeline

    device, dtype = pick_device(args.device), pick_dtype(args.dtype)
    with tempfile.TemporaryDirectory(prefix="ldm-bench-") as scratch:  # removed with whatever it holds
        model = args.model
        if args.random_model:
            from pipelines.random_models import RANDOM_MODELS, save_random_model

            if args.random_model not in RANDOM_MODELS:
                raise UsageError(f"unknown --random-model {args.random_model!r}; known: {', '.join(RANDOM_MODELS)}")
            model = save_random_model(scratch, args.random_model, device=device, dtype=dtype)
        ours = TextToImagePipeline.from_pretrained(model, device=device, dtype=dtype)
        report(args, ours, device, dtype, run_bench(args, ours, device, dtype))
    return 0


def run_bench(args, ours, device, dtype) -> dict:
    """Compare ``ours`` with diffusers' pipeline on the same folder: both ``images`` ``(1, H, W, 3)`` from
    identical settings and noise and their largest difference (``max_difference``, pixel values in [0, 1]), then
    the timings and peak memory of :func:`time_alternating` at identical settings (``same``) and at each
    pipeline's defaults (``defaults``)."""
    from pipelines.cli import parse_size

    native = ours.unet.config.sample_size * ours.vae_scale_factor
    width, height = parse_size(args.size) if args.size else (native, native)
    sampler = args.sampler or ("flow_euler" if ours.is_flow else "dpmpp_2m")
    matched = diffusers_pipeline(ours.path, sampler, device, dtype, ours.is_flow)
    theirs_default = diffusers_pipeline(ours.path, None, device, dtype)
    if args.compile == "inductor":
        from pipelines.compiled import inductor_frozen

        ours.compile("inductor")
        for theirs in (matched, theirs_default):  # the same compiler on the same two networks
            network = theirs.transformer if ours.is_mmdit else theirs.unet
            network.forward = inductor_frozen(network.forward)
            theirs.vae.decode = inductor_frozen(theirs.vae.decode)
    settings = dict(num_inference_steps=args.steps, guidance_scale=args.cfg, height=height, width=width)

    def seeded(seed=0):
        return torch.Generator("cpu").manual_seed(seed)

    shape = (1, ours.unet.config.in_channels, height // ours.vae_scale_factor, width // ours.vae_scale_factor)
    latents = torch.randn(shape, generator=seeded())
    ours_image = ours(PROMPT, sampler=sampler, latents=latents, output_type="np", progress=False, **settings).images
    theirs_image = matched(PROMPT, latents=latents.to(device, dtype), output_type="np", **settings).images
    same, same_peaks = time_alternating({
        "ours": lambda: ours(PROMPT, sampler=sampler, generator=seeded(), progress=False, **settings),
        "diffusers": lambda: matched(PROMPT, generator=seeded(), **settings),
    }, args.repeats, device)
    defaults, default_peaks = time_alternating({
        "ours": lambda: ours(PROMPT, seed=0, height=height, width=width, progress=False),
        "diffusers": lambda: theirs_default(PROMPT, generator=seeded(), height=height, width=width),
    }, args.repeats, device)
    return dict(
        size=(width, height), sampler=sampler, images=(ours_image, theirs_image),
        max_difference=float(abs(ours_image.astype("float64") - theirs_image.astype("float64")).max()),
        same=same, defaults=defaults,
        peaks={name: max(same_peaks[name], default_peaks[name]) for name in same},
        weights={"ours": weight_bytes(ours.text_encoders + [ours.unet, ours.vae]),
                 "diffusers": weight_bytes(c for c in matched.components.values() if isinstance(c, torch.nn.Module))},
        diffusers_class=type(matched).__name__, defaults_label=defaults_label(ours, theirs_default))


def call_defaults(pipe) -> dict:
    """The default value of each argument of ``pipe``'s ``__call__``."""
    return {k: p.default for k, p in inspect.signature(type(pipe).__call__).parameters.items()}


def defaults_label(ours, theirs) -> str:
    """Sampler, steps and CFG each pipeline uses when the caller sets none."""
    mine, their = call_defaults(ours), call_defaults(theirs)
    return (f"ours: {mine['sampler']}, {mine['num_inference_steps']} steps, CFG {mine['guidance_scale']} | "
            f"diffusers: {type(theirs.scheduler).__name__}, {their['num_inference_steps']} steps, "
            f"CFG {their['guidance_scale']}")


def report(args, ours, device, dtype, result: dict) -> None:
    """Print what :func:`run_bench` measured."""
    width, height = result["size"]
    same, defaults = result["same"], result["defaults"]
    name = f"random-weight '{args.random_model}' preset" if args.random_model else str(ours.path)
    print(f"model {name} | {width}x{height} | {dtype} | {args.compile} | {device_name(device)} | "
          f"torch {torch.__version__} | against diffusers' {result['diffusers_class']}")
    print(f"same noise and settings: images differ by at most {result['max_difference']:.2g} (pixel values in [0, 1])")
    print(f"same settings ({result['sampler']}, {args.steps} steps, CFG {args.cfg}): "
          f"ours {same['ours']:.3f} s/image, diffusers {same['diffusers']:.3f} s/image, "
          f"ratio diffusers/ours {same['diffusers'] / same['ours']:.2f}x")
    print(f"defaults ({result['defaults_label']}): "
          f"ours {defaults['ours']:.3f} s/image, diffusers {defaults['diffusers']:.3f} s/image, "
          f"ratio diffusers/ours {defaults['diffusers'] / defaults['ours']:.2f}x")
    if device.type == "cuda":
        weights, peaks = result["weights"], result["peaks"]
        print("GPU memory, weights + peak working memory of a generation: "
              + ", ".join(f"{k} {weights[k] / GIB:.2f} + {peaks[k] / GIB:.2f} GiB" for k in ("ours", "diffusers")))
