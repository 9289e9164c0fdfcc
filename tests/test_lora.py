"""LoRA: a file trained by our recipe gives the same images in our pipeline and in diffusers' load_lora_weights,
at any scale and with several at once; kohya-layout files load; unloading restores the model exactly; a LoRA for
another architecture is refused before anything changes."""
import re

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from pipelines.lora import LoraError
from pipelines.random_models import save_random_model
from pipelines.text_to_image import TextToImagePipeline
from train.finetune import run
from train.shapes import Scene, make_object, render

PROMPT = "a red circle at the top left"
STEPS = 4


def render_subjects(folder, count=3, size=64):
    folder.mkdir(parents=True, exist_ok=True)
    for k, position in enumerate(["top left", "center", "bottom right"][:count]):
        scene = Scene("white", (make_object("red", "heart", position, "large", size, two_tone=True),), image_size=size)
        render(scene).save(folder / f"subject-{k}.png")
    return folder


def train_lora(tmp, model, name, seed, text_encoder=True):
    """A LoRA from our DreamBooth recipe, with a learning rate large enough to change the images."""
    args = ["--model", str(model), "--instance-data", str(render_subjects(tmp / "subject")),
            "--instance-prompt", "a sks shape", "--prior-loss-weight", "0", "--method", "lora", "--rank", "2",
            "--steps", "2", "--lr", "0.05", "--seed", str(seed), "--output-dir", str(tmp / name),
            "--sample-every", "0", "--validation-steps", "1", "--mixed-precision", "no"]
    return run(args + (["--train-text-encoder"] if text_encoder else []), "dreambooth")["saved"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    model = save_random_model(tmp / "model", "tiny")
    return model, train_lora(tmp, model, "a", 0), train_lora(tmp, model, "b", 1, text_encoder=False)


def latents():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def ours(pipe):
    return pipe(PROMPT, latents=latents(), num_inference_steps=STEPS, sampler="ddim", output_type="latent",
                progress=False).images


def theirs(model, loras):
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for k, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"a{k}")
    pipe.set_adapters([f"a{k}" for k in range(len(loras))], adapter_weights=[s for _, s in loras])
    return pipe(PROMPT, latents=latents(), num_inference_steps=STEPS, output_type="latent").images


def test_recipe_lora_matches_diffusers_load_lora_weights(trained):
    model, lora_a, lora_b = trained
    assert {k.split(".")[0] for k in load_file(str(lora_a))} == {"unet", "text_encoder"}
    pipe = TextToImagePipeline.from_pretrained(model)
    base = ours(pipe)
    pipe.load_lora(lora_a, scale=0.7)
    one = ours(pipe)
    assert (one - base).abs().max() > 0.05  # the LoRA changes the result
    torch.testing.assert_close(one, theirs(model, [(lora_a, 0.7)]), atol=1e-4, rtol=0)
    pipe.load_lora(lora_b, scale=1.2, name="second")
    two = ours(pipe)
    assert (two - one).abs().max() > 0.05
    torch.testing.assert_close(two, theirs(model, [(lora_a, 0.7), (lora_b, 1.2)]), atol=1e-4, rtol=0)
    pipe.set_lora_scale("second", 0.0)
    torch.testing.assert_close(ours(pipe), one, atol=1e-5, rtol=0)
    pipe.unload_lora()
    assert pipe.loras == {}
    assert torch.equal(ours(pipe), base)


def to_kohya(tensors: dict) -> dict:
    """The reverse of diffusers' kohya converter for SD1-style keys (a test fixture): ``unet.<path>.lora.down``
    -> ``lora_unet_<path_with_underscores>.lora_down``, text encoder under ``lora_te_text_model_``, alpha = rank."""
    out = {}
    for key, value in tensors.items():
        match = re.match(r"(unet|text_encoder)\.(.+)\.(lora\.|lora_linear_layer\.)(down|up)\.weight$", key)
        assert match, key
        network, path, _, which = match.groups()
        prefix = "lora_unet_" if network == "unet" else "lora_te_text_model_"
        name = prefix + path.replace(".", "_")
        out[f"{name}.lora_{which}.weight"] = value
        if which == "down":
            out[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))
    return out


