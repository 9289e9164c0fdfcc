"""The ldm command line: images carry their parameters, --from regenerates them, bad input writes nothing."""
import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.metadata import format_parameters, parse_parameters


def test_parameters_text_round_trips():
    params = dict(prompt="a red circle,\nat the top left", negative_prompt="blurry, dark", steps=20,
                  sampler="euler_a", cfg_scale=5.5, seed=42, width=128, height=96, model="weights/x",
                  timestep_spacing="karras", eta=0.0, guidance_rescale=0.7)
    assert parse_parameters(format_parameters(params)) == params


def test_parses_a1111_text():
    text = ("masterpiece, a cat\nNegative prompt: lowres\nSteps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7, "
            "Seed: 1234, Size: 512x768, Model hash: abc, Model: sd15")
    params = parse_parameters(text)
    assert params["prompt"] == "masterpiece, a cat" and params["negative_prompt"] == "lowres"
    assert (params["steps"], params["seed"], params["width"], params["height"]) == (25, 1234, 512, 768)


def test_generate_writes_parameters_and_from_regenerates_the_same_image(tiny_model_factory, tmp_path, capsys):
    folder = tiny_model_factory()
    first = tmp_path / "a.png"
    assert main(["generate", "a blue square", "-o", str(first), "--model", str(folder), "--seed", "7",
                 "--steps", "4", "--sampler", "euler_a", "--cfg", "5", "--negative", "red"]) == 0
    params = parse_parameters(Image.open(first).info["parameters"])
    assert params["prompt"] == "a blue square" and params["seed"] == 7 and params["sampler"] == "euler_a"
    assert params["negative_prompt"] == "red" and params["cfg_scale"] == 5.0
    again = tmp_path / "b.png"
    assert main(["generate", "--from", str(first), "-o", str(again)]) == 0
    assert Image.open(first).tobytes() == Image.open(again).tobytes()
    other = tmp_path / "c.png"
    assert main(["generate", "--from", str(first), "-o", str(other), "--seed", "8"]) == 0
    assert Image.open(first).tobytes() != Image.open(other).tobytes()


def test_several_images_get_numbered_files_and_consecutive_seeds(tiny_model_factory, tmp_path):
    folder = tiny_model_factory()
    assert main(["generate", "x", "-o", str(tmp_path / "o.png"), "--model", str(folder), "--seed", "3",
                 "--steps", "2", "--n", "2"]) == 0
    seeds = [parse_parameters(Image.open(tmp_path / f"o-{k}.png").info["parameters"])["seed"] for k in (0, 1)]
    assert seeds == [3, 4]


@pytest.mark.parametrize("args, message", [
    (["--sampler", "plms"], "unknown sampler 'plms'"),
    (["--steps", "0"], "num_inference_steps must be"),
    (["--cfg", "nan"], "guidance_scale must be a finite number"),
    (["--size", "15"], "height must be a multiple of 2"),
    (["--size", "big"], "--size must be N or WxH"),
    (["--dtype", "int8"], "unknown --dtype"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_model_factory, tmp_path, capsys, args, message):
    out = tmp_path / "never.png"
    assert main(["generate", "x", "-o", str(out), "--model", str(tiny_model_factory())] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldm: error:") and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_missing_model_folder_is_one_line(tmp_path, capsys):
    assert main(["generate", "x", "-o", str(tmp_path / "o.png"), "--model", str(tmp_path / "none")]) == 2
    assert "model folder not found" in capsys.readouterr().err
