"""The marks world (a second synthetic world): vocabulary, determinism,
exact masks, caption rules, the planted-marks detectors, the generator and
probe sets in that world, and eval scoring labels in the right world."""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

from builder.backends.interfaces import CaptionItem
from builder.backends.registry import captioners, generators, targets
from builder.errors import BuildError, ConfigError
from builder.evaluation.synthetic import evaluate_synthetic, names_concept
from builder.synthetic import marks, world
from builder.synthetic.marks import (
    GLYPHS,
    INK_COLORS,
    MARKS,
    OBJECT_COLORS,
    SHAPES,
    MarkedObject,
    MarksScene,
    concept_terms,
    render_full,
    sample_scene,
)
from builder.synthetic.marks_captions import caption
from builder.synthetic.planted import to_tensor
from builder.synthetic.planted_marks import (
    GAIN,
    PLANTED_MARKS_CONCEPTS,
    PlantedMarksModel,
    gains_from,
    response_quantiles,
)
from builder.synthetic.probe import load_truth, load_world_index, write_probe_set
from builder.synthetic.worlds import get_world, world_names
from query.schema import DB_FILE, FORMAT_VERSION, MIGRATIONS

MARKS_WORLD = get_world("marks")


def _scenes(n: int, seed: int) -> list[MarksScene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def _obj(shape="hexagon", color="teal", mark="plus", ink="white", n=6, cx=64.0, cy=64.0, r=26.0):
    return MarkedObject(shape, color, mark, ink if mark else None, n if mark else 0, cx, cy, r, 0.2)


def _scene(*objs, background="sand", bg=(None, None, 0), seed=1) -> MarksScene:
    return MarksScene(tuple(objs), background, bg[0], bg[1], bg[2], seed)


# ------------------------------------------------------------------ vocabulary


def test_vocabulary_is_disjoint_from_the_shapes_world():
    assert not set(marks._SYNONYMS) & set(world._SYNONYMS)
    mine = {*SHAPES, *marks.COLORS, *MARKS, *marks.BACKGROUNDS}
    theirs = {*world.SHAPES, *world.COLORS, *world.PATTERNS, *world.BACKGROUNDS}
    assert not mine & theirs
    assert not set(marks.code_table()) & set(world.fill_colors())
    # no caption of the marks world names a concept of the shapes world
    for s in _scenes(40, 9):
        truth = render_full(s).truth
        for box in (None, (0, 0, 64, 64), (30, 30, 100, 110)):
            assert world.concept_terms(caption(s, truth, box)) == set()


def test_concept_terms_and_kinds():
    assert concept_terms("Teal HEXAGONS with white plus signs on sandy ground") == {
        "teal",
        "hexagon",
        "white",
        "plus",
        "sand",
    }
    assert concept_terms("pluses, slashes, checkmarks and hoops") == {
        "plus",
        "slash",
        "tick",
        "loop",
    }
    assert concept_terms("golden ellipses on wooden planks at nighttime") == {
        "gold",
        "oval",
        "wood",
        "night",
    }
    assert concept_terms("a red striped circle") == set()
    kinds = {t: marks.concept_kind(t) for t in ("heart", "lime", "black", "tick", "snow", "stripe")}
    assert kinds == {
        "heart": "shape",
        "lime": "color",
        "black": "color",
        "tick": "mark",
        "snow": "background",
        "stripe": None,
    }
    assert world_names() == ["marks", "shapes"]
    assert MARKS_WORLD.vocabulary["mark"] == MARKS
    with pytest.raises(ConfigError, match="unknown synthetic world"):
        get_world("moon")


# ------------------------------------------------------------------ scenes and rendering


def test_sampling_and_rendering_are_deterministic_by_seed():
    a, b = _scenes(15, 3), _scenes(15, 3)
    assert a == b and a != _scenes(15, 4)
    for s in a[:4]:
        ra, rb = render_full(s), render_full(s)
        assert np.array_equal(ra.image, rb.image)
        for name, arr in ra.truth.arrays().items():
            assert np.array_equal(arr, rb.truth.arrays()[name]), name
        assert marks.scene_from_dict(json.loads(json.dumps(marks.scene_to_dict(s)))) == s


def test_scenes_span_the_vocabulary_sizes_and_marks():
    scenes = _scenes(300, 0)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.color for o in objs} == set(OBJECT_COLORS)
    assert {o.mark for o in objs} == {*MARKS, None}
    assert {o.ink for o in objs} == {*INK_COLORS, None}
    assert {s.background for s in scenes} == set(marks.BACKGROUNDS)
    extents = np.array([2 * o.radius / 128 for o in objs])
    assert extents.min() >= 0.15 and extents.max() <= 0.45
    assert extents.min() < 0.17 and extents.max() > 0.43
    assert 0.2 < np.mean([s.bg_mark is not None for s in scenes]) < 0.6
    assert all(s.size == 128 for s in scenes)


