"""Attention processors that let a controller observe and replace attention probabilities.

Installed on every ``diffusers`` ``Attention`` module of a UNet. Without a controller the processor is the fast
path: ``torch.nn.functional.scaled_dot_product_attention`` (or xformers' memory-efficient attention when it is
installed and the tensors are on CUDA). With a controller, the probabilities ``softmax(QK^T / sqrt(d))`` are
formed explicitly and handed to ``controller(probs, is_cross=..., place=..., step=...)``, which returns the
probabilities to use — the hook prompt-to-prompt (Hertz et al. 2022, sec. 3) is built on. ``place`` is the
module's name in the network (e.g. ``"down_blocks.0.attentions.0.transformer_blocks.0.attn2"``) and ``step`` is
the sampler's step index, set by the pipeline from the sampler's callback, never inferred by counting calls.
"""
from __future__ import annotations

import importlib.util
from typing import Protocol

import torch
import torch.nn.functional as F

XFORMERS_AVAILABLE = importlib.util.find_spec("xformers") is not None


class AttentionController(Protocol):
    def __call__(self, probs: torch.Tensor, *, is_cross: bool, place: str, step: int) -> torch.Tensor:
        """``probs``: ``(B, heads, queries, keys)``; return the probabilities to use (same shape)."""


class AttentionHook:
    """Shared state of all processors of one network: the active controller (or None) and the step index."""

    def __init__(self):
        self.controller: AttentionController | None = None
        self.step = 0


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Fast attention ``(B, H, Lq, D) x (B, H, Lk, D) -> (B, H, Lq, D)``: xformers on CUDA when installed,
    else torch's scaled_dot_product_attention."""
    if XFORMERS_AVAILABLE and query.is_cuda:
        import xformers.ops

        out = xformers.ops.memory_efficient_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(query, key, value, scale=scale)


class ControlledAttnProcessor:
    """A diffusers attention processor equivalent to ``AttnProcessor2_0`` for UNet attention (self and cross),
    with the controller hook described in the module docstring."""

    def __init__(self, hook: AttentionHook, place: str):
        self.hook = hook
        self.place = place

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial_shape = None
        if hidden_states.ndim == 4:
            batch, channels, height, width = hidden_states.shape
            spatial_shape = (channels, height, width)
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # (B, HW, C)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        context = hidden_states if not is_cross else (
            attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states)
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
                             for t in (query, key, value))  # (B, H, L, D)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])

        controller = self.hook.controller
        if controller is None and mask is None:
            out = attend(query, key, value, attn.scale)
        else:
            scores = query @ key.transpose(-1, -2) * attn.scale  # (B, H, Lq, Lk)
            if mask is not None:
                scores = scores + mask
            probs = scores.softmax(dim=-1)
            if controller is not None:
                probs = controller(probs, is_cross=is_cross, place=self.place, step=self.hook.step)
            out = probs.to(value.dtype) @ value
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # (B, L, H*D)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial_shape is not None:
            out = out.transpose(-1, -2).reshape(batch, *spatial_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_attention_hook(unet: torch.nn.Module) -> AttentionHook:
    """Replace every attention processor of ``unet`` by a :class:`ControlledAttnProcessor` sharing one hook."""
    hook = AttentionHook()
    processors = {name: ControlledAttnProcessor(hook, name.removesuffix(".processor"))
                  for name in unet.attn_processors}
    unet.set_attn_processor(processors)
    return hook
