"""Smoke-scale checks of the training recipes on tiny models and tiny renders (train/).

What is checked: the v-prediction training target agrees with the inference-time denoiser; the VAE and the
denoiser overfit a fixed small batch; a run interrupted half-way and resumed equals the straight run; a
checkpoint of another model config is refused; bad inputs fail clearly; the whole default recipe (at tiny
scale) assembles a float16 diffusers folder that StableDiffusionPipeline and ldm.text load offline.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from train import common, default_model, train_denoiser, train_mmdit, train_text_encoder, train_vae

FAST = ["--mixed-precision", "no", "--log-every", "1"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("LDM_NO_PROGRESS", "1")


def vae_args(out, *extra):
    return ["--output-dir", str(out), "--preset", "tiny", "--image-size", "16", "--crop-size", "8",
            "--batch-size", "4", "--eval-images", "8", "--scale-images", "16", *FAST, *extra]


def text_args(out, *extra):
    return ["--output-dir", str(out), "--preset", "tiny", "--batch-size", "8", "--eval-images", "8", *FAST, *extra]


def denoiser_args(out, vae_dir, text_dir, *extra):
    return ["--output-dir", str(out), "--preset", "tiny", "--vae", str(vae_dir), "--text-encoder",
            str(text_dir / "text_encoder"), "--tokenizer", str(text_dir / "tokenizer"), "--image-size", "16",
            "--num-images", "16", "--caption-variants", "2", "--batch-size", "8", "--sample-steps", "2", *FAST,
            *extra]


def mmdit_args(out, vae_dir, text_dir, *extra):
    return ["--output-dir", str(out), "--preset", "tiny", "--vae", str(vae_dir), "--clip", str(text_dir / "clip"),
            "--tokenizer", str(text_dir / "tokenizer"), "--image-size", "16", "--num-images", "16",
            "--caption-variants", "2", "--batch-size", "8", "--sample-steps", "2", *FAST, *extra]


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """A tiny VAE and text encoder trained for two steps each (inputs of the denoiser). The VAE's posterior std
    is then set to ~1e-3 (and the scaling factor to 1 / std of the means): a two-step VAE's latents are almost
    pure posterior noise, which would leave the denoiser nothing to learn in the overfitting test."""
    from diffusers import AutoencoderKL

    from train.shapes import ShapesDataset

    root = tmp_path_factory.mktemp("components")
    train_vae.run(vae_args(root / "vae", "--steps", "2"))
    train_text_encoder.run(text_args(root / "text", "--steps", "2"))
    vae = AutoencoderKL.from_pretrained(str(root / "vae" / "final"))
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.bias[channels:] = -14.0
        images = torch.stack([ShapesDataset(16, 0, 16)[i]["image"] for i in range(16)])
        mean = vae.encode(images).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / mean.std()))
    vae.save_pretrained(str(root / "vae" / "final"))
    return root / "vae" / "final", root / "text" / "final"


def test_v_target_matches_the_inference_denoiser():
    """x_t and v built for training, fed to ldm's v-prediction Denoiser (VE view x = x_t / sqrt(ab), sigma =
    sqrt((1 - ab) / ab)) with a network that returns the true v, give back x0 and the training timestep."""
    from ldm.denoiser import Denoiser
    from ldm.schedules import DiscreteSchedule

    schedule = DiscreteSchedule.from_config(train_denoiser.SCHEDULE_CONFIG)
    ab = train_denoiser.alphas_cumprod()
    assert ab[-1] == pytest.approx(2.0**-24)  # zero terminal SNR, clipped like diffusers
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 17, 500, 998])
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    x_t, v = train_denoiser.add_noise(x0, noise, ab[t])
    sigma = ((1 - ab[t]) / ab[t]).sqrt()
    denoiser = Denoiser(lambda x_in, timestep, cond: v, schedule, "v_prediction")
    x_ve = x_t / ab[t].sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(denoiser(x_ve, sigma, None), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(denoiser.timestep(sigma), t.float(), atol=1e-3, rtol=0)
    torch.testing.assert_close(denoiser.model_output(x_ve, sigma, None), v)  # the network saw x_t


def test_flow_target_matches_the_inference_denoiser():
    """x_t and the velocity built for training, fed to ldm's flow Denoiser (VE view x = x_t / (1 - t), sigma =
    t / (1 - t)) with a network that returns the true velocity, give back x0 and the training timestep 1000 t;
    the logit-normal times have the median sigmoid(m)."""
    from ldm.denoiser import Denoiser
    from ldm.schedules import FlowSchedule

    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.01, 0.3, 0.5, 0.97])
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    x_t, v = train_mmdit.flow_pair(x0, noise, t)
    sigma = t / (1 - t)
    denoiser = Denoiser(lambda x_in, timestep, cond: v, FlowSchedule(shift=train_mmdit.FLOW_SHIFT), "flow")
    x_ve = x_t / (1 - t).view(-1, 1, 1, 1)
    torch.testing.assert_close(denoiser(x_ve, sigma, None), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(denoiser.timestep(sigma), 1000 * t, atol=1e-3, rtol=0)
    torch.testing.assert_close(denoiser.model_output(x_ve, sigma, None), v)
    times = train_mmdit.logit_normal_times(20000, 1.0, 0.5, torch.Generator().manual_seed(0))
    assert 0 < times.min() and times.max() < 1
    assert times.median().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.01)


def test_min_snr_weights_equal_the_capped_x0_weight():
    """The v loss weighted by loss_weights equals the x0 loss weighted by min(SNR + 1, gamma) (Min-SNR-gamma in its
    SNR + 1 form), checked on explicit x0 errors; the zero-SNR step keeps weight 1."""
    ab = train_denoiser.alphas_cumprod()
    t = torch.tensor([0, 100, 400, 700, 999])
    g = torch.Generator().manual_seed(0)
    x0, noise, x0_hat = (torch.randn(5, 4, 8, 8, generator=g) for _ in range(3))
    a, s = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
    x_t, v = train_denoiser.add_noise(x0, noise, ab[t])
    v_hat = (a * x_t - x0_hat) / s  # the v whose implied x0 = a x_t - s v is x0_hat
    v_loss = (v_hat - v).square().mean(dim=(1, 2, 3))
    x0_loss = (x0_hat - x0).square().mean(dim=(1, 2, 3))
    snr = ab[t] / (1 - ab[t])
    for gamma in (1.0, 5.0):
        weighted = v_loss * common.loss_weights(ab[t], "min_snr", gamma)
        torch.testing.assert_close(weighted, x0_loss * (snr + 1).clamp(max=gamma), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(common.loss_weights(ab[t], "uniform"), torch.ones(5))
    weights = common.loss_weights(ab[t], "min_snr", 5.0)
    assert weights[-1] == pytest.approx(1.0, abs=1e-6) and weights[0] < 0.01  # zero SNR kept, clean inputs capped


def test_text_encoder_trains_on_a_short_window_without_changing_what_captions_see():
    """The causal text tower gives the first L positions the same hidden states with or without the padding after
    them, so training on L positions is exact; captions longer than L are refused."""
    from ldm.text import load_tokenizer

    clip = train_text_encoder.build_clip(train_text_encoder.PRESETS["tiny"], seed=0, eager_attention=True)
    text = train_text_encoder.text_model_from_clip(clip)
    tokenizer = load_tokenizer()
    captions = ["a red circle at the top left", "a blue square above a small green triangle on black"]
    full = train_text_encoder.CaptionTokens(tokenizer)(captions)  # (2, 77)
    short = train_text_encoder.CaptionTokens(tokenizer, 16)(captions)  # (2, 16)
    assert full.shape == (2, 77) and short.shape == (2, 16)
    with torch.no_grad():
        torch.testing.assert_close(text(short)[0], text(full)[0][:, :16], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(text(short)[1], text(full)[1], atol=1e-5, rtol=1e-5)  # pooled (EOS) state
    with pytest.raises(ValueError, match="longer than --context-length 8"):
        train_text_encoder.CaptionTokens(tokenizer, 8)(captions)


def test_auto_precision_is_bf16_only_where_the_cpu_has_it_and_it_is_faster(monkeypatch):
    from train import common

    assert common.cpu_has_native_bf16("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni")
    assert common.cpu_has_native_bf16("flags\t\t: fpu sse2 avx2 amx_bf16 amx_tile")
    assert not common.cpu_has_native_bf16("flags\t\t: fpu sse2 avx2 fma avx512f avx512bw")
    assert common.resolve_precision("fp16") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for native, speedup, expected in ((True, 5.0, "bf16"), (True, 0.5, "no"), (False, 5.0, "no")):
        monkeypatch.setattr(common, "cpu_has_native_bf16", lambda cpuinfo=None, native=native: native)
        monkeypatch.setattr(common, "cpu_bf16_speedup", lambda speedup=speedup: speedup)
        assert common.resolve_precision("auto") == expected


def test_cpu_bf16_speedup_is_a_measured_positive_ratio():
    """The measurement runs both dtypes and returns their time ratio (cached: the second call is the same)."""
    from train import common

    common.cpu_bf16_speedup.cache_clear()
    ratio = common.cpu_bf16_speedup(size=64, repeats=2)
    assert math.isfinite(ratio) and ratio > 0
    assert common.cpu_bf16_speedup(size=64, repeats=2) == ratio


def test_vae_crops_show_an_object_and_weight_its_pixels():
    """Object crops contain the chosen object's centre in their middle half; pixel weights are 1 + W on and
    next to objects (by the renderer's own masks) and 1 on the background away from them."""
    import numpy as np

    from train.shapes import Scene, make_object, render, render_masks

    scenes = [Scene("gray", (make_object("red", "circle", "top left", "small"),
                             make_object("blue", "square", "bottom right", "large"))),
              Scene("white", (make_object("yellow", "triangle", "center", "small"),))]
    rng = np.random.default_rng(0)
    for _ in range(20):
        for scene, (top, left) in zip(scenes, train_vae.object_crop_offsets(rng, scenes, 128, 64)):
            assert 0 <= top <= 64 and 0 <= left <= 64
            assert any(top <= obj.center[1] < top + 64 and left <= obj.center[0] < left + 64 for obj in scene.objects)
    image = torch.from_numpy(np.array(render(scenes[0]))).permute(2, 0, 1).float()[None] / 127.5 - 1
    weights = train_vae.pixel_weights(image, 10.0)[0, 0]  # (H, W)
    masks = torch.from_numpy(render_masks(scenes[0]).any(0))
    assert (weights[masks] == 11.0).all()
    far = ~torch.nn.functional.max_pool2d(masks[None, None].float(), 9, 1, 4)[0, 0].bool()
    assert (weights[far] == 1.0).all() and far.sum() > 0.8 * far.numel()


def _first_last(losses, k=4):
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def test_vae_overfits_a_fixed_batch(tmp_path):
    result = train_vae.run(vae_args(tmp_path, "--steps", "20", "--num-images", "4", "--crop-size", "0",
                                     "--lr", "3e-3", "--warmup", "0", "--sample-every", "0", "--eval-images", "0"))
    first, last = _first_last(result["losses"])
    assert last < 0.75 * first, result["losses"]
    assert (tmp_path / "samples" / "step-0000020.png").is_file()
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert config["scaling_factor"] == pytest.approx(metrics["scaling_factor"])
    assert config["scaling_factor"] != pytest.approx(0.18215)


def test_denoiser_overfits_a_fixed_batch(tmp_path, components):
    vae_dir, text_dir = components
    result = train_denoiser.run(denoiser_args(tmp_path, vae_dir, text_dir, "--steps", "20", "--num-images", "4",
                                               "--batch-size", "32", "--lr", "2e-3", "--warmup", "0",
                                               "--sample-every", "0"))
    first, last = _first_last(result["losses"])
    assert last < 0.75 * first, result["losses"]
    assert (tmp_path / "samples" / "step-0000020.png").is_file()


def test_denoiser_starts_from_an_init_unet_and_refuses_a_mismatched_one(tmp_path, components):
    """``--init-unet`` continues from a saved UNet (not the seeded init); another architecture is refused."""
    from diffusers import UNet2DConditionModel

    vae_dir, text_dir = components
    # One step at lr 1e-30 moves no float32 weight (far below an ulp): the saved UNet must be the init exactly.
    init = train_denoiser.run(denoiser_args(tmp_path / "a", vae_dir, text_dir, "--steps", "2", "--seed", "5",
                                            "--sample-every", "0", "--lr", "1e-2", "--warmup", "0"))
    init_dir = init["final_dir"] / "unet"
    started = train_denoiser.run(denoiser_args(tmp_path / "b", vae_dir, text_dir, "--steps", "1", "--seed", "0",
                                               "--sample-every", "0", "--lr", "1e-30", "--ema-decay", "0",
                                               "--init-unet", str(init_dir)))
    fresh = train_denoiser.run(denoiser_args(tmp_path / "c", vae_dir, text_dir, "--steps", "1", "--seed", "0",
                                             "--sample-every", "0", "--lr", "1e-30", "--ema-decay", "0"))
    want = UNet2DConditionModel.from_pretrained(str(init_dir)).state_dict()
    got = UNet2DConditionModel.from_pretrained(str(started["final_dir"] / "unet")).state_dict()
    seeded = UNet2DConditionModel.from_pretrained(str(fresh["final_dir"] / "unet")).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not all(torch.equal(seeded[k], want[k]) for k in want)

    other = tmp_path / "other.json"
    other.write_text(json.dumps({**train_denoiser.PRESETS["tiny"], "block_out_channels": [32, 32]}))
    with pytest.raises(ValueError, match="--init-unet .* does not match the UNet config .*block_out_channels"):
        train_denoiser.run(denoiser_args(tmp_path / "d", vae_dir, text_dir, "--steps", "1", "--model-config",
                                         str(other), "--init-unet", str(init_dir)))


def test_drop_color_prob_leaves_colour_words_out_of_cached_captions(tmp_path, components):
    """``--drop-color-prob 1`` caches only colourless captions of the same scenes; 0 keeps the dataset's own."""
    from ldm.text import load_tokenizer
    from train.shapes import OBJECT_COLORS, ShapesDataset, parse_prompt

    vae_dir, text_dir = components
    tokenizer = load_tokenizer(text_dir / "tokenizer")
    vae, _, _ = train_denoiser.load_components(train_denoiser.build_parser().parse_args(
        denoiser_args(tmp_path, vae_dir, text_dir)))
    dataset = ShapesDataset(6, 0, 16, "train")
    for probability in (0.0, 1.0):
        args = train_denoiser.build_parser().parse_args(denoiser_args(
            tmp_path, vae_dir, text_dir, "--num-images", "6", "--data-seed", "0", "--drop-color-prob",
            str(probability)))
        cache = train_denoiser.build_latent_cache(args, vae, tokenizer, contextlib.nullcontext,
                                                  torch.device("cpu"))
        for i in range(6):
            texts = tokenizer.batch_decode(cache["ids"][i].long(), skip_special_tokens=True)  # (variants,)
            scene = dataset[i]["scene"]
            for text in texts:
                parsed = parse_prompt(text)
                assert [o.shape for o in parsed.objects] == [o.shape for o in scene.objects], text
                has_colour = any(colour in text.split() for colour in OBJECT_COLORS)
                assert has_colour == (probability == 0.0), text
            if probability == 0.0:
                assert texts[0].replace(" ", "") == dataset[i]["caption"].lower().replace(" ", "")
    with pytest.raises(ValueError, match="--drop-color-prob must be in"):
        train_denoiser.run(denoiser_args(tmp_path / "bad", vae_dir, text_dir, "--drop-color-prob", "nan"))
    with pytest.raises(ValueError, match="--one-object-prob must be in"):
        train_denoiser.run(denoiser_args(tmp_path / "bad", vae_dir, text_dir, "--one-object-prob", "-0.2"))
    assert not (tmp_path / "bad").exists()


def test_render_workers_build_the_same_latent_cache(tmp_path, components):
    """Renders made by worker processes are the ones this process makes, in the same order."""
    from ldm.text import load_tokenizer

    vae_dir, text_dir = components
    tokenizer = load_tokenizer(text_dir / "tokenizer")
    vae, _, _ = train_denoiser.load_components(train_denoiser.build_parser().parse_args(
        denoiser_args(tmp_path, vae_dir, text_dir)))
    caches = [train_denoiser.build_latent_cache(train_denoiser.build_parser().parse_args(denoiser_args(
        tmp_path, vae_dir, text_dir, "--num-images", "20", "--data-seed", "0", "--drop-color-prob", "0.5",
        "--render-workers", workers)),
        vae, tokenizer, contextlib.nullcontext, torch.device("cpu")) for workers in ("0", "2")]
    assert caches[0]["mean"].shape[0] == 20
    for key in ("mean", "std", "ids"):
        assert torch.equal(caches[0][key], caches[1][key]), key


def test_cached_text_states_train_as_the_encoder_run_in_every_step(tmp_path, components):
    vae_dir, text_dir = components
    runs = {mode: train_denoiser.run(denoiser_args(tmp_path / mode, vae_dir, text_dir, "--steps", "3",
                                                   "--sample-every", "0", "--uncond-prob", "0.5",
                                                   "--text-states", mode))["losses"]
            for mode in train_denoiser.TEXT_STATES}
    cached, on_the_fly = (torch.tensor(runs[mode]) for mode in train_denoiser.TEXT_STATES)
    assert torch.allclose(cached, on_the_fly, rtol=1e-4, atol=0), runs


def test_mmdit_overfits_a_fixed_batch_and_ships_a_folder_diffusers_loads(tmp_path, components):
    """The MMDiT recipe learns (loss falls on 4 images); its StableDiffusion3Pipeline folder loads in diffusers
    and in our pipeline, which agree on the same noise."""
    from diffusers import StableDiffusion3Pipeline

    from pipelines.text_to_image import TextToImagePipeline

    vae_dir, text_dir = components
    result = train_mmdit.run(mmdit_args(tmp_path / "run", vae_dir, text_dir, "--steps", "20", "--num-images", "4",
                                        "--batch-size", "32", "--lr", "2e-3", "--warmup", "0", "--sample-every",
                                        "0"))
    first, last = _first_last(result["losses"])
    assert last < 0.75 * first, result["losses"]
    report = train_mmdit.assemble(tmp_path / "run" / "final", vae_dir, text_dir / "tokenizer", tmp_path / "model",
                                  dtype=torch.float32, verify=False)
    assert report["total_bytes"] == default_model.common.folder_size(tmp_path / "model")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "model")
    assert pipe.is_mmdit and pipe.is_flow
    side = 16 // pipe.vae_scale_factor
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    settings = dict(latents=latents, num_inference_steps=4, guidance_scale=3.0, output_type="latent", height=16,
                    width=16)
    ours = pipe("a red circle", sampler="flow_euler", progress=False, **settings).images
    theirs_pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "model", local_files_only=True,
                                                           text_encoder_3=None, tokenizer_3=None)
    theirs_pipe.set_progress_bar_config(disable=True)
    theirs = theirs_pipe("a red circle", **settings).images
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, float(theirs.abs().max())), rtol=0)

    # Continuing from the shipped folder (its transformer, and its CLIPTextModelWithProjection as --clip): one
    # step at lr 1e-30 moves no float32 weight, so the saved transformer is the shipped one exactly.
    from diffusers import SD3Transformer2DModel

    shipped = tmp_path / "model"
    resumed = train_mmdit.run(mmdit_args(tmp_path / "more", vae_dir, text_dir, "--steps", "1", "--num-images", "4",
                                         "--lr", "1e-30", "--ema-decay", "0", "--sample-every", "0",
                                         "--clip", str(shipped / "text_encoder"),
                                         "--init-transformer", str(shipped / "transformer")))
    want = SD3Transformer2DModel.from_pretrained(str(shipped / "transformer")).state_dict()
    got = SD3Transformer2DModel.from_pretrained(str(resumed["final_dir"] / "transformer")).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**train_mmdit.PRESETS["tiny"], "num_layers": 2}))
    with pytest.raises(ValueError, match="--init-transformer .* does not match the MMDiT config .*num_layers"):
        train_mmdit.run(mmdit_args(tmp_path / "other", vae_dir, text_dir, "--steps", "1", "--num-images", "4",
                                   "--model-config", str(other), "--init-transformer", str(shipped / "transformer")))


