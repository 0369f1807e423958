"""Issue 13 section 1: a developer adds their own trained model to a market.

``snp market add/list/remove`` (and ``Market.add_model``) on a small torchvision MobileNetV2 with
random weights saved as safetensors by the test itself; the added model slices, and its fragment
reloads from the store and runs. Every bad input is a typed error (exit 2, ``{"error", "type"}``
with ``--json``) and leaves the store byte-identical."""
from __future__ import annotations

import io
import json
import pickle
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from conftest import png_bytes, write_image_parquet
from snp_ray.artifacts import sha256_bytes
from snp_ray.cli import main
from snp_ray.errors import ConfigError, ModelExistsError, WeightsError
from snp_ray.market import Market
from snp_ray.models import build_model
from snp_ray.slicing import slice_preset
from snp_ray.store import slice_missing
from snp_ray.store import FragmentStore

ARCH = "torchvision:mobilenet_v2?width_mult=0.25"
CLASSES = "airplane,cat,dog"            # cifar10 ids 0, 3, 5


def _mv2(num_classes: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.get_model("mobilenet_v2", weights=None, num_classes=num_classes,
                                        width_mult=0.25).eval()


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def snp(*argv: str) -> tuple[int, dict]:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main([*argv, "--json"])
    return rc, json.loads(out.getvalue().strip().splitlines()[-1])


def add_args(store: Path, weights: Path, **over: str) -> list[str]:
    opts = {"--store": str(store), "--arch": ARCH, "--weights": str(weights), "--classes": CLASSES,
            "--dataset": "cifar10", "--k": "5", "--id": "mv2"} | over
    return ["market", "add"] + [x for kv in opts.items() for x in kv if x != ""]


@pytest.fixture(scope="module")
def files(tmp_path_factory, real_data, one_thread):
    """Weights files (good, NaN, wrong architecture, pickles) and a store holding one added model."""
    d = tmp_path_factory.mktemp("add")
    model = _mv2()
    save_file(model.state_dict(), d / "mv2.safetensors")
    bad = {k: v.clone() for k, v in model.state_dict().items()}
    bad["features.0.0.weight"][0, 0, 0, 0] = float("nan")
    save_file(bad, d / "nan.safetensors")
    other = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=3,
                                         width_mult=0.25)
    save_file(other.state_dict(), d / "v3.safetensors")
    (d / "model.pth").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    (d / "model.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 60)       # torch.save's zip layout
    save_file(build_model("vgg11", 3, 0.125).state_dict(), d / "vgg.safetensors")
    store = d / "store"
    rc, _ = snp(*add_args(store, d / "mv2.safetensors"))
    assert rc == 0
    return d, store, model


@pytest.fixture
def store_copy(files, tmp_path):
    d, store, _ = files
    dest = tmp_path / "store"
    shutil.copytree(store, dest)
    return dest


def test_add_list_remove_through_the_cli(files, tmp_path):
    d, _, model = files
    store = tmp_path / "m"
    rc, out = snp(*add_args(store, d / "mv2.safetensors", **{"--id": "mine", "--mean": "0.4,0.5,0.6",
                                                           "--std": "0.2,0.2,0.3"}))
    assert rc == 0, out
    m = out["model"]
    assert m["id"] == "mine" and m["arch"] == ARCH and m["classes"] == ["airplane", "cat", "dog"]
    assert m["params"] == sum(p.numel() for p in model.parameters())
    assert m["input"] == {"kind": "image", "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.2, 0.3],
                          "size": [32, 32]}
    assert m["fewshot_samples"] == 15 and m["macs"] > 0
    assert m["fewshot"]["source"] == "train"
    # stored like a trained model: safetensors + spec with the weights' sha256, a k-shot manifest
    folder = store / "models" / "mine"
    spec = json.loads((folder / "spec.json").read_text())
    assert spec["weights_sha256"] == sha256_bytes((folder / "weights.safetensors").read_bytes())
    assert spec["index"] == 0 and spec["arch"] == ARCH
    manifests = list((folder / "fewshot").glob("k5-s*.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["split"] == "train"
    # the stored model computes what the developer's model computes (output i = class i)
    clf, mspec = Market(store).model("mine")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), model(x))
    # the reported few-shot accuracy is the stored model's on the stored k-shot samples
    fs = Market(store).fewshot("mine", 5)
    with torch.no_grad():
        pred = clf(mspec.input_spec.encode(fs.raw)).argmax(1).numpy()
    assert m["fewshot_accuracy"] == pytest.approx(float((np.asarray(mspec.classes)[pred] == fs.labels).mean()),
                                                  abs=1e-12)
    # a second model gets the next index; an existing id needs --replace
    assert snp(*add_args(store, d / "mv2.safetensors", **{"--id": "two"}))[0] == 0
    assert Market(store).spec("two").index == 1
    rc, err = snp(*add_args(store, d / "mv2.safetensors", **{"--id": "two"}))
    assert rc == 2 and err["type"] == "ModelExistsError" and "--replace" in err["error"]
    rc, out = snp(*add_args(store, d / "mv2.safetensors", **{"--id": "two", "--replace": "",
                                                           "--classes": "cat,dog,frog"}))
    assert rc == 0 and out["model"]["classes"] == ["cat", "dog", "frog"]
    assert Market(store).spec("two").index == 1
    rc, out = snp("market", "list", "--store", str(store))
    assert rc == 0 and [r["id"] for r in out["models"]] == ["mine", "two"]
    assert all(r["added"] and r["arch"] == ARCH for r in out["models"])
    rc, out = snp("market", "remove", "--store", str(store), "--id", "mine")
    assert rc == 0 and out["removed"] == "mine" and not folder.exists()
    assert [r["id"] for r in snp("market", "list", "--store", str(store))[1]["models"]] == ["two"]
    rc, err = snp("market", "remove", "--store", str(store), "--id", "mine")
    assert rc == 2 and err["type"] == "ArtifactNotFoundError"


def test_added_torchvision_model_slices_and_its_fragment_reloads(store_copy):
    market = Market(store_copy)
    cfg = slice_preset("smoke")
    made = list(slice_missing(market, 5, cfg, model_ids=["mv2"], class_id=3))
    assert len(made) == 1
    _, class_id, key, frag = made[0]
    assert class_id == 3 and frag is not None and frag.spec.arch == ARCH
    assert frag.spec.params < frag.spec.source_params
    loaded = FragmentStore(store_copy / "fragments").get(key)
    raw = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x = loaded.encode(raw)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), frag(x))
        assert loaded(x).shape == (3, frag.spec.feature_dim)
    # a rerun of the CLI finds it stored
    rc, out = snp("slice", "--store", str(store_copy), "--model", "mv2", "--class", "cat", "--k", "5",
                  "--preset", "smoke")
    assert rc == 0 and out == {"fragments": []}
    # snp pack and snp evaluate take the added model's fragments (the pack saves, reloads, runs)
    assert len(list(slice_missing(market, 5, cfg, model_ids=["mv2"], class_id=5))) == 1
    rc, out = snp("pack", "--store", str(store_copy), "--classes", "cat,dog", "--k", "5", "--preset",
                  "smoke", "--out", str(store_copy.parent / "pack"))
    assert rc == 0, out
    assert out["classes"] == ["cat", "dog"] and out["params_deployable"] > 0
    rc, again = snp("evaluate", "--pack", str(store_copy.parent / "pack"))
    assert rc == 0 and again["test_accuracy"] == pytest.approx(out["test_accuracy"])


