"""Server paths out of what a client reads: error bodies, and the errors stored with an uploaded
model's state (a client reads them later, so they are scrubbed before they are stored)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

_ABSOLUTE = re.compile(r"(?<![\w.])/(?:[\w.@+~-]+/)*[\w.@+~-]+")


def hidden_roots(cfg) -> dict[str, str]:
    """A :class:`~snp_ray.serve.config.ServeConfig`'s folders (as given and resolved) -> the
    placeholders a client sees instead: ``<market>``, ``<packs>``, ``<fragments>``."""
    hide = {cfg.market: "<market>", str(Path(cfg.market).resolve()): "<market>"}
    for name in ("packs", "fragments"):
        if getattr(cfg, name) and "://" not in getattr(cfg, name):
            hide |= {getattr(cfg, name): f"<{name}>", str(Path(getattr(cfg, name)).resolve()): f"<{name}>"}
    return hide


def scrub(message: str, hide: Mapping[str, str]) -> str:
    """``message`` without server paths (route paths such as /v1/packs stay): ``hide``'s roots
    become their placeholders, and any other absolute path under an existing top-level folder
    reads ``<path>``."""
    for root in sorted(hide, key=len, reverse=True):
        if root:
            message = message.replace(root, hide[root])

    def path(m: re.Match) -> str:
        top = m.group(0).split("/")[1]
        return "<path>" if top and Path("/", top).exists() else m.group(0)
    return _ABSOLUTE.sub(path, message)