def _recipe_runs(name, components):
    vae_dir, text_dir = components
    return {
        "vae": (train_vae.run, lambda out, *x: vae_args(out, *x), ["model"]),
        "text": (train_text_encoder.run, lambda out, *x: text_args(out, *x), ["model"]),
        "denoiser": (train_denoiser.run, lambda out, *x: denoiser_args(out, vae_dir, text_dir, *x),
                     ["model", "ema"]),
        "mmdit": (train_mmdit.run, lambda out, *x: mmdit_args(out, vae_dir, text_dir, *x), ["model", "ema"]),
    }[name]


@pytest.mark.parametrize("recipe,precision", [("vae", "no"), ("text", "no"), ("denoiser", "no"),
                                              ("denoiser", "bf16"), ("mmdit", "no")])
def test_resume_equals_the_straight_run(tmp_path, components, recipe, precision):
    run, make_args, names = _recipe_runs(recipe, components)
    # (a later --mixed-precision overrides the one in FAST)
    flags = ["--steps", "4", "--warmup", "2", "--sample-every", "0", "--checkpoint-every", "0",
             "--mixed-precision", precision]
    run(make_args(tmp_path / "straight", *flags))
    first = run(make_args(tmp_path / "split", *flags, "--stop-after", "2"))
    assert not first["finished"] and not (tmp_path / "split" / "final").exists()
    second = run(make_args(tmp_path / "split", *flags, "--resume", "latest"))
    assert second["start_step"] == 2 and len(second["losses"]) == 2
    halfway = load_file(str(tmp_path / "split" / "checkpoints" / "step-0000002" / "model.safetensors"))
    for name in names:
        a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-0000004" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "split" / "checkpoints" / "step-0000004" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-7, rtol=1e-6, msg=f"{name}.{key}")
    final = load_file(str(tmp_path / "straight" / "checkpoints" / "step-0000004" / "model.safetensors"))
    assert any(not torch.equal(final[k], halfway[k]) for k in final)  # the last two steps did change weights


