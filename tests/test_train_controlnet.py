"""ControlNet training at smoke scale: zero convolutions make the untrained ControlNet exactly the base model,
training changes that, resume is exact; the control extractors and the IoU measure give known answers."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipelines.controls import canny_edges, make_control
from pipelines.text_to_image import TextToImagePipeline
from train.shapes import Scene, make_object, render, render_masks
from train.train_controlnet import build_controlnet, embedding_channels, evaluate_iou, run


def test_canny_finds_the_outline_only():
    grey = np.zeros((32, 32))
    grey[8:24, 8:24] = 1.0
    edges = canny_edges(grey)
    ring = np.zeros_like(edges)
    ring[6:26, 6:26] = True
    ring[10:22, 10:22] = False  # within 2 px of the square's border
    assert edges.sum() >= 4 * 14 and not (edges & ~ring).any()
    for side in (edges[6:26, 6:10], edges[6:26, 22:26], edges[6:10, 6:26], edges[22:26, 6:26]):
        assert side.any(axis=0).sum() + side.any(axis=1).sum() >= 14  # every side of the square is traced
    assert not canny_edges(np.full((16, 16), 0.3)).any()


def test_mask_control_is_the_scene_mask():
    scene = Scene("gray", (make_object("blue", "triangle", "top left", "large", 64),), image_size=64)
    control = np.asarray(make_control("mask", render(scene), scene))
    assert np.array_equal(control[..., 0] == 255, render_masks(scene)[0])
    with pytest.raises(ValueError, match="unknown control type 'depth'"):
        make_control("depth", render(scene))


def test_embedding_channels_match_the_vae_factor():
    assert embedding_channels(8) == (16, 32, 96, 256) and embedding_channels(2) == (16, 32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_factory):
    model = tiny_model_factory()
    tmp = tmp_path_factory.mktemp("controlnet-train")
    args = ["--model", str(model), "--control", "mask", "--num-images", "6", "--steps", "3", "--batch-size", "2",
            "--lr", "1e-2", "--warmup", "0", "--sample-every", "0", "--validation-count", "2",
            "--validation-steps", "1", "--mixed-precision", "no"]
    whole = run(args + ["--output-dir", str(tmp / "whole")])
    run(args + ["--output-dir", str(tmp / "parts"), "--stop-after", "1"])
    parts = run(args + ["--output-dir", str(tmp / "parts"), "--resume", "latest"])
    return model, whole["final_dir"], parts["final_dir"]


def test_untrained_controlnet_is_the_base_model(tiny_model_factory):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    settings = dict(num_inference_steps=3, seed=0, output_type="latent", progress=False)
    plain = pipe("a red circle", **settings).images
    pipe.controlnet, pipe.controlnet_name = build_controlnet(pipe.unet, pipe.vae_scale_factor, 0).eval(), "zero"
    control = np.full((16, 16, 3), 255, dtype=np.uint8)
    assert torch.equal(pipe("a red circle", control_image=control, **settings).images, plain)


def test_trained_controlnet_changes_images_and_resumes_exactly(trained):
    model, whole, parts = trained
    a = load_file(str(whole / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(parts / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    pipe = TextToImagePipeline.from_pretrained(model)
    settings = dict(num_inference_steps=3, seed=0, output_type="latent", progress=False)
    plain = pipe("a red circle", **settings).images
    pipe.load_controlnet(whole)
    control = np.zeros((16, 16, 3), dtype=np.uint8)
    control[2:8, 2:8] = 255
    assert (pipe("a red circle", control_image=control, **settings).images - plain).abs().max() > 1e-3


class MaskPainter:
    """A stand-in pipeline that paints the control mask red on white: the IoU measure must then be ~1."""

    vae_scale_factor = 8

    class unet:
        class config:
            sample_size = 8

    def __call__(self, prompt, control_image, **settings):
        mask = control_image[..., :1] > 127
        image = np.where(mask, np.array([220, 30, 30], np.uint8), np.array([255, 255, 255], np.uint8))
        return type("Output", (), {"images": [Image.fromarray(image.astype(np.uint8))]})


def test_iou_measure_on_perfect_masks():
    result = evaluate_iou(MaskPainter(), "mask", count=4)
    assert result["mean_iou"] > 0.9 and result["iou>=0.8"] == 1.0


class ScaledMaskPainter(MaskPainter):
    """Paints the control mask only when the conditioning scale is at least 1 (else nothing): what `ldm eval --task
    controlnet` reports per scale must follow."""

    def load_controlnet(self, path):
        self.loaded = path

    def __call__(self, prompt, control_image, controlnet_conditioning_scale=1.0, **settings):
        if controlnet_conditioning_scale >= 1.0:
            return super().__call__(prompt, control_image)
        blank = Image.fromarray(np.full((64, 64, 3), 255, np.uint8))
        return type("Output", (), {"images": [blank]})


def test_eval_task_controlnet_reports_iou_per_scale(tmp_path):
    import argparse
    import json

    from train.eval_model import controlnet_main

    pipe = ScaledMaskPainter()
    args = argparse.Namespace(controlnet="cn-folder", control="mask", scenes=3, steps=4, cfg=7.5,
                              control_scales=[0.0, 0.5, 1.0, 1.5, 2.0], json=str(tmp_path / "iou.json"))
    assert controlnet_main(pipe, args) == 0 and pipe.loaded == "cn-folder"
    results = json.loads((tmp_path / "iou.json").read_text())
    assert [results[s]["mean_iou"] > 0.9 for s in ("0.0", "0.5", "1.0", "1.5", "2.0")] == [False, False, True,
                                                                                          True, True]
    with pytest.raises(ValueError, match="needs --controlnet"):
        controlnet_main(pipe, argparse.Namespace(controlnet=None))
