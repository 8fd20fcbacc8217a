"""Linear layers that know tensor parallelism and load their own shard of a checkpoint tensor.

Column-parallel layers split the output features across ranks; row-parallel layers split the
input features and all-reduce the partial sums. Fused layers (q/k/v, gate/up) hold several
checkpoint tensors stacked along the output dimension so one matmul serves them all.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from engine.layers.ops import get_layer_ops
from engine.layers.parallel_state import get_tp_collectives, get_tp_rank, get_tp_size

ShardId = Union[str, int]


def _check_shape(param: nn.Parameter, expected: tuple[int, ...], got: torch.Tensor, what: str) -> None:
    if tuple(got.shape) != tuple(expected):
        raise ValueError(f"{what}: checkpoint tensor has shape {tuple(got.shape)} but the model expects "
                         f"{tuple(expected)} (this rank's parameter is {tuple(param.shape)}); "
                         f"does config.json match the weights?")


def _split(size: int, tp_size: int, what: str) -> int:
    if size % tp_size:
        raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel size {tp_size}")
    return size // tp_size


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, tp_rank: Optional[int],
                 tp_size: Optional[int]) -> None:
        super().__init__()
        self.tp_rank = get_tp_rank() if tp_rank is None else tp_rank
        self.tp_size = get_tp_size() if tp_size is None else tp_size
        self.collectives = get_tp_collectives()
        self.layer_ops = get_layer_ops()
        # [output_size_per_rank, input_size_per_rank]
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None
        self.weight.weight_loader = self.weight_loader
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Optional[ShardId] = None) -> None:
        raise NotImplementedError

    def checkpoint_shapes(self, param: nn.Parameter) -> dict[Optional[ShardId], tuple[int, ...]]:
        """The full (unsharded) shape of each checkpoint tensor ``weight_loader`` takes for
        ``param``, by shard id (None: a single tensor). Dummy weights are made at these shapes so
        that every tensor-parallel size slices the same full tensors."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_ops.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    """Y = X W^T with the whole W on every rank: for small matrices whose output every rank needs
    whole (a mixture-of-experts router, a shared expert's gate)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *,
                 tp_rank: Optional[int] = None, tp_size: Optional[int] = None) -> None:
        super().__init__(input_size, output_size, bias, tp_rank, tp_size)
        self.input_size = input_size
        self.output_size = output_size

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        _check_shape(param, param.shape, loaded, "replicated linear")
        param.data.copy_(loaded)

    def checkpoint_shapes(self, param):
        return {None: tuple(param.shape)}


