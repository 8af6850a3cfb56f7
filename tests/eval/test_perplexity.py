"""The evaluator core: llama-perplexity windows, PPL, top-k + sampled-tail KLD, top-1, reference cache.

Every expected value is computed independently here (plain loops, ``F.cross_entropy``, full-vocabulary
KL) or by llama.cpp itself (``@pytest.mark.shared``).
"""

from __future__ import annotations

import ast
import copy
import json
import math
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import ArgumentError, InputFileError
from lowbit.eval.metrics import model_rows, reference_rows, sample_tail
from lowbit.eval.perplexity import (
    EvalResult,
    Reference,
    build_reference,
    compute_perplexity,
    default_cache_dir,
    encode_text,
    evaluate,
    load_or_build_reference,
    load_reference,
    logits_fn_from_hf,
    plan_windows,
    reference_cache_key,
    save_reference,
    tokenizer_bos_id,
)

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "src/lowbit/assets/models/stories260K"
TEXT_FILE = REPO / "src/lowbit/assets/text/tinystories-val.txt"
CTX = 128
CHUNKS = 4
VOCAB = 512
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def text() -> str:
    # ~5 K tokens: enough for every window used here, quick to tokenize.
    return TEXT_FILE.read_text(encoding="utf-8")[:20000]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.std())
    return m


@pytest.fixture(scope="module")
def tokens(tokenizer: Any, text: str) -> torch.Tensor:
    return encode_text(tokenizer, text)


@pytest.fixture(scope="module")
def bos(tokenizer: Any) -> int | None:
    return tokenizer_bos_id(tokenizer)


@pytest.fixture(scope="module")
def ref_default(model: torch.nn.Module, tokens: torch.Tensor, bos: int | None) -> Reference:
    return build_reference(logits_fn_from_hf(model), tokens, CTX, CHUNKS, bos, progress=False)


