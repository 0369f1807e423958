"""Property-based fuzzing of the readers a market exposes to outside bytes: the fragment store's
manifest and blobs, fragment and pack files, model specs, and the config parsers. Whatever the
input, nothing escapes but errors from snp_ray.errors."""
from __future__ import annotations

import io
import json
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from snp_ray.errors import SnpError
from snp_ray.market import MarketConfig, ModelSpec, TrainConfig
from snp_ray.packing import PackConfig, PackedModel
from snp_ray.slicing import Fragment, SliceConfig
from snp_ray.store import SCHEMA, FragmentStore

FAST = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


def field_dicts(cls):
    names = list(cls.__dataclass_fields__)
    return st.dictionaries(st.sampled_from(names + ["bogus"]), json_values, max_size=len(names) + 1)


@FAST
@given(data=st.one_of(field_dicts(SliceConfig), field_dicts(PackConfig), field_dicts(TrainConfig),
                      field_dicts(MarketConfig), json_values))
def test_config_parsers_only_raise_typed_errors(data):
    for cls in (SliceConfig, PackConfig, TrainConfig, MarketConfig, ModelSpec):
        try:
            cls.from_dict(data)
        except SnpError:
            pass
        try:
            cls.from_json(json.dumps(data, allow_nan=True))
        except SnpError:
            pass


@FAST
@given(blob=st.binary(max_size=400), spec=st.binary(max_size=200))
def test_fragment_and_pack_blobs_only_raise_typed_errors(blob, spec):
    for loader in (Fragment.from_blobs, PackedModel.from_blobs):
        with pytest.raises(SnpError):
            loader(spec, blob)


def _row(**over):
    row = {f.name: None for f in SCHEMA}
    row.update({"key": "k", "model_id": "m", "model_sha256": "0" * 64, "class_id": 1,
                "class_name": "c", "config_digest": "d", "k": 5, "fewshot_seed": 0, "arch": "vgg11",
                "kept": "{}", "feature_dim": 1, "params": 1, "source_params": 2, "flops": 1,
                "metrics": "{}", "seconds": 0.1, "sha256": "0" * 64, "spec_sha256": "0" * 64,
                "blob": "blobs/x.safetensors", "spec": "{}", "created": 0.0, "writer": "w"})
    row.update(over)
    return row


@FAST
@given(part=st.binary(max_size=300), spec=st.text(string.printable, max_size=80),
       blob_name=st.text(string.ascii_letters + "/._-", min_size=1, max_size=30))
def test_store_reader_only_raises_typed_errors(tmp_path_factory, part, spec, blob_name):
    root = tmp_path_factory.mktemp("fuzzstore")
    (root / "manifest").mkdir()
    (root / "manifest" / "part-a.parquet").write_bytes(part)       # arbitrary bytes
    store = FragmentStore(root)
    try:
        store.keys()
    except SnpError:
        pass
    (root / "manifest" / "part-a.parquet").unlink()
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([_row(spec=spec, blob=blob_name)], schema=SCHEMA), buf)
    (root / "manifest" / "part-b.parquet").write_bytes(buf.getvalue())
    store = FragmentStore(root)
    for key in store.refresh().keys():
        with pytest.raises(SnpError):
            store.get(key)


@FAST
@given(cols=st.lists(st.sampled_from(SCHEMA.names), unique=True, max_size=len(SCHEMA.names) - 1))
def test_manifest_missing_columns_is_an_integrity_error(tmp_path_factory, cols):
    from snp_ray.store.fragments import ADDED_COLUMNS

    # a part may lack only columns added after stores existed; one lacking any other is refused
    assume(set(SCHEMA.names) - set(cols) - set(ADDED_COLUMNS))
    root = tmp_path_factory.mktemp("cols")
    (root / "manifest").mkdir()
    row = _row()
    table = pa.Table.from_pylist([{c: row[c] for c in cols}]) if cols else pa.table({"x": [1]})
    pq.write_table(table, root / "manifest" / "part-c.parquet")
    with pytest.raises(SnpError, match="lacks columns"):
        FragmentStore(root).keys()
