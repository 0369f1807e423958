"""Data layer: readers on the real Parquet files, schema and content errors, test-split fence,
k-shot sampling, tokenizer and vocabularies."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from conftest import write_image_parquet
from snp_ray.data import (FewShotManifest, ImageSpec, TextSpec, load_fewshot, read_split,
                          sample_k_shot)
from snp_ray.data.text import build_vocab, tokenize
from snp_ray.errors import (ConfigError, DataError, DatasetNotFoundError, SchemaError,
                            TestSplitAccessError, UnknownNameError)
from snp_ray.data.testsplit import load_test_split


def test_real_cifar10_train(real_data):
    s = read_split("cifar10", "train")
    assert s.images.shape == (50000, 32, 32, 3) and s.images.dtype == np.uint8
    assert np.bincount(s.labels).tolist() == [5000] * 10
    assert s.class_names[3] == "cat"


@pytest.mark.parametrize("name,split,rows,classes", [("trec", "train", 5452, 6),
                                                     ("sst5", "dev", 1101, 5)])
def test_real_text_splits(real_data, name, split, rows, classes):
    s = read_split(name, split)
    assert len(s) == rows and s.num_classes == classes and isinstance(s.texts[0], str)


def test_test_split_only_through_evaluation(real_data):
    with pytest.raises(TestSplitAccessError, match="evaluation only"):
        read_split("trec", "test")
    s = load_test_split("trec", [0, 5])
    assert len(s) == 9 + 113 and set(s.labels.tolist()) == {0, 5}


def test_missing_dataset_names_file_and_remedy(tiny_root):
    with pytest.raises(DatasetNotFoundError) as e:
        read_split("sst5", "train")
    assert "sst5/train.parquet" in str(e.value) and "SNP_DATA_ROOT" in str(e.value)
    with pytest.raises(DatasetNotFoundError, match="snp convert-cifar"):
        read_split("cifar100", "train")


def test_unset_data_root(monkeypatch):
    monkeypatch.delenv("SNP_DATA_ROOT")
    with pytest.raises(DatasetNotFoundError, match="SNP_DATA_ROOT is not set"):
        read_split("cifar10", "train")


def test_unknown_dataset_and_split(tiny_root):
    with pytest.raises(UnknownNameError, match="cifar10"):
        read_split("mnist", "train")
    with pytest.raises(UnknownNameError, match="train"):
        read_split("cifar10", "validation")


def test_wrong_schema_names_expected_columns(tiny_root):
    imgs = np.zeros((2, 32, 32, 3), np.uint8)
    write_image_parquet(tiny_root / "cifar10" / "train.parquet", imgs, [0, 1], ["a", "b"],
                        extra_columns={"lbl": pa.array([0, 1])}, drop=("label",))
    with pytest.raises(SchemaError) as e:
        read_split("cifar10", "train")
    assert "image: binary" in str(e.value) and "label: int" in str(e.value)


def test_labels_out_of_range(tiny_root):
    write_image_parquet(tiny_root / "cifar10" / "train.parquet", np.zeros((2, 32, 32, 3), np.uint8),
                        [0, 7], ["a", "b"])
    with pytest.raises(DataError, match="labels out of range"):
        read_split("cifar10", "train")


def test_images_of_the_wrong_shape(tiny_root):
    write_image_parquet(tiny_root / "cifar10" / "train.parquet", np.zeros((2, 16, 16, 3), np.uint8),
                        [0, 1], ["a", "b"])
    with pytest.raises(DataError, match=r"shape \(16, 16, 3\)"):
        read_split("cifar10", "train")


def test_not_parquet(tiny_root):
    (tiny_root / "cifar10" / "train.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet"):
        read_split("cifar10", "train")


def test_k_shot_is_deterministic_nested_and_balanced(tiny_root):
    labels = read_split("cifar10", "train").labels
    a = sample_k_shot(labels, [0, 2], 5, seed=3, dataset="cifar10")
    b = sample_k_shot(labels, [0, 2], 5, seed=3, dataset="cifar10")
    small = sample_k_shot(labels, [0, 2], 2, seed=3, dataset="cifar10")
    assert a == b
    assert all(set(s) <= set(r) for s, r in zip(small.row_ids, a.row_ids))
    assert sample_k_shot(labels, [0, 2], 5, seed=4, dataset="cifar10") != a
    fs = load_fewshot(FewShotManifest.from_json(a.to_json()))
    assert fs.raw.shape == (10, 32, 32, 3) and fs.labels.tolist() == [0] * 5 + [2] * 5
    assert fs.local.tolist() == [0] * 5 + [1] * 5


@pytest.mark.parametrize("k", [0, -1, 9])
def test_k_out_of_range(tiny_root, k):
    labels = read_split("cifar10", "train").labels
    with pytest.raises(DataError, match="k=9|positive"):
        sample_k_shot(labels, [0, 1], k, seed=0, dataset="cifar10")


def test_manifest_cannot_point_at_test_split():
    with pytest.raises(ConfigError, match="test split"):
        FewShotManifest(dataset="cifar10", k=1, seed=0, classes=[0], row_ids=[[1]], split="test")


def test_manifest_with_wrong_labels(tiny_root):
    bad = FewShotManifest(dataset="cifar10", k=1, seed=0, classes=[0, 1], row_ids=[[0], [1]])
    with pytest.raises(DataError, match="labels it claims"):
        load_fewshot(bad)


def test_tokenizer_and_vocab():
    assert tokenize("What's the U.S. capital?") == ["what's", "the", "u", ".", "s", ".",
                                                    "capital", "?"]
    vocab = build_vocab(["b a a", "c b a"])
    assert vocab == ["<pad>", "<unk>", "a", "b", "c"]


def test_two_text_models_keep_their_own_vocabularies():
    one = TextSpec(vocab=build_vocab(["red apple", "green apple"]), max_len=4)
    two = TextSpec(vocab=build_vocab(["blue sky", "red sky"]), max_len=4)
    assert one.encode(["red sky"]).tolist() != two.encode(["red sky"]).tolist()
    assert TextSpec.from_json(one.to_json()) == one
    with pytest.raises(DataError, match="no token known"):
        one.encode(["zzz qqq"], strict=True)


def test_image_spec_normalises_with_its_own_statistics():
    imgs = np.random.default_rng(0).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    spec = ImageSpec.fit(imgs)
    x = spec.encode(imgs)
    assert x.shape == (50, 3, 32, 32)
    assert np.allclose(x.mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-3)
    assert np.allclose(x.std(dim=(0, 2, 3)).numpy(), 1, atol=1e-2)
    assert spec.size == [32, 32]
    with pytest.raises(DataError, match="shape"):
        spec.encode(np.zeros((2, 28, 28, 4), np.uint8))
    with pytest.raises(DataError, match="shape"):
        spec.encode(np.zeros((28, 28, 3), np.uint8))


def test_image_spec_carries_its_size_and_resizes_other_sizes_to_it():
    """The input spec, not a constant, says what size a model takes (issue 12)."""
    big = np.zeros((2, 64, 48, 3), np.uint8)
    big[:, :32] = 255                                  # top half white
    spec = ImageSpec(mean=[0.0] * 3, std=[1.0] * 3, size=[16, 24])
    x = spec.encode(big)
    assert x.shape == (2, 3, 16, 24)
    assert float(x[:, :, :7].min()) == 1.0 and float(x[:, :, 9:].max()) == 0.0
    assert ImageSpec.fit(big).size == [64, 48]
    assert ImageSpec.from_dict({"kind": "image", "mean": [0.5] * 3, "std": [0.2] * 3}).size == [32, 32]
    assert spec.example(3).shape == (3, 3, 16, 24)
    with pytest.raises(ConfigError, match="size"):
        ImageSpec(size=[0, 32])


def test_one_class_resolver_rules():
    """snp_ray.data.classes: the rules every class-taking place shares (snp pack/slice/market
    add, the service's classes and sample labels)."""
    from snp_ray.data.classes import class_id, class_ids
    from snp_ray.errors import UnknownNameError

    vocab = ["airplane", "automobile", "bird", "cat", "Deer"]
    assert class_ids(["cat", 1, " 2 ", "bird"], vocab, repeats=True) == [3, 1, 2, 2]
    assert class_ids(["CAT", "deer", "Deer "], vocab, repeats=True) == [3, 4, 4]   # case, blanks
    assert class_ids(("bird", "airplane"), vocab) == [2, 0]                       # order kept
    assert class_id(np.int64(4), vocab) == 4                                      # numpy ints
    held = {3: "cat", 7: "horse"}                                                 # {id: name}
    assert class_ids(["horse", "3"], held) == [7, 3]
    with pytest.raises(UnknownNameError, match=r"unknown class '1'.*valid classes: cat, horse"):
        class_id("1", held)                           # an id outside the choices
    with pytest.raises(UnknownNameError) as e:
        class_id(" dgo ", vocab + ["dog"], where=" (held by no model)")
    assert str(e.value).startswith("unknown class 'dgo' (held by no model); valid classes:")
    assert "dog" in e.value.close and isinstance(e.value, ConfigError)
    with pytest.raises(UnknownNameError, match="'²'"):
        class_id("²", vocab)                          # non-ASCII digits are names, not ids
    with pytest.raises(UnknownNameError, match="unknown cifar10 class 'x'"):
        class_id("x", vocab, kind="cifar10 class")
    assert class_ids(["Cat"], ["cat", "CAT", "Cat"]) == [2]                       # exact wins
    with pytest.raises(UnknownNameError):
        class_id("cAt", ["cat", "CAT"])               # two classes differ only in case: no guess
    for bad in ([], "cat", None, {"cat": 1}):
        with pytest.raises(ConfigError, match="the request names no classes"):
            class_ids(bad, vocab)
    for bad in (True, 1.0, None, ["cat"]):
        with pytest.raises(ConfigError, match="a class is a name or an id"):
            class_id(bad, vocab)
    with pytest.raises(ConfigError, match=r"duplicate classes in --classes: \['cat \(3\)'\]"):
        class_ids(["cat", "3"], vocab, what="--classes")
    assert class_ids(["cat", "3"], vocab, repeats=True) == [3, 3]


def test_one_image_decoder_guards_and_sizes(tiny_root):
    """snp_ray.data.tables.decode_image: a dataset row must have the dataset's size (refused from
    the header); an upload is resized; both pass the pixel guard and decode to the same pixels."""
    import io

    from PIL import Image

    from conftest import png_bytes
    from snp_ray.data.tables import decode_image

    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    blob = png_bytes(img)
    np.testing.assert_array_equal(decode_image(blob, "row"), img)
    np.testing.assert_array_equal(decode_image(blob, "row", resize=True), img)
    buf = io.BytesIO()
    Image.fromarray(np.kron(img, np.ones((2, 2, 1), np.uint8))).save(buf, format="PNG")
    with pytest.raises(DataError, match=r"row has shape \(64, 64, 3\), expected \(32, 32, 3\)"):
        decode_image(buf.getvalue(), "row")
    assert decode_image(buf.getvalue(), "upload", resize=True).shape == (32, 32, 3)
    with pytest.raises(DataError, match="more than 4,095 pixels"):
        decode_image(buf.getvalue(), "upload", max_pixels=4095, resize=True)
    with pytest.raises(DataError, match="upload is empty"):
        decode_image(b"", "upload", resize=True)
