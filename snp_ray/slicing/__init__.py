"""Slicing: trace a model once, find its unit groups, and cut one class's ability out of it."""
from snp_ray.slicing.api import slice_model
from snp_ray.slicing.config import PRESETS, SliceConfig, slice_preset
from snp_ray.slicing.fragment import Fragment, FragmentSpec, kept_iou
from snp_ray.slicing.slicer import Slicer, select_units

__all__ = ["Fragment", "FragmentSpec", "PRESETS", "SliceConfig", "Slicer",
           "kept_iou", "select_units", "slice_model", "slice_preset"]
