"""Packing: fragments -> one compact classifier for a requested class set."""
from snp_ray.packing.config import PackConfig, preset_pack_config
from snp_ray.packing.model import (EXPORT_FILES, PackedModel, PackSpec, export_onnx, export_pack,
                                   export_pt2)
from snp_ray.packing.packer import Packer, PackSamples, check_compatible

__all__ = ["PackConfig", "preset_pack_config", "PackSamples", "PackSpec", "PackedModel", "Packer", "check_compatible",
           "EXPORT_FILES", "export_onnx", "export_pack", "export_pt2"]
