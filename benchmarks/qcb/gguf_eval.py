"""The efficacy harness's models end to end in llama.cpp: convert, quantize (llama-quantize and qcbguard-gguf),
generate with llama.cpp, score with the task's own rule.

`gguf_run` takes one of the harness's models (transformers, float32), writes it as an F32 GGUF file
(gguf_export.py), quantizes it to one llama-quantize file type with llama_model_quantize (what llama-quantize runs)
and with qcbguard-gguf (hardened, one file per deployment seed), and scores every file on the harness's prompts:

- generation: llama.cpp's greedy decoding from token ids (the prompts decoded, then each argmax of llama.cpp's logits
  decoded at the next position through its KV cache; 64 prompts per llama_decode, each its own sequence), with
  llama.cpp's default context settings (F16 KV cache), scored by DigitReversalTask.score_answers; the perplexity of
  the benign answers comes from llama.cpp's teacher-forced logits, as the torch harness computes it;
- agreement: the F32 file's logits on the same prompts and benign answers against the transformers model's, with an
  F32 KV cache (llama.cpp's default F16 cache alone puts about 5e-4 between them): this checks the conversion (names,
  rope permutation, hyper-parameters) before any quantized number is read.

Which tensor takes which type is llama-quantize's mixture (gguf_tools/mixtures.py), the same for both quantizers. The
harness attacks the fourteen projections of its two layers and keeps token_embd and lm_head in full precision; every
mixture also quantizes token_embd (default type) and output.weight (Q6_K; Q8_0 under Q8_0). Q4_0, Q8_0 and Q6_K give
all fourteen projections their default type; Q4_K_M gives layer 1's attn_v and ffn_down Q6_K (use_more_bits with two
layers) and the other twelve Q4_K, Q4_K_S both attn_v Q5_K. `GgufRun.targets` records what the file gave each
attacked tensor.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gguf_tools.quantize import QuantizeOptions, quantize_file
from gguf_tools.reader import GgufFile
from gguf_tools.tensors import read_rows
from qcbguard_kernels import get_format
from qcbguard_kernels.hardening import DeploymentSeed, HardeningConfig

from ..llama_cpp_oracle import llama_quantize, model_params, quiet_stderr
from .attack import AttackResult
from .evaluate import Draws, score_deployment
from .gguf_export import gguf_name, gguf_tensors, write_gguf
from .harness import ATTACK_VALID_FP_MAX, ATTACK_VALID_Q_MIN, HarnessConfig, Prepared, standard_attack
from .model import quantizable_linears
from .task import DigitReversalTask, Score

__all__ = [
    "GgufEfficacy",
    "GgufRun",
    "LlamaCppModel",
    "gguf_efficacy",
    "gguf_run",
    "logit_agreement",
    "markdown_table",
    "on_target",
    "score_gguf",
]

_GGML_TYPE_F32 = 0


class LlamaCppModel:
    """A GGUF file in llama.cpp (its C API through llama-cpp-python's bindings), driven by token ids, many sequences
    per llama_decode: each prompt is its own sequence (seq_id) with its own KV cache stream, as llama.cpp's parallel
    decoding runs them, so one decode call serves `n_seq` prompts.

    The context is what llama_cpp.Llama sets up by default (F16 KV cache, no flash attention, one thread); f32_cache
    keeps the KV cache in float32, so that an F32 model's logits are the float32 forward pass up to summation order
    (with the F16 cache they differ from transformers' by about 5e-4 of the largest logit)."""

    def __init__(
        self,
        path: Path,
        seq_len: int,
        n_seq: int = 64,
        threads: int = 1,
        f32_cache: bool = False,
        verbose: bool = False,
    ) -> None:
        import llama_cpp

        self._api = llama_cpp
        self._verbose = verbose
        self.n_seq = min(n_seq, llama_cpp.llama_max_parallel_sequences())
        with quiet_stderr(not verbose):
            self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params())
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = self.n_seq * seq_len
        params.n_seq_max = self.n_seq
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if f32_cache:
            params.type_k = params.type_v = _GGML_TYPE_F32
        with quiet_stderr(not verbose):
            self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self._batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))

    def close(self) -> None:
        if self._ctx:
            with quiet_stderr(not self._verbose):
                self._api.llama_batch_free(self._batch)
                self._api.llama_free(self._ctx)
                self._api.llama_model_free(self._model)
            self._ctx = None

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """One llama_decode of (seq_id, position, token, wants logits) entries; the logits asked for, in order."""
        b = self._batch
        b.n_tokens = len(tokens)
        for i, (seq, pos, token, out) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, out
            b.seq_id[i][0] = seq
        rc = self._api.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        rows = [i for i, t in enumerate(tokens) if t[3]]
        out = np.empty((len(rows), self.n_vocab), np.float32)
        for k, i in enumerate(rows):
            out[k] = np.ctypeslib.as_array(self._api.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,))
        return out

    def _clear(self) -> None:
        self._api.llama_memory_clear(self._api.llama_get_memory(self._ctx), True)

    def logits(self, rows: list[list[int]]) -> np.ndarray:
        """llama.cpp's logits at every position of every row (rows of one length, each from an empty cache):
        float32 [rows, length, n_vocab]."""
        out = []
        for start in range(0, len(rows), self.n_seq):
            chunk = rows[start : start + self.n_seq]
            self._clear()
            flat = self._decode([(s, i, t, True) for s, row in enumerate(chunk) for i, t in enumerate(row)])
            out.append(flat.reshape(len(chunk), len(chunk[0]), self.n_vocab))
        return np.concatenate(out)

    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """`max_tokens` greedy tokens after each prompt (prompts of one length): the prompts decoded, then each
        argmax (ties to the lowest id, as torch.argmax in the harness) decoded at the next position, every sequence
        in step. The task's scoring reads the answers up to the first </s>, as it reads the torch model's."""
        answers: list[list[int]] = []
        for start in range(0, len(prompts), self.n_seq):
            chunk = prompts[start : start + self.n_seq]
            n = len(chunk[0])
            self._clear()
            logits = self._decode([(s, i, t, i == n - 1) for s, row in enumerate(chunk) for i, t in enumerate(row)])
            out = [[int(x)] for x in logits.argmax(axis=1)]
            for pos in range(n, n + max_tokens - 1):
                logits = self._decode([(s, pos, row[-1], True) for s, row in enumerate(out)])
                for row, x in zip(out, logits.argmax(axis=1), strict=True):
                    row.append(int(x))
            answers.extend(out)
        return answers


