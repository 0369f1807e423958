"""Which datasets exist, where they live (``SNP_DATA_ROOT``) and what their tables must hold."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from snp_ray.errors import DatasetNotFoundError, UnknownNameError

ENV_DATA_ROOT = "SNP_DATA_ROOT"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    modality: str                      # image | text
    splits: tuple[str, ...]
    columns: dict[str, str]            # column -> "binary" | "int" | "string" | "bool"
    obtain: str                        # how a user gets the files

    def path(self, split: str, root: Path | None = None) -> Path:
        return (root or data_root()) / self.name / f"{split}.parquet"


_CIFAR_HOWTO = ("convert torchvision's download with `snp convert-cifar --name {name} --download "
                "--out $SNP_DATA_ROOT` (needs a network)")
_SHARED_HOWTO = "point SNP_DATA_ROOT at the project's shared/data folder, which ships it"

DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", "image", ("train", "test"),
                           {"image": "binary", "label": "int"},
                           _CIFAR_HOWTO.format(name="cifar10") + ", or " + _SHARED_HOWTO),
    "cifar100": DatasetInfo("cifar100", "image", ("train", "test"),
                            {"image": "binary", "label": "int", "coarse_label": "int"},
                            _CIFAR_HOWTO.format(name="cifar100")),
    "trec": DatasetInfo("trec", "text", ("train", "test"),
                        {"text": "string", "label": "int"}, _SHARED_HOWTO),
    "sst5": DatasetInfo("sst5", "text", ("train", "dev", "test"),
                        {"text": "string", "label": "int"}, _SHARED_HOWTO),
}


def get_dataset(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise UnknownNameError("dataset", name, list(DATASETS)) from None


def checkout_data_root() -> Path | None:
    """``../shared/data`` beside this source checkout (where ``make`` points SNP_DATA_ROOT), or
    None: an installed package, or a checkout without it."""
    root = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return root if root.is_dir() else None


def data_root() -> Path:
    """The folder named by ``SNP_DATA_ROOT``; a clear error when it is unset or missing."""
    value = os.environ.get(ENV_DATA_ROOT)
    if not value:
        raise DatasetNotFoundError(
            f"{ENV_DATA_ROOT} is not set: point it at a folder holding <dataset>/<split>.parquet "
            "(the Makefile sets it to ../shared/data when that folder exists)")
    root = Path(value).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"{ENV_DATA_ROOT}={value} is not a directory")
    return root


def split_file(name: str, split: str) -> Path:
    info = get_dataset(name)
    if split not in info.splits:
        raise UnknownNameError(f"split of {name}", split, list(info.splits))
    path = info.path(split)
    if not path.is_file():
        raise DatasetNotFoundError(f"dataset file {path} is missing; to obtain it, {info.obtain}")
    return path


def available() -> dict[str, list[str]]:
    """Datasets with at least one split present under the data root, and those splits."""
    root = data_root()
    found = {}
    for name, info in DATASETS.items():
        splits = [s for s in info.splits if info.path(s, root).is_file()]
        if splits:
            found[name] = splits
    return found
