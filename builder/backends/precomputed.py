"""Built-in captioners that need no model: ``precomputed``.

Model-backed captioners (BLIP, vision LLMs) live beside this one and
implement the same ``Captioner`` interface; the synthetic world's ``oracle``
lives in ``builder.synthetic``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from builder.backends.interfaces import Captioner, CaptionItem
from builder.errors import BackendError
from builder.probe import ProbeSet

log = logging.getLogger(__name__)


class PrecomputedCaptioner(Captioner):
    """Captions read from the probe folder's ``captions.jsonl`` and
    ``metadata.jsonl`` files (``ProbeSet.captions``).

    The files caption whole images; a crop gets its source image's caption
    (say so in a report: crops then add no new words). An image they do not
    caption gets None: the neuron is described from its other images."""

    name = "precomputed"

    def __init__(self, probe_dir: str | Path) -> None:
        self.probe = ProbeSet(Path(probe_dir).resolve(), ())
        self.captions = self.probe.captions()
        if not self.captions:
            raise BackendError(
                f"the precomputed captioner needs captions: {Path(probe_dir) / 'captions.jsonl'} "
                "({\"file\", \"caption\"} per line) or a metadata.jsonl ({\"file_name\", \"text\"} per line)"
            )
        self._digest = hashlib.sha256(json.dumps(sorted(self.captions.items())).encode()).hexdigest()[:16]

    def config_key(self) -> dict:
        """Name, count and a digest of every caption: editing one is never answered from the cache."""
        return {"name": self.name, "n": len(self.captions), "captions": self._digest}

    def caption(self, items: Sequence[CaptionItem]) -> list[str | None]:
        out: list[str | None] = []
        for item in items:
            key = _relative(item.source, self.probe.root)
            if key not in self.captions:
                log.debug("no caption for %r in the probe folder's captions", key)
            out.append(self.captions.get(key))
        return out


def _relative(source: str, root: Path) -> str:
    p = Path(source)
    if p.is_absolute():
        try:
            return p.resolve().relative_to(root).as_posix()
        except ValueError:
            return p.as_posix()
    return p.as_posix()
