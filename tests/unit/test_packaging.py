"""What ``pip install dnd-atlas`` ships: every package of the source tree and
every file it reads at run time (the site's scripts, the data files), as
pyproject.toml declares them. The install itself is checked by the slow
light-install test; this one runs in ``make test``."""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("builder", "query", "atlas_site")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _source_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]


def _shipped(pkg: str, path: Path, setuptools: dict) -> bool:
    """Whether setuptools installs ``path`` (under package ``pkg``): a module of a
    declared package, or a file a package-data glob names ("*" does not cross "/")."""
    if path.suffix == ".py" and ".".join(path.parent.relative_to(ROOT).parts) in setuptools["packages"]:
        return True
    rel = path.relative_to(ROOT / pkg).as_posix()
    return any(fnmatch.fnmatch(rel, pat) and rel.count("/") == pat.count("/")
               for pat in setuptools["package-data"].get(pkg, []))


def test_every_file_of_the_packages_is_installed():
    setuptools = _setuptools()
    missing = [p.relative_to(ROOT).as_posix() for pkg in SHIPPED for p in _source_files(ROOT / pkg)
               if not _shipped(pkg, p, setuptools)]
    assert missing == [], "declare them in pyproject.toml: [tool.setuptools] packages or package-data"
