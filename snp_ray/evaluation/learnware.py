"""The learnware market's CIFAR-10 image scenario, rebuilt on our market (issue #25).

Users follow the learnware protocol: each holds 6 classes at 0.3 : 0.3 : 0.1 : 0.1 : 0.1 : 0.1,
is tested on 3,000 test-split images at that ratio, and may label 100 … 4,000 train-split
images at the same ratio. Every method sees the same market and the same users:

- S&P without labels: the planner's ``best`` / ``top-2`` / ``all`` on the market's shots;
- S&P with the user's labels: ``best`` scored on the user's samples (requester AUC), packed on
  them alone and together with the market's shots;
- references: the mean and the best single model of the market (the best is an oracle on the
  user's test data), and the user model (the market's architecture and recipe trained on the
  labels alone).

Every choice (plan, pack) is made with the test split fenced off; test predictions are
computed after, from cached per-model and per-fragment test outputs.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from snp_ray.config import Config
from snp_ray.data.tables import Split, read_split, test_split_fenced
from snp_ray.data.testsplit import load_test_split
from snp_ray.errors import ConfigError
from snp_ray.evaluation.packs import predict_from_features
from snp_ray.market.market import Market
from snp_ray.packing.config import PackConfig
from snp_ray.packing.model import PackedModel
from snp_ray.packing.planner import PlanConfig, ScoreCache, pack_planned, plan_request
from snp_ray.packing.samples import PackSamples
from snp_ray.slicing.config import SliceConfig

log = logging.getLogger(__name__)

#: the learnware protocol's user class ratio
USER_RATIOS = (0.3, 0.3, 0.1, 0.1, 0.1, 0.1)
#: label budgets and their repeats in the learnware benchmark
BUDGETS = (100, 200, 500, 1000, 2000, 4000)
REPEATS = (10, 10, 10, 3, 3, 3)


@dataclass
class UsersConfig(Config):
    users: int = 100
    ratios: list[float] = field(default_factory=lambda: list(USER_RATIOS))
    test_size: int = 3000
    budgets: list[int] = field(default_factory=lambda: list(BUDGETS))
    repeats: list[int] = field(default_factory=lambda: list(REPEATS))
    seed: int = 0

    def validate(self) -> None:
        if self.users < 1 or self.test_size < len(self.ratios):
            raise ConfigError("UsersConfig: need at least one user and one test image per class")
        if abs(sum(self.ratios) - 1.0) > 1e-6 or min(self.ratios) <= 0:
            raise ConfigError(f"UsersConfig.ratios must be positive and sum to 1, got {self.ratios}")
        if len(self.budgets) != len(self.repeats) or min(self.repeats, default=1) < 1:
            raise ConfigError("UsersConfig: one repeat count (>= 1) per budget")
        if any(b < len(self.ratios) for b in self.budgets):
            raise ConfigError(f"UsersConfig: every budget must hold a sample of each class")


def ratio_counts(total: int, ratios: list[float]) -> list[int]:
    """``total`` split at ``ratios`` (largest remainders, so the counts sum to ``total``)."""
    raw = np.asarray(ratios) * total
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


@dataclass
class User:
    index: int
    classes: list[int]          # in ratio order: the first two are the frequent ones
    test_rows: np.ndarray       # rows of the test split, ``test_size`` at the ratio

    def label_rows(self, train_labels: np.ndarray, budget: int, repeat: int, cfg: UsersConfig
                   ) -> np.ndarray:
        """Train-split rows of the user's labeled pool: ``budget`` at the ratio. One seeded
        permutation per (user, repeat, class), of which each budget takes a prefix, so a
        repeat's 100 labels are inside its 200 (budgets differ by the extra labels only)."""
        rows = []
        for c, n in zip(self.classes, ratio_counts(budget, cfg.ratios)):
            idx = np.flatnonzero(train_labels == c)
            rng = np.random.default_rng([cfg.seed, self.index, repeat, c])
            rows.append(idx[rng.permutation(idx.size)[:n]])
        return np.sort(np.concatenate(rows))


