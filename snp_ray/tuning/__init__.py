"""Hyperparameter search on few-shot data only: the CV objective and the Ray Tune sweep."""
from snp_ray.tuning.objective import (CVConfig, FragmentCache, cross_validate, deal_folds, evaluate_fold,
                                      fold_of, market_folds)
from snp_ray.tuning.sweep import SweepConfig, run_sweep, search_space, trial_configs, write_sweep

__all__ = ["CVConfig", "FragmentCache", "SweepConfig", "cross_validate", "deal_folds", "evaluate_fold", "fold_of",
           "market_folds",
           "run_sweep", "search_space", "trial_configs", "write_sweep"]