@pytest.mark.parametrize("arch", ["squeezenet1_1", "shufflenet_v2_x0_5"])
def test_a_conv_head_or_shuffled_model_is_added_and_slices(arch, files, store_copy):
    """squeezenet1_1's head is a 1x1 conv, ReLU and global average pooling (#27 section 3): taken
    at add (the conv stays in the features, the head is the identity on its class scores), its
    class count read from the conv's weight, sliced, and reloaded from the store. ShuffleNetV2
    (#27 section 2): its shuffled channels are unproduced fixed groups, which the stored
    fragment's spec keeps and its reload rebuilds."""
    d, _, _ = files
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=3).eval()
    save_file(model.state_dict(), d / "model.safetensors")
    market = Market(store_copy)
    if arch == "squeezenet1_1":
        with pytest.raises(ConfigError, match="2 classes but the weights' head classifier.1 has 3 outputs"):
            market.add_model(f"torchvision:{arch}", d / "model.safetensors", ["airplane", "cat"],
                             "cifar10", k=5, model_id="sq")
    market.add_model(f"torchvision:{arch}", d / "model.safetensors", CLASSES.split(","),
                     "cifar10", k=5, model_id="sq")
    clf, _ = market.model("sq")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), model(x))
    made = list(slice_missing(market, 5, slice_preset("smoke"), model_ids=["sq"], class_id=3))
    _, _, key, frag = made[0]
    assert frag.spec.params < frag.spec.source_params
    with torch.no_grad():
        torch.testing.assert_close(FragmentStore(store_copy / "fragments").get(key)(x), frag(x))


