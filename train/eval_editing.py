"""``ldm eval --task editing``: the editing tables of a shapes-world model, read back by the evaluator.

* Inversion round trip (Mokady et al. 2022, sec. 3): held-out renders inverted with DDIM and sampled back; PSNR
  at guidance 1, plain DDIM inversion at guidance 7.5, null-text inversion at 7.5, beside the VAE's own round trip
  (the upper bound).
* Prompt-to-prompt (Hertz et al. 2022) colour and shape swaps on generated images (many seeds) and on inverted
  renders: an edit succeeds when the evaluator reads the target attribute, the object's centroid moves < 3 px and
  the background is unchanged (mean absolute change < 0.02 outside both objects, dilated by 2 px).
* Inpainting: a render's object masked (dilated) and repainted from a prompt naming another object there; scored
  as a single-object prompt.
* SDEdit (Meng et al. 2022): strength vs faithfulness (PSNR / SSIM to the input) and vs prompt accuracy, the
  prompt asking for another colour.
* Real photographs (scikit-image's bundled samples): inversion PSNRs, inpainting's untouched outside, SDEdit's
  faithfulness.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from train.evaluate import detect_objects, score
from train.shapes import (BASE_SHAPES, OBJECT_COLORS, POSITIONS, Scene, is_heldout, make_object, parse_prompt,
                          render, render_masks)

CENTROID_TOLERANCE = 3.0  # pixels
BACKGROUND_TOLERANCE = 0.02  # mean absolute change in [0, 1]
OTHER_COLOR = {"red": "blue", "green": "purple", "blue": "red", "yellow": "green", "purple": "orange",
               "orange": "yellow"}
OTHER_SHAPE = {"circle": "square", "square": "triangle", "triangle": "circle"}


# --------------------------------------------------------------------------- measures


def psnr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """PSNR in dB of images in [0, 1] (any shape)."""
    mse = float(np.mean((reference.astype(np.float64) - estimate.astype(np.float64)) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def ssim(reference: np.ndarray, estimate: np.ndarray, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004, eq. 13) of RGB images ``(H, W, 3)`` in [0, 1], Gaussian window, per channel."""
    c1, c2 = 0.01**2, 0.03**2
    blur = lambda a: ndimage.gaussian_filter(a, sigma=(sigma, sigma, 0))  # noqa: E731
    x, y = reference.astype(np.float64), estimate.astype(np.float64)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    return float(np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))))


def as_array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)[..., :3] / 255.0


def edit_outcome(source, edited, attribute: str, wanted: str) -> dict:
    """Did an edit change ``attribute`` (``"color"`` or ``"shape"``) of the largest object to ``wanted`` while
    keeping its place and the background? Centroid shift in pixels, background change in [0, 1]."""
    before, after = detect_objects(source), detect_objects(edited)
    if not before.objects or not after.objects:
        return {"success": False, "attribute": False, "shift": float("inf"), "background": float("inf")}
    a, b = before.objects[0], after.objects[0]
    shift = float(np.hypot(a.centroid[0] - b.centroid[0], a.centroid[1] - b.centroid[1]))
    objects = ndimage.binary_dilation(a.mask | b.mask, iterations=2)
    change = np.abs(as_array(source) - as_array(edited)).mean(axis=2)  # (H, W)
    background = float(change[~objects].mean()) if (~objects).any() else 0.0
    changed = getattr(b, attribute) == wanted
    return {"success": bool(changed and shift < CENTROID_TOLERANCE and background < BACKGROUND_TOLERANCE),
            "attribute": bool(changed), "shift": shift, "background": background}


def summarize(outcomes: list[dict]) -> dict:
    return {"success": float(np.mean([o["success"] for o in outcomes])),
            "attribute": float(np.mean([o["attribute"] for o in outcomes])),
            "centroid<3px": float(np.mean([o["shift"] < CENTROID_TOLERANCE for o in outcomes])),
            "background kept": float(np.mean([o["background"] < BACKGROUND_TOLERANCE for o in outcomes])),
            "count": len(outcomes)}


