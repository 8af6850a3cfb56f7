"""The metadata of a GGUF output: copied from a GGUF input (as llama-quantize does), or converted from a
Hugging Face directory's config and tokenizer (as llama.cpp's ``convert_hf_to_gguf.py`` does).

* GGUF input: every metadata entry of the input is copied as the bytes it is in the file (the
  tokenizer's arrays are never decoded); ``general.quantization_version`` (2) and ``general.file_type``
  (the mix's ftype) are then set again, which moves them to the end, as ggml's ``gguf_set_val_u32``
  does; the ``split.*`` keys are dropped; ``quantize.imatrix.*`` keys follow when an importance matrix
  is used.
* Hugging Face input (llama family): what the converter writes, key for key and in its order, with the
  tokenizer (sentencepiece ``tokenizer.model``, or ``tokenizer.json`` BPE) through gguf-py's ``Metadata``,
  ``SpecialVocab`` and ``LlamaHfVocab``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit.errors import InputFileError, UnsupportedArchitectureError
from lowbit.export.gguf_plan import ImatrixUse
from lowbit.export.gguf_stream import encode_kv
from lowbit.walk.gguf_inputs import TensorInput
from lowbit.walk.gguf_read import T_STRING, T_UINT32, GGUFFile

if TYPE_CHECKING:
    from lowbit.walk.sources import ModelSource

log = logging.getLogger(__name__)

QUANTIZATION_VERSION = 2
"""ggml's ``GGML_QNT_VERSION``: what ``general.quantization_version`` says in every file llama.cpp writes."""

_SPLIT_KEYS = frozenset({"split.no", "split.count", "split.tensors.count"})


def check_hf_architecture(source: ModelSource) -> None:
    arch = source.arch
    if arch.gguf_arch != "llama" or arch.experts_key is not None:
        raise UnsupportedArchitectureError(
            f"lowbit converts Hugging Face checkpoints to GGUF for dense llama-family models only, not "
            f"{arch.name}; convert it with llama.cpp's convert_hf_to_gguf.py and give lowbit the .gguf"
        )


@dataclass(frozen=True)
class _KV:
    key: str
    value: Any
    vtype: int  # GGUF value type (gguf.GGUFValueType)
    sub_type: int | None = None

    def encode(self) -> bytes:
        return encode_kv(self.key, self.value, self.vtype, self.sub_type)


def gguf_metadata(g: GGUFFile, file_type: int, imatrix: ImatrixUse | None) -> list[bytes | memoryview]:
    """The input's entries as stored (raw bytes, the tokenizer's arrays included), then the keys
    llama-quantize sets, as its ``gguf_set_val_*`` does (remove, then append)."""
    kvs: dict[str, bytes | memoryview] = {
        key: g.raw(e) for key, e in g.entries.items() if key not in _SPLIT_KEYS
    }

    def set_val(kv: _KV) -> None:
        kvs.pop(kv.key, None)
        kvs[kv.key] = kv.encode()

    set_val(_KV("general.quantization_version", QUANTIZATION_VERSION, T_UINT32))
    set_val(_KV("general.file_type", file_type, T_UINT32))
    for kv in _imatrix_kvs(imatrix):
        set_val(kv)
    return list(kvs.values())


def _imatrix_kvs(imatrix: ImatrixUse | None) -> list[_KV]:
    """The keys llama-quantize adds for an importance matrix (strings cut at 127 bytes, as it does)."""
    if imatrix is None:
        return []
    kvs = []
    if imatrix.file is not None:
        kvs.append(_KV("quantize.imatrix.file", imatrix.file.encode()[:127], T_STRING))
    if imatrix.dataset is not None:
        kvs.append(_KV("quantize.imatrix.dataset", imatrix.dataset.encode()[:127], T_STRING))
    kvs.append(_KV("quantize.imatrix.entries_count", imatrix.n_entries, T_UINT32))
    if imatrix.chunk_count > 0:
        kvs.append(_KV("quantize.imatrix.chunks_count", imatrix.chunk_count, T_UINT32))
    return kvs


