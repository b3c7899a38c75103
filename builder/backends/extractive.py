"""Step 2b: captions -> N candidate concepts, without an LLM.

``extractive`` proposes the phrases that most captions share: contiguous
1-3 word phrases and gapped word pairs ("red ... circle" -> "red circle"),
scored by how many captions contain them. It is the offline default and the
paper's "no LLM" ablation, improved: the ablation used whole captions as
candidates (``captions`` here).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from builder.backends.interfaces import Summarizer
from builder.data_files import data_path

_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


@lru_cache(maxsize=1)
def stopwords() -> frozenset[str]:
    lines = data_path("stopwords.txt").read_text().splitlines()
    return frozenset(w.strip() for w in lines if w.strip() and not w.startswith("#"))


def normalize_concept(text: str) -> str:
    """Lower case, punctuation stripped, single spaces: the canonical form of
    a concept (used to deduplicate candidates from any summarizer)."""
    return " ".join(_WORD.findall(text.lower()))


def singular(word: str) -> str:
    """A light singularization so 'circles' and 'circle' count as one."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _phrases(words: list[str], max_len: int, gap: int) -> set[tuple[str, ...]]:
    stop = stopwords()
    out: set[tuple[str, ...]] = set()
    n = len(words)
    for i in range(n):
        if words[i] in stop:
            continue
        for j in range(i, min(n, i + max_len)):
            if words[j] in stop:
                continue
            out.add(tuple(words[i : j + 1]))
        # gapped pairs inside a short window: "red striped circle" -> "red circle"
        for j in range(i + 2, min(n, i + 2 + gap)):
            if words[j] not in stop and not any(w in stop for w in words[i + 1 : j]):
                out.add((words[i], words[j]))
    return out


def caption_phrases(captions: Sequence[str], max_len: int = 3, gap: int = 2) -> list[str]:
    """Every phrase the extractive summarizer could propose from ``captions``
    (1-``max_len`` word runs and gapped pairs, stop words out, singular), sorted."""
    out: set[tuple[str, ...]] = set()
    for cap in captions:
        out |= _phrases([singular(w) for w in _WORD.findall(cap.lower())], max_len, gap)
    return sorted(" ".join(p) for p in out)


def extract_concepts(
    captions: Sequence[str], n: int, max_len: int = 3, gap: int = 2, min_coverage: float = 0.3
) -> list[str]:
    """Up to ``n`` distinct phrases shared by the most captions.

    A phrase counts once per caption. Phrases are ordered by coverage, then
    shorter (more general) first, then alphabetically; phrases below
    ``min_coverage`` of the captions are dropped unless fewer than ``n``
    remain (the best of the rest fill up)."""
    counts: Counter[tuple[str, ...]] = Counter()
    for cap in captions:
        words = [singular(w) for w in _WORD.findall(cap.lower())]
        counts.update(_phrases(words, max_len, gap))
    if not counts:
        return []
    total = max(1, len(captions))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))
    strong = [p for p, c in ranked if c / total >= min_coverage]
    weak = [p for p, c in ranked if c / total < min_coverage]
    out: list[str] = []
    for p in strong + weak:
        text = " ".join(p)
        if text not in out:
            out.append(text)
        if len(out) >= n:
            break
    return out


class ExtractiveSummarizer(Summarizer):
    """Offline summarizer: the phrases most captions share."""

    name = "extractive"

    def __init__(self, max_words: int = 3, min_coverage: float = 0.3) -> None:
        self.max_words = int(max_words)
        self.min_coverage = float(min_coverage)

    def config_key(self) -> dict:
        return {"name": self.name, "max_words": self.max_words, "min_coverage": self.min_coverage}

    def summarize(self, captions: Sequence[str], n: int) -> list[str]:
        return extract_concepts(captions, n, self.max_words, min_coverage=self.min_coverage)


class CaptionsAsCandidates(Summarizer):
    """Ablation (no LLM): the N most frequent captions are the candidates."""

    name = "captions"

    def summarize(self, captions: Sequence[str], n: int) -> list[str]:
        counts = Counter(normalize_concept(c) for c in captions if c.strip())
        return [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:n]
