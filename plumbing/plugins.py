"""Plug-ins found through Python entry points (model profiles of the stages).

An installed package declares objects under an entry-point group, each named like
the thing it provides, e.g. in its ``pyproject.toml``::

    [project.entry-points."genseg.gen_profiles"]
    mine = "my_package.profiles:GEN_PROFILE"

Entry points are read on every call, not cached: a worker resolves its plug-ins a
few times at start-up (milliseconds each), and no module-level state can go stale.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TypeVar

T = TypeVar("T")


def plugin_names(group: str) -> list[str]:
    """Names declared under ``group`` (none of their modules is imported)."""
    return sorted(ep.name for ep in entry_points(group=group))


def load_plugin(group: str, name: str, kind: type[T], what: str) -> T | None:
    """The object declared as ``name`` under ``group`` (its module imported now), or None
    when none is. ``kind`` is the type it must have, with a ``name`` equal to ``name``;
    ``what`` names it in errors ("generator profile")."""
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    if not found:
        return None
    if len(found) > 1:
        where = ", ".join(ep.value for ep in found)
        raise ValueError(f"{what} {name!r} is declared more than once: {where}")
    obj = found[0].load()
    if not isinstance(obj, kind) or getattr(obj, "name", None) != name:
        raise ValueError(
            f"entry point {name} = {found[0].value} ({group}) is not a "
            f"{kind.__name__} named {name!r}"
        )
    return obj
