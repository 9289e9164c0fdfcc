"""Fine-tuning a loaded model on custom images: DreamBooth (with prior preservation), LoRA, textual inversion.

``ldm train dreambooth``: Ruiz et al. 2022, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
Subject-Driven Generation". 3-5 images of a subject are bound to a rare identifier in an instance prompt ("a sks
shape"; an image with its own caption naming the identifier, as kohya's trainers take them, uses that caption).
Class-specific prior preservation (sec. 4.2, eq. 2) keeps the model's knowledge of the class: before training
the model itself generates ``--num-class-images`` images of the class prompt ("a shape", cached in
``<output-dir>/class_images``), and every step adds their denoising loss with weight lambda. Several class prompts
may be given (image k is made from prompt k mod n and trained with it), which anchors more of what the model knows
(kohya's captioned "regularization images" do the same):

    L = E[ w_t || x_hat(a_t x + s_t eps) - x ||^2 ] + lambda E[ w_t' || x_hat(a_t' x_pr + s_t' eps') - x_pr ||^2 ]

written here, as the model's own parameterisation, on its prediction target (eps, v or x0) with ``w_t = 1``.
Three measures against language drift beyond the paper (README, "Measured on the shapes model"):
``--prior-target base`` trains the class examples towards the frozen base model's prediction on the same noised
class latent instead of towards the latent itself (when the class images are the model's own samples both targets
have nearly the same expectation, but the base's prediction has none of a single draw's noise, so the prior term
is zero at the base weights and anchors the function directly; costs a frozen copy of the UNet and text encoder);
``--caption-dropout p [--caption-dropout-on class]`` trains that share of examples on the empty caption, so the
unconditional branch that CFG extrapolates from is anchored too (on the class examples only, the subject's few
images do not become what the unconditional branch draws); ``--ema-decay`` saves an average of the weights.

``--method full`` trains every UNet weight, or with ``--unet-params cross_attention_kv`` only the key and value
projections of the cross-attention layers (Kumari et al. 2022, "Multi-Concept Customization of Text-to-Image
Diffusion" / Custom Diffusion, sec. 3.2: the only weights that read the text, 5 % of SD's UNet); ``--method lora``
trains low-rank adapters (peft) on the attention projections (``to_q, to_k, to_v, to_out.0``);
``--train-text-encoder`` also trains the text encoder (fully, or LoRA on ``q_proj, k_proj, v_proj, out_proj``).

``ldm train lora``: LoRA on a captioned folder (``train/datasets.py``: ``metadata.jsonl`` or ``.txt`` captions).

``ldm train textual-inversion``: Gal et al. 2022, "An Image is Worth One Word", eq. 2. The subject images and
captions are DreamBooth's, the identifier is a new word whose ``--num-vectors`` embeddings start from
``--initializer-token``'s and are the only weights that learn (text encoder and UNet frozen); saved as diffusers'
``learned_embeds.safetensors`` (``pipelines/embeddings.py`` loads it, as does diffusers' ``load_textual_inversion``).

Outputs in ``<output-dir>/final``: a complete model folder (full fine-tune; loads anywhere the base did),
``learned_embeds.safetensors`` (textual inversion), or ``pytorch_lora_weights.safetensors`` in diffusers' layout (``pipe.load_lora(path)`` and diffusers'
``load_lora_weights`` both read it; LoRA alpha equals the rank, so scale 1 is the trained strength).
Checkpoints, ``--resume`` (same weights as an uninterrupted run: every draw is keyed by step), validation grids
and the progress bar come from ``train/common.py``.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from train import common
from train.datasets import RESIZE_MODES, describe, load_pixels, scan_folder

RECIPES = ("dreambooth", "lora", "textual_inversion")
METHODS = ("full", "lora")
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_PARAMS = ("all", "cross_attention_kv")  # --unet-params of a full fine-tune
PRIOR_TARGETS = ("images", "base")  # --prior-target
CAPTION_DROPOUT_ON = ("all", "class")  # --caption-dropout-on
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
DEFAULTS = {  # recipe -> (steps, batch size, learning rate for full / for LoRA)
    "dreambooth": (400, 1, (5e-6, 1e-4)),
    "lora": (500, 4, (5e-6, 1e-4)),
    "textual_inversion": (2000, 4, (5e-3, 5e-3)),  # the new vectors only
}
EMBEDDING_FILE = "learned_embeds.safetensors"  # diffusers' name for a textual-inversion file


def build_parser(recipe: str) -> argparse.ArgumentParser:
    steps, batch, _ = DEFAULTS[recipe]
    p = argparse.ArgumentParser(prog=f"ldm train {recipe}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p, steps=steps, batch_size=batch, lr=0.0, checkpoint_every=100, sample_every=100,
                           warmup=0)
    g = p.add_argument_group(recipe)
    g.add_argument("--model", default=None, help="base model folder (default: the shipped default model)")
    common.add_loss_weighting_args(g, "uniform", "per-timestep loss weight; min_snr (v-prediction models) is what "
                                   "the shipped shapes UNet was trained with")
    if recipe in ("dreambooth", "textual_inversion"):
        g.add_argument("--instance-data", required=True,
                       help="folder of 3-5 subject images; an image's own caption (metadata.jsonl or .txt, "
                            "containing the identifier) replaces the instance prompt for that image")
        g.add_argument("--instance-prompt", required=True,
                       help='e.g. "a sks shape"; must contain --identifier; used for uncaptioned images')
    if recipe == "textual_inversion":
        g.add_argument("--identifier", default="<sks>",
                       help="the new word the learnt vectors are bound to (not a word of the vocabulary)")
        g.add_argument("--initializer-token", required=True,
                       help='a word of one token whose embedding every new vector starts from (e.g. "shape")')
        g.add_argument("--num-vectors", type=common.positive_int, default=1,
                       help="vectors of the new word (the A1111 web UI's 'number of vectors per token')")
    if recipe == "dreambooth":
        g.add_argument("--identifier", default="sks", help="the rare token naming the subject")
        g.add_argument("--class-prompt", nargs="+", default=None,
                       help='e.g. "a shape"; needed for prior preservation; several prompts: class image k is '
                            'made from (and trained with) prompt k mod n')
        g.add_argument("--prior-loss-weight", type=float, default=1.0, help="lambda of eq. 2; 0 = no prior loss")
        g.add_argument("--prior-target", default="images", choices=PRIOR_TARGETS,
                       help="what the class examples are trained towards: images = eq. 2 as the paper (the noised "
                            "class image's own target); base = the frozen base model's prediction on the same "
                            "noised class latent (the same expected gradient when the class images are the "
                            "model's own samples, without the noise of a single draw)")
        g.add_argument("--num-class-images", type=common.positive_int, default=50)
        g.add_argument("--class-batch-size", type=common.positive_int, default=None,
                       help="class examples per step (default: --batch-size, one per subject example, as the paper)")
        g.add_argument("--class-data-dir", default=None, help="class image cache (default <output-dir>/class_images)")
        g.add_argument("--class-steps", type=common.positive_int, default=20, help="sampler steps per class image")
        g.add_argument("--class-guidance", type=float, default=7.5, help="CFG scale of the class images")
        g.add_argument("--method", default="full", choices=METHODS)
        g.add_argument("--embedding", default=None,
                       help="pivotal tuning: a textual-inversion file (ldm train textual-inversion) whose word is the "
                            "identifier, loaded before fine-tuning; a full fine-tune saves the text encoder and "
                            "tokenizer with the word, a LoRA run copies the file beside the LoRA")
    if recipe == "lora":
        g.add_argument("--data", required=True, help="folder of captioned images (metadata.jsonl or .txt files)")
    g.add_argument("--caption-dropout", type=float, default=0.0,
                   help="probability of training an example (subject, class or dataset image) on the empty "
                        "caption, so the unconditional branch that classifier-free guidance extrapolates from is "
                        "trained too (the shipped UNet was trained with 0.1; kohya's caption_dropout_rate)")
    if recipe == "dreambooth":
        g.add_argument("--caption-dropout-on", default="all", choices=CAPTION_DROPOUT_ON,
                       help="which examples caption dropout applies to: all, or only the prior's class images")
    g.add_argument("--ema-decay", type=float, default=0.0,
                   help="save an exponential moving average of the fine-tuned UNet's weights instead of the last "
                        "ones (--method full; 0 = none)")
    g.add_argument("--unet-params", default="all", choices=UNET_PARAMS,
                   help="which UNet weights a full fine-tune trains: all, or the cross-attention key/value "
                        "projections only (Custom Diffusion, Kumari et al. 2022)")
    g.add_argument("--rank", type=common.positive_int, default=4, help="LoRA rank (alpha = rank)")
    g.add_argument("--train-text-encoder", action="store_true")
    g.add_argument("--resolution", type=common.positive_int, default=None,
                   help="training size (default: the model's native size)")
    g.add_argument("--resize", default="center_crop", choices=RESIZE_MODES)
    g.add_argument("--validation-prompt", action="append", default=None,
                   help="prompt of the validation grid (repeatable; default: the instance prompt / first captions)")
    g.add_argument("--validation-steps", type=common.positive_int, default=20)
    g.add_argument("--validation-guidance", type=float, default=7.5)
    g.add_argument("--dry-run", action="store_true", help="check the data and settings, report, write nothing")
    return p


# --------------------------------------------------------------------------- checks


def names_identifier(text: str, identifier: str) -> bool:
    """Whether ``text`` contains ``identifier`` as a whole word."""
    return re.search(rf"(?<!\w){re.escape(identifier)}(?!\w)", text) is not None


def check_instance_prompt(prompt: str, identifier: str) -> None:
    """The instance prompt must name the subject by its identifier, as a whole word."""
    if not identifier.strip():
        raise ValueError("--identifier must not be empty")
    if not names_identifier(prompt, identifier):
        raise ValueError(f"--instance-prompt {prompt!r} does not contain the identifier {identifier!r}; "
                         f"write it as e.g. \"a {identifier} shape\" (or set --identifier)")


def instance_captions(examples, instance_prompt: str, identifier: str) -> list[str]:
    """DreamBooth captions: each image's own caption where it has one (kohya-style per-image captions such as
    "a sks shape at the top left"), else the instance prompt. Every caption must name the identifier."""
    captions = [e.caption or instance_prompt for e in examples]
    missing = [e.path.name for e, caption in zip(examples, captions) if not names_identifier(caption, identifier)]
    if missing:
        raise ValueError(f"the captions of {', '.join(missing)} do not contain the identifier {identifier!r}; "
                         f"add it (\"a {identifier} shape ...\") or remove them to use --instance-prompt")
    return captions


def check_args(args: argparse.Namespace, recipe: str) -> None:
    common.check_common_args(args)
    common.check_loss_weighting(args)
    if not 0.0 <= args.caption_dropout <= 1.0:
        raise ValueError(f"--caption-dropout must be a probability in [0, 1], got {args.caption_dropout}")
    if recipe == "lora":
        args.method = "lora"
        args.prior_loss_weight = 0.0
        args.caption_dropout_on = "all"
    elif recipe == "textual_inversion":
        args.method, args.prior_loss_weight, args.caption_dropout_on = "embedding", 0.0, "all"
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            raise ValueError("textual inversion trains a few rows of one table: run it without FSDP (DDP or one "
                             "process)")
        check_instance_prompt(args.instance_prompt, args.identifier)
        if args.train_text_encoder or args.ema_decay or args.unet_params != "all":
            raise ValueError("textual inversion trains the new word's vectors only; --train-text-encoder, "
                             "--ema-decay and --unet-params do not apply")
    else:
        args.class_batch_size = args.class_batch_size or args.batch_size
        check_instance_prompt(args.instance_prompt, args.identifier)
        if not (args.prior_loss_weight >= 0.0 and args.prior_loss_weight < float("inf")):
            raise ValueError(f"--prior-loss-weight must be a finite number >= 0, got {args.prior_loss_weight}")
        if args.prior_loss_weight > 0 and not args.class_prompt:
            raise ValueError("prior preservation needs --class-prompt (e.g. \"a shape\"); or pass "
                             "--prior-loss-weight 0 to train without it")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.unet_params != "all" and args.method == "lora":
        raise ValueError(f"--unet-params {args.unet_params} chooses the weights of a full fine-tune; LoRA trains "
                         "adapters on the attention projections")
    if args.ema_decay and args.method == "lora":
        raise ValueError("--ema-decay averages a full fine-tune's UNet; it is not used with --method lora")
    if args.lr == 0.0:
        args.lr = DEFAULTS[recipe][2][METHODS.index(args.method) if args.method in METHODS else 0]


# --------------------------------------------------------------------------- the loss


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction: str):
    """``(x_t, target)``: ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`` (Ho et al. 2020, eq. 4) and what the network
    predicts: eps, ``v = sqrt(ab) eps - sqrt(1 - ab) x0`` (Salimans & Ho 2022, sec. 4) or x0. ``alpha_bar``:
    ``(B,)``."""
    a = alpha_bar.sqrt().view(-1, 1, 1, 1)
    s = (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0 + s * noise
    targets = {"epsilon": noise, "v_prediction": a * noise - s * x0, "sample": x0}
    if prediction not in targets:
        raise ValueError(f"fine-tuning supports epsilon, v_prediction and sample models, not {prediction!r}")
    return x_t, targets[prediction]


def prior_preservation_loss(pred: torch.Tensor, target: torch.Tensor, instances: int, weight: float,
                            timestep_weights: torch.Tensor | None = None):
    """DreamBooth eq. 2: the batch holds ``instances`` subject examples then class examples; returns
    ``mse(subject) + weight * mse(class)`` (just the first term when there are no class examples). Each example's
    squared error is weighted by ``timestep_weights`` ``(B,)`` when given (``common.loss_weights``)."""
    per_sample = (pred.float() - target).square().mean(dim=tuple(range(1, pred.dim())))  # (B,)
    if timestep_weights is not None:
        per_sample = per_sample * timestep_weights.to(per_sample)
    instance = per_sample[:instances].mean()
    if instances == pred.shape[0]:
        return instance
    return instance + weight * per_sample[instances:].mean()


# --------------------------------------------------------------------------- data


def class_image_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("class-*.png"))


def class_captions(prompts: list[str], count: int) -> list[str]:
    """The prompt of class image k: ``prompts[k mod n]``."""
    return [prompts[k % len(prompts)] for k in range(count)]


def ensure_class_images(pipe, folder: Path, prompts: list[str], count: int, seed: int, steps: int,
                        guidance: float):
    """Generate the missing ``class-XXXXX.png`` with the base model (image k from ``prompts[k mod n]`` with seed
    ``seed + k``; PNG metadata records both). An existing image made from another prompt is an error, not silently
    reused."""
    from pipelines.metadata import read_parameters, save_png

    folder.mkdir(parents=True, exist_ok=True)
    wanted = class_captions(prompts, count)
    for path, prompt in zip(class_image_files(folder)[:count], wanted):
        try:
            made_for = read_parameters(path).get("prompt")
        except ValueError:  # a class image the user supplied, without our metadata
            made_for = None
        if made_for is not None and made_for != prompt:
            raise ValueError(f"class image {path} was generated for {made_for!r}, not {prompt!r}; use another "
                             f"--class-data-dir")
    have = len(class_image_files(folder))
    for k in range(have, count):
        out = pipe(wanted[k], num_inference_steps=steps, guidance_scale=guidance, seed=seed + k, progress=False)
        save_png(out.images[0], folder / f"class-{k:05d}.png", out.parameters[0])
        print(f"class images: {k + 1}/{count}", end="\r" if k + 1 < count else "\n", flush=True)
    return class_image_files(folder)[:count]


@torch.no_grad()
def encode_images(pipe, pixels: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std ``(N, C, h, w)`` of images ``(N, 3, H, W)`` in [-1, 1] (the VAE is frozen, so
    they are computed once; a training latent is ``mean + std * noise``, a fresh posterior sample)."""
    means, stds = [], []
    for start in range(0, len(pixels), batch):
        dist = pipe.vae.encode(pixels[start:start + batch].to(pipe.vae.device, pipe.vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu().contiguous())  # chunk() views are strided
        stds.append(dist.std.float().cpu().contiguous())
    return torch.cat(means), torch.cat(stds)


def to_network_units(latents: torch.Tensor, vae_config) -> torch.Tensor:
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents - shift) * vae_config.scaling_factor


