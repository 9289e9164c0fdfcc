"""Editing real images with the pipeline's samplers: SDEdit / img2img, inpainting, DDIM inversion.

All three reuse the text-to-image machinery: SDEdit is the sampler started part-way down its sigma list,
inpainting is a per-step callback that re-blends the known region, inversion is the sigma list walked upwards.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from scipy import ndimage
from PIL import Image
from tqdm.auto import tqdm

from ldm.guidance import CFGDenoiser
from ldm.inversion import invert_ddim, null_text_optimization
from ldm.samplers import apply_step_callback, renoise, repaint_path, seeded_generators
from ldm.text import prompt_schedule
from pipelines.checks import check_finite, check_non_negative_int, check_positive_int, check_strength
from pipelines.images import image_tensor, mask_tensor

HIRES_UPSCALERS = {
    "latent": ("latent", dict(mode="bilinear", antialias=False)),
    "latent_antialiased": ("latent", dict(mode="bilinear", antialias=True)),
    "latent_bicubic": ("latent", dict(mode="bicubic", antialias=False)),
    "latent_bicubic_antialiased": ("latent", dict(mode="bicubic", antialias=True)),
    "latent_nearest": ("latent", dict(mode="nearest")),
    "latent_nearest_exact": ("latent", dict(mode="nearest-exact")),
    "lanczos": ("pixels", Image.Resampling.LANCZOS),
    "nearest": ("pixels", Image.Resampling.NEAREST),
}
"""How a hires fix enlarges the first pass: the A1111 web UI's built-in upscalers (its "Latent", "Latent
(antialiased)", ..., "Lanczos", "Nearest"), as (space, interpolation)."""
MASK_MODES = ("blend", "differential")
"""How ``inpaint`` reads a grey mask: as a mixing weight (``blend``), or as each pixel's strength (differential
diffusion)."""


@dataclass
class Inversion:
    """What DDIM inversion of one image produced: the VE latent trajectory ``[x at sigmas[-1], ..., x at
    sigmas[0]]`` (``trajectory[-1]`` is the noise that regenerates the image), the sampling sigma list, the
    settings it was made with, and the per-step unconditional embeddings of null-text inversion (or None)."""

    trajectory: list[torch.Tensor]
    sigmas: torch.Tensor
    prompt: str
    negative_prompt: str
    guidance_scale: float
    num_inference_steps: int
    timestep_spacing: str
    latent_shape: tuple[int, ...]
    model: str
    image_latents: torch.Tensor
    null_embeddings: list[torch.Tensor] | None = None
    clip_skip: int | None = None


