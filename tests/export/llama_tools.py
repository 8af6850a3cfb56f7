"""Running llama.cpp's tools from tests: their output goes to a file, not a pipe.

llama.cpp's asynchronous logger can lose its last lines (the final perplexity, the KLD summary) when its
output is a pipe on a loaded machine; redirected to a file it has not (``../shared/README.md``).
"""

from __future__ import annotations

import subprocess
import tempfile


def run_logged(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Run ``cmd`` with stdout and stderr into one temporary file; (exit code, the whole output)."""
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        log.seek(0)
        return p.returncode, log.read()
