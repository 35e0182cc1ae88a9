"""Calibration Hessians for calibrated hardening (qcbguard_kernels.hardening.harden_calibrated).

`qcbguard calibrate MODEL_DIR --text FILE --out hessians.safetensors` runs a Hugging Face checkpoint in full precision
over the defender's own text and stores, for every linear weight, H = sum of x x^T over the inputs that weight saw
(float32, inputs x inputs), and for a mixture of experts in transformers' fused layout one H per expert (stacked:
experts x inputs x inputs, over the tokens the router sent to that expert). `--gguf-names` stores them under
llama.cpp's tensor names (blk.N.attn_q.weight, blk.N.ffn_gate_exps.weight, ...), as `qcbguard-gguf quantize
--hessians` reads them. Rows of a weight never enter H, so llama.cpp's row permutation of
attn_q / attn_k changes nothing. The file holds no weights and no text: only second moments of activations.

Use text of the kind the model will serve, and never text an attacker chose: the Hessians steer where the rounding
errors go (not whether they are unbiased: every draw stays qcbguard's). With no text at hand, `--generate N` lets the
model write N tokens itself (sampled at temperature 1 from BOS): the delivered model is the attacker's, so such
Hessians may be poor ones (utility), but never make a draw biased (security).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from qcbguard_kernels import QcbguardError
from qcbguard_kernels.hardening import HessianAccumulator

from .atomic import atomic_path

__all__ = [
    "HessianFile",
    "calibrate_checkpoint",
    "collect_hessians",
    "fused_experts",
    "gguf_tensor_names",
    "sampled_windows",
    "token_windows",
]


@torch.no_grad()
def collect_hessians(
    model: torch.nn.Module, batches: Iterable[torch.Tensor], weight_names: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """{weight name: H} for every nn.Linear of `model` and every fused-experts module's two weights (stacked, one H
    per expert: ExpertHessians), or those whose weight is in `weight_names`, from forward pre-hooks while the model
    reads each batch of token ids."""
    accumulators: dict[str, HessianAccumulator | ExpertHessians] = {}
    hooks = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            name = f"{module_name}.weight"
            if weight_names is not None and name not in weight_names:
                continue
            accumulators[name] = HessianAccumulator(module.in_features)

            def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], name: str = name) -> None:
                accumulators[name].add(inputs[0])

            hooks.append(module.register_forward_pre_hook(hook))
        elif fused_experts(module):
            experts = ExpertHessians(module)
            names = (f"{module_name}.gate_up_proj", f"{module_name}.down_proj")
            if weight_names is not None and not set(names) <= set(weight_names):
                continue
            accumulators[names[0]], accumulators[names[1]] = experts, experts
            hooks.append(module.register_forward_pre_hook(experts.hook, with_kwargs=True))
    try:
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {
        name: acc.hessian if isinstance(acc, HessianAccumulator) else acc.stacked(name.endswith(".down_proj"))
        for name, acc in accumulators.items()
    }


#: the fused-experts forward this module reads: transformers' Mixtral-style experts (Qwen2/3-MoE, OLMoE, DeepSeek,
#: ...) compute, per expert e and token x routed to it, gate, up = (x @ gate_up_proj[e].T).chunk(2), then
#: (act_fn(gate) * up) @ down_proj[e].T
_EXPERTS_FORWARD = ("hidden_states", "top_k_index", "top_k_weights")


def fused_experts(module: torch.nn.Module) -> bool:
    """Whether `module` is a fused-experts module of that layout: 3-D gate_up_proj (experts, 2 I, H) and down_proj
    (experts, H, I), an act_fn, no biases, and forward(hidden_states, top_k_index, top_k_weights). Others (biased or
    interleaved experts) get no Hessians: their weights are then hardened without feedback."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.nn.Parameter) or not isinstance(down, torch.nn.Parameter):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or not hasattr(module, "act_fn"):
        return False
    experts, double_inter, hidden = gate_up.shape
    if tuple(down.shape) != (experts, hidden, double_inter // 2) or double_inter % 2:
        return False
    if any("bias" in name for name, _ in module.named_parameters(recurse=False)):
        return False
    return tuple(inspect.signature(module.forward).parameters)[:3] == _EXPERTS_FORWARD


class ExpertHessians:
    """The Hessians of a fused-experts module (fused_experts): for each expert, H of gate_up_proj over the hidden
    states routed to it and H of down_proj over its activations act_fn(gate) * up, recomputed from its weights in
    the forward pre-hook (float32, as the forward computes them; sums in float64)."""

    def __init__(self, module: torch.nn.Module) -> None:
        experts, double_inter, hidden = module.gate_up_proj.shape
        self.gate_up = [HessianAccumulator(hidden) for _ in range(experts)]
        self.down = [HessianAccumulator(double_inter // 2) for _ in range(experts)]
        self._signature = inspect.signature(module.forward)

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self._signature.bind(*args, **kwargs).arguments
        hidden = bound["hidden_states"].reshape(-1, module.gate_up_proj.shape[-1])
        routed = bound["top_k_index"].reshape(hidden.shape[0], -1)
        for e in torch.unique(routed).tolist():
            if not 0 <= e < len(self.gate_up):  # an index past the experts: a dropped token, routed nowhere
                continue
            x = hidden[(routed == e).any(dim=1)]
            self.gate_up[e].add(x)
            gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
            self.down[e].add(module.act_fn(gate) * up)

    def stacked(self, down: bool) -> torch.Tensor:
        """(experts, inputs, inputs): down_proj's Hessians, or gate_up_proj's."""
        return torch.stack([acc.hessian for acc in (self.down if down else self.gate_up)])


def token_windows(ids: list[int], bos: int | None, context: int) -> Iterator[torch.Tensor]:
    """The text's token ids as batches of one window of `context` tokens each, `bos` first where there is one."""
    head = [] if bos is None else [bos]
    return (torch.tensor([head + ids[a : a + context]]) for a in range(0, len(ids), context))


@torch.no_grad()
def sampled_windows(
    model: torch.nn.Module, bos: int | None, eos: int | None, tokens: int, context: int, seed: int
) -> list[torch.Tensor]:
    """Text the model writes itself, for a defender with none of its own: windows of up to `context` tokens sampled
    at temperature 1 from BOS (a window ends early at EOS) until `tokens` tokens are written, as batches of token
    ids, BOS first; the same seed, the same windows."""
    if bos is None:
        raise QcbguardError("the tokenizer has no BOS token to start generated calibration text from; use --text")
    generator = torch.Generator().manual_seed(seed)
    windows: list[torch.Tensor] = []
    written = 0
    while written < tokens:
        ids, past = torch.tensor([[bos]]), None
        for _ in range(min(context, tokens - written)):
            out = model(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
            past = out.past_key_values
            probs = torch.softmax(out.logits[0, -1].double(), dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
            if int(token) == eos:
                break
        windows.append(ids)
        written += ids.shape[1] - 1
    return windows


#: Hugging Face model types whose llama.cpp architecture has another name (llama.cpp converts Mixtral as a Llama)
_GGUF_ARCHITECTURES = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}


def gguf_tensor_names(model_type: str, n_layers: int, names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """{Hugging Face weight name: its llama.cpp tensor names} through gguf-py's tensor-name map (one name per
    weight, but two for fused experts' gate_up_proj, which llama.cpp's converter splits into ffn_gate_exps and
    ffn_up_exps: both read the same inputs, so both take its Hessian); refuses a model type gguf-py does not know
    and a weight it cannot name (no silent drop)."""
    import gguf

    model_arch = _GGUF_ARCHITECTURES.get(model_type, model_type)
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == model_arch), None)
    if arch is None:
        raise QcbguardError(f"model type {model_type!r} has no llama.cpp architecture in gguf-py; omit --gguf-names")
    table = gguf.get_tensor_name_map(arch, n_layers)

    def name_of(name: str) -> str | None:
        gguf_name = table.get_name(name, try_suffixes=(".weight",))
        return None if gguf_name is None else gguf_name if gguf_name.endswith(".weight") else f"{gguf_name}.weight"

    mapped = {}
    for name in names:
        if name.endswith(".experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            split = (name_of(prefix + "gate_proj"), name_of(prefix + "up_proj"))
            gguf_names = split if None not in split else (name_of(name),)
        else:
            gguf_names = (name_of(name),)
        if None in gguf_names:
            raise QcbguardError(f"weight {name!r} has no llama.cpp tensor name for {model_type}; omit --gguf-names")
        mapped[name] = gguf_names
    return mapped


def calibrate_checkpoint(
    model_dir: str | os.PathLike[str],
    text_file: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    *,
    context: int = 512,
    max_tokens: int | None = None,
    gguf_names: bool = False,
    generate: int | None = None,
    generate_seed: int = 0,
) -> dict[str, int]:
    """Run the checkpoint over the text (windows of `context` tokens, BOS first where the tokenizer has one), or
    over `generate` tokens it writes itself (sampled_windows, from `generate_seed`; no text_file then), and write
    every decoder linear weight's H to `out` (safetensors, written atomically). Returns {"tensors", "tokens"}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (text_file is None) == (generate is None):
        raise QcbguardError("calibrate from a text file or from generated text (--generate N), exactly one of them")
    if context < 2:
        raise QcbguardError(f"--context must be at least 2 tokens, got {context}")
    if generate is not None and (generate < 1 or max_tokens is not None):
        raise QcbguardError(f"--generate takes a token count of at least 1 (got {generate}) and no --max-tokens")
    text = None if text_file is None else Path(text_file).read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    windows: Iterable[torch.Tensor]
    if generate is not None:
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        sampled = sampled_windows(model, bos, eos, generate, context, generate_seed)
        windows, tokens, source = sampled, sum(w.shape[1] - 1 for w in sampled), f"generated (seed {generate_seed})"
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if not ids:
            raise QcbguardError(f"{str(text_file)!r} holds no tokens")
        windows, tokens, source = token_windows(ids, tokenizer.bos_token_id, context), len(ids), "text"
    decoder = [(n, m) for n, m in model.named_modules() if ".layers." in f".{n}."]
    weights = [f"{n}.weight" for n, m in decoder if isinstance(m, torch.nn.Linear)]
    experts = {n for n, m in decoder if fused_experts(m)}
    weights += [f"{n}.{w}" for n in sorted(experts) for w in ("gate_up_proj", "down_proj")]
    # experts of another layout (biases, interleaved gate and up): hardened without feedback, and said so
    others = [n for n, m in decoder if n not in experts and any(p.dim() == 3 for p in m.parameters(False))]
    hessians = collect_hessians(model, windows, weights)
    if gguf_names:
        names = gguf_tensor_names(model.config.model_type, model.config.num_hidden_layers, hessians)
        hessians = {gguf: h for n, h in hessians.items() for gguf in names[n]}
    HessianFile.write(out, hessians, tokens=tokens, source=source)
    return {"tensors": len(hessians), "tokens": tokens, "expert_modules": len(experts), "other_experts": len(others)}


class HessianFile:
    """A calibration file, read lazily: one H at a time (float64), validated where it is used."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="pt")
            stored = set(self._file.keys())
            self._aliases = json.loads((self._file.metadata() or {}).get("aliases", "{}"))
        except (SafetensorError, OSError, ValueError) as e:
            raise QcbguardError(f"{str(self.path)!r} is not a readable safetensors Hessian file: {e}") from None
        if not isinstance(self._aliases, dict) or not set(self._aliases.values()) <= stored:
            raise QcbguardError(f"{str(self.path)!r}: its aliases name Hessians the file does not hold")
        self.names = frozenset(stored | set(self._aliases))
        self._shared = frozenset(self._aliases.values())

    @property
    def fingerprint(self) -> str:
        """The first 16 hex digits of a SHA-256 over the Hessians the file holds (names, aliases, shapes and float32
        bytes, in name order): which calibration a hardened output was made with (with the seed, it reproduces the
        bytes), the same for the same Hessians whatever the file's layout (safetensors writes its metadata in no
        fixed order); reveals nothing of the Hessians."""
        digest = hashlib.sha256()
        for name in sorted(self.names):
            stored = self.source(name)
            digest.update(f"{name}\0{stored}\0".encode())
            if stored == name:
                h = self._file.get_tensor(name)
                digest.update(f"{tuple(h.shape)}\0{h.dtype}\0".encode())
                digest.update(h.contiguous().numpy())  # the buffer itself: no copy of up to inputs^2 floats
        return digest.hexdigest()[:16]

    def source(self, name: str) -> str:
        """The name `name`'s Hessian is stored under: weights that read the same input (q, k and v; gate and up)
        share one, so whatever is derived from it (a feedback plan) can be shared too."""
        return self._aliases.get(name, name)

    def shared(self, name: str) -> bool:
        """Whether other tensors read `name`'s Hessian too."""
        return self.source(name) in self._shared

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(self.source(name)).get_shape())

    def slices(self, name: str) -> int:
        """How many Hessians `name` holds: 1, or one per expert (a stacked (experts, inputs, inputs) Hessian for the
        3-D expert tensors of a mixture of experts, row block e of the weight reading Hessian e)."""
        shape = self.shape(name)
        return shape[0] if len(shape) == 3 else 1

    def get(self, name: str, expert: int | None = None) -> torch.Tensor:
        """The Hessian of `name` (float64), or of one expert of a stacked one (read alone: a file of many experts'
        Hessians is never loaded whole)."""
        if expert is None:
            h = self._file.get_tensor(self.source(name))
        else:
            h = self._file.get_slice(self.source(name))[expert]
        if not torch.isfinite(h).all():
            raise QcbguardError(f"{str(self.path)!r}: the Hessian of {name!r} has non-finite entries")
        return h.double()

    def check(self, weights: dict[str, tuple[int, ...]], kept: Iterable[str] = ()) -> None:
        """Every Hessian names a weight of `weights` ({name: shape}, the weights to be quantized) or of `kept` (the
        model's other tensors, whose Hessians go unused: a router, a norm) and fits it: inputs x inputs for a 2-D
        weight (rows, inputs), experts x inputs x inputs for a 3-D one (experts, rows, inputs); a typo or a file
        for another model is refused, not skipped."""
        unknown = sorted(self.names - set(weights) - set(kept))
        if unknown:
            raise QcbguardError(
                f"{str(self.path)!r} has Hessians for {len(unknown)} tensor(s) this model does not quantize, e.g. "
                f"{unknown[0]!r}: is it the calibration of another model (or missing --gguf-names)?"
            )
        for name in sorted(self.names & set(weights)):
            shape = weights[name]
            expected = (*shape[:-2], shape[-1], shape[-1]) if len(shape) in (2, 3) else None
            if self.shape(name) != expected:
                needs = f"needs {expected}" if expected else "is not a 2-D or 3-D weight"
                raise QcbguardError(
                    f"{str(self.path)!r}: the Hessian of {name!r} is {self.shape(name)}; the tensor, of shape "
                    f"{shape} ({shape[-1]} inputs), {needs}"
                )

    @staticmethod
    def write(
        path: str | os.PathLike[str], hessians: dict[str, torch.Tensor], tokens: int, source: str = "text"
    ) -> None:
        """float32, each distinct H once: weights that read the same input (q, k and v; gate and up) have the same
        H bit for bit, stored under the first name and aliased in the metadata, beside the token count and where
        the tokens came from (`source`)."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        aliases: dict[str, str] = {}
        first_of: dict[bytes, str] = {}
        for name, h in hessians.items():
            h32 = h.float().contiguous()
            digest = hashlib.sha256(h32.numpy()).digest() + str(tuple(h32.shape)).encode()
            if digest in first_of:
                aliases[name] = first_of[digest]
            else:
                first_of[digest] = name
                tensors[name] = h32
        metadata = {"qcbguard": "calibration-hessians", "tokens": str(tokens), "source": source}
        metadata["aliases"] = json.dumps(aliases)
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
