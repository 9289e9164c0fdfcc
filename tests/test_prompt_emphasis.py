"""A1111 prompt syntax: emphasis ``(word:1.2)`` parsed as the web UI documents it, weighted token windows, the
mean-keeping reweighting, ``AND`` between weighted sub-prompts (composable diffusion), and the pipeline's
``emphasis="a1111"`` (which changes nothing for prompts without that syntax)."""
import pytest
import torch

from ldm.guidance import CFGDenoiser, rescale_guidance
from ldm.text import (BREAK, emphasize, load_tokenizer, parse_emphasis, plain_text, prompt_schedule, split_conjunction,
                      token_windows, tokenize_weighted_batch, weighted_token_windows)
from ldm.prompt_to_prompt import AttentionStore
from pipelines.metadata import format_parameters, parse_parameters
from pipelines.random_models import save_random_sdxl
from pipelines.text_to_image import TextToImagePipeline


@pytest.mark.parametrize("text, pieces", [  # the A1111 web UI's own documented examples (prompt_parser.py)
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("a red BREAK blue", [("a red", 1.0), ("BREAK", BREAK), ("blue", 1.0)]),
    ("(a BREAK b:2)", [("a", 2.0), ("BREAK", BREAK), ("b", 2.0)]),
    ("", [("", 1.0)]),
])
def test_parses_the_web_uis_examples(text, pieces):
    got = parse_emphasis(text)
    assert [t for t, _ in got] == [t for t, _ in pieces]
    assert [w for _, w in got] == pytest.approx([w for _, w in pieces])


def test_plain_text_drops_the_syntax():
    assert plain_text("a (((house:1.3)) [on] a (hill:0.5), sun BREAK (((sky))).") == "a house on a hill, sun sky."


def test_weighted_windows_carry_each_tokens_weight():
    tokenizer = load_tokenizer()
    ids, weights = weighted_token_windows(tokenizer, "a (red:1.5) [circle]")
    assert ids == token_windows(tokenizer, "a red circle")
    red, circle = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("red", "circle"))
    row = ids[0]
    expected = [1.5 if t == red else 1 / 1.1 if t == circle else 1.0 for t in row]
    assert weights[0] == pytest.approx(expected) and len(weights[0]) == 77
    two, _ = weighted_token_windows(tokenizer, "a red BREAK blue")
    assert two == token_windows(tokenizer, "a red") + token_windows(tokenizer, "blue")
    long = "a red circle, " * 30  # 120 tokens: two windows, as without emphasis
    assert weighted_token_windows(tokenizer, long)[0] == token_windows(tokenizer, long)
    batch_ids, batch_weights = tokenize_weighted_batch(tokenizer, ["a (red)", long])
    assert batch_ids.shape == batch_weights.shape == (2, 2, 77) and (batch_weights[0, 1] == 1).all()


def test_emphasis_keeps_each_windows_mean_and_scales_tokens_relatively():
    hidden = torch.rand(2, 2 * 5, 3, generator=torch.Generator().manual_seed(0)) + 0.5  # (B, W * L, D)
    weights = torch.ones(2, 2, 5)
    weights[0, 0, 2] = 2.0
    out = emphasize(hidden, weights)
    windows = hidden.reshape(2, 2, 5, 3)
    result = out.reshape(2, 2, 5, 3)
    torch.testing.assert_close(result.mean(dim=(2, 3)), windows.mean(dim=(2, 3)))
    scale = result[0, 0, 0] / windows[0, 0, 0]
    torch.testing.assert_close(result[0, 0, 2] / windows[0, 0, 2], 2 * scale)
    assert torch.equal(result[1], windows[1]) and torch.equal(result[0, 1], windows[0, 1])  # unweighted windows


def test_a_window_whose_states_average_to_zero_is_not_divided_by_zero():
    hidden = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])  # (1, 2 tokens, 2): mean 0
    out = emphasize(hidden, torch.tensor([[[1.0, 1.2]]]))
    assert torch.equal(out, torch.tensor([[[1.0, -1.0], [2.4, -2.4]]]))


def test_pipeline_weighs_the_prompt_and_leaves_plain_prompts_alone(tiny_model_factory):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    plain_cond, plain_uncond = pipe.encode_prompt(["a red circle"], ["blue"])
    same_cond, same_uncond = pipe.encode_prompt(["a red circle"], ["blue"], emphasis="a1111")
    assert torch.equal(same_cond, plain_cond) and torch.equal(same_uncond, plain_uncond)
    cond, uncond = pipe.encode_prompt(["a (red:1.5) circle"], ["blue"], emphasis="a1111")
    _, weights = tokenize_weighted_batch(pipe.tokenizer, ["a (red:1.5) circle"])
    torch.testing.assert_close(cond, emphasize(plain_cond, weights))
    assert torch.equal(uncond, plain_uncond) and (cond - plain_cond).abs().max() > 1e-3
    literal, _ = pipe.encode_prompt(["a (red:1.5) circle"], ["blue"])  # emphasis "none": brackets are text
    assert literal.shape == plain_cond.shape and (literal - plain_cond).abs().max() > 1e-3
    out = pipe("a (red:1.5) circle", emphasis="a1111", num_inference_steps=2, seed=0, progress=False)
    assert parse_parameters(format_parameters(out.parameters[0]))["emphasis"] == "a1111"
    with pytest.raises(ValueError, match="unknown emphasis 'compel'; known: none, a1111"):
        pipe("x", emphasis="compel", progress=False)
    with pytest.raises(ValueError, match="read prompts literally"):
        pipe.prompt_to_prompt(["a red circle", "a blue circle"], emphasis="a1111", progress=False)