def test_mark_and_object_masks_are_exactly_the_coded_pixels():
    table = marks.code_table()
    inks = list(INK_COLORS)
    for s in _scenes(40, 1):
        r = render_full(s)
        t = r.truth
        codes = marks.pack_rgb(r.image)
        ink_codes = {(a << 16) | (b << 8) | c: v for (a, b, c), v in table.items() if v[1]}
        is_ink = np.isin(codes, np.array(list(ink_codes), dtype=np.int64))
        assert np.array_equal(is_ink, t.mark_pixels())
        for y, x in zip(*np.nonzero(is_ink)):
            ink, kind = ink_codes[int(codes[y, x])]
            assert (inks[t.mark_ink[y, x]], MARKS[t.mark_kind[y, x]]) == (ink, kind)
        assert t.masks.sum(axis=0).max() <= 1  # visible masks never overlap
        for color, rgb in OBJECT_COLORS.items():  # a fill color shows exactly on pure object pixels
            fill = codes == marks.pack_rgb(np.array(rgb, np.uint8))
            want = np.zeros_like(fill)
            for k, obj in enumerate(s.objects):
                if obj.color == color:
                    want |= t.masks[k] & r.pure & ~t.mark_pixels()
            assert np.array_equal(fill, want), color
        for k, obj in enumerate(s.objects):
            mine = t.mark_pixels() & t.masks[k]
            if mine.any():  # an object's ink is its own mark kind and ink
                assert {MARKS[v] for v in t.mark_kind[mine]} == {obj.mark}
                assert {inks[v] for v in t.mark_ink[mine]} == {obj.ink}


def test_marks_are_small_glyphs_inside_their_owner():
    s = _scene(_obj(n=8), bg=("tick", "black", 6))
    r = render_full(s)
    placed = marks.place_marks(s, r.coverage, [r.coverage[1]])
    on_obj = [m for m in placed if m.layer == 1]
    on_bg = [m for m in placed if m.layer == 0]
    assert len(on_obj) == 8 and len(on_bg) == 6
    for m in placed:
        g = GLYPHS[m.kind]
        assert 4 <= min(g.shape) and max(g.shape) <= 5 and g.sum() <= 9
        region = (slice(m.y - 1, m.y + g.shape[0] + 1), slice(m.x - 1, m.x + g.shape[1] + 1))
        assert (r.coverage[m.layer][region] == 1.0).all()  # box and margin inside the owner
        assert (
            r.truth.mark_kind[m.y : m.y + g.shape[0], m.x : m.x + g.shape[1]][g]
            == MARKS.index(m.kind)
        ).all()
    assert r.truth.mark_pixels().sum() == 8 * 9 + 6 * 5


# ------------------------------------------------------------------ captions


def test_whole_image_captions_name_every_visible_concept_marks_included():
    s = _scene(_obj(), bg=("tick", "black", 5))
    cap = caption(s)
    assert concept_terms(cap) == {"teal", "hexagon", "white", "plus", "sand", "black", "tick"}, cap
    for s in _scenes(80, 2):
        t = render_full(s).truth
        cap = caption(s, t)
        assert cap == caption(s, t)
        visible = [k for k in range(len(s.objects)) if t.masks[k].any()]
        expected = {s.background}
        for k in visible:
            o = s.objects[k]
            expected |= {o.shape, o.color}
            if (t.mark_pixels() & t.masks[k]).any():
                expected |= {o.mark, o.ink}
        bg = t.mark_pixels() & ~t.masks.any(axis=0)
        if bg.any():
            expected |= {s.bg_mark, s.bg_ink}
        assert concept_terms(cap) == expected, cap
        shapes = [w for w in re.findall(r"[a-z]+", cap) if w in SHAPES]
        assert sorted(shapes) == sorted(s.objects[k].shape for k in visible), cap


