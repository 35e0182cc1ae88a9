"""The embedded default model: a small Llama-shaped set of weights the project builds itself, deterministically.

No download: the weights come from a fixed seed, bf16-rounded like a real checkpoint, with the heavy-tailed rows and
outlier columns real LLM weights have (they are what makes block absmax formats interesting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TinyLlamaShape", "build_tiny_llama", "linear_weight_names"]


@dataclass(frozen=True)
class TinyLlamaShape:
    vocab: int = 1024
    hidden: int = 256
    intermediate: int = 768  # a multiple of 256, so every GGUF k-quant applies to ffn_down's rows too
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _weight(out_features: int, in_features: int, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(out_features, in_features, generator=g) * (in_features**-0.5)
    tails = torch.distributions.StudentT(torch.tensor(3.0)).sample((out_features, in_features)) * 0.1
    w = w + tails * (in_features**-0.5)
    outlier_cols = torch.randperm(in_features, generator=g)[: max(1, in_features // 64)]
    w[:, outlier_cols] *= 6.0
    return w.bfloat16()


def build_tiny_llama(shape: TinyLlamaShape | None = None, seed: int = 20261123) -> dict[str, torch.Tensor]:
    """A state dict with Hugging Face Llama tensor names, bf16 weights, float32 norms."""
    s = shape or TinyLlamaShape()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # StudentT samples from the global generator
    kv = s.kv_heads * s.head_dim
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": _weight(s.vocab, s.hidden, g)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = _weight(s.hidden, s.hidden, g)
        sd[p + "self_attn.k_proj.weight"] = _weight(kv, s.hidden, g)
        sd[p + "self_attn.v_proj.weight"] = _weight(kv, s.hidden, g)
        sd[p + "self_attn.o_proj.weight"] = _weight(s.hidden, s.hidden, g)
        sd[p + "mlp.gate_proj.weight"] = _weight(s.intermediate, s.hidden, g)
        sd[p + "mlp.up_proj.weight"] = _weight(s.intermediate, s.hidden, g)
        sd[p + "mlp.down_proj.weight"] = _weight(s.hidden, s.intermediate, g)
        sd[p + "input_layernorm.weight"] = torch.ones(s.hidden)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(s.hidden)
    sd["model.norm.weight"] = torch.ones(s.hidden)
    sd["lm_head.weight"] = _weight(s.vocab, s.hidden, g)
    return sd


def linear_weight_names(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The weights quantizers convert: 2-D projections inside the layers (embeddings, norms and lm_head stay)."""
    return [n for n, t in state_dict.items() if t.dim() == 2 and ".layers." in n]
