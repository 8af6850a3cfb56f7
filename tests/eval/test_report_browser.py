"""``lowbit compare``'s report.html opens in a real browser: headless Chromium (Debian's ``chromium``, which
``.ci/run`` installs) loads the file, and the page it renders has the table with every row and the plot.

Skipped where Chromium is missing, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lowbit.eval.compare import CompareReport, RunTarget, pareto, recommend, size_for_target
from lowbit.eval.report import write_report

ROOT = Path(__file__).resolve().parents[2]
STORIES = ROOT / "src" / "lowbit" / "assets" / "models" / "stories260K"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return exe


def _rows() -> list[dict[str, Any]]:
    mib = 2**20
    rows: list[dict[str, Any]] = []
    for i, (name, fmt, runtime) in enumerate(
        [("Q8_0", "gguf", "llama.cpp"), ("Q4_K_M", "gguf", "llama.cpp"), ("Q2_K", "gguf", "llama.cpp"),
         ("w4g128", "compressed-tensors", "vLLM / transformers"), ("nf4", "bnb", "transformers (bitsandbytes)")]
    ):  # fmt: skip
        rows.append(
            {
                "name": name,
                "scheme": name,
                "method": "rtn",
                "format": fmt,
                "runtime": runtime,
                "file_bytes": (8 - i) * mib,
                "bpw": 8.0 - i,
                "ppl": 4.0 + i,
                "ppl_stderr": 0.1,
                "delta_ppl": 0.1 * i,
                "kld_mean": 0.001 * 3**i,
                "kld_p99": 0.01 * 3**i,
                "top1": 0.99 - 0.02 * i,
                "quantize_s": 1.0,
                "quantize_peak_rss_bytes": 300 * mib,
                "tokens": 1000,
            }  # fmt: skip
        )
    rows.append({"name": "w2g64", "scheme": "w2g64", "method": "rtn", "format": "compressed-tensors",
                 "runtime": "vLLM / transformers", "error": "a <b>bad</b> & broken row"})  # fmt: skip
    return rows


def _run(chromium: str, tmp: Path, *args: str) -> str:
    argv = [chromium, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_report_renders_in_chromium(chromium: str, tmp_path: Path) -> None:
    rows = _rows()
    target = RunTarget(memory=80 * 2**20, context=512)
    size_for_target(rows, str(STORIES), target)
    pareto(rows)
    best, by_runtime = recommend(rows, target)
    report = CompareReport(str(STORIES), tuple(rows), best, by_runtime, ("a note",), target, "text.txt", 1.0)
    paths = write_report(report, tmp_path)
    url = paths["report"].resolve().as_uri()
    dom = _run(chromium, tmp_path, "--dump-dom", url)
    table = re.search(r'<table id="results">(.*?)</table>', dom, re.S)
    assert table is not None, dom[:2000]
    body_rows = re.findall(r"<tr[ >]", table.group(1))
    assert len(body_rows) == len(rows) + 1  # header + every candidate, the failed one included
    for r in rows:
        assert f"<td>{r['name']}</td>" in table.group(1)
    assert "&lt;b&gt;bad&lt;/b&gt; &amp; broken" in dom  # escaped, not markup
    plot = re.search(r'<div class="plot" id="pareto-plot">\s*<svg', dom)
    assert plot is not None
    assert best is not None and best["name"] in dom
    shot = tmp_path / "shot.png"
    _run(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1200,1400", url)
    import matplotlib.image as mpimg

    img = mpimg.imread(str(shot))
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    assert img[..., :3].std() > 0.05  # a page with content, not a blank one