def test_sdxl_weighs_both_towers_but_not_the_pooled_embedding(tmp_path):
    pipe = TextToImagePipeline.from_pretrained(save_random_sdxl(tmp_path / "sdxl"))
    plain, _ = pipe.encode_prompt(["a red circle"], ["dark"])
    cond, _ = pipe.encode_prompt(["a (red:1.5) circle"], ["dark"], emphasis="a1111")
    _, weights = tokenize_weighted_batch(pipe.tokenizer, ["a (red:1.5) circle"])
    width = pipe.text_encoder.config.hidden_size
    for tower in (slice(0, width), slice(width, None)):
        torch.testing.assert_close(cond["hidden"][..., tower], emphasize(plain["hidden"][..., tower], weights))
    assert torch.equal(cond["text_embeds"], plain["text_embeds"])


@pytest.mark.parametrize("prompt, parts", [
    ("a red circle AND a blue square", [("a red circle", 1.0), ("a blue square", 1.0)]),
    ("a cat:1.5 AND a dog : .5 AND sky:-0.3", [("a cat", 1.5), ("a dog", 0.5), ("sky", -0.3)]),
    ("cat:2.", [("cat", 2.0)]),
    ("a (red:1.2) circle", [("a (red:1.2) circle", 1.0)]),  # a bracketed weight is emphasis
    ("BANDANA and ANDROID", [("BANDANA and ANDROID", 1.0)]),  # only the upper-case word
    ("x AND", [("x", 1.0), ("", 1.0)]),
    ("a poster, 16:9", [("a poster, 16", 9.0)]),  # the web UI reads any trailing number so
])
def test_splits_sub_prompts_as_the_web_ui(prompt, parts):
    assert split_conjunction(prompt) == parts


def test_composed_guidance_is_the_weighted_sum_of_each_parts_difference(tiny_model_factory):
    """Liu et al. 2022, eq. 10 with the web UI's weights: u + w sum_k a_k (c_k - u), per image, at every scale w."""
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    denoiser = pipe.denoiser()
    cond, uncond = pipe.encode_prompt(["a red circle", "a square", "a blue", ""], ["", "dark"])  # (K * B = 2 * 2)
    weights = torch.tensor([[1.0, 0.5], [2.0, 0.0]])  # (B, K)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([3.0, 3.0])
    outputs = [denoiser.model_output(x, sigma, c) for c in (uncond, cond[:2], cond[2:])]
    u, c1, c2 = outputs
    composed = u + weights[:, 0, None, None, None] * (c1 - u) + weights[:, 1, None, None, None] * (c2 - u)
    for scale in (7.5, 1.0, 0.5):  # the web UI's formula at every scale
        got = CFGDenoiser(denoiser, cond, uncond, scale, part_weights=weights)(x, sigma)
        expected = denoiser.to_x0(x, sigma, u + scale * (composed - u))
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)  # batched passes round differently
    rescaled = CFGDenoiser(denoiser, cond, uncond, 7.5, rescale=0.7, part_weights=weights)(x, sigma)
    expected = denoiser.to_x0(x, sigma, rescale_guidance(u + 7.5 * (composed - u), composed, 0.7))
    torch.testing.assert_close(rescaled, expected, atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match=r"need 4 conditioning rows and 2 unconditional ones, got 2 and 2"):
        CFGDenoiser(denoiser, cond[:2], uncond, 7.5, part_weights=weights)
    with pytest.raises(ValueError, match="finite"):
        CFGDenoiser(denoiser, cond, uncond, 7.5, part_weights=torch.tensor([[1.0, float("inf")], [1.0, 1.0]]))
    plain = CFGDenoiser(denoiser, cond[:2], uncond, 7.5)(x, sigma)
    one_part = CFGDenoiser(denoiser, cond[:2], uncond, 7.5, part_weights=torch.ones(2, 1))(x, sigma)
    torch.testing.assert_close(one_part, plain, atol=1e-5, rtol=1e-5)


