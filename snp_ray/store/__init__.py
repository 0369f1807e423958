"""Store: fragments as content-addressed safetensors blobs plus a Parquet manifest."""
from snp_ray.store.fragments import SCHEMA, FragmentStore, belongs_to, open_filesystem

__all__ = ["SCHEMA", "FragmentStore", "belongs_to", "open_filesystem"]
