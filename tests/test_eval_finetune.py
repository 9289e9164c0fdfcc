"""The DreamBooth table's drift measure: paired per-image differences and the cached base row."""
import math

from train.eval_finetune import cached_base_row, paired_drift, without_hits


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