def test_pipeline_composes_and_prompts_only_in_a1111_syntax(tiny_model_factory):
    """"p AND p" (and "p:2") at guidance 3 is "p" at guidance 6; a shorter prompt in the batch is padded without
    effect; with emphasis "none" AND is a word of the prompt."""
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    run = dict(num_inference_steps=3, sampler="euler", output_type="latent", progress=False, seed=5)
    single = pipe("a red circle", guidance_scale=6.0, **run).images
    for prompt in ("a red circle AND a red circle", "a red circle:2"):
        composed = pipe(prompt, guidance_scale=3.0, emphasis="a1111", **run).images
        torch.testing.assert_close(composed, single, atol=1e-4, rtol=1e-4)
    batch = pipe(["a blue square AND a red circle:0.5", "a green triangle"], emphasis="a1111", **run).images
    alone = pipe("a green triangle", **{**run, "seed": 6}).images
    torch.testing.assert_close(batch[1:], alone, atol=1e-4, rtol=1e-4)
    literal = pipe("a red circle AND a red circle", guidance_scale=3.0, **run).images
    assert (literal - single).abs().max() > 1e-3
    negative = dict(guidance_scale=3.0, negative_prompt="a blue square AND dark:2", **run)
    torch.testing.assert_close(pipe("a red circle", emphasis="a1111", **negative).images,
                               pipe("a red circle", **negative).images)  # the negative prompt stays literal
    with pytest.raises(ValueError, match="sub-prompt weight must be finite"):
        pipe("a red circle:" + "9" * 400, emphasis="a1111", **run)
    with pytest.raises(ValueError, match="attention controllers"), pipe.controlled(AttentionStore()):
        pipe("a red circle AND a blue square", emphasis="a1111", **run)


def test_flow_mmdit_composes_dict_conditionings(tmp_path):
    """SD3's conditioning (states and pooled projections) composes the same way under the flow schedule."""
    from pipelines.random_models import save_random_sd3

    pipe = TextToImagePipeline.from_pretrained(save_random_sd3(tmp_path / "sd3"))
    run = dict(num_inference_steps=2, sampler="euler", output_type="latent", progress=False, seed=5)
    single = pipe("a red circle", guidance_scale=6.0, **run).images
    composed = pipe("a red circle AND a red circle", guidance_scale=3.0, emphasis="a1111", **run).images
    torch.testing.assert_close(composed, single, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt, schedule", [  # the web UI's documented parses (modules/prompt_parser.py), 10 steps
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("a [{b|d{:.5] c", [(5, "a  c"), (10, "a {b|d{ c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(k, "a" if k % 2 else "(b:1.1)") for k in range(1, 11)]),
    ("[fe|]male", [(k, "female" if k % 2 else "male") for k in range(1, 11)]),
    ("[fe|||]male", [(k, "female" if k % 4 == 1 else "male") for k in range(1, 11)]),
])
def test_prompt_editing_schedules_as_the_web_ui(prompt, schedule):
    assert prompt_schedule(prompt, 10) == schedule


def test_prompt_editing_in_a_hires_pass_counts_from_the_first_pass():
    assert prompt_schedule("a [b:.5] c", 10, first_pass_steps=10) == [(10, "a b c")]  # the web UI's examples
    assert prompt_schedule("a [b:1.5] c", 10, first_pass_steps=10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("a [b:25] c", 10, first_pass_steps=20) == [(5, "a  c"), (10, "a b c")]
    long = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
            "[ in background:0.25] [shoddy:masterful:0.5]")
    assert [step for step, _ in prompt_schedule(long, 100)] == [25, 50, 60, 75, 100]
    assert prompt_schedule(long, 100)[2][1] == ("fantasy landscape with a lake and an oak in foreground in "
                                               "background masterful")


def test_prompt_editing_switches_the_conditioning_after_its_step(tiny_model_factory):
    """"[A:B:3]" over 6 steps: sampler steps 0-3 see A and 4-5 see B (the web UI's counter), which is the
    sampler run on A to sigma 4 and continued on B; and the negative prompt is edited the same way."""
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    settings = dict(num_inference_steps=6, sampler="euler", seed=3, guidance_scale=4.0, output_type="latent")
    edited = pipe("[a red circle:a blue square:3]", negative_prompt="[dark:light:3]", emphasis="a1111",
                  progress=False, **settings).images
    first = pipe.prepare("a red circle", negative_prompt="dark", **settings)
    second = pipe.prepare("a blue square", negative_prompt="light", **settings)
    sigmas = pipe.sigmas(6, "euler", first.spacing)
    denoiser = pipe.denoiser("euler", first.spacing)
    x = pipe.initial_noise(first) * denoiser.noise_scale(sigmas[0])
    x = pipe.denoise(first, denoiser, x, sigmas[:5], progress=False)
    x = pipe.denoise(second, denoiser, x, sigmas[4:], progress=False, first_step=4)
    torch.testing.assert_close(edited, denoiser.to_model_space(x, float(sigmas[-1])), atol=1e-5, rtol=1e-5)
    plain = pipe("[a red circle:a blue square:3]", progress=False, **settings).images  # emphasis "none"
    assert (plain - edited).abs().max() > 1e-3
    whole = pipe("[a red circle:a blue square:6]", emphasis="a1111", progress=False, **settings).images
    torch.testing.assert_close(whole, pipe("a red circle", progress=False, **settings).images)