# --------------------------------------------------------------------------- test material


def single_object_scenes(count: int, seed: int, size: int) -> list[tuple[Scene, str]]:
    """Renders with one large object and a caption in one fixed wording, so that swapping a colour or shape word
    keeps the token count (what a ``replace`` edit needs)."""
    rng = np.random.default_rng([seed, 77])
    positions = [p for p in POSITIONS if p != "center"] + ["center"]
    out = []
    for _ in range(count):
        color = str(rng.choice(list(OBJECT_COLORS)))
        shape = str(rng.choice(BASE_SHAPES))
        position = str(rng.choice(positions))
        background = str(rng.choice(["white", "black", "gray"]))
        scene = Scene(background, (make_object(color, shape, position, "large", size),), image_size=size)
        where = "in the center" if position == "center" else f"at the {position}"
        out.append((scene, f"a {color} {shape} {where} on a {background} background"))
    return out


def swapped(caption: str, attribute: str) -> tuple[str, str, str]:
    """``(target caption, old word, new word)`` with the colour or shape word replaced."""
    words = caption.split()
    table = OTHER_COLOR if attribute == "color" else OTHER_SHAPE
    index = 2 if attribute == "shape" else 1  # "a <colour> <shape> ..."
    old, new = words[index], table[words[index]]
    words[index] = new
    return " ".join(words), old, new


# --------------------------------------------------------------------------- tables


def reconstructions(pipe, image, caption: str, steps: int = 50, guidance: float = 7.5) -> dict:
    """One image's reconstructions ``(H, W, 3)`` in [0, 1]: the VAE round trip (the bound), DDIM inversion at
    guidance 1 and at ``guidance``, null-text inversion at ``guidance``, each sampled back with :meth:`reconstruct`."""
    row = {"VAE round trip": as_array(pipe.img2img(image, caption, strength=0.0, progress=False).images[0])}
    for name, scale, null_text in (("DDIM inversion, CFG 1", 1.0, False),
                                    (f"DDIM inversion, CFG {guidance}", guidance, False),
                                    (f"null-text inversion, CFG {guidance}", guidance, True)):
        inversion = pipe.invert(image, caption, steps, scale, null_text=null_text, progress=False)
        row[name] = as_array(pipe.reconstruct(inversion, progress=False).images[0])
    return row


def inversion_psnrs(pipe, image, caption: str, steps: int = 50, guidance: float = 7.5) -> dict:
    """Reconstruction PSNR (dB) to the image of each of :func:`reconstructions`."""
    target = as_array(image)
    return {name: psnr(target, out) for name, out in reconstructions(pipe, image, caption, steps, guidance).items()}


def inversion_table(pipe, count: int = 8, seed: int = 0, steps: int = 50, guidance: float = 7.5) -> dict:
    """Mean reconstruction PSNR (dB) of inverted renders (:func:`inversion_psnrs`)."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    rows = [inversion_psnrs(pipe, render(scene), caption, steps, guidance)
            for scene, caption in tqdm(single_object_scenes(count, seed, size), desc="inversion", leave=False)]
    return {name: float(np.mean([row[name] for row in rows])) for name in rows[0]}


PHOTOGRAPHS = {"astronaut": "a photo of an astronaut", "coffee": "a photo of a cup of coffee",
               "chelsea": "a photo of a cat", "rocket": "a photo of a rocket"}


def photograph(name: str, size: int) -> Image.Image:
    """One of scikit-image's bundled sample photographs (offline), centre-cropped square and resized to ``size``."""
    try:
        from skimage import data
    except ImportError as error:
        raise RuntimeError("the photographs come from scikit-image: pip install scikit-image") from error
    pixels = getattr(data, name)()  # (H, W, 3) uint8
    h, w = pixels.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(pixels[top:top + side, left:left + side])
    return square.resize((size, size), Image.Resampling.LANCZOS)


