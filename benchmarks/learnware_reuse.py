"""The learnware package's own reusers on LW-C10 users, run in its own environment.

    .venv-learnware/bin/python benchmarks/learnware_reuse.py --export DIR --out DIR/reuse.json

DIR holds what jobs/learnware_benchmark.py exported per user (``user<i>.npz``): the semantic
mixture (the market's models holding at least one of the user's classes), each mixture model's
log-softmax over the 10 CIFAR-10 classes on the user's 3,000 test images and on its labeled
images at each exported budget, and the labels. Each model enters the package as a
``learnware.model.BaseModel`` whose ``predict`` returns those outputs for the rows it is asked
about (its inputs are row ids), so the package's reusers run unchanged on our models:
``AveragingReuser(mode="vote_by_prob")`` and ``EnsemblePruningReuser`` (fit on the labels).
RKME specifications, the search and ``JobSelectorReuser`` are not run here (see RESULTS).
Imports only numpy and learnware: no code of snp_ray.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
from learnware.learnware import Learnware
from learnware.model import BaseModel
from learnware.reuse import AveragingReuser, EnsemblePruningReuser
from learnware.specification import Specification

TRAIN_OFFSET = 1_000_000     # label rows are asked for as TRAIN_OFFSET + position


class Outputs(BaseModel):
    """One market model, answering with its precomputed outputs (logits up to a constant)."""

    def __init__(self, test: np.ndarray, labeled: dict[int, np.ndarray]):
        super().__init__(input_shape=(1,), output_shape=(10,))
        self.test, self.labeled = test, labeled
        self.budget = 0

    def predict(self, X):
        ids = np.asarray(X).reshape(-1).astype(np.int64)
        if (ids >= TRAIN_OFFSET).all():
            return self.labeled[self.budget][ids - TRAIN_OFFSET]
        return self.test[ids]

    def fit(self, X, y):
        raise NotImplementedError

    def finetune(self, X, y):
        raise NotImplementedError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--export", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--maxgen", type=int, default=500, help="EnsemblePruning generations (theirs: 500)")
    a = p.parse_args()
    rows = []
    for path in sorted(Path(a.export).glob("user*.npz"), key=lambda q: int(q.stem[4:])):
        user = int(path.stem[4:])
        d = np.load(path, allow_pickle=False)
        budgets = sorted(int(k.split("_")[-1]) for k in d.files if k.startswith("labels_"))
        models = [Outputs(d["test_logp"][i], {b: d[f"label_logp_{b}"][i] for b in budgets})
                  for i in range(len(d["mixture"]))]
        lws = [Learnware(id=str(m), model=mod, specification=Specification(), learnware_dirpath="")
               for m, mod in zip(d["mixture"], models)]
        test_x = np.arange(len(d["test_labels"])).reshape(-1, 1)
        y = d["test_labels"]
        params = int(d["mixture_params"].sum())

        def add(method, pred, budget, seconds):
            pred = np.asarray(pred)
            per_class = [float((pred[y == c] == c).mean()) for c in np.unique(y)]
            rows.append({"user": user, "method": method, "budget": budget, "repeat": 0,
                         "accuracy": float((pred == y).mean()),
                         "balanced_accuracy": float(np.mean(per_class)), "params": params,
                         "seconds": seconds, "models": len(lws)})

        t0 = time.perf_counter()
        avg = AveragingReuser(learnware_list=lws, mode="vote_by_prob").predict(test_x)
        add("learnware AveragingReuser vote_by_prob (semantic mixture)", avg.argmax(1), 0,
            time.perf_counter() - t0)
        for b in budgets:
            for m in models:
                m.budget = b
            labels = d[f"labels_{b}"]
            t0 = time.perf_counter()
            reuser = EnsemblePruningReuser(learnware_list=lws, mode="classification")
            reuser.fit(TRAIN_OFFSET + np.arange(len(labels)).reshape(-1, 1), labels, maxgen=a.maxgen)
            pred = reuser.predict(test_x)
            add("learnware EnsemblePruningReuser (semantic mixture)", np.asarray(pred).reshape(-1), b,
                time.perf_counter() - t0)
        print(f"user {user}: {len(lws)} mixture models, budgets {budgets}", flush=True)
    summary = []
    for method, budget in sorted({(r["method"], r["budget"]) for r in rows}, key=lambda t: (t[1], t[0])):
        accs = [r["accuracy"] for r in rows if (r["method"], r["budget"]) == (method, budget)]
        sd = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        summary.append({"method": method, "budget": budget, "users": len(accs),
                        "accuracy_mean": float(np.mean(accs)), "accuracy_std": sd,
                        "accuracy_ci95": 1.96 * sd / max(1, len(accs)) ** 0.5})
    Path(a.out).write_text(json.dumps({"rows": rows, "summary": summary, "maxgen": a.maxgen,
                                       "package": "learnware==0.4.0.post1",
                                       "geatpy": "geatpy-rs 2.7.5 (third-party port; no official "
                                                 "geatpy wheel for Python 3.11)"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
