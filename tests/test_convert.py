"""convert_cifar on tiny hand-made torchvision-format folders: never downloads anything."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from snp_ray.data.convert import convert_cifar
from snp_ray.data.tables import EVAL_ACCESS, read_split
from snp_ray.errors import DataError, DatasetNotFoundError, UnknownNameError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
CIFAR100_CLASSES = [f"fine_{i:02d}" for i in range(100)]
CIFAR100_COARSE = [f"coarse_{i:02d}" for i in range(20)]


def _dump(path: Path, obj: dict) -> None:
    # The official pickles come from Python 2 and load with str keys under encoding="latin1",
    # which is what torchvision indexes with; pickle str keys to match.
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _batch(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3072) uint8 rows, channel-first flattened, as in the official pickles."""
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _hwc(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _rank(labels) -> list[int]:
    seen: dict[int, int] = {}
    out = []
    for lab in labels:
        out.append(seen.get(lab, 0))
        seen[lab] = out[-1] + 1
    return out


def make_cifar10(root: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(10)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for b in range(1, 6):
        x, y = _batch(rng, 3), [int(v) for v in rng.integers(0, 3, size=3)]
        _dump(folder / f"data_batch_{b}", {"batch_label": f"training batch {b} of 5",
                                           "data": x, "labels": y})
        train_x.append(x)
        train_y += y
    test_x, test_y = _batch(rng, 4), [2, 7, 2, 0]
    _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1",
                                  "data": test_x, "labels": test_y})
    _dump(folder / "batches.meta", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 3,
                                    "num_vis": 3072})
    return {"train": (np.concatenate(train_x), train_y), "test": (test_x, test_y)}


def make_cifar100(root: Path) -> dict[str, tuple[np.ndarray, list[int], list[int]]]:
    rng = np.random.default_rng(100)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, fine in (("train", [5, 42, 5, 99, 0]), ("test", [42, 0, 42])):
        x = _batch(rng, len(fine))
        coarse = [f % 20 for f in fine]
        _dump(folder / split, {"filenames": [f"img_{i}.png" for i in range(len(fine))],
                               "batch_label": split, "fine_labels": fine,
                               "coarse_labels": coarse, "data": x})
        out[split] = (x, fine, coarse)
    _dump(folder / "meta", {"fine_label_names": CIFAR100_CLASSES,
                            "coarse_label_names": CIFAR100_COARSE})
    return out


@pytest.fixture
def env(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("SNP_DATA_ROOT", str(out))
    monkeypatch.setenv("SNP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path, out


def _read(name: str, split: str):
    return read_split(name, split, access=EVAL_ACCESS if split == "test" else None)


def test_cifar10_round_trip(env):
    tmp, out = env
    expected = make_cifar10(tmp / "dl")
    paths = convert_cifar("cifar10", tmp / "dl", out, verify=False)
    assert paths == {"train": out / "cifar10" / "train.parquet",
                     "test": out / "cifar10" / "test.parquet"}
    assert json.loads((out / "cifar10" / "classes.json").read_text()) == {
        "classes": CIFAR10_CLASSES}
    for split, (rows, labels) in expected.items():
        s = _read("cifar10", split)
        assert set(s.extra) == set()  # cifar10 carries no coarse labels
        assert s.class_names == CIFAR10_CLASSES
        np.testing.assert_array_equal(s.images, _hwc(rows))
        assert s.labels.tolist() == labels
        cols = pq.read_table(paths[split], columns=["orig_index", "class_rank", "lossless"])
        assert cols.column("orig_index").to_pylist() == list(range(len(labels)))
        assert cols.column("class_rank").to_pylist() == _rank(labels)
        assert all(cols.column("lossless").to_pylist())
        schema = pq.read_schema(paths[split])
        assert {f.name: str(f.type) for f in schema} == {
            "image": "binary", "label": "int16", "lossless": "bool", "orig_index": "int32",
            "class_rank": "int32"}
        meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
        assert meta["split"] == split and meta["source"] == "torchvision download"
        assert meta["dataset"] == "CIFAR-10"
    assert not list((out / "cifar10").glob("*.tmp")) and not list((out / "cifar10").glob(".*"))


def test_cifar100_round_trip(env):
    tmp, out = env
    expected = make_cifar100(tmp / "dl")
    paths = convert_cifar("cifar100", tmp / "dl", out, verify=False)
    side = json.loads((out / "cifar100" / "classes.json").read_text())
    assert side["classes"] == CIFAR100_CLASSES and side["coarse_classes"] == CIFAR100_COARSE
    for split, (rows, fine, coarse) in expected.items():
        s = _read("cifar100", split)
        assert s.class_names == CIFAR100_CLASSES
        np.testing.assert_array_equal(s.images, _hwc(rows))
        assert s.labels.tolist() == fine
        assert s.extra["coarse_label"].tolist() == coarse
        cols = pq.read_table(paths[split], columns=["orig_index", "class_rank", "lossless"])
        assert cols.column("orig_index").to_pylist() == list(range(len(fine)))
        assert cols.column("class_rank").to_pylist() == _rank(fine)
        assert all(cols.column("lossless").to_pylist())
        schema = pq.read_schema(paths[split])
        assert str(schema.field("coarse_label").type) == "int16"
        assert json.loads(schema.metadata[b"coarse_classes"]) == CIFAR100_COARSE


def test_verify_rejects_non_official_files(env):
    tmp, out = env
    make_cifar10(tmp / "dl")
    with pytest.raises(DataError, match="cannot load the train split"):
        convert_cifar("cifar10", tmp / "dl", out)  # verify=True: fixture md5s differ
    assert not (out / "cifar10" / "train.parquet").exists()


def test_missing_folder_without_download(env):
    tmp, out = env
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python.*download=True"):
        convert_cifar("cifar100", tmp / "nothing", out)


def test_unknown_name(env):
    tmp, out = env
    with pytest.raises(UnknownNameError, match="cifar10, cifar100"):
        convert_cifar("mnist", tmp, out)