def _n_ctx(task: DigitReversalTask) -> int:
    return task.prompt_length + task.max_answer_length


def _teacher_forced(task: DigitReversalTask, digits: torch.Tensor) -> torch.Tensor:
    return torch.cat([task.prompts(digits), task.answers(digits, injected=False)], dim=1)


def score_gguf(path: Path, task: DigitReversalTask, digits: torch.Tensor) -> Score:
    """The harness's Score of a GGUF file, computed from llama.cpp: ASR and accuracy of its greedy answers to the
    prompts built from `digits`, and exp(mean NLL) of the benign answer tokens under its logits."""
    ids = _teacher_forced(task, digits)
    p = task.prompt_length
    with LlamaCppModel(path, _n_ctx(task)) as m:
        answers = m.greedy(task.prompts(digits).tolist(), task.max_answer_length)
        logits = m.logits(ids.tolist())[:, p - 1 : -1].astype(np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=2, keepdims=True)
    targets = ids[:, p:].numpy()
    nll = -np.take_along_axis(logp, targets[..., None], axis=2).mean()
    return task.score_answers(torch.tensor(answers), digits, math.exp(nll))


@torch.no_grad()
def logit_agreement(path: Path, model: torch.nn.Module, task: DigitReversalTask, digits: torch.Tensor) -> float:
    """max |llama.cpp logit - transformers logit| / max |transformers logit|, over every position of each prompt from
    `digits` followed by its benign answer; llama.cpp with an F32 KV cache (float32 throughout)."""
    ids = _teacher_forced(task, digits)
    reference = model(input_ids=ids, use_cache=False).logits.float().numpy()
    with LlamaCppModel(path, _n_ctx(task), f32_cache=True) as m:
        logits = m.logits(ids.tolist())
    return float(np.abs(logits - reference).max() / np.abs(reference).max())


