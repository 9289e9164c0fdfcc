"""``ldm eval --task composition``: where a held-out colour x shape pair loses its shape, text encoder or denoiser.

The denoiser sees a prompt only through the text encoder's hidden states, so a held-out pair ("an orange circle":
orange and circle were each seen, never together) can be drawn right only if those states carry "circle" as they
do for seen circles, and the denoiser reads it there. Two measures, per colour x shape pair of the base world:

1. ``composition_probe``: the last-layer states (all 77 positions, as the UNet reads them) of freshly worded
   single-object captions of each pair (``train.shapes.caption``: random templates, places, sizes and
   backgrounds). Each pair's nearest *seen* pair by cosine of the mean states (which attribute dominates), and
   whether an additive model ``a(colour) + b(shape)`` fitted to the seen pairs reads the shape back from each
   held-out caption as well as from seen ones (whether the encoder composes).
2. ``drawn_shapes``: the shape the evaluator reads back from the pipeline's images of "a large <colour> <shape> in
   the center on a white background" (the easiest placement), several seeds per pair.
"""
from __future__ import annotations

import collections
import itertools

import numpy as np
import torch

from train.shapes import BASE_SHAPES, HELDOUT_COLOR_SHAPES, OBJECT_COLORS, POSITIONS, Scene, caption, make_object

PAIRS: tuple[tuple[str, str], ...] = tuple(itertools.product(OBJECT_COLORS, BASE_SHAPES))
"""Every (colour, shape) pair of the base world, colours in ``OBJECT_COLORS`` order."""


def pair_captions(color: str, shape: str, count: int, seed: int = 0) -> list[str]:
    """``count`` freshly worded captions of single-object scenes showing a ``color`` ``shape`` at random places,
    sizes and backgrounds (deterministic in ``seed``)."""
    rng = np.random.default_rng([seed, BASE_SHAPES.index(shape), list(OBJECT_COLORS).index(color)])
    captions = []
    for _ in range(count):
        obj = make_object(color, shape, str(rng.choice(list(POSITIONS))), str(rng.choice(["small", "large"])))
        scene = Scene(background=str(rng.choice(["white", "black", "gray"])), objects=(obj,))
        captions.append(caption(scene, rng))
    return captions


@torch.no_grad()
def caption_states(text_encoder, tokenizer, captions_per_pair: int = 24, seed: int = 0) -> torch.Tensor:
    """``(len(PAIRS), n, 77 * D)``: the last-layer hidden states of ``n`` captions per pair, flattened."""
    from ldm.text import encode_tokens, tokenize_batch

    states = []
    for color, shape in PAIRS:
        ids = tokenize_batch(tokenizer, pair_captions(color, shape, captions_per_pair, seed))  # (n, 1, 77)
        states.append(encode_tokens(text_encoder, ids).float().flatten(1))  # (n, 77 * D)
    return torch.stack(states)


def nearest_seen(states: torch.Tensor) -> list[dict]:
    """For every pair, its nearest other seen pair by cosine of the pairs' mean states (``(P, n, F)``, ordered as
    ``PAIRS``) centred over the pairs, and whether that neighbour shares the pair's shape."""
    means = states.mean(1)  # (P, F)
    unit = torch.nn.functional.normalize(means - means.mean(0), dim=-1)
    cosine = unit @ unit.T  # (P, P)
    seen = [pair not in HELDOUT_COLOR_SHAPES for pair in PAIRS]
    rows = []
    for i, (color, shape) in enumerate(PAIRS):
        candidates = [j for j in range(len(PAIRS)) if seen[j] and j != i]
        j = max(candidates, key=lambda k: float(cosine[i, k]))
        rows.append({"pair": f"{color} {shape}", "heldout": not seen[i], "nearest_seen": " ".join(PAIRS[j]),
                     "cosine": round(float(cosine[i, j]), 3), "shares_shape": PAIRS[j][1] == shape})
    return rows


def additive_shape_decoding(states: torch.Tensor) -> dict[str, float]:
    """Is the shape in the states of a held-out pair as it is for seen pairs? Fit the additive model
    ``state(colour, shape) ~ a(colour) + b(shape)`` by least squares to the seen pairs' mean states
    (``states``: ``(P, n, F)``), then read each caption's shape as the ``s`` nearest to ``a(its colour) + b(s)``.
    Returns the share read right among seen and among held-out captions. A compositional encoder scores the same on
    both; one that maps a held-out pair onto a seen one scores low on the held-out."""
    colors, shapes = list(OBJECT_COLORS), list(BASE_SHAPES)
    seen = [i for i, pair in enumerate(PAIRS) if pair not in HELDOUT_COLOR_SHAPES]
    design = torch.zeros(len(PAIRS), len(colors) + len(shapes))  # one-hot colour | one-hot shape
    for i, (color, shape) in enumerate(PAIRS):
        design[i, colors.index(color)] = design[i, len(colors) + shapes.index(shape)] = 1.0
    weights = torch.linalg.lstsq(design[seen], states[seen].mean(1)).solution  # (C + S, F)
    right = {False: [], True: []}
    for i, (color, shape) in enumerate(PAIRS):
        options = torch.stack([weights[colors.index(color)] + weights[len(colors) + k] for k in range(len(shapes))])
        read = torch.cdist(states[i], options).argmin(-1)  # (n,)
        right[i not in seen] += (read == shapes.index(shape)).tolist()
    return {"seen": sum(right[False]) / len(right[False]), "heldout": sum(right[True]) / len(right[True])}


def composition_probe(text_encoder, tokenizer, captions_per_pair: int = 24, seed: int = 0) -> dict:
    """Nearest-seen-pair rows, the share of seen / held-out pairs whose neighbour shares their shape, and the
    additive model's shape read-back on seen / held-out captions."""
    states = caption_states(text_encoder, tokenizer, captions_per_pair, seed)
    rows = nearest_seen(states)

    def share(heldout: bool) -> float:
        group = [row["shares_shape"] for row in rows if row["heldout"] == heldout]
        return sum(group) / len(group)

    return {"pairs": rows, "seen_shares_shape": share(False), "heldout_shares_shape": share(True),
            "additive_shape_read": additive_shape_decoding(states)}


def drawn_shapes(pipe, seeds: int = 6, guidance_scale: float = 3.0, steps: int = 20) -> dict[str, dict]:
    """Per pair: how often each shape is read back from "a large <colour> <shape> in the center on a white
    background" over ``seeds`` seeds (``"none"`` when no object is found)."""
    from train.evaluate import detect_objects

    counts = {}
    for color, shape in PAIRS:
        prompts = [f"a large {color} {shape} in the center on a white background"] * seeds
        generators = [torch.Generator().manual_seed(seed) for seed in range(seeds)]
        images = pipe(prompts, generator=generators, num_inference_steps=steps, guidance_scale=guidance_scale,
                      progress=False).images
        found = [detect_objects(image).objects for image in images]
        counts[f"{color} {shape}"] = dict(collections.Counter(objs[0].shape if objs else "none" for objs in found))
    return counts
