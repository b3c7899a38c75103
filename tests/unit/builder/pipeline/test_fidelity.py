"""Fidelity: the sample, the metrics, presence, label-set scores, the
caption phrases it adds as candidates, and selection that uses it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from builder.config import DescribeConfig, LabelConfig
from builder.pipeline.crops import _top_k, attention_boxes
from builder.pipeline.fidelity import (
    FidelitySample,
    Presence,
    average_precision,
    choose_sample,
    content_words,
    correlations,
    fidelity_candidates,
    layer_summary,
    positives,
)
from builder.pipeline.labels import choose_by_fidelity
from builder.pipeline.records import EvidenceItem


def test_sample_is_seeded_sized_and_disjoint_from_an_excluded_one():
    a = choose_sample(1000, 100, 0)
    assert len(a) == 100 and len(set(a)) == 100 and list(a) == sorted(a)
    assert np.array_equal(a, choose_sample(1000, 100, 0))
    assert not np.array_equal(a, choose_sample(1000, 100, 1))
    held = choose_sample(1000, 200, 1, exclude=a)
    assert len(held) == 200 and not set(held) & set(a)
    assert list(choose_sample(30, 100, 0)) == list(range(30))  # all when fewer
    # uniform over the probe set: spans it (and so the activation range), not clustered
    assert a.min() < 100 and a.max() > 900


def test_correlation_is_pearson_and_zero_on_constants():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=50)
    rows = np.stack([acts * 2 + 1, -acts, rng.normal(size=50), np.ones(50)])
    got = correlations(rows, acts)
    assert got[0] == pytest.approx(1.0) and got[1] == pytest.approx(-1.0)
    assert got[2] == pytest.approx(np.corrcoef(rows[2], acts)[0, 1])
    assert got[3] == 0.0
    assert np.all(correlations(rows, np.zeros(50)) == 0.0)


def test_positives_are_the_top_fraction_above_the_floor():
    acts = np.array([0, 0, 0, 0, 0, 0, 0, 5, 3, 1], float)
    assert list(np.flatnonzero(positives(acts, 0.2))) == [7, 8]
    # a unit silent on most images: the floor keeps silent images out
    assert list(np.flatnonzero(positives(np.array([0, 0, 0, 2.0]), 0.75))) == [3]
    assert not positives(np.ones(5), 0.5).any()


def test_average_precision():
    pos = np.array([1, 1, 0, 0, 0], bool)
    assert average_precision(np.array([5, 4, 3, 2, 1.0]), pos) == 1.0
    # ranking 1, 3: precisions 1/1 and 2/3
    assert average_precision(np.array([5, 1, 4, 0, 0.0]), pos) == pytest.approx((1 + 2 / 3) / 2)
    # a constant score gets no credit from tie order: no better than the rate of the worst placement
    assert average_precision(np.zeros(5), pos) == pytest.approx((1 / 4 + 2 / 5) / 2)
    assert np.isnan(average_precision(np.ones(5), np.zeros(5, bool)))


def test_word_presence_is_the_fraction_of_content_words_in_the_caption():
    assert content_words("The red circles on a red sky") == ["red", "circle", "sky"]
    p = Presence("words", 3, captions=["a red circle", "a blue circle", "a red star"])
    got = p.of(["red circle", "red", "green"])
    assert got.tolist() == [[1.0, 0.5, 0.5], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


def test_embedding_presence_uses_the_text_embedder_and_memoizes():
    calls: list[list[str]] = []
    vecs = {"red": [1.0, 0.0], "blue": [0.0, 1.0]}

    def embed(texts):
        calls.append(list(texts))
        return np.array([vecs[t] for t in texts])

    p = Presence("embedding", 2, embed_texts=embed, vectors=np.array([[1.0, 0.0], [0.6, 0.8]]))
    assert np.allclose(p.of(["red", "blue"]), [[1.0, 0.6], [0.0, 0.8]])
    p.of(["blue", "red"])
    assert calls == [["red", "blue"]]


def _or_world(n: int = 400, seed: int = 0):
    """Captions of a world with two colors; unit 0 fires on teal OR coral,
    unit 1 on red only (on any shape)."""
    rng = np.random.default_rng(seed)
    colors = rng.choice(["teal", "coral", "red", "olive"], size=n)
    shapes = rng.choice(["circle", "star"], size=n)
    caps = [f"a {c} {s} on sand" for c, s in zip(colors, shapes)]
    a0 = np.isin(colors, ["teal", "coral"]).astype(float) + 0.05 * rng.random(n)
    a1 = (colors == "red").astype(float) + 0.05 * rng.random(n)
    acts = {"L": np.stack([a0, a1], axis=1).astype(np.float32)}
    return FidelitySample(np.arange(n), acts, Presence("words", n, captions=caps)), caps


def test_label_set_fidelity_is_presence_of_any():
    sample, _ = _or_world()
    teal, coral = (f.correlation for f in sample.score(["teal", "coral"], "L", 0))
    both = sample.set_score(["teal", "coral"], "L", 0).correlation
    assert both > 0.95 and both > teal + 0.3 and both > coral + 0.3


def test_caption_phrases_join_the_candidates_when_they_explain_more():
    sample, caps = _or_world()
    cfg = SimpleNamespace(describe=DescribeConfig(), labels=LabelConfig())
    chunk = {("L", 0): ["coral", "sand"], ("L", 1): ["red circle", "sand"]}
    captions = {("L", 0): [c for c in caps if "coral" in c][:10], ("L", 1): [c for c in caps if "red" in c][:10]}
    captions[("L", 0)] += [c for c in caps if "teal" in c][:2]
    added = fidelity_candidates(sample, chunk, captions, cfg)
    assert ("teal", "complement") in added[("L", 0)]  # the complement the summary missed
    assert ("red", "fidelity") in added[("L", 1)]  # the general phrase beats "red circle"
    off = SimpleNamespace(describe=DescribeConfig(fidelity_candidates=0), labels=LabelConfig())
    assert fidelity_candidates(sample, chunk, captions, off) == {("L", 0): [], ("L", 1): []}


def _choose(cands, corr, dissect=None, sets=None, cfg=LabelConfig(), eligible=None):
    emb = np.eye(len(cands))
    sets = sets or {}
    return choose_by_fidelity(cfg, cands, corr, dissect, emb,
                              lambda idx: sets.get(tuple(sorted(idx)), max(corr[i] for i in idx)), eligible)


def test_the_general_phrase_wins_unless_the_extra_words_raise_fidelity():
    assert _choose(["red circle", "red", "sky"], [0.62, 0.60, 0.1]) == {1: 1}
    assert _choose(["red circle", "red", "sky"], [0.70, 0.60, 0.1]) == {0: 1}


def test_fidelity_ties_go_to_the_dissect_score():
    assert _choose(["red", "blue"], [0.60, 0.59], dissect=[1.0, 3.0]) == {1: 1}
    assert _choose(["red", "blue"], [0.60, 0.50], dissect=[1.0, 3.0]) == {0: 1}


def test_extra_labels_only_when_they_explain_more_activation():
    cands = ["teal", "coral", "sand"]
    corr = [0.5, 0.45, 0.2]
    sets = {(0, 1): 0.95, (0, 2): 0.5, (0, 1, 2): 0.95}
    assert _choose(cands, corr, sets=sets) == {0: 1, 1: 2}
    # a complement may be label 2, never label 1
    assert _choose(cands, corr, sets=sets, eligible=[False, True, True]) == {1: 1, 0: 2}
    # a one-concept unit: no second label however well it scores alone
    assert _choose(["red", "crimson", "sky"], [0.6, 0.58, 0.3], sets={}) == {0: 1}


def test_layer_summary_has_a_shuffled_baseline_below_true_labels():
    sample, _ = _or_world()
    out = layer_summary(sample, "L", {0: "teal", 1: "red"}, 5)
    assert out["label_correlation"] > out["shuffled_correlation"] + 0.3


def test_small_crops_are_dropped_and_counted():
    m = np.zeros((32, 32), np.float32)
    m[2:4, 2:4] = 1.0  # 2/32 of the side: under 10%
    m[12:26, 10:24] = 1.0  # large
    boxes, small = attention_boxes(m, 320, 320, min_size=4, min_fraction=0.1)
    assert len(boxes) == 1 and small == 1
    boxes, small = attention_boxes(m, 320, 320, min_size=4, min_fraction=0.0)
    assert len(boxes) == 2 and small == 0


def test_at_most_per_image_items_of_one_image_in_a_top_k():
    pool = [EvidenceItem(0, None, 9.0)] + [EvidenceItem(0, (0, 0, i + 5, i + 5), 8.0 - i) for i in range(5)]
    pool += [EvidenceItem(1, None, 1.0), EvidenceItem(2, None, 0.5)]
    kept, skipped = _top_k(pool, 5, 4)
    assert [e.image for e in kept] == [0, 0, 0, 0, 1] and skipped == 2
