"""Editing modes on tiny random models (ε and v-prediction): SDEdit, inpainting, DDIM inversion."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.samplers import repaint_path
from pipelines.random_models import save_random_model
from pipelines.text_to_image import TextToImagePipeline

ZERO_SNR_V = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                  steps_offset=0)


@pytest.fixture(scope="module", params=["epsilon", "v-zero-snr"])
def pipe(request, tiny_model_factory):
    folder = tiny_model_factory() if request.param == "epsilon" else tiny_model_factory(**ZERO_SNR_V)
    return TextToImagePipeline.from_pretrained(folder)


def picture(seed=0, size=16, mode="RGB"):
    """A smooth random picture (so the tiny VAE's round trip is not pure noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC).convert(mode)


def test_strength_zero_is_the_vae_round_trip(pipe):
    out = pipe.img2img(picture(), "a red circle", strength=0.0, seed=1, output_type="pt", progress=False).images
    pixels = torch.from_numpy(np.asarray(picture(), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    torch.testing.assert_close(out, pipe.decode(pipe.encode(pixels)))


@pytest.mark.parametrize("strength, steps_run", [(0.25, 2), (0.5, 5), (1.0, 10)])
def test_sdedit_runs_the_tail_of_the_sigma_list(pipe, strength, steps_run):
    """SDEdit is the sampler started part-way down its list: int(steps * strength) steps, ending where
    text-to-image ends, starting at the sigma that far from the end."""
    seen = []
    pipe.img2img(picture(), "a red circle", strength=strength, seed=3, num_inference_steps=10, sampler="euler",
                 callback=lambda i, sigma, x, x0: seen.append(float(sigma)), progress=False)
    full = pipe.sigmas(10, "euler", pipe.default_spacing())
    assert seen == pytest.approx(full[10 - steps_run:-1].tolist())


def test_full_strength_on_a_zero_snr_model_is_text_to_image(tiny_model_factory):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory(**ZERO_SNR_V))
    kwargs = dict(seed=5, num_inference_steps=8, sampler="ddim", output_type="np", progress=False)
    edited = pipe.img2img(picture(), "a blue square", strength=1.0, **kwargs).images
    generated = pipe("a blue square", **kwargs).images
    assert np.abs(edited - generated).max() < 1e-3


def test_inpainting_keeps_every_pixel_outside_the_mask(pipe):
    image = picture(2)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 6:14] = 255
    mask[4:12, 4:6] = 128  # a soft edge
    out = pipe.inpaint(image, Image.fromarray(mask), "a green triangle", seed=0, num_inference_steps=6,
                       sampler="euler_a", progress=False).images[0]
    before, after = np.asarray(image), np.asarray(out)
    np.testing.assert_array_equal(after[mask == 0], before[mask == 0])
    assert np.abs(after[mask == 255].astype(int) - before[mask == 255]).mean() > 2


def test_a_callback_that_returns_nothing_keeps_the_inpainting_blend(pipe):
    """A progress callback (returns None) must not undo the re-blend of the known region after each step."""
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 6:14] = 255
    kwargs = dict(seed=0, num_inference_steps=4, sampler="euler", output_type="latent", progress=False)
    plain = pipe.inpaint(picture(2), Image.fromarray(mask), "a green triangle", **kwargs).images
    watched = pipe.inpaint(picture(2), Image.fromarray(mask), "a green triangle", callback=lambda *step: None,
                           **kwargs).images
    torch.testing.assert_close(watched, plain, atol=0, rtol=0)


def test_inpainting_with_repaint_resampling_walks_the_jump_schedule(pipe):
    """RePaint's resampling: the sampler runs each step of ``repaint_path`` (the callback sees those step indices
    and their sigmas), the output still keeps every pixel outside the mask, and the jumps change the repainting."""
    image, mask = picture(3), np.zeros((16, 16), dtype=np.uint8)
    mask[2:10, 3:13] = 255
    kwargs = dict(seed=1, num_inference_steps=6, sampler="ddim", progress=False)
    seen = []
    resampled = pipe.inpaint(image, Image.fromarray(mask), "a red square", jump_length=2, jump_n_sample=3,
                             callback=lambda i, sigma, x, x0: seen.append((i, float(sigma))), **kwargs)
    path = repaint_path(6, 2, 3)
    sigmas = pipe.sigmas(6, "ddim", pipe.default_spacing())
    assert [i for i, _ in seen] == [a for a, b in zip(path, path[1:]) if b > a]
    assert [s for _, s in seen] == pytest.approx([float(sigmas[i]) for i, _ in seen])
    plain = pipe.inpaint(image, Image.fromarray(mask), "a red square", **kwargs)
    before, after, after_plain = (np.asarray(x, dtype=int) for x in (image, resampled.images[0], plain.images[0]))
    np.testing.assert_array_equal(after[mask == 0], before[mask == 0])
    np.testing.assert_array_equal(after_plain[mask == 0], before[mask == 0])
    assert np.abs(after - after_plain)[mask == 255].mean() > 1
    assert resampled.parameters[0]["jump_n_sample"] == 3 and "jump_n_sample" not in plain.parameters[0]


