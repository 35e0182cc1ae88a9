"""qcbguard's efficacy harness: a real quantization-conditioned backdoor, built in the project for evaluation.

- task.py: digit reversal with an injected token (benign utility and injected behaviour, both measurable);
- model.py: the tiny transformers Llama and its training loop;
- attack.py: the QCB attack of Egashira et al. 2024/2025, generic over a qcbguard format;
- evaluate.py: ASR and accuracy of every deployment (full precision, round to nearest, hardened, baselines) and the
  detector;
- harness.py: the whole run, per format, and the markdown table (benchmarks/bench_efficacy.py is its CLI);
- gguf_export.py: a harness model as an F32 GGUF file llama.cpp runs (llama.cpp's names, the rope row permutation);
- gguf_eval.py: the attacked model through llama.cpp: llama-quantize vs qcbguard-gguf, scored from llama.cpp's own
  generation (benchmarks/bench_gguf_efficacy.py is its CLI).

Evaluation code only: it trains backdoored toy models to prove the defense; nothing here is imported by qcbguard.
"""

from __future__ import annotations

__all__ = ["ISSUE_FORMATS"]

#: the formats the efficacy and real-model benchmarks cover by default: LLM.int8, NF4, FP4, fp8 per channel and per
#: tensor, mxfp4, Q4_0, Q8_0, Q4_K, Q6_K
ISSUE_FORMATS = (
    "bnb_int8",
    "nf4",
    "fp4",
    "fp8_per_channel",
    "fp8_per_tensor",
    "mxfp4",
    "q4_0",
    "q8_0",
    "q4_k",
    "q6_k",
)
