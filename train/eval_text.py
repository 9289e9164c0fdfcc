"""``ldm eval --task composition``: where a held-out colour x shape pair loses its shape, text encoder or denoiser.

The denoiser sees a prompt only through the text encoder's hidden states, so a held-out pair ("an orange circle":
orange and circle were each seen, never together) can be drawn right only if those states carry "circle" as they
do for seen circles, and the denoiser reads it there. Two measures, per colour x shape pair of the base world:

1. ``composition_probe``: the last-layer states (all 77 positions, as the UNet reads them) of freshly worded
   single-object captions of each pair (``train.shapes.caption``: random templates, places, sizes and
   backgrounds). Each pair's nearest *seen* pair by cosine of the mean states (which attribute dominates), and
   whether an additive model ``a(colour) + b(shape)`` fitted to the seen pairs reads the shape back from each
   held-out caption as well as from seen ones (whether the encoder composes).
2. ``shape_word_read``: the same question asked where cross-attention reads it, at one token: the state at the
   shape word's position. Is it nearest to the mean state of that shape word in seen pairs of other colours, or is
   it dominated by the colour said before it (a contextual encoder can move the colour into the shape word's state,
   which the mean over 77 positions hides)?
3. ``drawn_shapes``: the shape the evaluator reads back from the pipeline's images of "a large <colour> <shape> in
   the center on a white background" (the easiest placement), several seeds per pair.
"""
from __future__ import annotations

import collections
import itertools

import numpy as np
import torch

from train.shapes import (BASE_SHAPES, HELDOUT_COLOR_SHAPES, OBJECT_COLORS, POSITIONS, SHAPE_SYNONYMS, Scene, caption,
                          make_object)

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
def encode_pair_captions(text_encoder, tokenizer, captions_per_pair: int = 24, seed: int = 0,
                         hidden_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` captions per pair, encoded once: hidden states ``(len(PAIRS), n, 77, D)`` (``hidden_layer`` as in
    ``ldm.text.encode_tokens``; None: the final layer-normed states the denoiser reads) and token ids
    ``(len(PAIRS), n, 77)``."""
    from ldm.text import encode_tokens, tokenize_batch

    hidden, ids = [], []
    for color, shape in PAIRS:
        tokens = tokenize_batch(tokenizer, pair_captions(color, shape, captions_per_pair, seed))  # (n, 1, 77)
        hidden.append(encode_tokens(text_encoder, tokens, hidden_layer).float())  # (n, 77, D)
        ids.append(tokens[:, 0])
    return torch.stack(hidden), torch.stack(ids)


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


def _shape_word_end(ids: list[int], shape_words: list[list[int]]) -> int:
    """The position of the last token of the first shape word (any synonym; a word may be several BPE tokens)."""
    for end in range(len(ids)):
        for word in shape_words:
            if ids[max(0, end + 1 - len(word)):end + 1] == word:
                return end
    raise ValueError("caption has no shape word")


def states_at_shape_words(tokenizer, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(P, n, D)``: from :func:`encode_pair_captions`' states ``(P, n, 77, D)`` and ids ``(P, n, 77)``, each
    caption's state at its shape word's (last) token."""
    shape_words = [tokenizer(word, add_special_tokens=False)["input_ids"]
                   for words in SHAPE_SYNONYMS.values() for word in set(words)]
    ends = torch.tensor([[_shape_word_end(row, shape_words) for row in pair] for pair in ids.tolist()])  # (P, n)
    return hidden.gather(2, ends[:, :, None, None].expand(-1, -1, 1, hidden.shape[-1]))[:, :, 0]


def shape_word_states(text_encoder, tokenizer, captions_per_pair: int = 24, seed: int = 0,
                      hidden_layer: int | None = None) -> torch.Tensor:
    """``(len(PAIRS), n, D)``: each caption's hidden state at its shape word's (last) token."""
    return states_at_shape_words(tokenizer, *encode_pair_captions(text_encoder, tokenizer, captions_per_pair, seed,
                                                                  hidden_layer))


def shape_word_read(states: torch.Tensor) -> dict[str, float]:
    """Read the shape from the shape word's own state (``(P, n, D)`` from :func:`shape_word_states`): the nearest,
    by cosine, of the per-shape mean unit states over the seen pairs. Returns the share read right among seen and
    among held-out captions, and the held-out states' mean cosine to seen states of the same shape (other colours)
    and of the same colour (other shapes). An encoder that keeps each word's meaning at its token reads held-out
    shapes as well as seen ones; one that lets the colour before it dominate reads them at chance or worse."""
    unit = torch.nn.functional.normalize(states, dim=-1)  # (P, n, D)
    seen = [i for i, pair in enumerate(PAIRS) if pair not in HELDOUT_COLOR_SHAPES]
    heldout = [i for i in range(len(PAIRS)) if i not in seen]
    centroids = torch.stack([unit[[i for i in seen if PAIRS[i][1] == shape]].flatten(0, 1).mean(0)
                             for shape in BASE_SHAPES])  # (S, D)
    read = (unit @ torch.nn.functional.normalize(centroids, dim=-1).T).argmax(-1)  # (P, n)
    truth = torch.tensor([BASE_SHAPES.index(shape) for _, shape in PAIRS])[:, None]  # (P, 1)
    right = (read == truth).float()

    def mean_cosine(i: int, same: int) -> torch.Tensor:
        others = unit[[j for j in seen if PAIRS[j][same] == PAIRS[i][same]]].flatten(0, 1)  # (m, D)
        return (unit[i] @ others.T).mean()

    return {"seen": float(right[seen].mean()), "heldout": float(right[heldout].mean()),
            "heldout_cosine_same_shape": float(torch.stack([mean_cosine(i, 1) for i in heldout]).mean()),
            "heldout_cosine_same_colour": float(torch.stack([mean_cosine(i, 0) for i in heldout]).mean())}


def composition_probe(text_encoder, tokenizer, captions_per_pair: int = 24, seed: int = 0) -> dict:
    """Nearest-seen-pair rows, the share of seen / held-out pairs whose neighbour shares their shape, the additive
    model's shape read-back on seen / held-out captions, and the shape word's own state's read-back."""
    hidden, ids = encode_pair_captions(text_encoder, tokenizer, captions_per_pair, seed)  # (P, n, 77, D), (P, n, 77)
    states = hidden.flatten(2)  # (P, n, 77 * D)
    rows = nearest_seen(states)

    def share(heldout: bool) -> float:
        group = [row["shares_shape"] for row in rows if row["heldout"] == heldout]
        return sum(group) / len(group)

    return {"pairs": rows, "seen_shares_shape": share(False), "heldout_shares_shape": share(True),
            "additive_shape_read": additive_shape_decoding(states),
            "shape_word_read": shape_word_read(states_at_shape_words(tokenizer, hidden, ids))}


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