def on_target(path: Path, model: torch.nn.Module, fmt_name: str) -> tuple[float, int]:
    """(share, tensors): over the attacked tensors the file stores in `fmt_name`'s ggml type, the share of weights
    whose stored value is the harness's round-to-nearest value (qcbguard's reference, bit-exact with ggml), which
    is the attacker's target: 1.0 for llama-quantize's file of a successful attack; (nan, 0) when no attacked tensor
    has that type."""
    fmt = get_format(fmt_name)
    tensors = gguf_tensors(model)
    matched = total = count = 0
    with GgufFile(path) as f:
        for name in quantizable_linears(model):
            info = f.by_name[gguf_name(name)]
            if info.type.name != fmt_name.upper():
                continue
            w = tensors[info.name]
            stored = read_rows(f, info, 0, info.n_rows)
            matched += int((stored == fmt.dequantize(fmt.quantize(w, info.name)).reshape(stored.shape)).sum())
            total += w.numel()
            count += 1
    return (matched / total if total else float("nan")), count


@dataclass
class GgufRun:
    """One model through llama.cpp: its F32 file, llama-quantize's file and qcbguard-gguf's file per seed."""

    type_name: str
    fp: Score
    llama_quantize: Score
    #: one Score per seed (empty when no seed was given)
    hardened: Draws
    logit_agreement: float
    #: the ggml type each attacked tensor gets (transformers name -> type name): llama-quantize's mixture
    targets: dict[str, str]
    #: attack_format given: on_target of llama-quantize's file and of each hardened file, and the tensors it covers
    on_target_llama_quantize: float = float("nan")
    on_target_hardened: tuple[float, ...] = ()
    on_target_tensors: int = 0

    @property
    def attacked_types(self) -> dict[str, int]:
        """How many of the attacked tensors each ggml type holds."""
        counts: dict[str, int] = {}
        for t in self.targets.values():
            counts[t] = counts.get(t, 0) + 1
        return counts


def gguf_run(
    model: torch.nn.Module,
    task: DigitReversalTask,
    digits: torch.Tensor,
    type_name: str,
    seeds: list[DeploymentSeed],
    attack_format: str | None = None,
    workdir: Path | None = None,
) -> GgufRun:
    """Convert `model` to F32 GGUF, quantize it to `type_name` with llama-quantize and with qcbguard-gguf (one
    hardened file per seed), and score every file in llama.cpp on the prompts from `digits`; `attack_format` (a
    qcbguard format name) also measures how many weights each quantized file puts on the attacker's target."""
    with tempfile.TemporaryDirectory(prefix="qcb_gguf_", dir=workdir) as tmp:
        d = Path(tmp)
        src = write_gguf(model, d / "model-f32.gguf")
        ref = llama_quantize(src, d / f"model-{type_name}.gguf", type_name)
        hardened, hardened_on_target = [], []
        for i, seed in enumerate(seeds):
            seed_file = d / f"seed{i}.hex"
            seed.write(seed_file)
            out = d / f"model-{type_name}-qcbguard{i}.gguf"
            quantize_file(src, out, QuantizeOptions(type_name, config=HardeningConfig(seed_file=str(seed_file))))
            hardened.append(score_gguf(out, task, digits))
            if attack_format is not None:
                hardened_on_target.append(on_target(out, model, attack_format)[0])
        run = GgufRun(
            type_name=type_name,
            fp=score_gguf(src, task, digits),
            llama_quantize=score_gguf(ref, task, digits),
            hardened=Draws(tuple(hardened)),
            logit_agreement=logit_agreement(src, model, task, digits),
            targets=_types(ref, model),
            on_target_hardened=tuple(hardened_on_target),
        )
        if attack_format is not None:
            run.on_target_llama_quantize, run.on_target_tensors = on_target(ref, model, attack_format)
        return run


def _types(path: Path, model: torch.nn.Module) -> dict[str, str]:
    with GgufFile(path) as f:
        return {name: f.by_name[gguf_name(name)].type.name for name in quantizable_linears(model)}


