"""Run one offline vLLM LLM() on a model directory and save what the tests check (run as a script, in a subprocess).

    python tests/vllm_probe.py MODEL_DIR QUANTIZATION SETTINGS_JSON|- OUT.pt

Builds LLM() in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), generates a few tokens greedily, then saves the
packed weights vLLM holds for every decoder linear layer (read back from the live model), the hook's tensor reports
and the completion. SETTINGS_JSON "-" runs without the hook. A refused start-up exits 3 with the error on stderr.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _torchao_overrides() -> dict[str, str]:
    from torchao.core.config import config_to_dict
    from torchao.quantization import Int8WeightOnlyConfig

    return {"quantization_config_dict_json": json.dumps(config_to_dict(Int8WeightOnlyConfig()))}


def _read_back(model):
    """Packed tensors of every decoder linear layer: fp8 codes as [N, K] uint8 bytes, torchao qdata, scales."""
    import torch

    out = {}
    for name, module in model.named_modules():
        if ".layers." not in name or not hasattr(module, "quant_method") or not hasattr(module, "weight"):
            continue
        w = module.weight
        if hasattr(w, "qdata"):
            out[name] = {"qdata": w.qdata.clone(), "scale": w.scale.clone()}
        elif w.dtype == torch.float8_e4m3fn:
            out[name] = {"weight": w.t().contiguous().view(torch.uint8).clone(), "scale": module.weight_scale.clone()}
    return out


def main(argv: list[str]) -> int:
    import torch
    from vllm import LLM, SamplingParams

    model_dir, quantization, settings, out_path = argv
    kwargs = {}
    if settings != "-":
        kwargs["additional_config"] = {"qcbguard": json.loads(settings)}
    if quantization == "torchao":
        kwargs["hf_overrides"] = _torchao_overrides()
    try:
        llm = LLM(
            model_dir,
            quantization=None if quantization == "none" else quantization,
            enforce_eager=True,
            max_model_len=64,
            dtype="bfloat16",
            **kwargs,
        )
    except Exception as exc:  # the refusal tests read this line
        print(f"STARTUP REFUSED: {exc}", file=sys.stderr)
        return 3
    text = llm.generate(["<s>31415>"], SamplingParams(max_tokens=6, temperature=0))[0].outputs[0].text
    packed = llm.collective_rpc(lambda self: _read_back(self.model_runner.model))[0]
    from vllm_qcbguard import state

    current = state._current
    reports = [r.as_dict() for r in current.reports] if current is not None else []
    skipped = list(current.skipped) if current is not None else []
    torch.save({"packed": packed, "reports": reports, "skipped": skipped, "text": text}, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
