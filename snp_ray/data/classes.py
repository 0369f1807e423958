"""The one class-name resolver: class names or ids -> class ids, under one rule set.

Every place that takes classes from a person (``snp pack --classes``, ``snp slice --class``,
``snp market add --classes``, the service's ``"classes"`` and a requester's sample labels) comes
through :func:`class_ids`, against the classes it may name (``{id: name}``: a dataset's
vocabulary, the classes a market's models hold, the classes a service has fragments of). The
rules:

- an ``int`` (not a ``bool``), or a string of ASCII digits (``"3"``, ``" 3 "``), is a class id;
  ``"²"`` and other non-ASCII digits are names, never ids (``int("²")`` raises);
- any other string is a name, with surrounding whitespace ignored; the exact name wins, else a
  name that matches in another case (``"Cat"``) when exactly one class does;
- an id or name that is not one of the choices is an :class:`UnknownNameError` listing them (and
  the closest names);
- anything else (``None``, a float, a list) is a :class:`ConfigError`, as is an empty request or
  a class named twice (by name, by id, or both) unless ``repeats`` allows it (sample labels).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Any

from snp_ray.errors import ConfigError, UnknownNameError


def class_ids(requested: Any, choices: Mapping[int, str] | Sequence[str], *, kind: str = "class",
              where: str = "", what: str = "the request", repeats: bool = False) -> list[int]:
    """``requested`` (a list of class names or ids) -> ids, in the order given.

    ``choices``: the classes that may be named, ``{id: name}`` or a vocabulary (a list whose
    index is the id). ``kind`` and ``where`` shape an unknown name's error (``"unknown {kind}
    {name!r}{where}; valid ...``"), ``what`` names the request in the other errors."""
    if not isinstance(requested, (list, tuple)) or not requested:
        raise ConfigError(f"{what} names no classes; give a non-empty list of class names or ids")
    names = dict(choices) if isinstance(choices, Mapping) else dict(enumerate(choices))
    by_name = {str(n): c for c, n in names.items()}
    folded: dict[str, list[int]] = {}
    for n, c in by_name.items():
        folded.setdefault(n.casefold(), []).append(c)
    ids = [_one(c, names, by_name, folded, kind, where) for c in requested]
    if not repeats:
        twice = sorted({c for c in ids if ids.count(c) > 1})
        if twice:
            raise ConfigError(f"duplicate classes in {what}: "
                              f"{[f'{names[c]} ({c})' for c in twice]}")
    return ids


def class_id(requested: Any, choices: Mapping[int, str] | Sequence[str], *, kind: str = "class",
             where: str = "") -> int:
    """One class name or id -> its id, under :func:`class_ids`' rules."""
    return class_ids([requested], choices, kind=kind, where=where)[0]


def _one(c: Any, names: dict[int, str], by_name: dict[str, int], folded: dict[str, list[int]],
         kind: str, where: str) -> int:
    if isinstance(c, bool) or not isinstance(c, (str, Integral)):
        raise ConfigError(f"a class is a name or an id, got {c!r}")
    if isinstance(c, Integral):
        if int(c) in names:
            return int(c)
        raise UnknownNameError(kind, c, list(by_name), where=where)
    s = c.strip()
    if s.isascii() and s.isdigit():
        if int(s) in names:
            return int(s)
    elif s in by_name:
        return by_name[s]
    elif len(folded.get(s.casefold(), ())) == 1:
        return folded[s.casefold()][0]
    raise UnknownNameError(kind, s, list(by_name), where=where)
