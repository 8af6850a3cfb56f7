"""``lowbit compare``: candidates made as real files and judged alike, the Pareto front, the recommendation,
the report files, and one-line refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lowbit.cli.main import main
from lowbit.errors import ArgumentError, SchemeError
from lowbit.eval.compare import (
    PRESETS,
    Candidate,
    RunTarget,
    expand_schemes,
    pareto,
    plan_candidates,
    recommend,
)

ROOT = Path(__file__).resolve().parents[2]
STORIES = ROOT / "src" / "lowbit" / "assets" / "models" / "stories260K"
TEXT = ROOT / "src" / "lowbit" / "assets" / "text" / "tinystories-val.txt"
TASK = ROOT / "src" / "lowbit" / "assets" / "tasks" / "tinystories-mc.jsonl"
SCHEMES = "Q8_0,Q4_0,nf4,w8a8,w4"


# ------------------------------------------------------------------------------------------ planning
def test_candidates_are_schemes_times_methods_in_their_formats() -> None:
    cands, notes = plan_candidates(["q4_k_m", "w4g64", "nf4", "w8a8"], ["rtn", "gptq"])
    assert [(c.name, c.fmt) for c in cands] == [
        ("Q4_K_M", "gguf"),
        ("Q4_K_M+gptq", "gguf"),
        ("w4g64", "compressed-tensors"),
        ("w4g64+gptq", "compressed-tensors"),
        ("nf4", "bnb"),
        ("w8a8", "compressed-tensors"),
    ]
    assert len(notes) == 2 and all("round-to-nearest only" in n for n in notes)
    assert cands[0].runtime == "llama.cpp" and cands[0].filename == "Q4_K_M.gguf"
    assert Candidate("w4g64", "gptq", "compressed-tensors").filename == "w4g64-gptq"


def test_presets_and_refusals() -> None:
    assert expand_schemes(None, "local") == list(PRESETS["local"])
    assert expand_schemes(None, None) == list(PRESETS["all"])
    assert expand_schemes("Q8_0, w4", None) == ["Q8_0", "w4"]
    plan_candidates(PRESETS["all"], ["rtn", "gptq", "awq"])  # every preset scheme is known
    with pytest.raises(ArgumentError, match="not both"):
        expand_schemes("Q8_0", "local")
    with pytest.raises(ArgumentError, match="preset"):
        expand_schemes(None, "phone")
    with pytest.raises(SchemeError, match="q9_k"):
        plan_candidates(["Q4_K_M", "q9_k"], ["rtn"])
    with pytest.raises(ArgumentError, match="smoothquant"):
        plan_candidates(["Q4_K_M"], ["smoothquant"])
    with pytest.raises(ArgumentError, match="memory"):
        RunTarget(memory=0)


def _row(name: str, size: int, kld: float, runtime: str = "llama.cpp", **kw: Any) -> dict[str, Any]:
    return {"name": name, "file_bytes": size, "kld_mean": kld, "runtime": runtime, "top1": 0.9, **kw}


def test_pareto_marks_the_front_and_names_a_dominating_row() -> None:
    rows = [
        _row("a", 100, 0.5),
        _row("b", 200, 0.1),
        _row("c", 250, 0.2),  # beaten by b (smaller and better)
        _row("d", 300, 0.1),  # beaten by b (same KLD, smaller)
        _row("e", 400, 0.01),
        {"name": "broken", "error": "x"},
    ]
    pareto(rows)
    assert [r.get("pareto") for r in rows] == [True, True, False, False, True, None]
    assert rows[2]["dominated_by"] == "b" and rows[3]["dominated_by"] == "b"
    assert rows[0]["dominated_by"] is None


def test_recommendation_is_the_closest_file_that_fits() -> None:
    mib = 2**20
    rows = [
        _row("Q8_0", 80 * mib, 0.001),
        _row("Q4_K_M", 45 * mib, 0.01),
        _row("Q2_K", 30 * mib, 0.1),
        _row("w4g128", 40 * mib, 0.02, runtime="vLLM / transformers"),
    ]
    for r in rows:
        r.update(kv_bytes=10 * mib, overhead_bytes=5 * mib, run_bytes=r["file_bytes"] + 15 * mib)
    target = RunTarget(memory=64 * mib, context=1024)
    for r in rows:
        r["fits"] = r["run_bytes"] <= 64 * mib
        r["max_context"] = 1
    best, by_runtime = recommend(rows, target)
    assert best is not None and best["name"] == "Q4_K_M" and best["fits"]
    assert "fits 64.0 MiB" in best["reason"] and "KLD 0.01" in best["reason"]
    assert by_runtime["vLLM / transformers"]["name"] == "w4g128"
    small = RunTarget(memory=20 * mib, context=1024)
    for r in rows:
        r["fits"] = False
        r["max_context"] = 0
    best, _ = recommend(rows, small)
    assert best is not None and best["name"] == "Q2_K" and not best["fits"] and "nothing" in best["reason"]
    assert recommend(rows, RunTarget()) == (None, {})


# --------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("compare")
    (root / "eval.txt").write_bytes(TEXT.read_bytes()[-40_000:])
    (root / "calib.txt").write_bytes(TEXT.read_bytes()[:60_000])
    out = root / "cmp"
    argv = ["compare", str(STORIES), "--text", str(root / "eval.txt"), "--ctx", "128", "--chunks", "8"]
    argv += ["--schemes", SCHEMES, "--methods", "rtn,gptq", "--calib", str(root / "calib.txt")]
    argv += ["--samples", "16", "--seqlen", "128", "--memory", "80MiB", "--context", "256", "-o", str(out)]
    argv += ["--task", str(TASK)]
    return {"root": root, "out": out, "argv": argv}


@pytest.mark.slow
def test_compare_writes_every_candidate_and_the_report(
    compared: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from lowbit.eval.run import evaluate_source, prepare_reference

    out: Path = compared["out"]
    assert main([*compared["argv"], "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((out / "results.json").read_text())
    assert printed == saved
    rows = saved["rows"]
    names = [r["name"] for r in rows]
    # nf4 (bitsandbytes) and w8a8 are round-to-nearest only: no gptq rows for them
    assert names == ["Q8_0", "Q8_0+gptq", "Q4_0", "Q4_0+gptq", "nf4", "w8a8", "w4", "w4+gptq"]
    assert {r["format"] for r in rows} == {"gguf", "bnb", "compressed-tensors"}
    assert not [r for r in rows if "error" in r]
    # the rows are the files' own measurements: lowbit eval of the written file gives the same KLD
    setup = prepare_reference(STORIES, compared["root"] / "eval.txt", ctx=128, chunks=8, progress=False)
    for r in rows:
        assert Path(r["file"]).exists()
        assert r["file_bytes"] > 0 and r["run_bytes"] > r["file_bytes"]
        if r["name"] in ("Q4_0", "w8a8"):
            assert evaluate_source(setup, Path(r["file"]), progress=False).kld_mean == pytest.approx(
                r["kld_mean"]
            )
    by = {r["name"]: r for r in rows}
    assert "imatrix" in by["Q4_0"]["method_label"]  # one imatrix of the calibration text for the GGUF mixes
    assert by["w4+gptq"]["kld_mean"] < by["w4"]["kld_mean"]
    front = [r for r in rows if r["pareto"]]
    assert front and all(r["dominated_by"] is None for r in front)
    for r in rows:
        if not r["pareto"]:
            d = by[r["dominated_by"]]
            assert d["file_bytes"] <= r["file_bytes"] and d["kld_mean"] <= r["kld_mean"]
    assert all(r["task_items"] == 40 and 0 <= r["task_flips"] <= 40 for r in rows)
    assert len({r["ref_task_accuracy"] for r in rows}) == 1
    rec = saved["recommended"]
    assert rec["fits"] and by[rec["name"]]["recommended"] and by[rec["name"]]["fits"]
    assert "answers flipped on your task" in rec["reason"]
    assert by[rec["name"]]["kld_mean"] == min(r["kld_mean"] for r in rows if r["fits"])
    html = (out / "report.html").read_text()
    assert "<svg" in html and html.count("<tr") == len(rows) + 1 and rec["reason"].split(":")[0] in html
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second sweep into the same directory is refused unless --force
    assert main(compared["argv"]) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_workers_give_the_serial_rows(compared: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    out = compared["root"] / "parallel"
    argv = [a if a != str(compared["out"]) else str(out) for a in compared["argv"]]
    i = argv.index("--schemes")
    argv[i + 1] = "Q4_0,w4"
    assert main([*argv, "--workers", "2", "--json"]) == 0
    par = {r["name"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]}
    serial = {r["name"]: r for r in json.loads((compared["out"] / "results.json").read_text())["rows"]}
    assert sorted(par) == ["Q4_0", "Q4_0+gptq", "w4", "w4+gptq"]
    for name, r in par.items():
        assert r["kld_mean"] == serial[name]["kld_mean"] and r["file_bytes"] == serial[name]["file_bytes"], (
            name
        )


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--schemes", "Q4_K_M,q9"], "q9"),
        (["--schemes", "Q8_0", "--memory", "lots"], "memory size"),
        (["--schemes", "Q8_0", "--methods", "gptq"], "--calib"),
        (["--schemes", "Q8_0", "--preset", "local"], "not both"),
        (["--schemes", "Q8_0", "--kv-type", "q9"], "q9"),
        (["--schemes", "Q8_0", "--task", "{bad}"], "bad.jsonl:2"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    extra: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "choices": ["b", "c"], "answer": 0}\n{"prompt": "a", "choices": ["b"]}\n')
    extra = [a.replace("{bad}", str(bad)) for a in extra]
    assert main(["compare", str(STORIES), "--text", str(TEXT), *extra, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()
