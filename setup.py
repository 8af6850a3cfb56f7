"""Build of lowbit's one compiled module; everything else is in pyproject.toml.

``lowbit.formats.gguf._kernels`` (C, see its header) speeds up the GGUF legacy and k-quant codecs.
It is optional: where no C compiler is available the install goes on and lowbit uses its numpy
codecs, which give the same bytes.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lowbit.formats.gguf._kernels",
            ["src/lowbit/formats/gguf/_kernels.c"],
            # no fused multiply-add: every float expression rounds as in the numpy codecs and ggml
            extra_compile_args=["-O2", "-ffp-contract=off", "-fno-fast-math"],
            optional=True,
        )
    ]
)
