"""DreamBooth / LoRA recipes at smoke scale: the loss is eq. 2 of the paper, resumed training equals uninterrupted
training, class images are generated once and checked, bad input is refused before anything is written."""
import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from pipelines.cli import main as ldm
from pipelines.metadata import parse_parameters
from pipelines.random_models import save_random_model
from pipelines.text_to_image import TextToImagePipeline
from train.datasets import DatasetError, scan_folder
from train.finetune import instance_captions, prior_preservation_loss, run, train_only_rows, training_target

from test_lora import render_subjects


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    return save_random_model(tmp / "model", "tiny"), render_subjects(tmp / "subject")


def dreambooth_args(model, subjects, out, *extra):
    return ["--model", str(model), "--instance-data", str(subjects), "--instance-prompt", "a sks shape",
            "--class-prompt", "a shape", "--num-class-images", "2", "--class-steps", "1", "--output-dir", str(out),
            "--sample-every", "0", "--validation-steps", "1", "--mixed-precision", "no", "--lr", "1e-3", *extra]


def test_training_target_known_answers():
    x0, noise = torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), -1.0)
    alpha_bar = torch.tensor([0.36, 0.64])  # sqrt: 0.6, 0.8; sqrt(1 - ab): 0.8, 0.6
    x_t, eps = training_target(x0, noise, alpha_bar, "epsilon")
    torch.testing.assert_close(x_t.flatten(), torch.tensor([0.6 * 2 - 0.8, 0.8 * 2 - 0.6]))
    assert torch.equal(eps, noise)
    _, v = training_target(x0, noise, alpha_bar, "v_prediction")
    torch.testing.assert_close(v.flatten(), torch.tensor([-0.6 - 0.8 * 2, -0.8 - 0.6 * 2]))
    assert torch.equal(training_target(x0, noise, alpha_bar, "sample")[1], x0)
    with pytest.raises(ValueError, match="flow"):
        training_target(x0, noise, alpha_bar, "flow")


def test_prior_preservation_loss_is_eq_2():
    pred, target = torch.zeros(4, 1, 2, 2), torch.zeros(4, 1, 2, 2)
    target[:2] = 1.0  # instance error 1 per pixel
    target[2:] = 2.0  # class error 4 per pixel
    assert float(prior_preservation_loss(pred, target, 2, 0.5)) == pytest.approx(1.0 + 0.5 * 4.0)
    assert float(prior_preservation_loss(pred[:2], target[:2], 2, 0.5)) == pytest.approx(1.0)
    weights = torch.tensor([1.0, 0.0, 0.5, 0.25])  # per-example timestep weights (min-SNR)
    assert float(prior_preservation_loss(pred, target, 2, 0.5, weights)) == pytest.approx(
        (1.0 + 0.0) / 2 + 0.5 * (0.5 * 4.0 + 0.25 * 4.0) / 2)


