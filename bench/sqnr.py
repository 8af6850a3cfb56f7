"""SQNR of every codec against the Gaussian rate-distortion bound (6.02 dB per bit).

For a Gaussian source, no code of R bits per sample beats SQNR = 6.02·R dB. The table gives each scheme's
SQNR at its exact bits/weight (codes + scales + zeros) on Gaussian data and on SmolLM2's real weights,
and the gap to the bound. Usage: python bench/sqnr.py
"""

from __future__ import annotations

import math

import torch
from _common import print_table, smollm2_gguf, write_results

from lowbit.formats.base import sqnr_db
from lowbit.schemes import parse_scheme
from lowbit.walk.sources import open_model

SCHEMES = (
    "w8",
    "w8g128",
    "w4",
    "w4g128",
    "w4g64",
    "w4g32",
    "w4g64-asym",
    "w3g64",
    "w3g64-asym",
    "w2g64-asym",
    "nf4",
    "nf4-dq",
    "fp4",
    "fp8",
    "fp8-e5m2",
)


def main() -> None:
    torch.manual_seed(0)
    gauss = torch.randn(1536, 576)
    src = open_model(smollm2_gguf())
    names = [n for n in src.names() if src.arch.is_quantizable(n) and ".layers.1" in n]  # blocks 1, 10-19
    real = {n: src.read(n).float() for n in names}
    rows = []
    for name in SCHEMES:
        codec = parse_scheme(name).codec()
        bpw = codec.bits_per_weight(tuple(gauss.shape))
        g = sqnr_db(gauss, codec.fake_quantize(gauss))
        num = sum(float((w - codec.fake_quantize(w)).double().pow(2).sum()) for w in real.values())
        den = sum(float(w.double().pow(2).sum()) for w in real.values())
        r = 10 * math.log10(den / num)
        rows.append(
            {
                "scheme": name,
                "bpw": bpw,
                "bound_db": 6.02 * bpw,
                "gauss_db": g,
                "gap_db": 6.02 * bpw - g,
                "smollm2_db": r,
            }
        )
    print("SQNR in dB; bound = 6.02 dB x bits/weight (Gaussian rate-distortion); SmolLM2: blocks 1 and 10-19")
    print_table(
        rows,
        [
            ("scheme", "scheme", "s"),
            ("bpw", "bits/w", ".3f"),
            ("bound_db", "bound", ".2f"),
            ("gauss_db", "Gaussian", ".2f"),
            ("gap_db", "gap", ".2f"),
            ("smollm2_db", "SmolLM2", ".2f"),
        ],
    )
    print(f"wrote {write_results('sqnr', {'rows': rows, 'smollm2_tensors': names})}")


if __name__ == "__main__":
    main()
