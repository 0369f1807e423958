"""The labeled samples a pack trains on: the market developers' shots, a requester's own, or both.

Every sample carries a key, ``source#row`` (see :func:`snp_ray.data.fewshot.sample_keys`): the
dataset split or the uploaded file it comes from, and its row there. Two uploads' row 0 are two
samples; the same train row reached through two models is one. Deduplication, planner exclusion
and tuning folds all compare keys, never bare row ids.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from snp_ray.data.fewshot import FewShotSet, sample_keys
from snp_ray.errors import ArtifactNotFoundError, ConfigError, DataError, PayloadTooLarge, StoreError

#: the ``source`` prefix of samples a requester brought (the rest is their content's sha256)
REQUESTER = "requester"
#: a requester's samples: the most bytes of a file and rows. ``snp pack --samples`` refuses past
#: these, and the service's defaults (``ServeConfig.max_body_bytes``, ``max_images``) are these
MAX_BYTES, MAX_ROWS = 8 * 1024 * 1024, 256


@dataclass
class PackSamples:
    """Raw inputs, global labels and one key per sample."""

    dataset: str
    raw: np.ndarray | list[str]
    labels: np.ndarray
    class_names: dict[int, str]
    keys: np.ndarray | None = None            # None: ``anonymous#i`` (samples made in code)
    counts: dict[str, int] = field(default_factory=dict)   # samples per origin, for metadata

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.raw) != len(self.labels):
            raise DataError(f"{len(self.raw)} inputs but {len(self.labels)} labels")
        if self.keys is None:
            self.keys = sample_keys("anonymous", range(len(self.labels)))
        if len(self.keys) != len(self.labels):
            raise DataError(f"{len(self.keys)} sample keys for {len(self.labels)} samples")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_fewshot(cls, sets: list[FewShotSet], classes: list[int]) -> "PackSamples":
        """The rows of ``classes`` from each model's few-shot set, each sample (key) once."""
        datasets = {s.manifest.dataset for s in sets}
        if len(datasets) != 1:
            raise ConfigError(f"a pack draws on one dataset, got {sorted(datasets)}")
        seen: set[str] = set()
        raws, labels, keys, names = [], [], [], {}
        for s in sets:
            for i, (key, label) in enumerate(zip(s.keys, s.labels)):
                if int(label) in classes and key not in seen:
                    seen.add(key)
                    raws.append(s.raw[i])
                    labels.append(int(label))
                    keys.append(key)
            names.update(zip(s.classes, s.class_names))
        if not labels:
            raise DataError(f"no few-shot samples of classes {classes}")
        raw = np.stack(raws) if isinstance(raws[0], np.ndarray) else list(raws)
        return cls(datasets.pop(), raw, np.asarray(labels, dtype=np.int64), names,
                   np.asarray(keys, dtype=object), {"market": len(labels)})

    @classmethod
    def from_arrays(cls, dataset: str, raw, labels, class_names: dict[int, str] | None = None,
                    source: str | None = None, rows=None) -> "PackSamples":
        """A requester's samples held in memory: ``raw`` (N, 32, 32, 3) uint8 images or a list of
        strings, ``labels`` the dataset's global class ids. ``source`` defaults to
        ``requester:<sha256 of the content>``, so equal samples get equal keys; ``rows`` are the
        samples' rows in ``source`` (default 0..N-1), e.g. train-split rows a benchmark drew."""
        from snp_ray.data.tables import dataset_class_names

        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"labels must be a 1-d array of class ids, got {labels.dtype} "
                            f"{labels.shape}")
        names = dataset_class_names(dataset)
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise DataError(f"labels out of range [0, {len(names)}) of {dataset}")
        if isinstance(raw, np.ndarray):
            if raw.dtype != np.uint8 or raw.ndim != 4 or raw.shape[-1] != 3:
                raise DataError(f"images must be (N, H, W, 3) uint8, got {raw.dtype} {raw.shape}")
        elif not all(isinstance(t, str) for t in raw):
            raise DataError("text samples must be strings")
        if len(labels) == 0:
            raise DataError("no samples")
        digest = content_sha256(raw, labels)
        out = cls(dataset, raw, labels.astype(np.int64),
                  class_names or {c: names[c] for c in np.unique(labels).tolist()})
        rows = range(len(labels)) if rows is None else np.asarray(rows)
        if len(rows) != len(labels):
            raise DataError(f"{len(rows)} row ids for {len(labels)} samples")
        out.keys = sample_keys(source or f"{REQUESTER}:{digest}", rows)
        out.counts = {"requester": len(labels)}
        return out

    @classmethod
    def from_parquet(cls, data: bytes, dataset: str, *, what: str = "samples",
                     max_rows: int | None = None) -> "PackSamples":
        """A requester's Parquet file in ``dataset``'s schema (``image`` PNG bytes or ``text``,
        and ``label``, the dataset's class id). Its row count is checked before any decoding."""
        from PIL import Image

        from snp_ray.data.tables import dataset_class_names, split_from_bytes

        names = dataset_class_names(dataset)
        try:
            split = split_from_bytes(data, dataset, REQUESTER, names, what, max_rows=max_rows)
        except Image.DecompressionBombError as e:    # Pillow refuses it at open, with its own type
            raise DataError(f"{what}: an image is too large to decode ({e})") from None
        raw = split.images if split.images is not None else split.texts
        return cls.from_arrays(dataset, raw, split.labels,
                               source=f"{REQUESTER}:{hashlib.sha256(data).hexdigest()}")

    # ------------------------------------------------------------------ combining
    def only(self, classes: list[int]) -> "PackSamples":
        """The samples of ``classes``; a requester's sample of another class is an error (it
        would train nothing, so the requester meant something else)."""
        stray = sorted(set(np.unique(self.labels).tolist()) - set(classes))
        if stray:
            raise DataError(f"the samples hold classes {stray} that the request {classes} does "
                            "not name")
        return self

    def with_(self, other: "PackSamples") -> "PackSamples":
        """Both sample sets, each key once (``self`` first)."""
        if other.dataset != self.dataset:
            raise ConfigError(f"samples of {self.dataset} and {other.dataset} cannot be packed "
                              "together")
        new = ~np.isin(other.keys, self.keys)
        if isinstance(self.raw, np.ndarray):
            raw = np.concatenate([self.raw, other.raw[new]])
        else:
            raw = list(self.raw) + [t for t, n in zip(other.raw, new) if n]
        counts = dict(self.counts)
        if len(other.counts) == 1:          # one origin: count only the samples added
            (origin,) = other.counts
            counts[origin] = counts.get(origin, 0) + int(new.sum())
        else:
            for k, v in other.counts.items():
                counts[k] = counts.get(k, 0) + v
        return PackSamples(self.dataset, raw, np.concatenate([self.labels, other.labels[new]]),
                           {**other.class_names, **self.class_names},
                           np.concatenate([self.keys, other.keys[new]]), counts)

    @property
    def sha256(self) -> str:
        """Digest of the inputs and labels (not the keys): equal samples, equal digest."""
        return content_sha256(self.raw, self.labels)

    def describe(self) -> dict[str, object]:
        return {"count": len(self), **self.counts, "sha256": self.sha256}