def _upload(path: Path, per_class: dict[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([[c] * n for c, n in per_class.items()])
    images = rng.integers(0, 256, (labels.size, 32, 32, 3), dtype=np.uint8)
    return write_image_parquet(path, images, labels, [f"c{i}" for i in range(10)])


def test_own_fewshot_samples_are_stored_and_are_all_the_market_uses(files, tmp_path):
    d, _, _ = files
    store = tmp_path / "m"
    up = _upload(tmp_path / "mine.parquet", {0: 6, 3: 5, 5: 7})
    rc, out = snp(*add_args(store, d / "mv2.safetensors", **{"--fewshot": str(up)}))
    assert rc == 0, out
    assert out["model"]["fewshot"]["source"] == "upload" and out["model"]["fewshot_samples"] == 15
    stored = store / "models" / "mv2" / "fewshot" / "upload.parquet"
    assert stored.read_bytes() == up.read_bytes()
    assert out["model"]["fewshot"]["sha256"] == sha256_bytes(up.read_bytes())
    table = pq.read_table(up)
    uploaded = set(table.column("image").to_pylist())
    fs = Market(store).fewshot("mv2", 5)
    assert fs.manifest.split == "upload" and len(fs) == 15
    assert sorted(set(fs.labels.tolist())) == [0, 3, 5]
    assert {png_bytes(img) for img in fs.raw} <= uploaded
    # tampering with the stored samples is detected
    stored.write_bytes(stored.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(Exception, match="sha256"):
        Market(store).fewshot("mv2", 4)


BAD = {
    # case: (argument overrides (given the fixture folder d), error type, words in the message)
    "pickle weights file": (lambda d: {"--weights": str(d / "model.pth")}, "WeightsError",
                            ["pickle", "safetensors", "save_file(model.state_dict()"]),
    "zip (torch.save) weights file": (lambda d: {"--weights": str(d / "model.pt")}, "WeightsError",
                                      ["zip", "save_file(model.state_dict()"]),
    "weights of another architecture": (lambda d: {"--weights": str(d / "v3.safetensors")},
                                        "WeightsError", ["missing keys", "unexpected keys"]),
    "class count differs from the head": (lambda d: {"--classes": "airplane,cat"}, "ConfigError",
                                          ["2 classes", "3 outputs"]),
    "unknown class name": (lambda d: {"--classes": "airplane,cat,dgo"}, "UnknownNameError",
                           ["'dgo'", "dog", "truck"]),
    "unknown torchvision name": (lambda d: {"--arch": "torchvision:mobilenet_v9"}, "UnknownNameError",
                                 ["mobilenet_v9", "mobilenet_v2"]),
    "unknown timm name": (lambda d: {"--arch": "timm:no_such_net"}, "UnknownNameError",
                          ["no_such_net", "valid timm"]),
    "unknown source": (lambda d: {"--arch": "keras:resnet"}, "UnknownNameError", ["torchvision", "timm"]),
    "id already exists": (lambda d: {}, "ModelExistsError", ["mv2", "--replace"]),
    "NaN weights": (lambda d: {"--weights": str(d / "nan.safetensors")}, "WeightsError", ["NaN"]),
    # a distilled DeiT averages two Linear heads (squeezenet's 1x1 conv head is taken since #27)
    "no single final Linear": (lambda d: {"--arch": "timm:deit_tiny_distilled_patch16_224",
                                          "--input-size": "224"}, "ConfigError", ["final nn.Linear"]),
    "input size the model cannot run": (
        lambda d: {"--arch": "snp:vgg11?width=0.125", "--weights": str(d / "vgg.safetensors"),
                   "--input-size": "8"}, "ConfigError", ["cannot run", "8x8"]),
    "few-shot file with the wrong schema": (lambda d: {"--fewshot": str(d / "schema.parquet")},
                                            "SchemaError", ["image", "label"]),
    "few-shot file with fewer than k rows of a class": (
        lambda d: {"--fewshot": str(d / "short.parquet")}, "DataError", ["fewer than k=5", "cat"]),
    "few-shot file with another class": (lambda d: {"--fewshot": str(d / "stray.parquet")},
                                         "DataError", ["frog"]),
    "a text dataset": (lambda d: {"--dataset": "trec", "--classes": "ABBR,DESC,ENTY"}, "ConfigError",
                       ["image datasets", "trec is text"]),
    # issue 26 §5: an architecture is sized before it is built
    "an option that grows an outside model": (
        lambda d: {"--arch": "timm:vit_tiny_patch16_224?embed_dim=65536&depth=200"}, "ConfigError",
        ["['depth', 'embed_dim']", "not taken"]),
    "a zoo model past the parameter cap": (
        lambda d: {"--arch": "snp:vgg11?width=8"}, "ConfigError", ["parameters, more than"]),
    "an outside model past the parameter cap": (
        lambda d: {"--arch": "torchvision:vit_h_14"}, "ConfigError", ["630,", "parameters, more than"]),
}


def test_an_added_models_files_are_capped_before_they_are_read(files, store_copy, monkeypatch):
    """Weights and few-shot files are refused by their size on disk, their rows and their
    uncompressed size from the Parquet footer, before anything is decompressed or decoded."""
    from snp_ray.errors import DataError, PayloadTooLarge
    from snp_ray.market.add import AddLimits

    d, _, _ = files
    _upload(d / "ok.parquet", {0: 6, 3: 6, 5: 6})
    decoded = []
    monkeypatch.setattr("snp_ray.data.tables.decode_images",
                        lambda blobs, what: decoded.append(len(blobs)))
    before = snapshot(store_copy)
    market = Market(store_copy)
    add = lambda **kw: market.add_model(ARCH, d / "mv2.safetensors", CLASSES.split(","),  # noqa: E731
                                        "cifar10", k=5, model_id="capped", **kw)
    size = (d / "mv2.safetensors").stat().st_size
    with pytest.raises(PayloadTooLarge, match=f"{size:,} bytes, more than the {size - 1:,}"):
        add(limits=AddLimits(max_weights_bytes=size - 1))
    with pytest.raises(PayloadTooLarge, match="few-shot file is"):
        add(fewshot=d / "ok.parquet", limits=AddLimits(max_fewshot_bytes=1024))
    with pytest.raises(DataError, match="18 rows, more than the 17"):
        add(fewshot=d / "ok.parquet", limits=AddLimits(max_fewshot_rows=17))
    with pytest.raises(DataError, match="decompresses to .* more than the 1,000 allowed"):
        add(fewshot=(d / "ok.parquet").read_bytes(), limits=AddLimits(max_fewshot_decoded_bytes=1000))
    assert decoded == [] and snapshot(store_copy) == before

    # a value repeated over many rows: a dictionary-encoded file states it once in its footer
    # (772 bytes on disk, 0.5 MB in the footer, 1 GB as rows); it is held and decoded once
    import io
    monkeypatch.undo()
    t = pa.table({"image": pa.array([b"\0" * (500 << 10)] * 2000, pa.binary()),
                  "label": pa.array([0] * 2000, pa.int64())})
    buf = io.BytesIO()
    pq.write_table(t, buf, use_dictionary=True, compression="zstd")
    with pytest.raises(DataError, match="row 0 does not decode as an image"):
        add(fewshot=buf.getvalue(), limits=AddLimits(max_fewshot_decoded_bytes=1 << 20,
                                                     max_fewshot_rows=2000))
    from snp_ray.data.tables import split_from_bytes
    seen = []
    monkeypatch.setattr("snp_ray.data.tables.decode_images",
                        lambda blobs, what, rows=None: seen.append((len(blobs), rows)) or
                        np.zeros((len(blobs), 32, 32, 3), np.uint8))
    split = split_from_bytes(buf.getvalue(), "cifar10", "upload", ["c"] * 10, "f")
    assert seen == [(1, [0])] and split.images.shape == (2000, 32, 32, 3)
    assert snapshot(store_copy) == before


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_typed_error_and_leaves_the_store_unchanged(case, files, store_copy):
    d, _, _ = files
    if not (d / "schema.parquet").exists():
        t = pa.table({"img": pa.array([b"x"], pa.binary()), "label": pa.array([0], pa.int16())})
        pq.write_table(t, d / "schema.parquet")
        _upload(d / "short.parquet", {0: 5, 3: 4, 5: 5})
        _upload(d / "stray.parquet", {0: 5, 3: 5, 5: 5, 6: 1})
    over, err_type, words = BAD[case]
    opts = over(d)
    if case != "id already exists":
        opts = {"--id": "new"} | opts
    before = snapshot(store_copy)
    rc, err = snp(*add_args(store_copy, d / "mv2.safetensors", **opts))
    assert rc == 2 and err["type"] == err_type, err
    for w in words:
        assert w in err["error"], (w, err["error"])
    assert snapshot(store_copy) == before


def test_library_entry_point_and_replace(files, tmp_path):
    d, _, model = files
    market = Market(tmp_path / "m")
    weights = (d / "mv2.safetensors").read_bytes()
    added = market.add_model(ARCH, weights, ["airplane", "3", "dog"], "cifar10", k=5, model_id="a")
    assert added.spec.classes == [0, 3, 5] and added.spec.class_names == ["airplane", "cat", "dog"]
    with pytest.raises(ModelExistsError):
        market.add_model(ARCH, weights, ["airplane", "cat", "dog"], "cifar10", k=5, model_id="a")
    assert market.model("a")[1].weights_sha256 == added.spec.weights_sha256


def test_a_failed_replace_keeps_the_old_model(files, store_copy, monkeypatch):
    """--replace stages the new model and renames it in: a failure before or during the swap
    leaves the old model byte-identical (and no staging or trash folders behind)."""
    from snp_ray.errors import StoreError
    from snp_ray.market.modelstore import ModelStore

    d, _, model = files
    before = snapshot(store_copy)

    def broken(self, model_id, manifest):
        raise StoreError("disk full (simulated)")

    with monkeypatch.context() as m:
        m.setattr(ModelStore, "save_manifest", broken)
        rc, err = snp(*add_args(store_copy, d / "mv2.safetensors",
                                **{"--replace": "", "--classes": "cat,dog,frog"}))
    assert rc == 2 and err["type"] == "StoreError" and "simulated" in err["error"]
    assert snapshot(store_copy) == before
    # the swap itself fails (the staged folder vanished): the old model is put back
    with pytest.raises(StoreError, match="cannot install model mv2"):
        ModelStore(store_copy).install(store_copy / ".staging" / "gone", "mv2")
    assert snapshot(store_copy) == before
    # and a replace that works swaps the whole folder
    rc, out = snp(*add_args(store_copy, d / "mv2.safetensors",
                            **{"--replace": "", "--classes": "cat,dog,frog"}))
    assert rc == 0 and Market(store_copy).spec("mv2").class_names == ["cat", "dog", "frog"]
    assert sorted(p.name for p in store_copy.iterdir() if p.name.startswith(".")) == []


def test_models_of_different_input_sizes_share_one_pack(files, store_copy):
    """A 64x64 model and a 32x32 model in one pack: each fragment encodes raw images at its own
    model's input size, and the saved pack reloads and predicts the same."""
    from snp_ray.packing import preset_pack_config
    from snp_ray.packing.model import PackedModel
    from snp_ray.packing.request import pack_request

    d, _, _ = files
    rc, out = snp(*add_args(store_copy, d / "mv2.safetensors",
                            **{"--id": "big", "--classes": "frog,horse,ship", "--input-size": "64"}))
    assert rc == 0 and out["model"]["input"]["size"] == [64, 64]
    market = Market(store_copy)
    cfg = slice_preset("smoke")
    assert len(list(slice_missing(market, 5, cfg, model_ids=["mv2"], class_id=3))) == 1
    assert len(list(slice_missing(market, 5, cfg, model_ids=["big"], class_id=6))) == 1
    packed = pack_request(market, ["cat", "frog"], 5, cfg, preset_pack_config("smoke"), 0)
    sizes = {f.spec.class_name: f.spec.input["size"] for f in packed.fragments}
    assert sizes == {"cat": [32, 32], "frog": [64, 64]}
    raw = np.random.default_rng(1).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    assert {tuple(f.encode(raw).shape) for f in packed.fragments} == {(7, 3, 32, 32), (7, 3, 64, 64)}
    packed.save(store_copy.parent / "pack")
    again = PackedModel.load(store_copy.parent / "pack")
    assert list(again.predict(raw)) == list(packed.predict(raw))


def test_pickles_are_refused_without_being_opened_and_added_models_load_without_pickle(
        files, store_copy, monkeypatch):
    d, _, model = files

    def refuse(*a, **k):
        raise AssertionError("pickle was used")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for weights in ("model.pth", "model.pt"):
        with pytest.raises(WeightsError, match="only safetensors is accepted"):
            Market(store_copy).add_model(ARCH, d / weights, CLASSES.split(","), "cifar10", k=5,
                                         model_id="p")
    clf, _ = Market(store_copy).model("mv2")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), model(x))


def test_architecture_references_parse_and_refuse_downloads():
    from snp_ray.errors import ConfigError
    from snp_ray.models.refs import parse_ref

    ref = parse_ref("torchvision:mobilenet_v2?width_mult=0.5&dropout=0.1")
    assert (ref.source, ref.name, ref.kwargs) == ("torchvision", "mobilenet_v2",
                                                  {"width_mult": 0.5, "dropout": 0.1})
    assert parse_ref("timm:resnet18d?drop_rate=0&global_pool=avg").kwargs == {
        "drop_rate": 0, "global_pool": "avg"}
    assert parse_ref("vgg11") == parse_ref("snp:vgg11")
    assert parse_ref("snp:vgg11?width=0.25").kwargs == {"width": 0.25}
    for bad in ("torchvision:resnet18?weights=IMAGENET1K_V1", "timm:resnet18?pretrained=true",
                "torchvision:resnet18?num_classes=5", "snp:vgg11?depth=3", "torchvision:"):
        with pytest.raises(ConfigError):
            parse_ref(bad)


def test_the_distributed_slice_job_takes_an_added_model(ray_cluster, store_copy):
    from snp_ray.engine.job import SliceJobConfig, run_slice_job

    result = run_slice_job(SliceJobConfig(market=str(store_copy), k=5, preset="smoke", actors=1))
    assert (result.total, result.done, result.failed) == (3, 3, 0), result.failures
    store = FragmentStore(store_copy / "fragments")
    assert {r["class_id"] for r in store.rows().values()} == {0, 3, 5}
    for key in store.keys():
        frag = store.get(key)
        assert frag.spec.arch == ARCH and frag.spec.params < frag.spec.source_params


# ---------------------------------------------------------------- issue 26 §1: model identity
def _fake_pack(root: Path, pid: str, keys: list[str], model: str) -> Path:
    """A pack folder as the pack store lists it (only its meta matters to retirement)."""
    folder = root / "packs" / pid
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps(
        {"fragments": [{"key": k, "model": model} for k in keys]}))
    return folder


