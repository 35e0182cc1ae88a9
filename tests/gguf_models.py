"""Small full-precision GGUF models written with gguf-py (llama.cpp's own Python writer), for the GGUF tool's tests.

`write_llama` writes a loadable Llama-architecture model (random weights, a tiny SentencePiece-style vocabulary with
byte fallback) that llama.cpp can quantize and generate from. The shapes are chosen to reach llama-quantize's rules:
8 layers (use_more_bits picks layers 0, 2, 5, 6, 7), row lengths that are and are not multiples of 256 (the k-quant
fallbacks), grouped-query attention or not (Q2_K's attn_v rule), tied or separate output, and a mixture of experts
(`n_expert`: a router and 3-D ffn_{gate,up,down}_exps tensors, as llama.cpp's converter writes Mixtral; eight experts
reach llama-quantize's n_expert == 8 rules).

`write_odd_shapes` adds tensors llama-quantize treats specially (row length not a multiple of 32 -> F16, a [n, 1]
weight that ggml counts as 1-D, F32 and BF16 weights, norms) to a model llama.cpp can quantize but not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

__all__ = ["LlamaShape", "write_llama", "write_odd_shapes", "write_tensors"]


@dataclass(frozen=True)
class LlamaShape:
    n_embd: int = 256
    n_ff: int = 320
    n_head: int = 8
    n_head_kv: int = 2
    n_layer: int = 8
    n_vocab: int = 384
    tied: bool = False
    dtype: str = "F16"  # weight dtype: F16, F32 or BF16
    n_expert: int = 0  # experts per layer (0: a dense feed-forward block)
    n_expert_used: int = 2


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    words = ["▁the", "▁a", "▁of", "▁and", "▁to", "▁in", "▁is", "▁it", "▁hello", "▁world", "▁model", "▁quant"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"▁{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    pieces = list(dict.fromkeys(words + letters))  # token strings must be unique
    i = 0
    while len(tokens) < n_vocab:
        piece = pieces[i] if i < len(pieces) else f"▁w{i}"
        tokens.append(piece)
        types.append(1)
        i += 1
    scores = [0.0] * 3 + [-1000.0] * 256 + [-float(k) for k in range(len(tokens) - 259)]
    return tokens[:n_vocab], scores[:n_vocab], types[:n_vocab]


def _weight(rng: np.random.Generator, rows: int, cols: int, scale: float) -> np.ndarray:
    w = rng.standard_normal((rows, cols), dtype=np.float32) * scale
    # a few heavy-tailed weights, as real checkpoints have
    w[rng.random((rows, cols)) < 0.002] *= 8
    return w


def _add(writer: gguf.GGUFWriter, name: str, values: np.ndarray, dtype: str) -> None:
    if dtype == "F16":
        writer.add_tensor(name, values.astype(np.float16))
    elif dtype == "F32" or values.ndim == 1:
        writer.add_tensor(name, values.astype(np.float32))
    elif dtype == "BF16":
        bits = (values.astype(np.float32).view(np.uint32) + 0x8000) >> 16  # round half up: fine for test data
        writer.add_tensor(
            name,
            bits.astype(np.uint16).view(np.uint8),
            raw_dtype=gguf.GGMLQuantizationType.BF16,
        )
    else:
        raise ValueError(dtype)


def _begin(path: Path, s: LlamaShape) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("qcbguard tiny llama")
    w.add_context_length(256)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_rope_dimension_count(s.n_embd // s.n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type({"F32": 0, "F16": 1, "BF16": 32}[s.dtype])
    if s.n_expert:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
    tokens, scores, types = _vocab(s.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    return w


def _llama_tensors(w: gguf.GGUFWriter, s: LlamaShape, rng: np.random.Generator) -> None:
    head = s.n_embd // s.n_head
    _add(w, "token_embd.weight", _weight(rng, s.n_vocab, s.n_embd, 0.05), s.dtype)
    _add(w, "output_norm.weight", np.ones(s.n_embd, np.float32), "F32")
    if not s.tied:
        _add(w, "output.weight", _weight(rng, s.n_vocab, s.n_embd, 0.05), s.dtype)
    for i in range(s.n_layer):
        p = f"blk.{i}."
        _add(w, p + "attn_norm.weight", 1 + 0.1 * rng.standard_normal(s.n_embd).astype(np.float32), "F32")
        _add(w, p + "attn_q.weight", _weight(rng, s.n_head * head, s.n_embd, 0.05), s.dtype)
        _add(w, p + "attn_k.weight", _weight(rng, s.n_head_kv * head, s.n_embd, 0.05), s.dtype)
        _add(w, p + "attn_v.weight", _weight(rng, s.n_head_kv * head, s.n_embd, 0.05), s.dtype)
        _add(w, p + "attn_output.weight", _weight(rng, s.n_embd, s.n_head * head, 0.05), s.dtype)
        _add(w, p + "ffn_norm.weight", 1 + 0.1 * rng.standard_normal(s.n_embd).astype(np.float32), "F32")
        if s.n_expert:  # the router (never quantized) and each projection of all experts in one 3-D tensor
            _add(w, p + "ffn_gate_inp.weight", _weight(rng, s.n_expert, s.n_embd, 0.05), "F32")
            for name, rows, cols in (("gate", s.n_ff, s.n_embd), ("up", s.n_ff, s.n_embd), ("down", s.n_embd, s.n_ff)):
                experts = np.stack([_weight(rng, rows, cols, 0.05) for _ in range(s.n_expert)])
                _add(w, p + f"ffn_{name}_exps.weight", experts, s.dtype)
            continue
        _add(w, p + "ffn_gate.weight", _weight(rng, s.n_ff, s.n_embd, 0.05), s.dtype)
        _add(w, p + "ffn_up.weight", _weight(rng, s.n_ff, s.n_embd, 0.05), s.dtype)
        _add(w, p + "ffn_down.weight", _weight(rng, s.n_embd, s.n_ff, 0.05), s.dtype)


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_llama(path: str | Path, shape: LlamaShape = LlamaShape(), seed: int = 0) -> Path:
    path = Path(path)
    rng = np.random.default_rng(seed)
    w = _begin(path, shape)
    _llama_tensors(w, shape, rng)
    _finish(w)
    return path


def write_odd_shapes(path: str | Path, seed: int = 0) -> Path:
    """A Llama model plus tensors that hit llama-quantize's special cases (quantizable by llama.cpp, not runnable)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    s = LlamaShape(n_embd=256, n_ff=288, n_head=4, n_head_kv=4, n_layer=3, n_vocab=300, tied=True)
    w = _begin(path, s)
    _llama_tensors(w, s, rng)
    _add(w, "blk.0.odd_rows.weight", _weight(rng, 16, 40, 0.05), "F16")  # 40 % 32 != 0 -> F16
    _add(w, "blk.1.odd_rows.weight", _weight(rng, 16, 40, 0.05), "F32")  # F32 -> F16 conversion
    _add(w, "blk.1.column.weight", _weight(rng, 1, 64, 0.05), "F16")  # ne = [64, 1]: one dimension in ggml
    _add(w, "blk.2.wide.weight", _weight(rng, 8, 512, 0.05), "BF16")  # BF16 source
    _add(w, "blk.2.f32.weight", _weight(rng, 8, 96, 0.05), "F32")  # F32 source, 32-block row
    _add(w, "blk.10.late.weight", _weight(rng, 4, 256, 0.05), "F16")  # layer 10 sorts after layer 2
    _add(w, "blk.2.ffn_gate_inp.weight", _weight(rng, 4, 256, 0.05), "F16")  # router: never quantized
    _add(w, "rope_freqs", np.ones(32, np.float32), "F32")  # no "weight" suffix
    _finish(w)
    return path


def write_tensors(path: str | Path, tensors: dict[str, np.ndarray], n_layer: int = 1) -> Path:
    """A Llama-architecture file holding just these float32 tensors (llama.cpp quantizes it; it cannot run it)."""
    path = Path(path)
    n_embd = next(iter(tensors.values())).shape[-1]
    w = _begin(
        path, LlamaShape(n_embd=n_embd, n_ff=n_embd, n_head=4, n_head_kv=4, n_layer=n_layer, n_vocab=260, dtype="F32")
    )
    for name, values in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))
    _finish(w)
    return path