def test_differential_inpainting_frees_a_pixel_when_the_progress_reaches_its_strength(pipe):
    """A uniform grey mask of strength m under differential diffusion keeps the noised input until the first sigma
    whose threshold is at most m, then samples freely: with Euler (no memory, no noise) that is SDEdit started one
    step earlier; a black-and-white mask gives the plain blend."""
    steps, grey = 8, 128
    kwargs = dict(seed=4, num_inference_steps=steps, sampler="euler", output_type="latent", progress=False)
    mask = Image.new("L", (16, 16), grey)
    differential = pipe.inpaint(picture(5), mask, "a red square", mask_mode="differential", **kwargs)
    sigmas = pipe.sigmas(steps, "euler", pipe.default_spacing())
    schedule = pipe.schedule()
    times = schedule.sigma_to_t(sigmas.clamp(min=max(float(sigmas[-1]), schedule.sigma_min))).double()
    thresholds = (times - times[-1]) / (times[0] - times[-1])
    freed = next(j for j in range(1, steps + 1) if thresholds[j] <= grey / 255)
    start = freed - 1
    assert 2 <= start <= 5  # about half-way for a mid-grey mask
    sdedit = pipe.img2img(picture(5), "a red square", strength=(steps - start) / steps, **kwargs)
    torch.testing.assert_close(differential.images, sdedit.images, atol=1e-5, rtol=1e-5)
    assert differential.parameters[0]["mask_mode"] == "differential"
    blended = pipe.inpaint(picture(5), mask, "a red square", **kwargs).images
    assert (blended - differential.images).abs().max() > 1e-2
    box = np.zeros((16, 16), dtype=np.uint8)
    box[4:12, 6:14] = 255
    torch.testing.assert_close(pipe.inpaint(picture(5), Image.fromarray(box), "x", mask_mode="differential",
                                            **kwargs).images,
                               pipe.inpaint(picture(5), Image.fromarray(box), "x", **kwargs).images, atol=0, rtol=0)
    box[4:12, 4:6] = 64  # a faint edge: repainted late, and not mixed with the input
    out = pipe.inpaint(picture(5), Image.fromarray(box), "x", mask_mode="differential",
                       **{**kwargs, "output_type": "pil"}).images[0]
    np.testing.assert_array_equal(np.asarray(out)[box == 0], np.asarray(picture(5))[box == 0])


def test_inpainting_with_a_nine_channel_unet(tmp_path):
    folder = save_random_model(tmp_path / "inpaint", "tiny")
    config_path = folder / "unet" / "config.json"
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    config = dict(unet.config)
    config["in_channels"] = 9
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    assert config_path.exists()
    pipe = TextToImagePipeline.from_pretrained(folder)
    assert pipe.is_inpainting_unet
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[8:, :] = 255
    out = pipe.inpaint(picture(4), Image.fromarray(mask), "x", seed=0, num_inference_steps=4, progress=False)
    np.testing.assert_array_equal(np.asarray(out.images[0])[:8], np.asarray(picture(4))[:8])
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe("x", latents=torch.zeros(1, 9, 8, 8), progress=False)


def test_mask_of_another_size_is_resized_with_a_warning(pipe):
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    with pytest.warns(UserWarning, match="mask resized"):
        out = pipe.inpaint(picture(), mask, "x", seed=0, num_inference_steps=3, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(out)[:, 9:], np.asarray(picture())[:, 9:])  # column 8 is soft


def test_non_rgb_and_odd_sized_images_are_converted_with_notice(pipe):
    out = pipe.img2img(picture(mode="L"), "x", strength=0.5, seed=0, num_inference_steps=4, progress=False)
    assert out.images[0].mode == "RGB"
    rgba = picture(mode="RGBA")
    pipe.img2img(rgba, "x", strength=0.5, seed=0, num_inference_steps=4, progress=False)
    with pytest.warns(UserWarning, match="not a multiple of 2: resized to 16x16"):
        out = pipe.img2img(picture(size=17), "x", strength=0.5, seed=0, num_inference_steps=4, progress=False)
    assert out.images[0].size == (16, 16)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), "half"])
