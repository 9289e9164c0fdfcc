"""Prompt-to-prompt: the attention controller on synthetic maps, and the pipeline modes on a tiny model."""
import pytest
import torch

from ldm.prompt_to_prompt import PromptToPrompt, align_tokens, token_positions, word_tokens
from ldm.text import load_tokenizer
from pipelines.text_to_image import TextToImagePipeline

TOKENIZER = load_tokenizer()


def probs(batch=4, heads=2, queries=16, keys=77, seed=0):
    return torch.rand(batch, heads, queries, keys, generator=torch.Generator().manual_seed(seed)).softmax(-1)


def test_words_split_into_several_tokens_keep_all_of_them():
    words = word_tokens(TOKENIZER, "a sksqzv dog")
    assert [w for w, _ in words] == ["a", "sksqzv", "dog"]
    assert len(words[1][1]) > 1
    assert token_positions(TOKENIZER, "a sksqzv dog", "sksqzv") == words[1][1]
    assert token_positions(TOKENIZER, "a dog and a dog", "dog") == [2, 5]
    with pytest.raises(ValueError, match="not in the prompt"):
        token_positions(TOKENIZER, "a dog", "cat")


def test_alignment_marks_added_tokens():
    assert align_tokens([1, 2, 3], [1, 5, 2, 3]) == [0, -1, 1, 2]
    assert align_tokens([1, 2, 3], [1, 2, 3]) == [0, 1, 2]
    assert align_tokens([1, 2, 3], [1, 3]) == [0, 2]


def test_replace_copies_source_cross_attention_only_inside_its_window():
    controller = PromptToPrompt(TOKENIZER, "a red circle", "a blue circle", num_steps=10, edit="replace",
                                cross_replace_steps=0.5, self_replace_steps=0.2, latent_size=(4, 4))
    p = probs()
    early = controller(p, is_cross=True, place="x.attn2", step=4)
    torch.testing.assert_close(early[3], p[2])  # edited row takes the source's maps
    torch.testing.assert_close(early[:3], p[:3])  # source and unconditional rows untouched
    late = controller(p, is_cross=True, place="x.attn2", step=5)
    torch.testing.assert_close(late, p)
    self_probs = probs(keys=16, seed=1)
    torch.testing.assert_close(controller(self_probs, is_cross=False, place="x.attn1", step=1)[3], self_probs[2])
    torch.testing.assert_close(controller(self_probs, is_cross=False, place="x.attn1", step=2), self_probs)


def test_refine_keeps_the_new_tokens_own_maps():
    controller = PromptToPrompt(TOKENIZER, "a circle", "a red circle", num_steps=4, edit="refine",
                                latent_size=(4, 4))
    p = probs()
    out = controller(p, is_cross=True, place="x.attn2", step=0)
    torch.testing.assert_close(out[3, ..., 2], p[3, ..., 2])  # "red" is new: its own map
    torch.testing.assert_close(out[3, ..., 3], p[2, ..., 2])  # "circle" moved from position 2 to 3
    torch.testing.assert_close(out[3, ..., 1], p[2, ..., 1])  # "a"


def test_reweight_scales_the_chosen_word():
    controller = PromptToPrompt(TOKENIZER, "a red circle", "a red circle", num_steps=4, edit="reweight",
                                equalizer={"red": 3.0}, latent_size=(4, 4))
    p = probs()
    out = controller(p, is_cross=True, place="x.attn2", step=0)
    torch.testing.assert_close(out[3, ..., 2], 3 * p[2, ..., 2])
    torch.testing.assert_close(out[3, ..., 3], p[2, ..., 3])


def test_local_blend_keeps_the_source_outside_the_words_region():
    controller = PromptToPrompt(TOKENIZER, "a red circle", "a blue circle", num_steps=4, local_blend=["circle"],
                                latent_size=(4, 4))
    p = torch.full((4, 1, 16, 77), 1e-3)
    p[2:, :, 0, 3] = 1.0  # "circle" attends only to the top-left pixel
    controller(p, is_cross=True, place="x.attn2", step=0)
    mask = controller.blend_mask()[0, 0]
    assert mask[0, 0] == 1 and mask[3, 3] == 0
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    blended = controller.step_callback(0, 1.0, x, x)
    torch.testing.assert_close(blended[1, :, 3, 3], x[0, :, 3, 3])
    torch.testing.assert_close(blended[1, :, 0, 0], x[1, :, 0, 0])


@pytest.mark.parametrize("kwargs, message", [
    ({"prompts": ["a red circle", "a big red circle"]}, "use edit='refine'"),
    ({"local_blend": ["square"]}, "local_blend word 'square' is in neither prompt"),
    ({"edit": "swap"}, "unknown edit 'swap'"),
    ({"cross_replace_steps": 1.5}, "cross_replace_steps must be a fraction"),
    ({"prompts": ["only one"]}, "a list of two strings"),
    ({"edit": "reweight", "equalizer": {"red": float("nan")}}, r"equalizer weight of 'red' must be a number in \[0, 10\]"),
    ({"equalizer": {"red": 2.0}}, "equalizer weights are used by edit='reweight' only"),
    ({"edit": "reweight"}, "edit='reweight' needs equalizer"),
    ({"cross_replace_steps": "0.5"}, "cross_replace_steps must be a fraction"),
    ({"edit": "reweight", "equalizer": {"red": "2"}}, "equalizer weight of 'red' must be a number"),
])
def test_bad_edits_are_refused(tiny_model_factory, kwargs, message):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    prompts = kwargs.pop("prompts", ["a red circle", "a blue circle"])
    with pytest.raises(ValueError, match=message):
        pipe.prompt_to_prompt(prompts, seed=0, num_inference_steps=2, progress=False, **kwargs)


