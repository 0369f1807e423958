"""Evaluation: the only code that reads test splits. Slicing, packing and tuning never import it."""
from snp_ray.evaluation.metrics import predict_logits, test_accuracy
from snp_ray.evaluation.testsplit import load_test_split

__all__ = ["load_test_split", "predict_logits", "test_accuracy"]
