"""Custom image-caption folders, in the layouts users already have.

A dataset is a folder of images (``.png .jpg .jpeg .webp .bmp``, searched recursively) with captions given either

* by ``metadata.jsonl`` in the folder: one JSON object per line with ``file_name`` (relative to the folder) and
  ``text`` (the Hugging Face ``imagefolder`` layout), or
* by a ``.txt`` file beside each image with the same stem (``cat.png`` + ``cat.txt``, the kohya / A1111 layout).

``metadata.jsonl`` wins when both exist. Every problem is collected before anything is trained, and the error
names each bad file (unreadable image, missing or empty caption, a metadata line naming a missing file). Images
of any size and mode are accepted: they are converted to RGB (transparency composited on white) and resized to
the training resolution by ``--resize center_crop|pad|stretch``; ``--dry-run`` prints what was found.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESIZE_MODES = ("center_crop", "pad", "stretch")
MAX_LISTED_PROBLEMS = 5


class DatasetError(ValueError):
    """A dataset folder that cannot be trained on; the message lists the bad files."""


@dataclass(frozen=True)
class Example:
    """One image file with its caption, size ``(width, height)`` and PIL mode."""

    path: Path
    caption: str | None
    size: tuple[int, int]
    mode: str


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_metadata(folder: Path, problems: list[str]) -> dict[Path, str] | None:
    """Captions from ``metadata.jsonl`` keyed by resolved image path; None when the file does not exist."""
    file = folder / "metadata.jsonl"
    if not file.is_file():
        return None
    captions: dict[Path, str] = {}
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name, text = record["file_name"], record["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            problems.append(f"metadata.jsonl line {number}: not a JSON object with 'file_name' and 'text'")
            continue
        path = (folder / name).resolve()
        if not path.is_file():
            problems.append(f"metadata.jsonl line {number}: {name} does not exist")
            continue
        captions[path] = str(text)
    return captions


def _caption_for(image: Path, metadata: dict[Path, str] | None) -> str | None:
    if metadata is not None:
        return metadata.get(image.resolve())
    sidecar = image.with_suffix(".txt")
    return sidecar.read_text().strip() if sidecar.is_file() else None


def _probe(image: Path) -> tuple[tuple[int, int], str] | str:
    """``(size, mode)`` of a readable image, else the reason it cannot be read."""
    try:
        with Image.open(image) as opened:
            opened.load()
            return opened.size, opened.mode
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return f"unreadable image ({str(err).splitlines()[0] if str(err) else type(err).__name__})"


def scan_folder(folder: str | Path, captions: str = "required") -> list[Example]:
    """All images of ``folder`` with their captions; ``captions``: ``"required"`` (every image needs one),
    ``"optional"`` (DreamBooth instance images, which share one prompt) . Raises :class:`DatasetError` listing
    every bad file, so one run of the command shows all that needs fixing."""
    if captions not in ("required", "optional"):
        raise ValueError(f"captions must be 'required' or 'optional', got {captions!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist")
    problems: list[str] = []
    metadata = _read_metadata(folder, problems)
    images = _image_files(folder)
    if not images:
        raise DatasetError(f"dataset folder {folder} has no images ({' '.join(IMAGE_SUFFIXES)})")
    examples = []
    for image in images:
        name = image.relative_to(folder)
        probed = _probe(image)
        if isinstance(probed, str):
            problems.append(f"{name}: {probed}")
            continue
        text = _caption_for(image, metadata)
        if captions == "required" and not text:
            where = "no metadata.jsonl entry" if metadata is not None else f"no {image.with_suffix('.txt').name}"
            problems.append(f"{name}: {'empty caption' if text == '' else 'missing caption'} ({where})")
            continue
        examples.append(Example(image, text or None, *probed))
    if problems:
        listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"; and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise DatasetError(f"dataset {folder}: {len(problems)} problem(s): {listed}{more}")
    return examples


def describe(examples: list[Example], resolution: int, resize: str) -> str:
    """A short report of a scanned dataset for ``--dry-run``: counts, sizes, modes, captions."""
    sizes = Counter(f"{w}x{h}" for w, h in (e.size for e in examples))
    modes = Counter(e.mode for e in examples)
    captioned = [e for e in examples if e.caption]
    lines = [f"{len(examples)} images, {len(captioned)} with captions",
             "sizes: " + ", ".join(f"{s} ({n})" for s, n in sizes.most_common(5))
             + (f", {len(sizes) - 5} more" if len(sizes) > 5 else ""),
             "modes: " + ", ".join(f"{m} ({n})" for m, n in modes.most_common())]
    resized = sum(1 for e in examples if e.size != (resolution, resolution))
    converted = sum(1 for e in examples if e.mode != "RGB")
    lines.append(f"training input: {resolution}x{resolution} RGB; {resized} resized ({resize}), "
                 f"{converted} converted to RGB")
    lines += [f"  {e.path.name}: {e.caption!r}" for e in captioned[:3]]
    return "\n".join(lines)


def fit_square(image: Image.Image, resolution: int, resize: str) -> Image.Image:
    """Resize to ``resolution`` x ``resolution``: ``center_crop`` (shorter side to ``resolution``, crop the
    middle, as diffusers' training scripts do), ``pad`` (longer side to ``resolution``, pad with the border's
    median colour) or ``stretch``."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; known: {', '.join(RESIZE_MODES)}")
    width, height = image.size
    if (width, height) == (resolution, resolution):
        return image
    lanczos = Image.Resampling.LANCZOS
    if resize == "stretch":
        return image.resize((resolution, resolution), lanczos)
    if resize == "center_crop":
        scale = resolution / min(width, height)
        w, h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
        image = image.resize((w, h), lanczos)
        left, top = (w - resolution) // 2, (h - resolution) // 2
        return image.crop((left, top, left + resolution, top + resolution))
    scale = resolution / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    image = image.resize((w, h), lanczos)
    array = np.asarray(image)
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])  # (P, 3)
    canvas = Image.new("RGB", (resolution, resolution), tuple(int(c) for c in np.median(border, axis=0)))
    canvas.paste(image, ((resolution - w) // 2, (resolution - h) // 2))
    return canvas


def load_pixels(paths: list[Path], resolution: int, resize: str = "center_crop") -> torch.Tensor:
    """Images ``(N, 3, R, R)`` float32 in [-1, 1], RGB, resized per :func:`fit_square`."""
    from pipelines.images import load_image, to_rgb

    arrays = [np.asarray(fit_square(to_rgb(load_image(p)), resolution, resize), dtype=np.float32) for p in paths]
    return torch.from_numpy(np.stack(arrays) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()