def hf_metadata(
    source: ModelSource, file_type: int, items: Sequence[TensorInput], imatrix: ImatrixUse | None
) -> list[bytes | memoryview]:
    """convert_hf_to_gguf's metadata for a llama-family checkpoint, key for key and in its order."""
    import gguf

    cfg = source.config
    arch = source.arch.gguf_arch
    with _quiet_gguf_writer():
        w = gguf.GGUFWriter(path=None, arch=arch)  # used only to collect typed values in order
    total = sum(math.prod(it.shape) for it in items)
    meta = gguf.Metadata.load(None, source.path, None, total)
    if meta.name is None:
        meta.name = source.path.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, total, 0, 0)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)

    def first(*keys: str) -> Any:
        return next((cfg[k] for k in keys if cfg.get(k) is not None), None)

    rope = dict(cfg.get("rope_parameters") or {})
    legacy_scaling = cfg.get("rope_scaling") or {}
    w.add_block_count(int(first("num_hidden_layers", "n_layers", "n_layer", "num_layers")))
    if (ctx := first("max_position_embeddings", "n_ctx", "n_positions", "max_length")) is not None:
        w.add_context_length(int(ctx))
    w.add_embedding_length(int(cfg["hidden_size"]))
    if (ff := first("intermediate_size", "n_inner")) is not None:
        w.add_feed_forward_length(int(ff))
    n_head = int(cfg["num_attention_heads"])
    w.add_head_count(n_head)
    if (n_kv := cfg.get("num_key_value_heads")) is not None:
        w.add_head_count_kv(int(n_kv))
    if (theta := rope.get("rope_theta", cfg.get("rope_theta"))) is not None:
        w.add_rope_freq_base(float(theta))
    if (eps := cfg.get("rms_norm_eps")) is not None:
        w.add_layer_norm_rms_eps(float(eps))
    if (head_dim := cfg.get("head_dim")) is not None:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    w.add_file_type(file_type)
    w.add_vocab_size(int(cfg["vocab_size"]))
    w.add_rope_dimension_count(int(head_dim) if head_dim is not None else int(cfg["hidden_size"]) // n_head)
    rope_type = rope.get("rope_type") or legacy_scaling.get("rope_type") or legacy_scaling.get("type")
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope.get("factor", legacy_scaling.get("factor", 1.0))))
    elif rope_type not in (None, "default"):
        raise UnsupportedArchitectureError(
            f"{source.path}: rope scaling {rope_type!r} is not converted by lowbit yet; convert the model "
            "with llama.cpp's convert_hf_to_gguf.py and give lowbit the .gguf"
        )
    w.add_quantization_version(QUANTIZATION_VERSION)
    _add_tokenizer(w, source.path, cfg)
    kvs = [
        _KV(k, v.value, int(v.type), None if v.sub_type is None else int(v.sub_type))
        for k, v in w.kv_data[0].items()
    ]
    return [kv.encode() for kv in kvs + _imatrix_kvs(imatrix)]


# ------------------------------------------------------------------------------------- tokenizer
def _looks_special(token: str) -> bool:
    """Added tokens that are control tokens by their look even when not flagged special."""
    return bool(re.fullmatch(r"<\|[^|<>]*\|>|</?s>|<unk>|<pad>|<mask>|<(start|end)_of_turn>", token))