def test_strength_outside_zero_one_is_refused(pipe, strength):
    with pytest.raises(ValueError, match="strength must be a"):
        pipe.img2img(picture(), "x", strength=strength, progress=False)


@pytest.mark.parametrize("method, kwargs, message", [
    ("inpaint", {"feather": float("nan")}, "feather must be a finite number"),
    ("inpaint", {"feather": -1.0}, "feather must be a finite number"),
    ("inpaint", {"mask_mode": "soft"}, "unknown mask_mode 'soft'; known: blend, differential"),
    ("invert", {"fixed_point_iterations": -1}, "fixed_point_iterations must be an integer >= 0"),
    ("invert", {"null_text": True, "guidance_scale": 7.5, "null_text_steps": 0}, "null_text_steps must be"),
])
def test_bad_editing_settings_are_refused_before_any_work(pipe, method, kwargs, message):
    args = (picture(), Image.new("L", (16, 16), 255), "x") if method == "inpaint" else (picture(), "x")
    with pytest.raises(ValueError, match=message):
        getattr(pipe, method)(*args, progress=False, **kwargs)


class GaussianEpsUNet(torch.nn.Module):
    """Stands in for the UNet with the exact ε-predictor of Gaussian latents N(mu, s^2): a known-answer network."""

    def __init__(self, unet, schedule, mu=0.2, s=0.8, conditional=False):
        super().__init__()
        self.config, self.schedule, self.mu, self.s = unet.config, schedule, mu, s
        self.conditional = conditional  # the mean then follows the text embedding: CFG matters
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def forward(self, x_vp, timestep, encoder_hidden_states=None):
        sigma = self.schedule.t_to_sigma(timestep.double().cpu()).view(-1, 1, 1, 1)
        x = x_vp * (1 + sigma**2).sqrt()
        mu = self.mu
        if self.conditional:
            mu = mu + encoder_hidden_states[:, :, 0].double().mean(1).view(-1, 1, 1, 1)
        x0 = mu + self.s**2 / (self.s**2 + sigma**2) * (x - mu)
        return SimpleNamespace(sample=(x - x0) / sigma)


@pytest.mark.parametrize("iterations, tolerance", [(0, 0.35), (6, 2e-3)])
def test_inversion_round_trip_with_a_known_answer_network(tiny_model_factory, iterations, tolerance):
    """Through the whole pipeline (encode, invert, sample back) with an exact Gaussian network: plain DDIM
    inversion round-trips approximately, fixed-point inversion exactly."""
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    pipe.unet = GaussianEpsUNet(pipe.unet, pipe.schedule("ddim"))
    inversion = pipe.invert(picture(6), "a red circle", num_inference_steps=20, fixed_point_iterations=iterations,
                            progress=False)
    assert len(inversion.trajectory) == 21
    back = pipe.reconstruct(inversion, output_type="latent", progress=False).images
    error = ((back - inversion.image_latents).abs().max() / inversion.image_latents.abs().max()).item()
    assert error < tolerance


def test_null_text_inversion_retraces_the_pivot_under_guidance(tiny_model_factory):
    """At guidance 7.5 plain DDIM inversion drifts; null-text inversion learns per-step unconditional embeddings
    with which guided sampling lands back on the image (a known-answer network whose mean follows the text)."""
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    pipe.unet = GaussianEpsUNet(pipe.unet, pipe.schedule("ddim"), conditional=True)
    errors = {}
    for name, kwargs in (("plain", {}), ("null-text", {"null_text": True, "fixed_point_iterations": 6}),
                         ("fixed-point", {"fixed_point_iterations": 6})):
        inversion = pipe.invert(picture(7), "a red circle", num_inference_steps=10, guidance_scale=7.5,
                                progress=False, **kwargs)
        back = pipe.reconstruct(inversion, output_type="latent", progress=False).images
        errors[name] = ((back - inversion.image_latents).abs().max() / inversion.image_latents.abs().max()).item()
        if name == "null-text":
            assert len(inversion.null_embeddings) == 10
    assert errors["plain"] > 1.0 and errors["null-text"] < 0.03, errors
    # fixed-point inversion of the guided sampler is itself exact, without null-text optimisation
    assert errors["fixed-point"] < 5e-3, errors
    with pytest.raises(ValueError, match="null_text inversion is for guidance_scale > 1"):
        pipe.invert(picture(7), "x", guidance_scale=1.0, null_text=True, progress=False)


