"""The official implementation's call pattern, as a benchmark configuration.

The pipeline has one way of running; the official Describe-and-Dissect code
makes its calls another way, and the cost benchmark (``bench/cost.py``)
measures both. That way is only configuration and one wrapper backend:

- ``chunk_size = 1``: nothing is shared between neurons: each neuron crops,
  captions, generates and records its own images;
- the build runs with its caches off (``build(cfg, cache_enabled=False)``):
  nothing is reused from earlier neurons or runs;
- ``PerCandidateSummarizer``: one LLM request per candidate concept instead
  of one request for all N. Request i asks for i+1 concepts and keeps the one
  not proposed yet, so the candidates equal those of one request for N
  (equal quality, N times the requests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from builder.backends.interfaces import Summarizer
from builder.backends.registry import create_backend, summarizers


class PerCandidateSummarizer(Summarizer):
    """Wraps the summarizer ``inner`` (a registry name; the other options are
    its own) and asks it once per candidate."""

    name = "per-candidate"

    def __init__(self, inner: str = "openai", **options: Any) -> None:
        self.inner = create_backend(summarizers, inner, options)
        self.last_item_usage: list[dict[str, int]] | None = None

    def config_key(self) -> dict[str, Any]:
        return {"name": self.name, "inner": self.inner.config_key()}

    def summarize(self, captions: Sequence[str], n: int) -> list[str]:
        out = self.summarize_many([captions], n)[0]
        if isinstance(out, Exception):
            raise out
        return out

    def summarize_many(self, batches: Sequence[Sequence[str]], n: int) -> list[Any]:
        out: list[Any] = [[] for _ in batches]
        usage = [{"requests": 0} for _ in batches]
        for i in range(n):
            answers = self.inner.summarize_many(batches, i + 1)
            per = getattr(self.inner, "last_item_usage", None)
            for j, ans in enumerate(answers):
                usage[j]["requests"] += per[j]["requests"] if per else 1
                if per and "tokens" in per[j]:
                    usage[j]["tokens"] = usage[j].get("tokens", 0) + per[j]["tokens"]
                if isinstance(out[j], Exception):
                    continue
                if isinstance(ans, Exception):
                    out[j] = ans
                    continue
                fresh = [c for c in ans if c not in out[j]]
                if fresh:
                    out[j].append(fresh[-1] if len(ans) == i + 1 else fresh[0])
        self.last_item_usage = usage
        return out


def official_shaped(config: dict[str, Any]) -> dict[str, Any]:
    """A build config (as a dict) changed to make the official
    implementation's calls; build it with ``cache_enabled=False``."""
    describe = dict(config.get("describe", {}))
    inner = describe.get("summarizer", "extractive")
    describe["summarizer"] = "bench.official:PerCandidateSummarizer"
    describe["summarizer_options"] = {"inner": inner, **describe.get("summarizer_options", {})}
    return {**config, "chunk_size": 1, "describe": describe}