def test_kohya_layout_loads_like_diffusers_layout(trained, tmp_path):
    model, lora_a, _ = trained
    kohya = tmp_path / "kohya.safetensors"
    save_file(to_kohya(load_file(str(lora_a))), str(kohya))
    pipe = TextToImagePipeline.from_pretrained(model)
    pipe.load_lora(lora_a, scale=0.8)
    expected = ours(pipe)
    pipe.unload_lora()
    pipe.load_lora(kohya, scale=0.8)
    torch.testing.assert_close(ours(pipe), expected, atol=1e-5, rtol=0)


def test_lora_for_another_architecture_is_refused_untouched(trained, tmp_path):
    model, lora_a, _ = trained
    tensors = load_file(str(lora_a))
    key = next(k for k in tensors if k.startswith("unet.") and "attn2.to_k.lora.down" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], 768)  # made for a 768-wide text encoder (SD 1.x)
    foreign = tmp_path / "foreign.safetensors"
    save_file(tensors, str(foreign))
    pipe = TextToImagePipeline.from_pretrained(model)
    base = ours(pipe)
    with pytest.raises(LoraError, match=r"attn2\.to_k has 32 input features, the LoRA has 768"):
        pipe.load_lora(foreign)
    assert pipe.loras == {} and torch.equal(ours(pipe), base)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(LoraError, match="cannot read LoRA file"):
        pipe.load_lora(tmp_path / "bad.safetensors")
    (tmp_path / "old.ckpt").write_bytes(b"pickle")
    with pytest.raises(LoraError, match="pickle"):
        pipe.load_lora(tmp_path / "old.ckpt")


def random_lora_file(folder, family, tmp_path):
    """A LoRA with random (non-zero) matrices on the denoiser's attention and on both text towers, written by
    diffusers' own ``save_lora_weights`` for the family's pipeline."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from ldm.loading import load_components

    components = load_components(folder)
    layers = {}
    for seed, (name, network, targets) in enumerate((
            ("transformer" if family == "sd3" else "unet", components.unet, ["to_q", "to_k", "to_v", "to_out.0"]),
            ("text_encoder", components.text_encoder, ["q_proj", "v_proj"]),
            ("text_encoder_2", components.text_encoder_2, ["q_proj", "v_proj"]))):
        torch.manual_seed(seed)
        network.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
        layers[f"{name}_lora_layers"] = {k: 2 * v for k, v in get_peft_model_state_dict(network).items()}
    cls = StableDiffusion3Pipeline if family == "sd3" else StableDiffusionXLPipeline
    cls.save_lora_weights(str(tmp_path / "lora"), safe_serialization=True, **layers)
    return tmp_path / "lora" / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_lora_on_both_text_towers_and_the_mmdit_matches_diffusers(family, tmp_path):
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    from pipelines.random_models import save_random_sd3, save_random_sdxl

    folder = (save_random_sd3 if family == "sd3" else save_random_sdxl)(tmp_path / family)
    lora = random_lora_file(folder, family, tmp_path)
    assert {k.split(".")[0] for k in load_file(str(lora))} == {
        "transformer" if family == "sd3" else "unet", "text_encoder", "text_encoder_2"}
    sampler = "flow_euler" if family == "sd3" else "ddim"
    settings = dict(latents=latents(), num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent")
    pipe = TextToImagePipeline.from_pretrained(folder)
    base = pipe(PROMPT, sampler=sampler, progress=False, **settings).images
    pipe.load_lora(lora, scale=0.8)
    adapted = pipe(PROMPT, sampler=sampler, progress=False, **settings).images
    assert (adapted - base).abs().max() > 0.01
    if family == "sd3":
        reference = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, text_encoder_3=None,
                                                             tokenizer_3=None)
    else:
        reference = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
        reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(lora), adapter_name="a")
    reference.set_adapters(["a"], adapter_weights=[0.8])
    expected = reference(PROMPT, **settings).images
    torch.testing.assert_close(adapted, expected, atol=1e-4 * max(1.0, float(expected.abs().max())), rtol=0)
    pipe.unload_lora()
    assert torch.equal(pipe(PROMPT, sampler=sampler, progress=False, **settings).images, base)
