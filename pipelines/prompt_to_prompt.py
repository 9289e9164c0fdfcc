"""Prompt-to-prompt editing of generated and inverted images, and per-word attention heatmaps."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.prompt_to_prompt import AttentionStore, PromptToPrompt, word_tokens


def check_pair(prompts) -> tuple[str, str]:
    if not (isinstance(prompts, (list, tuple)) and len(prompts) == 2 and all(isinstance(p, str) for p in prompts)):
        raise ValueError("prompt-to-prompt takes [source_prompt, target_prompt]: a list of two strings")
    return prompts[0], prompts[1]


def same_noise_generators(generators) -> list[torch.Generator]:
    """Two generators in the state of the first one given (one generator or a list), so that the source and the
    edited image start from the same noise."""
    first = generators if isinstance(generators, torch.Generator) else generators[0]
    state = first.get_state()
    return [torch.Generator(first.device).set_state(state) for _ in range(2)]


def check_plain_emphasis(request) -> None:
    """Attention control finds words by their tokens in the prompt as written, so brackets must be plain text."""
    if request.emphasis != "none":
        raise ValueError("prompt-to-prompt and attention maps read prompts literally (emphasis='none'); weigh words "
                         "with equalizer={word: weight} (edit='reweight') instead")


class PromptToPromptMixin:
    """prompt_to_prompt, edit (through an inversion) and attention_maps for the text-to-image pipeline."""

    @contextmanager
    def controlled(self, controller):
        """Install an attention controller for the duration of a block."""
        self.attention.controller = controller
        try:
            yield controller
        finally:
            self.attention.controller = None

    def p2p_controller(self, request, source, target, **options) -> PromptToPrompt:
        check_plain_emphasis(request)
        latent_size = (request.height // self.vae_scale_factor, request.width // self.vae_scale_factor)
        return PromptToPrompt(self.tokenizer, source, target, request.steps, guided=request.guidance_scale > 1,
                              latent_size=latent_size, **options)

    @torch.no_grad()
    def prompt_to_prompt(self, prompts, seed: int | None = None, edit: str = "replace",
                         cross_replace_steps: float = 0.8, self_replace_steps: float = 0.4,
                         equalizer: dict[str, float] | None = None, local_blend: list[str] | None = None,
                         progress: bool = True, **settings):
        """Generate ``[source_prompt, target_prompt]`` from the same noise, the second edited from the first by
        attention control (Hertz et al. 2022). Returns both images (source first); ``settings`` as for text-to-image
        (``num_inference_steps``, ``guidance_scale``, ``sampler``, ...)."""
        source, target = check_pair(prompts)
        request = self.prepare([source, target], seed=seed, **settings)
        if request.batch != 2:
            raise ValueError("prompt-to-prompt makes one source and one edited image (num_images_per_prompt=1)")
        if request.control is not None:
            raise ValueError("prompt-to-prompt does not take a control_image (use it with text-to-image, img2img or "
                             "inpaint)")
        request.seeds = [request.seeds[0]] * 2
        request.generators = same_noise_generators(request.generators)
        if request.variation_seeds:
            request.variation_seeds = [request.variation_seeds[0]] * 2
            request.variation_generators = same_noise_generators(request.variation_generators)
        controller = self.p2p_controller(request, source, target, edit=edit, cross_replace_steps=cross_replace_steps,
                                         self_replace_steps=self_replace_steps, equalizer=equalizer,
                                         local_blend=local_blend)
        noise = self.initial_noise(request)
        sigmas = self.sigmas(request.steps, request.sampler, request.spacing)
        denoiser = self.denoiser(request.sampler, request.spacing)
        with self.controlled(controller):
            x = self.denoise(request, denoiser, noise * denoiser.noise_scale(float(sigmas[0])), sigmas,
                             controller.step_callback, progress)
        return self.finish(request, denoiser.to_model_space(x, float(sigmas[-1])), edit=edit)

    @torch.no_grad()
    def edit(self, inversion, target_prompt: str, guidance_scale: float | None = None, edit: str = "replace",
             cross_replace_steps: float = 0.8, self_replace_steps: float = 0.4,
             equalizer: dict[str, float] | None = None, local_blend: list[str] | None = None,
             output_type: str = "pil", progress: bool = True):
        """Prompt-to-prompt on a real image through its inversion: the source row regenerates the image from the
        inverted noise with its own prompt, the second row is the edit. Returns both images (source first)."""
        self.check_inversion(inversion)
        request = self.prepare([inversion.prompt, target_prompt], inversion.negative_prompt,
                               inversion.num_inference_steps,
                               inversion.guidance_scale if guidance_scale is None else guidance_scale, "ddim",
                               inversion.latent_shape[2] * self.vae_scale_factor,
                               inversion.latent_shape[3] * self.vae_scale_factor, seed=0,
                               timestep_spacing=inversion.timestep_spacing, output_type=output_type,
                               clip_skip=inversion.clip_skip)
        controller = self.p2p_controller(request, inversion.prompt, target_prompt, edit=edit,
                                         cross_replace_steps=cross_replace_steps,
                                         self_replace_steps=self_replace_steps, equalizer=equalizer,
                                         local_blend=local_blend)
        denoiser = self.denoiser("ddim", request.spacing)
        x = inversion.trajectory[-1].expand(2, -1, -1, -1)
        with self.controlled(controller):
            x = self.denoise(request, denoiser, x, inversion.sigmas, controller.step_callback, progress,
                             inversion.null_embeddings if guidance_scale in (None, inversion.guidance_scale) else None)
        return self.finish(request, denoiser.to_model_space(x, float(inversion.sigmas[-1])), edit=edit)

    @torch.no_grad()
    def attention_maps(self, prompt: str, seed: int | None = None, progress: bool = True, **settings):
        """Generate ``prompt`` while recording cross-attention. Returns ``(image, {word: map (h, w) in [0, 1]},
        heatmaps)`` where ``heatmaps`` is one PIL image: the picture, then one panel per word with its map over
        the picture (what each word attends to; the first thing to look at when an edit misbehaves)."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        words = word_tokens(self.tokenizer, prompt)
        if words and words[-1][1][-1] > 75:
            raise ValueError(f"attention_maps shows prompts of at most 75 tokens (one window); this one has "
                             f"{words[-1][1][-1]}")
        request = self.prepare(prompt, seed=seed, **{**settings, "output_type": "pt"})
        check_plain_emphasis(request)
        latent_size = (request.height // self.vae_scale_factor, request.width // self.vae_scale_factor)
        store = AttentionStore(guided=request.guidance_scale > 1, latent_size=latent_size)
        noise = self.initial_noise(request)
        sigmas = self.sigmas(request.steps, request.sampler, request.spacing)
        denoiser = self.denoiser(request.sampler, request.spacing)
        with self.controlled(store):
            x = self.denoise(request, denoiser, noise * denoiser.noise_scale(float(sigmas[0])), sigmas, None,
                             progress)
        image = self.decode(denoiser.to_model_space(x, float(sigmas[-1])))  # (1, 3, H, W)
        average = store.average()[0]  # (keys, h, w)
        maps = {}
        for word, positions in words:
            word_map = average[positions].sum(0)
            maps[word] = word_map / word_map.max().clamp(min=1e-8)
        return self.to_pil(image)[0], maps, heatmap_grid(image[0], maps)


def heatmap_grid(image: torch.Tensor, maps: dict[str, torch.Tensor]) -> Image.Image:
    """The image ``(3, H, W)`` in [0, 1] followed by one panel per word: its map (upsampled, red) over the image."""
    height, width = image.shape[1:]
    base = image.permute(1, 2, 0).cpu().numpy()
    panels = [base]
    for word_map in maps.values():
        heat = F.interpolate(word_map[None, None].float(), size=(height, width), mode="bilinear",
                             align_corners=False)[0, 0].cpu().numpy()[..., None]
        red = np.zeros_like(base)
        red[..., 0] = 1.0
        panels.append(0.4 * base + 0.6 * (heat * red + (1 - heat) * base.mean(-1, keepdims=True)))
    return Image.fromarray((np.concatenate(panels, axis=1).clip(0, 1) * 255).round().astype(np.uint8))
