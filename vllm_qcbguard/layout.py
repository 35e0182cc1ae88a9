"""Reading a vLLM linear layer's tensor-parallel layout: which global rows and columns its local weight holds.

Read from the attributes vLLM 0.32/0.33 linear layers carry (no vLLM import, so it is testable with plain objects):
- ColumnParallelLinear / MergedColumnParallelLinear: `output_sizes` (global size of each fused part; absent for a
  single part), `output_partition_sizes` (local sizes), `tp_rank`; part i of rank r starts at global row
  sum(output_sizes[:i]) + r * local_i.
- QKVParallelLinear: the k and v parts hold kv head group r // num_kv_head_replicas (kv heads are replicated when
  tp_size > total_num_kv_heads); their global sizes are total_num_kv_heads * head_size (v_head_size for v).
- RowParallelLinear: all rows, columns from tp_rank * input_size_per_partition.
- ReplicatedLinear and anything with tp_size 1: the whole weight.
- Fused experts (expert_layout): the method's FusedMoEConfig `moe` (tp_rank, tp_size, w13_num_shards) and the layer's
  `_expert_map` (global expert -> local slot, -1 elsewhere; None without expert parallelism). Under MoE tensor
  parallelism rank r holds rows [w1_r; w3_r] of each expert's w13 (global rows s * I + r * I_local for shard s, with
  I = I_local * tp_size) and columns r * I_local.. of its w2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .shard import RowRun, ShardGeometry

__all__ = ["ExpertLayout", "expert_layout", "layer_geometry", "layer_type"]


def _runs(global_sizes: list[int], local_sizes: list[int], ranks: list[int]) -> tuple[RowRun, ...]:
    runs = []
    local = global_base = 0
    for g, n, r in zip(global_sizes, local_sizes, ranks, strict=True):
        runs.append(RowRun(local, n, global_base + r * n))
        local += n
        global_base += g
    return tuple(runs)


def layer_geometry(layer: Any, rows: int) -> ShardGeometry:
    """Where the local weight [rows, cols] of `layer` sits in the TP=1 fused weight."""
    kind = type(layer).__name__
    tp_size = int(getattr(layer, "tp_size", 1) or 1)
    tp_rank = int(getattr(layer, "tp_rank", 0) or 0)
    if tp_size == 1 or kind == "ReplicatedLinear":
        return ShardGeometry.whole(rows)
    if kind == "RowParallelLinear" or "RowParallel" in kind:
        return ShardGeometry((RowRun(0, rows, 0),), tp_rank * int(layer.input_size_per_partition))
    if "ColumnParallel" not in kind and kind != "QKVParallelLinear":
        raise ValueError(f"qcbguard does not know the tensor-parallel layout of {kind} at tp_size {tp_size}")
    local_sizes = [int(s) for s in layer.output_partition_sizes]
    if kind == "QKVParallelLinear":
        kv_rank = tp_rank // int(layer.num_kv_head_replicas)
        v_head = int(getattr(layer, "v_head_size", layer.head_size))
        global_sizes = [
            int(layer.total_num_heads) * int(layer.head_size),
            int(layer.total_num_kv_heads) * int(layer.head_size),
            int(layer.total_num_kv_heads) * v_head,
        ]
        return ShardGeometry(_runs(global_sizes, local_sizes, [tp_rank, kv_rank, kv_rank]))
    global_sizes = [int(s) for s in getattr(layer, "output_sizes", None) or [layer.output_size]]
    return ShardGeometry(_runs(global_sizes, local_sizes, [tp_rank] * len(local_sizes)))


def layer_type(prefix: str) -> str:
    """Metric label for a layer: its name after the decoder-layer index ("self_attn.qkv_proj"), else the last part."""
    parts = prefix.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i + 1 < len(parts):
            return ".".join(parts[i + 1 :])
    return parts[-1] if parts else prefix


@dataclass(frozen=True)
class ExpertLayout:
    """Where one rank's fused-expert weights sit in the TP=1, all-experts model."""

    global_ids: tuple[int, ...]  # global expert id of each local slot
    w13: ShardGeometry
    w2: ShardGeometry


def expert_layout(moe: Any, expert_map: Any, w13_shape: tuple[int, ...], w2_shape: tuple[int, ...]) -> ExpertLayout:
    """The layout of a rank's w13 [local_experts, w13_rows, hidden] and w2 [local_experts, hidden, w2_cols]."""
    local_experts, w13_rows = int(w13_shape[0]), int(w13_shape[1])
    w2_rows, w2_cols = int(w2_shape[1]), int(w2_shape[2])
    if expert_map is None:
        ids = tuple(range(local_experts))
    else:
        slots = {int(slot): e for e, slot in enumerate(expert_map.tolist()) if int(slot) >= 0}
        if sorted(slots) != list(range(local_experts)):
            raise ValueError(f"the expert map gives local slots {sorted(slots)}, the layer holds {local_experts}")
        ids = tuple(slots[i] for i in range(local_experts))
    tp_size, tp_rank = int(getattr(moe, "tp_size", 1) or 1), int(getattr(moe, "tp_rank", 0) or 0)
    if tp_size == 1:
        return ExpertLayout(ids, ShardGeometry.whole(w13_rows), ShardGeometry.whole(w2_rows))
    shards = int(getattr(moe, "w13_num_shards", 2))
    local = w13_rows // shards
    if local * shards != w13_rows or local != w2_cols:
        raise ValueError(f"w13 rows {w13_rows} are not {shards} shards of the w2 columns {w2_cols}")
    runs = tuple(RowRun(s * local, local, s * local * tp_size + tp_rank * local) for s in range(shards))
    return ExpertLayout(ids, ShardGeometry(runs), ShardGeometry((RowRun(0, w2_rows, 0),), tp_rank * local))
