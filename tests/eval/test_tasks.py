"""Task accuracy and flips (``lowbit eval --task``): the file format and its errors, scores computed
independently, greedy generation equal to transformers', and the same accuracy as ``llama-perplexity
--hellaswag`` on the same GGUF file."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lowbit.api import quantize
from lowbit.cli.main import main
from lowbit.errors import InputFileError
from lowbit.eval.tasks import (
    ChoiceItem,
    GenerationItem,
    TaskResult,
    choice_scores,
    generate,
    load_task,
    run_task,
    write_hellaswag,
)
from lowbit.eval.windows import tokenizer_bos_id
from lowbit.walk.sources import open_model
from lowbit.walk.torch_model import build_model, logits_fn

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "src" / "lowbit" / "assets"
STORIES = ASSETS / "models" / "stories260K"
TINY = ASSETS / "models" / "tiny256"
TEXT = ASSETS / "text" / "tinystories-val.txt"
TASK = ASSETS / "tasks" / "tinystories-mc.jsonl"


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "not JSON"),
        ('{"choices": ["a", "b"], "answer": 0}', '"prompt"'),
        ('{"prompt": "p", "choices": ["a"], "answer": 0}', "at least two"),
        ('{"prompt": "p", "choices": ["a", "b"], "answer": 2}', "index"),
        ('{"prompt": "p", "choices": ["a", "b"], "answer": true}', "index"),
        ('{"prompt": "p"}', '"answer" string'),
        ('{"prompt": "p", "answer": "x", "max_tokens": 0}', "max_tokens"),
    ],
)
def test_a_malformed_line_is_named(tmp_path: Path, line: str, needle: str) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text('{"prompt": "p", "choices": ["a", "b"], "answer": 1}\n\n' + line + "\n")
    with pytest.raises(InputFileError, match=rf"t\.jsonl:3: .*{re.escape(needle)}"):
        load_task(f)


def test_bundled_task_loads() -> None:
    items = load_task(TASK)
    assert len(items) == 40 and all(isinstance(i, ChoiceItem) and len(i.choices) == 4 for i in items)
    assert len({i.answer for i in items}) == 4  # the right answer is not always in the same place


@pytest.fixture(scope="module")
def stories() -> dict[str, Any]:
    src = open_model(STORIES)
    tok = src.tokenizer()
    model = build_model(src)
    return {"fn": logits_fn(model), "tok": tok, "bos": tokenizer_bos_id(tok), "model": model}


def test_choice_scores_are_log_likelihoods_of_the_continuation(stories: dict[str, Any]) -> None:
    """Scores checked against the log-probability of the whole sequence minus that of the shared part."""
    fn, tok, bos = stories["fn"], stories["tok"], stories["bos"]
    item = ChoiceItem("Once upon a time, there was a little", ("girl.", "dog named Max.", "table"), 0)

    def total(ids: list[int]) -> float:
        logp = torch.log_softmax(fn(torch.tensor([ids]))[0].double(), dim=-1)
        return float(sum(logp[t - 1, ids[t]] for t in range(1, len(ids))))

    seqs = [[bos, *tok.encode(f"{item.prompt} {c}", add_special_tokens=False)] for c in item.choices]
    common = 0
    while len({s[common] for s in seqs}) == 1:
        common += 1
    sums = choice_scores(fn, tok, bos, item, "sum")
    means = choice_scores(fn, tok, bos, item, "mean")
    for s, got_sum, got_mean in zip(seqs, sums, means, strict=True):
        want = total(s) - total(s[:common])
        assert got_sum == pytest.approx(want, abs=1e-4)  # float32 logits of different lengths
        assert got_mean == pytest.approx(want / (len(s) - common), abs=1e-4)


def test_generation_is_transformers_greedy(stories: dict[str, Any]) -> None:
    fn, tok, bos, model = stories["fn"], stories["tok"], stories["bos"], stories["model"]
    item = GenerationItem("Once upon a time, there was a little", "girl", max_tokens=6)
    ids = torch.tensor([[bos, *tok.encode(item.prompt, add_special_tokens=False)]])
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    want = tok.decode(ref[0, ids.shape[1] :]).split("\n")[0]
    assert generate(fn, tok, bos, item) == want
    res = run_task(fn, tok, bos, [item, GenerationItem(item.prompt, want.strip(), 6)])
    assert res.correct[1] and res.answers[0] == res.answers[1] == want.strip()


def test_flips_count_changed_answers() -> None:
    ref = TaskResult((0, 1, "a", 3), (True, False, True, False))
    other = TaskResult((0, 2, "b", 3), (True, True, False, False))
    assert other.flips(ref) == 2 and ref.flips(ref) == 0 and other.accuracy == 0.5
    with pytest.raises(InputFileError):
        TaskResult((0,), (True,)).flips(ref)


def test_hellaswag_file_refuses_what_it_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="four-choice"):
        write_hellaswag([ChoiceItem("p", ("a", "b"), 0)], tmp_path / "x.txt")
    with pytest.raises(InputFileError, match="newline"):
        write_hellaswag([ChoiceItem("p\nq", ("a", "b", "c", "d"), 0)], tmp_path / "x.txt")


@pytest.mark.slow
def test_eval_task_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The original against itself flips nothing; a 2-bit model flips some answers."""
    out = tmp_path / "w2"
    quantize(TINY, "w2g64-asym", out, progress=False)
    text = tmp_path / "eval.txt"
    text.write_bytes(TEXT.read_bytes()[-20_000:])
    res = {}
    for name, model in (("self", TINY), ("w2", out)):
        argv = ["eval", str(model), "--ref", str(TINY), "--text", str(text), "--ctx", "128", "--chunks", "2"]
        argv += ["--task", str(TASK), "--cache-dir", str(tmp_path / "cache"), "--json"]
        assert main(argv) == 0
        res[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["self"]["task_flips"] == 0 and res["self"]["task_items"] == 40
    assert res["self"]["task_accuracy"] == res["self"]["ref_task_accuracy"] > 0.3
    assert res["self"]["task_scoring"] == "log-likelihood sum"
    assert res["w2"]["task_flips"] > 0 and res["w2"]["ref_task_accuracy"] == res["self"]["ref_task_accuracy"]


@pytest.mark.shared
@pytest.mark.slow
def test_same_accuracy_as_llama_perplexity_hellaswag(
    tmp_path: Path, shared_file: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The bundled task in llama.cpp's hellaswag format, on the same Q4_K_M file: llama-perplexity's
    accuracy (mean log-probability per token) equals lowbit's with ``--task-score mean``."""
    gguf = tmp_path / "q4.gguf"
    quantize(TINY, "Q4_K_M", gguf, progress=False)
    hs = tmp_path / "hs.txt"
    n = write_hellaswag(load_task(TASK), hs)
    exe = shared_file("tools/llama.cpp/bin/llama-perplexity")
    argv = [str(exe), "-m", str(gguf), "-f", str(hs), "--hellaswag", "--hellaswag-tasks", str(n)]
    argv += ["-c", "512", "-t", "2", "-nr"]
    llama = None
    for _ in range(6):  # llama.cpp's asynchronous logger can drop the last lines at exit
        log = tmp_path / "hs.log"
        with log.open("wb") as f:
            assert subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, timeout=600).returncode == 0
        rows = re.findall(r"^(\d+)\t([0-9.]+)%?", log.read_text(errors="replace"), re.M)
        if rows and int(rows[-1][0]) == n:
            llama = float(rows[-1][1]) / 100
            break
    assert llama is not None, "llama-perplexity printed no final hellaswag score in 6 runs"
    text = tmp_path / "eval.txt"
    text.write_bytes(TEXT.read_bytes()[-20_000:])
    argv = ["eval", str(gguf), "--ref", str(TINY), "--text", str(text), "--ctx", "128", "--chunks", "2"]
    argv += ["--task", str(TASK), "--task-score", "mean", "--cache-dir", str(tmp_path / "c"), "--json"]
    assert main(argv) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ours["task_accuracy"] == pytest.approx(llama, abs=1e-9), (ours["task_accuracy"], llama)
