"""TextToImagePipeline behaviour on a tiny random model: seeds, prompts, loading, attention hook, dtypes."""
import shutil

import numpy as np
import pytest
import torch

from ldm.loading import ModelLoadError
from pipelines.text_to_image import TextToImagePipeline


@pytest.fixture(scope="module")
def folder(tiny_model_factory):
    return tiny_model_factory()


@pytest.fixture(scope="module")
def pipe(folder):
    return TextToImagePipeline.from_pretrained(folder)


def latents_of(pipe, prompt="a red circle", **kwargs):
    kwargs = {"num_inference_steps": 6, "sampler": "euler", "output_type": "latent", "progress": False, **kwargs}
    return pipe(prompt, **kwargs)


def test_image_k_of_a_batch_equals_the_image_from_its_reported_seed(pipe):
    batch = latents_of(pipe, seed=10, num_images_per_prompt=3, sampler="euler_a")
    assert batch.seeds == [10, 11, 12]
    alone = latents_of(pipe, seed=batch.seeds[2], sampler="euler_a")
    torch.testing.assert_close(batch.images[2:3], alone.images, atol=1e-4, rtol=1e-4)  # batched BLAS rounding
    assert (batch.images[0] - batch.images[2]).abs().max() > 1e-2


def test_prompt_list_orders_images_prompt_major(pipe):
    out = latents_of(pipe, prompt=["a red circle", "a blue square"], seed=0, num_images_per_prompt=2)
    assert [p["prompt"] for p in out.parameters] == ["a red circle"] * 2 + ["a blue square"] * 2
    single = latents_of(pipe, prompt="a blue square", seed=2)
    torch.testing.assert_close(out.images[2:3], single.images, atol=1e-4, rtol=1e-4)


def test_output_types(pipe):
    pil = latents_of(pipe, seed=1, output_type="pil").images
    array = latents_of(pipe, seed=1, output_type="np").images
    assert pil[0].size == (16, 16) and array.shape == (1, 16, 16, 3)
    assert np.abs(np.asarray(pil[0]).astype(int) - np.round(array[0] * 255).astype(int)).max() == 0


def test_empty_prompt_is_unconditional_generation(pipe):
    out = latents_of(pipe, prompt="", seed=1, guidance_scale=7.5)
    assert torch.isfinite(out.images).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": 123}, "prompt must be a string"),
    ({"prompt": ["ok", None]}, "prompt must be a string"),
    ({"height": 15}, "height must be a multiple of 2"),
    ({"width": 0}, "width must be an integer >= 1"),
    ({"num_inference_steps": 0}, "num_inference_steps must be an integer >= 1"),
    ({"num_inference_steps": 100_000, "timestep_spacing": "leading"}, "exceeds the schedule's .* training steps"),
    ({"sampler": "dpm_fast"}, "unknown sampler 'dpm_fast'; known: ddpm, ddim"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ({"guidance_scale": -1.0}, "guidance_scale must be a finite number"),
    ({"eta": float("nan")}, "eta must be a finite number"),
    ({"eta": 0.5, "sampler": "euler"}, "eta is the ddim sampler's stochasticity; sampler 'euler' has none"),
    ({"guidance_rescale": 2.0}, "guidance_rescale must be"),
    ({"timestep_spacing": "uniform"}, "unknown timestep_spacing"),
    ({"output_type": "jpeg"}, "unknown output_type"),
    ({"seed": -3}, "seed must be a non-negative integer"),
    ({"latents": torch.zeros(1, 4, 4, 4)}, "latents must have shape"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt must be"),
    ({"variation_strength": 1.5}, "variation_strength must be a finite number in"),
    ({"variation_strength": 0.5, "variation_seed": -1}, "seed must be a non-negative integer"),
    ({"variation_strength": 0.5, "latents": torch.zeros(1, 4, 8, 8)}, "latents= gives the noise itself"),
    ({"hires_scale": 1.1}, r"hires_scale 1.1 makes 17x17 pixels: each side must be a multiple of 2"),
    ({"hires_scale": float("nan")}, "hires_scale must be a finite number"),
    ({"hires_scale": 2, "hires_upscaler": "R-ESRGAN 4x+"}, "unknown hires_upscaler 'R-ESRGAN 4x\\+'; known: latent"),
    ({"hires_scale": 2, "hires_strength": -0.1}, "hires_strength must be a finite number"),
    ({"hires_scale": 2, "hires_steps": 0}, "hires_steps must be an integer >= 1"),
    ({"hires_strength": 0.5}, "set up a hires fix; give hires_scale"),
])
def test_bad_settings_fail_with_one_clear_line(pipe, kwargs, message):
    prompt = kwargs.pop("prompt", "a red circle")
    with pytest.raises(ValueError, match=message) as err:
        latents_of(pipe, prompt=prompt, **kwargs)
    assert "\n" not in str(err.value)


