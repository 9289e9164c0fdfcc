"""Checkpoint merging (``ldm merge``, the A1111 checkpoint merger): weighted sum and add difference are exact on
every network, the result loads in diffusers, and models of different architectures are refused."""
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from pipelines.cli import main
from pipelines.merge import MergeError, merge_models
from pipelines.random_models import save_random_model, save_random_sdxl
from pipelines.text_to_image import TextToImagePipeline

FILES = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
         "text_encoder": "text_encoder/model.safetensors"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    return {name: save_random_model(tmp / name, "tiny", seed=seed) for name, seed in (("a", 0), ("b", 1), ("c", 2))}


def tensors(folder, network):
    return load_file(str(folder / FILES[network]))


def test_weighted_sum_and_add_difference_are_exact_on_every_network(models, tmp_path):
    a, b, c = models["a"], models["b"], models["c"]
    summed = merge_models(a, b, tmp_path / "sum", alpha=0.25)
    added = merge_models(a, b, tmp_path / "added", alpha=0.5, method="add_difference", c=c)
    for network in FILES:
        ta, tb, tc = tensors(a, network), tensors(b, network), tensors(c, network)
        ts, td = tensors(summed, network), tensors(added, network)
        changed = [k for k in ta if ta[k].is_floating_point() and not torch.equal(ta[k], tb[k])]
        assert changed  # the two random models differ, so the checks below can fail
        for key in changed:
            assert torch.equal(ts[key], ta[key] * 0.75 + tb[key] * 0.25)
            assert torch.equal(td[key], ta[key] + (tb[key] - tc[key]) * 0.5)
    StableDiffusionPipeline.from_pretrained(summed, local_files_only=True)  # a diffusers folder


def test_merging_a_model_with_itself_draws_what_it_drew(models, tmp_path):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = dict(latents=noise, num_inference_steps=3, output_type="latent", progress=False)
    alone = TextToImagePipeline.from_pretrained(models["a"])("a red circle", **settings).images
    merged = merge_models(models["a"], models["a"], tmp_path / "self.safetensors", alpha=0.5)  # a single file
    again = TextToImagePipeline.from_pretrained(merged, config=models["a"])("a red circle", **settings).images
    torch.testing.assert_close(again, alone, atol=0, rtol=0)  # x / 2 + x / 2 = x exactly
    # add difference with B = C adds nothing
    same = merge_models(models["a"], models["b"], tmp_path / "none", alpha=1.0, method="add_difference",
                        c=models["b"])
    assert all(torch.equal(x, y) for x, y in zip(tensors(same, "unet").values(), tensors(models["a"], "unet").values()))


def test_bad_merges_are_refused_and_write_nothing(models, tmp_path, capsys):
    sdxl = save_random_sdxl(tmp_path / "sdxl")
    with pytest.raises(MergeError, match="of the models has a text_encoder_2|does not match"):
        merge_models(models["a"], sdxl, tmp_path / "out")
    with pytest.raises(MergeError, match="add_difference needs a third model"):
        merge_models(models["a"], models["b"], tmp_path / "out", method="add_difference")
    with pytest.raises(ValueError, match="alpha must be a finite number in \\[0.0, 1.0\\]"):
        merge_models(models["a"], models["b"], tmp_path / "out", alpha=float("nan"))
    assert main(["merge", str(models["a"]), str(models["b"]), "-o", str(tmp_path / "out"), "--alpha", "1.5"]) == 2
    assert "alpha must be" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sdxl"]
    assert main(["merge", str(models["a"]), str(models["b"]), "-o", str(tmp_path / "ok"), "--alpha", "0"]) == 0
    assert all(torch.equal(x, y) for x, y in zip(tensors(tmp_path / "ok", "vae").values(),
                                                 tensors(models["a"], "vae").values()))