def read_capped(path: str | os.PathLike, max_bytes: int, what: str) -> bytes:
    """A file's bytes, refused (:class:`PayloadTooLarge`) past ``max_bytes`` without reading
    further: the same cap as the service's request bodies."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ArtifactNotFoundError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise StoreError(f"cannot read {what} {path}: {e.strerror or e}") from e
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{what} {path} is over the limit of {max_bytes:,} bytes")
    return data


def check_covers(samples: PackSamples, classes: dict[int, str], flag: str) -> None:
    """Samples that are all a pack trains on must hold every requested class ({id: name});
    ``flag`` names the option that adds the market's shots."""
    have = set(np.unique(samples.labels).tolist())
    missing = [f"{name} ({c})" for c, name in classes.items() if c not in have]
    if missing:
        raise DataError(f"the samples hold none of {missing}: give every requested class some, "
                        f"or add the market's shots ({flag})")


def source_of(samples: PackSamples) -> str:
    """Where the samples come from, e.g. ``requester:<sha256 of the file>`` (their keys'
    ``source`` part, :func:`snp_ray.data.fewshot.sample_keys`)."""
    return str(samples.keys[0]).rsplit("#", 1)[0]


def content_sha256(raw, labels) -> str:
    h = hashlib.sha256()
    if isinstance(raw, np.ndarray):
        h.update(json.dumps(["array", str(raw.dtype), list(raw.shape)]).encode())
        h.update(np.ascontiguousarray(raw).tobytes())
    else:
        h.update(json.dumps(["text", list(raw)]).encode())
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def class_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-sample weights that give every class the same total weight (mean weight 1)."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(y) / (num_classes * np.maximum(counts, 1)), 0.0)
    return w[y]
