"""Textual-inversion embeddings (``pipe.load_textual_inversion``): an embedding made of a word's own token vectors
draws exactly what the word draws; loaded files equal diffusers' ``load_textual_inversion`` on SD 1.x and SDXL;
unloading restores the model; files that do not fit are refused and change nothing."""
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import save_file

from ldm.prompt_to_prompt import token_positions
from ldm.text import prompt_token_ids
from pipelines.cli import main
from pipelines.embeddings import EmbeddingError
from pipelines.metadata import parse_parameters
from pipelines.random_models import save_random_sd3, save_random_sdxl, save_random_sdxl_refiner
from pipelines.text_to_image import TextToImagePipeline

SETTINGS = dict(num_inference_steps=4, guidance_scale=5.0, output_type="latent", progress=False)


def latents(seed=0):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def word_vectors(tokenizer, encoder, words: str) -> torch.Tensor:
    """The token-embedding rows of ``words`` ``(n, D)``: an embedding that must act exactly as the words do."""
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    return encoder.get_input_embeddings().weight[ids].detach().clone()


def random_vectors(count, width, seed):
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return save_random_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.mark.parametrize("layout", ["diffusers", "a1111"])
def test_an_embedding_of_a_words_vectors_draws_that_word(tiny_model_factory, tmp_path, layout):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    vectors = word_vectors(pipe.tokenizer, pipe.text_encoder, "red circle")  # (2, D): a two-vector embedding
    path = tmp_path / "redcircle.safetensors"
    save_file({"<rc>": vectors} if layout == "diffusers" else {"emb_params": vectors}, str(path))
    word = pipe.load_textual_inversion(path)
    assert word == ("<rc>" if layout == "diffusers" else "redcircle") and pipe.embeddings == {word: 2}
    for prompt, emphasis in [("a {} at the top left", "none"), ("a ({}:1.3) at the top left", "a1111")]:
        ours = pipe(prompt.format(word), negative_prompt=f"a blue {word}", latents=latents(), emphasis=emphasis,
                    **SETTINGS).images
        words = pipe(prompt.format("red circle"), negative_prompt="a blue red circle", latents=latents(),
                     emphasis=emphasis, **SETTINGS).images
        torch.testing.assert_close(ours, words, atol=0, rtol=0)
    assert token_positions(pipe.tokenizer, f"a {word} at the top", word) == [2, 3]  # both vectors, for P2P
    first = pipe.tokenizer.convert_tokens_to_ids(word)
    assert first in prompt_token_ids(pipe.tokenizer, f"a {word}, a") and \
        first not in prompt_token_ids(pipe.tokenizer, f"a {word}s")  # whole words only


def test_matches_diffusers_load_textual_inversion(tiny_model_factory, tmp_path):
    folder = tiny_model_factory()
    ours = TextToImagePipeline.from_pretrained(folder)
    width = ours.text_encoder.get_input_embeddings().weight.shape[1]
    style, negative = tmp_path / "learned_embeds.safetensors", tmp_path / "negemb.safetensors"
    save_file({"<style>": random_vectors(3, width, 1)}, str(style))
    save_file({"emb_params": random_vectors(1, width, 2)}, str(negative))
    ours.load_textual_inversion(style)
    ours.load_textual_inversion(negative)
    theirs = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_textual_inversion(str(style))
    theirs.load_textual_inversion(str(negative), token="negemb")  # diffusers reads emb_params as a token name
    prompt, negative_prompt = "a <style> red circle at the top left", "negemb, blurry"
    mine = ours(prompt, negative_prompt=negative_prompt, latents=latents(), sampler="ddim", **SETTINGS).images
    reference = theirs(prompt, negative_prompt=negative_prompt, latents=latents(), num_inference_steps=4,
                       guidance_scale=5.0, output_type="latent").images
    without = ours("a red circle at the top left", negative_prompt="blurry", latents=latents(), sampler="ddim",
                   **SETTINGS).images
    assert (reference - without).abs().max() > 1e-3  # the embeddings matter
    torch.testing.assert_close(mine, reference, atol=1e-4 * max(1.0, float(reference.abs().max())), rtol=0)


