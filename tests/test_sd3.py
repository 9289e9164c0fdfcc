"""SD3-shaped models (MMDiT, two CLIP towers, no T5, rectified flow with shift 3, a VAE with a shift factor): our
pipeline equals diffusers' StableDiffusion3Pipeline on the same tiny weights and noise."""
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from pipelines.random_models import save_random_sd3
from pipelines.text_to_image import TextToImagePipeline

PROMPT = "a red circle at the top left"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_random_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_matches_diffusers_sd3_pipeline(folder, negative):
    pipe = TextToImagePipeline.from_pretrained(folder)
    assert pipe.is_mmdit and pipe.is_flow and not pipe.is_sdxl
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = dict(latents=latents, num_inference_steps=6, guidance_scale=5.0, output_type="latent")
    ours = pipe(PROMPT, negative_prompt=negative, sampler="flow_euler", progress=False, **settings).images
    theirs_pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, text_encoder_3=None,
                                                           tokenizer_3=None, image_encoder=None, feature_extractor=None)
    theirs_pipe.set_progress_bar_config(disable=True)
    theirs = theirs_pipe(PROMPT, negative_prompt=negative, **settings).images
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, float(theirs.abs().max())), rtol=0)


def test_clip_skip_matches_diffusers_sd3_pipeline(folder):
    pipe = TextToImagePipeline.from_pretrained(folder)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    settings = dict(latents=latents, num_inference_steps=4, guidance_scale=5.0, output_type="latent")
    ours = pipe(PROMPT, sampler="flow_euler", clip_skip=1, progress=False, **settings).images
    default = pipe(PROMPT, sampler="flow_euler", progress=False, **settings).images
    theirs_pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, text_encoder_3=None,
                                                           tokenizer_3=None, image_encoder=None, feature_extractor=None)
    theirs_pipe.set_progress_bar_config(disable=True)
    negative, _, negative_pooled, _ = theirs_pipe.encode_prompt("", None, None, device="cpu",
                                                                do_classifier_free_guidance=False, clip_skip=1)
    theirs = theirs_pipe(PROMPT, negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled,
                         clip_skip=1, **settings).images
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, float(theirs.abs().max())), rtol=0)
    assert (ours - default).abs().max() > 1e-3


def test_heun_on_a_flow_model_matches_diffusers_flow_match_heun(folder):
    """On flow models ``heun`` is Heun in flow time, as diffusers' FlowMatchHeunDiscreteScheduler."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe = TextToImagePipeline.from_pretrained(folder)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = dict(latents=latents, num_inference_steps=5, guidance_scale=5.0, output_type="latent")
    ours = pipe(PROMPT, sampler="heun", progress=False, **settings).images
    euler = pipe(PROMPT, sampler="flow_euler", progress=False, **settings).images
    theirs_pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, text_encoder_3=None,
                                                           tokenizer_3=None, image_encoder=None, feature_extractor=None)
    theirs_pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(theirs_pipe.scheduler.config)
    theirs_pipe.set_progress_bar_config(disable=True)
    theirs = theirs_pipe(PROMPT, **settings).images
    assert (ours - euler).abs().max() > 1e-3  # a different method from Euler
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, float(theirs.abs().max())), rtol=0)


def test_one_token_standing_for_the_256_zero_t5_tokens_is_exact(folder):
    """Our joint-attention processor with the last context token counted 256 times equals diffusers' own processor
    on the full sequence with 256 zero T5 tokens."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    pipe = TextToImagePipeline.from_pretrained(folder)
    assert pipe.attention.tail_repeats == 256
    gen = torch.Generator().manual_seed(0)
    x, clip, pooled = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 64, generator=gen), torch.randn(
        2, 64, generator=gen)
    context = torch.cat([clip, torch.zeros(2, 256, 64)], dim=1)
    args = dict(hidden_states=x, timestep=torch.tensor([700.0, 30.0]), pooled_projections=pooled)
    with torch.no_grad():
        ours = pipe.unet(encoder_hidden_states=context[:, :78], **args).sample
        pipe.unet.set_attn_processor(JointAttnProcessor2_0())
        theirs = pipe.unet(encoder_hidden_states=context, **args).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_joint_attention_control_edits_each_block_as_a_distribution():
    """The controller sees the image -> text and image -> image blocks of the image-query rows; what it returns
    for a block is scaled to the row's own mass on that block, so rows still sum to 1, and the context-query rows
    and the T5 stand-in column are untouched."""
    from ldm.attention import AttentionHook, JointControlledAttnProcessor

    hook = AttentionHook()
    hook.text_tokens = 3
    n_image, context = 4, 4  # 3 CLIP tokens and the T5 stand-in
    probs = torch.randn(2, 2, n_image + context, n_image + context, generator=torch.Generator().manual_seed(0))
    probs = probs.softmax(-1)
    seen = {}

    def uniform(block, *, is_cross, place, step):
        keys = slice(n_image, n_image + 3) if is_cross else slice(0, n_image)
        torch.testing.assert_close(block, probs[:, :, :n_image, keys])
        seen[is_cross] = block.shape[-1]
        return torch.full_like(block, 0.5)  # any positive map: only its shape over the keys is kept

    out = JointControlledAttnProcessor(hook, "block").control(uniform, probs, n_image, joint=True)
    assert seen == {True: 3, False: n_image}
    text, image = slice(n_image, n_image + 3), slice(0, n_image)
    torch.testing.assert_close(out.sum(-1), torch.ones(out.shape[:-1]))
    for block in (text, image):
        mass = probs[:, :, :n_image, block].sum(-1, keepdim=True)
        torch.testing.assert_close(out[:, :, :n_image, block], mass.expand(-1, -1, -1, block.stop - block.start)
                                   / (block.stop - block.start))
    torch.testing.assert_close(out[:, :, :n_image, -1], probs[:, :, :n_image, -1])
    torch.testing.assert_close(out[:, :, n_image:], probs[:, :, n_image:])


