"""``lowbit eval MODEL --ref REF --text TEXTFILE``: perplexity as llama.cpp computes it, KLD, top-1."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, KL-divergence and top-1 agreement of a model against its original",
        description="Perplexity over non-overlapping windows of --ctx tokens, scoring the second half of each "
        "(as llama-perplexity does), KL-divergence of the model's next-token distribution from the reference's, "
        "top-1 agreement. The reference's predictions are cached, so a sweep runs the reference once.",
    )
    p.add_argument(
        "model", help="model directory, lowbit output, compressed-tensors checkpoint or .gguf file"
    )
    p.add_argument("--ref", required=True, help="the unquantized original (directory or .gguf)")
    p.add_argument("--text", required=True, help="UTF-8 text file to evaluate on")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="at most this many windows (default: all)")
    p.add_argument(
        "--cache-dir", default=None, help="where reference logits are cached (default ~/.cache/lowbit)"
    )
    p.add_argument(
        "--float-inputs",
        action="store_true",
        help="a GGUF file: multiply its weights by float inputs instead of converting each matmul's input "
        "to the 8-bit (Q8_0/Q8_1/Q8_K) or 16-bit type llama.cpp's CPU backend uses for that weight type",
    )
    p.add_argument(
        "--task",
        default=None,
        help="JSON-lines task: multiple choice {prompt, choices, answer} or generation {prompt, answer}; adds "
        "task accuracy, the reference's, and the items whose answer changed (flips)",
    )
    p.add_argument(
        "--task-score",
        choices=("sum", "mean"),
        default="sum",
        help="multiple choice by the choice's log-likelihood (sum, lm-eval's acc; default) or its mean per "
        "token (mean: llama-perplexity --hellaswag's acc_norm)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lowbit.eval.run import (
        evaluate_model,
        inputs_label,
        prepare_reference,
        reference_task,
        result_dict,
        source_bits_per_weight,
        task_dict,
    )
    from lowbit.eval.tasks import load_task
    from lowbit.walk.sources import open_model

    progress = sys.stderr.isatty()
    task = load_task(args.task) if args.task else None
    source = open_model(args.model)
    setup = prepare_reference(args.ref, args.text, args.ctx, args.chunks, args.cache_dir, progress)
    result, answers = evaluate_model(
        setup,
        source,
        progress=progress,
        runtime_inputs=not args.float_inputs,
        task=task,
        task_score=args.task_score,
    )
    out = result_dict(result, source_bits_per_weight(source))
    out["inputs"] = inputs_label(source, runtime_inputs=not args.float_inputs)
    if task is not None and answers is not None:
        out.update(task_dict(answers, reference_task(setup, task, args.task_score), args.task_score))
    if args.json:
        print(json.dumps(out))
        return 0
    bpw = "n/a" if out["bpw"] is None else f"{out['bpw']:.3f}"
    if "task_accuracy" in out:
        print(
            f"task {args.task}: accuracy {100 * out['task_accuracy']:.1f}% (reference "
            f"{100 * out['ref_task_accuracy']:.1f}%), {out['task_flips']} of {out['task_items']} answers changed"
        )
    print(
        f"{args.model}: PPL {result.ppl:.4f} ± {result.ppl_stderr:.4f} (reference {result.ref_ppl:.4f}, "
        f"Δ {result.delta_ppl:+.4f}), KLD mean {result.kld_mean:.6f} p99 {result.kld_p99:.6f} "
        f"p99.9 {result.kld_p999:.6f}, top-1 {100 * result.top1:.2f}%, {result.tokens} tokens, bits/weight {bpw}, {out['inputs']}"
    )
    return 0