def _add_tokenizer(w: Any, model_dir: Path, cfg: Mapping[str, Any]) -> None:
    """tokenizer.ggml.* keys: sentencepiece ``tokenizer.model`` -> ``llama``; ``tokenizer.json`` BPE with
    byte fall-back -> ``llama`` (gguf-py's LlamaHfVocab); byte-level BPE -> ``gpt2`` with merges."""
    import gguf

    vocab_size = cfg.get("vocab_size")
    tj_path = model_dir / "tokenizer.json"
    load_merges = False
    if (model_dir / "tokenizer.model").is_file():
        tokens, scores, types = _sentencepiece_vocab(model_dir, vocab_size)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
    elif tj_path.is_file():
        try:
            tj = json.loads(tj_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise InputFileError(f"{tj_path} is not valid JSON ({e})") from e
        model = tj.get("model", {})
        if model.get("type") == "BPE" and model.get("byte_fallback", False):
            hf = gguf.LlamaHfVocab(model_dir)
            tokens, scores, types = [], [], []
            for text, score, toktype in hf.all_tokens():
                tokens.append(text)
                scores.append(score)
                types.append(int(toktype))
            w.add_tokenizer_model("llama")
            w.add_tokenizer_pre("default")
        elif model.get("type") == "BPE":
            tokens, types = _bpe_vocab(tj, vocab_size)
            scores = []
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(_bpe_pre_name(tj))
            load_merges = True
        else:
            raise InputFileError(
                f"{tj_path}: tokenizer model {model.get('type')!r} is not converted by lowbit yet "
                "(sentencepiece and BPE are); convert with llama.cpp's convert_hf_to_gguf.py"
            )
    else:
        raise InputFileError(
            f"{model_dir} has neither tokenizer.model nor tokenizer.json; a GGUF file needs the tokenizer"
        )
    w.add_token_list(tokens)
    if scores:
        w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=load_merges, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def _sentencepiece_vocab(
    model_dir: Path, vocab_size: int | None
) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and ggml token types of a sentencepiece model, padded to the config's vocab size,
    with ``added_tokens.json`` and ``tokenizer_config.json``'s ``added_tokens_decoder`` applied."""
    from gguf import TokenType
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    n = int(vocab_size or sp.vocab_size())
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [int(TokenType.UNUSED)] * n
    for i in range(min(n, sp.vocab_size())):
        kind = TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = TokenType.UNUSED
        elif sp.IsByte(i):
            kind = TokenType.BYTE
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = float(sp.GetScore(i))
        types[i] = int(kind)
    if sp.vocab_size() > n:
        log.warning(
            "tokenizer.model has %d pieces, config.json vocab_size %d: extra pieces dropped",
            sp.vocab_size(),
            n,
        )
    added = model_dir / "added_tokens.json"
    if added.is_file():
        for text, idx in json.loads(added.read_text(encoding="utf-8")).items():
            if 0 <= int(idx) < n:
                tokens[int(idx)] = str(text).encode("utf-8")
                scores[int(idx)] = -1000.0
                types[int(idx)] = int(TokenType.USER_DEFINED)
    tc = model_dir / "tokenizer_config.json"
    if tc.is_file():
        decoder = json.loads(tc.read_text(encoding="utf-8")).get("added_tokens_decoder", {}) or {}
        for idx_s, data in decoder.items():
            idx = int(idx_s)
            if not 0 <= idx < n:
                continue
            text = str(data["content"])
            if data.get("special") or _looks_special(text):
                types[idx] = int(TokenType.CONTROL)
            else:
                text = text.replace(" ", "\u2581")
                types[idx] = int(TokenType.USER_DEFINED)
            tokens[idx] = text.encode("utf-8")
            scores[idx] = -1000.0
    return tokens, scores, types


def _bpe_vocab(tj: Mapping[str, Any], vocab_size: int | None) -> tuple[list[bytes], list[int]]:
    """Tokens and types of a byte-level BPE ``tokenizer.json`` (ids without a token become [PADn])."""
    from gguf import TokenType

    vocab: Mapping[str, int] = tj["model"]["vocab"]
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    by_id = {int(i): t for t, i in vocab.items()}
    n = int(vocab_size or (max([*by_id, *added]) + 1))
    tokens: list[bytes] = []
    types: list[int] = []
    for i in range(n):
        if i in added:
            text = str(added[i]["content"])
            special = bool(added[i].get("special")) or _looks_special(text)
            tokens.append(text.encode("utf-8"))
            types.append(int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
        elif i in by_id:
            tokens.append(by_id[i].encode("utf-8"))
            types.append(int(TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]".encode())
            types.append(int(TokenType.UNUSED))
    return tokens, types


# Pre-tokenizers recognised by their structure in tokenizer.json -> llama.cpp's pre-tokenizer name.
# (llama.cpp's converter identifies them by hashing the tokenization of a test text instead.)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _bpe_pre_name(tj: Mapping[str, Any]) -> str:
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"  # = "starcoder" in llama.cpp: digits one by one, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == _QWEN2_SPLIT:
            return "qwen2"
    log.warning(
        "the BPE pre-tokenizer of this tokenizer.json is not one lowbit recognises; writing 'default' "
        "(llama.cpp may split text differently from transformers): convert with convert_hf_to_gguf.py "
        "for an exact tokenizer"
    )
    return "default"


@contextlib.contextmanager
def _quiet_gguf_writer() -> Iterator[None]:
    """gguf-py's writer logs its plan at INFO (endianness, temp file names); keep that out of lowbit's log."""
    logger = logging.getLogger("gguf.gguf_writer")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