def test_prompt_to_prompt_on_joint_attention(folder):
    """Without control the edited row is plain generation of the target prompt; with the source's image -> text
    and image -> image attention injected at every step it changes, and an edit to the same prompt is the source."""
    pipe = TextToImagePipeline.from_pretrained(folder)
    prompts = ["a red circle", "a blue circle"]
    settings = dict(seed=3, num_inference_steps=6, sampler="flow_euler", output_type="latent", progress=False)
    source, free = pipe.prompt_to_prompt(prompts, cross_replace_steps=0.0, self_replace_steps=0.0, **settings).images
    torch.testing.assert_close(free, pipe(prompts[1], **settings).images[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(source, pipe(prompts[0], **settings).images[0], atol=1e-4, rtol=1e-4)
    _, edited = pipe.prompt_to_prompt(prompts, cross_replace_steps=1.0, self_replace_steps=1.0, **settings).images
    assert (edited - free).abs().max() > 1e-3
    same, unchanged = pipe.prompt_to_prompt([prompts[0]] * 2, cross_replace_steps=1.0, self_replace_steps=1.0,
                                            **settings).images
    torch.testing.assert_close(unchanged, same, atol=1e-5, rtol=0)
    _, maps, _ = pipe.attention_maps("a red circle", seed=0, num_inference_steps=3, progress=False)
    assert list(maps) == ["a", "red", "circle"] and all(m.shape == (8, 8) for m in maps.values())


def test_flow_inversion_round_trip(folder):
    """Inversion runs the flow ODE backwards (DDIM in sigma space is the flow Euler step); with fixed-point
    refinement sampling back returns the image's latents."""
    import numpy as np

    pipe = TextToImagePipeline.from_pretrained(folder)
    image = np.full((16, 16, 3), 200, dtype=np.uint8)
    image[4:10, 4:10] = (220, 30, 30)
    inversion = pipe.invert(image, PROMPT, num_inference_steps=30, fixed_point_iterations=10, progress=False)
    back = pipe.reconstruct(inversion, output_type="latent", progress=False).images
    assert (back - inversion.trajectory[0]).abs().max() < 0.02
    null = pipe.invert(image, PROMPT, num_inference_steps=3, guidance_scale=5.0, null_text=True, null_text_steps=2,
                       progress=False)
    assert len(null.null_embeddings) == 3


def test_seamless_tiling_and_freeu_are_refused_on_an_mmdit(folder):
    pipe = TextToImagePipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="convolutional denoiser"):
        pipe("a cat", seamless="xy", num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="MMDiT"):
        pipe("a cat", freeu=(0.9, 0.2, 1.5, 1.6), num_inference_steps=1, progress=False)
