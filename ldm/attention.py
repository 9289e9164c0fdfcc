"""Attention processors that let a controller observe and replace attention probabilities.

Installed on every ``diffusers`` ``Attention`` module of a UNet. Without a controller the processor is the fast
path: ``torch.nn.functional.scaled_dot_product_attention`` (or xformers' memory-efficient attention when it is
installed and the tensors are on CUDA). With a controller, the probabilities ``softmax(QK^T / sqrt(d))`` are
formed explicitly and handed to ``controller(probs, is_cross=..., place=..., step=...)``, which returns the
probabilities to use — the hook prompt-to-prompt (Hertz et al. 2022, sec. 3) is built on. ``place`` is the
module's name in the network (e.g. ``"down_blocks.0.attentions.0.transformer_blocks.0.attn2"``) and ``step`` is
the sampler's step index, set by the pipeline from the sampler's callback, never inferred by counting calls.

MMDiT models (SD3, Esser et al. 2024) have no cross-attention: image and text tokens attend jointly
(:class:`JointControlledAttnProcessor`). There the controller sees the image-query rows: the image -> text block
(the CLIP tokens only) as cross-attention and the image -> image block as self-attention; what it returns for a
block is scaled back to the row's own attention mass on that block.
"""
from __future__ import annotations

import importlib.util
import math
import re
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

XFORMERS_AVAILABLE = importlib.util.find_spec("xformers") is not None


class AttentionController(Protocol):
    """Optionally a controller has ``places`` (the set of layer names it edits; other layers then run the fast
    path) and ``identity = True`` (it replaces self-attention maps by the identity at its places, which UNet
    processors apply as ``out = value`` without forming the maps)."""

    def __call__(self, probs: torch.Tensor, *, is_cross: bool, place: str, step: int) -> torch.Tensor:
        """``probs``: ``(B, heads, queries, keys)``; return the probabilities to use (same shape)."""


def controller_places(controller) -> set[str] | None:
    """The layers a controller edits, or None for all."""
    return getattr(controller, "places", None)


class AttentionHook:
    """Shared state of all processors of one network: the active controller (or None) and the step index."""

    def __init__(self):
        self.controller: AttentionController | None = None
        self.step = 0
        # MMDiT: the number of CLIP tokens at the start of the context (the keys a controller sees as "cross"), and
        # how many identical tokens the last context token stands for (see JointControlledAttnProcessor).
        self.text_tokens = 77
        self.tail_repeats = 1


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Fast attention ``(B, H, Lq, D) x (B, H, Lk, D) -> (B, H, Lq, D)``: xformers on CUDA when installed,
    else torch's scaled_dot_product_attention."""
    if XFORMERS_AVAILABLE and query.is_cuda:
        import xformers.ops

        out = xformers.ops.memory_efficient_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(query, key, value, scale=scale)


