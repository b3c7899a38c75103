"""How search ranks neurons from label similarities, deterministically.

``dnd-atlas search`` (:meth:`query.Atlas.search`) and the static site's
semantic search (``atlas_site/static/semantic/rank.mjs``) follow the same
rules, so that the same query gives the same neurons in the same order:

- **a label text is one concept**: every label with the same text gets the
  best similarity of any of its copies (the builder embeds texts in batches,
  so copies of one text differ by ~1e-7, which would otherwise order tied
  neurons at random);
- **a neuron scores its best label** (the lower rank wins between two labels
  of equal similarity);
- **ties are broken by the neuron's key**: similarity descending, then
  model, layer and unit ascending (Python string order).

Demo atlases have tens of neurons per label text ("checkered" on 80), so
without the last two rules the first five of a query would be any five of
them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

Key = tuple[str, str, int]


@dataclass(frozen=True)
class RankedNeuron:
    """One neuron of a ranking: its key, its similarity and the label text that gave it."""

    key: Key
    similarity: float
    text: str


def text_similarities(texts: Sequence[str], sims: Sequence[float]) -> dict[str, float]:
    """The best similarity of each text among labels ``texts[i]`` with similarity ``sims[i]``."""
    out: dict[str, float] = {}
    for text, sim in zip(texts, sims):
        s = float(sim)
        if text not in out or s > out[text]:
            out[text] = s
    return out


def rank_neurons(text_sim: Mapping[str, float], carriers: Iterable[tuple[Key, int, str]],
                 k: int) -> list[RankedNeuron]:
    """The ``k`` best neurons among ``carriers`` (``(key, rank, text)`` of labels whose
    text is in ``text_sim``), by the rules of this module."""
    best: dict[Key, tuple[float, int, str]] = {}
    for key, rank, text in carriers:
        s = text_sim[text]
        old = best.get(key)
        if old is None or s > old[0] or (s == old[0] and rank < old[1]):
            best[key] = (s, rank, text)
    order = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return [RankedNeuron(key, s, text) for key, (s, _, text) in order[:k]]


def ranking_complete(top: Sequence[RankedNeuron], k: int, last_sim: float,
                     exhausted: bool) -> bool:
    """Whether a ranking made from the labels nearest the query, down to similarity
    ``last_sim``, is final: every label not fetched scores at most ``last_sim``,
    so the ``k``-th neuron must score strictly more (a tie with an unfetched label
    could take its place under the key order), unless every label was fetched."""
    return exhausted or (len(top) >= k and top[k - 1].similarity > last_sim)
