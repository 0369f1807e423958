"""Atomic, checksummed, pickle-free artefact files shared by the model and fragment stores.

A market exchanges weights as safetensors and specs as JSON; every blob's sha256 is recorded in
its spec and checked on load, so a tampered or truncated file is refused before it is parsed
into tensors.

The one way to publish (every store uses it): a file is written to a temporary file in the
target folder, fsynced and renamed into place (:func:`atomic_write_bytes`), so a reader never
sees half a file; a folder that must appear whole or not at all is written in a private
:func:`staging_dir` beside the store and moved into place in one rename (:func:`publish_dir`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from snp_ray.errors import ArtifactNotFoundError, IntegrityError, SchemaError, StoreError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def staging_dir(root: str | os.PathLike) -> Iterator[Path]:
    """A new private folder ``root/.staging/<random>`` to write a whole folder in (on the
    store's filesystem, so :func:`publish_dir` can rename it into place). Whatever is left in it
    (nothing, once published) is deleted afterwards, and ``.staging`` too when it is empty."""
    staging = Path(root) / ".staging" / uuid.uuid4().hex
    for attempt in range(3):       # another writer may remove an empty .staging meanwhile
        try:
            staging.mkdir(parents=True)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
        except OSError as e:
            raise StoreError(f"cannot write under {root}: {e.strerror or e}") from e
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):     # only when empty: another writer may be staging
            staging.parent.rmdir()


def publish_dir(staged: str | os.PathLike, dest: str | os.PathLike, *,
                trash: str | os.PathLike | None = None) -> bool:
    """Move the complete folder ``staged`` to ``dest`` in one rename (same filesystem): readers
    see all of it or none of it.

    Without ``trash``, an existing ``dest`` is kept: returns False (another writer published
    first) and True when this one did. With ``trash`` (a folder on the same filesystem), an
    existing ``dest`` is replaced: renamed aside into ``trash``, the new one renamed in, the old
    one deleted; readers see the old folder or the new one, never a mix, and if the second rename
    fails the old one is put back. Other failures raise ``OSError`` for the caller to name."""
    staged, dest = Path(staged), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if trash is None:
        try:
            os.rename(staged, dest)
        except OSError:
            if not dest.exists():
                raise
            return False
        return True
    aside = None
    if dest.exists():
        aside = Path(trash) / f"{dest.name}-{uuid.uuid4().hex}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.rename(dest, aside)
    try:
        os.rename(staged, dest)
    except OSError:
        if aside is not None:
            os.rename(aside, dest)
            with contextlib.suppress(OSError):
                aside.parent.rmdir()
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
        with contextlib.suppress(OSError):     # only when empty: another replace may run
            aside.parent.rmdir()
    return True


def read_bytes(path: str | os.PathLike, what: str = "file") -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ArtifactNotFoundError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise StoreError(f"cannot read {what} {path}: {e.strerror or e}") from e


def read_json(path: str | os.PathLike, what: str = "spec") -> dict[str, Any]:
    raw = read_bytes(path, what)
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise IntegrityError(f"{what} {path} must hold a JSON object")
    return obj


def require_keys(obj: dict[str, Any], keys: tuple[str, ...], what: str) -> dict[str, Any]:
    """``obj`` itself, once it is known to hold ``keys``: a result file of another kind (or an
    older one) is refused by name instead of failing later with a bare KeyError."""
    missing = [k for k in keys if k not in obj]
    if missing:
        raise SchemaError(f"{what} lacks {missing} (has {sorted(obj)[:8]})")
    return obj


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def tensors_from_bytes(data: bytes, expected_sha256: str | None, what: str) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes after checking their sha256; refuse NaN/Inf values."""
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
        raise IntegrityError(f"{what}: sha256 mismatch (file changed or corrupt)")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise IntegrityError(f"{what}: not a valid safetensors file ({e})") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise IntegrityError(f"{what}: tensor {name!r} holds NaN or Inf values")
    return tensors


def load_state_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Load weights that must match the module's spec exactly (names and shapes)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    shape_bad = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or extra or shape_bad:
        detail = []
        if missing:
            detail.append(f"missing {missing[:5]}")
        if extra:
            detail.append(f"unexpected {extra[:5]}")
        if shape_bad:
            k = shape_bad[0]
            detail.append(f"shape of {k}: spec {tuple(own[k].shape)} vs weights {tuple(tensors[k].shape)}")
        raise IntegrityError(f"{what}: weights do not match the spec ({'; '.join(detail)})")
    module.load_state_dict(tensors, strict=True)


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def save_figure(fig, path: str | Path, dpi: int = 120) -> str:
    """Render a matplotlib figure to PNG bytes and write them atomically; close the figure."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return str(path)
