"""Generation parameters in PNG metadata, in the A1111 web UI's ``parameters`` text chunk, so any image can be
regenerated (``ldm generate --from image.png``) and read by the tools users already have:

    a red circle at the top left
    Negative prompt: blurry
    Steps: 20, Sampler: dpmpp_2m, CFG scale: 7.5, Seed: 42, Size: 128x128, Model: shapes-unet, Schedule: trailing
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

# (our parameter name, A1111 label, parser)
FIELDS = (
    ("steps", "Steps", int),
    ("sampler", "Sampler", str),
    ("cfg_scale", "CFG scale", float),
    ("seed", "Seed", int),
    ("variation_seed", "Variation seed", int),
    ("variation_strength", "Variation seed strength", float),
    ("size", "Size", str),
    ("model", "Model", str),
    ("timestep_spacing", "Schedule", str),
    ("eta", "Eta", float),
    ("guidance_rescale", "CFG rescale", float),
    ("strength", "Denoising strength", float),  # a hires fix's second pass, if there is one
    ("hires_scale", "Hires upscale", float),
    ("hires_steps", "Hires steps", int),
    ("hires_upscaler", "Hires upscaler", str),
    ("hires_resize", "Hires resize", str),  # the web UI's hires target size; read as a scale, never written
    ("mask_mode", "Mask mode", str),
    ("jump_length", "RePaint jump length", int),
    ("jump_n_sample", "RePaint jump samples", int),
    ("edit", "Prompt-to-prompt", str),
    ("edit_method", "Edit method", str),
    ("source_prompt", "Source prompt", str),
    ("source_cfg_scale", "Source CFG scale", float),
    ("loras", "Lora", str),
    ("embeddings", "Embeddings", str),
    ("controlnet", "ControlNet", str),
    ("control_scale", "Control scale", float),
    ("refiner", "Refiner", str),  # A1111's labels for its SDXL refiner stage
    ("refiner_switch", "Refiner switch at", float),
    ("clip_skip", "Clip skip", int),
    ("emphasis", "Emphasis", str),
    ("guidance", "Guidance", str),
    ("apg_eta", "APG eta", float),
    ("apg_norm_threshold", "APG norm threshold", float),
    ("apg_momentum", "APG momentum", float),
    ("zero_init_steps", "Zero init steps", int),
    ("pag_scale", "PAG scale", float),
    ("pag_layers", "PAG layers", str),
    ("seamless", "Seamless", str),
    ("freeu", "FreeU", str),
    ("tiling", "Tiling", str),  # A1111's seamless tiling ("True"); read, never written
    ("schedule_rho", "Schedule rho", float),  # A1111's rho of its Polyexponential / Karras schedules; read only
    ("schedule_type", "Schedule type", str),  # A1111's (1.9+) sigma spacing; read, never written
)
A1111_OFFSETS = {"clip_skip": 1}
"""A1111 counts differently: its "Clip skip: 2" (the penultimate CLIP layer) is diffusers' and our ``clip_skip=1``."""
A1111_SAMPLERS = {
    "DDIM": "ddim", "Euler": "euler", "Euler a": "euler_a", "Heun": "heun", "LMS": "lms", "DPM2": "dpm_2",
    "DPM2 a": "dpm_2_a", "DPM++ 2M": "dpmpp_2m", "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Heun": "dpmpp_2m_sde_heun", "DPM++ 3M SDE": "dpmpp_3m_sde",
    "DPM++ 2S a": "dpmpp_2s_a", "DPM++ SDE": "dpmpp_sde", "UniPC": "unipc_bh1", "LCM": "lcm", "Restart": "restart",
    "PLMS": "plms",
}
"""The A1111 web UI's sampler names and our nearest methods: the same method, not always the same numbers (its
DPM2, DPM2 a and DPM++ 3M SDE drop the next-to-last sigma, its DPM++ 3M SDE weighs the curvature term as
k-diffusion does, its UniPC is the bh1 variant unless "UniPC variant" says otherwise; its Restart re-spaces the main
list by Karras whatever the schedule type). Other names (e.g. "DPM fast", "DPM adaptive") are kept as written, and the
pipeline's unknown-sampler error names them."""
A1111_UPSCALERS = {
    "Latent": "latent", "Latent (antialiased)": "latent_antialiased", "Latent (bicubic)": "latent_bicubic",
    "Latent (bicubic antialiased)": "latent_bicubic_antialiased", "Latent (nearest)": "latent_nearest",
    "Latent (nearest-exact)": "latent_nearest_exact", "Lanczos": "lanczos", "Nearest": "nearest",
}
"""The A1111 web UI's built-in hires-fix upscalers and ours. Its model upscalers (ESRGAN, ...) are kept as written,
and the pipeline's unknown-upscaler error names them."""
A1111_SCHEDULES = {"Karras": "karras", "Exponential": "exponential", "Polyexponential": "exponential",
                   "Beta": "beta", "KL Optimal": "kl_optimal", "Align Your Steps": "align_your_steps",
                   "Uniform": "linspace", "Normal": "linspace", "SGM Uniform": "trailing", "Simple": "trailing",
                   "DDIM": "leading"}
