"""The composition probe of the text encoder (train/eval_text.py) on encoders with known answers."""
from __future__ import annotations

import pytest
import torch

from ldm.text import load_tokenizer
from train.eval_text import PAIRS, composition_probe, pair_captions, shape_word_read, shape_word_states
from train.shapes import HELDOUT_COLOR_SHAPES, OBJECT_COLORS, parse_prompt


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


class ColourLeakingEncoder(torch.nn.Module):
    """A contextual 'text encoder' whose every token carries the caption's colour (one-hot, summed over the
    sequence) plus, weakly, its own shape word: as if attention had moved the colour into the shape word's state."""

    def __init__(self, tokenizer, shape_weight: float = 0.1):
        super().__init__()
        self.colours = WordEncoder(tokenizer, [[c] for c in OBJECT_COLORS])
        self.shapes = WordEncoder(tokenizer, [["circle", "disc"], ["square", "box"], ["triangle"]])
        self.shape_weight = shape_weight

    @property
    def device(self):
        return self.colours.device

    def forward(self, ids):
        colour = self.colours(ids)[0].sum(1, keepdim=True).expand(-1, ids.shape[1], -1)  # (B, 77, 6)
        return (torch.cat([colour, self.shape_weight * self.shapes(ids)[0]], -1),)  # (B, 77, 9)


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


def test_shape_word_read_tells_a_word_encoder_from_a_colour_leaking_one(tokenizer):
    words = WordEncoder(tokenizer, [["circle", "disc"], ["square", "box"], ["triangle"], ["red", "orange"]])
    read = shape_word_read(shape_word_states(words, tokenizer, captions_per_pair=8))
    assert read["seen"] == read["heldout"] == 1.0
    assert read["heldout_cosine_same_shape"] == pytest.approx(1.0) and read["heldout_cosine_same_colour"] == 0.0
    # the colour in the shape word's state pulls each held-out pair to the shapes its colour was seen with
    leaky = ColourLeakingEncoder(tokenizer)
    read = shape_word_read(shape_word_states(leaky, tokenizer, captions_per_pair=8))
    assert read["seen"] == 1.0 and read["heldout"] == 0.0
    assert read["heldout_cosine_same_colour"] > read["heldout_cosine_same_shape"]


def test_shape_word_states_take_the_shape_words_token(tokenizer):
    shapes = WordEncoder(tokenizer, [["circle", "disc"], ["square", "box"], ["triangle"]])
    states = shape_word_states(shapes, tokenizer, captions_per_pair=4)  # (P, 4, 3)
    expected = torch.tensor([("circle", "square", "triangle").index(shape) for _, shape in PAIRS])
    assert torch.equal(states.argmax(-1), expected[:, None].expand(-1, 4)) and torch.all(states.sum(-1) == 1)
