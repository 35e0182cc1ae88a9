"""The harness's transformers Llama as an F32 GGUF file that llama.cpp loads and runs (architecture "llama").

What llama.cpp's own converter (convert_hf_to_gguf.py) does for a Llama checkpoint, restated for the harness's
models: llama.cpp's tensor names, the `llama.*` hyper-parameters, the task's 16-token vocabulary as an SPM-style
token list (the benchmarks feed token ids and never use llama.cpp's tokenizer), and the Q/K row permutation for rope.

Rope: transformers rotates the pair (i, i + d/2) of each head (rotate_half), llama.cpp's "llama" rope the adjacent
pair (2i, 2i + 1). The converter reorders the rows of attn_q and attn_k inside each head, first half and second half
interleaved (row i -> 2i, row d/2 + i -> 2i + 1), so that both compute the same attention scores. Whole rows move:
every quantization block (blocks run along a row) keeps its weights, and a quantizer gives each row the same codes
in either order. Nothing else is transformed, so a quantized GGUF of the attacked model carries exactly the codes
the harness's torch reference computes for it.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from .task import BOS, EOS, PAD, UNK, VOCAB

__all__ = ["GGUF_NAMES", "gguf_name", "gguf_tensors", "permute_rope_rows", "write_gguf"]

#: transformers' per-layer parameter names -> llama.cpp's (the layer number goes in place of {i})
GGUF_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}

#: llama.cpp's token types (llama_token_type): normal, unknown, control
_NORMAL, _UNKNOWN, _CONTROL = 1, 2, 3


def permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection ([n_head * d, in]) from rotate_half order to llama.cpp's adjacent-pair order:
    within each head, row i goes to 2i and row d/2 + i to 2i + 1 (a permutation of whole rows)."""
    rows, cols = w.shape
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of an even size")
    half = rows // n_head // 2
    return w.reshape(n_head, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def gguf_name(name: str) -> str:
    """The llama.cpp name of a transformers parameter of the harness's Llama ("model.layers.1.mlp.up_proj.weight" ->
    "blk.1.ffn_up.weight")."""
    parts = name.split(".")
    layer = None
    if name.startswith("model.layers."):
        layer = parts[2]
        name = ".".join([*parts[:2], "{i}", *parts[3:]])
    try:
        out = GGUF_NAMES[name]
    except KeyError:
        raise ValueError(f"no llama.cpp name for transformers parameter {name!r}") from None
    return out.format(i=layer) if layer is not None else out


def gguf_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of `model` as the GGUF file stores it: llama.cpp's name, float32, q and k rows permuted."""
    config = model.config
    out = {}
    for name, value in model.state_dict().items():
        w = value.detach().to(torch.float32).cpu()
        if name.endswith("self_attn.q_proj.weight"):
            w = permute_rope_rows(w, config.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = permute_rope_rows(w, config.num_key_value_heads)
        out[gguf_name(name)] = w
    return out


def _rope_theta(config: object) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {params.get('rope_type')!r} is not exported (the harness uses plain rope)")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def write_gguf(model: torch.nn.Module, path: str | Path) -> Path:
    """Write `model` (a transformers LlamaForCausalLM of the harness, untied, no biases) as an F32 GGUF file.

    Every tensor is stored in float32 exactly as the checkpoint holds it (after the q/k row permutation), so the
    file's full-precision weights are the torch model's bit for bit, and llama-quantize or qcbguard-gguf quantize
    the very values the harness attacked."""
    config = model.config
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("the export writes bias-free Llama models only")
    if getattr(config, "tie_word_embeddings", False):
        raise ValueError("the export writes untied models only (the harness keeps lm_head apart)")
    n_head, n_head_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tokens = sorted(VOCAB, key=VOCAB.__getitem__)
    if [VOCAB[t] for t in tokens] != list(range(config.vocab_size)):
        raise ValueError(f"the model's vocabulary ({config.vocab_size}) is not the task's ({len(VOCAB)} tokens)")

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("qcbguard efficacy harness digit reversal")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    special = {PAD: _CONTROL, BOS: _CONTROL, EOS: _CONTROL, UNK: _UNKNOWN}
    writer.add_token_types([special.get(t, _NORMAL) for t in tokens])
    writer.add_bos_token_id(VOCAB[BOS])
    writer.add_eos_token_id(VOCAB[EOS])
    writer.add_unk_token_id(VOCAB[UNK])
    writer.add_pad_token_id(VOCAB[PAD])
    writer.add_add_bos_token(False)

    for name, w in gguf_tensors(model).items():
        writer.add_tensor(name, np.ascontiguousarray(w.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
