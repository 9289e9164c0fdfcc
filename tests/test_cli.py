"""The ldm command line: images carry their parameters, --from regenerates them, bad input writes nothing."""
import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.metadata import format_parameters, parse_parameters


def test_parameters_text_round_trips():
    params = dict(prompt="a red circle,\nat the top left", negative_prompt="blurry, dark", steps=20,
                  sampler="euler_a", cfg_scale=5.5, seed=42, width=128, height=96, model="weights/x",
                  timestep_spacing="karras", eta=0.0, guidance_rescale=0.7, clip_skip=1)
    text = format_parameters(params)
    assert "Clip skip: 2" in text  # A1111 counts the last layer as 1
    assert parse_parameters(text) == params


def test_parses_a1111_text():
    text = ("masterpiece, a cat\nNegative prompt: lowres\nSteps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7, "
            "Seed: 1234, Size: 512x768, Model hash: abc, Model: sd15")
    params = parse_parameters(text)
    assert params["prompt"] == "masterpiece, a cat" and params["negative_prompt"] == "lowres"
    assert (params["steps"], params["seed"], params["width"], params["height"]) == (25, 1234, 512, 768)
    assert (params["sampler"], params["timestep_spacing"]) == ("dpmpp_2m", "karras")


@pytest.mark.parametrize("settings, sampler, spacing", [
    ("Sampler: DPM++ 2M, Schedule type: Karras", "dpmpp_2m", "karras"),  # A1111 1.9+
    ("Sampler: Euler a", "euler_a", None),
    ("Sampler: UniPC, Schedule type: KL Optimal", "unipc_bh1", "kl_optimal"),
    ("Sampler: Euler, Schedule type: Align Your Steps", "euler", "align_your_steps"),
    ("Sampler: Euler, Schedule type: SGM Uniform", "euler", "trailing"),
    ("Sampler: DDIM, Schedule type: DDIM", "ddim", "leading"),
    ("Sampler: Euler, Schedule type: Uniform", "euler", "linspace"),
    ("Sampler: Euler, Schedule type: Polyexponential", "euler", "exponential"),
    ("Sampler: Euler, Schedule type: Polyexponential, Schedule rho: 2", "euler", "Polyexponential (rho 2)"),
    ("Sampler: Euler, Schedule type: Align Your Steps GITS", "euler", "Align Your Steps GITS"),  # kept for the error
    ("Sampler: DPM++ 3M SDE Exponential", "dpmpp_3m_sde", "exponential"),
    ("Sampler: DPM2 a", "dpm_2_a", None),
    ("Sampler: dpmpp_2m, Schedule: trailing", "dpmpp_2m", "trailing"),  # ours
    ("Sampler: DPM++ SDE Karras", "dpmpp_sde", "karras"),
    ("Sampler: DPM++ 2M SDE Heun Karras", "dpmpp_2m_sde_heun", "karras"),
    ("Sampler: DPM adaptive", "DPM adaptive", None),  # one we lack: kept for the error
])
def test_a1111_sampler_and_schedule_names_become_ours(settings, sampler, spacing):
    params = parse_parameters(f"a cat\nSteps: 20, {settings}, CFG scale: 7, Seed: 1, Size: 64x64")
    assert params["sampler"] == sampler and params.get("timestep_spacing") == spacing
    assert "schedule_type" not in params


def test_generate_writes_parameters_and_from_regenerates_the_same_image(tiny_model_factory, tmp_path, capsys):
    folder = tiny_model_factory()
    first = tmp_path / "a.png"
    assert main(["generate", "a blue square", "-o", str(first), "--model", str(folder), "--seed", "7",
                 "--steps", "4", "--sampler", "euler_a", "--cfg", "5", "--negative", "red", "--clip-skip", "1"]) == 0
    params = parse_parameters(Image.open(first).info["parameters"])
    assert params["prompt"] == "a blue square" and params["seed"] == 7 and params["sampler"] == "euler_a"
    assert params["clip_skip"] == 1 and "Clip skip: 2" in Image.open(first).info["parameters"]
    assert params["negative_prompt"] == "red" and params["cfg_scale"] == 5.0
    again = tmp_path / "b.png"
    assert main(["generate", "--from", str(first), "-o", str(again)]) == 0
    assert Image.open(first).tobytes() == Image.open(again).tobytes()
    other = tmp_path / "c.png"
    assert main(["generate", "--from", str(first), "-o", str(other), "--seed", "8"]) == 0
    assert Image.open(first).tobytes() != Image.open(other).tobytes()


