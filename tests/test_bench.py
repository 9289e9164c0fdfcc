"""``ldm bench`` times the same computation in both pipelines: on tiny random models of each family our pipeline
and diffusers' own (chosen from model_index.json) draw the same image from the same noise, and both hold the same
weights. Timings themselves are never asserted."""
import argparse

import pytest
import torch

from pipelines import bench
from pipelines.random_models import save_random_model
from pipelines.text_to_image import TextToImagePipeline


@pytest.mark.parametrize("model,diffusers_class,sampler", [
    ("tiny", "StableDiffusionPipeline", "dpmpp_2m"),
    ("tiny-sdxl", "StableDiffusionXLPipeline", "dpmpp_2m"),
    ("tiny-sd3", "StableDiffusion3Pipeline", "flow_euler"),
])
def test_bench_compares_the_same_computation(model, diffusers_class, sampler, tmp_path):
    ours = TextToImagePipeline.from_pretrained(save_random_model(tmp_path, model))
    args = argparse.Namespace(size=None, sampler=None, compile="eager", steps=4, cfg=5.0, repeats=1,
                              random_model=model)
    result = bench.run_bench(args, ours, torch.device("cpu"), torch.float32)
    assert result["diffusers_class"] == diffusers_class and result["sampler"] == sampler
    ours_image, theirs_image = result["images"]
    assert ours_image.shape == theirs_image.shape and ours_image.std() > 0.01
    assert result["max_difference"] < 1e-3
    assert result["weights"]["ours"] == result["weights"]["diffusers"] > 0
    assert set(result["same"]) == set(result["defaults"]) == {"ours", "diffusers"}


def test_a_sampler_without_a_diffusers_match_is_refused():
    with pytest.raises(ValueError, match="flow-matching model; use one of: flow_euler, heun"):
        bench.matching_scheduler("dpmpp_2m", flow=True)
    assert bench.matching_scheduler("heun", flow=True)[0] == "FlowMatchHeunDiscreteScheduler"
    assert bench.matching_scheduler("heun", flow=False)[0] == "HeunDiscreteScheduler"


def test_an_unknown_random_model_is_a_usage_error(capsys):
    from pipelines.cli import main

    assert main(["bench", "--random-model", "sd9"]) != 0
    assert "unknown --random-model 'sd9'" in capsys.readouterr().err


@pytest.mark.parametrize("name,parameters", [("sdxl", 2_567_463_684), ("sd3", 2_028_328_000)])
def test_full_size_architectures_match_the_released_models(name, parameters):
    """The full-size configs build networks of the released models' sizes (counted on the meta device, nothing
    allocated): SDXL base 1.0's UNet and SD3 medium's MMDiT."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from pipelines.random_models import SD3_SIZES, SDXL_SIZES

    with torch.device("meta"):
        if name == "sdxl":
            network = UNet2DConditionModel(**SDXL_SIZES["full"]["unet"], cross_attention_dim=2048,
                                           projection_class_embeddings_input_dim=2816)
        else:
            network = SD3Transformer2DModel(**SD3_SIZES["full"]["transformer"])
    assert sum(p.numel() for p in network.parameters()) == parameters
