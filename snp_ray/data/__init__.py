"""Data: Parquet readers, the torchvision converter, k-shot sampling and input specs.

The test split is reachable only through :mod:`snp_ray.data.testsplit`, which this package
does not export and fitting code never imports.
"""
from snp_ray.data.catalog import DATASETS, available, data_root, get_dataset
from snp_ray.data.fewshot import FewShotManifest, FewShotSet, load_fewshot, sample_k_shot
from snp_ray.data.specs import ImageSpec, InputSpec, TextSpec
from snp_ray.data.tables import Split, read_split

__all__ = ["DATASETS", "FewShotManifest", "FewShotSet", "ImageSpec", "InputSpec", "Split",
           "TextSpec", "available", "data_root", "get_dataset", "load_fewshot", "read_split",
           "sample_k_shot"]
