"""qcbguard's efficacy harness: a real quantization-conditioned backdoor, built in the project for evaluation.

- task.py: digit reversal with an injected token (benign utility and injected behaviour, both measurable);
- model.py: the tiny transformers Llama and its training loop;
- attack.py: the QCB attack of Egashira et al. 2024/2025, generic over a qcbguard format;
- evaluate.py: ASR and accuracy of every deployment (full precision, round to nearest, hardened, baselines) and the
  detector;
- harness.py: the whole run, per format, and the markdown table (benchmarks/bench_efficacy.py is its CLI).

Evaluation code only: it trains backdoored toy models to prove the defense; nothing here is imported by qcbguard.
"""

from __future__ import annotations