# --------------------------------------------------------------------------- trainable parts


class TextConditionedUNet(torch.nn.Module):
    """The UNet and its text encoder as one module whose forward is a training prediction, so that DDP synchronises
    the gradients of both (DDP does so only for what runs through its forward) and FSDP can shard both."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module, train_text_encoder: bool):
        super().__init__()
        self.unet, self.text_encoder, self.train_text_encoder = unet, text_encoder, train_text_encoder

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``x_t`` (B, C, h, w), timesteps ``t`` (B,), token ids (B, 77) -> the UNet's prediction (B, C, h, w)."""
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            cond = self.text_encoder(ids)[0]  # (B, 77, D)
        return self.unet(x_t, t, encoder_hidden_states=cond).sample



def add_lora(network: torch.nn.Module, targets: list[str], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Inject peft LoRA layers (alpha = rank, A Kaiming-uniform from ``seed``, B zero, so training starts at the
    base model) and return the trainable tensors by name."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=targets)
    common.seeded_init(seed, lambda: network.add_adapter(config))
    params = lora_parameters(network)
    for n, p in network.named_parameters():
        p.requires_grad_(n in params)
    return params


def unet_trainable(unet: torch.nn.Module, which: str) -> dict[str, torch.nn.Parameter]:
    """The UNet weights a full fine-tune trains (``which`` is ``--unet-params``), marked trainable; the rest frozen.
    ``cross_attention_kv``: the ``attn2.to_k`` / ``attn2.to_v`` projections of every transformer block (Custom
    Diffusion, Kumari et al. 2022, sec. 3.2), the only weights that map text tokens into the image features."""
    if which not in UNET_PARAMS:
        raise ValueError(f"unknown --unet-params {which!r}; known: {', '.join(UNET_PARAMS)}")
    chosen = {k: p for k, p in unet.named_parameters()
              if which == "all" or re.search(r"\.attn2\.to_[kv]\.", k)}
    if not chosen:
        raise ValueError(f"--unet-params {which}: this UNet has no such weights")
    for k, p in unet.named_parameters():
        p.requires_grad_(k in chosen)
    return chosen


def add_trainable_word(pipe, word: str, initializer: str, count: int) -> tuple[torch.nn.Parameter, list[int]]:
    """Textual inversion's new word (Gal et al. 2022, sec. 4.1): ``count`` vectors, each a copy of the one-token
    ``initializer`` word's embedding; returns the token table ``(V, D)`` and the new rows."""
    from ldm.text import prompt_token_ids

    ids = prompt_token_ids(pipe.tokenizer, initializer)
    if len(ids) != 1:
        raise ValueError(f"--initializer-token must be one token of the vocabulary; {initializer!r} is {len(ids)}")
    table = pipe.text_encoder.get_input_embeddings().weight  # (V, D)
    pipe.add_textual_inversion(word, table[ids].detach().clone().repeat(count, 1))
    new = new_token_ids(pipe, word)
    if new != list(range(new[0], new[0] + count)):  # checkpoints keep the rows as one slice
        raise ValueError(f"the tokenizer gave {word!r} non-consecutive ids {new}")
    return pipe.text_encoder.get_input_embeddings().weight, new  # (V + count, D)


def train_only_rows(table: torch.nn.Parameter, trained: list[int]):
    """Make ``trained`` the only rows of ``table`` ``(V, D)`` that learn: a gradient hook zeroes the others'
    gradients (so gradient clipping sees the new word's alone), and the returned after-step hook puts the others
    back (AdamW's weight decay touches every row), as diffusers' textual-inversion script does."""
    table.requires_grad_(True)
    original, others = table.detach().clone(), torch.ones(len(table), dtype=torch.bool)
    others[trained] = False
    table.register_hook(lambda grad: grad.masked_fill(others[:, None].to(grad.device), 0.0))

    def keep(step: int) -> None:
        with torch.no_grad():
            table[others] = original[others]
    return keep


def new_token_ids(pipe, word: str) -> list[int]:
    """The token ids of an added word's vectors (``word``, ``word_1``, ...)."""
    from pipelines.embeddings import token_names

    return pipe.tokenizer.convert_tokens_to_ids(token_names(word, pipe.embeddings[word]))


def lora_parameters(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's LoRA parameters by name (as they are now: FSDP replaces them when it shards)."""
    return {n: p for n, p in network.named_parameters() if "lora_" in n}


def lora_layers(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's LoRA tensors in diffusers' serialisation layout (FSDP shards gathered: every process calls)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = common.gather_tensors(network.state_dict())
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(network, state_dict=state))


def save_final(args, pipe, base: Path, final: Path, accelerator, unet_average=None) -> Path:
    """Full fine-tune: a complete model folder (base components copied, trained ones saved; the UNet is
    ``unet_average`` when given, an EMA). LoRA: diffusers' ``pytorch_lora_weights.safetensors``. Every process calls
    this (FSDP gathers); the main one writes."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from safetensors.torch import save_file

    if args.method == "embedding":  # diffusers' {word: (n, D)}, which pipe.load_textual_inversion reads
        vectors = pipe.text_encoder.get_input_embeddings().weight[new_token_ids(pipe, args.identifier)]
        if accelerator.is_main_process:
            final.mkdir(parents=True, exist_ok=True)
            save_file({args.identifier: vectors.detach().float().contiguous()}, str(final / EMBEDDING_FILE))
        return final / EMBEDDING_FILE
    if args.method == "lora":
        unet_layers = lora_layers(pipe.unet)
        text_layers = lora_layers(pipe.text_encoder) if args.train_text_encoder else None
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            final.mkdir(parents=True)
            StableDiffusionLoraLoaderMixin.save_lora_weights(final, unet_lora_layers=unet_layers,
                                                             text_encoder_lora_layers=text_layers)
            if getattr(args, "embedding", None):  # the word the LoRA was trained on, in diffusers' layout
                vectors = pipe.text_encoder.get_input_embeddings().weight[new_token_ids(pipe, args.identifier)]
                save_file({args.identifier: vectors.detach().float().contiguous()}, str(final / EMBEDDING_FILE))
        return final / "pytorch_lora_weights.safetensors"
    networks = {"unet": unet_average if unet_average is not None else common.full_model(accelerator, pipe.unet)}
    pivot = bool(getattr(args, "embedding", None))  # the text tower and tokenizer now hold the new word
    if args.train_text_encoder or pivot:
        networks["text_encoder"] = common.full_model(accelerator, pipe.text_encoder)
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        replaced = set(networks) | ({"tokenizer"} if pivot else set())
        shutil.copytree(base, final, ignore=lambda folder, names: [n for n in names if Path(folder) == base
                                                                   and n in replaced])
        for name, network in networks.items():
            network.save_pretrained(final / name, safe_serialization=True)
        if pivot:
            from ldm.text import save_tokenizer

            save_tokenizer(pipe.tokenizer, final / "tokenizer")
    return final


# --------------------------------------------------------------------------- main


def run(argv: list[str] | None = None, recipe: str = "dreambooth") -> dict:
    """Run ``recipe`` (dreambooth | lora) with command-line ``argv``; returns losses, metrics and the output."""
    from pipelines.text_to_image import DEFAULT_MODEL, TextToImagePipeline

    if recipe not in RECIPES:
        raise ValueError(f"unknown fine-tuning recipe {recipe!r}; known: {', '.join(RECIPES)}")
    args = build_parser(recipe).parse_args(argv)
    check_args(args, recipe)
    subject = recipe != "lora"  # DreamBooth and textual inversion learn a subject from a few images
    data_dir = args.instance_data if subject else args.data
    examples = scan_folder(data_dir, captions="optional" if subject else "required")
    captions = (instance_captions(examples, args.instance_prompt, args.identifier) if subject
                else [e.caption for e in examples])
    base = Path(args.model) if args.model else DEFAULT_MODEL
    pipe = TextToImagePipeline.from_pretrained(base)
    if pipe.is_flow:
        raise ValueError(f"{base} is a flow-matching model; these recipes train UNet (VP) models")
    common.check_standard_unet(pipe)
    if args.loss_weighting == "min_snr" and pipe.prediction_type != "v_prediction":
        raise ValueError(f"--loss-weighting min_snr is written for v-prediction models; {base} predicts "
                         f"{pipe.prediction_type}")
    pipe.to(dtype=torch.float32)
    if getattr(args, "embedding", None):  # pivotal tuning: the identifier is a word learnt by textual inversion
        word = pipe.load_textual_inversion(args.embedding)
        if word != args.identifier:
            raise ValueError(f"--embedding {args.embedding} holds the word {word!r}, not the identifier "
                             f"{args.identifier!r}; pass --identifier {word!r} (and name it in the prompts)")
    if args.method == "embedding":  # before anything is written: the word and its initializer are checked here
        table, word_ids = add_trainable_word(pipe, args.identifier, args.initializer_token, args.num_vectors)
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if resolution % pipe.vae_scale_factor:
        raise ValueError(f"--resolution must be a multiple of {pipe.vae_scale_factor}, got {resolution}")
    if args.dry_run:
        print(describe(examples, resolution, args.resize))
        return {"dry_run": True, "examples": len(examples)}
    config = {"base": str(base.resolve()), "method": args.method, "unet_params": args.unet_params,
              "rank": args.rank if args.method == "lora" else 0,
              "train_text_encoder": args.train_text_encoder, "resolution": resolution,
              **({"word": args.identifier, "initializer": args.initializer_token, "vectors": args.num_vectors}
                 if args.method == "embedding" else {}),
              **({"embedding": str(Path(args.embedding).resolve())} if getattr(args, "embedding", None) else {}),
              "unet": {k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")}}
    common.check_resumable(args, recipe, config)
    out = common.ensure_output_dir(args)
    accelerator = common.make_accelerator(args)
    log = common.RunLog(out, accelerator.is_main_process)

    # Subject / dataset images and captions; class images from the base model, before any weight changes.
    pixels = load_pixels([e.path for e in examples], resolution, args.resize)
    class_latents = None
    if args.prior_loss_weight > 0:
        folder = Path(args.class_data_dir) if args.class_data_dir else out / "class_images"
        if accelerator.is_main_process:  # one process generates, the others wait and read
            ensure_class_images(pipe, folder, args.class_prompt, args.num_class_images, args.seed,
                                args.class_steps, args.class_guidance)
        accelerator.wait_for_everyone()
        files = class_image_files(folder)[:args.num_class_images]
        class_latents = encode_images(pipe, load_pixels(files, resolution, args.resize))
    latents = encode_images(pipe, pixels)

    # Trainable parameters (and, for --prior-target base, a frozen copy of the base made before anything changes).
    unet, text_encoder = pipe.unet, pipe.text_encoder
    frozen = None
    if recipe == "dreambooth" and args.prior_target == "base" and class_latents is not None:
        frozen = copy.deepcopy(TextConditionedUNet(unet, text_encoder, False)).requires_grad_(False).eval()
    if args.method == "embedding":
        unet.requires_grad_(False)
        text_encoder.requires_grad_(False)
        keep_other_rows = train_only_rows(table, word_ids)
        trainable = {"text_encoder.token_embedding": table}
    elif args.method == "lora":
        trainable = add_lora(unet, UNET_LORA_TARGETS, args.rank, args.seed)
        if args.train_text_encoder:
            trainable |= {f"text_encoder.{k}": v for k, v in
                          add_lora(text_encoder, TEXT_LORA_TARGETS, args.rank, args.seed + 1).items()}
    else:
        trainable = {f"unet.{k}": p for k, p in unet_trainable(unet, args.unet_params).items()}
        text_encoder.requires_grad_(args.train_text_encoder)
        if args.train_text_encoder:
            trainable |= {f"text_encoder.{k}": p for k, p in text_encoder.named_parameters()}
    denoiser = TextConditionedUNet(unet, text_encoder, args.train_text_encoder or args.method == "embedding")
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=args.lr, weight_decay=1e-2)
    model, optimizer = accelerator.prepare(common.declare_fsdp_units(denoiser), optimizer)
    if args.method == "embedding":  # the new rows (a view: a resumed run copies into the table)
        checkpoint_models = {"embedding": {"vectors": table[word_ids[0]:word_ids[-1] + 1]}}
    elif args.method == "lora":  # the parameters as prepared (FSDP replaces them with sharded ones)
        checkpoint_models = {"lora": lora_parameters(unet)}
        if args.train_text_encoder:
            checkpoint_models["lora"] |= {f"text_encoder.{k}": p for k, p in lora_parameters(text_encoder).items()}
    else:
        checkpoint_models = {"unet": unet} | ({"text_encoder": text_encoder} if args.train_text_encoder else {})
    ema = common.EMA(unet, args.ema_decay)
    if ema.state is not None:
        checkpoint_models["unet_ema"] = ema.state
    device = accelerator.device
    if frozen is not None:
        frozen.to(device)

    from ldm.text import tokenize_batch

    schedule = pipe.schedule("ddim")
    alpha_bar = schedule.alphas_cumprod.to(device)  # (T,)
    caption_ids = tokenize_batch(pipe.tokenizer, captions)[:, 0]  # (N, 77)
    class_ids = (tokenize_batch(pipe.tokenizer, class_captions(args.class_prompt, len(class_latents[0])))[:, 0]
                 if class_latents is not None else None)  # (N_class, 77)
    empty_ids = tokenize_batch(pipe.tokenizer, [""])[:, 0]  # (1, 77): the unconditional branch's caption

    def loss_fn(step: int, micro: int) -> torch.Tensor:
        rng = common.numpy_rng(args.seed, common.STREAM_DATA, step, micro, accelerator.process_index)
        idx = torch.from_numpy(rng.integers(0, len(caption_ids), size=args.batch_size))
        mean, std, ids = latents[0][idx], latents[1][idx], caption_ids[idx]
        if class_latents is not None:
            cls = torch.from_numpy(rng.integers(0, len(class_latents[0]), size=args.class_batch_size))
            mean = torch.cat([mean, class_latents[0][cls]])
            std = torch.cat([std, class_latents[1][cls]])
            ids = torch.cat([ids, class_ids[cls]])
        if args.caption_dropout > 0:  # drawn last, so runs without dropout keep their random streams
            drop = torch.from_numpy(rng.random(len(ids)) < args.caption_dropout)  # (B',)
            if args.caption_dropout_on == "class":
                drop[:args.batch_size] = False
            ids = torch.where(drop[:, None], empty_ids, ids)
        gen = common.torch_generator(args.seed, common.STREAM_NOISE, step, micro, accelerator.process_index)
        x0 = to_network_units(mean + std * torch.randn(mean.shape, generator=gen), pipe.vae.config)  # (B', C, h, w)
        t = torch.randint(0, len(alpha_bar), (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        t, ids = t.to(device), ids.to(device)
        x_t, target = training_target(x0.to(device), noise.to(device), alpha_bar[t], pipe.prediction_type)
        with accelerator.autocast():
            pred = model(x_t, t, ids)
            if frozen is not None:  # class rows: towards the base model's own prediction
                with torch.no_grad():
                    n = args.batch_size
                    target[n:] = frozen(x_t[n:], t[n:], ids[n:]).float()
        weights = common.loss_weights(alpha_bar[t], args.loss_weighting, args.min_snr_gamma)  # (B',)
        return prior_preservation_loss(pred, target.float(), args.batch_size, args.prior_loss_weight, weights)

    prompts = args.validation_prompt or ([args.instance_prompt] if subject else captions[:4])

    def sample_fn(step: int) -> None:
        denoiser.eval()
        with common.unsharded(model):  # the pipeline calls the UNet and the text encoder themselves
            images = pipe(prompts, num_inference_steps=args.validation_steps,
                          guidance_scale=args.validation_guidance, seed=args.seed, output_type="pt",
                          progress=False).images  # (N, 3, H, W) in [0, 1]
        if accelerator.is_main_process:
            common.save_grid(images * 2 - 1, out / "samples" / f"step-{step:07d}.png", nrow=len(prompts))

    result = common.train_loop(args=args, accelerator=accelerator, recipe=recipe, model_config=config,
                               model=model, optimizer=optimizer, loss_fn=loss_fn,
                               checkpoint_models=checkpoint_models, log=log, desc=recipe, sample_fn=sample_fn,
                               after_step=keep_other_rows if args.method == "embedding" else ema.update)
    denoiser.eval()
    if common.stopped_early(accelerator, result, args.steps):
        return result
    saved = save_final(args, pipe, base, out / "final", accelerator,
                       ema.averaged() if ema.state is not None else None)
    trained = (len(word_ids) * table.shape[1] if args.method == "embedding"
               else sum(p.numel() for p in trainable.values()))
    metrics = {"steps": args.steps, "method": args.method, "trainable_params": trained, "images": len(examples),
               "class_images": 0 if class_latents is None else len(class_latents[0]),
               "steps_per_second": result["steps_per_second"],
               "final_loss": result["losses"][-1] if result["losses"] else None}
    if accelerator.is_main_process:
        common.finish_run(accelerator, log, out, recipe, metrics, saved)
    accelerator.end_training()
    return {**result, "metrics": metrics, "saved": saved}


def main(argv: list[str] | None = None, recipe: str = "dreambooth") -> int:
    """Command-line entry (``ldm train dreambooth|lora|textual-inversion`` calls this)."""
    run(argv, recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[2:], sys.argv[1]))