def test_long_prompts_are_chunked_not_truncated(pipe):
    """Words past the 75-token window still change the embedding (A1111-style windows of 75 tokens)."""
    head = "a red circle on a white background " * 11  # 77 tokens
    cond_a, uncond = pipe.encode_prompt([head + "blue"], [""])
    cond_b, _ = pipe.encode_prompt([head + "green"], [""])
    assert cond_a.shape == uncond.shape == (1, 154, 32)
    torch.testing.assert_close(cond_a[:, :77], cond_b[:, :77])
    assert (cond_a[:, 77:] - cond_b[:, 77:]).abs().max() > 1e-3


def test_missing_and_incomplete_model_folders_name_the_missing_file(folder, tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        TextToImagePipeline.from_pretrained(tmp_path / "nothing")
    broken = shutil.copytree(folder, tmp_path / "broken")
    (broken / "unet" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"missing file: .*unet/config.json"):
        TextToImagePipeline.from_pretrained(broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match="missing folder: .*vae"):
        TextToImagePipeline.from_pretrained(broken)


def test_pickle_weights_are_refused_unless_allowed(pipe, folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "pickled")
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(pipe.unet.state_dict(), copy / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle checkpoint"):
        TextToImagePipeline.from_pretrained(copy)
    loaded = TextToImagePipeline.from_pretrained(copy, allow_pickle=True)
    torch.testing.assert_close(latents_of(loaded, seed=4).images, latents_of(pipe, seed=4).images)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really")
    with pytest.raises(ModelLoadError, match="pickle checkpoint"):
        TextToImagePipeline.from_pretrained(ckpt)


def test_folder_without_tokenizer_uses_the_shipped_clip_vocabulary(pipe, folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "no-tokenizer")
    shutil.rmtree(copy / "tokenizer")
    torch.testing.assert_close(latents_of(TextToImagePipeline.from_pretrained(copy), seed=5).images,
                               latents_of(pipe, seed=5).images)


class Recorder:
    """An attention controller that records what it sees and optionally flattens cross-attention."""

    def __init__(self, flatten_cross=False):
        self.calls, self.flatten_cross = [], flatten_cross

    def __call__(self, probs, *, is_cross, place, step):
        self.calls.append((step, is_cross, place, tuple(probs.shape)))
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
        if self.flatten_cross and is_cross:
            return torch.full_like(probs, 1.0 / probs.shape[-1])
        return probs


def test_attention_controller_sees_every_layer_and_step_and_can_edit(pipe):
    plain = latents_of(pipe, seed=6, sampler="heun", num_inference_steps=3).images
    recorder = Recorder()
    pipe.attention.controller = recorder
    try:
        observed = latents_of(pipe, seed=6, sampler="heun", num_inference_steps=3).images
        pipe.attention.controller = Recorder(flatten_cross=True)
        edited = latents_of(pipe, seed=6, sampler="heun", num_inference_steps=3).images
    finally:
        pipe.attention.controller = None
    # Observing changes nothing but float32 rounding: with a controller the probabilities are formed explicitly
    # instead of by the fused SDPA kernel (1.5e-5 apart on an AVX2 CPU); 1e-4 is the parity tests' tolerance,
    # ten times below the change an edit makes (asserted next).
    torch.testing.assert_close(observed, plain, atol=1e-4, rtol=1e-4)
    assert (edited - plain).abs().max() > 1e-3  # replacing the probabilities does
    places = {place for _, _, place, _ in recorder.calls}
    assert {p.rsplit(".", 1)[-1] for p in places} == {"attn1", "attn2"}
    # Heun calls the network twice per step except the last; the step index comes from the sampler
    steps = [step for step, _, _, _ in recorder.calls]
    per_call = len(recorder.calls) // 5
    assert steps == [0] * 2 * per_call + [1] * 2 * per_call + [2] * per_call
    cross_shapes = {shape for _, is_cross, _, shape in recorder.calls if is_cross}
    assert all(shape[-1] == 77 and shape[0] == 2 for shape in cross_shapes)  # (uncond + cond, heads, HW, tokens)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_stays_finite_and_close(folder, dtype):
    full = latents_of(TextToImagePipeline.from_pretrained(folder), seed=8, output_type="np").images
    low_pipe = TextToImagePipeline.from_pretrained(folder, dtype=dtype)
    assert low_pipe.vae.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    low = latents_of(low_pipe, seed=8, output_type="np").images
    assert np.isfinite(low).all()
    assert np.abs(low - full).mean() < 0.05


def test_images_larger_than_the_vae_tile_are_decoded_in_tiles(pipe):
    latents = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))
    tiled = pipe.decode(latents)
    assert tiled.shape == (1, 3, 48, 48)
    whole = (pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert torch.corrcoef(torch.stack([tiled.flatten(), whole.flatten()]))[0, 1] > 0.9


@pytest.mark.parametrize("spacing", ["exponential", "beta"])
def test_a_folder_asking_for_exponential_or_beta_sigmas_is_sampled_on_diffusers_list(tiny_model_factory, spacing):
    """``use_exponential_sigmas`` / ``use_beta_sigmas`` in the scheduler config become the default spacing, and
    the sampler visits exactly the sigmas diffusers' UniPC scheduler lists for that folder."""
    from diffusers import UniPCMultistepScheduler

    folder = tiny_model_factory(**{f"use_{spacing}_sigmas": True})
    pipe = TextToImagePipeline.from_pretrained(folder)
    assert pipe.default_spacing() == spacing
    visited = []
    pipe("a red circle", num_inference_steps=9, sampler="unipc", seed=0, output_type="latent", progress=False,
         callback=lambda i, sigma, x, x0: visited.append(float(sigma)))
    theirs = UniPCMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
    theirs.set_timesteps(9)
    np.testing.assert_allclose(visited, theirs.sigmas[:-1].numpy(), rtol=1e-5)


def test_a_full_lcm_equals_diffusers_lcm_pipeline_draw_for_draw(full_lcm_folder):
    """A guidance-distilled UNet gets the guidance scale as its ``timestep_cond`` embedding and one conditional
    pass a step: the same latents as diffusers' ``LatentConsistencyModelPipeline`` (LCMScheduler, the same
    generator), and the scale changes them."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    settings = dict(latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
                    num_inference_steps=4, output_type="latent")
    pipe = TextToImagePipeline.from_pretrained(full_lcm_folder)
    assert pipe.is_guidance_distilled
    ours = {scale: pipe("a red circle", sampler="lcm", guidance_scale=scale, progress=False,
                        generator=torch.Generator().manual_seed(7), **settings).images for scale in (8.0, 2.0)}
    theirs = LatentConsistencyModelPipeline.from_pretrained(full_lcm_folder, safety_checker=None,
                                                            feature_extractor=None, requires_safety_checker=False)
    theirs.scheduler = LCMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    reference = theirs("a red circle", guidance_scale=8.0, generator=torch.Generator().manual_seed(7),
                       **settings).images
    torch.testing.assert_close(ours[8.0], reference, atol=1e-4 * max(1.0, float(reference.abs().max())), rtol=0)
    assert (ours[8.0] - ours[2.0]).abs().max() > 1e-3


def test_a_full_lcm_runs_img2img_and_batches_with_its_guidance_embedding(full_lcm_folder):
    """img2img gets the embedding too (the scale changes the result), and a batch of two equals its images alone."""
    pipe = TextToImagePipeline.from_pretrained(full_lcm_folder)
    image = np.random.default_rng(0).uniform(0, 1, (16, 16, 3))
    edits = [pipe.img2img(image, "a red circle", strength=0.6, sampler="lcm", num_inference_steps=4,
                          guidance_scale=scale, seed=1, output_type="latent", progress=False).images
             for scale in (8.0, 2.0)]
    assert (edits[0] - edits[1]).abs().max() > 1e-3
    batch = latents_of(pipe, ["a red circle", "a blue square"], sampler="lcm", num_inference_steps=4, seed=5,
                       guidance_scale=6.0).images
    alone = latents_of(pipe, "a blue square", sampler="lcm", num_inference_steps=4, seed=6, guidance_scale=6.0).images
    torch.testing.assert_close(batch[1:], alone, atol=1e-4, rtol=1e-4)  # batched BLAS rounding


@pytest.mark.parametrize("setting", [dict(negative_prompt="blue"), dict(guidance_rescale=0.5),
                                     dict(pag_scale=2.0), dict(emphasis="a1111", prompt="a red circle AND a square")])
def test_a_full_lcm_refuses_what_needs_classifier_free_guidance(full_lcm_folder, setting):
    pipe = TextToImagePipeline.from_pretrained(full_lcm_folder)
    with pytest.raises(ValueError, match="runs no classifier-free guidance"):
        latents_of(pipe, **{"prompt": "a red circle", **setting}, sampler="lcm", num_inference_steps=2)


def test_a_full_lcm_refuses_inversion_and_prompt_to_prompt(full_lcm_folder):
    pipe = TextToImagePipeline.from_pretrained(full_lcm_folder)
    with pytest.raises(ValueError, match="only text-to-image, img2img and inpainting run it"):
        pipe.prompt_to_prompt(["a red circle", "a blue circle"], seed=0, num_inference_steps=2, progress=False)


@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "dpm_2_a", "lms"])
def test_a_zero_snr_schedule_runs_heun_and_dpm_2_in_flow_time(pipe, tiny_model_factory, monkeypatch, sampler):
    """From a zero-terminal-SNR schedule's first sigma (4096) the pipeline runs Heun and (ancestral) DPM2 in flow
    time, as on flow models (tests/test_samplers.py shows why); LMS, and every sampler on other schedules, run in
    sigma."""
    import dataclasses

    from ldm import samplers

    zero_snr = TextToImagePipeline.from_pretrained(tiny_model_factory(
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"))
    assert zero_snr.starts_at_infinite_noise and not pipe.starts_at_infinite_noise
    spec, calls = samplers.SAMPLERS[sampler], []

    def recorded(function, name):
        def run(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)
        return run

    monkeypatch.setitem(samplers.SAMPLERS, sampler, dataclasses.replace(
        spec, fn=recorded(spec.fn, "sigma"),
        flow_time_fn=None if spec.flow_time_fn is None else recorded(spec.flow_time_fn, "flow time")))
    latents_of(zero_snr, sampler=sampler, num_inference_steps=3)
    latents_of(pipe, sampler=sampler, num_inference_steps=3)
    assert calls == (["sigma", "sigma"] if sampler == "lms" else ["flow time", "sigma"])


def test_slerp_walks_the_great_circle_and_keeps_gaussian_noise_unit_variance():
    from ldm.samplers import slerp

    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(slerp(1 / 3, a, b), torch.tensor([[3**0.5 / 2, 0.5]]))  # 30 degrees of 90
    assert torch.equal(slerp(0.0, a, b), a) and torch.equal(slerp(1.0, a, b), b)
    torch.testing.assert_close(slerp(0.25, a, 2 * a), 1.25 * a)  # parallel: the straight line
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(2, 1, 4, 32, 32, generator=generator)
    assert abs(float(slerp(0.5, first, second).std()) - 1) < 0.03
    assert abs(float((0.5 * first + 0.5 * second).std()) - 0.5**0.5) < 0.03  # what a straight line would give


def test_variation_strength_walks_from_the_seed_image_to_the_variation_seed_image(pipe):
    base, other = latents_of(pipe, seed=3).images, latents_of(pipe, seed=9).images
    assert torch.equal(latents_of(pipe, seed=3, variation_seed=9, variation_strength=0.0).images, base)
    assert torch.equal(latents_of(pipe, seed=3, variation_seed=9, variation_strength=1.0).images, other)
    batch = latents_of(pipe, seed=3, variation_seed=9, variation_strength=0.3, num_images_per_prompt=2)
    assert [(p["seed"], p["variation_seed"], p["variation_strength"]) for p in batch.parameters] == [
        (3, 9, 0.3), (4, 10, 0.3)]
    assert 0 < (batch.images[:1] - base).abs().max() and 0 < (batch.images[:1] - other).abs().max()
    alone = latents_of(pipe, seed=4, variation_seed=10, variation_strength=0.3).images
    torch.testing.assert_close(batch.images[1:], alone, atol=1e-4, rtol=1e-4)
    picture = np.random.default_rng(0).random((16, 16, 3))
    edits = [pipe.img2img(picture, "a red circle", strength=0.5, num_inference_steps=6, output_type="latent",
                          progress=False, **seeds).images
             for seeds in ({"seed": 3, "variation_seed": 9, "variation_strength": 1.0}, {"seed": 9})]
    assert torch.equal(*edits)  # img2img draws its noise the same way


def test_hires_fix_is_an_upscale_then_img2img_from_each_images_seed(pipe):
    """The second pass runs exactly hires_steps steps, the last of a list of hires_steps / strength (the web UI's
    rule): img2img of the upscaled first pass with 8 steps at strength 0.5, which runs the last 4 of 8."""
    import torch.nn.functional as F

    settings = dict(prompt="a red circle", seed=5, num_images_per_prompt=2)
    first = latents_of(pipe, **settings).images  # (2, 4, 8, 8), 6 steps
    seen = []
    out = latents_of(pipe, **settings, hires_scale=1.5, hires_strength=0.5, hires_steps=4,
                     callback=lambda i, *step: seen.append(i))
    assert out.images.shape == (2, 4, 12, 12) and seen == list(range(6)) + list(range(4))  # 6 steps, then 4
    upscaled = F.interpolate(first, size=(12, 12), mode="bilinear")
    for k in range(2):
        again = pipe.img2img(upscaled[k:k + 1], "a red circle", strength=0.5, seed=5 + k, num_inference_steps=8,
                             sampler="euler", output_type="latent", progress=False).images
        torch.testing.assert_close(out.images[k:k + 1], again, atol=1e-4, rtol=1e-4)
    assert {key: out.parameters[1][key] for key in ("seed", "steps", "width", "height", "hires_scale",
                                                     "hires_upscaler", "hires_steps", "strength")} == dict(
        seed=6, steps=6, width=16, height=16, hires_scale=1.5, hires_upscaler="latent", hires_steps=4, strength=0.5)
    kept = latents_of(pipe, **settings, hires_scale=2, hires_strength=0.0, hires_upscaler="latent_nearest")
    assert torch.equal(kept.images, first.repeat_interleave(2, -1).repeat_interleave(2, -2))
    pixels = latents_of(pipe, **settings, hires_scale=2, hires_upscaler="lanczos", output_type="pil").images
    assert pixels[0].size == (32, 32)


def test_hires_fix_refuses_a_refiner_before_any_work(pipe):
    with pytest.raises(ValueError, match="cannot follow a refiner stage"):
        latents_of(pipe, hires_scale=2, refiner=pipe)


def test_restart_spends_steps_as_the_web_ui(pipe):
    from pipelines.metadata import parse_parameters

    assert len(pipe.sigmas(20, "restart", "karras")) == 12  # 11 main steps + one restart interval of 9
    assert len(pipe.sigmas(12, "restart", "karras")) == 13  # under 20 steps: no restart
    out = latents_of(pipe, sampler="restart", num_inference_steps=20, seed=4, timestep_spacing="karras")
    again = latents_of(pipe, sampler="restart", num_inference_steps=20, seed=4, timestep_spacing="karras")
    heun = latents_of(pipe, sampler="heun", num_inference_steps=11, seed=4, timestep_spacing="karras")
    assert torch.equal(out.images, again.images) and (out.images - heun.images).abs().max() > 1e-3
    assert parse_parameters("a\nSteps: 20, Sampler: Restart, Schedule type: Karras, Seed: 1")["sampler"] == "restart"
    assert parse_parameters("a\nSteps: 20, Sampler: PLMS, Seed: 1")["sampler"] == "plms"
