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


@pytest.fixture(params=["native", "numpy"])
def codec_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test on both implementations of the legacy and k-quant codecs: the compiled kernels
    (``_kernels``, the default when built) and the numpy codecs (``LOWBIT_NATIVE=0``). The compiled
    module is built by ``pip install -e .``: under ``CI=true`` a missing build fails."""
    if request.param == "native":
        if block._native is None:
            if os.environ.get("CI", "").strip().lower() == "true":
                pytest.fail("lowbit.formats.gguf._kernels is not built; CI installs with a C compiler")
            pytest.skip("lowbit.formats.gguf._kernels is not built (no C compiler at install)")
        monkeypatch.setenv("LOWBIT_NATIVE", "1")
    else:
        monkeypatch.setenv("LOWBIT_NATIVE", "0")
    return str(request.param)
