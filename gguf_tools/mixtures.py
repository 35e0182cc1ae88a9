"""llama-quantize's per-tensor type choice for each file type ("mixture"), as data plus one rule function.

Restated from src/llama-quant.cpp of llama.cpp as vendored by llama-cpp-python 0.3.36 (read to learn; no code copied),
for the file types qcbguard-gguf writes. How llama-quantize decides a tensor's type:

1. Only tensors of two or more dimensions (ggml_n_dims, trailing 1s dropped) whose name ends in "weight" are
   quantized, minus norms, MoE router and routing tables, small special tensors (NAME_KEEP_PARTS) and BERT's
   position_embd / token_types. Everything else keeps its type.
2. The mixture's default type, then the category rules below. Categories come from the tensor name (output.weight,
   token_embd, attn_qkv / attn_kv_b / attn_v, attn_k, attn_q, attn_output, ffn_up, ffn_gate, ffn_down). attn_qkv and
   attn_kv_b count as attn_v. The output tensor, and token_embd when there is no output.weight (tied embeddings), take
   Q6_K (Q8_0 when their row length does not fill a default-type block, on Falcon, or when the default is Q8_0).
3. use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2: the layers Q4_K_M and Q5_K_M give Q6_K in
   attn_v and ffn_down. i counts the attn_v-like tensors seen so far (over the sorted tensor order), and for
   ffn_down the ffn_down tensors seen so far, against n = the attn_v-like tensor count and block_count; MoE models
   (expert_count > 1) read ffn_down's layer from its name instead.
4. Row-length fallback: when ne0 is not a multiple of the chosen type's block, Q2_K and Q3_K -> Q4_0, Q4_K -> Q5_0,
   Q5_K -> Q5_1, Q6_K -> Q8_0; a 32-block type stays; then, if ne0 still does not divide, F16.

A tensor is rewritten only when its chosen type differs from its type in the input; otherwise its bytes are copied.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qcbguard_kernels.errors import QcbguardError

from .constants import GGML_TYPES_BY_NAME, GgmlType
from .reader import ggml_n_dims

__all__ = ["MIXTURES", "Mixture", "ModelInfo", "TensorPlan", "category", "mixture", "plan_types", "use_more_bits"]


@dataclass(frozen=True)
class Mixture:
    """A llama-quantize file type: its name, the general.file_type value it writes and its default tensor type."""

    name: str
    file_type: int
    default: str


#: llama_ftype values (include/llama.h) and llama_ftype_get_default_type, for the types qcbguard-gguf writes.
MIXTURES: dict[str, Mixture] = {
    m.name: m
    for m in (
        Mixture("Q4_0", 2, "Q4_0"),
        Mixture("Q4_1", 3, "Q4_1"),
        Mixture("Q8_0", 7, "Q8_0"),
        Mixture("Q5_0", 8, "Q5_0"),
        Mixture("Q5_1", 9, "Q5_1"),
        Mixture("Q2_K", 10, "Q2_K"),
        Mixture("Q3_K_S", 11, "Q3_K"),
        Mixture("Q3_K_M", 12, "Q3_K"),
        Mixture("Q3_K_L", 13, "Q3_K"),
        Mixture("Q4_K_S", 14, "Q4_K"),
        Mixture("Q4_K_M", 15, "Q4_K"),
        Mixture("Q5_K_S", 16, "Q5_K"),
        Mixture("Q5_K_M", 17, "Q5_K"),
        Mixture("Q6_K", 18, "Q6_K"),
    )
}
#: llama-quantize's command-line aliases
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

#: file types llama-quantize has and qcbguard-gguf refuses, with the reason
UNSUPPORTED = {
    "Q2_K_S": "its Q2_K tensors need an importance matrix",
    "F16": "not a quantized type (nothing to harden); use llama-quantize",
    "BF16": "not a quantized type (nothing to harden); use llama-quantize",
    "F32": "not a quantized type (nothing to harden); use llama-quantize",
    "COPY": "not a quantized type (nothing to harden); use llama-quantize",
}


def mixture(name: str) -> Mixture:
    """The mixture called `name` (llama-quantize's spelling, case-insensitive, aliases accepted)."""
    key = name.upper()
    key = ALIASES.get(key, key)
    if key in MIXTURES:
        return MIXTURES[key]
    if key in UNSUPPORTED:
        raise QcbguardError(f"output type {name!r} is not supported: {UNSUPPORTED[key]}")
    known = ", ".join([*MIXTURES, *ALIASES])
    raise QcbguardError(f"unknown output type {name!r}; supported: {known} (IQ*, TQ*, MXFP4 and Q1_0/Q2_0 are not)")


@dataclass(frozen=True)
class ModelInfo:
    """The hyper-parameters the rules read (from `<arch>.*` metadata, as llama.cpp's loader fills its hparams)."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B for the Llama architecture: 80 layers with grouped-query attention."""
        return self.arch == "llama" and self.n_layer == 80 and self.n_head != self.n_head_kv


#: name fragments whose tensors are never quantized (tensor_allows_quantization)
NAME_KEEP_PARTS = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    *(
        f"time_mix_{part}.weight"
        for part in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2", "decay_w1")
    ),
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
NAME_KEEP_EXACT = ("position_embd.weight", "token_types.weight")
#: architectures with extra rules we do not restate: refused rather than quantized differently
UNSUPPORTED_ARCHS = ("glm5-next",)

# Category by name, first match wins (tensor_get_category).
_CATEGORY_RULES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("output", lambda n: n == "output.weight"),
    ("token_embd", lambda n: n in ("token_embd.weight", "per_layer_token_embd.weight")),
    ("attn_v", lambda n: "attn_qkv.weight" in n or "attn_kv_b.weight" in n or "attn_v.weight" in n),
    ("attn_k", lambda n: "attn_k.weight" in n),
    ("attn_q", lambda n: "attn_q.weight" in n),
    ("attn_output", lambda n: "attn_output.weight" in n),
    ("ffn_up", lambda n: "ffn_up" in n),
    ("ffn_gate", lambda n: "ffn_gate" in n),
    ("ffn_down", lambda n: "ffn_down" in n),
)


