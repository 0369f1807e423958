"""snp_ray: Slice-and-Pack model markets as a distributed batch engine on Ray.

The pipeline reads top to bottom: data -> models -> market -> slicing -> store -> packing ->
evaluation; jobs/ and the ``snp`` CLI drive it.
"""
from snp_ray.errors import SnpError

__all__ = ["SnpError", "__version__"]
__version__ = "0.1.0"