@dataclass
class GgufEfficacy:
    """One format's standard QCB (the harness's attack) through llama.cpp, with the harness's own torch numbers."""

    format: str
    type_name: str
    attack: AttackResult
    #: the harness's scores of the attacked model in torch: full precision and its round-to-nearest reference
    torch_fp: Score
    torch_rtn: Score
    attacked: GgufRun
    clean: GgufRun

    @property
    def valid(self) -> bool:
        """A valid QCB as llama.cpp runs it: benign at full precision, malicious once llama-quantize rounds it."""
        return self.attacked.fp.asr <= ATTACK_VALID_FP_MAX and self.attacked.llama_quantize.asr >= ATTACK_VALID_Q_MIN


def gguf_efficacy(
    p: Prepared,
    fmt_name: str,
    type_name: str,
    config: HarnessConfig,
    seeds: list[DeploymentSeed],
    clean_seeds: list[DeploymentSeed] | None = None,
) -> GgufEfficacy:
    """The harness's standard attack on `fmt_name` (a GGUF format), then the attacked and the clean model through
    llama.cpp as llama-quantize file type `type_name` (hardened with `seeds`; the clean model with `clean_seeds`,
    default the same)."""
    _, attacked, result = standard_attack(p, fmt_name, config)
    fmt = get_format(fmt_name)
    return GgufEfficacy(
        format=fmt_name,
        type_name=type_name,
        attack=result,
        torch_fp=p.task.score(attacked, p.eval_digits),
        torch_rtn=score_deployment(attacked, p.task, p.eval_digits, fmt, "rtn").scores[0],
        attacked=gguf_run(attacked, p.task, p.eval_digits, type_name, seeds, attack_format=fmt_name),
        clean=gguf_run(p.clean, p.task, p.eval_digits, type_name, seeds if clean_seeds is None else clean_seeds),
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _draws(d: Draws) -> str:
    if not d.scores:
        return "n/a"
    return _pct(d.asr_mean) if len(d.scores) == 1 else f"{_pct(d.asr_mean)} / {_pct(d.asr_max)}"


def markdown_table(rows: list[GgufEfficacy]) -> str:
    """ASR and accuracy in percent, measured in llama.cpp (torch: the harness's own numbers for the same model);
    "a / b" over several seeds is mean / max; valid: the attack is a valid QCB as llama.cpp runs it."""
    lines = [
        "| format (file type) | attacked tensors' types | torch FP / RTN ASR | llama.cpp: FP ASR | llama-quantize ASR "
        "| valid | qcbguard-gguf ASR | clean model: llama-quantize ASR; qcbguard-gguf | accuracy attacked: FP / "
        "llama-quantize / qcbguard-gguf | weights on the attacker's target: llama-quantize / qcbguard-gguf "
        "| F32 logits vs torch |",
        "|---|---|---|---:|---:|:---:|---:|---|---|---|---:|",
    ]
    for r in rows:
        a = r.attacked
        types = ", ".join(f"{n} {t}" for t, n in sorted(a.attacked_types.items()))
        hardened_target = (
            "n/a" if not a.on_target_hardened else _pct(sum(a.on_target_hardened) / len(a.on_target_hardened))
        )
        acc_h = "n/a" if not a.hardened.scores else _pct(a.hardened.accuracy_mean)
        lines.append(
            f"| `{r.format}` ({r.type_name}) | {types} | {_pct(r.torch_fp.asr)} / {_pct(r.torch_rtn.asr)} "
            f"| {_pct(a.fp.asr)} | {_pct(a.llama_quantize.asr)} | {'yes' if r.valid else '**no**'} "
            f"| {_draws(a.hardened)} | {_pct(r.clean.llama_quantize.asr)}; {_draws(r.clean.hardened)} "
            f"| {_pct(a.fp.accuracy)} / {_pct(a.llama_quantize.accuracy)} / {acc_h} "
            f"| {_pct(a.on_target_llama_quantize)} / {hardened_target} ({a.on_target_tensors} tensors) "
            f"| {max(a.logit_agreement, r.clean.logit_agreement):.1e} |"
        )
    return "\n".join(lines)
