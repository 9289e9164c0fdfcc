"""FlowEdit (Kulikov et al. 2024): the Gaussian known answer in both couplings, noise-independence, identical
prompts leaving the image exactly, and the pipeline method on tiny UNet and MMDiT models."""
import numpy as np
import pytest
import torch

from ldm.flow_edit import flow_edit
from pipelines.random_models import save_random_sd3
from pipelines.text_to_image import TextToImagePipeline

S = 0.5  # std of the Gaussian latents


def gaussian_denoiser(mu: torch.Tensor):
    """The exact x0-denoiser of latents N(mu, S^2) in VE coordinates: mu + S^2 / (S^2 + sigma^2) (x - mu)."""
    def denoise(x, sigma):
        sigma = sigma.view(-1, 1, 1, 1).double()
        return mu + S**2 / (S**2 + sigma**2) * (x - mu)
    return denoise


def reference_shift(delta_mu: float, sigma_max: float, coupling: str) -> float:
    """Where the edit moves a latent, from the continuous FlowEdit ODE for N(mu_src, S^2) -> N(mu_tar, S^2): in VE
    coordinates ``delta = delta_mu (1 - S / sqrt(S^2 + sigma_max^2))`` in closed form; in flow time
    ``d delta / dt = g delta - delta_mu t / V`` (``V = (1 - t)^2 S^2 + t^2``, ``g = (t - (1 - t) S^2) / V``) from
    ``t_max`` down to 0, integrated by RK4 on a fine grid."""
    if coupling == "ve":
        return delta_mu * (1 - S / np.sqrt(S**2 + sigma_max**2))

    def slope(t, delta):
        v = (1 - t) ** 2 * S**2 + t**2
        return (t - (1 - t) * S**2) / v * delta - delta_mu * t / v

    grid = np.linspace(sigma_max / (1 + sigma_max), 0.0, 200001)
    delta = 0.0
    for t, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t
        k1 = slope(t, delta)
        k2 = slope(t + h / 2, delta + h / 2 * k1)
        k3 = slope(t + h / 2, delta + h / 2 * k2)
        k4 = slope(t_next, delta + h * k3)
        delta += h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return delta


@pytest.mark.parametrize("coupling", ["flow", "ve"])
def test_gaussian_edit_moves_by_the_known_shift_whatever_the_noise(coupling):
    """Source N(mu_src, S^2), target N(mu_tar, S^2): the edit adds the ODE's shift to every latent, and the same
    shift for any noise draw (in this linear case the noise cancels exactly between the branches)."""
    mu_src, mu_tar = torch.tensor(0.3, dtype=torch.float64), torch.tensor(-0.9, dtype=torch.float64)
    sigma_max = 9.0
    if coupling == "flow":
        t = torch.linspace(sigma_max / (1 + sigma_max), 0, 401, dtype=torch.float64)
        sigmas = t / (1 - t)
    else:
        sigmas = torch.cat([torch.logspace(np.log10(sigma_max), -3, 400, dtype=torch.float64),
                            torch.zeros(1, dtype=torch.float64)])
    x_src = mu_src + S * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outs = [flow_edit(gaussian_denoiser(mu_src), gaussian_denoiser(mu_tar), x_src, sigmas, coupling,
                      torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    want = reference_shift(float(mu_tar - mu_src), sigma_max, coupling)
    assert abs(want) > 0.3  # a real move
    torch.testing.assert_close(outs[0] - x_src, torch.full_like(x_src, want), atol=5e-3 * abs(want), rtol=0)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=0)


@pytest.fixture(scope="module", params=["unet", "mmdit"])
def pipe(request, tiny_model_factory, tmp_path_factory):
    if request.param == "unet":
        return TextToImagePipeline.from_pretrained(tiny_model_factory())
    return TextToImagePipeline.from_pretrained(save_random_sd3(tmp_path_factory.mktemp("sd3")))


def test_the_same_prompt_edits_nothing_and_another_does(pipe):
    """With identical prompts and guidance the two branches cancel exactly: the latents come back bit for bit;
    another target prompt moves them; strength 0 is the input; the edit is written into the image's parameters."""
    size = pipe.unet.config.sample_size
    channels = pipe.unet.config.in_channels
    latents = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))
    same = dict(num_inference_steps=6, guidance_scale=3.0, source_guidance_scale=3.0, seed=0, progress=False,
                output_type="latent")
    kept = pipe.flow_edit(latents, "a red circle", "a red circle", strength=0.8, **same).images
    assert torch.equal(kept, latents)
    moved = pipe.flow_edit(latents, "a red circle", "a blue square", strength=0.8, **same).images
    assert (moved - latents).abs().max() > 1e-3
    untouched = pipe.flow_edit(latents, "a red circle", "a blue square", strength=0.0, **same)
    assert torch.equal(untouched.images, latents)
    assert untouched.parameters[0]["edit_method"] == "flowedit"
    assert untouched.parameters[0]["source_prompt"] == "a red circle"


def test_flow_edit_takes_pictures_and_refuses_bad_input(pipe):
    picture = np.full((16, 16, 3), 120, dtype=np.uint8)
    image = pipe.flow_edit(picture, "a red circle", "a blue circle", num_inference_steps=3, seed=0,
                           progress=False).images[0]
    assert image.size == (16, 16)
    with pytest.raises(ValueError, match="strength"):
        pipe.flow_edit(picture, "a", "b", strength=1.5)
    with pytest.raises(ValueError, match="source_guidance_scale"):
        pipe.flow_edit(picture, "a", "b", source_guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe.flow_edit(torch.zeros(1, 3, 2, 2), "a", "b")
    with pytest.raises(ValueError, match="without prompt editing"):
        pipe.flow_edit(picture, "a", "[b:c:0.5]", emphasis="a1111")
    with pytest.raises(ValueError, match="a variation seed does not apply"):
        pipe.flow_edit(picture, "a", "b", variation_seed=3, variation_strength=0.5)
