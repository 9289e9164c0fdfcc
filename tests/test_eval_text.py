"""The composition probe of the text encoder (train/eval_text.py) on encoders with known answers."""
from __future__ import annotations

import pytest
import torch

from ldm.text import load_tokenizer
from train.eval_text import PAIRS, composition_probe, pair_captions
from train.shapes import HELDOUT_COLOR_SHAPES, parse_prompt


class WordEncoder(torch.nn.Module):
    """A context-free 'text encoder': each token id of the given words maps to its group's one-hot vector, every
    other token to zero. Grouping shape words makes a perfectly compositional encoder that carries only shape."""

    def __init__(self, tokenizer, groups: list[list[str]]):
        super().__init__()
        self.table = torch.nn.Embedding(len(tokenizer), len(groups))
        self.table.weight.data.zero_()
        for g, words in enumerate(groups):
            for word in words:
                (token,) = tokenizer(word, add_special_tokens=False)["input_ids"]
                self.table.weight.data[token, g] = 1.0

    @property
    def device(self):
        return self.table.weight.device

    def forward(self, ids):
        return (self.table(ids),)  # (B, 77, groups)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_pair_captions_state_the_pair():
    for color, shape in PAIRS[:4]:
        for text in pair_captions(color, shape, 6):
            (obj,) = parse_prompt(text).objects
            assert (obj.color, obj.shape) == (color, shape), text


def test_probe_reads_shape_from_a_shape_encoder_and_not_from_a_colour_encoder(tokenizer):
    shapes = WordEncoder(tokenizer, [["circle", "disc", "disk"], ["square", "box"], ["triangle"]])
    result = composition_probe(shapes, tokenizer, captions_per_pair=12)
    assert result["seen_shares_shape"] == 1.0 and result["heldout_shares_shape"] == 1.0
    # the additive model reads the shape of held-out captions as well as of seen ones
    assert result["additive_shape_read"]["heldout"] >= 0.9 and result["additive_shape_read"]["seen"] >= 0.9
    assert {row["pair"] for row in result["pairs"] if row["heldout"]} == {f"{c} {s}" for c, s in
                                                                          HELDOUT_COLOR_SHAPES}
    colours = WordEncoder(tokenizer, [[c] for c in ("red", "green", "blue", "yellow", "purple", "orange")])
    result = composition_probe(colours, tokenizer, captions_per_pair=12)
    assert result["seen_shares_shape"] == 0.0 and result["heldout_shares_shape"] == 0.0
    assert result["additive_shape_read"]["heldout"] < 1 / 3  # no shape in the states: not above chance
    for row in result["pairs"]:
        assert row["nearest_seen"].split()[0] == row["pair"].split()[0]


def test_drawn_shapes_reads_back_what_a_perfect_model_draws():
    from test_eval_model import RenderingPipe

    from train.eval_text import drawn_shapes

    pipe = RenderingPipe()
    counts = drawn_shapes(pipe, seeds=2, guidance_scale=3.0, steps=5)
    assert counts == {f"{color} {shape}": {shape: 2} for color, shape in PAIRS}
    assert pipe.calls[0][2] == {"num_inference_steps": 5, "guidance_scale": 3.0}