def test_a_generator_gives_both_rows_its_noise_as_a_seed_does(tiny_model_factory):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    settings = dict(num_inference_steps=3, sampler="ddim", output_type="latent", progress=False)
    seeded = pipe.prompt_to_prompt(["a red circle", "a blue circle"], seed=5, **settings).images
    generated = pipe.prompt_to_prompt(["a red circle", "a blue circle"], generator=torch.Generator().manual_seed(5),
                                      **settings).images
    torch.testing.assert_close(generated, seeded, atol=0, rtol=0)


def test_a_variation_seed_gives_both_rows_the_same_varied_noise(tiny_model_factory):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    settings = dict(seed=5, num_inference_steps=3, sampler="ddim", output_type="latent", progress=False,
                    variation_seed=8, variation_strength=0.5)
    out = pipe.prompt_to_prompt(["a red circle", "a blue circle"], cross_replace_steps=0.0, self_replace_steps=0.0,
                                **settings)
    for row, prompt in enumerate(["a red circle", "a blue circle"]):
        torch.testing.assert_close(out.images[row:row + 1], pipe(prompt, **settings).images, atol=1e-4, rtol=1e-4)
    assert [p["variation_seed"] for p in out.parameters] == [8, 8]


def test_without_control_the_edit_is_plain_generation_and_with_it_stays_near_the_source(tiny_model_factory):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    settings = dict(seed=3, num_inference_steps=8, sampler="ddim", output_type="latent", progress=False)
    source, free = pipe.prompt_to_prompt(["a red circle", "a blue circle"], cross_replace_steps=0.0,
                                         self_replace_steps=0.0, **settings).images
    plain_target = pipe("a blue circle", **settings).images[0]
    plain_source = pipe("a red circle", **settings).images[0]
    torch.testing.assert_close(free, plain_target, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(source, plain_source, atol=1e-4, rtol=1e-4)
    _, edited = pipe.prompt_to_prompt(["a red circle", "a blue circle"], cross_replace_steps=1.0,
                                      self_replace_steps=1.0, **settings).images
    assert (edited - source).norm() < (plain_target - source).norm()
    assert (edited - plain_target).abs().max() > 1e-3


@pytest.mark.parametrize("edit, source, target", [("replace", "a red circle", "a blue circle"),
                                                   ("refine", "a circle", "a red circle")])
def test_a_negative_prompt_longer_than_one_window_keeps_the_edit(tiny_model_factory, edit, source, target):
    """A negative prompt over 75 tokens pads every row to two windows of keys (154): the edit acts on the first
    window exactly as with 77 keys, and the edited row keeps its own attention on the second."""
    controller = PromptToPrompt(TOKENIZER, source, target, num_steps=4, edit=edit, latent_size=(4, 4))
    p = probs(keys=154)
    out = controller(p, is_cross=True, place="x.attn2", step=0)
    torch.testing.assert_close(out[3, ..., :77], controller(p[..., :77], is_cross=True, place="x.attn2", step=0)[3])
    torch.testing.assert_close(out[3, ..., 77:], p[3, ..., 77:])
    torch.testing.assert_close(out[:3], p[:3])
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    images = pipe.prompt_to_prompt([source, target], seed=3, num_inference_steps=2, negative_prompt="blurry " * 80,
                                   edit=edit, output_type="latent", progress=False).images
    assert images.shape[0] == 2 and torch.isfinite(images).all()


def test_local_blend_takes_one_word_as_a_string(tiny_model_factory):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    settings = dict(seed=2, num_inference_steps=3, sampler="ddim", output_type="latent", progress=False)
    as_list = pipe.prompt_to_prompt(["a red circle", "a blue circle"], local_blend=["circle"], **settings).images
    as_word = pipe.prompt_to_prompt(["a red circle", "a blue circle"], local_blend="circle", **settings).images
    torch.testing.assert_close(as_word, as_list, atol=0, rtol=0)


def test_attention_maps_give_one_normalised_map_per_word(tiny_model_factory):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    image, maps, grid = pipe.attention_maps("a red sksqzv circle", seed=0, num_inference_steps=3, progress=False)
    assert list(maps) == ["a", "red", "sksqzv", "circle"]
    assert all(m.shape == (8, 8) and abs(m.max().item() - 1) < 1e-6 and m.min() >= 0 for m in maps.values())
    assert grid.size == (16 * 5, 16) and image.size == (16, 16)
    with pytest.raises(ValueError, match="at most 75 tokens"):
        pipe.attention_maps("red " * 76, seed=0, num_inference_steps=2, progress=False)


@pytest.mark.parametrize("overrides", [{}, {"prediction_type": "v_prediction"}])
def test_editing_a_real_image_through_its_inversion(tiny_model_factory, overrides):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory(**overrides))
    image = pipe("a red circle", seed=0, num_inference_steps=4, progress=False).images[0]
    inversion = pipe.invert(image, "a red circle", num_inference_steps=6, progress=False)
    source, edited = pipe.edit(inversion, "a blue circle", output_type="latent", progress=False).images
    reconstructed = pipe.reconstruct(inversion, output_type="latent", progress=False).images[0]
    torch.testing.assert_close(source, reconstructed, atol=1e-4, rtol=1e-4)  # the source row is the reconstruction
    assert (edited - source).abs().max() > 1e-4