class EditingMixin:
    """img2img, inpaint, invert and reconstruct for :class:`pipelines.text_to_image.TextToImagePipeline`."""

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [-1, 1] to latents in the network's units (posterior mean, shifted and
        scaled as the VAE config says), float32 on the pipeline's device."""
        config = self.vae.config
        latents = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.mean.float()
        if getattr(config, "shift_factor", None):
            latents = latents - config.shift_factor
        return latents * config.scaling_factor

    def start_index(self, steps: int, strength: float) -> int:
        """SDEdit starts ``int(steps * strength)`` steps before the end of the sigma list (diffusers' rule)."""
        return steps - min(int(steps * strength), steps)

    @torch.no_grad()
    def img2img(self, image, prompt, strength: float = 0.6, callback=None, progress: bool = True, **settings):
        """SDEdit (Meng et al. 2022, sec. 3): noise the encoded image to the sigma a ``strength`` fraction down the
        sampler's list and denoise from there. 0 returns the image through the VAE; 1 is text-to-image.
        ``image``: a picture, or clean latents ``(1, C, h, w)`` in the network's units (``output_type="latent"``
        of a generation, as ComfyUI chains samplers). ``settings`` are those of the text-to-image call
        (negative_prompt, num_inference_steps, sampler, ...)."""
        strength = check_strength(strength)
        factor = self.vae_scale_factor
        latents = self.check_latents(image) if isinstance(image, torch.Tensor) else None
        pixels = image_tensor(image, factor) if latents is None else None
        size = (latents.shape[2] * factor, latents.shape[3] * factor) if latents is not None else pixels.shape[2:]
        request = self.prepare(prompt, height=size[0], width=size[1], **settings)  # all checks before the VAE
        x0 = latents if latents is not None else self.encode(pixels)
        return self.sdedit(request, x0.expand(request.batch, -1, -1, -1), strength, callback, progress)

    def sdedit_sigmas(self, request, strength: float, exact_steps: bool = False) -> torch.Tensor:
        """The sigmas SDEdit walks: the last ``int(steps * strength)`` of the request's list (diffusers' rule);
        with ``exact_steps``, exactly ``request.steps`` steps, the last of a list of ``int(steps / strength)``
        (the web UI's img2img with fixed steps, as its hires fix runs). One sigma when nothing is to be done."""
        if exact_steps:
            if strength == 0:
                return self.sigmas(request.steps, request.sampler, request.spacing)[-1:]
            total = int(request.steps / min(strength, 0.999))
            return self.sigmas(total, request.sampler, request.spacing)[total - request.steps:]
        start = self.start_index(request.steps, strength)
        return self.sigmas(request.steps, request.sampler, request.spacing)[start:]

    def sdedit(self, request, x0: torch.Tensor, strength: float, callback=None, progress: bool = True,
               exact_steps: bool = False, **extra):
        """SDEdit's sampling for a prepared ``request`` from clean latents ``x0`` ``(B, C, h, w)`` (network units):
        the first noise of each image's generator (and variation seed) scaled to the start sigma, then the
        request's sampler down the rest of its list (see :meth:`sdedit_sigmas`). ``extra``: parameters recorded
        beside ``strength``."""
        sigmas = self.sdedit_sigmas(request, strength, exact_steps)
        if len(sigmas) == 1:
            return self.finish(request, x0, strength=strength, **extra)
        denoiser = self.denoiser(request.sampler, request.spacing, request=request)
        x = x0 + float(sigmas[0]) * self.initial_noise(request).to(x0.device)
        x = self.denoise(request, denoiser, x, sigmas, callback, progress)
        return self.finish(request, denoiser.to_model_space(x, float(sigmas[-1])), strength=strength, **extra)

    def hires_request(self, request, scale, upscaler: str, steps: int | None, strength: float):
        """The second pass of a hires fix (the A1111 web UI's "Hires. fix"): ``request`` at ``scale`` times the
        size (each side a multiple of the VAE's factor), exactly ``steps`` steps at ``strength`` (None: as many as
        the first pass; see :meth:`sdedit_sigmas`), its noise drawn afresh from each image's seed (and variation
        seed) as the web UI does, or from the caller's generators where it gave generators; the control image
        resized. Raises ValueError before any work."""
        check_finite("hires_scale", scale, 1.0, 8.0)
        if upscaler not in HIRES_UPSCALERS:
            raise ValueError(f"unknown hires_upscaler {upscaler!r}; known: {', '.join(HIRES_UPSCALERS)}")
        steps = request.steps if steps is None else check_positive_int("hires_steps", steps)
        height, width = int(request.height * scale), int(request.width * scale)
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"hires_scale {scale:g} makes {width}x{height} pixels: each side must be a multiple of "
                             f"{self.vae_scale_factor}")
        seeded = all(seed is not None for seed in request.seeds)
        generators = seeded_generators(request.seeds) if seeded else request.generators
        variation = seeded_generators(request.variation_seeds) if request.variation_seeds else None
        control = None if request.control is None else F.interpolate(request.control, size=(height, width),
                                                                      mode="bilinear", antialias=True)
        hires = replace(request, height=height, width=width, steps=steps, generators=generators,
                        variation_generators=variation, control=control, first_pass_steps=request.steps)
        self.sdedit_sigmas(hires, strength, exact_steps=True)  # raises on a list the schedule cannot space
        self.check_prompt_editing(hires)
        return hires

    def upscale_latents(self, latents: torch.Tensor, size: tuple[int, int], upscaler: str) -> torch.Tensor:
        """Latents ``(B, C, h, w)`` (network units) for images of ``size`` (height, width) pixels: interpolated in
        latent space (``latent*``: A1111's "Latent ..." upscalers, ``torch.nn.functional.interpolate``), or decoded,
        resized as 8-bit images with PIL (``lanczos``, ``nearest``) and encoded again."""
        method, options = HIRES_UPSCALERS[upscaler]
        height, width = size
        if method == "latent":
            factor = self.vae_scale_factor
            return F.interpolate(latents, size=(height // factor, width // factor), **options)
        pictures = [picture.resize((width, height), options) for picture in self.to_pil(self.decode(latents))]
        return self.encode(torch.cat([image_tensor(picture, self.vae_scale_factor) for picture in pictures]))

    @torch.no_grad()
    def flow_edit(self, image, source_prompt: str, target_prompt: str, strength: float = 0.8,
                  source_guidance_scale: float = 3.5, progress: bool = True, **settings):
        """FlowEdit (Kulikov et al. 2024, Alg. 1; :func:`ldm.flow_edit.flow_edit`): edit ``image`` from what
        ``source_prompt`` says to what ``target_prompt`` says with no inversion, along the last ``strength`` of the
        sigma list (the paper's n_max / T). ``image``: a picture, or clean latents ``(1, C, h, w)`` in the
        network's units (``output_type="latent"`` of a generation). The target branch is guided by
        ``guidance_scale`` (``settings``, as for text-to-image), the source branch by ``source_guidance_scale``;
        fresh noise comes from ``seed`` / ``generator``. Flow models couple in flow time as the paper does,
        diffusion models in VE coordinates."""
        from ldm.flow_edit import flow_edit

        strength = check_strength(strength)
        check_finite("source_guidance_scale", source_guidance_scale, 0.0, 100.0)
        pixels = None
        if isinstance(image, torch.Tensor):
            x_src = self.check_latents(image)
            size = dict(height=x_src.shape[2] * self.vae_scale_factor, width=x_src.shape[3] * self.vae_scale_factor)
        else:
            pixels = image_tensor(image, self.vae_scale_factor)
            size = dict(height=pixels.shape[2], width=pixels.shape[3])
        request = self.prepare(target_prompt, **{**settings, **size})
        source_request = self.prepare(source_prompt, **{**settings, **size, "guidance_scale": source_guidance_scale})
        if pixels is not None:  # after prepare: the encoder pads as this request asks
            x_src = self.encode(pixels)
        if request.control is not None:
            raise ValueError("flow_edit does not take a control_image")
        if request.variation_strength > 0:
            raise ValueError("flow_edit draws fresh noise at every step; a variation seed does not apply")
        texts = request.prompts + request.negatives + source_request.prompts
        if request.emphasis == "a1111" and any(len(prompt_schedule(text, request.steps)) > 1 for text in texts):
            raise ValueError("flow_edit takes prompts without prompt editing ([a:b:when], [a|b])")
        x_src = x_src.expand(request.batch, -1, -1, -1)
        start = self.start_index(request.steps, strength)
        extra = dict(source_prompt=source_prompt, strength=strength, source_cfg_scale=source_guidance_scale,
                     edit_method="flowedit")
        if start == request.steps:
            return self.finish(request, x_src, **extra)
        sigmas = self.sigmas(request.steps, "euler", request.spacing)[start:].to(self.device)  # ends at 0
        denoiser = self.denoiser("euler", request.spacing)
        bar = tqdm(total=len(sigmas) - 1, desc="flowedit", disable=not progress, leave=False)

        def on_step(*_):  # returns None: the latents are kept
            bar.update(1)

        try:
            x = flow_edit(self.guided(source_request, denoiser), self.guided(request, denoiser), x_src, sigmas,
                          "flow" if self.is_flow else "ve", request.generators, on_step)
        finally:
            bar.close()
        return self.finish(request, x, **extra)

    def check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Clean latents ``(1, C, h, w)`` of this model (its latent channels), float32 on its device."""
        if latents.dim() != 4 or latents.shape[0] != 1 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must have shape (1, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or infinite values")
        return latents.float().to(self.device)

    @torch.no_grad()
    def inpaint(self, image, mask_image, prompt, strength: float = 1.0, feather: float = 0.0, callback=None,
                progress: bool = True, jump_length: int = 1, jump_n_sample: int = 1, mask_mode: str = "blend",
                **settings):
        """Repaint where ``mask_image`` is white (grey = partly). With a 4-channel UNet the known region is
        re-blended after every step with the input's latents noised to the current sigma (Lugmayr et al. 2022,
        RePaint); ``jump_n_sample`` > 1 adds RePaint's resampling, ``jump_n_sample - 1`` jumps back up
        ``jump_length`` steps every ``jump_length`` steps (about ``jump_n_sample`` times the network evaluations;
        names as diffusers' RePaintScheduler), so the repainted part harmonises with the kept part. A 9-channel
        inpainting UNet gets the mask and masked-image latents as extra input channels (as SD-inpainting). The
        decoded result is composited over the input, so pixels where the mask is 0 are the input's exactly;
        ``feather`` (pixels) softens the mask's inner edge. ``mask_mode="differential"`` reads a grey mask as
        how much each pixel may change (see :meth:`differential_thresholds`) instead of mixing in that proportion;
        then only black pixels are the input's exactly, and none is a mix of input and output."""
        strength = check_strength(strength)
        feather = check_finite("feather", feather, 0.0, 100.0)
        jump_length = check_positive_int("jump_length", jump_length)
        jump_n_sample = check_positive_int("jump_n_sample", jump_n_sample)
        if mask_mode not in MASK_MODES:
            raise ValueError(f"unknown mask_mode {mask_mode!r}; known: {', '.join(MASK_MODES)}")
        if mask_mode == "differential" and self.is_inpainting_unet:
            raise ValueError("a 9-channel inpainting UNet takes the mask as an input; mask_mode='differential' "
                             "re-blends latents, for 4-channel UNets")
        pixels = image_tensor(image, self.vae_scale_factor)
        height, width = pixels.shape[2:]
        mask = mask_tensor(mask_image, (width, height))  # (1, 1, H, W)
        request = self.prepare(prompt, height=height, width=width, **settings)
        x0 = self.encode(pixels).expand(request.batch, -1, -1, -1)
        latent_mask = F.interpolate(mask, size=x0.shape[2:], mode="area").to(x0.device)  # (1, 1, h, w)
        start = self.start_index(request.steps, strength)
        sigmas = self.sigmas(request.steps, request.sampler, request.spacing)[start:]
        noise = self.initial_noise(request).to(x0.device)
        extra_channels, step_callback = None, callback
        if self.is_inpainting_unet:
            masked = self.encode(pixels * (mask < 0.5))
            nearest = F.interpolate(mask, size=x0.shape[2:]).to(x0.device)
            extra_channels = torch.cat([nearest, masked], dim=1).expand(request.batch, -1, -1, -1)
        else:
            thresholds = self.differential_thresholds(sigmas) if mask_mode == "differential" else None

            def blend(i, sigma, x, x0_estimate):
                known = x0 + float(sigmas[i + 1]) * noise
                free = latent_mask
                if thresholds is not None:  # strength 0 is never free
                    free = ((latent_mask >= thresholds[i + 1]) & (latent_mask > 0)).to(latent_mask)
                x = free * x + (1 - free) * known
                return apply_step_callback(callback, i, sigma, x, x0_estimate)  # None from it keeps the blend
            step_callback = blend
        denoiser = self.denoiser(request.sampler, request.spacing, extra_channels, request)
        x = x0 + float(sigmas[0]) * noise
        path = repaint_path(len(sigmas) - 1, max(1, min(jump_length, len(sigmas) - 1)), jump_n_sample)
        x = self.resample_walk(request, denoiser, x, sigmas, path, step_callback, progress)
        latents = denoiser.to_model_space(x, float(sigmas[-1]))
        extra = {"strength": strength, **({"jump_length": jump_length, "jump_n_sample": jump_n_sample}
                                          if jump_n_sample > 1 else {}),
                 **({"mask_mode": mask_mode} if mask_mode != "blend" else {})}
        if request.output_type == "latent":
            return self.finish(request, latents, **extra)
        repainted = (mask > 0).to(mask) if mask_mode == "differential" else mask  # no grey mixing of pixels
        keep = self.feathered(repainted, feather).to(self.device)
        images = keep * self.decode(latents) + (1 - keep) * (pixels.to(self.device) / 2 + 0.5)
        return self.finish(request, latents, images=images, **extra)

    def differential_thresholds(self, sigmas: torch.Tensor) -> list[float]:
        """Differential diffusion (Levin & Fried 2023, "Differential Diffusion: Giving Each Pixel Its Strength",
        sec. 3): a pixel whose mask value (its strength) is ``m`` keeps the input, noised to the current level,
        until the sampling's progress reaches it: it is free from the first sigma whose threshold
        ``(t(sigma) - t_end) / (t_start - t_end)`` is at most ``m``, with t the training timestep of a sigma
        (ComfyUI's rule; t_end that of ``max(sigma_min, sigmas[-1])``). So a pixel of strength m is SDEdited with
        strength about m, 1 is inpainted from the start and 0 is kept. One threshold per sigma ``(n + 1,)``."""
        schedule = self.schedule()
        end = max(float(sigmas[-1]), float(schedule.sigma_min))
        times = schedule.sigma_to_t(sigmas.float().clamp(min=end)).double()  # (n + 1,)
        span = float(times[0] - times[-1])
        return [float((t - times[-1]) / span) if span > 0 else 0.0 for t in times]

    def resample_walk(self, request, denoiser, x: torch.Tensor, sigmas: torch.Tensor, path: list[int],
                      callback, progress: bool) -> torch.Tensor:
        """Follow a :func:`ldm.samplers.repaint_path` over ``sigmas``: each run of consecutive indices is one
        sampler call on that piece of the sigma list, each step back up is :func:`ldm.samplers.renoise` with
        fresh noise from the request's generators. A plain path ``0..n`` is exactly one sampler call."""
        down_steps = sum(b > a for a, b in zip(path, path[1:]))
        with tqdm(total=down_steps, desc="sampling", disable=not progress, leave=False) as bar:
            start = 0
            for end in range(1, len(path) + 1):
                if end < len(path) and path[end] == path[end - 1] + 1:
                    continue
                first, last = path[start], path[end - 1]
                x = self.denoise(request, denoiser, x, sigmas[first:last + 1], callback, False, first_step=first)
                bar.update(last - first)
                if end < len(path):
                    x = renoise(x, float(sigmas[last]), float(sigmas[path[end]]), request.generators)
                start = end
        return x

    @staticmethod
    def feathered(mask: torch.Tensor, feather: float) -> torch.Tensor:
        """Blur a mask's inner edge by ``feather`` pixels (Gaussian sigma) without letting it leak outside."""
        if feather <= 0:
            return mask
        blurred = torch.from_numpy(ndimage.gaussian_filter(mask.numpy(), sigma=(0, 0, feather, feather)))
        return torch.minimum(mask, blurred.float())

    @torch.no_grad()
    def invert(self, image, prompt: str, num_inference_steps: int = 50, guidance_scale: float = 1.0,
               null_text: bool = False, negative_prompt: str | None = None, timestep_spacing: str | None = None,
               fixed_point_iterations: int = 0, null_text_steps: int = 10, progress: bool = True,
               clip_skip: int | None = None) -> Inversion:
        """DDIM inversion (Song et al. 2021; Mokady et al. 2022, sec. 3): walk the DDIM sigma list upwards from the
        image's latents. Sampling back with :meth:`reconstruct` reproduces the image (exactly, up to the
        network, with ``fixed_point_iterations`` > 0; see ``ldm.inversion``). Plain inversion at a guidance scale
        above 1 drifts; ``null_text=True`` inverts at guidance 1 and then optimises one unconditional embedding
        per step (``null_text_steps`` Adam steps at most) so that guided sampling retraces that trajectory.
        ``clip_skip`` (see ``clip_layer``) is kept in the inversion, so sampling back conditions the same way."""
        pixels = image_tensor(image, self.vae_scale_factor)
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        request = self.prepare(prompt, negative_prompt, num_inference_steps, guidance_scale, "ddim",
                               pixels.shape[2], pixels.shape[3], seed=0, timestep_spacing=timestep_spacing,
                               clip_skip=clip_skip)
        if null_text and request.guidance_scale <= 1:
            raise ValueError("null_text inversion is for guidance_scale > 1 (at 1 plain inversion is already exact)")
        fixed_point_iterations = check_non_negative_int("fixed_point_iterations", fixed_point_iterations)
        null_text_steps = check_positive_int("null_text_steps", null_text_steps)
        x0 = self.encode(pixels)
        sigmas = self.sigmas(request.steps, "ddim", request.spacing)
        denoiser = self.denoiser("ddim", request.spacing)
        cond, uncond = self.encode_prompt(request.prompts, request.negatives, tuple(pixels.shape[2:]),
                                          request.clip_skip)
        pivot_scale = 1.0 if null_text else request.guidance_scale
        model = CFGDenoiser(denoiser, cond, uncond, pivot_scale)
        sigmas = sigmas.to(self.device)
        with tqdm(total=request.steps, desc="inverting", disable=not progress, leave=False) as bar:
            trajectory = invert_ddim(model, x0 * denoiser.noise_scale(float(sigmas[-1])), sigmas,
                                     denoiser.noise_scale, fixed_point_iterations,
                                     callback=lambda *_: bar.update(1))
        embeddings = None
        if null_text:
            with torch.enable_grad(), tqdm(total=request.steps, desc="null-text", disable=not progress,
                                           leave=False) as bar:
                embeddings = null_text_optimization(
                    denoiser, trajectory, sigmas, cond, uncond, request.guidance_scale, null_text_steps,
                    callback=lambda i, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.2e}")))
        return Inversion(trajectory, sigmas, request.prompts[0], request.negatives[0], request.guidance_scale,
                         request.steps, request.spacing, tuple(x0.shape), self.name, x0, embeddings,
                         request.clip_skip)

    def check_inversion(self, inversion: Inversion) -> None:
        """An inversion only makes sense with the model and latent size it was made with."""
        if inversion.model != self.name:
            raise ValueError(f"this inversion was made with model {inversion.model!r}, not {self.name!r}")
        if inversion.trajectory[-1].shape[1] != self.latent_channels:
            raise ValueError("this inversion's latents do not fit this model's UNet")

    @torch.no_grad()
    def reconstruct(self, inversion: Inversion, prompt: str | None = None, guidance_scale: float | None = None,
                    output_type: str = "pil", callback=None, progress: bool = True):
        """Sample back with DDIM from an inversion's final noise, with its prompt and guidance unless given."""
        self.check_inversion(inversion)
        request = self.prepare(inversion.prompt if prompt is None else prompt, inversion.negative_prompt,
                               inversion.num_inference_steps,
                               inversion.guidance_scale if guidance_scale is None else guidance_scale, "ddim",
                               inversion.latent_shape[2] * self.vae_scale_factor,
                               inversion.latent_shape[3] * self.vae_scale_factor, seed=0,
                               timestep_spacing=inversion.timestep_spacing, output_type=output_type,
                               clip_skip=inversion.clip_skip)
        denoiser = self.denoiser("ddim", request.spacing)
        x = self.denoise(request, denoiser, inversion.trajectory[-1], inversion.sigmas, callback, progress,
                         inversion.null_embeddings if guidance_scale in (None, inversion.guidance_scale) else None)
        return self.finish(request, denoiser.to_model_space(x, float(inversion.sigmas[-1])))


def save_inversion(inversion: Inversion, path) -> None:
    """Write an inversion to a safetensors file (tensors + JSON settings in its metadata), whole or not at all."""
    import json
    import os
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    tensors = {"trajectory": torch.stack([x.cpu() for x in inversion.trajectory]), "sigmas": inversion.sigmas.cpu(),
               "image_latents": inversion.image_latents.cpu()}
    if inversion.null_embeddings is not None:
        tensors["null_embeddings"] = torch.stack([e.cpu() for e in inversion.null_embeddings])
    settings = {"prompt": inversion.prompt, "negative_prompt": inversion.negative_prompt,
                "guidance_scale": inversion.guidance_scale, "num_inference_steps": inversion.num_inference_steps,
                "timestep_spacing": inversion.timestep_spacing, "latent_shape": list(inversion.latent_shape),
                "model": inversion.model, "clip_skip": inversion.clip_skip}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, temp, metadata={"ldm_inversion": json.dumps(settings)})
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def load_inversion(path) -> Inversion:
    """Read an inversion written by :func:`save_inversion`; a clear error for any other file."""
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            if "ldm_inversion" not in metadata:
                raise ValueError(f"{path} is not an inversion written by `ldm invert`")
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read inversion {path}: {err}") from None
    null = tensors.get("null_embeddings")
    try:
        settings = json.loads(metadata["ldm_inversion"])
        return Inversion(list(tensors["trajectory"]), tensors["sigmas"], settings["prompt"],
                         settings["negative_prompt"], settings["guidance_scale"], settings["num_inference_steps"],
                         settings["timestep_spacing"], tuple(settings["latent_shape"]), settings["model"],
                         tensors["image_latents"], None if null is None else list(null), settings.get("clip_skip"))
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"inversion {path} is incomplete or damaged (missing or bad {err})") from None
