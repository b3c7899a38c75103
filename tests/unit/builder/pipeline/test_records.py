"""What a build prints about failed neurons and their retries."""

from __future__ import annotations

from builder.pipeline.records import BuildSummary, ModelSummary


def test_the_summary_counts_retried_and_still_failed_neurons():
    again = ModelSummary("planted", neurons=18, ok=9, failed=9, retried=18, still_failed=9)
    clean = ModelSummary("cnn", neurons=4, ok=4)
    summary = BuildSummary("atlas", [again, clean], 1.0)
    text = summary.text()
    assert "18 neurons failed in an earlier run and were retried: 9 now described, 9 still failed" in text
    assert "9 failed neurons keep their reason in the atlas" in text
    assert text.count("were retried") == 1 and text.count("run the same command again") == 1  # not for cnn
    planted, cnn = summary.to_dict()["models"]
    assert (planted["retried_failed"], planted["still_failed"]) == (18, 9)
    assert (cnn["retried_failed"], cnn["still_failed"], cnn["failed"]) == (0, 0, 0)
