"""Convert torchvision's CIFAR-10/100 download into the project's Parquet tables.

The shared data folder cannot ship CIFAR-100 (and ships a partly lossy CIFAR-10 test split), so a
user with a network fetches the official python-format archives through torchvision and converts
them here into ``<out>/<name>/{train,test}.parquet`` with the same schema as the shipped CIFAR-10
files. Readers (:mod:`snp_ray.data.tables`) then see no difference between the two sources.

The official archives are pickles; only open folders you downloaded yourself (``verify=True``
checks torchvision's published md5 sums before anything is unpickled).
"""
from __future__ import annotations

import io
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from snp_ray.artifacts import atomic_write_bytes
from snp_ray.errors import DataError, DatasetNotFoundError, UnknownNameError

log = logging.getLogger(__name__)

CIFAR_NAMES = ("cifar10", "cifar100")
SPLITS = ("train", "test")
_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
_CITATION = ("Krizhevsky, A. (2009). Learning Multiple Layers of Features from Tiny Images. "
             "Tech. report, Univ. of Toronto.")
SOURCE = "torchvision download"


def _dataset_class(name: str, verify: bool):
    """torchvision's class for ``name``; with ``verify=False`` the md5 checks are skipped.

    Skipping lets tests (and users with re-packed but equivalent files) convert folders whose
    checksums differ from the official archives; file presence is still required.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    base = {"cifar10": CIFAR10, "cifar100": CIFAR100}[name]
    if verify:
        return base

    class Unverified(base):  # type: ignore[misc, valid-type]
        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / f).is_file() for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:  # the stock one checks the meta file's md5
            path = Path(self.root) / self.base_folder / self.meta["filename"]
            if not path.is_file():
                raise RuntimeError(f"Dataset metadata file {path} not found")
            with open(path, "rb") as fh:
                self.classes = pickle.load(fh, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    Unverified.__name__ = f"Unverified{base.__name__}"
    return Unverified


def _get(entry: dict, key: str):
    """A pickle entry's value under ``key`` whether it was pickled with str or bytes keys."""
    if key in entry:
        return entry[key]
    if key.encode() in entry:
        return entry[key.encode()]
    raise KeyError(key)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh, encoding="latin1")
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{path} is missing from the CIFAR download") from None
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable CIFAR pickle: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a dict (found {type(obj).__name__})")
    return obj


def _coarse(ds, split_files: list) -> tuple[np.ndarray, list[str]]:
    """CIFAR-100 superclass labels and names, read from the pickles (torchvision drops them)."""
    folder = Path(ds.root) / ds.base_folder
    labels: list[int] = []
    for file_name, _md5 in split_files:
        path = folder / file_name
        try:
            labels.extend(int(v) for v in _get(_load_pickle(path), "coarse_labels"))
        except KeyError:
            raise DataError(f"{path} has no 'coarse_labels' entry") from None
    meta_path = folder / ds.meta["filename"]
    try:
        names = [str(n) for n in _get(_load_pickle(meta_path), "coarse_label_names")]
    except KeyError:
        raise DataError(f"{meta_path} has no 'coarse_label_names' entry") from None
    return np.asarray(labels, dtype=np.int64), names


def _class_rank(labels: np.ndarray) -> np.ndarray:
    """Position of each row among the rows of its class, in split order."""
    rank = np.empty(labels.shape[0], dtype=np.int32)
    seen: dict[int, int] = {}
    for i, lab in enumerate(labels.tolist()):
        rank[i] = seen.get(lab, 0)
        seen[lab] = rank[i] + 1
    return rank