def test_sdxl_embedding_fills_both_towers_as_diffusers_does(sdxl, tmp_path):
    ours = TextToImagePipeline.from_pretrained(sdxl)
    widths = [t.get_input_embeddings().weight.shape[1] for t in (ours.text_encoder, ours.text_encoder_2)]
    tensors = {"clip_l": random_vectors(2, widths[0], 3), "clip_g": random_vectors(2, widths[1], 4)}
    path = tmp_path / "sdxlstyle.safetensors"
    save_file(tensors, str(path))
    assert ours.load_textual_inversion(path) == "sdxlstyle"
    theirs = StableDiffusionXLPipeline.from_pretrained(sdxl, local_files_only=True)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_textual_inversion(tensors["clip_l"], token="sdxlstyle", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(tensors["clip_g"], token="sdxlstyle", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    prompt = "a sdxlstyle red circle"
    mine = ours(prompt, latents=latents(), sampler="ddim", **SETTINGS).images
    reference = theirs(prompt, latents=latents(), num_inference_steps=4, guidance_scale=5.0,
                       output_type="latent").images
    torch.testing.assert_close(mine, reference, atol=1e-4 * max(1.0, float(reference.abs().max())), rtol=0)


def test_legacy_clip_configs_pool_at_the_end_of_text_token(sdxl, tmp_path):
    """CLIP configs from before transformers PR #24773 (eos_token_id = 2) pool at the largest token id, an added
    token's once one is loaded; we pool at the end-of-text token, so a word's own vectors give the word's pooled
    embedding."""
    pipe = TextToImagePipeline.from_pretrained(sdxl)
    for module in pipe.text_encoder_2.modules():
        if hasattr(module, "eos_token_id"):
            module.eos_token_id = 2
    pipe.text_encoder_2.config.eos_token_id = 2
    save_file({key: word_vectors(tokenizer, encoder, "red") for key, tokenizer, encoder in pipe.embedding_towers()},
              str(tmp_path / "myred.safetensors"))
    pipe.load_textual_inversion(tmp_path / "myred.safetensors")
    embedded, _ = pipe.encode_prompt(["a myred circle"], [""])
    words, _ = pipe.encode_prompt(["a red circle"], [""])
    torch.testing.assert_close(embedded["text_embeds"], words["text_embeds"], atol=0, rtol=0)
    torch.testing.assert_close(embedded["hidden"], words["hidden"], atol=0, rtol=0)


def test_sd3_clip_towers_read_sdxl_files(tmp_path):
    pipe = TextToImagePipeline.from_pretrained(save_random_sd3(tmp_path / "sd3"))
    save_file({key: word_vectors(tokenizer, encoder, "red") for key, tokenizer, encoder in pipe.embedding_towers()},
              str(tmp_path / "myred.safetensors"))
    pipe.load_textual_inversion(tmp_path / "myred.safetensors")
    settings = dict(latents=latents(), **SETTINGS)
    torch.testing.assert_close(pipe("a myred circle", **settings).images, pipe("a red circle", **settings).images,
                               atol=0, rtol=0)


def test_unloading_restores_the_model_and_keeps_the_others(tiny_model_factory, tmp_path):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    table = pipe.text_encoder.get_input_embeddings().weight.clone()
    size = len(pipe.tokenizer)
    width = table.shape[1]
    for name, seed in (("ti_one", 5), ("ti_two", 6)):
        save_file({"emb_params": random_vectors(2, width, seed)}, str(tmp_path / f"{name}.safetensors"))
        pipe.load_textual_inversion(tmp_path / f"{name}.safetensors")
    both = pipe("ti_one ti_two", latents=latents(), **SETTINGS).images
    pipe.unload_textual_inversion("ti_one")
    assert pipe.embeddings == {"ti_two": 2} and len(pipe.tokenizer) == size + 2
    pipe.load_textual_inversion(tmp_path / "ti_one.safetensors")
    torch.testing.assert_close(pipe("ti_one ti_two", latents=latents(), **SETTINGS).images, both, atol=0, rtol=0)
    pipe.unload_textual_inversion()
    assert pipe.embeddings == {} and len(pipe.tokenizer) == size
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)


def test_bad_embedding_files_are_refused_and_change_nothing(tiny_model_factory, sdxl, tmp_path):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    size, rows = len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().weight.shape[0]
    pickled = tmp_path / "oldemb.pt"
    torch.save({"string_to_param": {"*": random_vectors(1, width, 7)}, "name": "x"}, pickled)
    cases = {
        "pickle": (pickled, "is a pickle file"),
        "width": ({"emb_params": random_vectors(1, width + 1, 0)}, f"have width {width + 1}"),
        "sdxl file": ({"clip_l": random_vectors(1, width, 0), "clip_g": random_vectors(1, 8, 0)},
                      "this model has one CLIP text encoder"),
        "layout": ({"a": random_vectors(1, width, 0), "b": random_vectors(1, width, 0)}, "unrecognised embedding"),
        "nan": ({"emb_params": torch.full((1, width), float("nan"))}, "NaN"),
        "vocabulary": ({"red": random_vectors(1, width, 0)}, "'red' is already a token"),
    }
    for name, (contents, message) in cases.items():
        path = contents if isinstance(contents, type(tmp_path)) else tmp_path / f"{name}.safetensors"
        if not isinstance(contents, type(tmp_path)):
            save_file(contents, str(path))
        with pytest.raises(EmbeddingError, match=message):
            pipe.load_textual_inversion(path)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "width.safetensors").read_bytes()[:40])
    with pytest.raises(EmbeddingError, match="cannot read embedding file"):
        pipe.load_textual_inversion(tmp_path / "cut.safetensors")
    assert pipe.embeddings == {} and len(pipe.tokenizer) == size
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == rows
    assert pipe.load_textual_inversion(pickled, allow_pickle=True) == "oldemb"  # A1111 .pt: the file's name
    with pytest.raises(EmbeddingError, match="already a token"):
        pipe.load_textual_inversion(pickled, allow_pickle=True)
    with pytest.raises(EmbeddingError, match="need clip_l and clip_g vectors"):
        TextToImagePipeline.from_pretrained(sdxl).load_textual_inversion(tmp_path / "width.safetensors")