def test_a_tiny_crop_of_one_mark_is_a_background_patch():
    s = _scene(_obj(n=6), bg=("loop", "black", 5), background="water")
    r = render_full(s)
    placed = marks.place_marks(s, r.coverage, [r.coverage[1]])
    for m in placed:
        g = GLYPHS[m.kind]
        box = (m.x - 1, m.y - 1, m.x + g.shape[1] + 1, m.y + g.shape[0] + 1)  # 6-7 px
        assert caption(s, r.truth, box) == "a patch of water", (m, caption(s, r.truth, box))
    # a box holding every mark of the object and the object names both
    ys, xs = np.nonzero(r.truth.masks[0])
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    assert {"teal", "hexagon", "white", "plus"} <= concept_terms(caption(s, r.truth, box))


def _expected_crop_terms(s: MarksScene, t: marks.MarksTruth, box) -> set[str]:
    x0, y0, x1, y1 = box
    ink = t.mark_pixels()
    inside = np.zeros(ink.shape, dtype=bool)
    inside[y0:y1, x0:x1] = True
    terms: set[str] = set()
    for k, o in enumerate(s.objects):
        m = t.masks[k]
        if m.any() and 2 * (m & inside).sum() >= m.sum():
            terms |= {o.shape, o.color}
            own = ink & m
            if own.any() and 2 * (own & inside).sum() >= own.sum():
                terms |= {o.mark, o.ink}
    bg = ~t.masks.any(axis=0)
    area = (y1 - y0) * (x1 - x0)
    if 2 * (bg & inside).sum() >= area or not terms:
        terms.add(s.background)
        bg_ink = ink & bg
        if (
            2 * (bg & inside).sum() >= area
            and bg_ink.any()
            and 2 * (bg_ink & inside).sum() >= bg_ink.sum()
        ):
            terms |= {s.bg_mark, s.bg_ink}
    return terms


def test_crop_captions_follow_the_crop_rule():
    rng = np.random.default_rng(5)
    n_objects_named = n_marks_named = 0
    for s in _scenes(40, 6):
        t = render_full(s).truth
        for _ in range(8):
            x0, y0 = (int(v) for v in rng.integers(0, 100, 2))
            w, h = (int(v) for v in rng.integers(6, 128, 2))
            box = (x0, y0, min(x0 + w, 128), min(y0 + h, 128))
            cap = caption(s, t, box)
            assert concept_terms(cap) == _expected_crop_terms(s, t, box), (box, cap)
            n_objects_named += any(w in SHAPES for w in re.findall(r"[a-z]+", cap))
            n_marks_named += bool(concept_terms(cap) & set(MARKS))
    assert n_objects_named > 30 and n_marks_named > 15  # both branches were exercised


def test_crop_rule_names_the_object_that_mostly_lies_inside():
    left = _obj(color="coral", shape="heart", cx=30, cy=64, r=20, mark=None)
    right = _obj(color="navy", shape="oval", cx=98, cy=64, r=20, mark="slash", ink="black")
    s = _scene(left, right, background="snow")
    t = render_full(s).truth
    assert concept_terms(caption(s, t, (0, 0, 64, 128))) == {"coral", "heart", "snow"}
    assert concept_terms(caption(s, t, (64, 0, 128, 128))) == {
        "navy",
        "oval",
        "black",
        "slash",
        "snow",
    }
    # a third of the heart: not named, the box is mostly snow
    assert caption(s, t, (0, 0, 24, 128)) == "a patch of snow"


# ------------------------------------------------------------------ planted detectors


def _expected_response(r, s: MarksScene, concept: tuple[str, ...]) -> np.ndarray:
    t = r.truth
    out = np.zeros(t.mark_kind.shape, dtype=np.float32)
    for term in concept:
        if term in OBJECT_COLORS:
            hit = np.zeros_like(out, dtype=bool)
            for k, o in enumerate(s.objects):
                if o.color == term:
                    hit |= t.masks[k] & r.pure & ~t.mark_pixels()
            gain = 1.0
        elif term in INK_COLORS:
            hit, gain = t.mark_ink == list(INK_COLORS).index(term), GAIN[term]
        else:
            hit, gain = t.mark_kind == MARKS.index(term), GAIN[term]
        out = np.maximum(out, np.where(hit, gain, 0.0))
    return out


def test_planted_detectors_are_pixel_exact():
    model, preprocess = targets.create("planted-marks")
    assert isinstance(model, PlantedMarksModel) and preprocess is to_tensor
    scenes = _scenes(12, 7) + [_scene(_obj(), bg=("slash", "white", 5))]
    for s in scenes:
        r = render_full(s)
        x = to_tensor(Image.fromarray(r.image)).unsqueeze(0)
        resp = model.detectors(x)[0].numpy()
        for u, concept in enumerate(PLANTED_MARKS_CONCEPTS):
            assert np.array_equal(resp[u], _expected_response(r, s, concept)), concept
        assert np.allclose(model(x)[0].numpy(), resp.max(axis=(1, 2)))


