"""Store: fragments as content-addressed safetensors blobs plus a Parquet manifest; a market's
default store and :func:`slice_missing`, which fills it."""
from snp_ray.store.fill import market_fragment_store, slice_missing
from snp_ray.store.fragments import SCHEMA, FragmentStore, belongs_to, open_filesystem

__all__ = ["SCHEMA", "FragmentStore", "belongs_to", "market_fragment_store", "open_filesystem",
           "slice_missing"]
