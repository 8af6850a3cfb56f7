"""Types of the compiled module built from ``_kernels.c`` (see its header)."""

from typing_extensions import Buffer

def quantize(
    ggml_type: int, x: Buffer, rows: int, n_per_row: int, imatrix: Buffer | None, out: Buffer
) -> bool: ...
def to_bf16(x: Buffer, out: Buffer) -> None: ...