def _encode_png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _check_labels(labels: np.ndarray, n_classes: int, what: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(f"{what}: labels out of range [0, {n_classes}): "
                        f"found {int(labels.min())}..{int(labels.max())}")


def _write_table(path: Path, columns: dict[str, pa.Array], metadata: dict[str, str]) -> None:
    table = pa.table(columns).replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


#: the archives torchvision's CIFAR classes download (``.url``; a test checks they agree),
#: spelled out so that probing the network does not import torchvision (seconds)
SOURCE_URLS = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
               "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}


def source_url(name: str) -> str:
    """The URL torchvision downloads ``name`` from (what a network probe should reach)."""
    if name not in CIFAR_NAMES:
        raise UnknownNameError("CIFAR dataset", name, list(CIFAR_NAMES))
    return SOURCE_URLS[name]


def download_cifar(name: str, root: str | Path) -> Path:
    """Fetch torchvision's ``name`` archive into ``root`` and unpack it (needs a network).

    torchvision shows a byte progress bar and checks the archive's published md5 sum; an
    archive already there and intact is not fetched again. Returns the unpacked folder.
    """
    if name not in CIFAR_NAMES:
        raise UnknownNameError("CIFAR dataset", name, list(CIFAR_NAMES))
    root = Path(root).expanduser()
    cls = _dataset_class(name, verify=True)
    try:
        cls(str(root), train=True, download=True)   # one archive holds both splits
    except OSError as e:  # no network, DNS failure, refused connection, disk full
        raise DatasetNotFoundError(f"cannot download {_TITLES[name]} to {root}: {e}") from None
    except RuntimeError as e:  # torchvision: the archive failed its md5 check
        raise DataError(f"the {_TITLES[name]} download in {root} is corrupt: {e}") from None
    return root / cls.base_folder


def _encode_all(data: np.ndarray, progress: bool, desc: str) -> list[bytes]:
    """PNG bytes of every image, with a progress bar when asked (60 000 images take a while)."""
    if not progress:
        return [_encode_png(img) for img in data]
    from tqdm.auto import tqdm

    return [_encode_png(img) for img in tqdm(data, desc=desc, unit="img", mininterval=1.0)]


def convert_cifar(name: str, root: str | Path, out_dir: str | Path, download: bool = False,
                  verify: bool = True, progress: bool = False) -> dict[str, Path]:
    """Convert torchvision's ``name`` download under ``root`` to ``out_dir/<name>/*.parquet``.

    Returns ``{"train": path, "test": path}``. ``out_dir/<name>/classes.json`` is written too.
    Every file is written atomically, so an interrupted run never leaves a half-written table.
    ``progress`` shows a bar per split while the images are encoded.
    """
    if name not in CIFAR_NAMES:
        raise UnknownNameError("CIFAR dataset", name, list(CIFAR_NAMES))
    root, out = Path(root).expanduser(), Path(out_dir).expanduser() / name
    cls = _dataset_class(name, verify)
    folder = root / cls.base_folder
    if not download and not folder.is_dir():
        raise DatasetNotFoundError(
            f"{folder} does not exist: no torchvision {_TITLES[name]} download under {root}; "
            "pass download=True (--download) on a machine with a network to fetch it")

    loaded = {}
    for split in SPLITS:
        try:
            loaded[split] = cls(str(root), train=(split == "train"), download=download)
        except RuntimeError as e:  # torchvision's "not found or corrupted"
            raise DataError(f"cannot load the {split} split of {_TITLES[name]} from {folder}: {e}"
                            + ("" if download else "; pass download=True to (re)fetch it")) from None
        except OSError as e:  # a failed download
            raise DatasetNotFoundError(f"cannot download {_TITLES[name]} to {root}: {e}") from None
    classes = [str(c) for c in loaded["train"].classes]

    coarse_names: list[str] | None = None
    paths: dict[str, Path] = {}
    fine_to_coarse: dict[int, int] = {}
    for split in SPLITS:
        ds = loaded[split]
        data = np.asarray(ds.data, dtype=np.uint8)
        labels = np.asarray(ds.targets, dtype=np.int64)
        what = f"{_TITLES[name]} {split} under {folder}"
        if data.ndim != 4 or data.shape[1:] != (32, 32, 3) or data.shape[0] != labels.shape[0]:
            raise DataError(f"{what}: images {data.shape} do not match {labels.shape[0]} labels "
                            "of 32x32x3")
        _check_labels(labels, len(classes), what)
        columns = {
            "image": pa.array(_encode_all(data, progress, f"{_TITLES[name]} {split} to PNG"),
                              type=pa.binary()),
            "label": pa.array(labels.astype(np.int16), type=pa.int16()),
            "lossless": pa.array(np.ones(len(labels), dtype=bool), type=pa.bool_()),
            "orig_index": pa.array(np.arange(len(labels), dtype=np.int32), type=pa.int32()),
            "class_rank": pa.array(_class_rank(labels), type=pa.int32()),
        }
        meta = {"classes": json.dumps(classes), "dataset": _TITLES[name], "split": split,
                "source": SOURCE, "lossless": "all rows", "citation": _CITATION,
                "image_format": "PNG (lossless encoding of the 32x32 RGB pixels)"}
        if name == "cifar100":
            files = ds.train_list if split == "train" else ds.test_list
            coarse, coarse_names = _coarse(ds, files)
            if coarse.shape != labels.shape:
                raise DataError(f"{what}: {coarse.shape[0]} coarse labels for "
                                f"{labels.shape[0]} images")
            _check_labels(coarse, len(coarse_names), f"{what} (coarse)")
            for f, c in zip(labels.tolist(), coarse.tolist()):
                if fine_to_coarse.setdefault(f, c) != c:
                    raise DataError(f"{what}: fine class {classes[f]!r} appears under two "
                                    f"superclasses ({coarse_names[fine_to_coarse[f]]!r}, "
                                    f"{coarse_names[c]!r})")
            columns["coarse_label"] = pa.array(coarse.astype(np.int16), type=pa.int16())
            meta["coarse_classes"] = json.dumps(coarse_names)
        paths[split] = out / f"{split}.parquet"
        _write_table(paths[split], columns, meta)
        log.info("wrote %s (%d rows)", paths[split], len(labels))

    sidecar: dict[str, object] = {"classes": classes}
    if coarse_names is not None:
        sidecar["coarse_classes"] = coarse_names
        if len(fine_to_coarse) == len(classes):  # only a full download pins every class
            sidecar["fine_to_coarse"] = [fine_to_coarse[i] for i in range(len(classes))]
    atomic_write_bytes(out / "classes.json",
                       (json.dumps(sidecar, indent=2) + "\n").encode())
    log.info("wrote %s", out / "classes.json")
    return paths
