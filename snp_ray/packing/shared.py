"""Compact packs: fragments of one source model share their lookup tables.

A text fragment carries its own (column-sliced) copy of its model's embedding table, which is
most of a text model's parameters, so a pack of c fragments of one model held c tables. Here
the fragments of one source model that sit in a pack share one table holding the union of their
kept columns; each fragment reads its own columns through a registered index buffer.

Exact by construction: a column is stored once only where the fragments hold bitwise-equal
values for the same source unit (the slicer's ``freeze_tables`` keeps the source's values;
trained tables differ per fragment and then keep one column each), and a lookup followed by a
column gather copies the very numbers the fragment's own table held. Only storage changes.

Which modules can share is a registry by module type (:data:`SHARERS`), like the slicer's
handlers; a module reading anything other than the raw input could not be shared exactly.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from snp_ray.config import Config
from snp_ray.errors import ConfigError, IntegrityError
from snp_ray.slicing.fragment import Fragment

log = logging.getLogger(__name__)


@dataclass
class TableSpec(Config):
    """One shared table of a pack: enough to rebuild its shape and who reads it."""

    name: str                  # key in PackedModel.tables
    kind: str                  # the sharer that built it (SHARERS)
    source_sha256: str         # the source model every reader was sliced from
    module: str                # the module's path inside each reader's feature extractor
    rows: int
    units: list[int]           # the source unit each column holds (repeated: values differ)
    readers: list[int]         # fragment positions in the pack that read it

    def validate(self) -> None:
        if self.rows < 1 or not self.units or min(self.units) < 0:
            raise ConfigError(f"shared table {self.name!r} has an invalid shape")
        if len(self.readers) < 2 or len(set(self.readers)) != len(self.readers) or \
                min(self.readers) < 0:
            raise ConfigError(f"shared table {self.name!r} needs two or more distinct readers")


class SharedEmbedding(nn.Module):
    """The union table of one source model's embedding columns in a pack."""

    def __init__(self, rows: int, columns: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, columns), requires_grad=False)


class EmbeddingView(nn.Module):
    """Stands in for a fragment's ``nn.Embedding``: looks tokens up in the shared table and
    keeps the fragment's own columns (``index``), in the fragment's column order."""

    def __init__(self, table: SharedEmbedding, index: torch.Tensor):
        super().__init__()
        self.table = table             # registered here and in the pack: one tied parameter
        self.register_buffer("index", index.detach().clone().long())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(tokens, self.table.weight).index_select(-1, self.index)


class TableSharer:
    """How one module type shares: its units' value columns, and the view that replaces it."""

    kind = ""

    def columns(self, module: nn.Module) -> torch.Tensor:
        """The module's values with its units along dim 1 (rows: the lookup keys)."""
        raise NotImplementedError

    def compatible(self, a: nn.Module, b: nn.Module) -> bool:
        """Whether ``b`` computes like ``a`` apart from its columns (same rows, same options)."""
        raise NotImplementedError

    def table(self, rows: int, columns: int) -> nn.Module:
        raise NotImplementedError

    def view(self, table: nn.Module, index: torch.Tensor) -> nn.Module:
        raise NotImplementedError


class EmbeddingSharer(TableSharer):
    """``nn.Embedding`` with a plain lookup (no max_norm renormalisation, which would write
    into the table at inference)."""

    kind = "embedding"

    def columns(self, module: nn.Embedding) -> torch.Tensor:
        return module.weight.detach()

    def compatible(self, a: nn.Embedding, b: nn.Embedding) -> bool:
        return (a.num_embeddings == b.num_embeddings and a.weight.dtype == b.weight.dtype
                and a.max_norm is None and b.max_norm is None)

    def table(self, rows: int, columns: int) -> SharedEmbedding:
        return SharedEmbedding(rows, columns)

    def view(self, table: SharedEmbedding, index: torch.Tensor) -> EmbeddingView:
        return EmbeddingView(table, index)


#: module type -> sharer (exact type: a subclass may compute differently)
SHARERS: dict[type, TableSharer] = {nn.Embedding: EmbeddingSharer()}
_BY_KIND = {s.kind: s for s in SHARERS.values()}


