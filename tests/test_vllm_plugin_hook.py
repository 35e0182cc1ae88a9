"""The vLLM hook's parts on plain objects (no vLLM needed except where marked): settings, flags, version guard,
tensor-parallel placement (TP=1 vs TP=2 shards hold the same codes), the bit-for-bit check against vLLM's output,
the fail-closed model check and the metrics bridge."""

from __future__ import annotations

import argparse
import dataclasses
import types

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from qcbguard.calibration import HessianFile
from qcbguard.metrics import QcbguardMetrics, write_textfile
from qcbguard_kernels import QcbguardError, get_format
from qcbguard_kernels.hardening import DeploymentSeed, HardeningConfig, harden_calibrated, harden_tensor
from vllm_qcbguard.cli import add_hook_arguments, hook_settings_from_args
from vllm_qcbguard.compat import UnsupportedVllmError, check_vllm_version, is_wrapped, wrap_attribute
from vllm_qcbguard.hook import LayerJob, RuleDriftError, calibration_plan, check_model, harden_against_vllm
from vllm_qcbguard.layout import expert_layout, layer_geometry, layer_type
from vllm_qcbguard.metrics_bridge import TextfileDirCollector
from vllm_qcbguard.settings import HookSettings
from vllm_qcbguard.shard import RowRun, ShardGeometry, harden_shard
from vllm_qcbguard.state import HookState

SEED = DeploymentSeed(bytes(range(32)))
CONFIG = HardeningConfig()
ROW_FORMATS = ["fp8_per_channel", "torchao_int8", "int8_per_channel"]


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05).bfloat16()


def _codes(fmt_name: str, packed) -> torch.Tensor:
    t = packed.tensors["qdata" if "torchao" in fmt_name else "weight"]
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


# ---- settings and flags ----


def test_settings_accept_the_hardening_fields_and_refuse_anything_else():
    s = HookSettings.from_mapping({"mode": "detect-only", "on_suspicious": "refuse", "allow_passthrough": True})
    assert s.hardening.mode == "detect-only" and s.hardening.on_suspicious == "refuse" and s.allow_passthrough
    assert HookSettings.from_mapping(None) == HookSettings(HardeningConfig())
    with pytest.raises(QcbguardError, match=r"unknown qcbguard setting.*seed_flie"):
        HookSettings.from_mapping({"seed_flie": "/x"})
    with pytest.raises(QcbguardError, match="allow_passthrough must be true or false"):
        HookSettings.from_mapping({"allow_passthrough": "yes"})
    with pytest.raises(QcbguardError, match="unknown hardening mode"):
        HookSettings.from_mapping({"mode": "off"})
    with pytest.raises(QcbguardError, match="JSON object"):
        HookSettings.from_mapping(["mode"])


def test_flags_parse_into_the_additional_config_entry():
    parser = argparse.ArgumentParser()
    add_hook_arguments(parser)
    add_hook_arguments(parser)  # the plugin runs in every process: adding twice is a no-op
    args = parser.parse_args(["--quantization-hook", "qcbguard", "--quantization-hook-config", '{"mode": "harden"}'])
    assert hook_settings_from_args(args) == {"mode": "harden"}
    assert hook_settings_from_args(parser.parse_args([])) is None
    with pytest.raises(QcbguardError, match="needs --quantization-hook"):
        hook_settings_from_args(parser.parse_args(["--quantization-hook-config", "{}"]))
    with pytest.raises(QcbguardError, match="not valid JSON"):
        hook_settings_from_args(
            parser.parse_args(["--quantization-hook", "qcbguard", "--quantization-hook-config", "{"])
        )
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization-hook", "other"])


