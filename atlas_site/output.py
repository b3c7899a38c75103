"""The ``--out`` folder of ``dnd-atlas site``: what it may use, write and delete.

Rules (so a site never costs a user a file):

- a new or empty ``DIR`` is used;
- a ``DIR`` the site command made before is recognised by its manifest,
  ``DIR/project/.dnd-atlas-manifest.json``, which lists every file it wrote
  under ``DIR/project`` and ``DIR/site``; regenerating it overwrites and
  deletes only those files;
- any other non-empty ``DIR`` is refused (:class:`OutputRefused`) before
  anything is touched. ``dnd-atlas demo`` writes its site next to its atlas and
  probe set, so it passes ``shared=True``: then only ``DIR/project`` and
  ``DIR/site`` must be new, empty or ours, and nothing else in ``DIR`` is
  looked at;
- a file in ``DIR/site`` that the manifest does not list is refused too:
  ``mkdocs build`` empties its site folder, so it would be lost;
- files a user added under ``DIR/project`` (a ``.git`` folder, notes in
  ``docs/``) are kept, never deleted and never published: the project's
  mkdocs hook publishes only the docs files the manifest lists.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from query.errors import AtlasError

log = logging.getLogger(__name__)

PROJECT_DIR = "project"
SITE_DIR = "site"
MANIFEST = ".dnd-atlas-manifest.json"
MANIFEST_FORMAT = 1
TOOL = "dnd-atlas site"


class OutputRefused(AtlasError):
    """``--out`` holds files the site command did not write; nothing was touched."""


@dataclass(frozen=True)
class Manifest:
    """What an earlier run wrote: paths relative to ``DIR/project`` and ``DIR/site``.

    ``complete`` is false while a run is in progress (or after one crashed):
    then files at the paths a run writes may be overwritten even when they
    are not listed, since the crashed run may have written them.
    """

    project: frozenset[str] = frozenset()
    site: frozenset[str] = frozenset()
    complete: bool = True

    def to_json(self) -> str:
        """The manifest file's text (sorted, so reruns give identical files)."""
        return json.dumps({"tool": TOOL, "format": MANIFEST_FORMAT, "complete": self.complete,
                           "project": sorted(self.project), "site": sorted(self.site)},
                          indent=0)


def read_manifest(project: Path) -> Manifest | None:
    """The manifest in ``project``, or ``None`` when there is none (or not ours)."""
    path = project / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != TOOL:
        return None
    return Manifest(frozenset(map(str, data.get("project", []))),
                    frozenset(map(str, data.get("site", []))), bool(data.get("complete")))


def write_manifest(project: Path, manifest: Manifest) -> None:
    """Write the manifest atomically."""
    atomic_write(project / MANIFEST, manifest.to_json().encode())


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


# Files get the usual permissions (mkstemp's are 0600: a web server could not read them).
_FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def files_under(root: Path) -> set[str]:
    """Every file (and link) below ``root`` as POSIX paths relative to it."""
    out: set[str] = set()
    if not root.is_dir():
        return out
    for base, dirs, names in os.walk(root):
        rel = Path(base).relative_to(root)
        out.update((rel / n).as_posix() for n in names)
        out.update((rel / d).as_posix() for d in dirs if (Path(base) / d).is_symlink())
    return out


def _is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def _site_strays(site: Path, listed: frozenset[str]) -> list[str]:
    # mkdocs keeps top-level dot entries of its site folder, so they are not at risk.
    return sorted(p for p in files_under(site) if p not in listed and not p.startswith("."))


def claim(out: Path, shared: bool = False) -> Manifest:
    """Check that the site may be written into ``out``; returns the earlier run's manifest
    (an empty one for a new folder). Raises :class:`OutputRefused` and touches nothing
    when ``out`` holds files the site command did not write."""
    if out.exists() and not out.is_dir():
        raise OutputRefused(f"--out {out} exists and is not a directory")
    project, site = out / PROJECT_DIR, out / SITE_DIR
    old = read_manifest(project)
    if old is None:
        targets = (project, site) if shared else (out,)
        for target in targets:
            if not _is_empty(target):
                raise OutputRefused(
                    f"--out {out} is not empty and was not made by `dnd-atlas site` "
                    f"({target} has files); choose a new or empty folder")
        return Manifest()
    strays = _site_strays(site, old.site)
    if strays:
        raise OutputRefused(
            f"{site / strays[0]} was not written by `dnd-atlas site` (nor {len(strays) - 1} "
            "other file(s) there) and the site build would delete it; move it out of "
            f"{site} or choose another --out")
    return old


class ProjectWriter:
    """Writes the files of ``DIR/project`` atomically and remembers them.

    Refuses to overwrite a file an earlier run did not write (unless that run
    did not finish); :meth:`finish` deletes the earlier run's files that this
    run did not write again, and the folders they leave empty.
    """

    def __init__(self, project: Path, old: Manifest) -> None:
        self.root = project
        self.old = old
        self.written: set[str] = set()

    def _target(self, rel: str) -> Path:
        path = self.root / rel
        if rel not in self.old.project and self.old.complete and path.exists():
            raise OutputRefused(f"refusing to overwrite {path}: `dnd-atlas site` did not write "
                                "it; move it away")
        self.written.add(rel)
        return path

    def text(self, rel: str, content: str) -> None:
        """Write a text file (UTF-8) at project-relative ``rel``."""
        atomic_write(self._target(rel), content.encode("utf-8"))

    def data(self, rel: str, content: bytes) -> None:
        """Write a binary file at project-relative ``rel``."""
        atomic_write(self._target(rel), content)

    def link(self, rel: str, src: Path) -> bool:
        """Hard-link (or copy) ``src`` to ``rel``; returns false when it was there already.

        The old entry is replaced by a rename, never written into: it may be a
        hard link to the atlas's own image.
        """
        path = self._target(rel)
        try:
            if path.exists() and (os.path.samefile(path, src)
                                  or path.stat().st_size == src.stat().st_size):
                return False
        except OSError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, path)
        return True

    def finish(self) -> int:
        """Delete the earlier run's files this run did not write; returns how many."""
        removed = 0
        for rel in sorted(self.old.project - self.written - {MANIFEST}):
            path = self.root / rel
            if path.is_file() or path.is_symlink():
                path.unlink()
                removed += 1
                prune_empty(path.parent, self.root)
        return removed


def prune_empty(folder: Path, stop: Path) -> None:
    """Remove ``folder`` and its parents up to (not including) ``stop`` while empty."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def replace_site(built: Path, site: Path, old: Manifest) -> frozenset[str]:
    """Move a freshly built site from ``built`` into ``site``, after deleting the files of
    the earlier site (only those the manifest lists); returns the new site's files."""
    for rel in sorted(old.site):
        path = site / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
            prune_empty(path.parent, site)
    new = files_under(built)
    if _is_empty(site):
        if site.exists():
            site.rmdir()
        os.replace(built, site)
        return frozenset(new)
    for rel in sorted(new):  # dot entries a user keeps in site/ stay where they are
        dst = site / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(built / rel, dst)
    shutil.rmtree(built, ignore_errors=True)
    return frozenset(new)
