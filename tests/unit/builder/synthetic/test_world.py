"""The synthetic world: exact renders, captions, probe sets and the backends
built on them (oracle captioner, procedural generator, planted and demo
targets)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from builder.backends.interfaces import CaptionItem
from builder.backends.registry import captioners, generators, targets
from builder.errors import BackendError, BuildError
from builder.synthetic import world
from builder.synthetic.demo_cnn import OUTPUT_CONCEPTS, demo_cnn, make_dataset
from builder.synthetic.generator import ProceduralGenerator
from builder.synthetic.oracle import OracleCaptioner
from builder.synthetic.probe import load_masks, load_world_index, write_probe_set
from builder.synthetic.world import (
    COLORS,
    PATTERNS,
    SHAPES,
    Scene,
    SceneObject,
    caption,
    concept_terms,
    render,
    render_full,
    sample_scene,
    scene_from_dict,
    scene_to_dict,
)


def _scenes(n: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def _obj(shape="circle", color="red", pattern="solid", size="large", cx=32.0, cy=32.0, r=16.0):
    return SceneObject(shape, color, pattern, size, cx, cy, r, 0.3)


# ------------------------------------------------------------------ world


def test_concept_terms_folds_forms_and_ignores_unknown_words():
    assert concept_terms("Red CIRCLES with stripes") == {"red", "circle", "striped"}
    assert concept_terms("a checkerboard of dots on grass") == {"checkered", "dotted", "grass"}
    assert concept_terms("crosses, rings and stars in the sky") == {"cross", "ring", "star", "sky"}
    assert concept_terms("blue squares on a brick wall") == {"blue", "square", "brick"}
    assert concept_terms("a dog playing frisbee") == set()


def test_sampling_and_rendering_are_deterministic_by_seed():
    a, b = _scenes(20, 3), _scenes(20, 3)
    assert a == b
    assert a != _scenes(20, 4)
    for s in a[:5]:
        (ia, ma), (ib, mb) = render(s), render(s)
        assert np.array_equal(np.asarray(ia), np.asarray(ib))
        assert np.array_equal(ma, mb)
        assert scene_from_dict(json.loads(json.dumps(scene_to_dict(s)))) == s


def test_scenes_have_one_to_three_objects_of_varied_kinds():
    scenes = _scenes(300, 0)
    counts = {len(s.objects) for s in scenes}
    assert counts == {1, 2, 3}
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.color for o in objs} == set(COLORS)
    assert {o.pattern for o in objs} == set(PATTERNS)
    assert {s.background for s in scenes} == set(world.BACKGROUNDS)


def test_solid_object_masks_hold_exactly_the_object_color():
    for s in _scenes(60, 1):
        s = Scene(tuple(_replace(o, pattern="solid") for o in s.objects), s.background, s.seed)
        r = render_full(s)
        assert r.masks.shape == (len(s.objects), 64, 64)
        for k, obj in enumerate(s.objects):
            interior = r.masks[k] & r.pure
            assert interior.sum() > 0.5 * r.masks[k].sum()
            assert (r.image[interior] == COLORS[obj.color]).all()
        # masks of distinct objects never overlap (occlusion-aware)
        assert r.masks.sum(axis=0).max() <= 1


def _replace(obj: SceneObject, **kw) -> SceneObject:
    d = {f: getattr(obj, f) for f in obj.__dataclass_fields__}
    d.update(kw)
    return SceneObject(**d)


def test_later_objects_occlude_earlier_ones():
    back = _obj(color="red", cx=28, cy=32, r=14)
    front = _obj(shape="square", color="blue", cx=38, cy=32, r=14)
    img, masks = render(Scene((back, front), "plain", 1))
    arr = np.asarray(img)
    assert masks[0].sum() > 0 and masks[1].sum() > 0
    assert not (masks[0] & masks[1]).any()
    # the pixel at the front object's center is blue, and belongs to it alone
    assert tuple(arr[32, 38]) == COLORS["blue"]
    assert masks[1][32, 38] and not masks[0][32, 38]
    # unoccluded, the back object would cover that pixel
    _, alone = render(Scene((back,), "plain", 1))
    assert alone[0][32, 38]


def test_patterns_are_visible_at_64px():
    for pattern in ("striped", "dotted", "checkered"):
        r = render_full(Scene((_obj(pattern=pattern, r=18),), "plain", 0))
        inside = r.image[r.masks[0] & r.pure]
        colors = {tuple(c) for c in inside}
        assert colors == {COLORS["red"], world.pattern_ink("red", pattern)}, pattern
        frac = (inside == world.pattern_ink("red", pattern)).all(axis=1).mean()
        assert 0.1 < frac < 0.7, (pattern, frac)


def test_captions_name_exactly_the_visible_objects():
    vocab_shapes = set(SHAPES)
    for s in _scenes(80, 2):
        _img, masks = render(s)
        cap = caption(s, masks)
        assert cap == caption(s, masks)
        words = re.findall(r"[a-z]+", cap)
        named_shapes = [w for w in words if w in vocab_shapes]
        visible = [o for o, m in zip(s.objects, masks) if m.any()]
        assert sorted(named_shapes) == sorted(o.shape for o in visible), cap
        assert sorted(w for w in words if w in COLORS) == sorted(o.color for o in visible), cap
        expected = {s.background} | {t for o in visible for t in o.concepts()}
        assert concept_terms(cap) - {"solid"} == expected - {"solid"}, cap
        if len(visible) >= 2:
            assert re.search(r"\b(above|below|left of|right of|next to)\b", cap), cap


def test_caption_relations_and_templates_vary():
    top = _obj(shape="circle", color="red", cx=32, cy=12, r=8, size="small")
    bottom = _obj(shape="square", color="blue", cx=32, cy=50, r=8, size="small")
    cap = caption(Scene((top, bottom), "grass", 5))
    assert "red" in cap and "blue" in cap and "above" in cap and "grass" in cap
    caps = {caption(s) for s in _scenes(40, 9)}
    starts = {c.split(" ")[0] for c in caps}
    assert len(starts) >= 3  # several templates in use


def test_box_restricted_captions():
    left = _obj(shape="star", color="green", cx=14, cy=32, r=10, size="medium")
    right = _obj(shape="ring", color="purple", cx=50, cy=32, r=10, size="medium")
    s = Scene((left, right), "brick", 11)
    _, masks = render(s)
    only_left = caption(s, masks, box=(0, 0, 28, 64))
    assert "green" in only_left and "star" in only_left
    assert "purple" not in only_left and "ring" not in only_left
    # tight box around the ring: no background words
    tight = caption(s, masks, box=(41, 23, 60, 42))
    assert "ring" in tight and "star" not in tight and "brick" not in tight
    # a corner without objects: the background alone
    assert caption(s, masks, box=(0, 0, 6, 6)) == "a patch of brick wall"
    # an object with less than half of its pixels in the box is left out
    half = caption(s, masks, box=(0, 0, 12, 64))
    assert "star" not in half


# ------------------------------------------------------------------ probe set


def test_probe_set_layout_and_idempotency(tmp_path: Path):
    out = write_probe_set(tmp_path / "probe", n=12, size=64, seed=7, progress=False)
    files = sorted(p.name for p in (out / "images").iterdir())
    assert files == [f"{i:05d}.png" for i in range(12)]
    lines = (out / "captions.jsonl").read_text().splitlines()
    assert len(lines) == 12
    rec = json.loads(lines[3])
    assert set(rec) == {"file", "caption", "scene"} and rec["file"] == "images/00003.png"
    scene = scene_from_dict(rec["scene"])
    img, masks = render(scene)
    assert np.array_equal(np.asarray(Image.open(out / rec["file"])), np.asarray(img))
    assert np.array_equal(load_masks(out, rec["file"]), masks)
    assert rec["caption"] == caption(scene, masks)
    index = load_world_index(out)
    assert index["images/00003.png"] == (scene, rec["caption"])
    assert json.loads((out / "world.json").read_text())["n"] == 12

    mtime = (out / "images" / "00000.png").stat().st_mtime_ns
    write_probe_set(out, n=12, size=64, seed=7, progress=False)
    assert (out / "images" / "00000.png").stat().st_mtime_ns == mtime
    with pytest.raises(BuildError):
        write_probe_set(out, n=13, size=64, seed=7, progress=False)
    assert not list(out.rglob("*.tmp"))


def test_probe_set_resumes_after_interruption(tmp_path: Path):
    out = write_probe_set(tmp_path / "a", n=6, seed=2, progress=False)
    ref = (out / "captions.jsonl").read_text()
    (out / "world.json").unlink()  # as if killed before the manifest
    (out / "captions.jsonl").unlink()
    (out / "world.pending.json").write_text(
        json.dumps({"kind": "synthetic-world", "version": 1, "n": 6, "size": 64, "seed": 2})
    )
    (out / "images" / "00004.png").unlink()
    write_probe_set(out, n=6, seed=2, progress=False)
    assert (out / "captions.jsonl").read_text() == ref
    assert (out / "images" / "00004.png").is_file()


# ------------------------------------------------------------------ oracle


def test_oracle_captioner(tmp_path: Path):
    out = write_probe_set(tmp_path / "probe", n=5, seed=3, progress=False)
    oracle = captioners.create("oracle", probe_dir=str(out))
    assert isinstance(oracle, OracleCaptioner)
    assert oracle.config_key()["world"]["n"] == 5
    index = load_world_index(out)
    img = Image.open(out / "images" / "00001.png")
    scene, cap = index["images/00001.png"]
    masks = load_masks(out, "images/00001.png")
    items = [
        CaptionItem(img, "images/00001.png"),
        CaptionItem(img, str((out / "images" / "00001.png").resolve())),
        CaptionItem(img.crop((0, 0, 20, 20)), "images/00001.png", (0, 0, 20, 20)),
    ]
    got = oracle.caption(items)
    assert got[0] == got[1] == cap
    assert got[2] == caption(scene, masks, (0, 0, 20, 20))
    # an image the world did not render (added to the folder) has no caption: a per-image skip
    assert oracle.caption([CaptionItem(img, "images/99999.png"), items[0]]) == [None, cap]
    with pytest.raises(BackendError):
        oracle.caption([CaptionItem(img, str(tmp_path / "elsewhere.png"))])


# ------------------------------------------------------------------ generator


def test_generator_renders_named_attributes():
    gen = generators.create("procedural")
    assert isinstance(gen, ProceduralGenerator)
    prompts = ["a red striped star", "Blue circles on grass", "dotted", "a purple zebra ring"]
    rows = gen.generate_with_scenes(prompts, n=6, seed=0)
    for prompt, row in zip(prompts, rows):
        terms = concept_terms(prompt)
        assert len(row) == 6
        for img, scene in row:
            first = scene.objects[0]
            named = {t for t in terms if world.concept_kind(t) != "background"}
            assert named <= first.concepts(), (prompt, first)
            if "grass" in terms:
                assert scene.background == "grass"
            arr = np.asarray(img)
            r = render_full(scene)
            for color in terms & set(COLORS):
                # the prominent object's pixels really are that color
                px = arr[r.masks[0] & r.pure]
                assert (px == COLORS[color]).all(axis=1).mean() > 0.4
    # same images when asked again, and variety across i
    again = gen.generate(prompts[:1], n=6, seed=0)[0]
    assert all(np.array_equal(np.asarray(a), np.asarray(b[0])) for a, b in zip(again, rows[0]))
    assert len({s.objects[0].cx for _, s in rows[0]}) > 1


def test_generator_image_depends_only_on_prompt_index_and_seed():
    gen = ProceduralGenerator()
    a = gen.generate(["green cross", "sky"], n=3, seed=5)
    b = gen.generate(["yellow square", "Green  CROSS!", "ring"], n=4, seed=5)
    for i in range(3):
        assert np.array_equal(np.asarray(a[0][i]), np.asarray(b[1][i]))
    c = gen.generate(["green cross"], n=3, seed=6)
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(c[0][0]))


def test_generator_ignores_unknown_words_and_randomizes_without_terms():
    gen = ProceduralGenerator()
    scenes = [s for _, s in gen.generate_with_scenes(["an elephant"], n=30, seed=1)[0]]
    assert len({s.objects[0].shape for s in scenes}) >= 4
    assert len({s.objects[0].color for s in scenes}) >= 4
    red = [s for _, s in gen.generate_with_scenes(["a red elephant"], n=10, seed=1)[0]]
    assert all(s.objects[0].color == "red" for s in red)


# ------------------------------------------------------------------ planted model


def test_planted_units_are_exact_detectors():
    model, pre = targets.create("planted")
    concepts = model.planted_concepts
    assert len(concepts) == model.detectors(torch.zeros(1, 3, 8, 8)).shape[1]
    assert {c[0] for c in concepts if len(c) == 1} >= set(COLORS)
    assert sum(len(c) == 2 for c in concepts) >= 6
    scenes = _scenes(200, 123)
    renders = [render_full(s) for s in scenes]
    x = torch.stack([pre(Image.fromarray(r.image)) for r in renders])
    with torch.no_grad():
        maps = model.detectors(x).numpy()
        pooled = model(x).numpy()
    assert pooled.shape == (200, len(concepts))
    assert np.allclose(pooled, maps.max(axis=(2, 3)))
    checked = 0
    for s, r, m in zip(scenes, renders, maps):
        bg = r.coverage[0] >= 1.0
        assert not m[:, bg].any()  # backgrounds never fire
        for u, concept in enumerate(concepts):
            expected = np.zeros((64, 64), dtype=bool)
            for k, obj in enumerate(s.objects):
                if any(t == obj.color for t in concept):
                    expected |= r.masks[k]
                for t in concept:
                    if t == obj.pattern:
                        ink = (r.image == world.pattern_ink(obj.color, t)).all(axis=2)
                        expected |= r.masks[k] & ink
            fired = m[u] > 0
            assert np.array_equal(fired[r.pure], expected[r.pure]), (concept, s)
            checked += int(expected[r.pure].sum())
    assert checked > 10000


# ------------------------------------------------------------------ demo CNN


def test_demo_cnn_detects_its_output_concepts():
    model, pre = targets.create("demo-cnn")
    assert len(OUTPUT_CONCEPTS) == 18 and OUTPUT_CONCEPTS[:6] == list(SHAPES)
    names = dict(model.named_modules())
    assert {"conv1", "conv2", "conv3", "conv4", "fc"} <= set(names)
    torch.manual_seed(0)
    x, y = make_dataset(300, seed=987654)
    img = render(_scenes(1, 5)[0])[0]
    assert pre(img).shape == (3, 64, 64)
    with torch.no_grad():
        p = torch.sigmoid(model(x))
    acc = ((p >= 0.5) == (y >= 0.5)).float().mean(dim=0)
    assert acc.mean() >= 0.9, dict(zip(OUTPUT_CONCEPTS, acc.tolist()))
    assert acc.min() >= 0.75
    # the factory returns the committed weights, not a random init
    again, _ = demo_cnn()
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values())
    )
