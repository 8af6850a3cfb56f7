"""Fixtures of the ggml codec tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from ggml_oracle import GGML_BASE, GGMLQuantize, GGMLToFloat, load_ggml_quantize, load_ggml_to_float


@pytest.fixture(scope="session")
def ggml_quantize(shared_file: Callable[[str], Path]) -> GGMLQuantize:
    """``ggml_quantize_chunk`` of the reference build (``../shared``), through ctypes."""
    return load_ggml_quantize(shared_file(GGML_BASE))


@pytest.fixture(scope="session")
def ggml_to_float(shared_file: Callable[[str], Path]) -> GGMLToFloat:
    """ggml's ``to_float`` (``dequantize_row_*``) of the reference build (``../shared``), through ctypes."""
    return load_ggml_to_float(shared_file(GGML_BASE))
