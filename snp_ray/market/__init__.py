"""Market: task presets, training of the original models, and the model store."""
from snp_ray.market.build import MarketConfig, build_market, model_id
from snp_ray.market.market import Market
from snp_ray.market.modelstore import ModelSpec, ModelStore
from snp_ray.market.tasks import TASKS, TaskConfig, get_task
from snp_ray.market.training import TrainConfig

__all__ = ["Market", "MarketConfig", "ModelSpec", "ModelStore", "TASKS", "TaskConfig",
           "TrainConfig", "build_market", "get_task", "model_id"]
