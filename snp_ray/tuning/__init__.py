"""Hyperparameter search on few-shot data only: the CV objective and the Ray Tune sweep."""
from snp_ray.tuning.objective import CVConfig, FragmentCache, cross_validate, evaluate_fold, fold_of
from snp_ray.tuning.sweep import SweepConfig, run_sweep, search_space, trial_configs, write_sweep

__all__ = ["CVConfig", "FragmentCache", "SweepConfig", "cross_validate", "evaluate_fold", "fold_of",
           "run_sweep", "search_space", "trial_configs", "write_sweep"]