def test_planted_ground_truth_names_its_world_and_has_every_kind_of_pair():
    gt = PlantedMarksModel().ground_truth
    assert set(gt) == {"detectors", "pooled"}
    info = gt["detectors"]
    assert info["role"] == "planted" and info["world"] == "marks"
    assert info["concepts"] == [list(c) for c in PLANTED_MARKS_CONCEPTS]
    singles = {c[0] for c in PLANTED_MARKS_CONCEPTS if len(c) == 1}
    assert singles == {*marks.COLORS, *MARKS}
    kinds = {
        tuple(sorted(marks.concept_kind(t) for t in c))
        for c in PLANTED_MARKS_CONCEPTS
        if len(c) == 2
    }
    assert kinds == {("color", "color"), ("color", "mark"), ("mark", "mark")}


def test_gains_make_marks_as_strong_as_colors_in_the_upper_tail():
    q = response_quantiles(n_scenes=250, seed=11, q=0.95)
    ref = np.median([q[c] for c in OBJECT_COLORS])
    for term in (*MARKS, *INK_COLORS):
        assert 0.5 < GAIN[term] * q[term] / ref < 2.0, (term, GAIN[term] * q[term] / ref)
    assert all(g > 5 for g in gains_from(q).values())  # without gains marks would be far weaker


# ------------------------------------------------------------------ generator


@pytest.mark.parametrize(
    "prompt, wanted",
    [
        ("teal hexagon with white plus signs", {"teal", "hexagon", "white", "plus"}),
        ("slashes", {"slash"}),
        ("black ticks at night", {"black", "tick", "night"}),
        ("gold or lime", set()),
    ],
)
def test_generator_renders_the_named_concepts(prompt, wanted):
    gen = generators.create("procedural", world="marks")
    assert gen.size == 128 and gen.config_key()["world"] == "marks"
    rows = gen.generate_with_scenes([prompt], 5, seed=1)
    for img, s in rows[0]:
        assert img.size == (128, 128)
        first = s.objects[0]
        t = render_full(s).truth
        assert t.masks[0].any()
        seen = {first.shape, first.color, s.background}
        own = t.mark_pixels() & t.masks[0]
        if own.any():
            seen |= {first.mark, first.ink}
        assert wanted <= seen, (prompt, s)
        if prompt == "gold or lime":
            assert first.color in ("gold", "lime")
        assert np.array_equal(np.asarray(img), render_full(s).image)
    again = gen.generate([prompt], 5, seed=1)[0]
    assert all(np.array_equal(np.asarray(a), np.asarray(b[0])) for a, b in zip(again, rows[0]))


def test_shapes_world_keys_are_unchanged():
    assert generators.create("procedural").config_key() == {
        "name": "procedural",
        "version": 1,
        "size": 64,
    }
    from builder.synthetic.probe import world_manifest

    assert "world" not in world_manifest(10, 64, 0)
    assert world_manifest(10, 128, 0, "marks")["world"] == "marks"


# ------------------------------------------------------------------ probe sets and oracle


def test_marks_probe_set_and_oracle(tmp_path: Path):
    out = write_probe_set(tmp_path / "probe", n=6, seed=2, progress=False, world="marks")
    manifest = json.loads((out / "world.json").read_text())
    assert manifest["world"] == "marks" and manifest["size"] == 128
    index = load_world_index(out)
    scene, cap = index["images/00002.png"]
    assert isinstance(scene, MarksScene)
    r = render_full(scene)
    assert np.array_equal(np.asarray(Image.open(out / "images" / "00002.png")), r.image)
    truth = load_truth(out, "images/00002.png")
    assert set(truth) == {"masks", "mark_kind", "mark_ink"}
    assert np.array_equal(truth["mark_kind"], r.truth.mark_kind)
    assert cap == caption(scene, r.truth)

    oracle = captioners.create("oracle", probe_dir=str(out))
    assert oracle.config_key()["world"]["world"] == "marks"
    img = Image.open(out / "images" / "00002.png")
    box = (10, 10, 70, 90)
    got = oracle.caption(
        [CaptionItem(img, "images/00002.png"), CaptionItem(img, "images/00002.png", box)]
    )
    assert got == [cap, caption(scene, r.truth, box)]

    mtime = (out / "images" / "00000.png").stat().st_mtime_ns
    write_probe_set(out, n=6, seed=2, progress=False, world="marks")  # complete: reused
    assert (out / "images" / "00000.png").stat().st_mtime_ns == mtime
    with pytest.raises(BuildError, match="marks"):
        write_probe_set(out, n=6, seed=2, progress=False)  # another world in the same folder


