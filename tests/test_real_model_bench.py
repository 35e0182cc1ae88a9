"""The real-model utility benchmark's own parts (benchmarks/bench_real_model.py): GGUF row un-permutation, the shared
Philox draws, the systematic-rounding prototype and windowed perplexity. The benchmark itself needs the 98 MB model
wheel and is run by hand (benchmarks/REAL_MODEL_RESULTS.md)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.realmodel.draws import philox_uniforms
from benchmarks.realmodel.model import unpermute_rope_rows
from benchmarks.realmodel.perplexity import perplexity
from benchmarks.realmodel.variants import sr_codes, systematic_codes
from qcbguard_kernels import get_format
from qcbguard_kernels.hardening import DeploymentSeed, stochastic_codes


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # what llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows (restated: reshape, swap, reshape)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(("rows", "n_head"), [(576, 9), (192, 3), (8, 1)])
def test_unpermute_inverts_llama_cpp_permute(rows, n_head):
    w = torch.randn(rows, 5)
    permuted = _llama_cpp_permute(w, n_head)
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rope_rows(permuted, n_head), w)


def test_unpermute_refuses_odd_head_split():
    with pytest.raises(ValueError, match="heads"):
        unpermute_rope_rows(torch.zeros(10, 2), 3)


@pytest.mark.parametrize("fmt_name", ["nf4", "q4_0", "bnb_int8"])
def test_shared_draws_give_qcbguard_codes(fmt_name):
    fmt = get_format(fmt_name)
    w = torch.randn(17, 128)
    enc = fmt.encode(w, "t")
    seed = DeploymentSeed.fresh()
    key = seed.key_for("t")
    u = philox_uniforms(key, w.shape)
    assert torch.equal(sr_codes(enc, u), stochastic_codes(enc, key))


def test_systematic_rounding_is_unbiased_and_sum_preserving():
    fmt = get_format("q8_0")
    w = torch.randn(4, 64)
    enc = fmt.encode(w, "t")
    p = torch.where(enc.cells.steerable, enc.cells.position, torch.zeros_like(enc.cells.position))
    trials = 400
    ups = torch.zeros_like(p)
    for t in range(trials):
        key = DeploymentSeed(bytes([t % 256, t // 256]) + bytes(30)).key_for("t")
        codes = systematic_codes(enc, philox_uniforms(key, w.shape), philox_uniforms(key, (4, 2), stream=1), 32)
        assert bool(((codes == enc.cells.lower) | (codes == enc.cells.upper)).all())
        up = (codes != enc.cells.lower).float()
        # each segment's rounding errors (in steps) sum to less than one step: sum(up - p) in (-1, 1)
        assert float((up - p).reshape(4, 2, 32).sum(-1).abs().max()) < 1.0
        ups += up
    # marginal P(upper) = position: binomial standard error at most 0.5 / sqrt(400) = 0.025; 5 sigma
    assert float((ups / trials - p).abs().max()) < 0.125


class _Bigram(torch.nn.Module):
    """A real (if tiny) causal language model whose prediction depends on the previous token only."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, ids: torch.Tensor):
        class Out:
            logits = self.table(ids)

        return Out()


@pytest.mark.parametrize(("context", "stride"), [(8, 8), (8, 3), (2, 2), (64, 64), (5, 1)])
def test_windowed_perplexity_scores_every_token_once(context, stride):
    torch.manual_seed(0)
    model = _Bigram(11)
    ids = torch.randint(0, 11, (1, 37))
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
    # a bigram model needs one token of context, so every window layout gives the full-sequence perplexity
    assert perplexity(model, ids, context, stride) == pytest.approx(math.exp(float(full)), rel=1e-6)


def test_perplexity_refuses_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        perplexity(_Bigram(3), torch.zeros(1, 4, dtype=torch.long), 4, 5)