def test_from_regenerates_an_a1111_image_with_our_names(tiny_model_factory, tmp_path):
    """An image the A1111 web UI wrote ("Sampler: DPM++ 2M Karras") regenerates with dpmpp_2m on Karras sigmas,
    its prompt read in the web UI's syntax."""
    from PIL import PngImagePlugin

    folder, source = tiny_model_factory(), tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a (red:1.3) [circle:square:1]\nNegative prompt: blue\nSteps: 3, "
                                "Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 3, Size: 16x16, Model hash: 0123abcd, "
                                f"Model: {folder}")
    Image.new("RGB", (16, 16)).save(source, pnginfo=info)
    assert main(["generate", "--from", str(source), "-o", str(tmp_path / "again.png")]) == 0
    params = parse_parameters(Image.open(tmp_path / "again.png").info["parameters"])
    assert (params["sampler"], params["timestep_spacing"], params["negative_prompt"]) == ("dpmpp_2m", "karras", "blue")
    assert params["emphasis"] == "a1111"
    direct = ["generate", "a (red:1.3) [circle:square:1]", "--negative", "blue", "--steps", "3", "--sampler",
              "dpmpp_2m", "--spacing", "karras", "--cfg", "5", "--seed", "3", "--size", "16", "--model", str(folder)]
    assert main(direct + ["--emphasis", "a1111", "-o", str(tmp_path / "direct.png")]) == 0
    assert Image.open(tmp_path / "again.png").tobytes() == Image.open(tmp_path / "direct.png").tobytes()
    assert main(direct + ["-o", str(tmp_path / "literal.png")]) == 0  # brackets as text: another image
    assert Image.open(tmp_path / "again.png").tobytes() != Image.open(tmp_path / "literal.png").tobytes()


def test_a1111_hires_fix_and_variation_seed_fields_become_ours():
    params = parse_parameters("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Variation seed: 77, "
                              "Variation seed strength: 0.25, Size: 512x512, Denoising strength: 0.5, "
                              "Hires upscale: 1.5, Hires steps: 10, Hires upscaler: Latent (bicubic)")
    assert (params["variation_seed"], params["variation_strength"]) == (77, 0.25)
    assert (params["hires_scale"], params["hires_steps"], params["hires_upscaler"], params["strength"]) == (
        1.5, 10, "latent_bicubic", 0.5)
    assert parse_parameters("a\nSteps: 2, Seed: 1, Hires upscaler: 4x-UltraSharp")["hires_upscaler"] == "4x-UltraSharp"
    forge = parse_parameters("a (b:1.2)\nSteps: 2, Seed: 1, Size: 512x768, Emphasis: Original, Hires resize: 1024x1536")
    assert (forge["emphasis"], forge["hires_scale"]) == ("a1111", 2.0) and "hires_resize" not in forge


def test_hires_fix_and_variation_seed_regenerate_from_the_png(tiny_model_factory, tmp_path):
    folder, first = tiny_model_factory(), tmp_path / "a.png"
    assert main(["generate", "a blue square", "-o", str(first), "--model", str(folder), "--seed", "7", "--steps",
                 "3", "--variation-seed", "40", "--variation-strength", "0.4", "--hires-scale", "2",
                 "--hires-strength", "0.6", "--hires-upscaler", "latent_bicubic"]) == 0
    text = Image.open(first).info["parameters"]
    assert "Size: 16x16" in text and "Hires upscale: 2.0" in text and "Denoising strength: 0.6" in text
    assert "Variation seed: 40" in text and Image.open(first).size == (32, 32)
    again = tmp_path / "b.png"
    assert main(["generate", "--from", str(first), "-o", str(again)]) == 0
    assert Image.open(first).tobytes() == Image.open(again).tobytes()
    plain = tmp_path / "c.png"
    assert main(["generate", "--from", str(first), "-o", str(plain), "--variation-strength", "0"]) == 0
    assert Image.open(first).tobytes() != Image.open(plain).tobytes()


def test_hires_options_without_a_hires_scale_are_a_usage_error(tiny_model_factory, tmp_path, capsys):
    assert main(["generate", "x", "-o", str(tmp_path / "o.png"), "--model", str(tiny_model_factory()),
                 "--hires-strength", "0.5"]) == 2
    assert "give --hires-scale" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_several_images_get_numbered_files_and_consecutive_seeds(tiny_model_factory, tmp_path):
    folder = tiny_model_factory()
    assert main(["generate", "x", "-o", str(tmp_path / "o.png"), "--model", str(folder), "--seed", "3",
                 "--steps", "2", "--n", "2"]) == 0
    seeds = [parse_parameters(Image.open(tmp_path / f"o-{k}.png").info["parameters"])["seed"] for k in (0, 1)]
    assert seeds == [3, 4]


@pytest.mark.parametrize("args, message", [
    (["--sampler", "dpm_fast"], "unknown sampler 'dpm_fast'"),
    (["--steps", "0"], "num_inference_steps must be"),
    (["--cfg", "nan"], "guidance_scale must be a finite number"),
    (["--size", "15"], "height must be a multiple of 2"),
    (["--size", "big"], "--size must be N or WxH"),
    (["--dtype", "int8"], "unknown --dtype"),
    (["--clip-skip", "-1"], "clip_skip must be an integer >= 0"),
    (["--clip-skip", "3"], "clip_skip must be between 0 and 2"),
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


def write_picture(path, size=16):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)).resize((size, size)).save(path)
    return path


