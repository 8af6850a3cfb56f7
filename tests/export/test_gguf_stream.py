"""The streaming GGUF writer: metadata copied as raw entries or packed from values, byte for byte what
gguf-py's GGUFWriter writes (the layout llama.cpp reads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lowbit.export.gguf_stream import GGUFStreamWriter, TensorEntry, encode_kv
from lowbit.walk.gguf_read import GGUFFile, read_gguf


def _reference(path: Path, alignment: int) -> bytes:
    """A file written by gguf-py with metadata of every kind and tensors of odd sizes."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    if alignment != 32:
        w.add_custom_alignment(alignment)
    w.add_block_count(3)
    w.add_name("tiny \u00e9")
    w.add_float32("x.f32", 0.1)
    w.add_float64("x.f64", 0.1)
    w.add_bool("x.bool", False)
    w.add_int8("x.i8", -3)
    w.add_uint16("x.u16", 65535)
    w.add_int64("x.i64", -(2**40))
    w.add_array("x.ints", [3, -1, 2])
    w.add_array("x.floats", [0.5, 1e-3])
    w.add_array("x.bools", [True, False, True])
    w.add_token_list(["<s>", "ab", "", "\u00e9\u4e2d"])
    w.add_token_merges(["a b", "ab c"])
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((3, 32)).astype(np.float32))
    w.add_tensor("b.weight", np.ones(7, dtype=np.float16))  # 14 bytes: padded
    w.add_tensor("c.weight", rng.standard_normal((2, 2, 32)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _rewrite(g: GGUFFile, out: Path, kvs: list[bytes | memoryview]) -> bytes:
    table = [TensorEntry(t.name, t.ne, t.type, t.nbytes) for t in g.tensors]
    with out.open("wb") as f:
        w = GGUFStreamWriter(f, g.alignment)
        w.write_header(kvs, table)
        for t in g.tensors:
            w.write_tensor(np.array(g.tensor_data(t)))
        w.close()
    return out.read_bytes()


@pytest.mark.parametrize("alignment", [32, 64])
def test_raw_and_packed_metadata_give_gguf_pys_bytes(tmp_path: Path, alignment: int) -> None:
    ref = _reference(tmp_path / "ref.gguf", alignment)
    g = read_gguf(tmp_path / "ref.gguf")
    assert g.alignment == alignment
    raw = [g.raw(e) for e in g.entries.values()]
    assert _rewrite(g, tmp_path / "raw.gguf", raw) == ref
    values = g.values(skip_string_arrays=False)
    packed = [encode_kv(k, values[k], e.vtype, e.sub_type) for k, e in g.entries.items()]
    assert [bytes(p) for p in packed] == [bytes(r) for r in raw]
    assert _rewrite(g, tmp_path / "packed.gguf", packed) == ref


def test_the_table_is_enforced(tmp_path: Path) -> None:
    with (tmp_path / "x.gguf").open("wb") as f:
        w = GGUFStreamWriter(f)
        w.write_header([], [TensorEntry(n, (4,), 0, 16) for n in "abc"])
        with pytest.raises(AssertionError, match="16"):
            w.write_tensor(np.zeros(5, dtype=np.float32))
        assert w.write_tensor_pieces([np.zeros(3, np.float32), np.zeros(1, np.float32)]) == 16
        with pytest.raises(AssertionError, match="not written"):
            w.close()
