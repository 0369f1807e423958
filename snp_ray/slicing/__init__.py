"""Slicing: trace a model once, find its unit groups, and cut one class's ability out of it."""
from snp_ray.slicing.api import market_fragment_store, slice_missing, slice_model
from snp_ray.slicing.config import PRESETS, SliceConfig, slice_preset
from snp_ray.slicing.fragment import Fragment, FragmentSpec, kept_iou
from snp_ray.slicing.slicer import Slicer, roc_auc, select_units

__all__ = ["Fragment", "FragmentSpec", "PRESETS", "SliceConfig", "Slicer", "market_fragment_store", "slice_missing",
           "kept_iou", "roc_auc", "select_units", "slice_model", "slice_preset"]