def category(name: str) -> str:
    for cat, match in _CATEGORY_RULES:
        if match(name):
            return cat
    return "other"


def use_more_bits(i: int, n: int) -> bool:
    """The layers that get more bits: the first and last eighth, and every third layer in between (C integer math)."""
    return i < n // 8 or i >= 7 * n // 8 or _c_mod(i - n // 8, 3) == 2


def _c_mod(a: int, b: int) -> int:
    """C's % (truncates toward zero), which differs from Python's for negative a."""
    r = abs(a) % b
    return -r if a < 0 else r


@dataclass(frozen=True)
class _State:
    mix: str
    i: int  # the running index of this category (attn_v-like, ffn_down)
    n: int  # the count it runs against
    model: ModelInfo

    @property
    def falcon(self) -> bool:
        return self.model.arch == "falcon"


Rule = Callable[[_State], "str | None"]

# attn_v-like tensors, per mixture: the type, or None to keep the default.
ATTN_V_RULES: dict[str, Rule] = {
    "Q2_K": lambda s: "Q4_K" if s.model.n_gqa >= 4 else "Q3_K",
    "Q3_K_M": lambda s: "Q5_K" if s.i < 2 else "Q4_K",
    "Q3_K_L": lambda s: "Q5_K",
    "Q4_K_M": lambda s: "Q6_K" if use_more_bits(s.i, s.n) else None,
    "Q5_K_M": lambda s: "Q6_K" if use_more_bits(s.i, s.n) else None,
    "Q4_K_S": lambda s: "Q5_K" if s.i < 4 else None,
}

FFN_DOWN_RULES: dict[str, Rule] = {
    "Q2_K": lambda s: "Q3_K",
    "Q3_K_M": lambda s: "Q5_K" if s.i < s.n // 16 else "Q4_K" if not s.falcon or use_more_bits(s.i, s.n) else "Q3_K",
    "Q3_K_L": lambda s: "Q4_K" if s.falcon else "Q5_K",
    "Q4_K_M": lambda s: (
        ("Q6_K" if s.i < s.n // 16 else "Q5_K" if use_more_bits(s.i, s.n) else "Q4_K")
        if s.falcon
        else ("Q6_K" if use_more_bits(s.i, s.n) else None)
    ),
    "Q5_K_M": lambda s: "Q6_K" if use_more_bits(s.i, s.n) else None,
    "Q4_K_S": lambda s: "Q5_K" if not s.falcon and s.i < s.n // 8 else None,
}

ATTN_OUTPUT_RULES: dict[str, Rule] = {
    "Q2_K": lambda s: None if s.falcon else "Q5_K" if s.model.n_expert == 8 else "Q3_K",
    "Q3_K_S": lambda s: "Q5_K" if s.model.n_expert == 8 and not s.falcon else None,
    "Q3_K_M": lambda s: None if s.falcon else "Q5_K" if s.model.n_expert == 8 else "Q4_K",
    "Q3_K_L": lambda s: "Q4_K" if s.falcon else None if s.model.n_expert == 8 else "Q5_K",
    "Q4_K_S": lambda s: "Q5_K" if s.model.n_expert == 8 and not s.falcon else None,
    "Q4_K_M": lambda s: "Q5_K" if s.model.n_expert == 8 and not s.falcon else None,
}

#: ne0 fallbacks for types whose block does not divide the row
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True)
class TensorPlan:
    name: str
    ne: tuple[int, ...]
    source: GgmlType
    target: GgmlType
    quantizable: bool
    #: the rule's type before the row-length fallback (equal to target when none applied)
    chosen: GgmlType

    @property
    def rewrite(self) -> bool:
        return self.source.id != self.target.id

    @property
    def fell_back(self) -> bool:
        return self.chosen.id != self.target.id


