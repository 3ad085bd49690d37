"""The four standard screening views, in the order the NYU pipelines iterate them."""

from __future__ import annotations

VIEWS: tuple[str, ...] = ("L-CC", "R-CC", "L-MLO", "R-MLO")


def laterality(view: str) -> str:
    return view[0]


def angle(view: str) -> str:
    return view.split("-", 1)[1]
