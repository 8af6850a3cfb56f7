"""The files of ``lowbit compare``: ``results.json``, ``pareto.png`` and ``report.html`` (one self-contained
page: the table and the plot, no scripts or files it needs beside it), plus the text table it prints.

Each file is written to a temporary name and renamed, and ``report.html`` last: a directory whose report
exists holds a complete comparison.
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit.eval.compare import CompareReport
from lowbit.eval.fit import format_bytes
from lowbit.export.atomic import atomic_file

COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "candidate"),
    ("format", "format"),
    ("runtime", "runtime"),
    ("file_bytes", "file"),
    ("bpw", "bits/w"),
    ("ppl", "PPL"),
    ("delta_ppl", "ΔPPL"),
    ("kld_mean", "KLD"),
    ("kld_p99", "KLD p99"),
    ("top1", "top-1"),
    ("task_accuracy", "task"),
    ("task_flips", "flips"),
    ("run_bytes", "to run"),
    ("fits", "fits"),
    ("quantize_s", "quantize s"),
    ("quantize_peak_rss_bytes", "peak RSS"),
    ("pareto", "Pareto"),
)


def cell(row: dict[str, Any], key: str) -> str:
    """One table cell as text."""
    v = row.get(key)
    if v is None:
        return "-"
    if key in ("file_bytes", "run_bytes", "quantize_peak_rss_bytes"):
        return format_bytes(int(v))
    if key == "ppl":
        return f"{v:.3f} ± {row.get('ppl_stderr', 0.0):.3f}"
    if key == "delta_ppl":
        return f"{v:+.3f}"
    if key in ("kld_mean", "kld_p99"):
        return f"{v:.5f}"
    if key in ("top1", "task_accuracy"):
        return f"{100 * v:.2f}%" if key == "top1" else f"{100 * v:.1f}%"
    if key == "task_flips":
        return f"{v}/{row.get('task_items')}"
    if key == "bpw":
        return f"{v:.2f}"
    if key == "quantize_s":
        return f"{v:.1f}"
    if key == "fits":
        return "yes" if v else "no"
    if key == "pareto":
        return "front" if v else f"< {row.get('dominated_by')}"
    return str(v)


def _columns(report: CompareReport) -> list[tuple[str, str]]:
    """The columns with something to show: ``fits`` with a memory size, the task's with a task."""
    has_task = any("task_accuracy" in r for r in report.rows)
    skip = {"fits"} if report.target.memory is None else set()
    if not has_task:
        skip |= {"task_accuracy", "task_flips"}
    return [(k, h) for k, h in COLUMNS if k not in skip]


