"""The `ldm eval` harness: prompts -> per-seed generation -> evaluator scores."""
import numpy as np
import torch

from pipelines.text_to_image import GenerationOutput
from train.eval_model import evaluate_model, generate_evaluation_set, markdown_table
from train.evaluate import detect_objects, evaluate_pairs
from train.shapes import Scene, make_object, parse_prompt, render

SWAP = {"red": "green", "green": "blue", "blue": "yellow", "yellow": "purple", "purple": "orange", "orange": "red"}


def scene_for(expected, recolor=False, seed=0):
    """Render what a perfect model would draw for a parsed prompt (optionally with every colour wrong)."""
    default_positions = ["left", "right"] if expected.relation in ("to the left of", "to the right of") else \
        ["top", "bottom"]
    if expected.relation in ("to the right of", "below"):
        default_positions.reverse()
    objects = []
    for k, obj in enumerate(expected.objects):
        position = obj.position or (default_positions[k] if len(expected.objects) == 2 else "center")
        color = SWAP[obj.color] if recolor else obj.color
        objects.append(make_object(color, obj.shape, position, obj.size or "small"))
    return Scene(expected.background or "white", tuple(objects), expected.relation)


class RenderingPipe:
    """Stands in for a TextToImagePipeline: renders the scene each prompt describes."""

    def __init__(self, recolor=False):
        self.recolor, self.calls = recolor, []

    def __call__(self, prompts, generator=None, progress=False, **settings):
        self.calls.append((list(prompts), len(generator), settings))
        return GenerationOutput([render(scene_for(parse_prompt(p), self.recolor)) for p in prompts], [None])


def test_a_perfect_model_scores_full_marks_and_a_colour_blind_one_fails_colour():
    perfect = evaluate_model(RenderingPipe(), seeds=2, batch=5, progress=False, sampler="euler")
    assert perfect["seen"]["single/all"] == 1.0 and perfect["heldout"]["two/all"] == 1.0
    wrong = evaluate_model(RenderingPipe(recolor=True), seeds=1, progress=False)
    assert wrong["overall"]["single/color"] == 0.0 and wrong["overall"]["single/shape"] == 1.0
    table = markdown_table([("perfect", perfect), ("wrong", wrong)], "model")
    assert "| perfect | 100.0 | 100.0 | 100.0 | 100.0 |" in table


def test_settings_and_one_generator_per_image_reach_the_pipeline():
    pipe = RenderingPipe()
    evaluate_model(pipe, seeds=3, batch=4, progress=False, sampler="heun", num_inference_steps=7)
    assert all(n == len(prompts) for prompts, n, _ in pipe.calls)
    assert pipe.calls[0][2] == {"sampler": "heun", "num_inference_steps": 7}
    assert pipe.calls[0][0][:3] == [pipe.calls[0][0][0]] * 3  # each prompt with seeds 0, 1, 2


def test_evaluator_survives_noise_images():
    rng = np.random.default_rng(0)
    for size in (16, 64, 128):
        noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        detect_objects(noise)
        smooth = (torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4), size=size, mode="bilinear")[0]
                  .permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        detect_objects(smooth)


def test_vae_round_trip_reports_psnr_and_read_back_of_the_reconstructions():
    """With a VAE that reconstructs every pixel one grey level too bright, the PSNR is 20 log10(255) and the
    evaluator reads every scene back; with one that returns grey, it reads nothing."""
    from types import SimpleNamespace

    from pipelines.text_to_image import TextToImagePipeline
    from train.eval_model import vae_round_trip

    def pipe_with(decode):
        vae = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, config=SimpleNamespace(scaling_factor=1.0),
                              encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(mean=x)))
        return SimpleNamespace(vae=vae, unet=SimpleNamespace(config=SimpleNamespace(sample_size=16)), vae_scale_factor=8,
                               decode=decode, to_pil=TextToImagePipeline.to_pil, apply_seamless=lambda axes: None)

    exact = vae_round_trip(pipe_with(lambda latents: (latents / 2 + 0.5 + 1 / 255).clamp(max=1)), count=12)
    assert exact["single/all"] == 1.0 and exact["two/all"] == 1.0
    assert 20 * np.log10(255) - 1e-3 < exact["psnr"]  # only white pixels (clamped) are closer
    grey = vae_round_trip(pipe_with(lambda latents: torch.full_like(latents, 0.5)), count=12)
    assert grey["single/all"] == 0.0 and grey["psnr"] < 20


def test_a_hires_fix_is_read_back_at_the_models_native_size():
    from types import SimpleNamespace

    from PIL import Image

    class DoubleSizePipe(RenderingPipe):
        unet, vae_scale_factor = SimpleNamespace(config=SimpleNamespace(sample_size=16)), 8

        def __call__(self, prompts, **kwargs):
            out = super().__call__(prompts, **kwargs)
            out.images = [image.resize((256, 256), Image.NEAREST) for image in out.images]
            return out

    pairs = generate_evaluation_set(DoubleSizePipe(), seeds=1, progress=False, hires_scale=2.0)
    assert {image.size for _, image in pairs} == {(128, 128)}
    result = evaluate_pairs(pairs)
    assert result["overall"]["single/all"] == 1.0 and result["overall"]["two/all"] == 1.0
