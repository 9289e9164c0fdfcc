"""Per-request network options: seamless tiling (with circular padding, sampling and decoding commute with circular
shifts: a known answer) and FreeU (its parity with diffusers is in test_parity_diffusers.py)."""
import pytest
import torch

from pipelines.metadata import parse_parameters
from pipelines.text_to_image import TextToImagePipeline


@pytest.fixture(scope="module")
def pipe(tiny_model_factory):
    return TextToImagePipeline.from_pretrained(tiny_model_factory())


def generate(pipe, noise, seamless, output_type="latent"):
    return pipe("a red circle", latents=noise, seamless=seamless, num_inference_steps=4, sampler="euler",
                output_type=output_type, progress=False, seed=0)


def shifted(tensor, rows, columns):
    return torch.roll(tensor, shifts=(rows, columns), dims=(-2, -1))


def commutes(pipe, noise, seamless, rows, columns) -> bool:
    """Whether generating from circularly shifted noise gives the shifted image (latents and decoded pixels)."""
    scale = pipe.vae_scale_factor
    for output_type, factor in (("latent", 1), ("pt", scale)):
        plain = generate(pipe, noise, seamless, output_type).images
        moved = generate(pipe, shifted(noise, rows, columns), seamless, output_type).images
        if not torch.allclose(moved, shifted(plain, rows * factor, columns * factor), atol=1e-4, rtol=1e-4):
            return False
    return True


def test_seamless_sampling_and_decoding_commute_with_circular_shifts_along_its_axes(pipe):
    down = 2 ** (len(pipe.unet.config.block_out_channels) - 1)  # the UNet commutes with shifts by its stride
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert commutes(pipe, noise, "xy", down, 3 * down)
    assert commutes(pipe, noise, "x", 0, down) and not commutes(pipe, noise, "x", down, 0)
    assert commutes(pipe, noise, "y", down, 0) and not commutes(pipe, noise, "y", 0, down)
    assert not commutes(pipe, noise, "none", 0, down)  # zero padding: the edges are edges


def test_seamless_is_per_request_and_recorded(pipe):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    before = generate(pipe, noise, "none").images
    tiled = generate(pipe, noise, "xy")
    assert tiled.parameters[0]["seamless"] == "xy" and (tiled.images - before).abs().max() > 1e-3
    after = generate(pipe, noise, "none")
    assert torch.equal(after.images, before) and "seamless" not in after.parameters[0]
    with pytest.raises(ValueError, match="unknown seamless axes 'z'"):
        generate(pipe, noise, "z")


def test_the_web_ui_tiling_field_reads_as_both_axes():
    params = parse_parameters("a tile\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Tiling: True")
    assert params["seamless"] == "xy" and "tiling" not in params


def test_cli_seamless_is_written_and_regenerated_from_the_png(tiny_model_factory, tmp_path):
    from PIL import Image

    from pipelines.cli import main

    first, again, plain = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    model = str(tiny_model_factory())
    assert main(["generate", "a red circle", "-o", str(first), "--model", model, "--seed", "3", "--steps", "3",
                 "--seamless", "x"]) == 0
    assert parse_parameters(Image.open(first).info["parameters"])["seamless"] == "x"
    assert main(["generate", "--from", str(first), "-o", str(again)]) == 0
    assert Image.open(first).tobytes() == Image.open(again).tobytes()
    assert main(["generate", "a red circle", "-o", str(plain), "--model", model, "--seed", "3", "--steps", "3"]) == 0
    assert Image.open(first).tobytes() != Image.open(plain).tobytes()


@pytest.mark.parametrize("freeu, message", [((0.9, 0.2, 1.5), "four numbers"), ("a b c d", "four numbers"),
                                            ((0.9, 0.2, float("nan"), 1.6), "freeu b1"),
                                            ((True, 0.2, 1.5, 1.6), "freeu s1"), (1.5, "four numbers")])
def test_bad_freeu_fails_with_one_line(pipe, freeu, message):
    with pytest.raises(ValueError, match=message):
        pipe("a red circle", freeu=freeu, num_inference_steps=1, progress=False)


def test_cli_freeu_is_written_and_regenerated_from_the_png(tiny_model_factory, tmp_path):
    from PIL import Image

    from pipelines.cli import main

    first, again, plain = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    model = str(tiny_model_factory())
    assert main(["generate", "a red circle", "-o", str(first), "--model", model, "--seed", "3", "--steps", "3",
                 "--freeu", "0.9", "0.2", "1.5", "1.6"]) == 0
    assert parse_parameters(Image.open(first).info["parameters"])["freeu"] == "0.9 0.2 1.5 1.6"
    assert main(["generate", "--from", str(first), "-o", str(again)]) == 0
    assert Image.open(first).tobytes() == Image.open(again).tobytes()
    assert main(["generate", "a red circle", "-o", str(plain), "--model", model, "--seed", "3", "--steps", "3"]) == 0
    assert Image.open(first).tobytes() != Image.open(plain).tobytes()
