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


def _add_t5(folder, seed):
    """Give a tiny SD3 folder a tiny T5 encoder and a word-level T5 tokenizer (built offline)."""
    import json

    import transformers
    from tokenizers import Tokenizer, models as token_models, pre_tokenizers

    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    transformers.T5EncoderModel(config).save_pretrained(folder / "text_encoder_3")
    words = Tokenizer(token_models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(folder / "tokenizer_3")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder_3=["transformers", "T5EncoderModel"], tokenizer_3=["transformers", "T5TokenizerFast"])
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_the_output_dtype_is_the_inputs_stored_one_unless_chosen(models, tmp_path):
    """float16 inputs give a float16 merge (computed in float32, rounded once); --dtype overrides; inputs stored
    in different dtypes give float32."""
    a16 = save_random_model(tmp_path / "a16", "tiny", seed=0, dtype=torch.float16)
    b16 = save_random_model(tmp_path / "b16", "tiny", seed=1, dtype=torch.float16)
    half = merge_models(a16, b16, tmp_path / "half", alpha=0.25)
    wide = merge_models(a16, b16, tmp_path / "wide", alpha=0.25, dtype="float32")
    mixed = merge_models(a16, models["b"], tmp_path / "mixed", alpha=0.25)
    for network in FILES:
        ta, tb = tensors(a16, network), tensors(b16, network)
        th, tw, tm = tensors(half, network), tensors(wide, network), tensors(mixed, network)
        floating = [k for k in ta if ta[k].is_floating_point()]
        assert {th[k].dtype for k in floating} == {torch.float16}
        assert {tw[k].dtype for k in floating} == {tm[k].dtype for k in floating} == {torch.float32}
        for key in floating:
            exact = ta[key].float() * 0.75 + tb[key].float() * 0.25
            assert torch.equal(tw[key], exact) and torch.equal(th[key], exact.half())


def test_single_files_declare_v_prediction_and_zero_terminal_snr(models, tmp_path):
    """A v-prediction zero-SNR model written as one file carries ComfyUI's markers and the SAI model spec's field,
    and loads back as v-prediction with zero terminal SNR (the configs given for the tiny sizes say epsilon);
    an epsilon model's file declares epsilon."""
    from safetensors import safe_open

    from ldm.loading import load_components

    zero_snr = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    v_model = save_random_model(tmp_path / "v", "tiny", scheduler=zero_snr, seed=3)
    v_file = merge_models(v_model, models["a"], tmp_path / "v.safetensors", alpha=0.1)
    eps_file = merge_models(models["a"], v_model, tmp_path / "eps.SAFETENSORS", alpha=0.1)  # any case: a file
    for path, marked, spec in ((v_file, {"v_pred", "ztsnr"}, "v"), (eps_file, set(), "epsilon")):
        with safe_open(str(path), "pt") as handle:
            assert marked == {"v_pred", "ztsnr"} & set(handle.keys())
            assert handle.metadata()["modelspec.prediction_type"] == spec
    loaded = load_components(v_file, config=models["a"]).scheduler_config
    assert (loaded["prediction_type"], loaded["rescale_betas_zero_snr"], loaded["timestep_spacing"]) == \
        ("v_prediction", True, "trailing")
    assert load_components(eps_file, config=v_model).scheduler_config["prediction_type"] == "epsilon"


def test_refiners_and_sd3_with_t5_merge_whole(tmp_path, capsys):
    """SDXL refiners (second tower only) merge into a refiner folder (a single file is refused before anything is
    written); SD3 models with a T5 keep the merged T5 in a folder and in a single file (tied embeddings once)."""
    from safetensors import safe_open

    from ldm.loading import load_components
    from pipelines.random_models import save_random_sd3, save_random_sdxl_refiner

    r1, r2 = save_random_sdxl_refiner(tmp_path / "r1", seed=1), save_random_sdxl_refiner(tmp_path / "r2", seed=2)
    refiner = load_components(merge_models(r1, r2, tmp_path / "refiner", alpha=0.5))
    assert refiner.text_encoder is None and refiner.requires_aesthetics_score
    want = {k: (x + y) / 2 for (k, x), (y) in zip(load_components(r1).unet.state_dict().items(),
                                                    load_components(r2).unet.state_dict().values())}
    assert all(torch.equal(refiner.unet.state_dict()[k], v) for k, v in want.items())
    assert main(["merge", str(r1), str(r2), "-o", str(tmp_path / "refiner.safetensors")]) == 2
    assert "refiner is written as a diffusers folder only" in capsys.readouterr().err

    a, b = (_add_t5(save_random_sd3(tmp_path / name, seed=seed), seed) for name, seed in (("a", 0), ("b", 1)))
    t5s = [load_components(p).text_encoder_3.state_dict() for p in (a, b)]
    folder = load_components(merge_models(a, b, tmp_path / "sd3", alpha=0.25))
    single = merge_models(a, b, tmp_path / "sd3.safetensors", alpha=0.25)
    with safe_open(str(single), "pt") as handle:
        assert "text_encoders.t5xxl.transformer.shared.weight" in handle.keys()
        assert "text_encoders.t5xxl.transformer.encoder.embed_tokens.weight" not in handle.keys()
    from_file = load_components(single, config=a)
    for merged in (folder, from_file):
        got = merged.text_encoder_3.state_dict()
        assert all(torch.equal(got[k], t5s[0][k] * 0.75 + t5s[1][k] * 0.25) for k in t5s[0])


def test_pickles_are_refused_whatever_the_suffix_says(models, tmp_path):
    """A pickle is read only when allowed, whatever the case of its suffix; a file of an unknown suffix is never
    unpickled; merges are not written as pickles."""
    from ldm.loading import ModelLoadError
    from ldm.single_file import read_state_dict

    state = {"x": torch.zeros(2)}
    torch.save(state, tmp_path / "model.CKPT")
    torch.save(state, tmp_path / "model.weights")
    with pytest.raises(ModelLoadError, match="is a pickle checkpoint"):
        read_state_dict(tmp_path / "model.CKPT")
    assert torch.equal(read_state_dict(tmp_path / "model.CKPT", allow_pickle=True)["x"], state["x"])
    with pytest.raises(ModelLoadError, match="cannot read .*not safetensors"):
        read_state_dict(tmp_path / "model.weights", allow_pickle=True)
    with pytest.raises(MergeError, match="not a pickle"):
        merge_models(models["a"], models["b"], tmp_path / "merged.ckpt")
    assert not (tmp_path / "merged.ckpt").exists()