def test_replacing_a_model_with_reordered_classes_serves_the_new_mapping(files, store_copy):
    """Same weights, corrected --classes: the fragment cut for the old output of "cat" is retired
    with the pack built on it, and "cat" is sliced again from its new output. (Before model
    identities the old key stayed: `snp slice --class cat` answered no fragments and "cat" was
    served by the fragment of another output.)"""
    from snp_ray.serve.catalogue import Catalogue

    d, _, _ = files
    cfg = slice_preset("smoke")
    market = Market(store_copy)
    [(_, _, old_key, old)] = list(slice_missing(market, 5, cfg, model_ids=["mv2"], class_id=3))
    assert snp(*add_args(store_copy, d / "mv2.safetensors", **{"--id": "twin"}))[0] == 0
    twin = Market(store_copy).spec("twin")
    other = _fake_pack(store_copy, "a" * 24, [f"{twin.identity[:16]}-c3-x"], "twin")
    gone = _fake_pack(store_copy, "d" * 24, [f"{twin.identity[:16]}-c3-x"], "not-in-the-market")
    stale = _fake_pack(store_copy, "b" * 24, [old_key], "mv2")
    blobs_before = set((store_copy / "fragments" / "blobs").iterdir())

    rc, out = snp(*add_args(store_copy, d / "mv2.safetensors", **{"--classes": "cat,airplane,dog",
                                                                  "--replace": ""}))
    assert rc == 0 and out["retired"] == {"fragments": 1, "blobs": 1, "packs": ["b" * 24, "d" * 24]}
    store = FragmentStore(store_copy / "fragments")
    assert store.keys() == set() and not stale.exists() and not gone.exists() and other.exists()
    assert not blobs_before & set((store_copy / "fragments" / "blobs").iterdir())

    market = Market(store_copy)
    spec = market.spec("mv2")
    assert spec.classes == [3, 0, 5] and spec.weights_sha256 == old.spec.source_sha256
    rc, out = snp("slice", "--store", str(store_copy), "--model", "mv2", "--class", "cat",
                  "--k", "5", "--preset", "smoke")
    assert rc == 0 and len(out["fragments"]) == 1
    [new_key] = FragmentStore(store_copy / "fragments").keys()
    assert new_key != old_key and new_key.startswith(spec.identity[:16])
    cat = Catalogue.load(market, FragmentStore(store_copy / "fragments"), cfg.digest(), 0).classes[3]
    assert [h.key for h in cat.holders] == [new_key]
    new = FragmentStore(store_copy / "fragments").get(new_key)
    assert new.spec.source_identity == spec.identity and new.spec.class_name == "cat"
    assert new.spec.kept != old.spec.kept        # cut for output 0 now, not output 1