def test_resumed_dreambooth_equals_uninterrupted(setup, tmp_path):
    model, subjects = setup
    whole = run(dreambooth_args(model, subjects, tmp_path / "whole", "--steps", "4"), "dreambooth")
    args = dreambooth_args(model, subjects, tmp_path / "parts", "--steps", "4")
    assert not run(args + ["--stop-after", "2"], "dreambooth")["finished"]
    parts = run(args + ["--resume", "latest"], "dreambooth")
    assert parts["start_step"] == 2
    a = load_file(str(whole["saved"] / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(parts["saved"] / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in a)  # trained
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical after the resume
    # the class images were generated once, by the base model, with their prompt in the metadata
    files = sorted((tmp_path / "whole" / "class_images").glob("class-*.png"))
    assert len(files) == 2 and parse_parameters(Image.open(files[0]).info["parameters"])["prompt"] == "a shape"
    # the full fine-tune is a complete model folder diffusers loads offline
    StableDiffusionPipeline.from_pretrained(whole["saved"], local_files_only=True)
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())["class_images"] == 2


def test_class_images_of_another_prompt_are_refused(setup, tmp_path):
    """Several class prompts take turns (image k from prompt k mod n); a cache made from other prompts is refused."""
    model, subjects = setup
    args = dreambooth_args(model, subjects, tmp_path / "a", "--steps", "1")
    args[args.index("a shape") + 1:args.index("a shape") + 1] = ["a red circle"]
    run(args, "dreambooth")
    files = sorted((tmp_path / "a" / "class_images").glob("class-*.png"))
    assert [parse_parameters(Image.open(f).info["parameters"])["prompt"] for f in files] == ["a shape", "a red circle"]
    args = dreambooth_args(model, subjects, tmp_path / "b", "--steps", "1",
                           "--class-data-dir", str(tmp_path / "a" / "class_images"))
    args[args.index("a shape")] = "a picture"
    with pytest.raises(ValueError, match="generated for 'a shape', not 'a picture'"):
        run(args, "dreambooth")


def test_a_guidance_distilled_base_is_refused_before_writing(setup, tmp_path, full_lcm_folder):
    """A full LCM needs its guidance embedding in every forward pass, which the recipes do not give."""
    _, subjects = setup
    with pytest.raises(ValueError, match="guidance-distilled UNet"):
        run(dreambooth_args(full_lcm_folder, subjects, tmp_path / "out", "--steps", "1"), "dreambooth")
    assert not (tmp_path / "out").exists()


def test_bad_input_writes_nothing(setup, tmp_path, capsys):
    model, subjects = setup
    out = tmp_path / "out"
    args = dreambooth_args(model, subjects, out, "--steps", "1")
    missing_identifier = list(args)
    missing_identifier[missing_identifier.index("a sks shape")] = "a heart shape"
    with pytest.raises(ValueError, match="does not contain the identifier 'sks'"):
        run(missing_identifier, "dreambooth")
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = list(args)
    no_images[no_images.index(str(subjects))] = str(empty)
    with pytest.raises(DatasetError, match="has no images"):
        run(no_images, "dreambooth")
    with pytest.raises(ValueError, match="min_snr is written for v-prediction models; .* predicts epsilon"):
        run(args + ["--loss-weighting", "min_snr"], "dreambooth")
    assert run(args + ["--dry-run"], "dreambooth")["examples"] == 3
    assert "3 images" in capsys.readouterr().out
    assert not out.exists()
    # a checkpoint of the LoRA recipe cannot be resumed as DreamBooth, and nothing in the folder changes
    (subjects / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": p.name, "text": "a sks shape"})
                                                       for p in sorted(subjects.glob("*.png"))))
    try:
        assert ldm(["train", "lora", "--model", str(model), "--data", str(subjects), "--output-dir", str(out),
                    "--steps", "1", "--batch-size", "1", "--sample-every", "0", "--validation-steps", "1",
                    "--mixed-precision", "no"]) == 0
    finally:
        (subjects / "metadata.jsonl").unlink()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(ValueError, match="from recipe 'lora', not 'dreambooth'"):
        run(args + ["--resume", "latest"], "dreambooth")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    # the CLI's LoRA option: the image records which LoRA made it
    image = tmp_path / "with-lora.png"
    assert ldm(["generate", "a sks shape", "-o", str(image), "--model", str(model), "--steps", "2", "--seed", "1",
                "--lora", f"{out / 'final' / 'pytorch_lora_weights.safetensors'}:0.5"]) == 0
    assert parse_parameters(Image.open(image).info["parameters"])["loras"].endswith(":0.5")


def test_instance_images_may_carry_their_own_captions(setup, tmp_path):
    """Captions beside instance images (kohya style) replace the instance prompt for those images; each must name
    the identifier, else the run stops before writing anything."""
    model, subjects = setup
    captioned = tmp_path / "captioned"
    shutil.copytree(subjects, captioned)
    files = sorted(captioned.glob("*.png"))
    files[0].with_suffix(".txt").write_text("a sks shape at the top left")
    captions = instance_captions(scan_folder(captioned, captions="optional"), "a sks shape", "sks")
    assert captions == ["a sks shape at the top left"] + ["a sks shape"] * (len(files) - 1)
    files[1].with_suffix(".txt").write_text("a heart at the top left")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"captions of {files[1].name} do not contain the identifier 'sks'"):
        run(dreambooth_args(model, captioned, out, "--steps", "1"), "dreambooth")
    assert not out.exists()


def test_caption_dropout_trains_on_the_empty_caption(setup, tmp_path):
    """With --caption-dropout 1 every example (subject and class) is trained on the empty caption, so the instance
    prompt no longer matters: two runs with different ones save the same weights; without dropout, or with the
    dropout on the class examples only (--caption-dropout-on class), they differ."""
    model, subjects = setup

    def weights(name, dropout, instance_prompt, *extra):
        args = dreambooth_args(model, subjects, tmp_path / name, "--steps", "2", "--caption-dropout", dropout, *extra)
        args[args.index("a sks shape")] = instance_prompt
        saved = run(args, "dreambooth")["saved"]
        return load_file(str(saved / "unet" / "diffusion_pytorch_model.safetensors"))

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(weights("a", "1", "a sks shape"), weights("b", "1", "one sks thing"))
    assert not same(weights("c", "0", "a sks shape"), weights("d", "0", "one sks thing"))
    on_class = ("--caption-dropout-on", "class")
    assert not same(weights("e", "1", "a sks shape", *on_class), weights("f", "1", "one sks thing", *on_class))
    with pytest.raises(ValueError, match="--caption-dropout must be a probability"):
        run(dreambooth_args(model, subjects, tmp_path / "h", "--caption-dropout", "nan"), "dreambooth")
    assert not (tmp_path / "h").exists()