def photo_table(pipe, steps: int = 50, guidance: float = 7.5, strengths=(0.2, 0.4, 0.6, 0.8)) -> dict:
    """Real photographs (scikit-image's samples, outside the shapes world): inversion PSNRs as
    :func:`inversion_psnrs` and, at guidance 1, to the VAE's round trip (which isolates the inversion's own error
    when the VAE cannot reproduce a photograph), the largest pixel change outside an inpainting mask
    (0 = bit-identical), and SDEdit's PSNR / SSIM to the input by strength (prompt "a red circle" from the shapes
    world, 20 steps)."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    table = {}
    for name, caption in tqdm(PHOTOGRAPHS.items(), desc="photographs", leave=False):
        image = photograph(name, size)
        outputs = reconstructions(pipe, image, caption, steps, guidance)
        row = {key: psnr(as_array(image), out) for key, out in outputs.items()}
        refined = pipe.invert(image, caption, steps, fixed_point_iterations=3, progress=False)
        for iterations, back in ((0, outputs["DDIM inversion, CFG 1"]),
                                 (3, as_array(pipe.reconstruct(refined, progress=False).images[0]))):
            row[f"DDIM inversion, CFG 1, {iterations} fixed-point iterations: PSNR to the VAE round trip"] = psnr(
                outputs["VAE round trip"], back)
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
        painted = pipe.inpaint(image, Image.fromarray(mask), "a red circle", seed=0, num_inference_steps=20,
                               progress=False).images[0]
        outside = np.abs(np.asarray(painted, dtype=int) - np.asarray(image, dtype=int))[mask == 0]
        row["inpaint: largest change outside the mask"] = int(outside.max())
        for strength in strengths:
            out = pipe.img2img(image, "a red circle", strength=strength, seed=0, num_inference_steps=20,
                               progress=False).images[0]
            row[f"SDEdit {strength} PSNR"] = psnr(as_array(image), as_array(out))
            row[f"SDEdit {strength} SSIM"] = ssim(as_array(image), as_array(out))
        table[name] = row
    table["mean"] = {key: float(np.mean([table[name][key] for name in PHOTOGRAPHS])) for key in row}
    return table


def swap_table(pipe, seeds: int, edit_pair, name: str) -> dict:
    """Colour and shape swaps of generated single-object scenes over ``seeds`` seeds: ``edit_pair(k, caption,
    target)`` returns the (source, edited) images of seed ``k``; outcomes over all sources and over the sources
    the evaluator reads back as their own prompt."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    captions = [c for _, c in single_object_scenes(seeds, 1, size)]
    table = {}
    for attribute in ("color", "shape"):
        outcomes, source_ok = [], []
        for k in tqdm(range(seeds), desc=f"{name} {attribute}", leave=False):
            target, old, new = swapped(captions[k], attribute)
            source, edited = edit_pair(k, captions[k], target)
            outcomes.append(edit_outcome(source, edited, attribute, new))
            source_ok.append(score(parse_prompt(captions[k]), source)["all"])
        good = [o for o, ok in zip(outcomes, source_ok) if ok]
        table[f"{attribute} swap, generated"] = summarize(outcomes)
        table[f"{attribute} swap, generated, correct sources"] = summarize(good) if good else {"count": 0}
    return table


def p2p_generated_table(pipe, seeds: int = 50, steps: int = 20, guidance: float = 7.5,
                        cross_replace_steps: float = 0.8, self_replace_steps: float = 0.4) -> dict:
    """Colour and shape swaps of generated images over ``seeds`` seeds (local blend on the object word), with the
    controller's cross- and self-attention replacement fractions."""
    def edit_pair(k, caption, target):
        shape_words = [caption.split()[2], target.split()[2]]
        return pipe.prompt_to_prompt([caption, target], seed=k, num_inference_steps=steps, guidance_scale=guidance,
                                     local_blend=sorted(set(shape_words)), cross_replace_steps=cross_replace_steps,
                                     self_replace_steps=self_replace_steps, progress=False).images

    return swap_table(pipe, seeds, edit_pair, "p2p")


