"""Perplexity on a fixed, committed English text, with a fixed context length and stride.

The text (eval_text.txt beside this file) is three chapters of the Python Language Reference as CPython 3.11.7 ships
them in `pydoc_data/topics.py` ("Execution model", "The import system", "Exceptions"; PSF License), taken verbatim.

Perplexity is exp(mean negative log-likelihood) over every token scored once: windows of `context` tokens start
every `stride` tokens; in each window only the tokens not scored by an earlier window count, each conditioned on
up to `context - 1` tokens before it (the Hugging Face sliding-window recipe). A window never starts later than the
last token already scored, so stride == context is the cheap, (almost) non-overlapping version: windows overlap by
one token and the first token of each window is scored in the window before.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["EVAL_TEXT", "evaluation_ids", "perplexity"]

EVAL_TEXT = Path(__file__).with_name("eval_text.txt")


def evaluation_ids(tokenizer: object, max_tokens: int | None = None) -> torch.Tensor:
    """The evaluation text as one row of token ids (BOS first when the tokenizer has one), cut to max_tokens."""
    text = EVAL_TEXT.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids = [bos, *ids]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor([ids], dtype=torch.long)


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, context: int = 512, stride: int = 512) -> float:
    """exp(mean NLL) of ids (shape (1, n)) under the model, every token after the first scored once."""
    if not 0 < stride <= context:
        raise ValueError(f"stride {stride} must be in 1..context ({context})")
    n = ids.shape[1]
    nll = 0.0
    counted = 0
    scored_up_to = 1  # the first token has no context: never scored
    start = 0
    while scored_up_to < n:
        end = min(start + context, n)
        window = ids[:, start:end]
        logits = model(window).logits[0, :-1].float()
        targets = window[0, 1:]
        losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        first_new = scored_up_to - start - 1  # losses[j] scores token start + j + 1
        nll += float(losses[first_new:].double().sum())
        counted += end - scored_up_to
        scored_up_to = end
        start = min(start + stride, end - 1)  # the next window's first new token keeps at least one token of context
    return math.exp(nll / counted)
