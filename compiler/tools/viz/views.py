"""Which sub-graphs the HTML page can open and close, and the drawings it holds for them.

A view is a set of open sub-graphs; the page holds one drawing per view it can reach, each laid
out by the same engine and drawn by the same code as the SVG, so opening a box on the page shows
exactly what `epicycle viz -o x.svg` would draw with that box open. Only a frame whose ancestors
are all open matters to a view, so a spec with sub-graphs `a` (holding `a.x`, `a.y`) and `b` has
(1 + 2 * 2) * 2 = 10 views.

The views a page holds are bounded (`MAX_VIEWS`, and `MAX_VIEW_NODES` nodes laid out over all
of them): sub-graphs are made openable outermost first while the bound holds; any left over
stay closed on the page, which says how many (the SVG, PNG and Mermaid outputs draw every
sub-graph open). At load the top-level sub-graphs are open, and each deeper level too while the
drawing stays within `DEFAULT_OPEN_NODES` nodes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import product

from compiler.tools.viz.scene import Frame, Scene, collapsed

MAX_VIEWS = 64
MAX_VIEW_NODES = 4000  # nodes laid out, added up over every view of one page
DEFAULT_OPEN_NODES = 40  # deeper levels open at load while the drawing has at most this many


@dataclass(frozen=True)
class Views:
    openable: tuple[str, ...]  # frame paths the page opens and closes
    fixed: tuple[str, ...]  # frame paths past the bound: drawn closed on the page
    default: frozenset[str]  # open at load
    states: tuple[frozenset[str], ...]  # every view the page holds, as its open frames
    limit: int  # the most views this page could hold


def plan_views(scene: Scene) -> Views:
    frames = {f.path: f for f in scene.frames}
    limit = max(1, min(MAX_VIEWS, MAX_VIEW_NODES // max(len(scene.nodes), 1)))
    openable: list[str] = []
    for frame in sorted(scene.frames, key=lambda f: f.depth):  # outermost first
        if frame.parent is not None and frame.parent not in openable:
            continue
        if _count(frames, [*openable, frame.path]) <= limit:
            openable.append(frame.path)
    fixed = tuple(f.path for f in scene.frames if f.path not in openable)
    default = _default_open(scene, frames, set(openable))
    states = tuple(_states(frames, set(openable)))
    return Views(tuple(openable), fixed, default, states, limit)


def view_key(scene: Scene, opened: Iterable[str]) -> str:
    """The name of a view: its open frames whose ancestors are open too, in the spec's order
    (the page's script computes the same name)."""
    opened = set(opened)
    shown = []
    for frame in scene.frames:  # outer before inner
        if frame.path in opened and (frame.parent is None or frame.parent in shown):
            shown.append(frame.path)
    return "|".join(shown)


def view_scene(scene: Scene, opened: Iterable[str]) -> Scene:
    opened = set(opened)
    return collapsed(scene, [f.path for f in scene.frames if f.path not in opened])


def _children(frames: dict[str, Frame], path: str | None) -> list[str]:
    return [f.path for f in frames.values() if f.parent == path]


def _count(frames: dict[str, Frame], openable: list[str]) -> int:
    chosen = set(openable)

    def views(path: str) -> int:
        if path not in chosen:
            return 1
        return 1 + math.prod(views(c) for c in _children(frames, path))

    return math.prod(views(p) for p in _children(frames, None))


def _states(frames: dict[str, Frame], openable: set[str]) -> list[frozenset[str]]:
    def options(path: str) -> list[frozenset[str]]:
        if path not in openable:
            return [frozenset()]
        inner = [options(c) for c in _children(frames, path)]
        opened = [frozenset({path}).union(*combo) for combo in product(*inner)]
        return [frozenset(), *opened]

    top = [options(p) for p in _children(frames, None)]
    return [frozenset().union(*combo) for combo in product(*top)]


def _default_open(scene: Scene, frames: dict[str, Frame], openable: set[str]) -> frozenset[str]:
    opened = {p for p in openable if frames[p].depth == 1}
    for depth in range(2, max((f.depth for f in scene.frames), default=1) + 1):
        deeper = opened | {p for p in openable if frames[p].depth == depth}
        if len(view_scene(scene, deeper).nodes) > DEFAULT_OPEN_NODES:
            break
        opened = deeper
    return frozenset(opened)
