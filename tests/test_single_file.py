"""Original-layout single files: our key map round-trips, agrees with diffusers' own single-file loader, loads
offline into a pipeline that generates exactly what the folder does, and refuses what it cannot read."""
import importlib

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from ldm.loading import ModelLoadError, load_components
from ldm.single_file import SingleFileError, detect_family, load_single_file, save_single_file
from pipelines.cli import main as ldm
from pipelines.text_to_image import TextToImagePipeline


@pytest.fixture(scope="module")
def single_file(tiny_model_factory, tmp_path_factory):
    folder = tiny_model_factory()
    path = tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors"
    return folder, save_single_file(load_components(folder), path)


def assert_same_weights(a, b):
    for first, second in ((a.unet, b.unet), (a.vae, b.vae), (a.text_encoder, b.text_encoder)):
        x, y = first.state_dict(), second.state_dict()
        assert set(x) == set(y)
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_file_has_the_original_layout_and_round_trips(single_file):
    folder, path = single_file
    keys = set(load_file(str(path)))
    for key in ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.output_blocks.1.1.conv.weight", "model.diffusion_model.middle_block.2.emb_layers.1.weight",
                "first_stage_model.decoder.up.0.block.1.conv2.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight"):
        assert key in keys, key
    assert detect_family(keys) == "sd1"
    assert_same_weights(load_single_file(path, config=folder), load_components(folder))


def test_diffusers_single_file_loader_reads_our_file_the_same(single_file):
    folder, path = single_file
    theirs = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    assert_same_weights(theirs, load_components(folder))


def test_single_file_pipeline_generates_what_the_folder_does(single_file):
    folder, path = single_file
    settings = dict(num_inference_steps=4, seed=3, output_type="latent", progress=False)
    from_file = TextToImagePipeline.from_pretrained(path, config=folder)("a red circle", **settings).images
    assert torch.equal(from_file, TextToImagePipeline.from_pretrained(folder)("a red circle", **settings).images)


def test_cli_converts_both_ways(single_file, tmp_path):
    folder, path = single_file
    assert ldm(["convert", str(path), str(tmp_path / "folder"), "--config", str(folder)]) == 0
    assert ldm(["convert", str(tmp_path / "folder"), str(tmp_path / "again.safetensors")]) == 0
    first, second = load_file(str(path)), load_file(str(tmp_path / "again.safetensors"))
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    assert ldm(["convert", str(path), str(tmp_path / "folder")]) == 2  # exists: nothing overwritten


def test_a_convert_that_fails_midway_leaves_nothing(single_file, tmp_path, monkeypatch):
    single_file_module = importlib.import_module("ldm.single_file")  # (`ldm` here is the CLI entry point)
    folder, path = single_file
    real_save_folder = single_file_module.save_folder

    def fail_after_writing(components, target):
        real_save_folder(components, target)
        raise ValueError("disk full (simulated)")

    monkeypatch.setattr(single_file_module, "save_folder", fail_after_writing)
    assert ldm(["convert", str(path), str(tmp_path / "out"), "--config", str(folder)]) == 2
    assert list(tmp_path.iterdir()) == []  # neither the target nor a partial folder


