"""Tests of the shapes world (train/shapes.py) and its evaluator (train/evaluate.py)."""

import numpy as np
import pytest
import torch

from train.evaluate import (
    SINGLE_HELDOUT_PROMPTS,
    TWO_HELDOUT_PROMPTS,
    degrade,
    detect_objects,
    evaluate_pairs,
    evaluation_prompts,
    score,
    validate_evaluator,
)
from train.shapes import (
    BASE_SHAPES,
    OBJECT_COLORS,
    ExpectedObject,
    ExpectedScene,
    Scene,
    ShapesDataset,
    caption,
    collate_shapes,
    is_heldout,
    is_heldout_object,
    make_object,
    objects_overlap,
    parse_prompt,
    render,
    render_masks,
    sample_scene,
)

RELATION_POSITIONS = {
    "to the left of": ("left", "right"),
    "to the right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}


def _scenes(count, split, seed=0):
    """``count`` scenes of ``split`` from one generator."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for _ in range(count)]


def _scene_for(expected: ExpectedScene, background="white") -> Scene:
    """A nominal scene that satisfies an expectation (unstated positions/sizes filled in)."""
    positions = RELATION_POSITIONS.get(expected.relation, ("center",))
    objects = tuple(
        make_object(wanted.color, wanted.shape, wanted.position or default, wanted.size or "large")
        for wanted, default in zip(expected.objects, positions)
    )
    return Scene(expected.background or background, objects, expected.relation)


# --------------------------------------------------------------------------- dataset


def test_dataset_items_are_deterministic_per_seed_and_index():
    first, again, other = ShapesDataset(8, seed=3), ShapesDataset(8, seed=3), ShapesDataset(8, seed=4)
    for index in range(8):
        assert torch.equal(first[index]["image"], again[index]["image"])
        assert first[index]["caption"] == again[index]["caption"]
        assert first[index]["scene"] == again[index]["scene"]
    assert sum(not torch.equal(first[i]["image"], other[i]["image"]) for i in range(8)) >= 7
    assert len({first[i]["caption"] for i in range(8)}) >= 7


def test_dataset_item_format_and_collate():
    dataset = ShapesDataset(4, seed=0, size=64)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_shapes)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].min() < -0.5 or batch["image"].max() > 0.5
    assert isinstance(batch["caption"], list) and all(isinstance(text, str) for text in batch["caption"])
    assert all(isinstance(scene, Scene) for scene in batch["scene"])


@pytest.mark.parametrize("seed", [-1, 1.5, "3", True, None])
def test_bad_seed_raises(seed):
    with pytest.raises(ValueError, match="seed"):
        ShapesDataset(4, seed=seed)


@pytest.mark.parametrize("length", [0, -2, 2.0])
def test_bad_length_raises(length):
    with pytest.raises(ValueError, match="length"):
        ShapesDataset(length, seed=0)


@pytest.mark.parametrize("size", [0, -8, 100, 127, 64.0])
def test_bad_size_raises(size):
    with pytest.raises(ValueError, match="multiple of 8"):
        ShapesDataset(4, seed=0, size=size)
    with pytest.raises(ValueError, match="multiple of 8"):
        render(_scenes(1, "all")[0], size)
    with pytest.raises(ValueError, match="multiple of 8"):
        sample_scene(np.random.default_rng(0), image_size=size)


def test_bad_split_raises():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(4, seed=0, split="test")


# --------------------------------------------------------------------------- scenes


def test_train_split_never_contains_heldout_combinations():
    scenes = _scenes(2000, "train")
    assert not any(is_heldout(scene) for scene in scenes)
    objects = [obj for scene in scenes for obj in scene.objects]
    assert {obj.shape for obj in objects} == set(BASE_SHAPES)
    assert ("purple", "triangle") not in {(obj.color, obj.shape) for obj in objects}
    assert ("yellow", "top right") not in {(obj.color, obj.position) for obj in objects}
    assert 0.5 < np.mean([len(scene.objects) == 1 for scene in scenes]) < 0.7


def test_heldout_split_always_contains_a_heldout_combination():
    scenes = _scenes(500, "heldout")
    assert all(any(is_heldout_object(obj) for obj in scene.objects) for scene in scenes)
    assert {len(scene.objects) for scene in scenes} == {1, 2}


@pytest.mark.parametrize("probability, low, high", [(0.0, 0.0, 0.0), (0.3, 0.25, 0.45), (1.0, 1.0, 1.0)])
def test_one_object_probability_sets_the_mix_of_scenes(probability, low, high):
    """The share of one-object scenes follows ``one_object_probability`` (the train split's held-out filter drops
    two-object scenes more often, so it lands a little above it); the dataset passes it on."""
    rng = np.random.default_rng(0)
    single = np.mean([len(sample_scene(rng, "train", 64, probability).objects) == 1 for _ in range(400)])
    assert low <= single <= high
    dataset = ShapesDataset(20, seed=0, size=64, one_object_probability=probability)
    assert low <= np.mean([len(dataset[i]["scene"].objects) == 1 for i in range(20)]) <= max(high, 0.6)


@pytest.mark.parametrize("probability", [-0.1, 1.5, float("nan"), "0.5"])
def test_bad_one_object_probability_raises(probability):
    with pytest.raises(ValueError, match="one_object_probability must be a probability"):
        ShapesDataset(4, seed=0, one_object_probability=probability)


def test_all_split_mixes_seen_and_heldout():
    flags = [is_heldout(scene) for scene in _scenes(500, "all")]
    assert 0.1 < np.mean(flags) < 0.6


def test_two_object_scenes_are_consistent_with_their_relation():
    pairs = [scene for scene in _scenes(600, "all") if len(scene.objects) == 2]
    assert {scene.relation for scene in pairs} == set(RELATION_POSITIONS)
    for scene in pairs:
        subject, reference = scene.objects
        assert subject.color != reference.color
        assert not objects_overlap(subject, reference, gap=0.0)
        (sx, sy), (rx, ry) = subject.center, reference.center
        holds = {"to the left of": sx < rx, "to the right of": sx > rx, "above": sy < ry, "below": sy > ry}
        assert holds[scene.relation]


def test_masks_are_disjoint_inside_the_image_and_match_the_pixels():
    for scene in _scenes(150, "all", seed=1):
        masks = render_masks(scene)
        pixels = np.asarray(render(scene))
        assert masks.shape == (len(scene.objects), 128, 128)
        assert masks.sum(axis=0).max() == 1
        for obj, mask in zip(scene.objects, masks):
            x, y = obj.center
            assert obj.radius <= min(x, y, 128 - x, 128 - y)
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
            ys, xs = np.nonzero(mask)
            assert abs(xs.mean() + 0.5 - x) < 1.0 and abs(ys.mean() + 0.5 - y) < 1.0
            interior = pixels[np.pad(mask, 1)[2:, 1:-1] & np.pad(mask, 1)[:-2, 1:-1] & mask]
            assert (interior == OBJECT_COLORS[obj.color]).all(axis=1).mean() > 0.9


def test_extra_shapes_render_with_masks_and_are_recognised():
    objects = (
        make_object("red", "star", "top left", "large", rotation=10.0),
        make_object("purple", "heart", "bottom right", "large", two_tone=True),
        make_object("blue", "ring", "center", "large"),
    )
    scene = Scene("gray", objects)
    masks = render_masks(scene)
    assert masks.sum(axis=0).max() == 1 and all(mask.any() for mask in masks)
    ring_row = masks[2][64]
    assert not ring_row[64] and ring_row[50:64].any()  # the ring has a hole
    detected = detect_objects(render(scene))
    read = {(obj.color, obj.shape, obj.position) for obj in detected.objects}
    assert read == {("red", "star", "top left"), ("purple", "heart", "bottom right"), ("blue", "ring", "center")}
    star = render(Scene("white", objects[:1]))
    assert score(parse_prompt("a red star at the top left"), star)["all"]
    assert not score(parse_prompt("a red heart at the top left"), star)["shape"]
    assert not score(parse_prompt("a red circle at the top left"), star)["shape"]


# --------------------------------------------------------------------------- captions


def test_parse_prompt_recovers_caption_attributes():
    rng = np.random.default_rng(7)
    stated_positions = stated_sizes = 0
    for scene in _scenes(500, "all", seed=2):
        text = caption(scene, rng)
        parsed = parse_prompt(text)
        assert [(o.color, o.shape) for o in parsed.objects] == [(o.color, o.shape) for o in scene.objects], text
        assert parsed.relation == scene.relation, text
        assert parsed.background in (None, scene.background), text
        for wanted, obj in zip(parsed.objects, scene.objects):
            assert wanted.position in (None, obj.position), text
            assert wanted.size in (None, obj.size), text
            stated_positions += wanted.position is not None
            stated_sizes += wanted.size is not None
    assert stated_positions > 200 and 100 < stated_sizes < 400


def test_captions_can_leave_the_colour_unsaid():
    rng = np.random.default_rng(3)
    for scene in _scenes(200, "all", seed=4):
        text = caption(scene, rng, omit=("color",))
        parsed = parse_prompt(text)
        assert [o.shape for o in parsed.objects] == [o.shape for o in scene.objects], text
        assert all(o.color is None for o in parsed.objects), text
        assert parsed.relation == scene.relation, text
    with pytest.raises(ValueError, match="cannot omit 'shape' from a caption; can omit: color"):
        caption(scene, rng, omit=("shape",))


def test_captions_are_varied():
    rng = np.random.default_rng(0)
    scene = Scene("white", (make_object("red", "square", "top left", "small"),))
    texts = {caption(scene, rng) for _ in range(200)}
    assert len(texts) > 50
    assert any("box" in text for text in texts) and any("square" in text for text in texts)
    assert any(text.startswith("one ") for text in texts) and any("corner" in text for text in texts)


def test_parse_hand_written_prompts():
    assert parse_prompt("a red circle at the top left") == ExpectedScene(
        (ExpectedObject("red", "circle", "top left", None),)
    )
    assert parse_prompt("A big yellow box in the upper-right corner, on grey!") == ExpectedScene(
        (ExpectedObject("yellow", "square", "top right", "large"),), None, "gray"
    )
    assert parse_prompt("a blue square above a green triangle on black") == ExpectedScene(
        (ExpectedObject("blue", "square"), ExpectedObject("green", "triangle")), "above", "black"
    )
    assert parse_prompt("small orange disc left of a purple star").relation == "to the left of"
    assert parse_prompt("a circle in red in the middle").objects[0] == ExpectedObject("red", "circle", "center")
    with pytest.raises(ValueError, match="no known shape"):
        parse_prompt("a red thing somewhere")


# --------------------------------------------------------------------------- evaluator


def test_evaluator_reads_a_hand_built_scene():
    scene = Scene("white", (make_object("red", "circle", "top left", "large"),))
    detected = detect_objects(render(scene))
    assert detected.background == "white" and len(detected.objects) == 1
    found = detected.objects[0]
    assert (found.color, found.shape, found.position, found.size) == ("red", "circle", "top left", "large")
    expected_area = np.pi * scene.objects[0].radius ** 2
    assert abs(found.area - expected_area) < 0.05 * expected_area
    result = score(parse_prompt("a large red circle at the top left on white"), render(scene))
    assert result == {"color": True, "shape": True, "position": True, "size": True, "all": True,
                      "count": True, "background": True}  # fmt: skip


def test_score_detects_wrong_attributes():
    image = render(Scene("black", (make_object("blue", "triangle", "bottom right", "small"),)))
    assert not score(parse_prompt("a green triangle at the bottom right"), image)["color"]
    assert not score(parse_prompt("a blue square at the bottom right"), image)["shape"]
    wrong_place = score(parse_prompt("a small blue triangle at the top right"), image)
    assert wrong_place["color"] and wrong_place["shape"] and wrong_place["size"]
    assert not wrong_place["position"] and not wrong_place["all"]
    assert not score(parse_prompt("a large blue triangle"), image)["size"]
    pair = _scene_for(parse_prompt("a red circle to the left of a yellow square"))
    assert score(parse_prompt("a red circle to the left of a yellow square"), render(pair))["all"]
    swapped = score(parse_prompt("a red circle to the right of a yellow square"), render(pair))
    assert swapped["object_0"] and swapped["object_1"] and not swapped["relation"] and not swapped["all"]
    missing = score(parse_prompt("a red circle to the left of a green square"), render(pair))
    assert not missing["object_1"] and not missing["all"]


@pytest.mark.parametrize("image_size, count", [(128, 200), (64, 80)])
def test_evaluator_accuracy_on_clean_and_degraded_renders(image_size, count):
    accuracy = validate_evaluator(n=count, seed=5, image_size=image_size, blur_sigma=image_size / 128)
    for condition, minimum in (("clean", 0.99), ("degraded", 0.95)):
        for key in ("single/color", "single/shape", "single/position", "single/size", "single/all", "two/all"):
            assert accuracy[condition][key] >= minimum, (condition, key, accuracy[condition][key])


def test_evaluator_is_resolution_independent():
    scene = _scenes(1, "all", seed=11)[0]
    small, large = detect_objects(render(scene)), detect_objects(render(scene, 256))
    describe = lambda detected: [(o.color, o.shape, o.position, o.size) for o in detected.objects]  # noqa: E731
    assert describe(small) == describe(large)


def test_degrade_changes_pixels_but_keeps_scale():
    image = render(_scenes(1, "all")[0])
    degraded = degrade(image, np.random.default_rng(0))
    difference = degraded.astype(float) - np.asarray(image, dtype=float)
    assert degraded.dtype == np.uint8 and degraded.shape == (128, 128, 3)
    assert 5.0 < np.abs(difference).mean() < 20.0


def test_evaluation_prompts_are_grouped_correctly_and_score_on_matching_renders():
    prompts = evaluation_prompts()
    assert 36 <= len(prompts) <= 48
    assert all(is_heldout(p.expected) == (p.group == "heldout") for p in prompts)
    assert {p.text for p in prompts if p.group == "heldout"} == set(SINGLE_HELDOUT_PROMPTS + TWO_HELDOUT_PROMPTS)
    rng = np.random.default_rng(0)
    pairs = [(p.text, degrade(render(_scene_for(p.expected)), rng)) for p in prompts]
    results = evaluate_pairs(pairs)
    for group in ("seen", "heldout"):
        assert results[group]["single/n"] > 0 and results[group]["two/n"] > 0
        assert results[group]["single/all"] == 1.0 and results[group]["two/all"] == 1.0
    wrong = evaluate_pairs([(prompts[0].text, render(_scene_for(prompts[1].expected)))])
    assert wrong["overall"]["single/all"] == 0.0