@pytest.fixture(scope="module")
def full_kl(
    model: torch.nn.Module, perturbed: torch.nn.Module, tokens: torch.Tensor, bos: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Independent per-position full-vocabulary KL(P_ref || Q_perturbed) and argmax agreement."""
    return _full_kl(model, perturbed, tokens, CTX, CHUNKS, bos)


@pytest.fixture(scope="module")
def eval_full(ref_full: Reference, perturbed: torch.nn.Module) -> EvalResult:
    return evaluate(logits_fn_from_hf(perturbed), ref_full, progress=False)


@pytest.fixture(scope="module")
def ref_full(model: torch.nn.Module, tokens: torch.Tensor, bos: int | None) -> Reference:
    return build_reference(logits_fn_from_hf(model), tokens, CTX, CHUNKS, bos, topk=VOCAB, progress=False)


# ------------------------------------------------------------------------------- independent computations


def _windows(
    tokens: torch.Tensor, ctx: int, chunks: int, bos: int | None
) -> Iterator[tuple[torch.Tensor, int, torch.Tensor]]:
    """Yield (input ids (1, ctx), first, targets) following llama-perplexity, written out plainly."""
    n = min(chunks, tokens.numel() // ctx)
    first = ctx // 2
    for i in range(n):
        window = tokens[i * ctx : (i + 1) * ctx].clone()
        targets = window[first + 1 :].clone()
        if bos is not None:
            window[0] = bos
        yield window[None], first, targets


def _plain_nll(
    model: torch.nn.Module, tokens: torch.Tensor, ctx: int, chunks: int, bos: int | None
) -> np.ndarray:
    nll = []
    with torch.no_grad():
        for ids, first, targets in _windows(tokens, ctx, chunks, bos):
            logits = model(input_ids=ids).logits[0, first : ctx - 1].double()
            nll.append(F.cross_entropy(logits, targets, reduction="none"))
    return torch.cat(nll).numpy()


def _plain_ppl(model: torch.nn.Module, tokens: torch.Tensor, ctx: int, chunks: int, bos: int | None) -> float:
    return math.exp(float(_plain_nll(model, tokens, ctx, chunks, bos).mean()))


def _full_kl(
    ref: torch.nn.Module, q: torch.nn.Module, tokens: torch.Tensor, ctx: int, chunks: int, bos: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-position full-vocabulary KL(P_ref || Q) and argmax agreement."""
    kls, same = [], []
    with torch.no_grad():
        for ids, first, _ in _windows(tokens, ctx, chunks, bos):
            lp = torch.log_softmax(ref(input_ids=ids).logits[0, first : ctx - 1].double(), -1)
            lq = torch.log_softmax(q(input_ids=ids).logits[0, first : ctx - 1].double(), -1)
            kls.append((lp.exp() * (lp - lq)).sum(-1))
            same.append(lp.argmax(-1) == lq.argmax(-1))
    return torch.cat(kls).numpy(), torch.cat(same).numpy()


# -------------------------------------------------------------------------------------------------- windows


@pytest.mark.parametrize(
    ("n_tokens", "ctx", "chunks", "n_chunks"),
    [
        (1000, 128, 4, 4),
        (1000, 128, None, 7),
        (1000, 128, 100, 7),
        (128, 128, None, 1),
        (999, 129, 3, 3),
        (64, 8, None, 8),
        (1023, 512, 5, 1),
    ],
)
def test_window_plan_matches_llama_cpp_formula(
    n_tokens: int, ctx: int, chunks: int | None, n_chunks: int
) -> None:
    plan = plan_windows(n_tokens, ctx, chunks, bos_id=1)
    assert plan.n_chunks == n_chunks == min(chunks or 10**9, n_tokens // ctx)
    assert plan.first == ctx // 2
    assert plan.scored_per_chunk == ctx - 1 - ctx // 2
    assert plan.n_scored == n_chunks * (ctx - 1 - ctx // 2)


@pytest.mark.parametrize(
    ("n_tokens", "ctx", "chunks", "needle"),
    [
        (1000, 7, 1, "at least 8"),
        (1000, 128, 0, "chunks must be at least 1"),
        (100, 128, 1, "fewer than one window"),
    ],
)
def test_bad_window_arguments(n_tokens: int, ctx: int, chunks: int, needle: str) -> None:
    with pytest.raises(ArgumentError, match=needle):
        plan_windows(n_tokens, ctx, chunks, bos_id=None)


def test_bad_tokens_and_model_output(model: torch.nn.Module) -> None:
    fn = logits_fn_from_hf(model)
    with pytest.raises(ArgumentError, match="1-D"):
        compute_perplexity(fn, torch.zeros(2, 300, dtype=torch.long), 128, 1, 1)
    with pytest.raises(ArgumentError, match="integer"):
        compute_perplexity(fn, torch.zeros(300), 128, 1, 1)
    with pytest.raises(ArgumentError, match="shape"):
        compute_perplexity(
            lambda ids: torch.zeros(ids.shape[1], 512), torch.ones(300, dtype=torch.long), 128, 1, 1
        )
    with pytest.raises(ArgumentError, match="tokenizer"):  # the embedding lookup fails
        compute_perplexity(fn, torch.full((300,), 600, dtype=torch.long), 128, 1, 1)

    def pads(ids: torch.Tensor) -> torch.Tensor:  # a model that does not look its inputs up
        return torch.zeros(1, ids.shape[1], 512)

    with pytest.raises(ArgumentError, match="outside the model's vocabulary of 512"):
        compute_perplexity(pads, torch.full((300,), 600, dtype=torch.long), 128, 1, 1)


def test_tokenization_adds_bos_once(tokenizer: Any, tokens: torch.Tensor, bos: int | None) -> None:
    assert bos == 1
    assert int(tokens[0]) == 1
    assert int((tokens == 1).sum()) == 1


# ----------------------------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize(("ctx", "chunks"), [(128, 4), (129, 3), (256, 2)])
def test_ppl_equals_plain_cross_entropy(
    model: torch.nn.Module, tokens: torch.Tensor, bos: int | None, ctx: int, chunks: int
) -> None:
    res = compute_perplexity(logits_fn_from_hf(model), tokens, ctx, chunks, bos, progress=False)
    x = _plain_nll(model, tokens, ctx, chunks, bos)
    assert res.chunks == chunks
    assert res.tokens == x.size == chunks * (ctx - 1 - ctx // 2)
    assert res.ppl == pytest.approx(math.exp(x.mean()), rel=1e-6)
    assert 2.0 < res.ppl < 8.0  # stories260K on TinyStories: ~4 (README: 4.22 on 256-token paragraphs)
    # llama.cpp's uncertainty: PPL * sqrt((E[x^2] - E[x]^2) / (n - 1))
    stderr = math.exp(x.mean()) * math.sqrt((np.mean(x * x) - x.mean() ** 2) / (x.size - 1))
    assert res.ppl_stderr == pytest.approx(stderr, rel=1e-6)


def test_bos_replacement_matters(model: torch.nn.Module, tokens: torch.Tensor, bos: int | None) -> None:
    """Replacing each chunk's first token by BOS is part of the definition: without it PPL differs."""
    with_bos = compute_perplexity(logits_fn_from_hf(model), tokens, CTX, CHUNKS, bos, progress=False)
    without = compute_perplexity(logits_fn_from_hf(model), tokens, CTX, CHUNKS, None, progress=False)
    assert without.ppl == pytest.approx(_plain_ppl(model, tokens, CTX, CHUNKS, None), rel=1e-6)
    assert abs(without.ppl / with_bos.ppl - 1) > 1e-4


def test_reference_alone_gives_ppl(
    ref_default, model: torch.nn.Module, tokens: torch.Tensor, bos: int | None
) -> None:
    res = compute_perplexity(logits_fn_from_hf(model), tokens, CTX, CHUNKS, bos, progress=False)
    assert ref_default.perplexity() == res
    assert json.loads(json.dumps(res.to_json_dict()))["ppl"] == res.ppl


# ---------------------------------------------------------------------------------------- KLD and top-1


def test_self_kld_is_zero_and_top1_is_one(ref_default: Reference, model: torch.nn.Module) -> None:
    res = evaluate(logits_fn_from_hf(model), ref_default, progress=False)
    assert res.kld_mean == 0.0
    assert res.kld_max == 0.0
    assert res.kld_bound_mean == 0.0
    assert res.top1 == 1.0
    assert res.ppl == res.ref_ppl
    assert res.delta_ppl == 0.0
    assert res.tokens == CHUNKS * (CTX - 1 - CTX // 2)


def test_perturbed_kld_equals_full_vocab_kl(
    eval_full: EvalResult,
    full_kl: tuple[np.ndarray, np.ndarray],
    model: torch.nn.Module,
    perturbed: torch.nn.Module,
    tokens: torch.Tensor,
    bos: int | None,
) -> None:
    res = eval_full
    kl, same = full_kl
    assert kl.mean() > 1e-3  # the perturbation is real
    assert res.topk == VOCAB
    assert res.ref_tail_mass == 0.0
    assert res.kld_mean == pytest.approx(kl.mean(), rel=1e-6, abs=1e-9)
    assert res.kld_bound_mean == pytest.approx(kl.mean(), rel=1e-6, abs=1e-9)
    assert res.kld_max == pytest.approx(kl.max(), rel=1e-6)
    assert res.kld_median == pytest.approx(np.median(kl), rel=1e-6)
    assert res.kld_p99 == pytest.approx(np.quantile(kl, 0.99), rel=1e-6)
    assert res.kld_p999 == pytest.approx(np.quantile(kl, 0.999), rel=1e-6)
    assert res.top1 == pytest.approx(same.mean(), abs=1e-12)
    assert 0.5 < res.top1 < 1.0
    q = _plain_nll(perturbed, tokens, CTX, CHUNKS, bos)
    r = _plain_nll(model, tokens, CTX, CHUNKS, bos)
    assert res.ppl == pytest.approx(math.exp(q.mean()), rel=1e-6)
    assert res.ref_ppl == pytest.approx(math.exp(r.mean()), rel=1e-6)
    assert res.delta_ppl == pytest.approx(res.ppl - res.ref_ppl, abs=1e-12)
    # llama.cpp's "Mean PPL(Q)-PPL(base)" uncertainty, with the covariance of the paired NLLs.
    n = q.size
    unc_q = math.exp(q.mean()) * q.std() / math.sqrt(n - 1)
    unc_r = math.exp(r.mean()) * r.std() / math.sqrt(n - 1)
    cov = math.exp(q.mean()) * math.exp(r.mean()) * float(np.cov(q, r, bias=True)[0, 1]) / (n - 1)
    assert res.delta_ppl_stderr == pytest.approx(math.sqrt(unc_q**2 + unc_r**2 - 2 * cov), rel=1e-5)


def test_default_topk_is_close_to_full_kl(
    ref_default, eval_full: EvalResult, perturbed: torch.nn.Module
) -> None:
    full = eval_full
    res = evaluate(logits_fn_from_hf(perturbed), ref_default, progress=False)
    assert res.topk == 128
    assert res.tail_samples == 32
    assert res.kld_bound_mean <= full.kld_mean + 1e-12  # a lower bound
    assert res.kld_bound_mean == pytest.approx(full.kld_mean, rel=1e-3)
    assert res.kld_mean == pytest.approx(full.kld_mean, rel=1e-4)
    assert res.kld_p99 == pytest.approx(full.kld_p99, rel=1e-3)
    assert res.top1 == full.top1


def test_tail_samples_correct_the_bucket_bound(
    model: torch.nn.Module,
    perturbed: torch.nn.Module,
    eval_full: EvalResult,
    tokens: torch.Tensor,
    bos: int | None,
) -> None:
    """With a small k the rest bucket alone is clearly low; the sampled tail brings it back."""
    full = eval_full.kld_mean
    ref16 = build_reference(logits_fn_from_hf(model), tokens, CTX, CHUNKS, bos, topk=16, progress=False)
    res = evaluate(logits_fn_from_hf(perturbed), ref16, progress=False)
    assert res.kld_bound_mean < 0.97 * full
    assert res.kld_mean == pytest.approx(full, rel=0.01)
    bucket_only = build_reference(
        logits_fn_from_hf(model), tokens, CTX, CHUNKS, bos, topk=16, tail_samples=0, progress=False
    )
    res0 = evaluate(logits_fn_from_hf(perturbed), bucket_only, progress=False)
    assert res0.kld_mean == res0.kld_bound_mean
    assert res0.kld_bound_mean == pytest.approx(res.kld_bound_mean, rel=1e-12)


def test_kl_formulas_on_synthetic_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    n, v = 200, 50
    p_logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    q_logits = p_logits + 0.3 * torch.randn(n, v, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=g)
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    full = (lp.exp() * (lp - lq)).sum(-1)
    exact = model_rows(q_logits, targets, reference_rows(p_logits, targets, v, 4, torch.Generator()))
    # float32 storage of log-probs: per-position error ~1e-7 nats
    assert torch.allclose(exact.kld, full, rtol=0, atol=1e-6)
    for k in (1, 5, 20):
        rows = model_rows(
            q_logits, targets, reference_rows(p_logits, targets, k, 400, torch.Generator().manual_seed(k))
        )
        assert bool((rows.kld_bound <= full + 1e-7).all())  # lower bound at every position
        assert bool((rows.kld >= rows.kld_bound - 1e-12).all())  # the tail correction is non-negative
        assert float(rows.kld.mean()) == pytest.approx(float(full.mean()), rel=0.01)
        assert float(rows.kld_bound.mean()) < 0.99 * float(full.mean())
        assert torch.equal(rows.nll, -lq.gather(-1, targets[:, None])[:, 0])


def test_tail_sampler_draws_from_the_renormalized_tail() -> None:
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.04, 0.01], dtype=torch.float64)
    n, s = 4000, 4
    logp = probs.log().expand(n, -1).clone()
    ids = torch.tensor([[0, 1]]).expand(n, -1)
    draws = sample_tail(logp, ids, s, torch.Generator().manual_seed(3))
    assert draws.shape == (n, s)
    counts = torch.bincount(draws.flatten(), minlength=6).double() / (n * s)
    assert counts[:2].sum() == 0  # top-k ids are never drawn
    expected = probs[2:] / probs[2:].sum()
    assert torch.allclose(counts[2:], expected, atol=0.01)


def test_tail_sampler_never_draws_impossible_tokens() -> None:
    inf = float("inf")
    logp = torch.log_softmax(torch.tensor([[0.0, 1.0, -inf, 2.0, -inf]] * 50, dtype=torch.float64), -1)
    draws = sample_tail(logp, torch.tensor([[3]] * 50), 16, torch.Generator().manual_seed(0))
    assert set(draws.unique().tolist()) == {0, 1}
    # An empty tail (every remaining token impossible): any id will do, its weight p_rest is 0.
    rows = reference_rows(logp[:1].float(), torch.tensor([3]), 3, 8, torch.Generator())
    assert float(rows.tail[0]) == 0.0
    assert torch.isfinite(rows.tail_logp).all()
    res = model_rows(logp[:1] + 0.1, torch.tensor([3]), rows)
    assert torch.isfinite(res.kld).all() and float(res.kld[0]) == pytest.approx(0.0, abs=1e-6)
    # k = V with masked logits: 0 * log(0/0) terms count as 0, not NaN.
    rows = reference_rows(logp[:1], torch.tensor([3]), 5, 0, torch.Generator())
    assert float(model_rows(logp[:1], torch.tensor([3]), rows).kld[0]) == 0.0


# ---------------------------------------------------------------------------------------------- the cache


def test_cache_round_trip(ref_default: Reference, perturbed: torch.nn.Module, tmp_path: Path) -> None:
    path = save_reference(ref_default, tmp_path / "ref.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]  # no temp file left behind
    loaded = load_reference(path)
    assert loaded.meta == ref_default.meta
    assert torch.equal(loaded.tokens, ref_default.tokens)
    for name in ("nll", "argmax", "topk_ids", "topk_logp", "tail", "tail_ids", "tail_logp"):
        assert torch.equal(getattr(loaded.rows, name), getattr(ref_default.rows, name)), name
    fn = logits_fn_from_hf(perturbed)
    a = evaluate(fn, ref_default, progress=False)
    b = evaluate(fn, loaded, progress=False)
    assert a == b
    assert a.kld_mean > 0
    # Compressed: well under the uncompressed 1.25 KB per position.
    assert path.stat().st_size < 1300 * ref_default.n_scored


def test_cache_mismatch_raises(
    ref_default,
    model: torch.nn.Module,
    tokens: torch.Tensor,
    tmp_path: Path,
) -> None:
    path = save_reference(ref_default, tmp_path / "ref.npz")
    ref = load_reference(path)
    fn = logits_fn_from_hf(model)
    with pytest.raises(InputFileError, match="different tokens"):
        evaluate(fn, ref, tokens=tokens[1:], max_chunks=CHUNKS, progress=False)
    with pytest.raises(InputFileError, match="ctx"):
        evaluate(fn, ref, tokens=tokens, ctx=256, progress=False)
    with pytest.raises(InputFileError, match="chunks"):
        evaluate(fn, ref, tokens=tokens, max_chunks=CHUNKS - 1, progress=False)
    with pytest.raises(InputFileError, match="does not match the text"):
        evaluate(fn, ref, tokens=tokens[: CTX - 1], progress=False)

    def wider(ids: torch.Tensor) -> torch.Tensor:
        out = fn(ids)
        return torch.cat([out, out[..., :1]], dim=-1)

    with pytest.raises(InputFileError, match="vocabulary of 512"):
        evaluate(wider, ref, progress=False)
    evaluate(fn, ref, tokens=tokens, ctx=CTX, max_chunks=CHUNKS, progress=False)  # the matching case passes


def test_bad_cache_files_raise(ref_default: Reference, tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="does not exist"):
        load_reference(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(InputFileError, match="not a valid lowbit reference cache"):
        load_reference(garbage)
    # A consistent-looking file whose arrays disagree with its metadata.
    path = save_reference(ref_default, tmp_path / "ref.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["nll"] = arrays["nll"][:-1]
    np.savez_compressed(tmp_path / "short.npz", **arrays)
    with pytest.raises(InputFileError, match="nll has shape"):
        load_reference(tmp_path / "short.npz")
    arrays = {k: v for k, v in arrays.items() if k != "tail_ids"}
    np.savez_compressed(tmp_path / "old.npz", **arrays)
    with pytest.raises(InputFileError, match="missing tail_ids"):
        load_reference(tmp_path / "old.npz")


def test_load_or_build_caches(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    bos: int | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0
    inner = logits_fn_from_hf(model)

    def counting(ids: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return inner(ids)

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache" / "refs"

    def build() -> Reference:
        return load_or_build_reference(
            counting, tokens, CTX, 2, bos, model_fingerprint="stories260K-test", topk=64, progress=False
        )

    a = build()
    assert calls == 2
    files = list((tmp_path / "cache" / "refs").glob("ref-*.npz"))
    assert len(files) == 1
    b = build()
    assert calls == 2  # served from the cache
    assert b.meta == a.meta and torch.equal(a.rows.topk_logp, b.rows.topk_logp)
    # Every setting is part of the key.
    base = reference_cache_key("fp", tokens, CTX, 2, 64, bos)
    assert reference_cache_key("fp", tokens, CTX, 2, 64, bos) == base
    assert reference_cache_key("fp2", tokens, CTX, 2, 64, bos) != base
    assert reference_cache_key("fp", tokens, 256, 2, 64, bos) != base
    assert reference_cache_key("fp", tokens, CTX, 3, 64, bos) != base
    assert reference_cache_key("fp", tokens, CTX, 2, 128, bos) != base
    assert reference_cache_key("fp", tokens, CTX, 2, 64, None) != base
    assert reference_cache_key("fp", tokens, CTX, 2, 64, bos, tail_samples=8) != base
    assert reference_cache_key("fp", tokens.flip(0), CTX, 2, 64, bos) != base
    # Tokens beyond the windows do not change the key (the cache only depends on what is evaluated).
    assert reference_cache_key("fp", tokens[: 2 * CTX + 5], CTX, 2, 64, bos) == base


def test_result_json(ref_default: Reference, perturbed: torch.nn.Module) -> None:
    res = evaluate(logits_fn_from_hf(perturbed), ref_default, progress=False)
    d = json.loads(json.dumps(res.to_json_dict()))
    for key in (
        "ppl",
        "ref_ppl",
        "delta_ppl",
        "kld_mean",
        "kld_p99",
        "kld_p999",
        "kld_median",
        "top1",
        "tokens",
        "chunks",
        "ctx",
        "ppl_stderr",
    ):
        assert key in d
    assert EvalResult(**d) == res


# -------------------------------------------------------------------------------- llama.cpp as the oracle


def _llama_cpp_ids(tokenize: Path, gguf: Path, text_file: Path) -> list[int]:
    out = subprocess.run(
        [str(tokenize), "-m", str(gguf), "-f", str(text_file), "--ids", "--log-disable"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    ids = ast.literal_eval(out.strip().splitlines()[-1])
    assert isinstance(ids, list)
    return [int(i) for i in ids]


@pytest.mark.shared
def test_ppl_matches_llama_perplexity(
    shared_dir: Path,
    text: str,
    model: torch.nn.Module,
    tokenizer: Any,
    tmp_path: Path,
) -> None:
    bin_dir = shared_dir / "tools/llama.cpp/bin"
    gguf = shared_dir / "data/golden/stories260K-f32.gguf"
    text_file = tmp_path / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text_file)]
    cmd += ["-c", str(CTX), "--chunks", str(CHUNKS), "-t", "2"]
    # llama.cpp's asynchronous logger sometimes loses its last lines at exit (measured: ~1 run in 6
    # prints neither the last chunk nor the "Final estimate" line, with rc 0): retry a few times.
    log, m = "", None
    for _ in range(6):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-2000:]
        m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
        if m:
            break
    assert m, f"llama-perplexity printed no final estimate in 6 runs: {log[-2000:]}"
    ppl_cpp, err_cpp = float(m.group(1)), float(m.group(2))
    # Feed lowbit the very token ids llama.cpp evaluates, so only the math is compared.
    ids = torch.tensor(_llama_cpp_ids(bin_dir / "llama-tokenize", gguf, text_file), dtype=torch.long)
    bos = tokenizer_bos_id(tokenizer)
    assert bos is not None and int(ids[0]) == bos
    res = compute_perplexity(logits_fn_from_hf(model), ids, CTX, CHUNKS, bos, progress=False)
    assert res.tokens == CHUNKS * (CTX - 1 - CTX // 2)
    assert res.ppl == pytest.approx(ppl_cpp, rel=1e-3)
    assert res.ppl_stderr == pytest.approx(err_cpp, rel=1e-2)


@pytest.mark.shared
def test_tokenization_matches_llama_tokenize(
    shared_dir: Path, text: str, tokenizer: Any, tmp_path: Path
) -> None:
    text_file = tmp_path / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    ids = _llama_cpp_ids(
        shared_dir / "tools/llama.cpp/bin/llama-tokenize",
        shared_dir / "data/golden/stories260K-f32.gguf",
        text_file,
    )
    assert encode_text(tokenizer, text).tolist() == ids
