"""The 345 official Quick, Draw! category names, and names as people type them resolved to those."""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Iterable

CATEGORIES_FILE = Path(__file__).resolve().parents[1] / "data" / "categories.txt"


class UnknownCategoryError(ValueError):
    """Names that are not among the 345 official categories; .unknown maps each to its closest names."""

    def __init__(self, unknown: dict[str, list[str]]):
        self.unknown = unknown
        parts = [f"{name!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else "")
                 for name, close in unknown.items()]
        super().__init__(f"unknown Quick, Draw! categor{'y' if len(unknown) == 1 else 'ies'}: "
                         f"{', '.join(parts)}; the official names are listed in {CATEGORIES_FILE}")


def category_names(path=CATEGORIES_FILE) -> list[str]:
    """The official category names, one a line in `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"category list not found: {path}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _normal(name: str) -> str:
    return " ".join(re.sub(r"[_\-]", " ", name).lower().split())


def resolve_categories(names: Iterable[str]) -> list[str]:
    """Official names in the order given, repeats dropped; any unknown name -> UnknownCategoryError."""
    if isinstance(names, str):
        names = [names]
    official = category_names()
    by_normal = {_normal(n): n for n in official}
    known, out, unknown = set(official), [], {}
    for name in names:
        if name in known:
            if name not in out:
                out.append(name)
            continue
        key = _normal(name)
        close = [by_normal[key]] if key in by_normal else []
        close += [by_normal[m] for m in difflib.get_close_matches(key, list(by_normal), n=3, cutoff=0.6)
                  if by_normal[m] not in close]
        unknown[name] = close[:3]
    if unknown:
        raise UnknownCategoryError(unknown)
    return out
