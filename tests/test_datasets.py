"""Custom image-caption folders: both caption layouts, every kind of bad file reported, sizes and modes fitted."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from train.datasets import DatasetError, describe, fit_square, load_pixels, scan_folder


def write_image(path, size=(20, 10), mode="RGB", color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).convert(mode).save(path)
    return path


def test_metadata_jsonl_captions(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "sub" / "b.jpg")
    lines = [{"file_name": "a.png", "text": "a red box"}, {"file_name": "sub/b.jpg", "text": "another"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    examples = scan_folder(tmp_path)
    assert [(e.path.name, e.caption) for e in examples] == [("a.png", "a red box"), ("b.jpg", "another")]


def test_txt_sidecar_captions(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a red circle \n")
    assert scan_folder(tmp_path)[0].caption == "a red circle"


def test_every_problem_is_named_in_one_error(tmp_path):
    write_image(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("fine")
    write_image(tmp_path / "nocaption.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "broken.txt").write_text("x")
    with pytest.raises(DatasetError) as err:
        scan_folder(tmp_path)
    message = str(err.value)
    assert "2 problem(s)" in message and "\n" not in message
    assert "broken.png: unreadable image" in message
    assert "nocaption.png: missing caption (no nocaption.txt)" in message


def test_metadata_naming_a_missing_file(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "t"}) + "\n"
                                             + json.dumps({"file_name": "a.png", "text": "t"}))
    with pytest.raises(DatasetError, match="line 1: gone.png does not exist"):
        scan_folder(tmp_path)


def test_empty_folder_and_optional_captions(tmp_path):
    with pytest.raises(DatasetError, match="has no images"):
        scan_folder(tmp_path)
    write_image(tmp_path / "subject.png")
    assert scan_folder(tmp_path, captions="optional")[0].caption is None
    with pytest.raises(DatasetError, match="missing caption"):
        scan_folder(tmp_path)


def test_mixed_sizes_and_modes_become_square_rgb(tmp_path):
    paths = [write_image(tmp_path / "wide.png", (40, 20), "RGB", (255, 0, 0)),
             write_image(tmp_path / "grey.png", (16, 16), "L", (128, 128, 128)),
             write_image(tmp_path / "palette.png", (10, 30), "P", (0, 0, 255))]
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent: composited on white
    rgba.save(tmp_path / "clear.png")
    pixels = load_pixels(paths + [tmp_path / "clear.png"], 16)
    assert pixels.shape == (4, 3, 16, 16)
    torch.testing.assert_close(pixels[0, :, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    assert pixels[1].std() < 1e-6 and abs(float(pixels[1, 0, 0, 0]) - (128 / 127.5 - 1)) < 1e-6
    torch.testing.assert_close(pixels[2, :, 8, 8], torch.tensor([-1.0, -1.0, 1.0]))
    torch.testing.assert_close(pixels[3], torch.ones(3, 16, 16))
    report = describe(scan_folder(tmp_path, "optional"), 16, "center_crop")
    assert "4 images" in report and "2 resized" in report and "3 converted to RGB" in report


def test_fit_square_modes():
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 10, 20))  # black left quarter
    crop = np.asarray(fit_square(image, 20, "center_crop"))
    assert crop.shape == (20, 20, 3) and crop.min() > 200  # the middle half is all white
    pad = np.asarray(fit_square(image, 20, "pad"))
    assert pad.shape == (20, 20, 3) and pad[5:15, :4].max() < 30 and pad[:5].min() > 200  # content kept, padded above
    stretch = np.asarray(fit_square(image, 20, "stretch"))
    assert stretch[:, :4].max() < 30 and stretch[:, 6:].min() > 200
    with pytest.raises(ValueError, match="unknown resize mode"):
        fit_square(image, 20, "zoom")