def test_identity_covers_what_decides_a_fragment(files, store_copy):
    """Two ids with the same weights, or the same model with another input spec or few-shot
    seed, are different models with different keys."""
    from snp_ray.slicing.api import pair_key

    d, _, _ = files
    assert snp(*add_args(store_copy, d / "mv2.safetensors", **{"--id": "twin"}))[0] == 0
    market = Market(store_copy)
    a, b = market.spec("mv2"), market.spec("twin")
    assert a.weights_sha256 == b.weights_sha256 and a.identity != b.identity
    cfg = slice_preset("smoke")
    assert pair_key(a, 3, cfg, 5, 0) != pair_key(b, 3, cfg, 5, 0)
    for over in ({"--mean": "0.5,0.5,0.5"}, {"--seed": "7"}, {"--input-size": "40"}):
        assert snp(*add_args(store_copy, d / "mv2.safetensors", **over, **{"--replace": ""}))[0] == 0
        changed = Market(store_copy).spec("mv2")
        assert changed.identity != a.identity, over
        assert pair_key(changed, 3, cfg, 5, 0) != pair_key(a, 3, cfg, 5, 0)


def test_a_market_holds_one_dataset(files, store_copy):
    """CIFAR-100 "apple" and CIFAR-10 "airplane" are both class 0: a market of CIFAR-10 models
    refuses a CIFAR-100 one with a typed error, before anything is written."""
    from snp_ray.errors import DatasetMismatchError

    d, _, _ = files
    before = snapshot(store_copy)
    with pytest.raises(DatasetMismatchError, match="one dataset"):
        Market(store_copy).add_model(ARCH, d / "mv2.safetensors", ["apple", "bed", "cup"],
                                     "cifar100", k=5, model_id="c100")
    rc, out = snp(*add_args(store_copy, d / "mv2.safetensors", **{"--dataset": "cifar100",
                                                                  "--id": "c100"}))
    assert rc == 2 and out["type"] == "DatasetMismatchError"
    assert snapshot(store_copy) == before