def test_null_text_inversion_runs_past_the_papers_hundred_steps(tiny_model_factory, monkeypatch):
    """The paper's lr schedule 1e-2 (1 - i / 100) is for 50 steps; stretched over the step count it stays positive
    (taken literally it is 0 at step 100 and Adam refuses step 101)."""
    import ldm.inversion

    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    rates = []
    adam = torch.optim.Adam
    monkeypatch.setattr(ldm.inversion.torch.optim, "Adam", lambda params, lr: rates.append(lr) or adam(params, lr))
    inversion = pipe.invert(picture(7), "a red circle", num_inference_steps=102, guidance_scale=7.5,
                            null_text=True, null_text_steps=1, progress=False)
    assert len(inversion.null_embeddings) == 102 and min(rates) > 0
    assert rates == pytest.approx([1e-2 * (1 - 50 * i / 102 / 100) for i in range(102)])


def test_inversion_files_round_trip_and_damaged_ones_are_refused(pipe, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from pipelines.editing import load_inversion, save_inversion

    inversion = pipe.invert(picture(), "x", num_inference_steps=4, progress=False, clip_skip=1)
    path = tmp_path / "new" / "folder" / "inv.safetensors"  # parent folders are created
    save_inversion(inversion, path)
    back = load_inversion(path)
    assert back.prompt == "x" and torch.equal(torch.stack(back.trajectory), torch.stack(inversion.trajectory))
    assert back.clip_skip == 1 and pipe.reconstruct(back).parameters[0]["clip_skip"] == 1
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    tensors = load_file(str(path))
    del tensors["sigmas"]
    save_file(tensors, tmp_path / "damaged.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match="incomplete or damaged"):
        load_inversion(tmp_path / "damaged.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not an inversion written by `ldm invert`"):
        load_inversion(tmp_path / "other.safetensors")


def test_inversion_is_refused_by_another_model(pipe, tiny_model_factory):
    inversion = pipe.invert(picture(), "x", num_inference_steps=4, progress=False)
    other = TextToImagePipeline.from_pretrained(tiny_model_factory(prediction_type="sample"))
    with pytest.raises(ValueError, match="this inversion was made with model"):
        other.reconstruct(inversion)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_img2img_and_inpainting_on_sdxl_and_flow_models(family, tmp_path):
    """SDEdit at strength 0 is the VAE round trip (with SD3's shift factor); inpainting keeps every pixel outside
    the mask and repaints inside it."""
    from pipelines.random_models import save_random_sd3, save_random_sdxl

    pipe = TextToImagePipeline.from_pretrained((save_random_sd3 if family == "sd3" else save_random_sdxl)(tmp_path))
    image = np.full((16, 16, 3), 200, dtype=np.uint8)
    image[4:10, 4:10] = (220, 30, 30)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[2:12, 2:12] = 255
    zero = pipe.img2img(image, "a red circle", strength=0.0, output_type="pt", progress=False).images
    pixels = torch.from_numpy(image.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    torch.testing.assert_close(zero, pipe.decode(pipe.encode(pixels)))
    half = pipe.img2img(image, "a red circle", strength=0.5, num_inference_steps=4, output_type="pt",
                        progress=False).images
    assert (half - zero).abs().max() > 1e-3
    out = np.asarray(pipe.inpaint(image, mask, "a blue square", num_inference_steps=4, seed=0,
                                  progress=False).images[0])
    assert np.array_equal(out[mask == 0], image[mask == 0])
    assert np.abs(out[mask > 0].astype(int) - image[mask > 0]).mean() > 5
    settings = dict(num_inference_steps=3, seed=2, output_type="latent", progress=False)
    first = pipe("a red circle", **settings).images
    hires = pipe("a red circle", hires_scale=2, hires_strength=0.0, **settings)  # strength 0: the upscale alone
    torch.testing.assert_close(hires.images, torch.nn.functional.interpolate(first, scale_factor=2,
                                                                             mode="bilinear"))
    apg = pipe("a red circle", guidance="apg", apg_eta=1.0, guidance_scale=5.0, **settings).images
    torch.testing.assert_close(apg, pipe("a red circle", guidance_scale=5.0, **settings).images, atol=1e-4,
                               rtol=1e-4)