def test_cli_loads_embeddings_and_records_them(tiny_model_factory, tmp_path):
    folder = tiny_model_factory()
    pipe = TextToImagePipeline.from_pretrained(folder)
    save_file({"emb_params": word_vectors(pipe.tokenizer, pipe.text_encoder, "red")}, str(tmp_path / "e.safetensors"))
    outputs = []
    for prompt, extra in (("a mycolor circle", ["--embedding", f"{tmp_path / 'e.safetensors'}:mycolor"]),
                          ("a red circle", [])):
        outputs.append(tmp_path / f"{len(outputs)}.png")
        assert main(["generate", prompt, "-o", str(outputs[-1]), "--model", str(folder), "--seed", "1",
                     "--steps", "2"] + extra) == 0
    assert parse_parameters(Image.open(outputs[0]).info["parameters"])["embeddings"] == "mycolor"
    assert Image.open(outputs[0]).tobytes() == Image.open(outputs[1]).tobytes()


def test_ambiguous_names_are_refused_whatever_their_case(tiny_model_factory):
    """Multi-vector words are found by diffusers' names (``w``, ``w_1`` ...), and the tokenizer ignores case: a
    word that would make an existing word's vectors ambiguous, or that differs from a loaded one only in case, is
    refused."""
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    pipe.add_textual_inversion("<qq>_1", random_vectors(1, width, 0))
    with pytest.raises(EmbeddingError, match="'<qq>_1' is already a token"):
        pipe.add_textual_inversion("<qq>", random_vectors(2, width, 1))
    pipe.add_textual_inversion("EasyNeg", random_vectors(3, width, 2))
    with pytest.raises(EmbeddingError, match="'easyneg' is already a token .*loaded"):
        pipe.add_textual_inversion("easyneg", random_vectors(1, width, 3))
    with pytest.raises(EmbeddingError, match="'easyneg' is already a token"):
        pipe.add_textual_inversion("EasyNeg_7", random_vectors(1, width, 3))
    assert pipe.embeddings == {"<qq>_1": 1, "EasyNeg": 3}
    assert prompt_token_ids(pipe.tokenizer, "a <qq>_1") == prompt_token_ids(pipe.tokenizer, "a")[:1] + [
        pipe.tokenizer.convert_tokens_to_ids("<qq>_1")]
    assert token_positions(pipe.tokenizer, "a EasyNeg dog", "EasyNeg") == [2, 3, 4]  # prompt-to-prompt's words


