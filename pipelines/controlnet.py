"""ControlNet conditioning (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A ControlNet is a trainable copy of the UNet's encoder that reads a control image (edges, a mask, ...) and adds
``scale * residual`` to each skip connection and the middle block of the frozen UNet (sec. 3.2, eq. 2-3). Here it is
diffusers' ``ControlNetModel`` (so the ControlNets users have on disk load), applied inside the pipeline's network
function: every sampler, guidance, img2img and inpainting get it. As in diffusers' pipelines, the control image is
given in [0, 1] at the output resolution and acts on both halves of the classifier-free-guidance batch.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class ControlNetMixin:
    """``load_controlnet`` / ``unload_controlnet`` and the control inputs of a call."""

    controlnet = None

    def load_controlnet(self, path: str | os.PathLike, allow_pickle: bool = False) -> None:
        """Load a diffusers-format ControlNet folder (``config.json`` + weights) that fits this model's UNet."""
        from diffusers import ControlNetModel

        from ldm.loading import ModelLoadError, component_weights

        folder = Path(path)
        if not folder.is_dir():
            raise ModelLoadError(f"ControlNet folder not found: {folder}")
        safetensors = component_weights(folder, allow_pickle)
        try:
            controlnet = ControlNetModel.from_pretrained(str(folder), local_files_only=True,
                                                         use_safetensors=safetensors)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise ModelLoadError(f"cannot load ControlNet {folder}: {str(err).strip().splitlines()[0]}") from None
        check_controlnet_fits(controlnet.config, self.unet.config, folder)
        controlnet = controlnet.eval().requires_grad_(False).to(self.device)
        self.controlnet = controlnet if self.dtype == controlnet.dtype else controlnet.to(dtype=self.dtype)
        self.controlnet_name = folder.name

    def unload_controlnet(self) -> None:
        self.controlnet = None

    def control_tensor(self, control_image, batch_prompts: int, per_prompt: int, height: int, width: int):
        """The control image(s) as ``(B, 3, H, W)`` in [0, 1] for the expanded batch: one image for every prompt,
        or one per prompt; resized to the output size with a warning when they differ."""
        from pipelines.images import load_image, to_rgb

        if self.controlnet is None:
            raise ValueError("control_image was given but no ControlNet is loaded: call "
                             "pipe.load_controlnet(path) (CLI: --controlnet PATH)")
        images = control_image if isinstance(control_image, (list, tuple)) else [control_image]
        if len(images) not in (1, batch_prompts):
            raise ValueError(f"got {len(images)} control images for {batch_prompts} prompts")
        tensors = []
        for image in images:
            pil = to_rgb(load_image(image, "control image"))
            if pil.size != (width, height):
                warnings.warn(f"control image size {pil.size[0]}x{pil.size[1]} differs from the output's "
                              f"{width}x{height}: resized", stacklevel=4)
                pil = pil.resize((width, height), Image.Resampling.BILINEAR)
            tensors.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1))
        control = torch.stack(tensors)  # (1 or P, 3, H, W)
        control = control.expand(batch_prompts, -1, -1, -1) if len(images) == 1 else control
        return control.repeat_interleave(per_prompt, dim=0)  # (B, 3, H, W), prompt-major like the batch


def check_controlnet_fits(control_config, unet_config, source) -> None:
    """A ControlNet must match the UNet's encoder widths and text-embedding size; ValueError naming the mismatch."""
    for key in ("block_out_channels", "cross_attention_dim", "layers_per_block"):
        mine, theirs = control_config.get(key), unet_config.get(key)
        if key == "block_out_channels":
            mine, theirs = list(mine), list(theirs)
        if mine != theirs:
            raise ValueError(f"ControlNet {source} does not fit this model: its {key} is {mine}, the UNet's is "
                             f"{theirs}")


def control_residuals(controlnet, x_in: torch.Tensor, timestep, cond: torch.Tensor, control: torch.Tensor,
                      scale: float, added: dict | None = None) -> dict:
    """The UNet keyword arguments carrying ``scale`` times the ControlNet's residuals (eq. 3). ``control``
    ``(B, 3, H, W)`` is repeated over the CFG halves of ``x_in`` ``(k B, C, h, w)``; ``added``: SDXL's
    ``text_embeds`` and ``time_ids``."""
    image = control.repeat(x_in.shape[0] // control.shape[0], 1, 1, 1).to(x_in.device, x_in.dtype)
    down, mid = controlnet(x_in, timestep, encoder_hidden_states=cond, controlnet_cond=image,
                           conditioning_scale=scale, added_cond_kwargs=added, return_dict=False)
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
