"""Built-in captioners that need no model: ``precomputed``.

Model-backed captioners (BLIP, vision LLMs) live beside this one and
implement the same ``Captioner`` interface; the synthetic world's ``oracle``
lives in ``builder.synthetic``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from builder.backends.interfaces import Captioner, CaptionItem
from builder.errors import BackendError
from builder.probe import ProbeSet

log = logging.getLogger(__name__)


class PrecomputedCaptioner(Captioner):
    """Captions read from the probe folder's ``captions.jsonl``.

    The file captions whole images; a crop gets its source image's caption
    (say so in a report: crops then add no new words)."""

    name = "precomputed"

    def __init__(self, probe_dir: str | Path) -> None:
        self.probe = ProbeSet(Path(probe_dir).resolve(), ())
        self.captions = self.probe.captions()
        if not self.captions:
            raise BackendError(f"the precomputed captioner needs {Path(probe_dir) / 'captions.jsonl'}")

    def config_key(self) -> dict:
        return {"name": self.name, "n": len(self.captions)}

    def caption(self, items: Sequence[CaptionItem]) -> list[str]:
        out = []
        for item in items:
            key = _relative(item.source, self.probe.root)
            if key not in self.captions:
                raise BackendError(f"captions.jsonl has no caption for {key!r}")
            out.append(self.captions[key])
        return out


def _relative(source: str, root: Path) -> str:
    p = Path(source)
    if p.is_absolute():
        try:
            return p.resolve().relative_to(root).as_posix()
        except ValueError:
            return p.as_posix()
    return p.as_posix()
