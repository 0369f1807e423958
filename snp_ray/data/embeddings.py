"""Static word-embedding tables: one per task, trained once with word2vec, shared and frozen.

The paper's text models (Kim 2014's CNN on SST-5, an RNN on TREC) read *static* 300-d word
vectors: the table is an input to the models, never trained with them and never counted in their
parameters. Here each task's table is trained once by word2vec (gensim, an optional extra:
``pip install -e '.[text]'``) on the task's **train split only**, with a fixed seed and one worker
thread (deterministic), and stored as a market artefact:

    <market>/embeddings/<sha256>.safetensors   {"vectors": float32 (rows, dim)}, row i = vocab[i]
    <market>/embeddings/<sha256>.json          vocab, dim, dataset, recipe, the blob's sha256

The sha256 of the safetensors blob is the table's name: a model's :class:`TextSpec` carries it
(``table``), every fragment inherits it through its input spec, and neither stores the vectors
(they are a non-persistent buffer of :class:`snp_ray.models.static.StaticEmbedding`). Building a
model on a table looks the sha256 up in this process's cache, then in the folders registered with
:func:`add_table_dir` (every :class:`ModelStore` registers its market's ``embeddings/``) and in
``$SNP_EMBEDDINGS`` (folders separated by ``os.pathsep``); the blob is checked against its name
before it is parsed. Rows 0 and 1 (``<pad>``, ``<unk>``) are zero vectors.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snp_ray.artifacts import (atomic_write_bytes, atomic_write_json, read_bytes, read_json,
                               sha256_bytes, tensors_from_bytes, tensors_to_bytes)
from snp_ray.config import Config, check_range
from snp_ray.data.text import PAD, UNK, tokenize
from snp_ray.errors import ArtifactNotFoundError, ConfigError, IntegrityError

#: the folder of a market that holds its tables
FOLDER = "embeddings"
ENV = "SNP_EMBEDDINGS"
_SHA = frozenset("0123456789abcdef")


@dataclass
class Word2VecConfig(Config):
    """The word2vec recipe, fixed before any run (never tuned on test data): 300-d vectors as
    Kim (2014) used; skip-gram (better than CBOW on rare words, and a task's train split is a
    small corpus: TREC 5,452 questions, SST-5 8,544 sentences); every train token gets a vector
    (``min_count=1``); 20 passes (gensim's default 5 is meant for corpora of millions of words);
    window 5, 5 negative samples and 1e-3 down-sampling are gensim's defaults."""

    dim: int = 300
    sg: int = 1
    window: int = 5
    min_count: int = 1
    negative: int = 5
    sample: float = 1e-3
    epochs: int = 20
    seed: int = 0

    def validate(self) -> None:
        check_range("Word2VecConfig", "dim", self.dim, 1, 4096)
        check_range("Word2VecConfig", "epochs", self.epochs, 1, 1000)
        check_range("Word2VecConfig", "window", self.window, 1, 100)
        check_range("Word2VecConfig", "min_count", self.min_count, 1, 1_000_000)
        if self.sg not in (0, 1):
            raise ConfigError(f"Word2VecConfig.sg must be 0 (CBOW) or 1 (skip-gram), got {self.sg}")


W2V = Word2VecConfig()


# ------------------------------------------------------------------ training and files
def train_word2vec(texts: list[str], cfg: Word2VecConfig = W2V) -> tuple[list[str], torch.Tensor]:
    """(vocab, vectors) for ``texts``: ``[<pad>, <unk>]`` (zero rows), then every token seen at
    least ``min_count`` times, most frequent first (ties alphabetical). One worker thread and a
    fixed seed: the same texts give the same bytes."""
    try:
        from gensim.models import Word2Vec
    except ImportError:
        raise ConfigError("training a static embedding table needs gensim: "
                          "pip install -c constraints.txt -e '.[text]'") from None
    sentences = [tokenize(t) for t in texts]
    model = Word2Vec(sentences=sentences, vector_size=cfg.dim, sg=cfg.sg, window=cfg.window,
                     min_count=cfg.min_count, negative=cfg.negative, sample=cfg.sample,
                     epochs=cfg.epochs, seed=cfg.seed, workers=1)
    counts = {w: model.wv.get_vecattr(w, "count") for w in model.wv.index_to_key}
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vectors = np.zeros((len(words) + 2, cfg.dim), dtype=np.float32)
    if words:
        vectors[2:] = model.wv[words]
    return [PAD, UNK] + words, torch.from_numpy(vectors)


def save_table(folder: str | os.PathLike, vocab: list[str], vectors: torch.Tensor,
               meta: dict[str, Any] | None = None) -> str:
    """Write a table (atomic; the JSON last, so a table is visible only once whole); returns its
    sha256. A table already stored under that sha256 is left as it is."""
    vectors = vectors.detach().float().contiguous().cpu()
    if vectors.dim() != 2 or vectors.shape[0] != len(vocab) or vocab[:2] != [PAD, UNK]:
        raise ConfigError(f"a table needs one row per token of a vocabulary starting "
                          f"{[PAD, UNK]}; got {tuple(vectors.shape)} for {len(vocab)} tokens")
    blob = tensors_to_bytes({"vectors": vectors})
    sha = sha256_bytes(blob)
    folder = Path(folder)
    if not (folder / f"{sha}.json").is_file():
        atomic_write_bytes(folder / f"{sha}.safetensors", blob)
        atomic_write_json(folder / f"{sha}.json", {
            "sha256": sha, "rows": int(vectors.shape[0]), "dim": int(vectors.shape[1]),
            "bytes": len(blob), "vocab": list(vocab), "meta": dict(meta or {})})
    _remember(sha, vectors, list(vocab))
    return sha


def table_info(folder: str | os.PathLike, sha: str) -> dict[str, Any]:
    """The JSON of table ``sha`` in ``folder``."""
    return read_json(Path(folder) / f"{_check_sha(sha)}.json", f"embedding table {sha[:12]}")


def find_table(folder: str | os.PathLike, **meta: Any) -> str | None:
    """The sha256 of a table in ``folder`` whose ``meta`` holds every ``meta`` item, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.json")):
        info = read_json(path, "embedding table spec")
        if all(info.get("meta", {}).get(k) == v for k, v in meta.items()) and \
                (folder / f"{info.get('sha256')}.safetensors").is_file():
            return str(info["sha256"])
    return None


def dataset_table(dataset: str, root: str | os.PathLike, cfg: Word2VecConfig = W2V) -> str:
    """The sha256 of ``dataset``'s table in the market at ``root``, trained now on its train
    split (all of it: the market's text corpus, no test row) when the market has none."""
    from snp_ray.data.tables import read_split

    meta = {"dataset": dataset, "split": "train", "recipe": cfg.to_dict(),
            "recipe_digest": cfg.digest(), "tokenizer": "snp_ray.data.text.tokenize"}
    folder = Path(root) / FOLDER
    found = find_table(folder, dataset=dataset, split="train", recipe_digest=cfg.digest())
    if found:
        return found
    import gensim

    split = read_split(dataset, "train")
    vocab, vectors = train_word2vec(list(split.texts or []), cfg)
    meta.update(gensim=gensim.__version__, texts=len(split))
    return save_table(folder, vocab, vectors, meta)


# ------------------------------------------------------------------ lookup by sha256
_LOCK = threading.Lock()
_CACHE: dict[str, tuple[torch.Tensor, list[str]]] = {}
_DIRS: list[Path] = []


def _check_sha(sha: str) -> str:
    if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= _SHA):
        raise ConfigError(f"an embedding table is named by its sha256 (64 hex digits), got {sha!r}")
    return sha


def _remember(sha: str, vectors: torch.Tensor, vocab: list[str]) -> None:
    vectors.requires_grad_(False)
    with _LOCK:
        _CACHE.setdefault(sha, (vectors, vocab))


def add_table_dir(folder: str | os.PathLike) -> None:
    """Look for tables in ``folder`` too (nothing is read until a table is asked for)."""
    path = Path(folder)
    with _LOCK:
        if path not in _DIRS:
            _DIRS.append(path)


def register_table(blob: bytes, vocab: list[str]) -> str:
    """Make a table known to this process from its safetensors bytes (a worker that got them
    from the driver); returns its sha256."""
    sha = sha256_bytes(blob)
    vectors = tensors_from_bytes(blob, sha, f"embedding table {sha[:12]}")["vectors"]
    _check_rows(sha, vectors, vocab)
    _remember(sha, vectors, list(vocab))
    return sha


def table_blob(sha: str) -> tuple[bytes, list[str]]:
    """(safetensors bytes, vocab) of a stored table, to ship to a worker."""
    folder = _folder_of(sha)
    return (read_bytes(folder / f"{sha}.safetensors", "embedding table"),
            list(table_info(folder, sha)["vocab"]))


def _folder_of(sha: str) -> Path:
    _check_sha(sha)
    env = [Path(p) for p in os.environ.get(ENV, "").split(os.pathsep) if p]
    with _LOCK:
        dirs = list(_DIRS)
    for folder in dirs + env:
        if (folder / f"{sha}.json").is_file() and (folder / f"{sha}.safetensors").is_file():
            return folder
    raise ArtifactNotFoundError(
        f"embedding table {sha[:12]}… is not in this process and not in any table folder "
        f"({[str(d) for d in dirs + env] or 'none registered'}); open the market that holds it "
        f"(its {FOLDER}/ folder) or name the folder in ${ENV}")


def _check_rows(sha: str, vectors: torch.Tensor, vocab: list[str]) -> None:
    if vectors.dim() != 2 or vectors.shape[0] != len(vocab) or list(vocab[:2]) != [PAD, UNK]:
        raise IntegrityError(f"embedding table {sha[:12]}: {tuple(vectors.shape)} vectors for "
                             f"{len(vocab)} tokens")


def load_table(sha: str) -> tuple[torch.Tensor, list[str]]:
    """(vectors, vocab) of table ``sha``: read once per process (sha256 checked), then shared by
    every model built on it. The vectors never require grad."""
    with _LOCK:
        hit = _CACHE.get(_check_sha(sha))
    if hit is not None:
        return hit
    folder = _folder_of(sha)
    blob = read_bytes(folder / f"{sha}.safetensors", "embedding table")
    vectors = tensors_from_bytes(blob, sha, f"embedding table {sha[:12]}")["vectors"]
    vocab = list(table_info(folder, sha)["vocab"])
    _check_rows(sha, vectors, vocab)
    _remember(sha, vectors, vocab)
    with _LOCK:
        return _CACHE[sha]


def forget_table(sha: str) -> bool:
    """Drop table ``sha`` from this process's cache (True: it was there), so the next
    :func:`load_table` reads and checks its files again; models built on it keep their vectors.
    Frees a table no model needs any more, or reads back what :func:`save_table` just wrote."""
    with _LOCK:
        return _CACHE.pop(_check_sha(sha), None) is not None


def table_vectors(sha: str) -> torch.Tensor:
    return load_table(sha)[0]


def table_vocab(sha: str) -> list[str]:
    return load_table(sha)[1]
