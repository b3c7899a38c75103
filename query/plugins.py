"""What other packages plug into ``query``, found through entry points.

``query`` imports neither ``builder`` nor ``atlas_site``: they declare, in
``pyproject.toml``, the commands they add to ``dnd-atlas`` (group
``dnd_atlas.commands``, each entry a ``query.cli.Command``) and the services
the HTTP API may call (group ``dnd_atlas.services``, e.g. ``classify``), the
way ``llm`` and datasette find their plugins. A reader installed without
the builder simply has fewer commands.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

COMMANDS_GROUP = "dnd_atlas.commands"
SERVICES_GROUP = "dnd_atlas.services"


def _entries(group: str) -> list[EntryPoint]:
    # one distribution may be seen twice (an editable install next to a build dir)
    seen: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        seen.setdefault(ep.name, ep)
    return sorted(seen.values(), key=lambda ep: ep.name)


def plugin_commands() -> list[Any]:
    """The commands other installed packages add (``Command`` objects)."""
    return [ep.load() for ep in _entries(COMMANDS_GROUP)]


def service(name: str) -> Callable[..., Any] | None:
    """The callable another package offers as service ``name``, or ``None``
    when none is installed. Loading it may raise ImportError (a missing
    optional dependency such as torch)."""
    for ep in _entries(SERVICES_GROUP):
        if ep.name == name:
            return ep.load()
    return None