def test_other_families_and_bad_files_are_refused(single_file, tmp_path):
    folder, path = single_file
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1)},
              str(tmp_path / "sd3-part.safetensors"))
    with pytest.raises(SingleFileError, match="the MMDiT lacks model.diffusion_model.x_embedder.proj.weight"):
        load_single_file(tmp_path / "sd3-part.safetensors")
    save_file({"foo.bar": torch.zeros(1)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(SingleFileError, match="unknown checkpoint layout.*foo.bar"):
        load_single_file(tmp_path / "odd.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="truncated or not safetensors"):
        load_single_file(tmp_path / "cut.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_single_file(tmp_path / "model.ckpt")
    tensors = load_file(str(path))
    key = "first_stage_model.decoder.conv_in.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0] * 2, *tensors[key].shape[1:])  # a VAE of another model
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(SingleFileError, match=r"decoder.conv_in.weight has shape \(128,.*expects \(64,"):
        load_single_file(tmp_path / "mixed.safetensors", config=folder)
    with pytest.raises(SingleFileError, match="has shape"):  # the tiny file against SD 1.5's shipped configs
        load_single_file(path)


def test_sd2_file_with_openclip_text_tower(tmp_path):
    from pipelines.random_models import save_random_model

    folder = save_random_model(tmp_path / "tiny-sd2", "tiny-sd2", {"prediction_type": "v_prediction"})
    path = save_single_file(load_components(folder), tmp_path / "tiny-sd2-768-v.safetensors")
    keys = set(load_file(str(path)))
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert detect_family(keys) == "sd2"
    ours = load_single_file(path, config=folder)
    assert_same_weights(ours, load_components(folder))
    assert ours.tokenizer.pad_token == "!" and ours.scheduler_config["prediction_type"] == "v_prediction"
    theirs = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    assert_same_weights(theirs, load_components(folder))


def test_sd2_prediction_from_the_file_name():
    from ldm.configs import family_configs, sd2_prediction

    assert sd2_prediction("v2-1_768-ema-pruned.safetensors") == "v_prediction"
    assert sd2_prediction("sd-2-base-v.safetensors") == "v_prediction"
    assert sd2_prediction("v2-1_512-ema-pruned.safetensors") == "epsilon"
    unet, vae, _, _ = family_configs("sd2", "v2-1_768-ema-pruned.safetensors")
    assert unet["sample_size"] == 96 and vae["sample_size"] == 768


def test_sdxl_file_with_two_text_towers(tmp_path):
    from pipelines.random_models import save_random_sdxl

    folder = save_random_sdxl(tmp_path / "tiny-sdxl")
    path = save_single_file(load_components(folder), tmp_path / "tiny-sdxl.safetensors")
    keys = set(load_file(str(path)))
    for key in ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
                "conditioner.embedders.1.model.text_projection", "model.diffusion_model.label_emb.0.2.weight",
                "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"):
        assert key in keys, key
    assert detect_family(keys) == "sdxl"
    ours = load_single_file(path, config=folder)
    assert_same_weights(ours, load_components(folder))
    folder_2 = load_components(folder).text_encoder_2.state_dict()
    assert all(torch.equal(v, folder_2[k]) for k, v in ours.text_encoder_2.state_dict().items())
    from diffusers import StableDiffusionXLPipeline

    theirs = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    assert_same_weights(theirs, load_components(folder))  # UNet (label_emb), VAE, CLIP-L
    # diffusers 0.42 with transformers 5 leaves its own bigG tower unloaded here (text_projection stays on the meta
    # device), so the OpenCLIP map is checked against diffusers by the SD 2.x test, which shares it.
    settings = dict(num_inference_steps=3, seed=1, output_type="latent", progress=False)
    from_file = TextToImagePipeline.from_pretrained(path, config=folder)
    assert from_file.is_sdxl
    assert torch.equal(from_file("a red circle", **settings).images,
                       TextToImagePipeline.from_pretrained(folder)("a red circle", **settings).images)


def test_sd3_file_round_trips_and_diffusers_reads_it_the_same(tmp_path):
    """An SD3 model written in Stability's layout (fused qkv, (shift, scale) adaLN halves, text towers under
    text_encoders.*) loads back to the same tensors, is read the same by diffusers' own single-file loader, and
    generates what the folder does; ``ldm convert`` goes both ways."""
    from diffusers import StableDiffusion3Pipeline

    from pipelines.random_models import save_random_sd3

    folder = save_random_sd3(tmp_path / "tiny-sd3")
    path = save_single_file(load_components(folder), tmp_path / "tiny-sd3.safetensors")
    keys = set(load_file(str(path)))
    for key in ("model.diffusion_model.joint_blocks.1.context_block.attn.qkv.weight",
                "model.diffusion_model.final_layer.adaLN_modulation.1.weight", "model.diffusion_model.pos_embed",
                "text_encoders.clip_g.transformer.text_projection.weight",
                "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
                "first_stage_model.encoder.mid.attn_1.q.weight"):
        assert key in keys, key
    assert detect_family(keys) == "sd3"
    folder_components = load_components(folder)
    ours = load_single_file(path, config=folder)
    assert_same_weights(ours, folder_components)
    second = ours.text_encoder_2.state_dict()
    assert all(torch.equal(v, second[k]) for k, v in folder_components.text_encoder_2.state_dict().items())
    theirs = StableDiffusion3Pipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                       text_encoder_3=None, tokenizer_3=None)
    for a, b in ((theirs.transformer, folder_components.unet), (theirs.vae, folder_components.vae),
                 (theirs.text_encoder, folder_components.text_encoder)):
        x, y = a.state_dict(), b.state_dict()
        assert set(x) == set(y)
        # SD3 files hold no projection for CLIP-L and diffusers then uses the identity (we write ours, and read the
        # identity when it is absent); diffusers 0.42 with transformers 5 leaves its CLIP-G unloaded (see SDXL).
        assert all(torch.equal(x[k], y[k]) for k in x if k != "text_projection.weight")
    without = {k: v for k, v in load_file(str(path)).items() if k != "text_encoders.clip_l.transformer.text_projection.weight"}
    save_file(without, str(tmp_path / "no-projection.safetensors"))
    tower = load_single_file(tmp_path / "no-projection.safetensors", config=folder).text_encoder
    assert torch.equal(tower.text_projection.weight, torch.eye(32))
    settings = dict(num_inference_steps=3, seed=1, output_type="latent", progress=False)
    assert torch.equal(TextToImagePipeline.from_pretrained(path, config=folder)("a red circle", **settings).images,
                       TextToImagePipeline.from_pretrained(folder)("a red circle", **settings).images)
    assert ldm(["convert", str(path), str(tmp_path / "back"), "--config", str(folder)]) == 0
    assert ldm(["convert", str(tmp_path / "back"), str(tmp_path / "again.safetensors")]) == 0
    first, again = load_file(str(path)), load_file(str(tmp_path / "again.safetensors"))
    assert set(first) == set(again) and all(torch.equal(first[k], again[k]) for k in first)


def test_mmdit_sizes_are_read_from_the_file():
    """SD3.5-style options (qk RMS norm, a dual-attention block) and the sizes come back from the tensors alone."""
    from diffusers import SD3Transformer2DModel

    from ldm.single_file import mmdit_config, mmdit_from_original, mmdit_to_original

    config = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                  num_attention_heads=2, joint_attention_dim=96, caption_projection_dim=128,
                  pooled_projection_dim=48, out_channels=16, pos_embed_max_size=24, qk_norm="rms_norm",
                  dual_attention_layers=(0,))
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**config)
    tensors = mmdit_to_original(model)
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in tensors
    assert mmdit_config(tensors) == {**config, "dual_attention_layers": [0]}
    state = mmdit_from_original(tensors, model.config, "file")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
