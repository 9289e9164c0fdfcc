"""Checks of user settings: each raises ValueError with a one-line message naming the setting and the value."""
from __future__ import annotations

import math

import numpy as np


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def check_prompts(prompt, name: str = "prompt") -> list[str]:
    """A prompt is a string or a non-empty list of strings (the empty string means unconditional)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {type(prompt).__name__}")


def check_finite(name: str, value, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")
    return float(value)


def check_strength(strength) -> float:
    """An img2img / inpainting strength: a number in [0, 1]."""
    return check_finite("strength", strength, 0.0, 1.0)
