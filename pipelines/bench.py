"""``ldm bench``: our pipeline against diffusers' StableDiffusionPipeline on the same weights, in one process.

Runs are alternated (ours, theirs, ours, ...) after one warm-up each, so both see the same machine state; the
report gives median seconds per image and the ratio, first at identical settings (same sampler, steps, CFG, size,
dtype), then each pipeline at its own defaults. A benchmark, never a test.
"""
from __future__ import annotations

import inspect
import platform
import statistics
import tempfile
import time

import torch

# our sampler -> (diffusers scheduler class name, extra config)
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def diffusers_pipeline(folder, sampler: str | None, device, dtype):
    """diffusers' StableDiffusionPipeline on the folder, with the scheduler matching ``sampler`` (None: the
    folder's own scheduler)."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
    if sampler is not None:
        name, extra = DIFFUSERS_SCHEDULERS[sampler]
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(runs: dict, repeats: int, device) -> dict[str, float]:
    """Median seconds of each zero-argument callable in ``runs``, alternating between them."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(args) -> int:
    from pipelines.cli import pick_device, pick_dtype
    from pipelines.text_to_image import TextToImagePipeline

    device, dtype = pick_device(args.device), pick_dtype(args.dtype)
    with tempfile.TemporaryDirectory(prefix="ldm-bench-") as scratch:
        model = args.model
        if args.random_model:
            from pipelines.random_models import save_random_model

            model = save_random_model(scratch, args.random_model)
        return run_bench(args, TextToImagePipeline.from_pretrained(model, device=device, dtype=dtype), device, dtype)


def run_bench(args, ours, device, dtype) -> int:
    from pipelines.cli import parse_size
    from pipelines.text_to_image import TextToImagePipeline

    native = ours.unet.config.sample_size * ours.vae_scale_factor
    width, height = parse_size(args.size) if args.size else (native, native)
    matched = diffusers_pipeline(ours.path, args.sampler, device, dtype)
    theirs_default = diffusers_pipeline(ours.path, None, device, dtype)
    if args.compile == "inductor":
        from pipelines.compiled import inductor_frozen

        ours.compile("inductor")
        for theirs in (matched, theirs_default):  # the same compiler on the same two networks
            theirs.unet.forward = inductor_frozen(theirs.unet.forward)
            theirs.vae.decode = inductor_frozen(theirs.vae.decode)
    prompt = "a red circle at the top left"
    settings = dict(num_inference_steps=args.steps, guidance_scale=args.cfg, height=height, width=width)

    def seeded(seed=0):
        return torch.Generator("cpu").manual_seed(seed)

    same = time_alternating({
        "ours": lambda: ours(prompt, sampler=args.sampler, generator=seeded(), progress=False, **settings),
        "diffusers": lambda: matched(prompt, generator=seeded(), **settings),
    }, args.repeats, device)
    defaults = time_alternating({
        "ours": lambda: ours(prompt, seed=0, height=height, width=width, progress=False),
        "diffusers": lambda: theirs_default(prompt, generator=seeded(), height=height, width=width),
    }, args.repeats, device)

    name = f"random-weight '{args.random_model}' preset" if args.random_model else str(ours.path)
    print(f"model {name} | {width}x{height} | {dtype} | {args.compile} | {device_name(device)} | "
          f"torch {torch.__version__}")
    print(f"same settings ({args.sampler}, {args.steps} steps, CFG {args.cfg}): "
          f"ours {same['ours']:.3f} s/image, diffusers {same['diffusers']:.3f} s/image, "
          f"ratio diffusers/ours {same['diffusers'] / same['ours']:.2f}x")
    ours_defaults = {k: p.default for k, p in inspect.signature(TextToImagePipeline.__call__).parameters.items()}
    theirs_defaults = {k: p.default for k, p in inspect.signature(type(theirs_default).__call__).parameters.items()}
    print(f"defaults (ours: {ours_defaults['sampler']}, {ours_defaults['num_inference_steps']} steps, "
          f"CFG {ours_defaults['guidance_scale']} | diffusers: {type(theirs_default.scheduler).__name__}, "
          f"{theirs_defaults['num_inference_steps']} steps, CFG {theirs_defaults['guidance_scale']}): "
          f"ours {defaults['ours']:.3f} s/image, diffusers {defaults['diffusers']:.3f} s/image, "
          f"ratio diffusers/ours {defaults['diffusers'] / defaults['ours']:.2f}x")
    return 0