def test_version_guard_and_single_application():
    assert check_vllm_version("0.32.0") == (0, 32)
    assert check_vllm_version("0.33.1.dev3+g1234") == (0, 33)
    with pytest.raises(UnsupportedVllmError, match=r"supports vLLM 0\.32, 0\.33, not 0\.34\.0"):
        check_vllm_version("0.34.0")
    owner = types.SimpleNamespace(f=lambda x: x + 1)
    assert wrap_attribute(owner, "f", lambda orig: lambda x: orig(x) * 10)
    assert not wrap_attribute(owner, "f", lambda orig: lambda x: orig(x) * 10)
    assert owner.f(1) == 20 and is_wrapped(owner.f)
    with pytest.raises(UnsupportedVllmError, match="has no g"):
        wrap_attribute(owner, "g", lambda orig: orig)


# ---- tensor parallelism, simulated: the layouts vLLM gives each rank ----


class QKVParallelLinear:
    def __init__(self, tp_rank, tp_size, heads, kv_heads, head):
        self.tp_rank, self.tp_size, self.head_size = tp_rank, tp_size, head
        self.total_num_heads, self.total_num_kv_heads = heads, kv_heads
        self.num_kv_head_replicas = max(1, tp_size // kv_heads)
        local_kv = max(1, kv_heads // tp_size)
        self.output_partition_sizes = [heads // tp_size * head, local_kv * head, local_kv * head]


class MergedColumnParallelLinear:
    def __init__(self, tp_rank, tp_size, sizes):
        self.tp_rank, self.tp_size, self.output_sizes = tp_rank, tp_size, sizes
        self.output_partition_sizes = [s // tp_size for s in sizes]


class RowParallelLinear:
    def __init__(self, tp_rank, tp_size, cols):
        self.tp_rank, self.tp_size, self.input_size_per_partition = tp_rank, tp_size, cols // tp_size


def _qkv_shard(q, k, v, rank, tp, kv_heads, head):
    qn = q.shape[0] // tp
    kv_rank = rank // max(1, tp // kv_heads)
    kvn = max(1, kv_heads // tp) * head
    return torch.cat([q[rank * qn : (rank + 1) * qn], k[kv_rank * kvn : (kv_rank + 1) * kvn], v[kv_rank * kvn :][:kvn]])


@pytest.mark.parametrize("fmt_name", ROW_FORMATS)
@pytest.mark.parametrize(("tp", "kv_heads"), [(2, 2), (4, 2), (2, 4)])
def test_fused_qkv_shards_hold_the_tp1_codes(fmt_name, tp, kv_heads):
    """Rank r holds [q_r; k_r; v_r]: drawn at their rows in the TP=1 [q; k; v], every code equals TP=1's."""
    heads, head, hidden = 4, 16, 96
    q, k, v = _weight(heads * head, hidden, 1), _weight(kv_heads * head, hidden, 2), _weight(kv_heads * head, hidden, 3)
    fmt = get_format(fmt_name)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    full, _ = harden_tensor(torch.cat([q, k, v]), fmt, name, SEED)
    full_codes = _codes(fmt_name, full)
    n_q, n_kv = heads * head, kv_heads * head
    for rank in range(tp):
        layer = QKVParallelLinear(rank, tp, heads, kv_heads, head)
        shard = _qkv_shard(q, k, v, rank, tp, kv_heads, head)
        geometry = layer_geometry(layer, shard.shape[0])
        _, packed, _ = harden_shard(shard, fmt, name, SEED, CONFIG, geometry)
        rows = torch.cat([torch.arange(run.global_start, run.global_start + run.length) for run in geometry.runs])
        assert rows.max() < n_q + 2 * n_kv
        assert torch.equal(_codes(fmt_name, packed), full_codes[rows]), (rank, geometry)
        # and the rows are the right ones: the shard's weights are the TP=1 fused weight's rows
        assert torch.equal(shard, torch.cat([q, k, v])[rows])


@pytest.mark.parametrize("fmt_name", ROW_FORMATS)
def test_gate_up_shards_hold_the_tp1_codes(fmt_name):
    gate, up = _weight(64, 96, 4), _weight(64, 96, 5)
    fmt = get_format(fmt_name)
    name = "model.layers.1.mlp.gate_up_proj.weight"
    full_codes = _codes(fmt_name, harden_tensor(torch.cat([gate, up]), fmt, name, SEED)[0])
    got = []
    for rank in range(2):
        layer = MergedColumnParallelLinear(rank, 2, [64, 64])
        shard = torch.cat([gate[rank * 32 : (rank + 1) * 32], up[rank * 32 : (rank + 1) * 32]])
        got.append(_codes(fmt_name, harden_shard(shard, fmt, name, SEED, CONFIG, layer_geometry(layer, 64))[1]))
    assert torch.equal(torch.cat([got[0][:32], got[1][:32], got[0][32:], got[1][32:]]), full_codes)


@pytest.mark.parametrize("fmt_name", ["fp8_per_channel", "int8_per_channel"])
def test_row_parallel_shards_hold_the_tp1_codes_with_the_all_reduced_amax(fmt_name):
    """o_proj/down_proj split columns; vLLM all-reduces each row's amax, and with it every code and scale agree."""
    w = _weight(48, 128, 6)
    fmt = get_format(fmt_name)
    name = "model.layers.0.self_attn.o_proj.weight"
    full = harden_tensor(w, fmt, name, SEED)[0]
    amax = w.abs().amax(dim=1, keepdim=True)
    for rank in range(2):
        layer = RowParallelLinear(rank, 2, 128)
        shard = w[:, rank * 64 : (rank + 1) * 64]
        geometry = layer_geometry(layer, 48)
        assert geometry.col_offset == rank * 64
        _, packed, _ = harden_shard(shard, fmt, name, SEED, CONFIG, geometry, amax=amax)
        assert torch.equal(_codes(fmt_name, packed), _codes(fmt_name, full)[:, rank * 64 : (rank + 1) * 64])
        assert torch.equal(packed.tensors["scale"], full.tensors["scale"])
        # the shard's own amax would give other scales: the all-reduced one is what makes the ranks agree
        _, local, _ = harden_shard(shard, fmt, name, SEED, CONFIG, geometry)
        assert not torch.equal(local.tensors["scale"], full.tensors["scale"])


def test_per_tensor_shards_hold_the_tp1_codes_with_the_all_reduced_amax():
    """fp8_per_tensor: vLLM all-reduces the tensor's amax over any sharded layer, so every rank keeps TP=1's scale."""
    w = _weight(64, 96, 8)
    fmt = get_format("fp8_per_tensor")
    name = "model.layers.0.mlp.gate_up_proj.weight"
    full = harden_tensor(w, fmt, name, SEED)[0]
    for rank in range(2):
        layer = MergedColumnParallelLinear(rank, 2, [32, 32])
        shard = torch.cat([w[rank * 16 : (rank + 1) * 16], w[32 + rank * 16 : 32 + (rank + 1) * 16]])
        geometry = layer_geometry(layer, 32)
        _, packed, _ = harden_shard(shard, fmt, name, SEED, CONFIG, geometry, amax=w.abs().amax())
        rows = torch.cat([torch.arange(run.global_start, run.global_start + run.length) for run in geometry.runs])
        assert torch.equal(_codes("fp8_per_tensor", packed), _codes("fp8_per_tensor", full)[rows])
        assert torch.equal(packed.tensors["scale"], full.tensors["scale"])


@pytest.mark.parametrize("fmt_name", ["int8_per_channel", "fp8_per_channel"])
def test_moe_tp_and_ep_ranks_hold_the_tp1_codes(fmt_name):
    """Fused experts: under MoE tensor parallelism rank r holds [w1_r; w3_r] of each expert's w13 and columns r of its
    w2 (whose row amax vLLM all-reduces); under expert parallelism a rank holds whole experts, named by global id."""
    experts, hidden, inter = 3, 48, 64
    w13 = torch.stack([_weight(2 * inter, hidden, 20 + e) for e in range(experts)])
    w2 = torch.stack([_weight(hidden, inter, 30 + e) for e in range(experts)])
    fmt = get_format(fmt_name)
    prefix = "model.layers.0.mlp.experts"
    full = {
        (e, part): _codes(fmt_name, harden_tensor(w[e], fmt, f"{prefix}.{e}.{part}_weight", SEED)[0])
        for e in range(experts)
        for part, w in (("w13", w13), ("w2", w2))
    }
    local = inter // 2
    for rank in range(2):
        moe = types.SimpleNamespace(tp_size=2, tp_rank=rank, w13_num_shards=2)
        rows = torch.cat(
            [torch.arange(rank * local, (rank + 1) * local), inter + torch.arange(rank * local, (rank + 1) * local)]
        )
        cols = torch.arange(rank * local, (rank + 1) * local)
        layout = expert_layout(moe, None, (experts, 2 * local, hidden), (experts, hidden, local))
        for e in range(experts):
            _, p13, _ = harden_shard(w13[e][rows], fmt, f"{prefix}.{e}.w13_weight", SEED, CONFIG, layout.w13)
            amax = w2[e].abs().amax(dim=1, keepdim=True)
            _, p2, _ = harden_shard(w2[e][:, cols], fmt, f"{prefix}.{e}.w2_weight", SEED, CONFIG, layout.w2, amax=amax)
            assert torch.equal(_codes(fmt_name, p13), full[(e, "w13")][rows])
            assert torch.equal(_codes(fmt_name, p2), full[(e, "w2")][:, cols])
    # expert parallelism: the expert map (global -> local slot, -1 elsewhere) names each slot's global expert
    expert_map = torch.tensor([-1, 1, 0])
    layout = expert_layout(types.SimpleNamespace(tp_size=1), expert_map, (2, 2 * inter, hidden), (2, hidden, inter))
    assert layout.global_ids == (2, 1)
    with pytest.raises(ValueError, match="local slots"):
        expert_layout(types.SimpleNamespace(tp_size=1), torch.tensor([0, -1, -1]), (2, 4, 4), (2, 4, 2))


def test_geometry_refuses_layouts_it_does_not_know():
    with pytest.raises(ValueError, match="tensor-parallel layout"):
        layer_geometry(types.SimpleNamespace(tp_size=2, tp_rank=0), 8)
    with pytest.raises(ValueError, match="cover 8 rows"):
        ShardGeometry.whole(8).check(9, "w")
    assert layer_type("model.layers.3.self_attn.qkv_proj") == "self_attn.qkv_proj"
    assert layer_type("lm_head") == "lm_head"


# ---- the bit-for-bit check against what vLLM computed ----


def _state(**settings) -> HookState:
    return HookState(settings=HookSettings.from_mapping(settings), seed=SEED, model="m")


def test_vllm_output_must_equal_the_reference_bit_for_bit():
    w = _weight(32, 64, 7)
    fmt = get_format("fp8_per_channel")
    plain = fmt.quantize(w)
    state = _state()
    layer = torch.nn.Linear(64, 32)
    job = LayerJob(state, layer, "Fp8PtpcOnlineLinearMethod", fmt, "model.layers.0.mlp.down_proj.weight")
    hardened = harden_against_vllm(job, w, {"weight": plain.tensors["weight"], "scale": plain.tensors["scale"]})
    reference, _ = harden_tensor(w, fmt, job.name, SEED)
    assert torch.equal(hardened.tensors["weight"].view(torch.uint8), reference.tensors["weight"].view(torch.uint8))
    assert job.done == 1 and len(state.reports) == 1 and layer in state.handled

    drifted = plain.tensors["weight"].view(torch.uint8).clone()
    drifted[3, 5] ^= 1  # one code one step off: vLLM rounded differently
    with pytest.raises(RuleDriftError, match=r"weight of .*down_proj\.weight differs .* in 1 of 2048"):
        harden_against_vllm(job, w, {"weight": drifted.view(torch.float8_e4m3fn), "scale": plain.tensors["scale"]})
    scale = plain.tensors["scale"].clone()
    scale[0] = torch.nextafter(scale[0], torch.tensor(1.0))  # one ulp: another scale rule
    with pytest.raises(RuleDriftError, match=r"scale of .* differs"):
        harden_against_vllm(job, w, {"weight": plain.tensors["weight"], "scale": scale})
    with pytest.raises(RuleDriftError, match=r"as torch\.float32"):
        harden_against_vllm(job, w, {"weight": plain.tensors["weight"].float(), "scale": scale})


def test_fused_kernels_harden_what_the_reference_hardens(monkeypatch):
    """backend triton (auto on a GPU tensor): the fused kernels, checked against vLLM's output the same way, give the
    reference's bytes; shards the kernels cannot place (fused TP runs, all-reduced scales) refuse a forced triton."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w = _weight(16, 64, 9)
    fmt = get_format("fp8_per_channel")
    plain = fmt.quantize(w)
    vllm_out = {"weight": plain.tensors["weight"], "scale": plain.tensors["scale"]}
    name = "model.layers.0.mlp.down_proj.weight"
    got = {}
    for backend in ("reference", "triton"):
        state = _state(backend=backend)
        job = LayerJob(state, torch.nn.Linear(64, 16), "Fp8PtpcOnlineLinearMethod", fmt, name)
        got[backend] = harden_against_vllm(job, w, vllm_out).tensors["weight"].view(torch.uint8)
        assert state.reports[0].codes_changed == int((got[backend] != plain.tensors["weight"].view(torch.uint8)).sum())
    assert torch.equal(got["triton"], got["reference"])
    layer = MergedColumnParallelLinear(0, 2, [8, 8])
    job = LayerJob(_state(backend="triton"), layer, "Fp8PtpcOnlineLinearMethod", fmt, name)
    with pytest.raises(UnsupportedVllmError, match="backend 'triton' cannot harden"):
        harden_against_vllm(job, w[:8], {"weight": plain.tensors["weight"][:8], "scale": plain.tensors["scale"][:8]})
    with pytest.raises(QcbguardError, match="backend must be one of"):
        HookSettings.from_mapping({"backend": "cuda"})


class _Method:
    pass


def _model(method_class: str) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[0].quant_method = type("UnquantizedLinearMethod", (_Method,), {})()
    model[1].quant_method = type(method_class, (_Method,), {})()
    return model


def test_model_check_fails_closed_on_layers_it_did_not_harden():
    config = types.SimpleNamespace(quantization="fp8_per_tensor")
    with pytest.raises(
        QcbguardError, match=r"cannot harden layer 1: .*Fp8PerTensorOnlineLinearMethod.*allow_passthrough"
    ):
        check_model(_model("Fp8PerTensorOnlineLinearMethod"), config, _state())
    state = _state(allow_passthrough=True)
    check_model(_model("Fp8PerTensorOnlineLinearMethod"), config, state)
    assert state.skipped == [("1", "passthrough")]

    # `--quantization mxfp4` names a checkpoint format and, on a full-precision checkpoint, an online quantizer:
    # the layer's method tells them apart, and an online layer left unhardened is never "pre-quantized"
    with pytest.raises(QcbguardError, match=r"cannot harden layer 1: .*Mxfp4OnlineLinearMethod"):
        check_model(_model("Mxfp4OnlineLinearMethod"), types.SimpleNamespace(quantization="mxfp4"), _state())
    state = _state()
    check_model(_model("Mxfp4LinearMethod"), types.SimpleNamespace(quantization="mxfp4"), state)
    assert state.skipped == [("1", "pre-quantized")]

    state = _state()
    check_model(_model("GPTQMarlinLinearMethod"), types.SimpleNamespace(quantization="gptq_marlin"), state)
    assert state.skipped == [("1", "pre-quantized")]
    text = generate_latest(state.metrics.registry).decode()
    assert 'qcbguard_tensors_skipped_total{layer_type="1",model="m",reason="pre-quantized"} 1.0' in text

    with pytest.raises(QcbguardError, match="does not know the quantization method 'newquant'"):
        check_model(_model("NewQuantLinearMethod"), types.SimpleNamespace(quantization="newquant"), _state())

    state = _state()
    model = _model("Fp8PtpcOnlineLinearMethod")
    state.handled.add(model[1])  # the hook hardened it
    check_model(model, types.SimpleNamespace(quantization="fp8_per_channel"), state)
    assert state.skipped == []


# ---- metrics: per-process files summed on the API server's registry ----


def test_metrics_from_several_processes_add_up(tmp_path):
    w = _weight(16, 64, 8)
    fmt = get_format("fp8_per_channel")
    for rank in range(2):
        metrics = QcbguardMetrics()
        metrics.set_info(adapter="vllm", mode="harden", seed_fingerprint=SEED.fingerprint)
        _, report = harden_tensor(w, fmt, f"model.layers.{rank}.mlp.down_proj.weight", SEED)
        metrics.record(report, model="tiny", layer_type="mlp.down_proj")
        write_textfile(metrics, tmp_path / f"qcbguard-{rank}.prom")
    (tmp_path / "other.txt").write_text("not a metrics file")
    registry = CollectorRegistry()
    registry.register(TextfileDirCollector(tmp_path))
    text = generate_latest(registry).decode()
    labels = 'format="fp8_per_channel",layer_type="mlp.down_proj",mode="harden",model="tiny"'
    assert f"qcbguard_tensors_total{{{labels}}} 2.0" in text
    assert f"qcbguard_elements_total{{{labels}}} 2048.0" in text
    assert f"qcbguard_detector_distance_count{{{labels}}} 2.0" in text
    assert text.count("qcbguard_info{") == 1 and f'seed_fingerprint="{SEED.fingerprint}"' in text
    (info,) = [line for line in text.splitlines() if line.startswith("qcbguard_info{")]
    assert info.endswith(" 1.0")
    assert "_created" not in text


def _box_attacked(w: torch.Tensor, fmt) -> torch.Tensor:
    """Every weight moved next to the rounding boundary on its round-to-nearest side (a QCB box pushed to its edge)."""
    enc = fmt.encode(w, "w")
    cells = enc.cells
    lo = fmt.code_values(enc, cells.lower)
    hi = fmt.code_values(enc, cells.upper)
    p = torch.where(cells.nearest == cells.lower, 0.45, 0.55)
    return torch.where(cells.lower == cells.upper, w.float(), lo + p * (hi - lo))


def test_detect_only_keeps_vllm_codes_and_refuse_stops_on_a_tampered_tensor():
    fmt = get_format("fp8_per_channel")
    w = _weight(64, 256, 9).float()
    plain = fmt.quantize(w)
    vllm = {"weight": plain.tensors["weight"], "scale": plain.tensors["scale"]}
    state = _state(mode="detect-only")
    job = LayerJob(state, torch.nn.Linear(1, 1), "Fp8PtpcOnlineLinearMethod", fmt, "model.layers.0.mlp.up.weight")
    kept = harden_against_vllm(job, w, vllm)
    assert torch.equal(kept.tensors["weight"].view(torch.uint8), plain.tensors["weight"].view(torch.uint8))
    assert state.reports[0].mode == "detect-only" and state.reports[0].codes_changed == 0

    attacked = _box_attacked(w, fmt)
    tampered = fmt.quantize(attacked)
    vllm = {"weight": tampered.tensors["weight"], "scale": tampered.tensors["scale"]}
    state = _state()
    job = LayerJob(state, torch.nn.Linear(1, 1), "Fp8PtpcOnlineLinearMethod", fmt, "model.layers.0.mlp.up.weight")
    harden_against_vllm(job, attacked, vllm)
    assert state.reports[0].suspicious
    labels = 'format="fp8_per_channel",layer_type="mlp.up.weight",mode="harden",model="m"'
    assert f"qcbguard_tensors_flagged_total{{{labels}}} 1.0" in generate_latest(state.metrics.registry).decode()
    job = LayerJob(_state(on_suspicious="refuse"), torch.nn.Linear(1, 1), "M", fmt, "model.layers.0.mlp.up.weight")
    with pytest.raises(QcbguardError, match="looks tampered"):
        harden_against_vllm(job, attacked, vllm)


# ---- calibrated hardening (the hessians setting) ----


def _hessian(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, 8, generator=g, dtype=torch.float64) @ torch.randn(8, n, generator=g, dtype=torch.float64)
    return x.T @ x + 0.1 * torch.eye(n, dtype=torch.float64)


def _calibrated_state(tmp_path, hessians: dict[str, torch.Tensor]) -> HookState:
    path = tmp_path / "h.safetensors"
    HessianFile.write(path, hessians, tokens=1)
    state = _state(hessians=str(path))
    return dataclasses.replace(state, hessians=HessianFile(path))


def test_settings_take_a_hessians_path():
    assert HookSettings.from_mapping({"hessians": "/h.safetensors"}).hessians == "/h.safetensors"
    with pytest.raises(QcbguardError, match="hessians must be a file path"):
        HookSettings.from_mapping({"hessians": 3})


@pytest.mark.parametrize("tp", [1, 2])
def test_calibrated_qkv_shards_hold_the_tp1_calibrated_codes(tmp_path, tp):
    """q, k and v read one input: their Hessian (stored once, under q_proj's name) calibrates the fused qkv_proj,
    and each TP rank's [q_r; k_r; v_r] holds the TP=1 calibrated codes (rows never feed each other)."""
    heads, kv_heads, head, hidden = 4, 2, 16, 96
    q, k, v = _weight(heads * head, hidden, 1), _weight(kv_heads * head, hidden, 2), _weight(kv_heads * head, hidden, 3)
    h = _hessian(hidden, 1)
    prefix = "model.layers.0.self_attn"
    state = _calibrated_state(tmp_path, {f"{prefix}.{p}_proj.weight": h for p in "qkv"})
    fmt = get_format("fp8_per_channel")
    name = f"{prefix}.qkv_proj.weight"
    full, _ = harden_calibrated(torch.cat([q, k, v]), fmt, name, SEED, h)
    plain, _ = harden_tensor(torch.cat([q, k, v]), fmt, name, SEED)
    assert not torch.equal(_codes("fp8_per_channel", full), _codes("fp8_per_channel", plain))
    for rank in range(tp):
        layer = QKVParallelLinear(rank, tp, heads, kv_heads, head)
        shard = _qkv_shard(q, k, v, rank, tp, kv_heads, head)
        geometry = layer_geometry(layer, shard.shape[0])
        job = LayerJob(state, layer, "Fp8PtpcOnlineLinearMethod", fmt, name)
        nearest = fmt.quantize(shard)
        packed = harden_against_vllm(
            job, shard, {"weight": nearest.tensors["weight"], "scale": nearest.tensors["scale"]}
        )
        rows = torch.cat([torch.arange(run.global_start, run.global_start + run.length) for run in geometry.runs])
        assert torch.equal(_codes("fp8_per_channel", packed), _codes("fp8_per_channel", full)[rows]), rank


def test_calibrated_row_parallel_shards_read_their_own_columns_of_the_hessian(tmp_path):
    """down_proj split by columns: rank r feeds errors along H's block of its own columns."""
    w = _weight(48, 128, 6)
    h = _hessian(128, 2)
    name = "model.layers.0.mlp.down_proj.weight"
    state = _calibrated_state(tmp_path, {name: h})
    fmt = get_format("int8_per_channel")
    for rank in range(2):
        layer = RowParallelLinear(rank, 2, 128)
        shard = w[:, rank * 64 : (rank + 1) * 64]
        cols = slice(rank * 64, (rank + 1) * 64)
        job = LayerJob(state, layer, "M", fmt, name)
        geometry = layer_geometry(layer, 48)
        ours = _codes(
            "int8_per_channel",
            harden_shard(shard, fmt, name, SEED, CONFIG, geometry, plan=calibration_plan(job, 64, geometry))[1],
        )
        expected, _ = harden_calibrated(shard, fmt, name, SEED, h[cols, cols], col_offset=rank * 64)
        assert torch.equal(ours, _codes("int8_per_channel", expected)), rank


@pytest.mark.parametrize("fmt_name", ["int8_per_channel", "fp8_per_channel"])
def test_fused_experts_read_their_own_slice_of_the_stacked_hessians(tmp_path, fmt_name):
    """A mixture of experts: `qcbguard calibrate` stores one Hessian per expert under the experts module's
    gate_up_proj / down_proj (transformers' names; vLLM's Mixtral prefix says block_sparse_moe where transformers
    says mlp). Each expert's w13 and w2 is hardened along its own slice, as harden_calibrated does it; a stack with
    too few experts stops start-up."""
    experts, hidden, inter = 3, 48, 32
    w13 = [_weight(2 * inter, hidden, 40 + e) for e in range(experts)]
    w2 = [_weight(hidden, inter, 50 + e) for e in range(experts)]
    stacks = {
        "model.layers.0.mlp.experts.gate_up_proj": torch.stack([_hessian(hidden, 60 + e) for e in range(experts)]),
        "model.layers.0.mlp.experts.down_proj": torch.stack([_hessian(inter, 70 + e) for e in range(experts)]),
    }
    state = _calibrated_state(tmp_path, stacks)
    fmt = get_format(fmt_name)
    prefix = "model.layers.0.block_sparse_moe.experts"
    for e in range(experts):
        for part, w, stacked in (("w13", w13, "gate_up_proj"), ("w2", w2, "down_proj")):
            name = f"{prefix}.{e}.{part}_weight"
            nearest = fmt.quantize(w[e])
            job = LayerJob(state, torch.nn.Module(), "Int8OnlineMoEMethod", fmt, name)
            geometry = ShardGeometry.whole(w[e].shape[0])
            packed = harden_against_vllm(job, w[e], dict(nearest.tensors), geometry)
            h = state.hessians.get(f"model.layers.0.mlp.experts.{stacked}", e)  # as stored: float32
            expected, _ = harden_calibrated(w[e], fmt, name, SEED, h)
            plain, _ = harden_tensor(w[e], fmt, name, SEED)
            assert torch.equal(_codes(fmt_name, packed), _codes(fmt_name, expected)), (e, part)
            assert not torch.equal(_codes(fmt_name, packed), _codes(fmt_name, plain)), (e, part)
    short = _calibrated_state(tmp_path, {k: v[:2] for k, v in stacks.items()})
    job = LayerJob(short, torch.nn.Module(), "Int8OnlineMoEMethod", fmt, f"{prefix}.2.w13_weight")
    with pytest.raises(QcbguardError, match="no slice for expert 2"):
        calibration_plan(job, hidden, ShardGeometry.whole(2 * inter))


def test_a_layer_without_a_hessian_is_hardened_without_feedback(tmp_path):
    """No Hessian for the layer: the same bytes as without a calibration file; a Hessian too small for the shard's
    columns (a file for another model) stops start-up."""
    state = _calibrated_state(tmp_path, {"model.layers.9.mlp.down_proj.weight": _hessian(64, 3)})
    w = _weight(16, 64, 7)
    fmt = get_format("fp8_per_channel")
    plain = fmt.quantize(w)
    vllm = {"weight": plain.tensors["weight"], "scale": plain.tensors["scale"]}
    name = "model.layers.0.mlp.up_proj.weight"
    got = [
        harden_against_vllm(LayerJob(s, torch.nn.Linear(64, 16), "Fp8PtpcOnlineLinearMethod", fmt, name), w, vllm)
        for s in (state, _state())
    ]
    assert torch.equal(got[0].tensors["weight"].view(torch.uint8), got[1].tensors["weight"].view(torch.uint8))
    big = LayerJob(state, torch.nn.Linear(64, 16), "M", fmt, "model.layers.9.mlp.down_proj.weight")
    with pytest.raises(QcbguardError, match="covers 64 inputs"):
        calibration_plan(big, 64, ShardGeometry((RowRun(0, 16, 0),), col_offset=32))
