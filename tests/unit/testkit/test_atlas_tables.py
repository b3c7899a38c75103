"""The demo digest: blind to float rounding, not to what an atlas says."""

from testkit.atlas_tables import FLOAT_TOLERANCE, digest_differences, table_digest

NEURONS = [{"model": "m", "layer": "fc", "unit": u, "labels": [text], "scores": [0.5 + 0.1 * u]}
           for u, text in enumerate(["red circle", "blue square", "striped star"])]


def test_rounding_noise_is_equal_and_content_or_shifted_scores_are_not(make_atlas):
    base = table_digest(make_atlas(NEURONS, name="base"))
    noisy = [dict(n, scores=[n["scores"][0] + 2e-4]) for n in NEURONS]  # the 4th decimal moves, as on another CPU
    assert digest_differences(table_digest(make_atlas(noisy, name="noisy")), base) == []

    relabelled = [*NEURONS[:2], dict(NEURONS[2], labels=["dotted star"])]
    assert any(d.startswith("labels.content") for d in digest_differences(
        table_digest(make_atlas(relabelled, name="relabelled")), base))

    shifted = [dict(n, scores=[n["scores"][0] + 3 * FLOAT_TOLERANCE]) for n in NEURONS]  # a scoring change
    assert any(d.startswith("labels.concept_score") for d in digest_differences(
        table_digest(make_atlas(shifted, name="shifted")), base))
