"""Damaged GGUF files: lowbit's readers (gguf-py's behind ``open_gguf``, lowbit's own header reader
``read_gguf``) answer with InputFileError (one line, exit 2), never a crash or a hang."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.errors import InputFileError
from lowbit.walk.gguf_read import open_gguf, read_gguf

ROOT = Path(__file__).resolve().parents[2]


def _small_gguf(tmp: Path) -> bytes:
    """A small real GGUF written by gguf-py: metadata of every kind (scalars, a string, arrays of
    numbers and of strings) and 2 tensors."""
    import gguf

    path = tmp / "small.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_name("small")
    w.add_float32("x.f", 0.5)
    w.add_bool("x.b", True)
    w.add_uint64("x.u64", 2**40)
    w.add_array("x.ints", [3, 1, 2])
    w.add_token_list(["<s>", "ab", "\u00e9"])
    w.add_tensor("a.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("b.weight", np.ones(32, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _small_gguf(tmp_path_factory.mktemp("gguf"))


def _open(tmp: Path, data: bytes) -> None:
    p = tmp / "x.gguf"
    p.write_bytes(data)
    try:
        reader = open_gguf(p)
    except InputFileError:
        pass
    else:
        for t in reader.tensors:  # whatever was accepted must be readable within the file
            _ = t.data.shape
    try:
        g = read_gguf(p)
    except InputFileError:
        return
    g.values(skip_string_arrays=False)  # every value decodes
    for key, e in g.entries.items():  # and every entry lies within the file
        assert 24 <= e.start < e.value_start <= e.end <= len(data), key
    for t in g.tensors:
        assert g.tensor_data(t).nbytes == t.nbytes and t.offset + t.nbytes <= len(data)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_headers_give_input_errors(small: bytes, tmp_path: Path, data: st.DataObject) -> None:
    buf = bytearray(small)
    header_end = min(len(buf), 640)  # the header: metadata and the tensor table
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, header_end - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    _open(tmp_path, bytes(buf))


@settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 2000))
def test_truncated_files_give_input_errors(small: bytes, tmp_path: Path, cut: int) -> None:
    _open(tmp_path, small[: min(cut, len(small) - 1)])


@pytest.mark.parametrize(
    "patch",
    [
        (4, struct.pack("<I", 99)),  # version
        (8, struct.pack("<Q", 2**62)),  # tensor count
        (16, struct.pack("<Q", 2**62)),  # KV count
    ],
    ids=["version", "tensor-count", "kv-count"],
)
def test_absurd_header_fields(small: bytes, tmp_path: Path, patch: tuple[int, bytes]) -> None:
    pos, value = patch
    buf = bytearray(small)
    buf[pos : pos + len(value)] = value
    p = tmp_path / "x.gguf"
    p.write_bytes(bytes(buf))
    with pytest.raises(InputFileError):
        open_gguf(p)
    with pytest.raises(InputFileError):
        read_gguf(p)


def test_header_reader_agrees_with_gguf_py(small: bytes, tmp_path: Path) -> None:
    """On an intact file lowbit's header reader sees what gguf-py sees: keys in order, values, tensors."""
    p = tmp_path / "x.gguf"
    p.write_bytes(small)
    ref, g = open_gguf(p), read_gguf(p)
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert g.values(skip_string_arrays=False) == want
    assert [(t.name, t.ne, t.type, t.offset, t.nbytes) for t in g.tensors] == [
        (t.name, tuple(int(n) for n in t.shape), int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
        for t in ref.tensors
    ]
    for t, r in zip(g.tensors, ref.tensors, strict=True):
        assert g.tensor_data(t).tobytes() == np.asarray(r.data).tobytes()
