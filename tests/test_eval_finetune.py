"""The DreamBooth table's drift measure: paired per-image differences and the cached base row."""
import json
import math
from pathlib import Path

from train.eval_finetune import (EMBEDDING_WORD, build_parser, cached_base_row, fine_tune_args, paired_drift,
                                 without_hits)


def test_paired_drift_is_the_mean_difference_with_its_standard_error():
    base = {"base hits": [1, 1, 0, 0], "base hits @cfg3": [1, 1, 1, 1]}
    tuned = {"base hits": [1, 0, 0, 1], "base hits @cfg3": [0, 1, 1, 1]}
    drift = paired_drift(tuned, base)
    assert drift["drift"] == 0.0
    assert math.isclose(drift["drift se"], math.sqrt(2 / 3) / 2)  # differences 0, -1, 0, 1
    assert drift["drift @cfg3"] == -0.25
    assert math.isclose(drift["drift se @cfg3"], 0.25)  # sd of (-1, 0, 0, 0) is 1/2, over sqrt(4)


def test_base_row_is_computed_once_per_settings(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"base accuracy": 0.5 + len(calls), "base hits": [1, 0]}

    first = cached_base_row(tmp_path, {"seeds": 2}, compute)
    again = cached_base_row(tmp_path, {"seeds": 2}, compute)
    other = cached_base_row(tmp_path, {"seeds": 3}, compute)
    assert first == again == {"base accuracy": 1.5, "base hits": [1, 0]}
    assert other["base accuracy"] == 2.5 and len(calls) == 2
    assert without_hits(other) == {"base accuracy": 2.5}


def test_each_variant_gets_its_recipe_and_word(tmp_path):
    """DreamBooth variants bind the subject to "sks"; the textual-inversion variant to its new word, whose subject
    captions name it, with no prior-preservation options (they do not apply)."""
    args = build_parser().parse_args(["--work-dir", str(tmp_path), "--instance-captions", "described"])
    embedding, recipe = fine_tune_args(args, tmp_path / "base", "embedding", "0", tmp_path, ["a shape"],
                                       tmp_path / "out", None)
    assert recipe == "textual_inversion" and "--class-prompt" not in embedding
    assert embedding[embedding.index("--identifier") + 1] == EMBEDDING_WORD
    captions = [json.loads(line)["text"] for line in
                (Path(embedding[embedding.index("--instance-data") + 1]) / "metadata.jsonl").read_text().splitlines()]
    assert len(captions) == 4 and all(c.startswith(f"a {EMBEDDING_WORD} shape ") for c in captions)
    full, recipe = fine_tune_args(args, tmp_path / "base", "full", "4", tmp_path, ["a shape"], tmp_path / "out", 1)
    assert recipe == "dreambooth" and full[full.index("--prior-loss-weight") + 1] == "4"
    assert full[full.index("--instance-prompt") + 1] == "a sks shape" and full[full.index("--seed") + 1] == "1"