"""A1111's schedule types (a "Schedule type:" field, or before 1.9 a suffix of the sampler name) and our nearest
spacings: its "Beta" places timesteps, not sigmas, at the quantiles; "Polyexponential" is "Exponential" at its
default rho of 1 (another "Schedule rho" keeps the name, for the unknown-spacing error); its "Align Your Steps"
interpolates one level more (see ``align_your_steps_sigmas``); "Uniform" and "Normal" (both timesteps
``linspace(999, 0, n)``) and "SGM Uniform" space fractional timesteps, interpolated in log sigma, where ``linspace``
and ``trailing`` interpolate in sigma; "Simple" takes ``999 - floor(k 1000 / n)``, one above ``trailing``'s
rounded timestep where they differ; "DDIM" (timesteps ``1, 1 + 1000 // n, ...`` below 1000) is ``leading`` with
Stable Diffusion's steps_offset of 1 when n divides 1000, and has more steps otherwise. Others are kept as
written, and the pipeline's unknown-spacing error names them."""


def format_parameters(params: dict) -> str:
    """A1111-style text for one image's parameters (prompt, negative prompt, then ``Label: value`` pairs)."""
    params = {**params, "size": f"{params['width']}x{params['height']}"}
    lines = [params["prompt"]]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    pairs = [f"{label}: {quoted(params[key] + A1111_OFFSETS[key] if key in A1111_OFFSETS else params[key])}"
             for key, label, _ in FIELDS if params.get(key) is not None]
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def quoted(value):
    """A value as the settings line holds it: text with a comma or a quote in JSON quotes, as A1111 writes it."""
    return json.dumps(value) if isinstance(value, str) and ("," in value or '"' in value) else value


SETTING = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')  # A1111's pattern


def parse_parameters(text: str) -> dict:
    """Inverse of :func:`format_parameters`; unknown labels are ignored. Text that is not ours (no "Schedule:",
    which ours always write) is the web UI's, whose prompts are in its syntax: its emphasis is then ``a1111``.
    Raises ValueError if there is no ``Steps:`` line."""
    lines = text.strip("\n").split("\n")
    settings_line = lines[-1]
    if "Steps: " not in settings_line:
        raise ValueError("the text has no 'Steps: ...' line of generation parameters")
    body = lines[:-1]
    negative_at = next((i for i, line in enumerate(body) if line.startswith("Negative prompt: ")), len(body))
    params = {"prompt": "\n".join(body[:negative_at]),
              "negative_prompt": "\n".join(body[negative_at:])[len("Negative prompt: "):]}
    by_label = {label: (key, parse) for key, label, parse in FIELDS}
    for label, value in SETTING.findall(settings_line):
        value = json.loads(value) if value.startswith('"') else value.strip()
        if label in by_label:
            key, parse = by_label[label]
            params[key] = parse(value) - A1111_OFFSETS[key] if key in A1111_OFFSETS else parse(value)
    if "size" in params:
        width, _, height = params.pop("size").partition("x")
        params["width"], params["height"] = int(width), int(height)
    if "timestep_spacing" not in params and "emphasis" not in params:
        params["emphasis"] = "a1111"  # ours always write "Schedule:"; the web UI always reads its prompt syntax
    return from_a1111_names(params)


def from_a1111_names(params: dict) -> dict:
    """Translate the A1111 web UI's sampler, schedule and hires-upscaler names (``"DPM++ 2M Karras"``, or
    ``"DPM++ 2M"`` with ``"Schedule type: Karras"``; ``"Latent (bicubic)"``) to our nearest (``dpmpp_2m``,
    ``timestep_spacing="karras"``; ``latent_bicubic``); ours pass."""
    if params.get("hires_upscaler") in A1111_UPSCALERS:
        params["hires_upscaler"] = A1111_UPSCALERS[params["hires_upscaler"]]
    if params.pop("tiling", None) == "True" and "seamless" not in params:  # the web UI wraps both axes
        params["seamless"] = "xy"
    if params.get("emphasis") == "Original":  # the web UI's name for its default rule (Forge writes it)
        params["emphasis"] = "a1111"
    resize = params.pop("hires_resize", None)
    if resize and "hires_scale" not in params and "width" in params:
        width, _, height = resize.partition("x")
        if width.isdigit() and height.isdigit() and int(width) * params["height"] == int(height) * params["width"]:
            params["hires_scale"] = int(width) / params["width"]
    sampler, schedule = params.get("sampler"), params.pop("schedule_type", None)
    rho = params.pop("schedule_rho", 1.0)
    if schedule == "Polyexponential" and rho != 1.0:  # not exponential: kept for the unknown-spacing error
        schedule = f"Polyexponential (rho {rho:g})"
    if sampler is not None and sampler not in A1111_SAMPLERS:
        name, _, suffix = sampler.rpartition(" ")
        if name in A1111_SAMPLERS and suffix in A1111_SCHEDULES and schedule is None:
            sampler, schedule = name, suffix
    if sampler in A1111_SAMPLERS:
        params["sampler"] = A1111_SAMPLERS[sampler]
    if schedule is not None and "timestep_spacing" not in params:
        params["timestep_spacing"] = A1111_SCHEDULES.get(schedule, schedule)
    return params


def read_parameters(path: str | os.PathLike) -> dict:
    """Generation parameters stored in a PNG written by :func:`save_png` (or by A1111)."""
    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if text is None:
        raise ValueError(f"{path} has no 'parameters' metadata to regenerate from")
    return parse_parameters(text)


def save_png(image: Image.Image, path: str | os.PathLike, params: dict) -> Path:
    """Write ``image`` with its parameters; the file appears whole or not at all (temp file + rename)."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", format_parameters(params))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, suffix=".png.part")
    try:
        with os.fdopen(handle, "wb") as file:
            image.save(file, format="PNG", pnginfo=info)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path