def text_table(report: CompareReport) -> str:
    """The comparison as aligned text, errors and the recommendation below it."""
    cols = _columns(report)
    ok = [r for r in report.rows if "error" not in r]
    body = [[cell(r, k) for k, _ in cols] for r in ok]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, (_, h) in enumerate(cols)]
    lines = [
        "  ".join(
            h.ljust(w) if i < 3 else h.rjust(w)
            for i, ((_, h), w) in enumerate(zip(cols, widths, strict=True))
        )
    ]
    for b in body:
        lines.append(
            "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths, strict=True))
            )
        )
    for r in report.rows:
        if "error" in r:
            lines.append(f"{r['name']}: not made: {r['error']}")
    lines.extend(f"note: {n}" for n in report.notes)
    if report.recommended is not None:
        lines.append("")
        lines.append(f"recommended: {report.recommended['reason']}")
        for runtime, rec in report.recommended_by_runtime.items():
            if rec["name"] != report.recommended["name"]:
                lines.append(f"  for {runtime}: {rec['reason']}")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], fmt: str) -> bytes:
    """KLD against file size, one marker per format, the Pareto front joined; ``fmt`` png or svg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "kld_mean" in r]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    markers = {"gguf": "o", "compressed-tensors": "s", "gptq": "^", "awq": "v", "bnb": "D"}
    for fmt_name in dict.fromkeys(r["format"] for r in ok):
        pts = [r for r in ok if r["format"] == fmt_name]
        ax.scatter(
            [r["file_bytes"] / 2**20 for r in pts],
            [max(r["kld_mean"], 1e-7) for r in pts],
            marker=markers.get(fmt_name, "o"),
            label=fmt_name,
            s=36,
        )
        for r in pts:
            ax.annotate(r["name"], (r["file_bytes"] / 2**20, max(r["kld_mean"], 1e-7)), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
    front = sorted((r for r in ok if r.get("pareto")), key=lambda r: r["file_bytes"])
    if front:
        ax.plot([r["file_bytes"] / 2**20 for r in front], [max(r["kld_mean"], 1e-7) for r in front], "k--",
                lw=0.8, label="Pareto front")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("KL-divergence from the original (nats/token)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    plt.close(fig)
    return buf.getvalue()


def html_report(report: CompareReport, svg: str) -> str:
    """One self-contained page: what was compared, the plot, the table, the recommendation."""
    cols = _columns(report)
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in cols)
    body = []
    for r in report.rows:
        if "error" in r:
            body.append(
                f'<tr class="error"><td>{html.escape(r["name"])}</td>'
                f'<td colspan="{len(cols) - 1}">not made: {html.escape(str(r["error"]))}</td></tr>'
            )
            continue
        cls = " ".join(c for c, on in (("front", r.get("pareto")), ("best", r.get("recommended"))) if on)
        cells = "".join(f"<td>{html.escape(cell(r, k))}</td>" for k, _ in cols)
        body.append(f'<tr class="{cls}">{cells}</tr>')
    rec = ""
    if report.recommended is not None:
        items = [f"<li><b>{html.escape(report.recommended['reason'])}</b></li>"]
        items += [
            f"<li>{html.escape(v['reason'])}</li>"
            for v in report.recommended_by_runtime.values()
            if v["name"] != report.recommended["name"]
        ]
        rec = f"<h2>Recommendation</h2><ul>{''.join(items)}</ul>"
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    target = (
        f"memory {format_bytes(report.target.memory)}, " if report.target.memory is not None else ""
    ) + f"context {report.target.context} × batch {report.target.batch}, KV cache {report.target.kv}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lowbit compare: {html.escape(report.model)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; white-space: nowrap; }}
th:nth-child(-n+3), td:nth-child(-n+3) {{ text-align: left; }}
tr.front td {{ font-weight: 600; }}
tr.best td {{ background: #e6f4e6; }}
tr.error td {{ color: #a00; }}
.plot svg {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>lowbit compare: {html.escape(report.model)}</h1>
<p>Every candidate is a file in its real format, judged against the original on
<code>{html.escape(report.text)}</code> (KL-divergence of the next-token distribution, perplexity, top-1
agreement); GGUF files as llama.cpp's CPU backend multiplies them. Memory to run: the file, the KV cache
and runtime overhead for {html.escape(target)}. Bold rows are on the Pareto front (no other file is both
smaller and closer to the original); the others say which row beats them. {len(report.rows)} candidates,
{report.seconds:.0f} s.</p>
{rec}
<h2>KL-divergence against file size</h2>
<div class="plot" id="pareto-plot">{svg}</div>
<h2>Every candidate</h2>
<table id="results"><thead><tr>{head}</tr></thead><tbody>
{"".join(body)}
</tbody></table>
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
</body></html>
"""


def write_report(report: CompareReport, out_dir: Path) -> dict[str, Path]:
    """``results.json``, ``pareto.png`` and, last, ``report.html`` in ``out_dir``; their paths."""
    paths = {
        "results": out_dir / "results.json",
        "plot": out_dir / "pareto.png",
        "report": out_dir / "report.html",
    }
    with atomic_file(paths["results"], force=True) as tmp:
        tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    with atomic_file(paths["plot"], force=True) as tmp:
        tmp.write_bytes(plot(report.rows, "png"))
    svg = plot(report.rows, "svg").decode()
    svg = svg[svg.index("<svg") :]
    with atomic_file(paths["report"], force=True) as tmp:
        tmp.write_text(html_report(report, svg))
    return paths