def test_latest_checkpoint_skips_one_left_half_written(tmp_path):
    from train.common import find_checkpoint

    for name in ("step-0000002", "step-0000004.tmp", "step-0000006"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000002" / "state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-0000004.tmp" / "state.json").write_text("{}")  # a crash while renaming
    # step-0000006 has no state.json yet (state.json is written last)
    assert find_checkpoint(tmp_path, "latest").name == "step-0000002"


def test_resume_from_another_model_config_is_refused(tmp_path):
    train_vae.run(vae_args(tmp_path, "--steps", "2", "--stop-after", "1"))
    other = dict(train_vae.PRESETS["tiny"], block_out_channels=[8, 8])
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"different model config \(block_out_channels"):
        train_vae.run(vae_args(tmp_path, "--steps", "2", "--resume", "latest", "--model-config",
                                str(tmp_path / "other.json")))
    with pytest.raises(ValueError, match="recipe 'vae', not 'text-encoder'"):
        train_text_encoder.run(text_args(tmp_path / "t", "--steps", "2", "--resume",
                                          str(tmp_path / "checkpoints" / "step-0000001")))
    # pickled files of a checkpoint are read with weights_only=True: an arbitrary object is refused, not run
    torch.save({"state": {}, "param_groups": [], "hook": argparse.Namespace()},
               tmp_path / "checkpoints" / "step-0000001" / "optimizer.pt")
    with pytest.raises(ValueError, match=r"refusing to unpickle .*optimizer\.pt"):
        train_vae.run(vae_args(tmp_path, "--steps", "2", "--resume", "latest"))