def make_users(cfg: UsersConfig, test_labels: np.ndarray, num_classes: int = 10) -> list[User]:
    """The users of the benchmark: classes drawn per user, then a seeded test set at the ratio."""
    rng = np.random.default_rng([cfg.seed, 25])
    users = []
    for u in range(cfg.users):
        classes = [int(c) for c in rng.choice(num_classes, len(cfg.ratios), replace=False)]
        rows = []
        for c, n in zip(classes, ratio_counts(cfg.test_size, cfg.ratios)):
            idx = np.flatnonzero(test_labels == c)
            if idx.size < n:
                raise ConfigError(f"class {c} has {idx.size} test images, a user needs {n}")
            rows.append(idx[np.random.default_rng([cfg.seed, u, c]).permutation(idx.size)[:n]])
        users.append(User(u, classes, np.sort(np.concatenate(rows))))
    return users


def accuracies(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Plain accuracy (the learnware metric, on the skewed test set) and class-balanced accuracy."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    per_class = [float((pred[labels == c] == c).mean()) for c in np.unique(labels)]
    return {"accuracy": float((pred == labels).mean()), "balanced_accuracy": float(np.mean(per_class))}


class TestCache:
    """Test-split outputs computed once per model and per fragment, on the test rows the
    worker's users hold (``rows``), read only after every choice is made."""

    def __init__(self, market: Market, dataset: str, rows: np.ndarray | None = None):
        self.market, self.split = market, load_test_split(dataset)
        self.rows = np.arange(len(self.split)) if rows is None else np.unique(rows)
        self._where = np.full(len(self.split), -1)
        self._where[self.rows] = np.arange(self.rows.size)
        self._images = self.split.images[self.rows]
        self._models: dict[str, np.ndarray] = {}
        self._params: dict[str, int] = {}
        self._fragments: dict[str, torch.Tensor] = {}

    def at(self, rows: np.ndarray) -> np.ndarray:
        pos = self._where[rows]
        if (pos < 0).any():
            raise ConfigError("test rows outside this cache's users")
        return pos

    @torch.no_grad()
    def log_probabilities(self, model_id: str, num_classes: int = 10) -> np.ndarray:
        """A market model's log-softmax on the cached test rows, placed on the dataset's global
        classes (-1e4 for the classes it does not hold, so a softmax gives them 0)."""
        if model_id not in self._models:
            model, spec = self.market.model(model_id)
            model.eval()
            x = spec.input_spec.encode(self._images)
            logits = torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)])
            out = np.full((len(x), num_classes), -1e4, dtype=np.float32)
            out[:, spec.classes] = torch.log_softmax(logits, 1).numpy()
            self._models[model_id] = out
            self._params[model_id] = sum(p.numel() for p in model.parameters())
        return self._models[model_id]

    def probabilities(self, model_id: str, rows: np.ndarray) -> np.ndarray:
        return np.exp(self.log_probabilities(model_id)[self.at(rows)])

    def params(self, model_id: str) -> int:
        self.log_probabilities(model_id)
        return self._params[model_id]

    @torch.no_grad()
    def pack_predictions(self, packed: PackedModel, rows: np.ndarray) -> np.ndarray:
        """The pack's predictions on test ``rows``, from cached fragment features."""
        feats = []
        pos = torch.as_tensor(self.at(rows))
        for f in packed.fragments:
            if f.spec.key not in self._fragments:
                f.eval()
                raw = self._images
                self._fragments[f.spec.key] = torch.cat(
                    [f(f.encode(raw[i:i + 500], strict=False)) for i in range(0, len(raw), 500)])
            feats.append(self._fragments[f.spec.key][pos])
        return predict_from_features(packed, feats)


@torch.no_grad()
def train_log_probabilities(market: Market, model_ids: list[str], images: np.ndarray,
                            num_classes: int = 10) -> np.ndarray:
    """(models, N, classes) log-softmax of market models on train images (for reusers that
    fit on the user's labels), placed like :meth:`TestCache.log_probabilities`."""
    out = np.full((len(model_ids), len(images), num_classes), -1e4, dtype=np.float32)
    for i, m in enumerate(model_ids):
        model, spec = market.model(m)
        x = spec.input_spec.encode(images)
        out[i][:, spec.classes] = torch.log_softmax(model.eval()(x), 1).numpy()
    return out