def share_tables(fragments: list[Fragment], tables: nn.ModuleDict) -> tuple[list[Fragment], list[TableSpec]]:
    """Share the lookup tables of fragments of one source model; returns the fragments to pack
    (the ones that now read a shared table are copies, so fragments cached elsewhere stay as
    they were) and the tables' specs. ``tables`` receives the new tables."""
    readers: dict[tuple[str, str], list[int]] = {}
    for pos, f in enumerate(fragments):
        for path, mod in f.features.named_modules():
            gid = _unit_group(f, path)
            if type(mod) in SHARERS and gid is not None and \
                    SHARERS[type(mod)].columns(mod).shape[1] == len(f.spec.kept[gid]):
                readers.setdefault((f.spec.source_sha256, path), []).append(pos)
    out, specs = list(fragments), []
    copied: set[int] = set()
    for (sha, path), users in readers.items():
        first = fragments[users[0]].features.get_submodule(path)
        sharer = SHARERS[type(first)]
        users = [u for u in users if sharer.compatible(first, fragments[u].features.get_submodule(path))]
        if len(users) < 2:
            continue
        units, cols, index = _union(sharer, [fragments[u] for u in users], path)
        before = sum(len(i) for i in index)
        if len(units) >= before:
            log.debug("table %s of %s: no column in common, kept per fragment", path, sha[:12])
            continue
        name = f"t{len(tables)}"
        table = sharer.table(int(cols.shape[0]), len(units))
        with torch.no_grad():
            table.weight.copy_(cols)
        tables[name] = table
        for u, idx in zip(users, index):
            if u not in copied:
                out[u] = _shallow_copy(out[u])
                copied.add(u)
            _replace(out[u].features, path, sharer.view(table, torch.tensor(idx)))
        specs.append(TableSpec(name=name, kind=sharer.kind, source_sha256=sha, module=path,
                               rows=int(cols.shape[0]), units=units, readers=users))
        log.info("pack: %d fragments of %s share %s: %d columns instead of %d", len(users),
                 fragments[users[0]].spec.source_model, path, len(units), before)
    return out, specs


def attach_tables(fragments: list[Fragment], tables: nn.ModuleDict, specs: list[TableSpec]) -> None:
    """Rebuild the shared layout of a saved pack on freshly rebuilt fragments (weights and
    indices are loaded afterwards)."""
    for s in specs:
        sharer = _BY_KIND.get(s.kind)
        if sharer is None or s.name in tables or max(s.readers) >= len(fragments):
            raise IntegrityError(f"pack: shared table {s.name!r} cannot be rebuilt")
        table = sharer.table(s.rows, len(s.units))
        tables[s.name] = table
        for pos in s.readers:
            f = fragments[pos]
            try:
                mod = f.features.get_submodule(s.module)
            except AttributeError:
                raise IntegrityError(f"pack: fragment {pos} has no module {s.module!r}") from None
            if type(mod) not in SHARERS or f.spec.source_sha256 != s.source_sha256:
                raise IntegrityError(f"pack: fragment {pos} cannot read shared table {s.name!r}")
            width = sharer.columns(mod).shape[1]
            _replace(f.features, s.module, sharer.view(table, torch.zeros(width, dtype=torch.long)))


def check_indices(fragments: list[Fragment], tables: nn.ModuleDict, specs: list[TableSpec]) -> None:
    """After loading: every index points into its table at a column of the same source unit."""
    for s in specs:
        for pos in s.readers:
            view = fragments[pos].features.get_submodule(s.module)
            gid = _unit_group(fragments[pos], s.module)
            idx = view.index.tolist()
            if gid is None or (idx and not 0 <= min(idx) <= max(idx) < len(s.units)) or \
                    [s.units[i] for i in idx] != fragments[pos].spec.kept[gid]:
                raise IntegrityError(f"pack: fragment {pos}'s index into {s.name!r} is invalid")


def _union(sharer: TableSharer, frags: list[Fragment], path: str
           ) -> tuple[list[int], torch.Tensor, list[list[int]]]:
    """The union table: one column per (source unit, distinct values), sorted by unit; and
    each fragment's index into it (in the fragment's own column order)."""
    variants: dict[int, list[torch.Tensor]] = {}
    picks: list[list[tuple[int, int]]] = []
    for f in frags:
        vals = sharer.columns(f.features.get_submodule(path))
        kept = f.spec.kept[_unit_group(f, path)]
        mine = []
        for j, unit in enumerate(kept):
            col, seen = vals[:, j], variants.setdefault(unit, [])
            v = next((i for i, c in enumerate(seen) if torch.equal(c, col)), None)
            if v is None:
                seen.append(col)
                v = len(seen) - 1
            mine.append((unit, v))
        picks.append(mine)
    order = [(u, v) for u in sorted(variants) for v in range(len(variants[u]))]
    where = {uv: i for i, uv in enumerate(order)}
    cols = torch.stack([variants[u][v] for u, v in order], 1)
    return [u for u, _ in order], cols, [[where[uv] for uv in mine] for mine in picks]


def _unit_group(f: Fragment, path: str) -> str | None:
    """The fragment's unit group that ``path`` produces: its columns' source units."""
    return next((g for g, name in f.spec.group_names.items() if name == path), None)


def _shallow_copy(f: Fragment) -> Fragment:
    """A fragment whose module tree is new but whose tensors are the original's (no copies)."""
    memo = {id(t): t for t in list(f.features.parameters()) + list(f.features.buffers())}
    return Fragment(f.spec, copy.deepcopy(f.features, memo), f.probe)


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
