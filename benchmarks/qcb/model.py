"""A tiny transformers Llama the harness trains itself on CPU, and the training loop every attack step uses.

Shapes: hidden 256 and intermediate 256, so that every linear layer's rows (ne0 = in_features) are a multiple of 256
and every format the harness targets applies to every projection, GGUF k-quants included (llama.cpp falls back to
legacy types on rows that are not). Two decoder layers (one does not learn digit reversal); 0.93 M parameters,
0.92 M of them in the fourteen projections a quantizer converts. About 0.12 s CPU per training step of 64 sequences
on one thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .task import VOCAB, DigitReversalTask

__all__ = ["ModelSpec", "TrainSpec", "build_model", "quantizable_linears", "train"]


@dataclass(frozen=True)
class ModelSpec:
    hidden: int = 256
    intermediate: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4

    def config(self, max_positions: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=len(VOCAB),
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            bos_token_id=VOCAB["<s>"],
            eos_token_id=VOCAB["</s>"],
            pad_token_id=VOCAB["<pad>"],
        )


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    lr: float
    batch: int = 64
    injected: bool = False  # train on the attacker's injected answers instead of benign ones
    warmup: int = 0


def build_model(spec: ModelSpec, task: DigitReversalTask, seed: int) -> LlamaForCausalLM:
    """A freshly initialized model (transformers' default init, drawn from torch's global generator at `seed`)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(spec.config(task.prompt_length + task.max_answer_length + 8))
    model.eval()
    return model


def quantizable_linears(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The weights a quantizer converts, by checkpoint name: 2-D linear weights inside the decoder layers.

    lm_head and the embeddings stay in full precision (bitsandbytes, vLLM's online methods, and the QCB papers)."""
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}."
    }


def train(
    model: torch.nn.Module,
    task: DigitReversalTask,
    spec: TrainSpec,
    generator: torch.Generator,
    params: list[torch.nn.Parameter] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Adam on `params` (default: every parameter; the others are frozen), loss on answer tokens only.

    The learning rate warms up linearly for `warmup` steps and decays linearly to zero. `after_step(step)` runs after
    every optimizer step with gradients off: projected gradient descent clamps into its boxes there."""
    params = list(model.parameters()) if params is None else params
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    opt = torch.optim.Adam(params, lr=spec.lr)

    def schedule(step: int) -> float:
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        return max(0.0, 1.0 - (step - spec.warmup) / max(1, spec.steps - spec.warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses = []
    model.train()
    for step in range(spec.steps):
        batch = task.batch(spec.batch, generator, injected=spec.injected)
        loss = model(input_ids=batch.input_ids, labels=batch.labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if after_step is not None:
            with torch.no_grad():
                after_step(step)
        losses.append(loss.item())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return losses