def test_prior_towards_the_base_models_predictions(setup, tmp_path):
    """--prior-target base: the class examples' target is the frozen base model's prediction, so at the base weights
    (the first step) the prior term is exactly zero whatever its weight lambda; afterwards it pulls the weights
    (lambda changes them). With the paper's targets (images) lambda changes the first loss already. Each step here
    draws three class examples per subject example (--class-batch-size)."""
    model, subjects = setup

    def result(name, target, weight):  # three class examples beside each subject example (--class-batch-size)
        return run(dreambooth_args(model, subjects, tmp_path / name, "--steps", "2", "--prior-target", target,
                                   "--prior-loss-weight", weight, "--class-batch-size", "3"), "dreambooth")

    one, five = result("base1", "base", "1"), result("base5", "base", "5")
    assert one["losses"][0] == five["losses"][0]
    a, b = (load_file(str(r["saved"] / "unet" / "diffusion_pytorch_model.safetensors")) for r in (one, five))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert result("images1", "images", "1")["losses"][0] != result("images5", "images", "5")["losses"][0]


def test_ema_of_the_fine_tuned_unet(setup, tmp_path):
    """--ema-decay saves the average, not the last weights: after one step the average is diffusers' warm-up
    decay min(d, (1 + 0) / (10 + 0)) = 0.1 of the base plus 0.9 of the trained weights; a resumed run restores the
    average and saves the same weights as an uninterrupted one; LoRA runs refuse it."""
    model, subjects = setup

    def unet(folder):
        return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))

    raw = unet(run(dreambooth_args(model, subjects, tmp_path / "raw", "--steps", "1"), "dreambooth")["saved"])
    ema = unet(run(dreambooth_args(model, subjects, tmp_path / "ema", "--steps", "1", "--ema-decay", "0.99"),
                   "dreambooth")["saved"])
    base = unet(model)
    assert any(not torch.equal(raw[k], base[k]) for k in raw)
    for k in raw:
        torch.testing.assert_close(ema[k], 0.1 * base[k] + 0.9 * raw[k], rtol=0, atol=1e-6)
    args = dreambooth_args(model, subjects, tmp_path / "whole", "--steps", "3", "--ema-decay", "0.99")
    whole = unet(run(args, "dreambooth")["saved"])
    args = dreambooth_args(model, subjects, tmp_path / "parts", "--steps", "3", "--ema-decay", "0.99")
    run(args + ["--stop-after", "2"], "dreambooth")
    parts = unet(run(args + ["--resume", "latest"], "dreambooth")["saved"])
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    with pytest.raises(ValueError, match="--ema-decay averages a full fine-tune"):
        run(dreambooth_args(model, subjects, tmp_path / "lora", "--method", "lora", "--ema-decay", "0.9"), "dreambooth")
    assert not (tmp_path / "lora").exists()


