"""The extractive summarizer proposes what most captions share."""

from builder.backends.extractive import CaptionsAsCandidates, extract_concepts, normalize_concept


def test_shared_words_and_gapped_pairs_rank_first():
    caps = [
        "a red striped circle on grass",
        "a red dotted circle above a small blue square on sky",
        "a large red circle on a brick wall",
        "two objects: a red circle and a green star",
    ]
    out = extract_concepts(caps, 5)
    assert out[:3] == ["circle", "red", "red circle"]
    assert len(out) == 5 and len(set(out)) == 5


def test_stopwords_never_start_or_end_a_concept():
    out = extract_concepts(["the dog on the grass", "a dog on a sofa"], 5)
    assert out[0] == "dog"
    assert all(not c.split()[0] in {"the", "a", "on"} and not c.split()[-1] in {"the", "a", "on"} for c in out)


def test_plurals_fold_and_normalization():
    assert extract_concepts(["circles", "a circle"], 1) == ["circle"]
    assert normalize_concept("  Red, Circle! ") == "red circle"


def test_empty_captions_give_no_concept():
    assert extract_concepts(["", "the a"], 5) == []


def test_captions_ablation_returns_most_frequent_captions():
    assert CaptionsAsCandidates().summarize(["A dog.", "a dog", "a cat"], 2) == ["a dog", "a cat"]