def flowedit_generated_table(pipe, seeds: int = 50, steps: int = 20, guidance: float = 7.5,
                             source_guidance: float = 3.5, strength: float = 0.8) -> dict:
    """The swaps of :func:`p2p_generated_table` made by FlowEdit instead (Kulikov et al. 2024; ``pipe.flow_edit``):
    the same generated sources (same seeds, prompts, steps and guidance), each edited from its clean latents,
    target guidance ``guidance``, source guidance ``source_guidance``, over the last ``strength`` of the
    schedule; fresh noise from seed 1000 + k."""
    def edit_pair(k, caption, target):
        latents = pipe(caption, seed=k, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                       progress=False).images
        edited = pipe.flow_edit(latents, caption, target, strength=strength, num_inference_steps=steps,
                                guidance_scale=guidance, source_guidance_scale=source_guidance, seed=1000 + k,
                                progress=False).images[0]
        return pipe.to_pil(pipe.decode(latents))[0], edited

    return swap_table(pipe, seeds, edit_pair, "flowedit")


def p2p_real_table(pipe, count: int = 10, steps: int = 50, guidance: float = 7.5) -> dict:
    """Colour and shape swaps of inverted renders (null-text inversion at ``guidance``)."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    table = {}
    material = single_object_scenes(count, 2, size)
    inversions = [pipe.invert(render(scene), caption, steps, guidance, null_text=True, progress=False)
                  for scene, caption in tqdm(material, desc="inverting", leave=False)]
    for attribute in ("color", "shape"):
        outcomes = []
        for (scene, caption), inversion in zip(material, inversions):
            target, _, new = swapped(caption, attribute)
            shape_words = sorted({caption.split()[2], target.split()[2]})
            _, edited = pipe.edit(inversion, target, local_blend=shape_words, progress=False).images
            outcomes.append(edit_outcome(render(scene), edited, attribute, new))
        table[f"{attribute} swap, inverted renders"] = summarize(outcomes)
    return table


def inpaint_mask(object_mask: np.ndarray, kind: str, margin: int | None = None) -> np.ndarray:
    """What a user would paint over an object to replace it: ``"object"`` = its silhouette dilated ``margin``
    (default 4) px (a new shape must then fit inside the old one's outline), ``"box"`` = its bounding box grown
    ``margin`` (default 8) px on each side."""
    if kind == "object":
        return ndimage.binary_dilation(object_mask, iterations=4 if margin is None else margin)
    margin = 8 if margin is None else margin
    rows, cols = np.nonzero(object_mask)
    box = np.zeros_like(object_mask)
    top, left = max(rows.min() - margin, 0), max(cols.min() - margin, 0)
    box[top:rows.max() + margin + 1, left:cols.max() + margin + 1] = True
    return box


def inpaint_table(pipe, count: int = 32, steps: int = 20, guidance: float = 7.5, seed: int = 3,
                  masks: tuple[str, ...] = ("object", "box"),
                  resampling: tuple[tuple[int, int], ...] = ((1, 1), (5, 4))) -> dict:
    """Repaint a render's object as another colour and shape at the same place, for each mask kind of
    :func:`inpaint_mask` and each RePaint setting ``(jump_length, jump_n_sample)`` (``(1, 1)`` = no
    resampling); the evaluator reads the target prompt back from the output."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    material = single_object_scenes(count, seed, size)
    table = {}
    for kind in masks:
        for jump_length, jump_n_sample in resampling:
            name = f"{kind} mask" + (f", RePaint j={jump_length} r={jump_n_sample}" if jump_n_sample > 1 else "")
            results, heldout = [], []
            for k, (scene, caption) in enumerate(tqdm(material, desc=f"inpaint ({name})", leave=False)):
                target, _, _ = swapped(swapped(caption, "color")[0], "shape")
                mask = inpaint_mask(render_masks(scene)[0], kind)
                out = pipe.inpaint(render(scene), Image.fromarray(mask.astype(np.uint8) * 255), target, seed=k,
                                   num_inference_steps=steps, guidance_scale=guidance, progress=False,
                                   jump_length=jump_length, jump_n_sample=jump_n_sample).images[0]
                expected = parse_prompt(target)
                results.append(score(expected, out))
                heldout.append(is_heldout(expected))
            table[name] = {key: float(np.mean([r[key] for r in results]))
                           for key in ("color", "shape", "position", "all")} | {"count": count}
            table[name] |= split_by_heldout([r["all"] for r in results], heldout)
    return table


def split_by_heldout(right: list[bool], heldout: list[bool]) -> dict:
    """How often the targets of seen and of held-out combinations (see ``train.shapes``) were right, and how many
    targets were held out: a swapped colour or shape can land on a combination no training render shows."""
    right, heldout = np.asarray(right, dtype=bool), np.asarray(heldout, dtype=bool)

    def rate(rows: np.ndarray) -> float:
        return float(right[rows].mean()) if rows.any() else float("nan")

    return {"all, seen": rate(~heldout), "all, held-out": rate(heldout), "held-out count": int(heldout.sum())}


def sdedit_table(pipe, strengths=(0.2, 0.4, 0.6, 0.8, 1.0), count: int = 16, steps: int = 20,
                 guidance: float = 7.5, seed: int = 4) -> dict:
    """For each strength: PSNR and SSIM to the input render, and how often the evaluator reads the prompt (which
    asks for another colour) in the output."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    material = single_object_scenes(count, seed, size)
    table = {}
    for strength in strengths:
        p, s, hits = [], [], []
        for k, (scene, caption) in enumerate(material):
            target = swapped(caption, "color")[0]
            image = render(scene)
            out = pipe.img2img(image, target, strength=strength, seed=k, num_inference_steps=steps,
                               guidance_scale=guidance, progress=False).images[0]
            p.append(psnr(as_array(image), as_array(out)))
            s.append(ssim(as_array(image), as_array(out)))
            hits.append(score(parse_prompt(target), out)["all"])
        table[f"strength {strength}"] = {"psnr": float(np.mean(p)), "ssim": float(np.mean(s)),
                                         "prompt accuracy": float(np.mean(hits))}
    return table


def resample_table(pipe, strengths=(0.2, 0.4, 0.6, 0.8, 1.0), count: int = 24, steps: int = 20,
                   guidances=(1.0, 7.5), seed: int = 5) -> dict:
    """SDEdit of renders towards their own caption: for each strength (how far down the schedule the render's
    latent is noised) and guidance, how often the evaluator still reads the caption's shape, and everything
    (colour + shape + position). A model that had learnt the world would keep them at every strength below 1;
    the strength where they drop is where along the schedule the model loses what the render showed."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    scenes = single_object_scenes(count, seed, size)
    material = [(render(scene), caption, parse_prompt(caption)) for scene, caption in scenes]  # rendered once
    table = {}
    for guidance in guidances:
        for strength in strengths:
            shape, everything = [], []
            for k, (image, caption, expected) in enumerate(material):
                out = pipe.img2img(image, caption, strength=strength, seed=k, num_inference_steps=steps,
                                   guidance_scale=guidance, progress=False).images[0]
                result = score(expected, out)
                shape.append(result["shape"])
                everything.append(result["all"])
            table[f"CFG {guidance}, strength {strength}"] = {"shape": float(np.mean(shape)),
                                                               "all": float(np.mean(everything))}
    return table


TABLES = {"inversion": inversion_table, "p2p": p2p_generated_table, "flowedit": flowedit_generated_table,
          "p2p_real": p2p_real_table,
          "inpaint": inpaint_table, "sdedit": sdedit_table, "resample": resample_table, "photos": photo_table}


def evaluate_editing(pipe, tables=tuple(TABLES), guidance: float = 7.5) -> dict:
    """Every requested table (keys of :data:`TABLES`) with its default sizes, at CFG ``guidance`` (the resample
    table keeps its own sweep of CFG 1 and 7.5)."""
    return {name: TABLES[name](pipe) if name == "resample" else TABLES[name](pipe, guidance=guidance)
            for name in tables}