def test_a_multi_vector_word_is_never_split_between_windows(tiny_model_factory):
    """Past 75 tokens prompts are encoded in windows (the web UI's rule); like the web UI, an embedding that does
    not fit in what is left of a window moves whole to the next one, with and without emphasis syntax."""
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    pipe.add_textual_inversion("EasyNeg", random_vectors(8, pipe.text_encoder.get_input_embeddings().weight.shape[1],
                                                         0))
    first = pipe.tokenizer.convert_tokens_to_ids("EasyNeg")
    prompt = "a " * 70 + "EasyNeg, cat"
    for emphasis in ("none", "a1111"):
        ids, _ = pipe.tokenize(pipe.tokenizer, [prompt], emphasis)  # (1, W, 77)
        assert ids.shape[1] == 2 and first not in ids[0, 0].tolist()
        assert ids[0, 1, 1:9].tolist() == list(range(first, first + 8))


def test_a1111_pickles_that_require_grad_leave_the_tables_frozen_leaves(tiny_model_factory, tmp_path):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    torch.save({"string_to_param": {"*": random_vectors(2, width, 0).requires_grad_()}}, tmp_path / "pickled.pt")
    pipe.load_textual_inversion(tmp_path / "pickled.pt", allow_pickle=True)
    table = pipe.text_encoder.get_input_embeddings().weight
    assert table.is_leaf and not table.requires_grad
    pipe.text_encoder.requires_grad_(False)  # what load_lora does; fails on a non-leaf table


def test_the_sdxl_refiner_reads_the_clip_g_vectors(tmp_path):
    """SDXL's refiner has only the second tower (its one tokenizer serves both names): an SDXL file's clip_g
    vectors are what it reads, and unloading keeps the two names on one tokenizer."""
    pipe = TextToImagePipeline.from_pretrained(save_random_sdxl_refiner(tmp_path / "refiner"))
    [(key, tokenizer, encoder)] = pipe.embedding_towers()
    assert key == "clip_g" and pipe.tokenizer is pipe.tokenizer_2
    save_file({"clip_l": random_vectors(1, 768, 0), "clip_g": word_vectors(tokenizer, encoder, "red")},
              str(tmp_path / "myred.safetensors"))
    pipe.load_textual_inversion(tmp_path / "myred.safetensors")
    embedded, _ = pipe.encode_prompt(["a myred circle"], [""])
    words, _ = pipe.encode_prompt(["a red circle"], [""])
    torch.testing.assert_close(embedded["hidden"], words["hidden"], atol=0, rtol=0)
    pipe.unload_textual_inversion()
    assert pipe.tokenizer is pipe.tokenizer_2 and pipe.embeddings == {}