def test_bad_inputs_fail_clearly(tmp_path, components):
    vae_dir, text_dir = components
    with pytest.raises(ValueError, match="multiple of 8"):
        train_vae.run(vae_args(tmp_path, "--steps", "1", "--image-size", "20"))
    with pytest.raises(ValueError, match="--crop-size"):
        train_vae.run(vae_args(tmp_path, "--steps", "1", "--crop-size", "32"))
    with pytest.raises(SystemExit):  # argparse: the seed must be an integer >= 0
        train_vae.run(vae_args(tmp_path, "--steps", "1", "--data-seed", "-3"))
    with pytest.raises(FileNotFoundError, match="--resume"):
        train_vae.run(vae_args(tmp_path, "--steps", "1", "--resume", str(tmp_path / "nowhere")))
    train_vae.run(vae_args(tmp_path / "run", "--steps", "1", "--eval-images", "0"))
    with pytest.raises(ValueError, match="already holds checkpoints"):  # a fresh start would mix two runs
        train_vae.run(vae_args(tmp_path / "run", "--steps", "1"))
    with pytest.raises(FileNotFoundError, match="--vae folder"):
        train_denoiser.run(denoiser_args(tmp_path, tmp_path / "missing", text_dir, "--steps", "1"))
    empty = tmp_path / "empty_vae"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        train_denoiser.run(denoiser_args(tmp_path, empty, text_dir, "--steps", "1"))
    with pytest.raises(FileNotFoundError, match="text encoder folder"):
        default_model.assemble(vae_dir, tmp_path / "nope", vae_dir, tmp_path / "out")
    with pytest.raises(ValueError, match="--drop-color-prob must be in"):  # refused before the VAE stage starts
        default_model.run(["--work-dir", str(tmp_path / "whole"), "--output", str(tmp_path / "out"),
                           "--drop-color-prob", "1.5"])
    assert not (tmp_path / "whole").exists()