def _fused_linear(layers: tuple, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tuple(layer(x) for layer in layers)`` as one matrix product over the concatenated weights."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    return F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)


def project_qkv(attn, hidden_states: torch.Tensor, context: torch.Tensor, is_cross: bool):
    """Queries, keys and values ``(B, L, C)``. While inductor compiles with frozen weights (``pipe.compile()``), plain
    ``Linear`` projections of the same input run as one product: the concatenated weight is folded into a constant,
    and on a CPU one ``(L, 3C)`` product costs less than three tiny ones (about 20 us of overhead each)."""
    layers = (attn.to_q, attn.to_k, attn.to_v)
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()  # torch >= 2.3
    fusable = (compiling and torch._inductor.config.freezing
               and all(type(layer) is torch.nn.Linear for layer in layers)  # not LoRA-wrapped
               and len({layer.bias is None for layer in layers}) == 1)
    if not fusable:
        return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    if not is_cross:
        return _fused_linear(layers, hidden_states)
    return (attn.to_q(hidden_states), *_fused_linear(layers[1:], context))


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
        query, key, value = project_qkv(attn, hidden_states, context, is_cross)
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
        places = controller_places(controller)
        if places is not None and self.place not in places:
            controller = None  # a controller that names its layers leaves the others on the fast path
        if controller is not None and getattr(controller, "identity", False) and not is_cross:
            out = value  # the identity map, without forming the scores it replaces
        elif controller is None and mask is None:
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


def _heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, L, H * D) -> (B, H, L, D)``."""
    return tensor.view(tensor.shape[0], -1, heads, tensor.shape[-1] // heads).transpose(1, 2)


class JointControlledAttnProcessor:
    """MMDiT joint attention (Esser et al. 2024, sec. 4, fig. 2), equivalent to diffusers' ``JointAttnProcessor2_0``:
    image tokens and context tokens are projected by their own weights and attend over the concatenation
    ``[image; context]``. Two additions:

    - ``hook.tail_repeats = n > 1``: the last context token stands for ``n`` identical tokens. SD3 without its T5
      appends 256 all-zero T5 tokens; identical tokens stay identical through every layer (all maps but attention
      are per token, and identical queries get identical outputs), and ``n`` identical keys/values weigh in the
      softmax as one key with logit ``+ log n``. So one token with that bias gives exactly the outputs of the 256,
      at a fraction of the cost.
    - the controller hook of the module docstring (image -> CLIP-text block as cross, image -> image as self).
    """

    def __init__(self, hook: AttentionHook, place: str):
        self.hook = hook
        self.place = place

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        heads = attn.heads
        query, key, value = (_heads(f(hidden_states), heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        n_image = hidden_states.shape[1]
        joint = encoder_hidden_states is not None
        if joint:
            c_query, c_key, c_value = (_heads(f(encoder_hidden_states), heads)
                                       for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query, key, value = (torch.cat(pair, dim=2) for pair in
                                 ((query, c_query), (key, c_key), (value, c_value)))  # (B, H, N + Lc, D)
        bias = None
        if joint and self.hook.tail_repeats > 1:
            bias = torch.zeros(key.shape[2], dtype=query.dtype, device=query.device)  # (N + Lc,)
            bias[-1] = math.log(self.hook.tail_repeats)
            bias = bias.view(1, 1, 1, -1)  # broadcast over batch, heads and queries
        scale = attn.scale
        controller = self.hook.controller
        if controller is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)
        else:
            scores = query @ key.transpose(-1, -2) * scale  # (B, H, N + Lc, N + Lc)
            probs = (scores if bias is None else scores + bias).softmax(dim=-1)
            probs = self.control(controller, probs, n_image, joint)
            out = probs.to(value.dtype) @ value
        out = out.transpose(1, 2).reshape(out.shape[0], -1, heads * out.shape[-1]).to(query.dtype)  # (B, L, H*D)
        image_out = attn.to_out[1](attn.to_out[0](out[:, :n_image]))
        if not joint:
            return image_out
        context_out = out[:, n_image:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return image_out, context_out

    def control(self, controller, probs: torch.Tensor, n_image: int, joint: bool) -> torch.Tensor:
        """Let the controller edit the image-query rows' image -> CLIP-text block (as cross-attention) and image ->
        image block (as self-attention). Each edited block is scaled back to the row's own mass on that block: a
        replaced map takes the source's distribution over the block's keys while keeping how much the edited image
        attends to text and to itself, so rows still sum to 1 (and reweighting changes a word's share)."""
        step = self.hook.step
        if not joint:
            return controller(probs, is_cross=False, place=self.place, step=step)
        rows = probs[:, :, :n_image].clone()  # (B, H, N, N + Lc)
        for block, is_cross in ((slice(n_image, n_image + self.hook.text_tokens), True), (slice(0, n_image), False)):
            mass = rows[..., block].sum(dim=-1, keepdim=True)  # (B, H, N, 1)
            edited = controller(rows[..., block].contiguous(), is_cross=is_cross, place=self.place, step=step)
            edited_mass = edited.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(rows.dtype).tiny)
            rows[..., block] = edited * (mass / edited_mass)
        return torch.cat([rows, probs[:, :, n_image:]], dim=2)


class IdentitySelfAttention:
    """Perturbed-attention guidance's perturbation (Ahn et al. 2024, sec. 4): the self-attention maps at
    ``places`` become the identity, so each token keeps only its own value, which removes the structure those
    maps carry. Other maps pass through."""

    identity = True

    def __init__(self, places: set[str]):
        self.places = places

    def __call__(self, probs: torch.Tensor, *, is_cross: bool, place: str, step: int) -> torch.Tensor:
        if is_cross or place not in self.places:
            return probs
        eye = torch.eye(probs.shape[-2], probs.shape[-1], dtype=probs.dtype, device=probs.device)
        return eye.expand_as(probs)


def self_attention_places(network: torch.nn.Module, layers: Sequence[str]) -> set[str]:
    """The self-attention modules a PAG layer list names, chosen as diffusers' ``set_pag_applied_layers`` does:
    each entry is a regular expression searched in the module names (``"mid"``, ``"down_blocks.1"``). An entry
    that names no self-attention layer is an error."""
    from diffusers.models.attention_processor import Attention

    names = [name for name, module in network.named_modules()
             if isinstance(module, Attention) and not module.is_cross_attention]
    places = set()
    for layer in layers:
        found = [name for name in names if re.search(layer, name) is not None]
        if not found:
            raise ValueError(f"no self-attention layer matches PAG layer {layer!r}; e.g. {', '.join(names[:3])}")
        places.update(found)
    return places


def install_attention_hook(network: torch.nn.Module) -> AttentionHook:
    """Replace every attention processor of a UNet by a :class:`ControlledAttnProcessor`, or of an MMDiT by a
    :class:`JointControlledAttnProcessor`, all sharing one hook."""
    hook = AttentionHook()
    kind = JointControlledAttnProcessor if "joint_attention_dim" in network.config else ControlledAttnProcessor
    processors = {name: kind(hook, name.removesuffix(".processor")) for name in network.attn_processors}
    network.set_attn_processor(processors)
    return hook
