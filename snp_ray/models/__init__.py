"""Model zoo: CIFAR VGG and ResNet, learnware's ConvModel, Kim's TextCNN, GRU/LSTM; each splits
features from head."""
from snp_ray.models.base import Classifier, channels_last_safe, count_macs, count_params
from snp_ray.models.external import split_classifier
from snp_ray.models.registry import ARCHS, Arch, build_model, get_arch, param_table

__all__ = ["ARCHS", "Arch", "Classifier", "build_model", "channels_last_safe", "count_macs", "count_params", "get_arch", "param_table",
           "split_classifier"]
