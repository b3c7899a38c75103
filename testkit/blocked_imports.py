"""The preamble of a child-process script that runs with some packages made
unimportable (proof that a code path needs no torch, or no ``builder``)."""

from __future__ import annotations

NO_TORCH = ("torch", "sentence_transformers", "transformers")


def blocking_preamble(blocked: tuple[str, ...] = NO_TORCH) -> str:
    """Python source that makes every package in ``blocked`` raise
    ImportError when imported; prepend it to a script run with ``-c``."""
    return f"""
import sys
BLOCKED = {tuple(blocked)!r}

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
"""