def test_default_recipe_assembles_a_diffusers_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    from ldm.text import load_tokenizer

    out = tmp_path / "shapes"
    report = default_model.run([
        "--work-dir", str(tmp_path / "work"), "--output", str(out), "--preset", "tiny", "--image-size", "16",
        "--crop-size", "8", "--vae-steps", "2", "--vae-batch-size", "4", "--text-steps", "2",
        "--text-batch-size", "8", "--denoiser-steps", "2", "--denoiser-batch-size", "4", "--num-images", "8",
        "--drop-color-prob", "0.5", "--one-object-prob", "0.25", "--mixed-precision", "no", "--sample-every", "0"])
    assert report["total_bytes"] <= default_model.MAX_BYTES
    with safe_open(str(tmp_path / "work" / "unet" / "latents.safetensors"), "pt") as f:  # the flags reached the stage
        meta = json.loads(f.metadata()["meta"])
        assert meta["drop_color_prob"] == 0.5 and meta["one_object_prob"] == 0.25
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert {k: scheduler[k] for k in default_model.SCHEDULER_CONFIG} == default_model.SCHEDULER_CONFIG
    for sub, file in [("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                      ("text_encoder", "model.safetensors")]:
        with safe_open(str(out / sub / file), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, sub
            if sub == "text_encoder":
                assert all(k.startswith("text_model.") for k in f.keys())
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))

    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float32
    image = pipe("a red circle on a white background", num_inference_steps=2, height=16, width=16,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(image)).all()
    half = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True, torch_dtype=torch.float16)
    assert half.unet.dtype == half.text_encoder.dtype == torch.float16

    tokenizer = load_tokenizer(out / "tokenizer")
    prompt = "a blue square above a green triangle on black"
    assert tokenizer(prompt).input_ids == load_tokenizer()(prompt).input_ids
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.model_max_length == 77

    # Re-running the same command skips the stages that finished with the requested step count.
    assert set(json.loads((tmp_path / "work" / "timings.json").read_text())) == {"vae", "text", "unet"}
    assert default_model._stage_done(tmp_path / "work" / "unet", 2)
    assert not default_model._stage_done(tmp_path / "work" / "unet", 3)