def test_cross_attention_kv_fine_tune_changes_only_those_weights(setup, tmp_path):
    """--unet-params cross_attention_kv (Custom Diffusion): after training, exactly the attn2.to_k / attn2.to_v
    weights differ from the base UNet's, every one of them; LoRA refuses the option."""
    model, subjects = setup
    args = dreambooth_args(model, subjects, tmp_path / "kv", "--steps", "2", "--unet-params", "cross_attention_kv")
    trained = load_file(str(run(args, "dreambooth")["saved"] / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    kv = {k for k in base if ".attn2.to_k." in k or ".attn2.to_v." in k}
    assert kv and changed == kv
    with pytest.raises(ValueError, match="--unet-params cross_attention_kv chooses the weights of a full"):
        run(dreambooth_args(model, subjects, tmp_path / "lora", "--method", "lora", "--unet-params",
                            "cross_attention_kv"), "dreambooth")
    assert not (tmp_path / "lora").exists()


def textual_inversion_args(model, subjects, out, *extra):
    return ["--model", str(model), "--instance-data", str(subjects), "--instance-prompt", "a <sks> shape",
            "--initializer-token", "shape", "--num-vectors", "2", "--output-dir", str(out), "--sample-every", "0",
            "--validation-steps", "1", "--mixed-precision", "no", "--lr", "5e-2", *extra]


def test_textual_inversion_learns_a_new_word_that_diffusers_loads(setup, tmp_path):
    """``ldm train textual-inversion``: the new word's two vectors start from the initializer's and are trained;
    a resumed run equals an uninterrupted one; the saved file gives the same images in our pipeline and in
    diffusers' (``load_textual_inversion``), and the base model folder is not touched."""
    model, subjects = setup
    whole = run(textual_inversion_args(model, subjects, tmp_path / "whole", "--steps", "4"), "textual_inversion")
    args = textual_inversion_args(model, subjects, tmp_path / "parts", "--steps", "4")
    assert not run(args + ["--stop-after", "2"], "textual_inversion")["finished"]
    parts = run(args + ["--resume", "latest"], "textual_inversion")
    learned, resumed = load_file(str(whole["saved"])), load_file(str(parts["saved"]))
    assert list(learned) == ["<sks>"] and torch.equal(learned["<sks>"], resumed["<sks>"])
    ours = TextToImagePipeline.from_pretrained(model)
    initial = ours.text_encoder.get_input_embeddings().weight[ours.tokenizer.convert_tokens_to_ids("shape</w>")]
    assert learned["<sks>"].shape == (2, initial.shape[0])
    assert all(not torch.allclose(vector, initial) for vector in learned["<sks>"])  # both vectors trained
    assert whole["metrics"]["trainable_params"] == 2 * initial.shape[0]
    ours.load_textual_inversion(whole["saved"])
    theirs = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_textual_inversion(str(whole["saved"]))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mine = ours("a <sks> shape", latents=noise, num_inference_steps=3, sampler="ddim", output_type="latent",
                progress=False).images
    reference = theirs("a <sks> shape", latents=noise, num_inference_steps=3, output_type="latent").images
    torch.testing.assert_close(mine, reference, atol=1e-4 * max(1.0, float(reference.abs().max())), rtol=0)
    assert not (model / "tokenizer" / "added_tokens.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--identifier", "shape", "--instance-prompt", "a shape"], "'shape' is already a token"),
    (["--initializer-token", "red circle"], "--initializer-token must be one token"),
    (["--ema-decay", "0.9"], "trains the new word's vectors only"),
    (["--instance-prompt", "a sks shape"], "does not contain the identifier '<sks>'"),
])
def test_textual_inversion_refuses_bad_words_before_writing(setup, tmp_path, extra, message):
    model, subjects = setup
    with pytest.raises(ValueError, match=message):
        run(textual_inversion_args(model, subjects, tmp_path / "out", "--steps", "1") + extra, "textual_inversion")
    assert not (tmp_path / "out").exists()


def test_pivotal_dreambooth_starts_from_a_learnt_word_and_saves_it(setup, tmp_path):
    """``--embedding`` (pivotal tuning): DreamBooth fine-tunes on a word learnt by textual inversion; the full
    fine-tune's folder carries the word in its tokenizer and text tower, so it loads (ours and diffusers') with the
    learnt vectors; an embedding of another word is refused before anything is written."""
    model, subjects = setup
    word = run(textual_inversion_args(model, subjects, tmp_path / "ti", "--steps", "2"), "textual_inversion")["saved"]
    args = dreambooth_args(model, subjects, tmp_path / "db", "--steps", "2", "--embedding", str(word),
                           "--identifier", "<sks>")
    args[args.index("a sks shape")] = "a <sks> shape"
    with pytest.raises(ValueError, match="holds the word '<sks>', not the identifier 'sks'"):
        run(dreambooth_args(model, subjects, tmp_path / "never", "--steps", "2", "--embedding", str(word)),
            "dreambooth")
    assert not (tmp_path / "never").exists()
    saved = run(args, "dreambooth")["saved"]
    learnt = load_file(str(word))["<sks>"]  # (2, D)
    ours = TextToImagePipeline.from_pretrained(saved)
    ids = ours.tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
    assert torch.equal(ours.text_encoder.get_input_embeddings().weight[ids], learnt)
    theirs = StableDiffusionPipeline.from_pretrained(saved, local_files_only=True)
    assert theirs.tokenizer("a <sks> shape")["input_ids"][2] == ids[0]
    assert torch.equal(theirs.text_encoder.get_input_embeddings().weight[ids], learnt)


def test_only_the_new_words_rows_learn():
    """Textual inversion's table: gradients reach only the new rows, and the after-step hook undoes AdamW's weight
    decay on the others, so every other word's vector stays exactly as it was."""
    table = torch.nn.Parameter(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)))
    before = table.detach().clone()
    keep = train_only_rows(table, [4, 5])
    optimizer = torch.optim.AdamW([table], lr=0.1, weight_decay=0.5)
    (table ** 2).sum().backward()  # a gradient on every row
    assert torch.count_nonzero(table.grad[:4]) == 0 and torch.count_nonzero(table.grad[4:]) == 6
    optimizer.step()
    keep(1)
    assert torch.equal(table[:4], before[:4]) and not torch.equal(table[4:], before[4:])
