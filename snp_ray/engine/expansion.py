"""The expansion estimate's job (the paper's Figure 6; the estimate itself is
:mod:`snp_ray.expansion.estimate`): slice the market on the actor pool, test every sampled
combination's pack on Ray workers from its fragments' cached test features, append each accuracy
to a JSON-lines log as soon as it is known (a killed run resumes where it stopped) and return
p(e), its band and R(e) per k."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from snp_ray.artifacts import atomic_write_bytes
from snp_ray.errors import ConfigError
from snp_ray.expansion.estimate import HOLDERS, ExpansionConfig, rates
from snp_ray.market.tasks import count_combinations, get_task, target_sets

log = logging.getLogger(__name__)


def _fragment_features(market: str, key: str, dataset: str, env: dict[str, str]) -> dict:
    """One Ray task per fragment: its features on the test split, shared by every combination
    that packs it (a fragment serves ~S·N/T_classes combinations)."""
    import torch

    os.environ.update(env)
    torch.set_num_threads(1)
    from snp_ray.evaluation.packs import test_features
    from snp_ray.market import Market
    from snp_ray.store import market_fragment_store

    return test_features(market_fragment_store(Market(market)).get(key), dataset)


def _evaluate_combo(market: str, classes: list[int], k: int, slice_cfg: dict, pack_cfg: dict,
                    env: dict[str, str], features: dict[str, Any],
                    assignment: list[tuple[str, int]] | None = None) -> float:
    """One Ray task: pack a combination from the stored fragments and test it on the cached
    test features of its fragments. With ``assignment`` ((model, class) pairs), exactly those
    fragments and their models' k shots; without, every holder of each class (merge)."""
    import ray
    import torch

    os.environ.update(env)
    torch.set_num_threads(1)
    from snp_ray.evaluation.packs import accuracy_from_features
    from snp_ray.market import Market
    from snp_ray.packing import PackConfig
    from snp_ray.packing.request import pack_assignment, pack_request
    from snp_ray.slicing import SliceConfig

    if assignment is not None:
        packed = pack_assignment(Market(market), [tuple(a) for a in assignment], k,
                                 SliceConfig.from_dict(slice_cfg), PackConfig.from_dict(pack_cfg), seed=0)
    else:
        packed = pack_request(Market(market), classes, k, SliceConfig.from_dict(slice_cfg),
                              PackConfig.from_dict(pack_cfg), seed=0)
    keys = [f.spec.key for f in packed.fragments]
    cached = dict(zip(keys, ray.get([features[key] for key in keys])))
    return accuracy_from_features(packed, cached)