def test_img2img_inpaint_invert_and_edit_commands(tiny_model_factory, tmp_path):
    model = ["--model", str(tiny_model_factory())]
    picture = write_picture(tmp_path / "in.png")
    mask = tmp_path / "mask.png"
    Image.fromarray(np.where(np.arange(16)[None, :] < 8, 255, 0).repeat(16, 0).astype(np.uint8)).save(mask)

    assert main(["img2img", str(picture), "a red circle", "-o", str(tmp_path / "sdedit.png"), "--strength", "0.5",
                 "--steps", "4", "--seed", "1"] + model) == 0
    assert parse_parameters(Image.open(tmp_path / "sdedit.png").info["parameters"])["strength"] == 0.5

    assert main(["inpaint", str(picture), str(mask), "a red circle", "-o", str(tmp_path / "inpaint.png"),
                 "--steps", "3", "--seed", "1", "--jump-n-sample", "2", "--jump-length", "1"] + model) == 0
    kept = np.asarray(Image.open(tmp_path / "inpaint.png"))[:, 8:]
    np.testing.assert_array_equal(kept, np.asarray(Image.open(picture))[:, 8:])
    assert parse_parameters(Image.open(tmp_path / "inpaint.png").info["parameters"])["jump_n_sample"] == 2
    assert main(["inpaint", str(picture), str(mask), "a red circle", "-o", str(tmp_path / "differential.png"),
                 "--steps", "3", "--seed", "1", "--mask-mode", "differential"] + model) == 0
    assert parse_parameters(Image.open(tmp_path / "differential.png").info["parameters"])["mask_mode"] == "differential"

    assert main(["invert", str(picture), "a red circle", "-o", str(tmp_path / "inv.safetensors"), "--steps", "4",
                 "--reconstruction", str(tmp_path / "recon.png")] + model) == 0
    assert (tmp_path / "recon.png").exists()
    assert main(["edit", "--source", "a red circle", "--target", "a blue circle", "--inversion",
                 str(tmp_path / "inv.safetensors"), "-o", str(tmp_path / "real-edit.png")] + model) == 0
    assert {"real-edit.png", "real-edit-source.png"} <= {p.name for p in tmp_path.iterdir()}

    assert main(["edit", "--source", "a red circle", "--target", "a blue circle", "-o", str(tmp_path / "e.png"),
                 "--steps", "3", "--seed", "2", "--reweight", "blue=2", "--edit", "reweight"] + model) == 0
    source = parse_parameters(Image.open(tmp_path / "e-source.png").info["parameters"])
    edited = parse_parameters(Image.open(tmp_path / "e.png").info["parameters"])
    assert (source["prompt"], edited["prompt"], edited["seed"]) == ("a red circle", "a blue circle", source["seed"])

    for extra, name in (([], "fe.png"), (["--image", str(picture)], "fe-real.png")):  # a generation, a picture
        assert main(["edit", "--method", "flowedit", "--source", "a red circle", "--target", "a blue circle",
                     "-o", str(tmp_path / name), "--steps", "3", "--seed", "2", "--strength", "0.7"]
                    + extra + model) == 0
        edited = parse_parameters(Image.open(tmp_path / name).info["parameters"])
        assert (edited["edit_method"], edited["source_prompt"], edited["strength"]) == ("flowedit", "a red circle", 0.7)
    assert parse_parameters(Image.open(tmp_path / "fe-source.png").info["parameters"])["seed"] == 2
    assert not (tmp_path / "fe-real-source.png").exists()


@pytest.mark.parametrize("args, message", [
    (["edit", "--source", "a red circle", "--target", "a big red circle"], "use edit='refine'"),
    (["edit", "--source", "a", "--target", "b", "--reweight", "b:2"], "--reweight takes WORD=WEIGHT"),
    (["img2img", "missing.png", "x", "--strength", "0.5"], "cannot read image"),
    (["invert", "missing.png", "x", "-o", "inv.png"], "written as .safetensors"),
    (["edit", "--source", "a", "--target", "b", "--image", "x.png", "--inversion", "i.safetensors"],
     "either --image (inverted first) or --inversion"),
    (["edit", "--source", "a", "--target", "b", "--null-text"], "--null-text is for --image"),
    (["edit", "--source", "a", "--target", "b", "--method", "flowedit", "--strength", "2"], "strength"),
])
def test_editing_commands_refuse_bad_input_without_writing(tiny_model_factory, tmp_path, capsys, monkeypatch,
                                                           args, message):
    monkeypatch.chdir(tmp_path)
    assert main(args + ["--model", str(tiny_model_factory())]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_parameter_text_with_commas_and_quotes_round_trips():
    """Values holding a comma or a quote are written in JSON quotes (as the A1111 web UI writes them) and read
    back whole; the fields after them are still read."""
    from pipelines.metadata import format_parameters, parse_parameters

    params = dict(prompt="a red circle, large", negative_prompt="", steps=3, sampler="euler", cfg_scale=7.5, seed=1,
                  width=16, height=16, model='models/sd, "v2"', source_prompt='a "blue", circle', strength=0.7,
                  edit_method="flowedit", source_cfg_scale=3.5)
    back = parse_parameters(format_parameters(params))
    assert {k: back[k] for k in params if k != "negative_prompt"} == {k: v for k, v in params.items()
                                                                      if k != "negative_prompt"}
