"""The paper's baselines: Ensemble, Finetune, CA-MKD and NetGraft, on the market's few-shot data.

Every baseline has one call signature::

    fn(market, task_models, target_classes, k, seed=0, config=None) -> list[BaselineResult]

``seed`` picks the k-shot draw (the same data packing uses); ``config.seed`` the training
randomness. Finetune returns one result per task model (the paper averages over them), the
others one result. A result predicts global class ids from raw samples; a CA-MKD result may be
``status == "failed"`` when the few-shot data cannot support it (see :mod:`.camkd`).
"""
from __future__ import annotations

from typing import Any, Callable

from snp_ray.baselines.camkd import CAMKDConfig, run_camkd
from snp_ray.baselines.common import (BaselineModel, BaselineResult, FeatureConcatModel,
                                      SingleModel, TaskData, load_task)
from snp_ray.baselines.ensemble import EnsembleConfig, run_ensemble
from snp_ray.baselines.finetune import FinetuneConfig, run_finetune
from snp_ray.baselines.netgraft import NetGraftConfig, run_netgraft
from snp_ray.config import Config
from snp_ray.errors import UnknownNameError
from snp_ray.market.market import Market

BaselineFn = Callable[..., list[BaselineResult]]

BASELINES: dict[str, BaselineFn] = {
    "ensemble": run_ensemble,
    "finetune": run_finetune,
    "ca-mkd": run_camkd,
    "netgraft": run_netgraft,
}
CONFIGS: dict[str, type[Config]] = {
    "ensemble": EnsembleConfig,
    "finetune": FinetuneConfig,
    "ca-mkd": CAMKDConfig,
    "netgraft": NetGraftConfig,
}


def run_baseline(name: str, market: Market, task_models: list[str], target_classes: list[int],
                 k: int, seed: int = 0, config: Config | dict[str, Any] | None = None
                 ) -> list[BaselineResult]:
    """Run baseline ``name`` for ``target_classes`` on the k-shot data of ``task_models``."""
    if name not in BASELINES:
        raise UnknownNameError("baseline", name, list(BASELINES))
    return BASELINES[name](market, list(task_models), list(target_classes), k, seed=seed, config=config)


__all__ = ["BASELINES", "CONFIGS", "BaselineModel", "BaselineResult", "CAMKDConfig", "EnsembleConfig",
           "FeatureConcatModel", "FinetuneConfig", "NetGraftConfig", "SingleModel", "TaskData",
           "load_task", "run_baseline", "run_camkd", "run_ensemble", "run_finetune", "run_netgraft"]