def test_ldm_train_runs_a_recipe(tmp_path, capsys):
    from pipelines.cli import main as ldm

    assert ldm(["train", "vae", *vae_args(tmp_path / "run", "--steps", "1", "--eval-images", "0")]) == 0
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert ldm(["train", "vae", *vae_args(tmp_path / "bad", "--steps", "1", "--image-size", "20")]) != 0
    assert "multiple of 8" in capsys.readouterr().err


def test_gpu_session_fits_its_steps_to_the_probed_rate_and_writes_a_loadable_sharded_unet(tmp_path, components):
    """train.gpu_session at tiny scale: the main run gets the steps the probe's rate allows in the time left,
    the assembled model's UNet comes back in float16 shards under --max-shard-mb that diffusers loads as saved."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from train import gpu_session

    vae_dir, text_dir = components
    model = tmp_path / "components"
    model.mkdir()
    for name, source in (("vae", vae_dir), ("text_encoder", text_dir / "text_encoder"),
                         ("tokenizer", text_dir / "tokenizer")):
        (model / name).symlink_to(source)
    settings = dict(seconds=40.0, reserve=30.0)
    report = gpu_session.run(["--output-dir", str(tmp_path / "out"), "--model", str(model), "--preset", "tiny",
                              "--image-size", "16", "--num-images", "16", "--batch-size", "8", "--probe-steps", "3",
                              "--render-workers", "0", "--mixed-precision", "no", "--eval-seeds", "0",
                              "--max-shard-mb", "0.5", "--seconds", str(settings["seconds"]),
                              "--reserve", str(settings["reserve"])])
    left = settings["seconds"] - report["probe"]["seconds"] - settings["reserve"]
    assert report["main"]["steps"] == gpu_session.planned_steps(report["probe"]["steps_per_second"], left)
    saved = tmp_path / "out" / "unet"
    shards = sorted(saved.glob("*.safetensors"))
    assert len(shards) > 1 and all(path.stat().st_size <= 0.5e6 * 1.05 for path in shards)
    shipped = UNet2DConditionModel.from_pretrained(str(tmp_path / "gpu-session-work" / "model" / "unet"))
    loaded = UNet2DConditionModel.from_pretrained(str(saved))
    assert {tensor.dtype for tensor in load_file(str(shards[0])).values()} == {torch.float16}
    for (name, a), (_, b) in zip(shipped.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "out" / "report.json").is_file() and (tmp_path / "out" / "samples.png").is_file()
    assert gpu_session.planned_steps(10.0, 2.55) == 25 and gpu_session.planned_steps(10.0, -5.0) == 1


def test_gpu_session_rate_leaves_out_the_first_steps(tmp_path):
    from train import gpu_session

    log = tmp_path / "log.jsonl"
    records = [{"step": 10, "loss": 1.0, "time": 9.0, "steps_per_second": 1.1},  # slow first steps
               {"step": 20, "loss": 0.9, "time": 10.0, "steps_per_second": 2.0},
               {"step": 50, "loss": 0.8, "time": 13.0, "steps_per_second": 3.8}, {"steps_per_second": 3.8}]
    log.write_text("\n".join(json.dumps(record) for record in records))
    assert gpu_session.steady_rate(log) == 10.0  # 40 steps in 4 s
    log.write_text(json.dumps(records[1]))
    with pytest.raises(ValueError, match="at least 2"):
        gpu_session.steady_rate(log)