def test_marks_probe_set_resumes_after_interruption(tmp_path: Path):
    out = write_probe_set(tmp_path / "a", n=4, seed=3, progress=False, world="marks")
    ref = (out / "captions.jsonl").read_text()
    manifest = (out / "world.json").read_text()
    (out / "world.json").unlink()
    (out / "captions.jsonl").unlink()
    (out / "world.pending.json").write_text(manifest)
    (out / "images" / "00001.png").unlink()
    write_probe_set(out, n=4, seed=3, progress=False, world="marks")
    assert (out / "captions.jsonl").read_text() == ref
    assert (out / "images" / "00001.png").is_file()


# ------------------------------------------------------------------ eval


def _atlas(folder: Path, gt: dict, labels: list[tuple[str, str, int, int, str]]) -> Path:
    folder.mkdir()
    con = duckdb.connect(str(folder / DB_FILE))
    for stmts in MIGRATIONS:
        for stmt in stmts:
            con.execute(stmt)
    con.execute(
        "INSERT INTO meta VALUES ('format_version', ?), ('ground_truth', ?)",
        [str(FORMAT_VERSION), json.dumps(gt)],
    )
    for model, layers in gt.items():
        for pos, (layer, info) in enumerate(layers.items()):
            con.execute(
                "INSERT INTO layers VALUES (?, ?, ?, 'conv', ?)",
                [model, layer, pos, len(info["concepts"])],
            )
    for i, (model, layer, unit, rank, text) in enumerate(labels):
        con.execute(
            "INSERT INTO labels (label_id, model, layer, unit, rank, text, concept_score, interpretability) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
            [i, model, layer, unit, rank, text],
        )
    con.close()
    return folder


def test_names_concept_uses_the_world_vocabulary():
    assert names_concept("teal hexagon on sand", "teal", MARKS_WORLD)
    assert not names_concept("teal and gold", "teal", MARKS_WORLD)
    assert names_concept("white plus signs", "plus", MARKS_WORLD)
    assert not names_concept("teal hexagon", "teal")  # not a shapes-world term
    assert names_concept("red circle", "red")


def test_eval_scores_each_model_in_the_world_its_ground_truth_names(tmp_path: Path):
    gt = {
        "pm": {
            "detectors": {
                "role": "planted",
                "world": "marks",
                "concepts": [["teal"], ["plus"], ["navy"], ["teal", "tick"]],
            }
        },
        "p1": {"detectors": {"role": "planted", "concepts": [["red"], ["blue", "dotted"]]}},
    }
    labels = [
        ("pm", "detectors", 0, 1, "teal hexagon"),
        ("pm", "detectors", 1, 1, "white plus signs on sand"),
        ("pm", "detectors", 2, 1, "navy and lime"),
        ("pm", "detectors", 3, 1, "teal"),
        ("pm", "detectors", 3, 2, "black checkmarks"),
        ("p1", "detectors", 0, 1, "red circle"),
        ("p1", "detectors", 1, 1, "blue dots"),
    ]
    res = evaluate_synthetic(_atlas(tmp_path / "a", gt, labels), mpnet=False)
    match = {(u["model"], u["unit"]): u["match"] for u in res["units"]}
    assert match == {
        ("p1", 0): True,
        ("p1", 1): True,
        ("pm", 0): True,
        ("pm", 1): True,
        ("pm", 2): False,
        ("pm", 3): True,
    }
    assert res["planted"]["single_units"] == 4 and res["planted"]["single_match_rate"] == 0.75
    assert res["planted"]["double_match_rate"] == 1.0


def test_the_marks_measurement_config_is_a_valid_build_of_marks_world_targets():
    from builder.config import load_config

    cfg = load_config(Path(__file__).parents[4] / "bench" / "marks_world.toml")
    assert [m.target for m in cfg.models] == ["planted-marks", "marks-cnn"]
    assert cfg.dissect.generator_options == {"world": "marks"}
    assert cfg.describe.captioner == "oracle"