def run_expansion(cfg: ExpansionConfig, build: bool = True) -> dict[str, Any]:
    import ray

    from snp_ray.engine.job import SliceJobConfig, run_slice_job
    from snp_ray.evaluation.protocol import market_config
    from snp_ray.market import build_market
    from snp_ray.runtime import ensure_ray, worker_env

    task = get_task(cfg.task)
    if cfg.holders == "own" and task.target_mode != "one_per_model":
        raise ConfigError(f"holders='own' draws one class from each model; task {cfg.task} "
                          f"requests all its classes at once (use holders='merge')")
    if build and not (Path(cfg.market) / "market.json").is_file():   # an existing market is used as is
        build_market(market_config(cfg.task, task.default_arch, ks=cfg.ks), cfg.market, progress=False)
    total, n_models = count_combinations(task), task.num_models
    combos = [list(c) for c in target_sets(task, cfg.combos, cfg.seed)]
    out_dir = Path(cfg.out) / cfg.task
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_ray()
    env = worker_env()
    remote = ray.remote(num_cpus=1, max_retries=2)(_evaluate_combo)
    featurize = ray.remote(num_cpus=1, max_retries=2)(_fragment_features)
    from snp_ray.market import Market
    from snp_ray.slicing import slice_preset
    from snp_ray.slicing.api import pair_key

    mk = Market(cfg.market)
    from snp_ray.packing import preset_pack_config

    scfg = slice_preset(cfg.slice_preset)
    pcfg = preset_pack_config(cfg.slice_preset, epochs=cfg.pack_epochs, seed=cfg.seed)
    # the log is tied to everything that decides an accuracy: rerunning with another preset,
    # packing setting or holders mode starts a new log instead of reusing stale accuracies
    # (merge keeps the tag it had before the holders mode existed, so its old logs still count)
    tag_text = f"{scfg.digest()}|{pcfg.digest()}" + ("" if cfg.holders == "merge" else f"|{cfg.holders}")
    tag = hashlib.sha256(tag_text.encode()).hexdigest()[:10]
    by_index = {s.index: s for s in mk.specs() if s.task == cfg.task}
    if cfg.holders == "own" and sorted(by_index) != list(range(n_models)):
        raise ConfigError(f"market {cfg.market} does not hold models 0..{n_models - 1} of task "
                          f"{cfg.task} (found indices {sorted(by_index)})")

    def pairs(combo: list[int]) -> list[tuple[Any, int]]:
        """(model spec, class) of every fragment the combination packs."""
        if cfg.holders == "own":
            return [(by_index[i], c) for i, c in enumerate(combo)]
        return [(spec, c) for c in combo for spec in mk.holders(c)]

    result: dict[str, Any] = {"task": cfg.task, "T": total, "N": n_models, "S": len(combos),
                              "holders": cfg.holders, "holders_label": HOLDERS[cfg.holders],
                              "k": {}, "config": cfg.to_dict()}
    for k in cfg.ks:
        run_slice_job(SliceJobConfig(market=cfg.market, k=k, preset=cfg.slice_preset))
        log_path = out_dir / f"accuracies-k{k}-{tag}.jsonl"
        done = _read_done(log_path, compact=True)
        todo = [c for c in combos if tuple(c) not in done]
        t0 = time.perf_counter()
        features = {pair_key(spec, c, scfg, k, 0): None for combo in todo for spec, c in pairs(combo)}
        features = {key: featurize.remote(cfg.market, key, task.dataset, env) for key in features}
        refs = {remote.remote(cfg.market, c, k, scfg.to_dict(), pcfg.to_dict(), env, features,
                              [(s.id, cl) for s, cl in pairs(c)] if cfg.holders == "own" else None): c
                for c in todo}
        pending = list(refs)
        with open(log_path, "a") as fh:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                acc = ray.get(ready[0])
                fh.write(json.dumps({"classes": refs[ready[0]], "acc": acc}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                done[tuple(refs[ready[0]])] = acc
                n = len(done)
                if n % 10 == 0 or not pending:
                    log.info("k=%d: %d/%d combinations, %.1fs", k, n, len(combos), time.perf_counter() - t0)
        accs = [done[tuple(c)] for c in combos]
        result["k"][str(k)] = {"accuracies": accs, "mean_acc": sum(accs) / len(accs),
                               **rates(accs, total, n_models, cfg.z)}
    return result


def _read_done(path: Path, compact: bool = False) -> dict[tuple[int, ...], float]:
    """Combinations already scored. With ``compact``, a log that holds a line cut short by a kill
    (or a repeated combination) is first rewritten atomically with only its whole records, so
    the log never keeps a partial line and each combination appears once."""
    done: dict[tuple[int, ...], float] = {}
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            rec = json.loads(line)
            done.setdefault(tuple(int(c) for c in rec["classes"]), float(rec["acc"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue   # a line cut short by a kill: that combination is simply redone
    if compact and len(done) != len(lines):
        log.info("%s: dropping %d partial or repeated lines before resuming", path,
                 len(lines) - len(done))
        body = "".join(json.dumps({"classes": list(c), "acc": a}) + "\n" for c, a in done.items())
        atomic_write_bytes(path, body.encode())
    return done
