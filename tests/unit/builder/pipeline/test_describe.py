"""Step 2b's bookkeeping: what a failed neuron's reason says, and that no
failure (an exception, or an answer with no concept) is ever cached."""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace

from builder.cache import ContentCache
from builder.errors import BackendError
from builder.pipeline.describe import REASON_CHARS, failure_text, propose_candidates
from builder.pipeline.records import Calls
from query.schema import COUNTED_STAGES


class FlakySummarizer:
    """Answers from a script: one list of answers per call of summarize_many."""

    name = "flaky"

    def __init__(self, *script):
        self.script = list(script)
        self.asked: list[list[str]] = []

    def config_key(self):
        return {"name": self.name}

    def summarize_many(self, batches, n):
        self.asked.append([b[0] for b in batches])
        return self.script.pop(0)


def _propose(run, summarizer, captions):
    chunk = list(captions)
    return propose_candidates(run, summarizer, chunk, captions, Calls(chunk, COUNTED_STAGES))


def test_failures_are_not_cached_so_the_next_build_asks_again(tmp_path):
    cache = ContentCache(tmp_path / "cache.sqlite")
    run = SimpleNamespace(cfg=SimpleNamespace(describe=SimpleNamespace(n_candidates=3)), cache=cache)
    captions = {("l", 0): ["zero"], ("l", 1): ["one"], ("l", 2): ["two"]}
    first = FlakySummarizer([BackendError("LLM request failed: HTTP 503"), [" ", "!"], ["Red Circles", "red circles"]])
    cands, failures = _propose(run, first, captions)
    assert cands == {("l", 2): ["red circles"]}
    assert failures == {("l", 0): "summarizer failed: LLM request failed: HTTP 503",
                        ("l", 1): "the summarizer proposed no concept"}
    with sqlite3.connect(tmp_path / "cache.sqlite") as con:  # only the good answer was stored
        assert con.execute("SELECT count(*) FROM cache WHERE ns = 'summarize'").fetchone() == (1,)

    again = FlakySummarizer([["stripes"], ["dots", "grid"]])
    cands, failures = _propose(run, again, captions)
    assert again.asked == [["zero", "one"]]  # the good answer came from the cache, the failures were asked again
    assert cands == {("l", 0): ["stripes"], ("l", 1): ["dots", "grid"], ("l", 2): ["red circles"]}
    assert failures == {}
    cache.close()


def test_failure_text_is_one_bounded_line_that_names_surprises():
    assert failure_text(BackendError("HTTP 503\nmodel   is loading")) == "HTTP 503 model is loading"
    assert failure_text(ValueError("bad shape")) == "ValueError: bad shape"
    assert failure_text(RuntimeError()) == "RuntimeError"
    huge = failure_text(BackendError("x" * 20_000_000))
    assert len(huge) == REASON_CHARS and huge.endswith("...")
