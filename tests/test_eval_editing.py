"""The editing measures give known answers on rendered images: a perfect edit succeeds, a moved object or a
changed background fails; PSNR / SSIM on known differences; word swaps keep the token count."""
import numpy as np
import pytest

from ldm.text import load_tokenizer
from train.eval_editing import edit_outcome, inpaint_mask, psnr, split_by_heldout, ssim, swapped
from train.shapes import Scene, make_object, render, render_masks


def scene(color="red", shape="circle", position="top left", background="white"):
    return render(Scene(background, (make_object(color, shape, position, "large", 128),), image_size=128))


def test_edit_outcome_known_answers():
    source = scene()
    perfect = edit_outcome(source, scene("blue"), "color", "blue")
    assert perfect["success"] and perfect["shift"] < 0.5 and perfect["background"] < 1e-9
    assert edit_outcome(source, scene(shape="square"), "shape", "square")["success"]
    moved = edit_outcome(source, scene("blue", position="center"), "color", "blue")
    assert moved["attribute"] and moved["shift"] > 30 and not moved["success"]
    recoloured_background = edit_outcome(source, scene("blue", background="gray"), "color", "blue")
    assert recoloured_background["background"] > 0.3 and not recoloured_background["success"]
    assert not edit_outcome(source, scene("green"), "color", "blue")["success"]


def test_psnr_and_ssim_known_answers():
    rng = np.random.default_rng(0)
    image = rng.random((32, 32, 3))
    assert psnr(image, image + 0.1) == pytest.approx(20.0)
    assert ssim(image, image) == pytest.approx(1.0)
    assert ssim(image, rng.random((32, 32, 3))) < 0.1


def test_swaps_keep_the_token_count():
    tokenizer = load_tokenizer()
    caption = "a purple triangle at the top right on a gray background"
    for attribute, expected in (("color", "a orange triangle"), ("shape", "a purple circle")):
        target, old, new = swapped(caption, attribute)
        assert target.startswith(expected) and old != new
        assert len(tokenizer(caption)["input_ids"]) == len(tokenizer(target)["input_ids"])


def test_dreambooth_subject_is_read_back_and_survives_the_shipped_vae():
    """The subject check finds the purple ring in its renders and not in look-alikes; the shipped VAE keeps it
    (a denoiser on these latents can draw it), which is why the subject is not a two-tone heart."""
    from pipelines.text_to_image import TextToImagePipeline
    from train.eval_finetune import is_subject, subject_images, subject_survives_vae
    from train.evaluate import BASE_SHAPES, detect_objects
    from train.shapes import EXTRA_SHAPES

    subjects = subject_images()
    assert all(is_subject(detect_objects(image, BASE_SHAPES + EXTRA_SHAPES)) for image in subjects)
    for look_alike in (scene("purple", "circle"), scene("green", "ring"), scene("purple", "heart")):
        assert not is_subject(detect_objects(look_alike, BASE_SHAPES + EXTRA_SHAPES))
    assert subject_survives_vae(TextToImagePipeline.from_pretrained(), subjects) == 1.0


class ForgetfulPipe:
    """Stands in for a pipeline whose img2img returns the render below strength 0.5 and a blank image above."""

    vae_scale_factor = 8

    class unet:
        class config:
            sample_size = 16

    def img2img(self, image, prompt, strength, **settings):
        out = image if strength < 0.5 else render(Scene("white", (), image_size=128))
        return type("Output", (), {"images": [out]})


def test_resample_table_reads_where_the_model_forgets():
    from train.eval_editing import resample_table

    table = resample_table(ForgetfulPipe(), strengths=(0.2, 0.8), count=4, guidances=(1.0,))
    assert table["CFG 1.0, strength 0.2"] == {"shape": 1.0, "all": 1.0}
    assert table["CFG 1.0, strength 0.8"] == {"shape": 0.0, "all": 0.0}


def test_inpaint_masks_cover_the_object_and_room_for_another_shape():
    """Both masks cover the object; only the box leaves room for a circle drawn in a triangle's place."""
    triangle = Scene("white", (make_object("red", "triangle", "center", "large", 128),), image_size=128)
    circle = Scene("white", (make_object("red", "circle", "center", "large", 128),), image_size=128)
    silhouette, circle_pixels = render_masks(triangle)[0], render_masks(circle)[0]
    for kind in ("object", "box"):
        mask = inpaint_mask(silhouette, kind)
        assert mask[silhouette].all() and mask.mean() < 0.25
    assert inpaint_mask(silhouette, "object")[circle_pixels].mean() < 0.8
    assert inpaint_mask(silhouette, "box")[circle_pixels].mean() > 0.95


def test_editing_tables_run_at_the_requested_guidance(monkeypatch):
    """`ldm eval --task editing --cfg 3` measures every table at CFG 3; the resample table keeps its own sweep."""
    import train.eval_editing as eval_editing

    seen = {}
    monkeypatch.setattr(eval_editing, "TABLES", {
        "inpaint": lambda pipe, guidance=7.5: seen.setdefault("inpaint", guidance),
        "resample": lambda pipe, guidances=(1.0, 7.5): seen.setdefault("resample", guidances)})
    assert eval_editing.evaluate_editing(None, ["inpaint", "resample"], guidance=3.0) == {
        "inpaint": 3.0, "resample": (1.0, 7.5)}


def test_inpainting_results_split_by_held_out_targets():
    from train.shapes import is_heldout, parse_prompt

    targets = ["a orange circle at the top on a white background", "a red circle at the top on a white background",
               "a blue square at the bottom left on a gray background",
               "a green triangle at the left on a black background"]
    heldout = [is_heldout(parse_prompt(t)) for t in targets]
    assert heldout == [True, False, True, False]
    assert split_by_heldout([False, True, True, False], heldout) == {
        "all, seen": 0.5, "all, held-out": 0.5, "held-out count": 2}
    assert np.isnan(split_by_heldout([True, True], [False, False])["all, held-out"])  # no held-out target


def test_swap_table_scores_perfect_and_null_edits():
    """``swap_table`` (shared by the prompt-to-prompt and FlowEdit tables): edits that render exactly the target
    scene succeed every time; 'edits' that return the source change no attribute."""
    from types import SimpleNamespace

    from train.eval_editing import swap_table
    from train.shapes import parse_prompt

    def rendered(caption):
        expected = parse_prompt(caption)
        thing = expected.objects[0]
        return scene(thing.color, thing.shape, thing.position, expected.background)

    pipe = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=16)), vae_scale_factor=8)
    perfect = swap_table(pipe, 4, lambda k, caption, target: (rendered(caption), rendered(target)), "test")
    null = swap_table(pipe, 4, lambda k, caption, target: (rendered(caption), rendered(caption)), "test")
    for attribute in ("color", "shape"):
        assert perfect[f"{attribute} swap, generated"]["success"] == 1.0
        assert perfect[f"{attribute} swap, generated, correct sources"]["count"] == 4
        assert null[f"{attribute} swap, generated"]["attribute"] == 0.0
