"""The synthetic world's dictionaries, made on first use instead of shipped.

``demo-cnn-conv4`` (the demo's TopK SAE, trained in about a minute on one
CPU thread, bit for bit the same for a given seed) and ``planted-mixed``
(the planted dictionary, written from its definition) are generated once
into ``$DND_ATLAS_CACHE/sae/`` (default ``~/.cache/dnd-atlas/sae/``) the
first time a config names them, so no weights live in the repository. The
folder's name carries a hash of the code that makes it and of the files
it is made from (the module's ``made_from()``, when it has one: the demo
dictionary's are the demo CNN's weights and the code rendering its scenes):
changing any of them makes a new one.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

# name -> (module, function writing the SAELens folder at a path); the names are
# listed in builder.backends.builtin.GENERATED_DICTIONARIES, which sends them here
GENERATED = {
    "demo-cnn-conv4": ("builder.synthetic.train_sae", "write_demo_sae"),
    "planted-mixed": ("builder.synthetic.planted_dictionary", "write_planted_dictionary"),
}


def generated_dictionary(name: str) -> Path | None:
    """The SAELens folder of the synthetic dictionary ``name``, made now
    when missing; ``None`` when ``name`` is not one of them."""
    if name not in GENERATED:
        return None
    from query.embedder import cache_root

    module_name, func = GENERATED[name]
    module = importlib.import_module(module_name)
    digest = _digest([Path(module.__file__), *getattr(module, "made_from", list)()])
    folder = cache_root() / "sae" / f"{name}-{digest}"
    if (folder / "cfg.json").is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("making the dictionary %r once, in %s (about a minute for demo-cnn-conv4)", name, folder)
    getattr(module, func)(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "cfg.json").is_file():
            raise
    return folder


def _digest(paths: list[Path]) -> str:
    """12 hex digits of the sha256 of the files ``paths``, in order."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()[:12]