def allows_quantization(name: str, ne: tuple[int, ...]) -> bool:
    if ggml_n_dims(ne) < 2 or not name.endswith("weight"):
        return False
    if name in NAME_KEEP_EXACT:
        return False
    return not any(part in name for part in NAME_KEEP_PARTS)


_LAYER = re.compile(r"blk\.\s*([+-]?\d+)")


def layer_of(name: str) -> int:
    """sscanf(name, "blk.%d.") as the C code reads it: the number after "blk.", or -1."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def output_order(names: Sequence[str]) -> list[str]:
    """llama-quantize's tensor order: by layer number (non-layer tensors first), then by name (byte order)."""
    return sorted(names, key=lambda n: (layer_of(n), n.encode()))


def plan_types(
    tensors: Sequence[tuple[str, tuple[int, ...], GgmlType]], mix: Mixture, model: ModelInfo
) -> list[TensorPlan]:
    """The target type of every tensor, in the order given (which must be output_order)."""
    if model.arch in UNSUPPORTED_ARCHS:
        raise QcbguardError(f"architecture {model.arch!r} has llama-quantize rules qcbguard-gguf does not restate")
    names = [t[0] for t in tensors]
    tied = "output.weight" not in names
    n_attn_v = sum(category(n) == "attn_v" for n in names)
    i_attn_v = 0
    i_ffn_down = 0
    default = mix.default
    plans = []
    for name, ne, source in tensors:
        if not allows_quantization(name, ne):
            plans.append(TensorPlan(name, ne, source, source, False, source))
            continue
        cat = category(name)
        t = default
        if cat == "output" or (tied and cat == "token_embd"):
            if model.arch == "falcon" or ne[0] % GGML_TYPES_BY_NAME[default].block_size:
                t = "Q8_0"
            elif default != "Q8_0":
                t = "Q6_K"
        elif cat == "attn_v":
            t = ATTN_V_RULES.get(mix.name, _keep)(_State(mix.name, i_attn_v, n_attn_v, model)) or default
            if model.is_70b and t in ("Q3_K", "Q4_K"):
                t = "Q5_K"
            if model.n_expert == 8:
                t = "Q8_0"
            i_attn_v += 1
        elif cat == "attn_k" and model.n_expert == 8:
            t = "Q8_0"
        elif cat == "ffn_down":
            i_layer = layer_of(name) if model.n_expert > 1 else i_ffn_down
            if model.n_expert > 1 and not 0 <= i_layer < model.n_layer:
                raise QcbguardError(f"tensor {name!r}: layer {i_layer} outside [0, {model.n_layer})")
            t = FFN_DOWN_RULES.get(mix.name, _keep)(_State(mix.name, i_layer, model.n_layer, model)) or default
            i_ffn_down += 1
        elif cat == "attn_output":
            t = ATTN_OUTPUT_RULES.get(mix.name, _keep)(_State(mix.name, 0, 0, model)) or default
        chosen = GGML_TYPES_BY_NAME[t]
        target = _fallback(chosen, ne[0])
        plans.append(TensorPlan(name, ne, source, target, True, chosen))
    return plans


def _keep(_: _State) -> None:
    return None


def _fallback(chosen: GgmlType, ne0: int) -> GgmlType:
    if ne0 % chosen.block_size == 0:
        return chosen
    if chosen.block_size > 32:
        chosen = GGML_TYPES_BY_NAME[FALLBACK[chosen.name]]
    if ne0 % chosen.block_size:
        return GGML_TYPES_BY_NAME["F16"]
    return chosen
