"""Store: fragments as content-addressed safetensors blobs plus a Parquet manifest."""
from snp_ray.store.fragments import SCHEMA, FragmentStore, open_filesystem

__all__ = ["SCHEMA", "FragmentStore", "open_filesystem"]