def train_user_model(market: Market, train: Split, rows: np.ndarray, classes: list[int],
                     epochs: int, seed: int) -> tuple[torch.nn.Module, Any, dict[str, float]]:
    """The user model: the market's architecture and training recipe, on the labels alone."""
    from snp_ray.market.training import LW_TRAIN, train_original

    spec = market.specs()[0]
    cfg = LW_TRAIN.replace(epochs=epochs, seed=seed, threads=torch.get_num_threads())
    trained = train_original(train.rows(rows), classes, spec.arch, spec.width, cfg)
    return trained.model, trained.input_spec, trained.metrics


@dataclass
class MethodsConfig(Config):
    """What one user's evaluation runs, and the CPU knobs (fixed before any test number)."""

    plans: list[str] = field(default_factory=lambda: ["best", "top-2"])
    user_epochs: int = 35                 # the user model's epochs (the learnware recipe)
    user_model_budgets: list[int] = field(default_factory=list)   # empty: every budget
    reuse_budgets: list[int] = field(default_factory=list)        # labels exported for reusers
    label_views: int = 1                  # augmented views when a pack trains on user labels
    score_samples: int = 50               # requester samples per class the planner scores on
    max_repeats: int = 0                  # 0: the protocol's repeats


def evaluate_user(market: Market, user: User, cfg: UsersConfig, k: int, slice_cfg: SliceConfig,
                  pack_cfg: PackConfig, cache: TestCache, train: Split, methods: MethodsConfig,
                  scores: ScoreCache | None = None, export: dict[str, np.ndarray] | None = None
                  ) -> list[dict[str, Any]]:
    """Every method's row for one user (one row per method, budget and repeat). ``scores``: a
    planner score cache over the market's shots shared between users; ``export`` receives the
    arrays the learnware package's reusers run on (mixture outputs on test and label rows)."""
    labels = cache.split.labels[user.test_rows]
    out: list[dict[str, Any]] = []

    def row(method: str, pred: np.ndarray, budget: int = 0, repeat: int = 0, **extra) -> None:
        out.append({"user": user.index, "method": method, "budget": budget, "repeat": repeat,
                    **accuracies(pred, labels), **extra})

    # references: every single model of the market (mean, and the oracle's best)
    ids = market.ids()
    singles = [accuracies(cache.probabilities(m, user.test_rows).argmax(1), labels) for m in ids]
    size = {m: cache.params(m) for m in ids}
    best = int(np.argmax([s["accuracy"] for s in singles]))
    out.append({"user": user.index, "method": "mean single model", "budget": 0, "repeat": 0,
                "accuracy": float(np.mean([s["accuracy"] for s in singles])),
                "balanced_accuracy": float(np.mean([s["balanced_accuracy"] for s in singles])),
                "params": float(np.mean(list(size.values())))})
    row("best single model (oracle on test)",
        cache.probabilities(ids[best], user.test_rows).argmax(1), params=size[ids[best]])
    # our average of the holders' probabilities (the learnware package's AveragingReuser runs on
    # the same arrays separately): models holding a requested class, over all 10 outputs
    mixture = [m for m in ids if set(market.spec(m).classes) & set(user.classes)]
    mean_prob = np.mean([cache.probabilities(m, user.test_rows) for m in mixture], axis=0)
    row("average of the holders (ours)", mean_prob.argmax(1),
        params=sum(size[m] for m in mixture), models=len(mixture))
    if export is not None:
        export["mixture"] = np.asarray(mixture)
        export["test_rows"] = user.test_rows
        export["test_labels"] = labels
        export["test_logp"] = np.stack([cache.log_probabilities(m)[cache.at(user.test_rows)]
                                        for m in mixture])
        export["mixture_params"] = np.asarray([size[m] for m in mixture])
    # S&P without labels
    for policy in methods.plans:
        t0 = time.perf_counter()
        with test_split_fenced():
            plan = plan_request(market, user.classes, k, slice_cfg, PlanConfig(policy=policy),
                                cache=scores)
            packed = pack_planned(market, plan, k, pack_cfg)
        row(f"S&P {policy} (market shots)", cache.pack_predictions(packed, user.test_rows),
            params=packed.params_deployable(), seconds=time.perf_counter() - t0,
            plan_seconds=plan.seconds, pack_seconds=packed.spec.metrics["pack_seconds"],
            train_samples=int(packed.spec.metrics["train_samples"]))
    # with the user's labels
    label_cfg = pack_cfg.replace(augment_views=methods.label_views)
    for budget, repeats in zip(cfg.budgets, cfg.repeats):
        for r in range(min(repeats, methods.max_repeats or repeats)):
            rows = user.label_rows(train.labels, budget, r, cfg)
            samples = PackSamples.from_arrays(train.dataset, train.images[rows], train.labels[rows],
                                              source=f"{train.dataset}/train", rows=rows)
            t0 = time.perf_counter()
            with test_split_fenced():
                plan = plan_request(market, user.classes, k, slice_cfg,
                                    PlanConfig("best", score_samples=methods.score_samples),
                                    cache=scores, requester=samples)
            for name, with_market in (("S&P best (user labels)", False),
                                      ("S&P best (user labels + market shots)", True)):
                t1 = time.perf_counter()
                with test_split_fenced():
                    packed = pack_planned(market, plan, k, label_cfg, requester=samples,
                                          with_market_shots=with_market)
                row(name, cache.pack_predictions(packed, user.test_rows), budget, r,
                    params=packed.params_deployable(),
                    seconds=plan.seconds + time.perf_counter() - t1, plan_seconds=plan.seconds,
                    pack_seconds=packed.spec.metrics["pack_seconds"],
                    train_samples=int(packed.spec.metrics["train_samples"]))
            if export is not None and r == 0 and budget in methods.reuse_budgets:
                export[f"labels_{budget}"] = train.labels[rows]
                export[f"label_logp_{budget}"] = train_log_probabilities(market, mixture,
                                                                         train.images[rows])
            if methods.user_epochs > 0 and (not methods.user_model_budgets
                                            or budget in methods.user_model_budgets):
                t1 = time.perf_counter()
                with test_split_fenced():
                    model, spec, _ = train_user_model(market, train, rows, user.classes,
                                                      methods.user_epochs, seed=budget * 100 + r)
                with torch.no_grad():
                    x = spec.encode(cache.split.images[user.test_rows])
                    pred = np.asarray(user.classes)[model.eval()(x).argmax(1).numpy()]
                row("user model (labels alone)", pred, budget, r,
                    params=sum(p.numel() for p in model.parameters()),
                    seconds=time.perf_counter() - t1)
    return out


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over users (a user's repeats averaged first) and a 95 % band of the mean, per
    (method, budget)."""
    groups: dict[tuple[str, int], dict[int, list[dict[str, Any]]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), {}).setdefault(r["user"], []).append(r)
    out = []
    for (method, budget), by_user in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        def per_user(key: str) -> list[float]:
            return [statistics.mean(x[key] for x in rs) for rs in by_user.values()
                    if all(x.get(key) is not None for x in rs)]
        acc, bal = per_user("accuracy"), per_user("balanced_accuracy")
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        entry = {"method": method, "budget": budget, "users": len(acc),
                 "repeats": max(len(rs) for rs in by_user.values()),
                 "accuracy_mean": statistics.mean(acc), "accuracy_std": sd,
                 "accuracy_ci95": 1.96 * sd / max(1, len(acc)) ** 0.5,
                 "balanced_accuracy_mean": statistics.mean(bal)}
        for key in ("params", "seconds", "train_samples"):
            vals = per_user(key)
            if vals:
                entry[f"{key}_mean"] = statistics.mean(vals)
        secs = [x["seconds"] for rs in by_user.values() for x in rs if x.get("seconds") is not None]
        if secs:
            entry["seconds_p50"] = statistics.median(secs)
        out.append(entry)
    return out
