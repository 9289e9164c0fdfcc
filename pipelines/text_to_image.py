"""TextToImagePipeline: prompt -> CLIP embedding -> guided denoiser -> sampler over sigmas -> VAE decode.

The diffusion maths lives in ``ldm/``; this module wires it to the networks, validates user input before any
work starts, and turns latents into images.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ldm.attention import IdentitySelfAttention, install_attention_hook, self_attention_places
from ldm.denoiser import Denoiser
from ldm.guidance import (GUIDANCE_METHODS, CFGDenoiser, ProjectedGuidance, ZeroStarGuidance, check_guidance_scale,
                          guidance_scale_embedding)
from ldm.loading import Components, load_components
from ldm.samplers import SAMPLERS, get_sampler, randn_like, restart_plan, seeded_generators, slerp
from ldm.schedules import TIMESTEP_SPACINGS, DiscreteSchedule, FlowSchedule
from ldm.text import (EMPHASIS_SYNTAXES, T5_TOKENS, emphasize, encode_tokens, encode_tokens_and_pooled, plain_text,
                      prompt_schedule, sd3_context, split_conjunction, tokenize_batch, tokenize_weighted_batch)
from pipelines.checks import check_finite, check_non_negative_int, check_positive_int, check_prompts
from pipelines.compiled import COMPILE_BACKENDS, CompiledNetwork
from pipelines.controlnet import ControlNetMixin, control_residuals
from pipelines.editing import EditingMixin
from pipelines.embeddings import TextualInversionMixin
from pipelines.lora import LoraMixin
from pipelines.prompt_to_prompt import PromptToPromptMixin

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "shapes-unet"


@dataclass
class GenerationOutput:
    """``images``: PIL images (``"pil"``), a float array ``(B, H, W, 3)`` in [0, 1] (``"np"``), a tensor
    ``(B, 3, H, W)`` in [0, 1] (``"pt"``) or the final latents ``(B, C, h, w)`` (``"latent"``);
    ``seeds``: the seed of each image (None when the caller passed generators); ``parameters``: one dict per
    image with everything needed to regenerate it."""

    images: list | np.ndarray | torch.Tensor
    seeds: list[int | None]
    parameters: list[dict] = field(default_factory=list)


class TextToImagePipeline(EditingMixin, PromptToPromptMixin, LoraMixin, TextualInversionMixin, ControlNetMixin):
    """Text-to-image generation with any loaded UNet model (ε, v or x0 prediction; VP or zero-SNR schedules)."""

    def __init__(self, components: Components, name: str | None = None):
        self.unet = components.unet.eval()
        self.vae = components.vae.eval()
        self.text_encoder = components.text_encoder.eval() if components.text_encoder is not None else None
        # SDXL's refiner has only the second tower; its tokenizer then serves word positions (prompt-to-prompt)
        self.tokenizer = components.tokenizer if components.tokenizer is not None else components.tokenizer_2
        self.text_encoder_2 = components.text_encoder_2.eval() if components.text_encoder_2 is not None else None
        self.tokenizer_2 = components.tokenizer_2
        self.force_zeros_for_empty_prompt = components.force_zeros_for_empty_prompt
        self.text_encoder_3 = components.text_encoder_3.eval() if components.text_encoder_3 is not None else None
        self.tokenizer_3 = components.tokenizer_3
        self.requires_aesthetics_score = components.requires_aesthetics_score
        self.scheduler_config = dict(components.scheduler_config)
        self.name = name or components.path.name
        self.path = components.path
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        for network in self.text_encoders + [self.unet, self.vae]:
            network.requires_grad_(False)  # inference; null-text inversion differentiates w.r.t. an embedding only
        self.attention = install_attention_hook(self.unet)
        if self.is_mmdit and self.text_encoder_3 is None:  # SD3's 256 zero T5 tokens, computed as one (exact)
            self.attention.tail_repeats = T5_TOKENS
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.dtype = torch.float32
        self.compiled: dict[str, CompiledNetwork] = {}
        self.seamless, self.freeu = "none", None

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, allow_pickle: bool = False,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        config: str | Path | None = None, prediction: str | None = None):
        """Load a diffusers-format folder or an original-layout single file (no argument: the shipped default
        model), offline. For single files, ``config`` names a diffusers folder whose configs describe it (default:
        SD 1.5's) and ``prediction`` (``epsilon`` / ``v_prediction``) overrides the scheduler's."""
        components = load_components(DEFAULT_MODEL if path is None else path, allow_pickle, config, prediction)
        return cls(components).to(device, dtype)

    @property
    def text_encoders(self) -> list:
        return [t for t in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if t is not None]

    @property
    def is_mmdit(self) -> bool:
        """An SD3-style MMDiT (Esser et al. 2024): joint text-image attention instead of cross-attention."""
        return "joint_attention_dim" in self.unet.config

    @property
    def is_sdxl(self) -> bool:
        """Two text towers and size/crop micro-conditioning (Podell et al. 2023, sec. 2.2)."""
        return self.text_encoder_2 is not None and not self.is_mmdit

    @property
    def is_flow(self) -> bool:
        return "FlowMatch" in self.scheduler_config.get("_class_name", "")

    @property
    def is_guidance_distilled(self) -> bool:
        """Whether the UNet takes the guidance scale as an embedding instead of running CFG (a full latent
        consistency model: diffusers' ``time_cond_proj_dim``)."""
        return bool(getattr(self.unet.config, "time_cond_proj_dim", None))

    def guidance_condition(self, request: "Request | None") -> torch.Tensor | None:
        """A guidance-distilled UNet's ``timestep_cond``, ``(1, D)``: the request's guidance scale embedded
        (:func:`ldm.guidance.guidance_scale_embedding`); None for other networks."""
        if not self.is_guidance_distilled:
            return None
        if request is None:
            raise ValueError("this UNet is guidance-distilled (a full LCM: it takes the guidance scale as an "
                             "embedding); only text-to-image, img2img and inpainting run it")
        return guidance_scale_embedding(request.guidance_scale, self.unet.config.time_cond_proj_dim)

    @property
    def starts_at_infinite_noise(self) -> bool:
        """Whether full-strength sampling starts at zero SNR (a flow model's t = 1, a zero-terminal-SNR schedule's
        last timestep; Lin et al. 2023), whose sigma only stands in for infinity."""
        return self.is_flow or bool(self.scheduler_config.get("rescale_betas_zero_snr", False))

    def schedule(self, sampler: str = "euler") -> DiscreteSchedule | FlowSchedule:
        """The folder's noise schedule; a zero-terminal-SNR schedule ends at the sampler's stand-in for
        alpha_bar = 0 (see ``ldm.schedules``)."""
        config = self.scheduler_config
        if self.is_flow:
            return FlowSchedule(shift=config.get("shift", 1.0),
                                num_train_timesteps=config.get("num_train_timesteps", 1000))
        return DiscreteSchedule.from_config(config, get_sampler(sampler).terminal_alpha_bar)

    @property
    def device(self) -> torch.device:
        """The denoiser's device (its first weight's: diffusers' ``.device`` walks every module, 2 ms a call)."""
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """Move networks to ``device`` and cast them to ``dtype`` (float32, bfloat16, float16). In float16 the VAE
        stays float32 so decoding never overflows into NaN/black images; sampling maths is always float32."""
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.dtype = dtype or self.dtype
        vae_dtype = torch.float32 if self.dtype == torch.float16 else self.dtype
        networks = [(self.unet, self.dtype), (self.vae, vae_dtype)] + [(t, self.dtype) for t in self.text_encoders]
        if self.controlnet is not None:
            networks.append((self.controlnet, self.dtype))
        for module, module_dtype in networks:
            module.to(device=device, **({"dtype": module_dtype} if module.dtype != module_dtype else {}))
        return self

    def compile(self, backend: str = "inductor") -> "TextToImagePipeline":
        """Run the denoiser network and the VAE decoder through ``torch.compile`` with inductor's weight freezing
        and C++ wrapper (``"inductor"``), or eagerly again (``"eager"``); see ``pipelines.compiled``. Each new
        input shape compiles on its first call (about a minute on a 2-core CPU); weight changes (LoRA, ``.to()``,
        in-place edits, replaced tensors) recompile at the next request.
        The eager networks serve whenever gradients are on (null-text inversion) or an attention controller is
        set (prompt-to-prompt, attention maps), and for tiled decoding."""
        if backend not in COMPILE_BACKENDS:
            raise ValueError(f"unknown compile backend {backend!r}; known: {', '.join(COMPILE_BACKENDS)}")
        self.compiled = {}
        if backend == "inductor":
            torch.compiler.reset()

            def unet_state() -> tuple:  # what a compiled graph depends on besides the weights and the inputs
                processors = tuple(map(id, self.unet.attn_processors.values()))
                return tuple(self.loras.items()), self.unet.training, processors, self.seamless, self.freeu

            self.compiled = {"unet": CompiledNetwork(self.unet, self.unet, unet_state),
                             "vae_decode": CompiledNetwork(self.vae.decode, self.vae, lambda: self.seamless)}
        return self

    def network(self, name: str, eager: Callable) -> Callable:
        """The compiled copy of ``name`` when there is one and it may serve this call, else ``eager``."""
        compiled = self.compiled.get(name)
        if compiled is None or torch.is_grad_enabled() or self.attention.controller is not None:
            return eager
        return compiled

    def apply_seamless(self, axes: str) -> None:
        """Seamless tiling (the A1111 web UI's "Tiling"): every padded 2-D convolution of the denoiser, the VAE
        and a loaded ControlNet pads circularly along ``axes`` (``"x"``: the left and right edges meet, ``"y"``: top
        and bottom, ``"xy"``: both) and with zeros along the others; ``"none"`` restores the networks as trained.
        A UNet and a VAE decoder have no position embeddings, so they then commute with circular shifts (of the
        latents by multiples of the UNet's downsampling), and so does sampling: the image is a tile of an
        endless pattern (tested). The VAE encoder's downsampling pads one side by hand, as diffusers writes it,
        so an img2img input is read with seams. Set for each request by :meth:`prepare`; stays until the next."""
        if axes not in SEAMLESS_AXES:
            raise ValueError(f"unknown seamless axes {axes!r}; known: {', '.join(SEAMLESS_AXES)}")
        if axes != "none" and self.is_mmdit:
            raise ValueError("seamless tiling needs a convolutional denoiser; an MMDiT has position embeddings")
        if axes == self.seamless == "none":  # the networks as trained already: no layer to visit
            return
        for network in (n for n in (self.unet, self.vae, self.controlnet) if n is not None):
            for conv in network.modules():
                if not isinstance(conv, torch.nn.Conv2d) or not isinstance(conv.padding, tuple) \
                        or not any(conv.padding):
                    continue
                if axes == "none":
                    conv.__dict__.pop("_conv_forward", None)  # the class's method again
                elif axes != self.seamless or "_conv_forward" not in conv.__dict__:  # new axes, or a new layer (LoRA)
                    conv._conv_forward = lambda x, weight, bias, conv=conv: wrapped_convolution(conv, axes, x,
                                                                                               weight, bias)
        self.seamless = axes
        self.refresh_compiled()

    def apply_freeu(self, freeu: tuple[float, float, float, float] | None) -> None:
        """FreeU (Si et al. 2024, "FreeU: Free Lunch in Diffusion U-Net", eq. 6-7), as diffusers' UNet implements
        it (``enable_freeu``): in the first two decoder stages, the first half of the backbone's channels is
        multiplied by ``b1`` / ``b2`` and the low frequencies of the skip features by ``s1`` / ``s2``. ``None``
        turns it off. Set for each request by :meth:`prepare`; stays until the next."""
        if self.is_mmdit or freeu == self.freeu:  # prepare refuses FreeU on an MMDiT; a plain UNet needs no call
            return
        if freeu is None:
            self.unet.disable_freeu()
        else:
            self.unet.enable_freeu(*freeu)
        self.freeu = freeu
        self.refresh_compiled()

    def refresh_compiled(self) -> None:
        """Recompile the compiled networks whose weights or state changed since their last compile (the apply_*
        methods call it when they change what a compiled graph depends on)."""
        for compiled in self.compiled.values():
            compiled.refresh()

    # -- conditioning -------------------------------------------------------------------------------------------
    def clip_layer(self, clip_skip: int | None) -> int | None:
        """The CLIP hidden-state index the conditioning reads with ``clip_skip`` (diffusers' meaning: layers skipped
        from the end; A1111's "Clip skip" is one more): SD 1.x/2.x read the final layer (``None``), or
        ``-(clip_skip + 1)`` passed through the final layer norm; SDXL and SD3 read the penultimate layer, ``-2``,
        or ``-(clip_skip + 2)``. Raises ValueError where the shallowest tower has no such layer."""
        clip_skip = 0 if clip_skip is None else check_non_negative_int("clip_skip", clip_skip)
        default = -2 if (self.is_sdxl or self.is_mmdit) else -1
        layers = min(t.config.num_hidden_layers for t in (self.text_encoder, self.text_encoder_2) if t is not None)
        if clip_skip > layers + 1 + default:
            raise ValueError(f"clip_skip must be between 0 and {layers + 1 + default} for this model's "
                             f"{layers}-layer text encoder, got {clip_skip}")
        if default == -1 and clip_skip == 0:
            return None
        return default - clip_skip

    @staticmethod
    def tokenize(tokenizer, texts: list[str], emphasis: str, min_windows: int = 1):
        """Token ids ``(B, W, L)`` of ``texts`` and, when ``emphasis`` reads brackets as weights, each token's weight
        ``(B, W, L)`` (else None); see ``ldm.text``."""
        if emphasis == "none":
            return tokenize_batch(tokenizer, texts, min_windows), None
        return tokenize_weighted_batch(tokenizer, texts, min_windows)

    def encode_prompt(self, prompts: list[str], negative: list[str], size: tuple[int, int] | None = None,
                      clip_skip: int | None = None, emphasis: str = "none"):
        """Embeddings ``(B, W * 77, D)`` of prompts and negative prompts, padded to the same window count W, from
        the CLIP layer :meth:`clip_layer` picks for ``clip_skip``; with ``emphasis="a1111"`` each CLIP tower's
        states are weighted as the A1111 web UI weighs them (``ldm.text.emphasize``; pooled embeddings are not). For
        SDXL, dicts: ``hidden`` (both towers' penultimate states side by side, ``(B, W * 77, 768 + 1280)``; the
        refiner has the second tower only), ``text_embeds`` (the second tower's pooled projection, ``(B, 1280)``)
        and ``time_ids`` ``(B, 6)`` = (original size, crop top-left, target size), here ``(H, W, 0, 0, H, W)`` for
        ``size = (H, W)``; the refiner's ``(B, 5)`` end with an aesthetic score instead of the target size (6 for
        prompts, 2.5 for negative prompts: diffusers' defaults). An empty negative prompt is all zeros when the
        model says so (``force_zeros_for_empty_prompt``), as diffusers."""
        layer = self.clip_layer(clip_skip)
        if self.is_mmdit:
            return self.encode_prompt_mmdit(prompts, negative, emphasis, layer)
        texts = prompts + negative
        ids, weights = self.tokenize(self.tokenizer, texts, emphasis)  # (2B, W, L) each
        if not self.is_sdxl:
            hidden = emphasize(encode_tokens(self.text_encoder, ids, layer, final_norm=True), weights).float()
            return hidden[:len(prompts)], hidden[len(prompts):]
        ids_2, weights_2 = self.tokenize(self.tokenizer_2, texts, emphasis, min_windows=ids.shape[1])
        hidden_2, pooled = encode_tokens_and_pooled(self.text_encoder_2, ids_2, layer)
        towers = [] if self.text_encoder is None else [emphasize(encode_tokens(self.text_encoder, ids, layer), weights)]
        hidden = torch.cat(towers + [emphasize(hidden_2, weights_2)], dim=-1).float()
        pooled = pooled.float()  # (2B, P)
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([False] * len(prompts) + [not n for n in negative], device=hidden.device)
            hidden[empty], pooled[empty] = 0.0, 0.0
        height, width = size if size is not None else (self.unet.config.sample_size * self.vae_scale_factor,) * 2
        if self.requires_aesthetics_score:
            rows = [[height, width, 0, 0, 6.0]] * len(prompts) + [[height, width, 0, 0, 2.5]] * len(negative)
        else:
            rows = [[height, width, 0, 0, height, width]] * len(hidden)
        time_ids = torch.tensor(rows, dtype=torch.float32, device=hidden.device)
        both = {"hidden": hidden, "text_embeds": pooled, "time_ids": time_ids}
        return ({k: v[:len(prompts)] for k, v in both.items()}, {k: v[len(prompts):] for k, v in both.items()})

    def encode_prompt_mmdit(self, prompts: list[str], negative: list[str], emphasis: str = "none", layer: int = -2):
        """SD3's conditioning: ``hidden``, both CLIP towers' states at ``layer`` (the penultimate unless clip skip
        says otherwise; weighted as ``emphasis`` says) and T5's, which reads the prompts without emphasis brackets
        (``ldm.text.sd3_context``); ``pooled``, both towers' pooled projections side by side."""
        texts = prompts + negative
        ids, weights = self.tokenize(self.tokenizer, texts, emphasis)  # (2B, W, L) each
        ids_2, weights_2 = self.tokenize(self.tokenizer_2, texts, emphasis, min_windows=ids.shape[1])
        hidden_1, pooled_1 = encode_tokens_and_pooled(self.text_encoder, ids, layer)
        hidden_2, pooled_2 = encode_tokens_and_pooled(self.text_encoder_2, ids_2, layer)
        hidden_1, hidden_2 = emphasize(hidden_1, weights), emphasize(hidden_2, weights_2)
        t5 = None
        if self.text_encoder_3 is not None:
            texts = texts if weights is None else [plain_text(t) for t in texts]
            tokens = self.tokenizer_3(texts, padding="max_length", max_length=T5_TOKENS, truncation=True,
                                      add_special_tokens=True, return_tensors="pt").input_ids
            with torch.no_grad():
                t5 = self.text_encoder_3(tokens.to(self.text_encoder_3.device))[0].float()
        self.attention.text_tokens = hidden_1.shape[1]  # the keys prompt-to-prompt edits: the CLIP tokens
        hidden = sd3_context([hidden_1.float(), hidden_2.float()], self.unet.config.joint_attention_dim, t5)
        pooled = torch.cat([pooled_1, pooled_2], dim=-1).float()  # (2B, P1 + P2)
        both = {"hidden": hidden, "pooled": pooled}
        return ({k: v[:len(prompts)] for k, v in both.items()}, {k: v[len(prompts):] for k, v in both.items()})

    # -- sampling set-up ---------------------------------------------------------------------------------------
    def default_spacing(self) -> str:
        """The model folder's spacing: ``karras`` / ``exponential`` / ``beta`` if it asks for those sigmas (diffusers'
        ``use_karras_sigmas`` ...), else its ``timestep_spacing``."""
        for spacing in ("karras", "exponential", "beta"):  # diffusers' flags
            if self.scheduler_config.get(f"use_{spacing}_sigmas"):
                return spacing
        if self.is_flow:
            return "linspace"
        return self.scheduler_config.get("timestep_spacing", "leading")

    def sigmas(self, steps: int, sampler: str, spacing: str) -> torch.Tensor:
        """The sigma list ``(steps + 1,)`` for a sampler. DDIM and PLMS end at the schedule's sigma_min when the
        folder sets ``set_alpha_to_one: false`` (Stable Diffusion's configs), as diffusers' DDIMScheduler and
        PNDMScheduler do. Restart spends some of the steps in its restart intervals, so its list is shorter
        (``restart_plan``)."""
        if sampler == "restart":
            steps = restart_plan(steps)[0]
        final = self.scheduler_config.get("final_sigmas_type", "zero")
        if sampler in ("ddim", "plms") and not self.scheduler_config.get("set_alpha_to_one", True):
            final = "sigma_min"
        return self.schedule(sampler).sigma_list(steps, spacing, self.scheduler_config.get("steps_offset", 0), final,
                                                 convention=get_sampler(sampler).timestep_convention,
                                                 family="sdxl" if self.is_sdxl else "sd1")

    def denoiser(self, sampler: str = "euler", spacing: str = "leading",
                 extra_channels: torch.Tensor | None = None, request: "Request | None" = None) -> Denoiser:
        """The network as ``D(x, sigma, cond) -> x0``; ``extra_channels`` ``(B, k, h, w)`` are concatenated to
        the network input (a 9-channel inpainting UNet's mask and masked-image latents; without them such a UNet
        gets :meth:`everything_masked`); a ``request`` with a control image adds the loaded ControlNet's
        residuals."""
        quantize = spacing == "karras" and get_sampler(sampler).quantize_karras_timesteps \
            and self.scheduler_config.get("beta_schedule") != "squaredcos_cap_v2"

        control = request.control if request is not None else None
        whole: dict[tuple[int, int], torch.Tensor] = {}  # latent size -> everything_masked
        guidance = self.guidance_condition(request)  # (1, D) or None

        def unet(x_in, timestep, cond):
            if self.is_mmdit:
                return self.network("unet", self.unet)(hidden_states=x_in.to(self.dtype), timestep=timestep,
                                 encoder_hidden_states=cond["hidden"].to(self.dtype),
                                 pooled_projections=cond["pooled"].to(self.dtype)).sample
            added = None
            if isinstance(cond, dict):  # SDXL
                added = {"text_embeds": cond["text_embeds"].to(self.dtype), "time_ids": cond["time_ids"].to(self.dtype)}
                cond = cond["hidden"]
            x_in, cond = x_in.to(self.dtype), cond.to(self.dtype)
            residuals = {} if control is None else control_residuals(self.controlnet, x_in, timestep, cond, control,
                                                                      request.control_scale, added)
            extra = extra_channels
            if extra is None and self.is_inpainting_unet:
                size = tuple(x_in.shape[2:])
                if size not in whole:
                    whole[size] = self.everything_masked(size)
                extra = whole[size]
            if extra is not None:  # repeated for the CFG halves
                x_in = torch.cat([x_in, extra.repeat(x_in.shape[0] // extra.shape[0], 1, 1, 1)], 1)
            if added is not None:
                residuals["added_cond_kwargs"] = added
            if guidance is not None:
                residuals["timestep_cond"] = guidance.to(x_in.device, self.dtype).expand(len(x_in), -1)
            network = self.network("unet", self.unet)
            return network(x_in.to(self.dtype), timestep, encoder_hidden_states=cond, **residuals).sample

        prediction = "flow" if self.is_flow else self.prediction_type
        return Denoiser(unet, self.schedule(sampler), prediction, quantize_timesteps=quantize)

    def everything_masked(self, latent_size: tuple[int, int]) -> torch.Tensor:
        """A 9-channel inpainting UNet's extra inputs when no pixel is kept (text-to-image, img2img, inversion,
        edits): a mask of ones and the latents of the fully masked, mid-grey image, ``(1, 5, h, w)``. The A1111
        web UI conditions inpainting models so outside inpainting, and SD-inpainting trained on it (every pixel
        masked 25 % of the time; ``ldm train inpainting`` 20 %)."""
        height, width = latent_size
        grey = torch.zeros(1, 3, height * self.vae_scale_factor, width * self.vae_scale_factor)
        mask = torch.ones(1, 1, height, width, device=self.device)
        return torch.cat([mask, self.encode(grey)], dim=1)

    def seeds_and_generators(self, batch: int, seed, generator):
        """Per-image seeds ``seed + k`` and one CPU generator each; or the caller's generator(s)."""
        if generator is not None:
            if seed is not None:
                raise ValueError("pass either seed or generator, not both")
            if isinstance(generator, (list, tuple)) and len(generator) != batch:
                raise ValueError(f"got {len(generator)} generators for {batch} images")
            return [None] * batch, generator
        if seed is None:
            seed = secrets.randbelow(2**31)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        seeds = [int(seed) + k for k in range(batch)]
        return seeds, seeded_generators(seeds)

    # -- decoding ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, h, w)`` to images ``(B, 3, H, W)`` in [0, 1], float32. Latents larger than the VAE's
        native size are decoded in overlapping tiles (diffusers' ``tiled_decode``)."""
        config = self.vae.config
        z = latents / config.scaling_factor
        if getattr(config, "shift_factor", None):
            z = z + config.shift_factor
        weight = next(self.vae.parameters())
        z = z.to(device=weight.device, dtype=weight.dtype)
        native = config.sample_size // self.vae_scale_factor
        tiled = max(z.shape[-2:]) > native and self.seamless == "none"  # tiles would not wrap around
        images = self.vae.tiled_decode(z).sample if tiled else self.network("vae_decode", self.vae.decode)(z).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        array = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)  # (B, H, W, 3)
        return [Image.fromarray(a) for a in array]

    # -- generation --------------------------------------------------------------------------------------------
    def prepare(self, prompt, negative_prompt=None, num_inference_steps: int = 30, guidance_scale: float = 7.5,
                sampler: str = "dpmpp_2m", height: int | None = None, width: int | None = None,
                num_images_per_prompt: int = 1, seed: int | None = None, generator=None,
                guidance_rescale: float = 0.0, eta: float = 0.0, timestep_spacing: str | None = None,
                output_type: str = "pil", control_image=None, controlnet_conditioning_scale: float = 1.0,
                clip_skip: int | None = None, emphasis: str = "none", pag_scale: float = 0.0,
                pag_layers: Sequence[str] = ("mid",), variation_seed: int | None = None,
                variation_strength: float = 0.0, guidance: str = "cfg", apg_eta: float = 0.0,
                apg_norm_threshold: float = 0.0, apg_momentum: float = 0.0,
                zero_init_steps: int | None = None, seamless: str = "none",
                freeu: Sequence[float] | str | None = None) -> "Request":
        """Check every user setting before any work (one-line ValueError on the first bad one) and expand prompts,
        negative prompts and seeds to the batch (prompt-major, as diffusers orders it). Compiled networks look
        for replaced weights here, once per request."""
        prompts = check_prompts(prompt)
        negatives = check_prompts("" if negative_prompt is None else negative_prompt, "negative_prompt")
        if len(negatives) not in (1, len(prompts)):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        native = self.unet.config.sample_size * self.vae_scale_factor
        height, width = (native if height is None else height), (native if width is None else width)
        spacing = timestep_spacing or self.default_spacing()
        check_positive_int("num_inference_steps", num_inference_steps)
        get_sampler(sampler)
        check_guidance_scale(guidance_scale)
        for name, size in (("height", height), ("width", width)):
            check_positive_int(name, size)
            if size % self.vae_scale_factor:
                raise ValueError(f"{name} must be a multiple of {self.vae_scale_factor}, got {size}")
        check_finite("eta", eta, 0.0, 1.0)
        if eta and sampler != "ddim":
            stochastic = ", ".join(name for name, spec in SAMPLERS.items() if spec.stochastic)
            raise ValueError(f"eta is the ddim sampler's stochasticity; sampler {sampler!r} has none (use eta=0, or a "
                             f"stochastic sampler: {stochastic})")
        check_finite("guidance_rescale", guidance_rescale, 0.0, 1.0)
        check_guidance_scale(pag_scale, "pag_scale")
        pag_layers = check_pag_layers(pag_layers)
        if pag_scale > 0:
            self.pag_places(pag_layers)
        self.clip_layer(clip_skip)
        if emphasis not in EMPHASIS_SYNTAXES:
            raise ValueError(f"unknown emphasis {emphasis!r}; known: {', '.join(EMPHASIS_SYNTAXES)}")
        if pag_scale > 0 and is_composed(prompts, emphasis):  # also raises on a non-finite sub-prompt weight
            raise ValueError("perturbed-attention guidance runs on a plain prompt, not one composed with AND")
        if self.is_guidance_distilled:
            self.check_without_cfg(negatives, prompts if emphasis == "a1111" else (), guidance_rescale, pag_scale)
        apg = self.check_guidance_method(guidance, (apg_eta, apg_norm_threshold, apg_momentum), prompts, emphasis,
                                         guidance_rescale, pag_scale)
        zero_init_steps = self.check_zero_init_steps(guidance, zero_init_steps, num_inference_steps, prompts,
                                                     emphasis, pag_scale)
        if spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep_spacing {spacing!r}; known: {', '.join(TIMESTEP_SPACINGS)}")
        self.sigmas(num_inference_steps, sampler, spacing)  # raises on a step count the schedule cannot space
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; known: {', '.join(OUTPUT_TYPES)}")
        per_prompt = check_positive_int("num_images_per_prompt", num_images_per_prompt)
        control_scale = check_finite("controlnet_conditioning_scale", controlnet_conditioning_scale, 0.0, 10.0)
        control = None if control_image is None else self.control_tensor(control_image, len(prompts), per_prompt,
                                                                          height, width)
        negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
        prompts = [p for p in prompts for _ in range(per_prompt)]
        negatives = [n for n in negatives for _ in range(per_prompt)]
        seeds, generators = self.seeds_and_generators(len(prompts), seed, generator)
        variation_strength = check_finite("variation_strength", variation_strength, 0.0, 1.0)
        variation_seeds, variation_generators = (self.seeds_and_generators(len(prompts), variation_seed, None)
                                                 if variation_strength > 0 else (None, None))
        freeu = check_freeu(freeu)
        if freeu is not None and self.is_mmdit:
            raise ValueError("FreeU rescales a UNet's decoder features; this model's denoiser is an MMDiT")
        self.apply_seamless(seamless)
        self.apply_freeu(freeu)
        self.refresh_compiled()  # replaced weights or adapters since the last request
        request = Request(prompts, negatives, seeds, generators, num_inference_steps, sampler, spacing,
                       float(guidance_scale), float(guidance_rescale), float(eta), height, width, output_type,
                       control, float(control_scale), clip_skip or None, emphasis, float(pag_scale), pag_layers,
                       variation_seeds, variation_generators, variation_strength, apg, zero_init_steps,
                       seamless=seamless, freeu=freeu)
        self.check_prompt_editing(request)
        return request

    @staticmethod
    def check_prompt_editing(request: "Request") -> None:
        """With ``emphasis="a1111"``, prompt editing may change words but not how a prompt is composed with
        ``AND`` (the guidance combines a fixed set of sub-prompts); checked on every step's text."""
        if request.emphasis != "a1111":
            return
        for text in request.prompts:
            shapes = {tuple(weight for _, weight in split_conjunction(edited))
                      for _, edited in prompt_schedule(text, request.steps, request.first_pass_steps)}
            if len(shapes) > 1:
                raise ValueError(f"prompt editing may not change how a prompt is composed with AND: {text[:60]!r}")

    def check_guidance_method(self, guidance: str, apg: tuple[float, float, float], prompts: Sequence[str],
                              emphasis: str, guidance_rescale: float, pag_scale: float) -> tuple | None:
        """``guidance`` is ``"cfg"`` or ``"apg"`` (adaptive projected guidance with ``apg`` = (eta, norm threshold,
        momentum), see :class:`ldm.guidance.ProjectedGuidance`), which takes a plain prompt without rescale or
        PAG on a model that runs CFG. Returns the APG settings, or None for CFG."""
        if guidance not in GUIDANCE_METHODS:
            raise ValueError(f"unknown guidance {guidance!r}; known: {', '.join(GUIDANCE_METHODS)}")
        if guidance != "apg":
            if apg != (0.0, 0.0, 0.0):
                raise ValueError("apg_eta, apg_norm_threshold and apg_momentum set up guidance='apg'")
            return None
        ProjectedGuidance(*apg)  # checks the numbers
        if self.is_guidance_distilled or is_composed(prompts, emphasis) or guidance_rescale > 0 or pag_scale > 0:
            raise ValueError("adaptive projected guidance acts on classifier-free guidance of a plain prompt: not "
                             "with a guidance-distilled UNet, AND-composed prompts, guidance rescale or PAG")
        return tuple(float(value) for value in apg)

    def check_zero_init_steps(self, guidance: str, steps: int | None, num_inference_steps: int,
                              prompts: Sequence[str], emphasis: str, pag_scale: float) -> int | None:
        """CFG-Zero*'s zero-init: how many of the first steps predict zero (None = 1, diffusers' default), fewer
        than the steps; only with ``guidance="cfg_zero_star"``, a plain prompt, no PAG, a model that runs CFG."""
        if guidance != "cfg_zero_star":
            if steps is not None:
                raise ValueError("zero_init_steps sets up guidance='cfg_zero_star'")
            return None
        steps = 1 if steps is None else check_non_negative_int("zero_init_steps", steps)
        if steps >= num_inference_steps:
            raise ValueError(f"zero_init_steps must be fewer than the {num_inference_steps} steps, got {steps}")
        if self.is_guidance_distilled or is_composed(prompts, emphasis) or pag_scale > 0:
            raise ValueError("CFG-Zero* acts on classifier-free guidance of a plain prompt: not with a "
                             "guidance-distilled UNet, AND-composed prompts or PAG")
        return steps

    @staticmethod
    def check_without_cfg(negatives: Sequence[str], composable: Sequence[str], guidance_rescale: float,
                          pag_scale: float) -> None:
        """A guidance-distilled UNet (a full LCM) runs one conditional pass: refuse the settings that need CFG's
        unconditional pass (negative prompts, ``AND``-composed prompts among ``composable``, guidance rescale,
        perturbed-attention guidance)."""
        if any(negatives) or is_composed(composable, "a1111") or guidance_rescale > 0 or pag_scale > 0:
            raise ValueError("a guidance-distilled UNet (a full LCM) runs no classifier-free guidance: it takes no "
                             "negative prompt, AND-composed prompt, guidance rescale or perturbed-attention guidance")

    def pag_places(self, layers: Sequence[str]) -> set[str]:
        """The UNet self-attention layers perturbed-attention guidance perturbs (see
        ``ldm.attention.self_attention_places``; ``("mid",)``, diffusers' usual choice, is the default)."""
        if self.is_mmdit:
            raise ValueError("perturbed-attention guidance is implemented for UNet models; this one is an MMDiT")
        if not layers:
            raise ValueError("pag_layers names no layer")
        return self_attention_places(self.unet, layers)

    def latent_shape(self, request: "Request") -> tuple[int, int, int, int]:
        factor = self.vae_scale_factor
        return request.batch, self.latent_channels, request.height // factor, request.width // factor

    @property
    def latent_channels(self) -> int:
        """Channels of the latents sampled (a 9-channel inpainting UNet's extra 5 are inputs only)."""
        return 4 if self.is_inpainting_unet else self.unet.config.in_channels

    @property
    def is_inpainting_unet(self) -> bool:
        """A 9-channel UNet (SD-inpainting): latents + mask + masked-image latents."""
        return self.unet.config.in_channels == 9

    def initial_noise(self, request: "Request", latents: torch.Tensor | None = None) -> torch.Tensor:
        """Unit-variance starting noise ``(B, C, h, w)`` in the network's input space (diffusers' ``latents=``),
        from each image's generator unless given. With a variation strength ``s`` > 0 (the A1111 web UI's
        variation seed), each image's noise is :func:`ldm.samplers.slerp` ``(s, noise of its seed, noise of its
        variation seed)``: a unit-variance draw that walks from one image (``s`` = 0) to the other (``s`` = 1)."""
        shape = self.latent_shape(request)
        if latents is None:
            noise = randn_like(torch.empty(shape), request.generators)
            if request.variation_strength == 0:
                return noise
            return slerp(request.variation_strength, noise, randn_like(noise, request.variation_generators))
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
        if request.variation_strength > 0:
            raise ValueError("a variation seed varies the noise drawn from the seed; latents= gives the noise itself")
        return latents.float().cpu()

    def encode_request(self, request: "Request"):
        """``(schedule, part_weights)`` for :class:`CFGDenoiser`: ``schedule`` is ``[(last_step, cond, uncond)]``,
        one entry unless the A1111 prompt editing of ``emphasis="a1111"`` changes a prompt or negative prompt
        during sampling (``ldm.text.prompt_schedule``; every image's schedule merged, each distinct set of texts
        encoded once), ``part_weights`` as :meth:`encode_texts` gives them."""
        if request.emphasis != "a1111":
            cond, uncond, part_weights = self.encode_texts(request, request.prompts, request.negatives)
            return [(request.steps, cond, uncond)], part_weights
        schedules = [prompt_schedule(text, request.steps, request.first_pass_steps)
                     for text in request.prompts + request.negatives]
        boundaries = sorted({step for schedule in schedules for step, _ in schedule} | {request.steps})
        entries, encoded = [], {}
        for boundary in boundaries:  # how prompts are composed is the same at every step (check_prompt_editing)
            texts = tuple(next(text for step, text in schedule if step >= boundary) for schedule in schedules)
            if texts not in encoded:
                encoded[texts] = self.encode_texts(request, list(texts[:request.batch]), list(texts[request.batch:]))
            cond, uncond, part_weights = encoded[texts]
            entries.append((boundary, cond, uncond))
        return entries, part_weights

    def encode_texts(self, request: "Request", prompts: list[str], negatives: list[str]):
        """``(cond, uncond, part_weights)`` for the texts of one sampling step. With ``emphasis="a1111"`` each
        prompt is split at ``AND`` into weighted sub-prompts (``ldm.text.split_conjunction``; the negative prompt
        is not split, as in the web UI); a batch whose prompts are all one sub-prompt of weight 1 is plain CFG
        (``part_weights`` None), otherwise its sub-prompts are encoded part-major, images with fewer padded by
        weight-0 empty ones (every image then costs 1 + K network evaluations per step, K the batch's most
        parts)."""
        size = (request.height, request.width)
        parts = [split_conjunction(p) if request.emphasis == "a1111" else [(p, 1.0)] for p in prompts]
        if all(len(p) == 1 and p[0][1] == 1.0 for p in parts):
            cond, uncond = self.encode_prompt([p[0][0] for p in parts], negatives, size, request.clip_skip,
                                              request.emphasis)
            return cond, uncond, None
        count = max(len(p) for p in parts)
        parts = [p + [("", 0.0)] * (count - len(p)) for p in parts]
        texts = [p[k][0] for k in range(count) for p in parts]  # part-major: (K * B,)
        cond, uncond = self.encode_prompt(texts, negatives, size, request.clip_skip, request.emphasis)
        return cond, uncond, torch.tensor([[weight for _, weight in p] for p in parts])  # (B, K)

    def guided(self, request: "Request", denoiser: Denoiser) -> CFGDenoiser:
        """The request's prompts encoded and wrapped with its guidance: ``model(x, sigma) -> x0``."""
        schedule, part_weights = self.encode_request(request)
        _, cond, uncond = schedule[0]
        if part_weights is not None and self.attention.controller is not None:
            raise ValueError("attention controllers read the CFG batch as two halves; a prompt composed with AND "
                             "runs 1 + K of them")
        if request.pag_scale > 0 and self.attention.controller is not None:
            raise ValueError("perturbed-attention guidance and an attention controller (prompt-to-prompt) cannot "
                             "run together")
        perturbed = self.perturbed_pass(denoiser, request.pag_layers) if request.pag_scale > 0 else None
        if self.is_guidance_distilled:  # the scale is in the network's embedding (checked in prepare): one pass
            return CFGDenoiser(denoiser, cond, uncond, 1.0, cond_schedule=schedule)
        projection = None if request.apg is None else ProjectedGuidance(*request.apg)  # its momentum: this pass's
        zero_star = None if request.zero_init_steps is None else ZeroStarGuidance()
        return CFGDenoiser(denoiser, cond, uncond, request.guidance_scale, request.guidance_rescale, part_weights,
                           request.pag_scale, perturbed, projection, zero_star, schedule)

    def perturbed_pass(self, denoiser: Denoiser, layers: Sequence[str]) -> Callable:
        """``(x, sigma, cond) -> network output`` with the self-attention maps ``layers`` names replaced by the
        identity (PAG's perturbed prediction), through the attention hook."""
        perturbation = IdentitySelfAttention(self.pag_places(layers))

        def perturbed(x, sigma, cond):
            previous, self.attention.controller = self.attention.controller, perturbation
            try:
                return denoiser.model_output(x, sigma, cond)
            finally:
                self.attention.controller = previous
        return perturbed

    def denoise(self, request: "Request", denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                callback: Callable | None = None, progress: bool = True,
                uncond_per_step: list[torch.Tensor] | None = None, first_step: int = 0) -> torch.Tensor:
        """Run the request's sampler with CFG over ``sigmas`` from VE latents ``x`` at ``sigmas[0]``; keeps the
        attention hook's step index in step with the sampler and shows a progress bar. ``uncond_per_step``
        (null-text inversion's embeddings, ``(1, L, D)`` each) replaces the unconditional embedding step by step.
        ``first_step`` is the index of ``sigmas[0]`` in the whole sampling run when ``sigmas`` is a piece of it
        (the callback and the attention hook see whole-run step indices)."""
        model = self.guided(request, denoiser)
        model.at_step(first_step)
        uncond = model.uncond

        def set_uncond(step):
            if uncond_per_step is not None and step < len(uncond_per_step):
                if isinstance(uncond, dict):
                    model.uncond = {**uncond, "hidden": uncond_per_step[step].to(self.device).expand(
                        request.batch, -1, -1)}
                else:
                    model.uncond = uncond_per_step[step].to(self.device).expand(request.batch, -1, -1)

        set_uncond(first_step)
        options = {"eta": request.eta} if request.sampler == "ddim" else {}
        if request.sampler == "restart":
            options = dict(zip(("restart_steps", "restart_times"), restart_plan(request.steps)[1:]))
        steps = len(sigmas) - 1
        bar = tqdm(total=steps, desc="sampling", disable=not progress, leave=False)
        skipped = self.zero_init_count(request, sigmas, first_step)

        def on_step(i, sigma, x_i, x0):
            self.attention.step = first_step + i + 1
            model.at_step(first_step + i + 1)
            set_uncond(first_step + i + 1)
            bar.update(1)
            return callback(first_step + i, sigma, x_i, x0) if callback is not None else None

        self.attention.step = first_step
        x = x.to(self.device)
        try:
            for i in range(skipped):  # CFG-Zero*'s zero-init: Euler steps on a zero prediction, no network pass
                sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
                x0 = denoiser.to_x0(x, torch.full((len(x),), sigma, device=x.device), torch.zeros_like(x))
                x = x0 + sigma_next / sigma * (x - x0)
                replaced = on_step(i, sigma, x, x0)
                x = x if replaced is None else replaced
            sample = get_sampler(request.sampler).function(infinite_noise_start=self.starts_at_infinite_noise)
            return sample(model, x, sigmas[skipped:].to(self.device), generator=request.generators,
                          callback=lambda i, *step: on_step(i + skipped, *step), **options)
        finally:
            bar.close()

    def zero_init_count(self, request: "Request", sigmas: torch.Tensor, first_step: int) -> int:
        """CFG-Zero*'s zero-init (Fan et al. 2025, sec. 4.2): the first ``zero_init_steps`` steps of a sampling
        run that starts at the top of its list take a zero network output, each an Euler step on the x0 that gives
        (a flow model's x_t then stays where it is, as in the paper; an ε model's VE latent too), and the sampler
        starts after them with no history of them. Runs that start lower (img2img, the refiner, RePaint's later
        segments) skip none."""
        if not request.zero_init_steps or first_step != 0:
            return 0
        top = float(self.sigmas(request.steps, request.sampler, request.spacing)[0])
        return min(request.zero_init_steps, len(sigmas) - 1) if float(sigmas[0]) >= top else 0

    def finish(self, request: "Request", latents: torch.Tensor, images: torch.Tensor | None = None,
               **extra) -> GenerationOutput:
        """Decode final latents (network input space; or take already decoded ``images`` (B, 3, H, W) in [0, 1])
        per ``output_type`` and attach each image's parameters (``extra`` adds mode-specific ones)."""
        parameters = [dict(prompt=p, negative_prompt=n, steps=request.steps, sampler=request.sampler,
                           cfg_scale=request.guidance_scale, seed=s, width=request.width, height=request.height,
                           model=self.name, timestep_spacing=request.spacing, eta=request.eta,
                           guidance_rescale=request.guidance_rescale, clip_skip=request.clip_skip,
                           emphasis=None if request.emphasis == "none" else request.emphasis,
                           **({"pag_scale": request.pag_scale, "pag_layers": " ".join(request.pag_layers)}
                              if request.pag_scale > 0 else {}),
                           **({"variation_seed": v, "variation_strength": request.variation_strength}
                              if request.variation_strength > 0 else {}),
                           **(dict(guidance="apg", apg_eta=request.apg[0], apg_norm_threshold=request.apg[1],
                                   apg_momentum=request.apg[2]) if request.apg is not None else {}),
                           **(dict(guidance="cfg_zero_star", zero_init_steps=request.zero_init_steps)
                              if request.zero_init_steps is not None else {}),
                           **({"seamless": request.seamless} if request.seamless != "none" else {}),
                           **({"freeu": " ".join(f"{v:g}" for v in request.freeu)} if request.freeu else {}),
                           **({"controlnet": self.controlnet_name, "control_scale": request.control_scale}
                              if request.control is not None else {}),
                           **({"loras": " ".join(f"{k}:{v:g}" for k, v in self.loras.items())} if self.loras else {}),
                           **({"embeddings": " ".join(self.embeddings)} if self.embeddings else {}),
                           **extra)
                      for p, n, s, v in zip(request.prompts, request.negatives, request.seeds,
                                            request.variation_seeds or [None] * request.batch)]
        if request.output_type == "latent":
            output = latents
        else:
            output = self.to_output(self.decode(latents) if images is None else images, request.output_type)
        return GenerationOutput(output, request.seeds, parameters)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int = 30, guidance_scale: float = 7.5, sampler: str = "dpmpp_2m",
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 seed: int | None = None, generator=None, latents: torch.Tensor | None = None,
                 guidance_rescale: float = 0.0, eta: float = 0.0, timestep_spacing: str | None = None,
                 output_type: str = "pil", callback: Callable | None = None, progress: bool = True,
                 control_image=None, controlnet_conditioning_scale: float = 1.0,
                 refiner: "TextToImagePipeline | None" = None, refiner_switch: float = 0.8,
                 clip_skip: int | None = None, emphasis: str = "none", pag_scale: float = 0.0,
                 pag_layers: Sequence[str] = ("mid",), variation_seed: int | None = None,
                 variation_strength: float = 0.0, hires_scale: float | None = None, hires_upscaler: str = "latent",
                 hires_strength: float = 0.7, hires_steps: int | None = None, guidance: str = "cfg",
                 apg_eta: float = 0.0, apg_norm_threshold: float = 0.0, apg_momentum: float = 0.0,
                 zero_init_steps: int | None = None, seamless: str = "none",
                 freeu: Sequence[float] | None = None) -> GenerationOutput:
        """Generate images. ``callback(step, sigma, x, x0)`` runs after every sampler step with the VE latents
        and the current x0 estimate; ``eta`` applies to ``ddim``; ``control_image`` (a path, PIL image or array,
        or one per prompt) needs a loaded ControlNet; ``clip_skip``: see :meth:`clip_layer`; ``emphasis="a1111"``
        reads ``(word:1.2)``-style weights in the prompts (see :meth:`encode_prompt`) and ``AND`` between
        weighted sub-prompts (see :meth:`encode_request`). ``pag_scale`` > 0 adds perturbed-attention guidance
        (Ahn et al. 2024) on the self-attention layers ``pag_layers`` names (see :meth:`pag_places`), as
        diffusers' ``StableDiffusionPAGPipeline``. ``refiner``: a second
        pipeline (SDXL's refiner) that takes over at ``refiner_switch`` of the schedule (see :meth:`refiner_split`).
        ``variation_strength`` > 0 moves each image towards the one ``variation_seed`` (+ k) would give (see
        :meth:`initial_noise`). ``hires_scale`` (the A1111 web UI's "Hires. fix") enlarges the result by that factor
        with ``hires_upscaler`` (see :meth:`upscale_latents`) and repaints it with img2img at ``hires_strength`` in
        ``hires_steps`` steps (see :meth:`hires_request`). ``guidance="apg"``: adaptive projected guidance with
        ``apg_*`` (see :meth:`check_guidance_method`); ``guidance="cfg_zero_star"``: CFG-Zero* with
        ``zero_init_steps`` (see :meth:`check_zero_init_steps`). ``seamless="xy"`` (or ``"x"``, ``"y"``) makes
        images that tile (see :meth:`apply_seamless`); ``freeu=(s1, s2, b1, b2)`` turns on FreeU (see
        :meth:`apply_freeu`). See README for every argument."""
        request = self.prepare(prompt, negative_prompt, num_inference_steps, guidance_scale, sampler, height, width,
                               num_images_per_prompt, seed, generator, guidance_rescale, eta, timestep_spacing,
                               output_type, control_image, controlnet_conditioning_scale, clip_skip, emphasis,
                               pag_scale, pag_layers, variation_seed, variation_strength, guidance, apg_eta,
                               apg_norm_threshold, apg_momentum, zero_init_steps, seamless, freeu)
        hires = None
        if hires_scale is not None:
            if refiner is not None:
                raise ValueError("a hires fix runs after the whole schedule; it cannot follow a refiner stage")
            hires_strength = check_finite("hires_strength", hires_strength, 0.0, 1.0)
            hires = self.hires_request(request, hires_scale, hires_upscaler, hires_steps, hires_strength)
        elif (hires_upscaler, hires_strength, hires_steps) != ("latent", 0.7, None):
            raise ValueError("hires_upscaler, hires_strength and hires_steps set up a hires fix; give hires_scale")
        noise = self.initial_noise(request, latents)
        sigmas = self.sigmas(request.steps, request.sampler, request.spacing)
        denoiser = self.denoiser(request.sampler, request.spacing, request=request)
        x = noise * denoiser.noise_scale(sigmas[0])
        if refiner is None:
            x = self.denoise(request, denoiser, x, sigmas, callback, progress)
            first = denoiser.to_model_space(x, float(sigmas[-1]))
            if hires is None:
                return self.finish(request, first)
            upscaled = self.upscale_latents(first, (hires.height, hires.width), hires_upscaler)
            extra = dict(hires_scale=float(hires_scale), hires_upscaler=hires_upscaler, hires_steps=hires_steps)
            result = self.sdedit(hires, upscaled, hires_strength, callback, progress, exact_steps=True, **extra)
            for parameters in result.parameters:  # the web UI records the first pass's size and steps
                parameters.update(width=request.width, height=request.height, steps=request.steps)
            return result
        split = self.refiner_split(refiner, sigmas, refiner_switch)
        refiner.apply_seamless(request.seamless)
        refiner.apply_freeu(request.freeu)
        if request.pag_scale > 0:
            refiner.pag_places(request.pag_layers)  # before the base stage runs
        x = self.denoise(request, denoiser, x, sigmas[:split + 1], callback, progress)
        refined = refiner.denoiser(request.sampler, request.spacing)
        x = refiner.denoise(request, refined, x, sigmas[split:], callback, progress, first_step=split)
        return self.finish(request, refined.to_model_space(x, float(sigmas[-1])), refiner=refiner.name,
                           refiner_switch=refiner_switch)

    def refiner_split(self, refiner: "TextToImagePipeline", sigmas: torch.Tensor, switch: float) -> int:
        """The index of the sigma where the refiner takes over (Podell et al. 2023, sec. 2.5: the refiner
        denoises the last, low-noise part): as diffusers' ``denoising_end`` / ``denoising_start``, the base model
        keeps the steps whose timestep is at least ``round(T (1 - switch))``."""
        check_finite("refiner_switch", switch, 0.0, 1.0)
        if self.is_flow or refiner.is_flow:
            raise ValueError("a refiner stage is for SDXL-style (discrete-schedule) models, not flow models")
        if refiner.vae.config.latent_channels != self.vae.config.latent_channels:
            raise ValueError(f"the refiner {refiner.name} does not share this model's latent space")
        train_steps = self.scheduler_config.get("num_train_timesteps", 1000)
        cutoff = int(round(train_steps - switch * train_steps))
        timesteps = self.schedule().sigma_to_t(sigmas[:-1])
        return int((timesteps >= cutoff - 1e-3).sum())

    def to_output(self, images: torch.Tensor, output_type: str):
        """Images ``(B, 3, H, W)`` in [0, 1] as a tensor (``"pt"``), an array ``(B, H, W, 3)`` or PIL images."""
        if output_type == "pt":
            return images
        if output_type == "np":
            return images.permute(0, 2, 3, 1).cpu().numpy()
        return self.to_pil(images)


SEAMLESS_AXES = ("none", "x", "y", "xy")
"""Along which image axes :meth:`TextToImagePipeline.apply_seamless` makes convolutions wrap around."""


def wrapped_convolution(conv: torch.nn.Conv2d, axes: str, x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """``conv`` applied to ``x`` ``(B, C, H, W)`` with its padding taken circularly along ``axes`` (``"x"``
    the width, ``"y"`` the height) and as zeros along the others."""
    pad_h, pad_w = conv.padding
    x = torch.nn.functional.pad(x, (pad_w, pad_w, 0, 0), mode="circular" if "x" in axes else "constant")
    x = torch.nn.functional.pad(x, (0, 0, pad_h, pad_h), mode="circular" if "y" in axes else "constant")
    return torch.nn.functional.conv2d(x, weight, bias, conv.stride, 0, conv.dilation, conv.groups)


def is_composed(prompts: Sequence[str], emphasis: str) -> bool:
    """Whether a prompt composes sub-prompts (``AND``, or one sub-prompt with a weight other than 1) in the
    web UI's syntax."""
    return emphasis == "a1111" and any(len(parts) > 1 or parts[0][1] != 1.0
                                       for parts in map(split_conjunction, prompts))


def check_freeu(freeu) -> tuple[float, float, float, float] | None:
    """FreeU's factors ``(s1, s2, b1, b2)``: four finite non-negative numbers, or one string of four (as the PNG
    field stores them); None is off."""
    if freeu is None:
        return None
    values = ()
    if isinstance(freeu, str):
        try:
            values = tuple(float(v) for v in freeu.split())
        except ValueError:
            pass
    elif isinstance(freeu, (tuple, list)):
        values = tuple(freeu)
    if len(values) != 4:
        raise ValueError(f"freeu takes four numbers (s1, s2, b1, b2), got {freeu!r}")
    return tuple(check_finite(f"freeu {name}", value, 0.0, 10.0) for name, value in zip(("s1", "s2", "b1", "b2"),
                                                                                      values))


def check_pag_layers(layers) -> tuple[str, ...]:
    """PAG layers as a tuple of regular expressions: a list of strings, or one string of space-separated ones
    (as the PNG field stores them); None is the default, the mid block."""
    if layers is None:
        return ("mid",)
    layers = tuple(layers.split()) if isinstance(layers, str) else tuple(layers)
    for layer in layers:
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"pag_layers must be non-empty strings (regular expressions), got {layer!r}")
        try:
            re.compile(layer)
        except re.error as error:
            raise ValueError(f"pag_layers entry {layer!r} is not a regular expression: {error}") from None
    return layers


@dataclass
class Request:
    """The validated settings of one pipeline call, expanded to the batch."""

    prompts: list[str]
    negatives: list[str]
    seeds: list[int | None]
    generators: object
    steps: int
    sampler: str
    spacing: str
    guidance_scale: float
    guidance_rescale: float
    eta: float
    height: int
    width: int
    output_type: str
    control: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1]
    control_scale: float = 1.0
    clip_skip: int | None = None  # None = the family's default layer (0 is the same)
    emphasis: str = "none"  # how brackets in prompts are read: ldm.text.EMPHASIS_SYNTAXES
    pag_scale: float = 0.0  # perturbed-attention guidance (0 = off)
    pag_layers: tuple[str, ...] = ("mid",)
    variation_seeds: list[int] | None = None  # the A1111 web UI's variation seeds (None: no variation)
    variation_generators: object = None
    variation_strength: float = 0.0
    apg: tuple[float, float, float] | None = None  # guidance="apg": (eta, norm threshold, momentum); else None
    zero_init_steps: int | None = None  # guidance="cfg_zero_star": CFG-Zero*'s zero-init steps; else None
    first_pass_steps: int | None = None  # a hires fix's second pass: the first pass's steps (prompt editing)
    seamless: str = "none"  # circular padding along these axes: SEAMLESS_AXES
    freeu: tuple[float, float, float, float] | None = None  # FreeU's (s1, s2, b1, b2); None = off

    @property
    def batch(self) -> int:
        return len(self.prompts)
