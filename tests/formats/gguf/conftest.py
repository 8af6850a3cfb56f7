"""Fixtures of the ggml codec tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from ggml_oracle import GGML_BASE, GGMLQuantize, load_ggml_quantize

from lowbit.formats.gguf import block


@pytest.fixture(scope="session")
def ggml_quantize(shared_file: Callable[[str], Path]) -> GGMLQuantize:
    """``ggml_quantize_chunk`` of the reference build (``../shared``), through ctypes."""
    return load_ggml_quantize(shared_file(GGML_BASE))


def _require_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch the compiled kernels on; skip when they are not built (``pip install -e .`` builds them
    where a C compiler exists), fail under ``CI=true``, which installs with one."""
    if block._native is None:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail("lowbit.formats.gguf._kernels is not built; CI installs with a C compiler")
        pytest.skip("lowbit.formats.gguf._kernels is not built (no C compiler at install)")
    monkeypatch.setenv("LOWBIT_NATIVE", "1")


@pytest.fixture(params=["native", "numpy"])
def codec_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test on both implementations of the legacy and k-quant codecs: the compiled kernels
    (``_kernels``, the default when built) and the numpy codecs (``LOWBIT_NATIVE=0``)."""
    if request.param == "native":
        _require_kernels(monkeypatch)
    else:
        monkeypatch.setenv("LOWBIT_NATIVE", "0")
    return str(request.param)


@pytest.fixture
def native_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled kernels, on (the tests that compare them with the numpy codecs)."""
    _require_kernels(monkeypatch)
