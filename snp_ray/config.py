"""Typed, JSON-serialisable configs.

Every run is described by dataclasses that round-trip through JSON, so a run can be saved,
compared and reproduced. ``from_dict`` refuses unknown keys and wrong types with a
:class:`ConfigError` instead of silently ignoring them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

from snp_ray.errors import ConfigError

C = TypeVar("C", bound="Config")

#: the package folder (this file is snp_ray/config.py)
PACKAGE = Path(__file__).resolve().parent
#: what never decides a number, relative to the package: serving, the CLI's wording (a stage's
#: key hashes the CLI file it runs on its own), the HTTP client, and the modules that only record
#: or present results. Every other module is in :func:`code_digest`.
NOT_DIGESTED = ("serve/", "cli.py", "client.py", "evaluation/provenance.py",
                "evaluation/reproduce.py", "evaluation/report.py")


def code_digest(only: tuple[str, ...] = (), package: Path | None = None) -> str:
    """sha256 (16 hex) over the source of every module that decides a number: each ``.py``
    under ``snp_ray/`` (paths and bytes, in sorted order) less :data:`NOT_DIGESTED`. That is the
    algorithm (slicing, packing, models, market, baselines, data, tuning, evaluation,
    expansion) and what runs it: ``runtime.py`` (bf16 or fp32, the device, the engine),
    ``config.py`` (the config digests), ``engine/``, ``store/``, ``artifacts.py``, ``errors.py``.

    Equal digests mean the code that made a result has not changed; every cache that feeds a
    published number is keyed by it or checked against it (docs/REPRODUCIBILITY.md).
    ``only``: hash just these paths (relative to the package; a folder ends in ``/``), for a
    cache that one module alone decides (decoded images); ``package``: another copy of the
    package (a test's edited one)."""
    pkg = Path(package) if package is not None else PACKAGE
    h = hashlib.sha256()
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg).as_posix()
        if "__pycache__" in rel or rel.startswith(NOT_DIGESTED) or (
                only and not rel.startswith(only)):
            continue
        h.update(f"snp_ray/{rel}".encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _coerce(name: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(name, options[0], value)
        for arg in options:
            try:
                return _coerce(name, arg, value)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {value!r} matches none of {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{name}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(f"{name}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_coerce(f"{name}[{i}]", inner, v) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected an object, got {type(value).__name__}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_coerce(name, kt, k): _coerce(f"{name}[{k!r}]", vt, v) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected an object for {tp.__name__}")
        return tp.from_dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{name}: must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


@dataclasses.dataclass
class Config:
    """Base for configs: dict/JSON round trip with validation, and a stable content hash."""

    def validate(self) -> None:  # overridden where ranges matter
        """Raise ConfigError when a value is out of range."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f"{type(self).__name__}.{f.name}", hints[f.name],
                                          getattr(self, f.name)))
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: Any) -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(map(str, data)) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown keys {unknown}; valid keys: {sorted(names)}")
        try:
            return cls(**data)
        except TypeError as e:  # missing required fields
            raise ConfigError(f"{cls.__name__}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{cls.__name__}: not valid JSON ({e})") from None
        return cls.from_dict(data)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)

    def digest(self) -> str:
        """Short content hash: equal configs give equal keys in stores.

        A field declared with :func:`added_field` is left out while it holds its default, so
        adding a knob does not change the key of every fragment or pack already stored."""
        return hashlib.sha256(json.dumps(self._digest_body(), sort_keys=True).encode()).hexdigest()[:16]

    def _digest_body(self) -> dict[str, Any]:
        """:meth:`to_dict` less runtime fields and added fields at their defaults, in nested
        configs too (a knob added to a training recipe leaves its market's key alone)."""
        body = self.to_dict()
        for f in dataclasses.fields(self):
            if f.name not in body:             # a to_dict that leaves a default field out
                continue
            value = getattr(self, f.name)
            if f.metadata.get(RUNTIME) or (f.metadata.get(ADDED) and body[f.name] == _plain(f.default)):
                del body[f.name]
            elif isinstance(value, Config):
                body[f.name] = value._digest_body()
        return body


#: field metadata key of :func:`added_field`
ADDED = "snp_added"


def added_field(default: Any) -> Any:
    """A config field added after stores keyed by the config's digest exist: at its default it
    does not enter :meth:`Config.digest` (the old keys stay valid); set, it does."""
    return dataclasses.field(default=default, metadata={ADDED: True})


#: field metadata key of :func:`runtime_field`
RUNTIME = "snp_runtime"


def runtime_field(default: Any) -> Any:
    """A field that changes how a result is computed, not what it is (a memory cap): never part
    of :meth:`Config.digest`, so two runs that differ only in it share their stored keys."""
    return dataclasses.field(default=default, metadata={RUNTIME: True})


def _plain(v: Any) -> Any:
    if isinstance(v, Config):
        return v.to_dict()
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def check_range(owner: str, name: str, value: float, lo: float, hi: float,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise a ConfigError naming the field when ``value`` is outside [lo, hi]."""
    bad = (value != value or value < lo or value > hi or (lo_open and value == lo)   # NaN too
           or (hi_open and value == hi))
    if bad:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ConfigError(f"{owner}.{name} must be in {lb}{lo}, {hi}{rb}, got {value!r}")


#: seeds at or above this are reserved for clean evidence: the target class sets, requests and
#: combinations, and the learnware users, that no development run has seen
CLEAN_SEEDS = 1000
#: the environment variable a clean-evidence run (and only it) sets to "1"
CLEAN_EVIDENCE_ENV = "SNP_CLEAN_EVIDENCE"


def check_clean_seed(seed: int, what: str) -> None:
    """Refuse a reserved seed (>= CLEAN_SEEDS) unless this run declares itself clean evidence.

    The fence is what keeps those seeds unseen: a development run that reaches for one fails
    before it draws anything, so a number made on them cannot have steered a choice."""
    if seed >= CLEAN_SEEDS and os.environ.get(CLEAN_EVIDENCE_ENV) != "1":
        raise ConfigError(f"{what} seeds >= {CLEAN_SEEDS} are reserved for clean evidence; set "
                          f"{CLEAN_EVIDENCE_ENV}=1 for that run only (got seed {seed})")
