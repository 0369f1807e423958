"""Train a task's original models, one Ray task per model, into a model store.

Workers return weights as safetensors bytes and the driver writes them, so the same code works
when the workers run on other machines than the store. Models already in the store with the same
settings are skipped, so a rerun costs nothing.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snp_ray.artifacts import tensors_from_bytes, tensors_to_bytes
from snp_ray.config import Config, check_range
from snp_ray.errors import ConfigError, EngineError
from snp_ray.market.market import Market
from snp_ray.market.modelstore import ModelSpec, ModelStore
from snp_ray.market.tasks import get_task
from snp_ray.market.training import TrainConfig
from snp_ray.models import get_arch

log = logging.getLogger(__name__)


@dataclass
class MarketConfig(Config):
    task: str = "T1"
    arch: str = ""                 # empty: the task's default architecture
    width: float = 0.25
    train: TrainConfig = field(default_factory=TrainConfig)
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    fewshot_seed: int = 0

    def validate(self) -> None:
        task = get_task(self.task)
        self.arch = self.arch or task.default_arch
        arch = get_arch(self.arch)
        from snp_ray.data.catalog import get_dataset
        if arch.modality != get_dataset(task.dataset).modality:
            raise ConfigError(f"architecture {self.arch} ({arch.modality}) cannot learn task "
                              f"{self.task} ({task.dataset})")
        check_range("MarketConfig", "width", self.width, 0.0, 8.0, lo_open=True)
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"MarketConfig.ks must hold positive k values, got {self.ks}")


def model_id(task: str, index: int, arch: str, width: float) -> str:
    return f"{task}-m{index}-{arch}-w{width:g}"


def _train_one(cfg_dict: dict[str, Any], index: int,
               table: tuple[bytes, list[str]] | None = None) -> tuple[bytes, dict[str, Any]]:
    """Body of one Ray task: train model ``index`` of the task and evaluate it once.
    ``table``: the static embedding table (safetensors bytes, vocab) a static-table text model
    reads, shipped by the driver so that a worker on another machine needs no shared folder."""
    from snp_ray.data.tables import read_split
    from snp_ray.data.testsplit import test_accuracy
    from snp_ray.market.training import train_original
    from snp_ray.runtime import worker_logging

    worker_logging()           # the per-epoch progress lines reach the driver through Ray
    cfg = MarketConfig.from_dict(cfg_dict)
    task = get_task(cfg.task)
    classes = task.model_classes[index]
    split = read_split(task.dataset, "train")
    mid = model_id(cfg.task, index, cfg.arch, cfg.width)
    from snp_ray.market.tasks import model_rows

    rows = model_rows(task, index, split.labels)
    if rows is not None:        # a developer only ever had its own rows
        split = split.rows(rows)
    sha = ""
    if table is not None:
        from snp_ray.data.embeddings import register_table

        sha = register_table(*table)
    trained = train_original(split, classes, cfg.arch, cfg.width,
                             cfg.train.replace(seed=cfg.train.seed + index), label=mid, table=sha)
    metrics = dict(trained.metrics)
    metrics["test_accuracy"] = test_accuracy(trained.model, trained.input_spec, task.dataset, classes)
    spec = ModelSpec(id=mid, task=cfg.task, index=index,
                     arch=cfg.arch, width=cfg.width, dataset=task.dataset, classes=list(classes),
                     class_names=[split.class_names[c] for c in classes],
                     input=trained.input_spec.to_dict(), train=cfg.train.to_dict(), metrics=metrics)
    return tensors_to_bytes(trained.model.state_dict()), spec.to_dict()


def build_market(cfg: MarketConfig, root: str | Path, progress: bool = True) -> list[ModelSpec]:
    """Train the models of ``cfg.task`` that ``root`` lacks; return every model's spec."""
    from snp_ray.runtime import ensure_ray, worker_env

    store = ModelStore(root)
    task = get_task(cfg.task)
    ids = [model_id(cfg.task, i, cfg.arch, cfg.width) for i in range(task.num_models)]
    table = ""
    if get_arch(cfg.arch).static_table:    # the task's word2vec table: trained once, on train
        from snp_ray.data.embeddings import dataset_table

        table = dataset_table(task.dataset, root)
    todo = []
    for i, mid in enumerate(ids):
        if store.exists(mid) and same_recipe(store.spec(mid).train, cfg.train) and \
                store.spec(mid).input.get("table", "") == table:
            log.info("model %s already trained, skipping", mid)
        else:
            todo.append(i)
    if todo:
        ensure_ray()           # before importing Ray: it sets the driver's Ray log defaults
        import ray

        env = worker_env()
        # on a cluster with GPUs, the models share them (a fraction each); else CPUs only
        gpus = float(ray.cluster_resources().get("GPU", 0))
        share = min(1.0, gpus / len(todo)) if gpus else 0.0
        remote = ray.remote(num_cpus=cfg.train.threads, num_gpus=share, max_retries=1)(_train_one)
        log.info("training %d model(s) of %s on Ray (%d epochs each; a line per epoch follows): %s",
                 len(todo), cfg.task, cfg.train.epochs, ", ".join(ids[i] for i in todo))
        shipped = None
        if table:
            from snp_ray.data.embeddings import table_blob

            shipped = ray.put(table_blob(table))
        refs = {remote.options(runtime_env={"env_vars": env}).remote(cfg.to_dict(), i, shipped): i
                for i in todo}
        bar = _bar(len(refs), progress)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                blob, spec_dict = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                _drain(ray, pending)
                cause = e.cause if hasattr(e, "cause") else e
                if isinstance(cause, Exception) and type(cause).__module__.startswith("snp_ray"):
                    raise cause from None
                raise EngineError(f"training model {refs[done[0]]} of {cfg.task} failed: {e}") from e
            spec = ModelSpec.from_dict(spec_dict)
            model = spec.build()
            model.load_state_dict(tensors_from_bytes(blob, None, spec.id))
            spec = store.save(model, spec)
            log.info("trained %s: test accuracy %.4f in %.1fs", spec.id,
                     spec.metrics["test_accuracy"], spec.metrics["train_seconds"])
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    store.write_market_info({"task": cfg.task, "config": cfg.to_dict(), "models": ids})
    market = Market(root)
    for mid in ids:
        for k in cfg.ks:
            market.keep_manifest(mid, k, cfg.fewshot_seed)
    return [store.spec(mid) for mid in ids]


def same_recipe(stored: dict[str, Any], train: TrainConfig) -> bool:
    """Whether a stored model was trained with ``train``: by digest, so a knob added to the
    recipe later (at its default) does not make every stored market retrain."""
    try:
        return TrainConfig.from_dict(stored).digest() == train.digest()
    except (ConfigError, TypeError):
        return False


def _drain(ray, refs: list) -> None:
    """Cancel the other training tasks after one failed and consume their results.

    A task whose failed result is never read makes Ray print an "Unhandled error" traceback
    later, after the job already reported the first failure as one clean error.
    """
    if not refs:
        return
    for ref in refs:
        ray.cancel(ref)
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
    for ref in done:
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001 - the first failure is the one reported
            pass


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="training models", unit="model")