class ColumnParallelLinear(LinearBase):
    """Y = X W^T with W split along its output rows; each rank returns its slice of Y."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *,
                 tp_rank: Optional[int] = None, tp_size: Optional[int] = None) -> None:
        size = tp_size if tp_size is not None else get_tp_size()
        super().__init__(input_size, _split(output_size, size, "output size"), bias, tp_rank, tp_size)
        self.input_size = input_size
        self.output_size = output_size

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        rows = param.shape[0]
        _check_shape(param, (self.output_size, *param.shape[1:]), loaded, "column-parallel linear")
        param.data.copy_(loaded.narrow(0, self.tp_rank * rows, rows))

    def checkpoint_shapes(self, param):
        return {None: (self.output_size, *param.shape[1:])}

    def forward_normed(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """self(norm(x)) for an RMSNorm ``norm`` (its ``weight`` and ``eps``) that nothing else
        reads: the layer ops may fold it into the matmul. The input is replicated on every rank,
        so this holds at any TP size."""
        return self.layer_ops.rms_norm_linear(x, norm.weight, norm.eps, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices stacked on the output dim (gate_proj and up_proj).

    Shard i is checkpoint matrix i; shard None is all of them stacked in one checkpoint tensor
    (Phi-3's ``gate_up_proj`` [gate | up]), whose rows go to the same places. ``checkpoint_fused``:
    the checkpoints hold that one tensor, so dummy weights draw it (see ``checkpoint_shapes``)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, *,
                 tp_rank: Optional[int] = None, tp_size: Optional[int] = None) -> None:
        super().__init__(input_size, sum(output_sizes), bias, tp_rank=tp_rank, tp_size=tp_size)
        self.output_sizes = list(output_sizes)
        self.shard_ids: tuple[ShardId, ...] = tuple(range(len(output_sizes)))
        self.checkpoint_fused = False

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        if shard_id is None:
            _check_shape(param, (self.output_size, *param.shape[1:]), loaded, "fused merged linear")
            for i in self.shard_ids:
                self._load_rows(param, loaded, i, sum(self.output_sizes[:i]))
            return
        full = self.output_sizes[shard_id]
        _check_shape(param, (full, *param.shape[1:]), loaded, f"merged linear shard {shard_id}")
        self._load_rows(param, loaded, shard_id, 0)

    def _load_rows(self, param, loaded, shard_id: int, start: int) -> None:
        """This rank's rows of shard ``shard_id``, which begins at row ``start`` of ``loaded``."""
        rows = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        param.data.narrow(0, offset, rows).copy_(loaded.narrow(0, start + self.tp_rank * rows, rows))

    def checkpoint_shapes(self, param):
        if self.checkpoint_fused:
            return {None: (self.output_size, *param.shape[1:])}
        return {i: (size, *param.shape[1:]) for i, size in enumerate(self.output_sizes)}


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix: [q heads | k heads | v heads] of this rank.

    With fewer KV heads than ranks, each rank keeps a copy of the KV head its q heads use. Shards
    "q", "k", "v" are the three checkpoint matrices; shard None is one checkpoint tensor of all three
    stacked [q | k | v] (Phi-3's ``qkv_proj``), from which each rank takes its q heads and its k and
    v heads. ``checkpoint_fused``: the checkpoints hold that one tensor, so dummy weights draw it.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, *, tp_rank: Optional[int] = None, tp_size: Optional[int] = None) -> None:
        tp = tp_size if tp_size is not None else get_tp_size()
        heads = _split(num_heads, tp, "number of attention heads")
        if num_kv_heads >= tp:
            kv_heads, kv_replicas = _split(num_kv_heads, tp, "number of KV heads"), 1
        else:
            kv_heads, kv_replicas = 1, _split(tp, num_kv_heads, "tensor-parallel size over KV heads")
        super().__init__(hidden_size, (heads + 2 * kv_heads) * head_dim * tp, bias,
                         tp_rank=tp_rank, tp_size=tp_size)
        self.head_dim = head_dim
        self.num_heads, self.num_kv_heads, self.kv_replicas = heads, kv_heads, kv_replicas
        self.total_heads = {"q": num_heads, "k": num_kv_heads, "v": num_kv_heads}
        self.q_size = self.num_heads * head_dim    # per rank
        self.kv_size = self.num_kv_heads * head_dim
        self.shard_ids = ("q", "k", "v")
        self.checkpoint_fused = False

    def _full_rows(self, shard_id: Optional[ShardId]) -> int:
        if shard_id is None:
            return sum(self.total_heads.values()) * self.head_dim
        return self.total_heads[shard_id] * self.head_dim

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        full = self._full_rows(shard_id)
        what = "fused qkv linear" if shard_id is None else f"qkv linear shard {shard_id}"
        _check_shape(param, (full, *param.shape[1:]), loaded, what)
        if shard_id is not None:
            return self._load_rows(param, loaded, shard_id, 0)
        start = 0
        for s in self.shard_ids:
            self._load_rows(param, loaded, s, start)
            start += self._full_rows(s)

    def _load_rows(self, param, loaded, shard_id: str, start: int) -> None:
        """This rank's heads of shard ``shard_id``, which begins at row ``start`` of ``loaded``."""
        if shard_id == "q":
            offset, rows, head_index = 0, self.q_size, self.tp_rank
        else:
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            rows, head_index = self.kv_size, self.tp_rank // self.kv_replicas
        param.data.narrow(0, offset, rows).copy_(loaded.narrow(0, start + head_index * rows, rows))

    def checkpoint_shapes(self, param):
        if self.checkpoint_fused:
            return {None: (self._full_rows(None), *param.shape[1:])}
        return {s: (self._full_rows(s), *param.shape[1:]) for s in self.shard_ids}


class RowParallelLinear(LinearBase):
    """Y = X W^T with W split along its input columns; partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *, reduce_results: bool = True,
                 tp_rank: Optional[int] = None, tp_size: Optional[int] = None) -> None:
        size = tp_size if tp_size is not None else get_tp_size()
        super().__init__(_split(input_size, size, "input size"), output_size, bias, tp_rank, tp_size)
        self.input_size = input_size
        self.output_size = output_size
        self.reduce_results = reduce_results

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        if param.dim() == 1:  # the bias is not split: added once, after the reduction
            _check_shape(param, param.shape, loaded, "row-parallel bias")
            param.data.copy_(loaded)
            return
        cols = param.shape[1]
        _check_shape(param, (param.shape[0], self.input_size), loaded, "row-parallel linear")
        param.data.copy_(loaded.narrow(1, self.tp_rank * cols, cols))

    def checkpoint_shapes(self, param):
        if param.dim() == 1:
            return {None: tuple(param.shape)}
        return {None: (param.shape[0], self.input_size)}

    def forward(self, x: torch.Tensor, silu_mul_input: bool = False,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """With silu_mul_input, x is the MLP's [gate | up] and SiLU-and-mul is applied first (in
        the same kernel where the layer ops can). residual: added to the (reduced) output, in the
        matmul's kernel on one rank, where the sum may be written over it (the caller gives it up)."""
        if self.tp_size == 1:
            return self.layer_ops.linear(x, self.weight, self.bias, silu_mul_input=silu_mul_input,
                                         residual=residual)
        out = self.layer_ops.linear(x, self.weight, silu_mul_input=silu_mul_input)
        if self.reduce_results:
            out = self.collectives.all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out if residual is None else out + residual
