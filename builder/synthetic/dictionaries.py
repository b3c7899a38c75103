"""The synthetic world's dictionaries that are made on first use, not shipped.

``planted-mixed`` (the planted dictionary, written exactly from its
definition) is generated once into ``$DND_ATLAS_CACHE/sae/`` (default
``~/.cache/dnd-atlas/sae/``) the first time a config names it. The folder's
name carries a hash of the code that makes it: changing that code makes a
new one. Trained dictionaries (``demo-cnn-conv4``) ship in ``data/sae/``
instead: training on another CPU gives other float rounding, hence other
weights and other labels, so they are made once and committed, as the demo
CNN's weights are.
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
    digest = hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:12]
    folder = cache_root() / "sae" / f"{name}-{digest}"
    if (folder / "cfg.json").is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("making the dictionary %r once, in %s", name, folder)
    getattr(module, func)(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "cfg.json").is_file():
            raise
    return folder