def test_force_replaces_a_stored_fragment_and_remove_retires_everything(files, store_copy):
    cfg = slice_preset("smoke")
    market = Market(store_copy)
    [(_, _, key, _)] = list(slice_missing(market, 5, cfg, model_ids=["mv2"], class_id=5))
    store = FragmentStore(store_copy / "fragments")
    first = store.lookup(key)["created"]
    [(_, _, again, frag)] = list(slice_missing(market, 5, cfg, model_ids=["mv2"], class_id=5,
                                               force=True, store=store))
    assert again == key and frag is not None
    store = FragmentStore(store_copy / "fragments")
    assert store.keys() == {key} and store.lookup(key)["created"] > first   # the new one
    _fake_pack(store_copy, "c" * 24, [key], "mv2")

    rc, out = snp("market", "remove", "--store", str(store_copy), "--id", "mv2")
    assert rc == 0 and out["retired"] == {"fragments": 1, "blobs": 1, "packs": ["c" * 24]}
    assert FragmentStore(store_copy / "fragments").keys() == set()
    assert not list((store_copy / "fragments" / "blobs").iterdir())
    assert not (store_copy / "packs" / ("c" * 24)).exists()


def test_rows_from_before_identities_belong_by_weights_and_are_migrated(files, store_copy):
    """The documented rule for old stores: a manifest row without a model identity belongs to
    the model of its id and weights (as before); replacing or removing that model retires it.
    Old manifest parts, without the identity column, still read; a slice run migrates their rows
    to identity keys (same blob), so every reader that derives a key from the model finds them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from snp_ray.serve.lifecycle import retire_stale
    from snp_ray.slicing.fragment import FragmentSpec
    from snp_ray.store import SCHEMA, belongs_to

    market = Market(store_copy)
    spec = market.spec("mv2")
    row = {"model_id": "mv2", "model_sha256": spec.weights_sha256, "model_identity": None}
    assert belongs_to(row, spec) and not belongs_to(row, spec, legacy=False)
    assert not belongs_to({**row, "model_sha256": "0" * 64}, spec)
    assert not belongs_to({**row, "model_identity": "f" * 64}, spec)
    assert belongs_to({**row, "model_identity": spec.identity}, spec, legacy=False)
    assert not belongs_to(row, None) and not belongs_to({**row, "model_id": "x"}, spec)

    # an old store's row: a legacy key, no identity column, a spec without source_identity
    cfg = slice_preset("smoke")
    [(_, _, key, frag)] = list(slice_missing(market, 5, cfg, model_ids=["mv2"], class_id=3))
    store = FragmentStore(store_copy / "fragments")
    current = store.lookup(key)
    old_spec = FragmentSpec.from_json(current["spec"]).replace(source_identity="")
    legacy_key = old_spec.key
    assert legacy_key != key and legacy_key.startswith(spec.weights_sha256[:16])
    old_schema = pa.schema([f for f in SCHEMA if f.name != "model_identity"])
    old_row = {n: current[n] for n in old_schema.names} | {"key": legacy_key,
                                                           "spec": old_spec.to_json()}
    old_row["spec_sha256"] = sha256_bytes(old_row["spec"].encode())
    pq.write_table(pa.Table.from_pylist([old_row], schema=old_schema),
                   store_copy / "fragments" / "manifest" / "class_id=3" / "part-0-old.parquet")
    store.retire([key])                                   # the blob stays: the old row names it
    store = FragmentStore(store_copy / "fragments")
    assert store.keys() == {legacy_key} and store.rows()[legacy_key]["model_identity"] is None
    assert retire_stale(Market(store_copy)).fragments == []          # it belongs

    assert store.adopt_identities({"mv2": spec}) == 1
    store = FragmentStore(store_copy / "fragments")
    assert store.keys() == {key} and store.rows()[key]["model_identity"] == spec.identity
    moved = store.get(key)
    assert moved.spec.source_identity == spec.identity and moved.spec.kept == frag.spec.kept
    assert store.adopt_identities({"mv2": spec}) == 0


def test_an_added_models_samples_are_drawn_with_its_own_seed_and_reads_write_nothing(
        files, store_copy):
    """`snp market add --seed 7` measured its few-shot accuracy on the rows seed 7 draws; slicing
    (seed 0) uses the same rows. Reading a manifest that was never stored writes nothing."""
    d, _, _ = files
    rc, _ = snp(*add_args(store_copy, d / "mv2.safetensors", **{"--seed": "7", "--replace": ""}))
    assert rc == 0
    market = Market(store_copy)
    stored = sorted((market.store.model_dir("mv2") / "fewshot").iterdir())
    before = snapshot(store_copy)
    assert market.manifest("mv2", 5, seed=0) == market.manifest("mv2", 5, seed=3)
    assert [f"k5-s{market.manifest('mv2', 5).seed}.json"] == [p.name for p in stored]
    k3 = market.manifest("mv2", 3)
    assert set(k3.row_ids[0]) <= set(market.manifest("mv2", 5).row_ids[0]) or k3.k == 3
    assert snapshot(store_copy) == before                 # nothing written on the read path
    market.keep_manifest("mv2", 3)
    assert (market.store.model_dir("mv2") / "fewshot" / f"k3-s{k3.seed}.json").is_file()
