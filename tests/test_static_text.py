"""Static-table text models (#28 section 3): the word-embedding table is stored once (safetensors
+ JSON, named by sha256), frozen, not counted, not sliced, and not copied into fragments. A tiny
random table stands in for word2vec, saved through the same artefact format, so the test needs no
gensim (an optional extra)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from snp_ray.data import embeddings
from snp_ray.data.fewshot import FewShotManifest, FewShotSet
from snp_ray.data.specs import InputSpec, TextSpec
from snp_ray.errors import ConfigError, IntegrityError
from snp_ray.models import build_model, count_params
from snp_ray.models.static import StaticEmbedding
from snp_ray.slicing import Fragment, FragmentSpec, SliceConfig, Slicer, slice_preset

WORDS = list("abcdefghij")
VOCAB = ["<pad>", "<unk>"] + WORDS
DIM = 300


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("market") / embeddings.FOLDER
    vectors = torch.randn(len(VOCAB), DIM, generator=torch.Generator().manual_seed(0))
    vectors[:2] = 0
    sha = embeddings.save_table(folder, VOCAB, vectors, {"dataset": "synthetic"})
    assert embeddings.forget_table(sha)     # read back from the files, not the writer's cache
    embeddings.add_table_dir(folder)
    return folder, sha


def test_table_artefact_is_named_by_its_sha256_and_checked(table, tmp_path):
    folder, sha = table
    info = embeddings.table_info(folder, sha)
    blob = (folder / f"{sha}.safetensors").read_bytes()
    assert info["sha256"] == sha == embeddings.sha256_bytes(blob) and info["vocab"] == VOCAB
    assert not list(folder.glob("*.pkl")) and not list(folder.glob("*.pt"))
    vectors, vocab = embeddings.load_table(sha)
    assert vectors.shape == (len(VOCAB), DIM) and vocab == VOCAB and not vectors.requires_grad
    assert embeddings.find_table(folder, dataset="synthetic") == sha
    assert embeddings.find_table(folder, dataset="other") is None
    (tmp_path / f"{sha}.safetensors").write_bytes(blob[:-4] + b"\0\0\0\0")   # tampered copy
    (tmp_path / f"{sha}.json").write_bytes((folder / f"{sha}.json").read_bytes())
    with pytest.raises(IntegrityError, match="sha256"):
        embeddings.tensors_from_bytes((tmp_path / f"{sha}.safetensors").read_bytes(), sha, "t")
    with pytest.raises(ConfigError, match="sha256"):
        TextSpec(vocab=VOCAB, table="not-a-sha")
    # a spec without a table is written as it was before tables existed (model identities)
    assert "table" not in TextSpec(vocab=VOCAB).to_dict()
    assert InputSpec.from_any(TextSpec(vocab=VOCAB, table=sha).to_dict()).table == sha


@pytest.mark.parametrize("arch, before_head", [("textcnn_static", 100 * DIM * 12 + 300),
                                              ("gru_static", 3 * 72 * (DIM + 72 + 2))])
def test_the_table_is_not_counted_and_stays_frozen(table, arch, before_head):
    _, sha = table
    model = build_model(arch, 3, 1.0, len(VOCAB), sha)
    emb = model.features.embedding
    assert isinstance(emb, StaticEmbedding)        # one copy per process, shared by every model
    assert emb.weight.data_ptr() == embeddings.table_vectors(sha).data_ptr()
    assert count_params(model.features) == before_head          # 360,300 and 80,784
    assert not any(k.endswith("embedding.weight") for k in model.state_dict())
    assert all(p.data_ptr() != emb.weight.data_ptr() for p in model.parameters())
    before = emb.weight.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    tokens = torch.tensor([[2, 3, 4, 5, 6, 0], [7, 8, 9, 1, 0, 0]])
    torch.nn.functional.cross_entropy(model.train()(tokens), torch.tensor([0, 2])).backward()
    opt.step()
    assert emb.weight.grad is None and not emb.weight.requires_grad
    assert torch.equal(emb.weight, before)
    with pytest.raises(ConfigError, match="static embedding table"):
        build_model(arch, 3, 1.0, len(VOCAB))
    with pytest.raises(ConfigError, match="rows"):
        build_model(arch, 3, 1.0, len(VOCAB) + 1, sha)


def test_a_static_model_slices_with_exact_fusion_and_its_fragment_holds_no_table(table):
    _, sha = table
    torch.manual_seed(0)
    model = build_model("textcnn_static", 3, 0.25, len(VOCAB), sha).eval()
    spec = TextSpec(vocab=VOCAB, max_len=10, table=sha)
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 4)
    raw = [" ".join(rng.choice(WORDS, 8)) for _ in labels]
    fs = FewShotSet(FewShotManifest(dataset="synthetic", k=4, seed=0, classes=[0, 1, 2],
                                    row_ids=[list(range(i * 4, i * 4 + 4)) for i in range(3)]),
                    raw, labels)
    slicer = Slicer(model, spec, fs, slice_preset("quick", mode="rate", beta=0.5, pool_epochs=2,
                                                  adapt_epochs=2, combine_epochs=2))
    # the lookup is an untraced input: no group of 300 embedding columns, only the filters
    assert sorted(g.size for g in slicer.graph.groups) == [25, 25, 25]
    out = slicer.slice_class(1)
    x = spec.encode(raw)
    fused, unfused = out.features(x), slicer.repaired_features(x)
    assert float((fused - unfused).norm() / unfused.norm()) <= 1e-5
    assert out.features.embedding.weight.shape == (len(VOCAB), DIM)      # not cut
    fspec = FragmentSpec(
        source_model="m", source_sha256="ab" * 32, arch="textcnn_static", width=0.25,
        source_classes=3, class_id=1, class_name="b", kept={str(g): v for g, v in out.kept.items()},
        group_names={str(g): n for g, n in out.group_names.items()},
        group_sizes={str(g.id): g.size for g in slicer.graph.groups},
        feature_dim=int(out.features(x[:1]).shape[1]), params=count_params(out.features),
        source_params=count_params(model.features), flops=1, source_flops=2,
        input=spec.to_dict(), config=SliceConfig().to_dict(), config_digest="x", k=4,
        fewshot_seed=0, seconds=1.0)
    spec_json, weights = Fragment(fspec, out.features, out.probe).to_blobs()
    names = embeddings.tensors_from_bytes(weights, None, "fragment")
    assert not any("embedding" in k for k in names)
    assert len(weights) < 4 * (fspec.params + 3 * 64) + 4096        # the kept filters and probe
    back = Fragment.from_blobs(spec_json, weights)
    assert back.features.embedding.weight.data_ptr() == embeddings.table_vectors(sha).data_ptr()
    assert torch.equal(back.features(x), out.features(x))
