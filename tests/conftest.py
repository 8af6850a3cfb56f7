"""Shared test fixtures.

``../shared`` (next to the repository) holds the oracles: llama.cpp tools, golden vectors, reference
models. A fresh checkout does not have it: tests that need it are marked ``@pytest.mark.shared`` and
skip when it is missing, except under ``CI=true``, where a missing oracle is a failure.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lowbit.formats.gguf import block

SHARED_DIR = (Path(__file__).resolve().parents[1] / ".." / "shared").resolve()


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def missing_oracle(what: str) -> None:
    """Skip (locally) or fail (under CI=true) because ``what`` is not available."""
    msg = f"{what} is missing (expected under {SHARED_DIR})"
    if _in_ci():
        pytest.fail(f"{msg}; CI must provide ../shared")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared``; skips (or fails under CI=true) when it does not exist."""
    if not SHARED_DIR.is_dir():
        missing_oracle("../shared")
    return SHARED_DIR


@pytest.fixture(scope="session")
def shared_file(shared_dir: Path) -> Callable[[str], Path]:
    """``shared_file("tools/llama.cpp/bin/llama-quantize")``: an existing path under ``../shared``,
    else skip (or fail under CI=true)."""

    def get(relative: str) -> Path:
        path = shared_dir / relative
        if not path.exists():
            missing_oracle(f"../shared/{relative}")
        return path

    return get


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test on one intra-op thread (tiny models: threads cost more than they save), restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _require_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch the compiled kernels on; skip when they are not built (``pip install -e .`` builds them
    where a C compiler exists), fail under ``CI=true``, which installs with one."""
    if block._native is None:
        if _in_ci():
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
