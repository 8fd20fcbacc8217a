"""One attention step's inputs for the backend tests (torch and Triton on the CPU, Triton and
FlashInfer on the GPU): random q/k/v of the new tokens and the ForwardBatch that places them."""
from __future__ import annotations

import torch

from engine.runner.forward_batch import ForwardBatch


def step_inputs(mode, req_to_token: torch.Tensor, rows: torch.Tensor, prefix_lens: list[int], ext_lens: list[int],
                num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, g: torch.Generator,
                device: torch.device = torch.device("cpu")) -> tuple[ForwardBatch, tuple[torch.Tensor, ...]]:
    """Request i (row ``rows[i]`` of req_to_token, whose slots are already set) has
    ``prefix_lens[i]`` cached tokens and ``ext_lens[i]`` new ones; returns (batch, (q, k, v))."""
    seq = [p + n for p, n in zip(prefix_lens, ext_lens)]
    t = sum(ext_lens)
    q = torch.randn(t, num_q_heads, head_dim, device=device, generator=g).to(dtype)
    k = torch.randn(t, num_kv_heads, head_dim, device=device, generator=g).to(dtype)
    v = torch.randn(t, num_kv_heads, head_dim, device=device, generator=g).to(dtype)
    loc = torch.cat([req_to_token[r, p:s].long() for r, p, s in zip(rows.tolist(), prefix_lens, seq)])
    batch = ForwardBatch(
        mode=mode, batch_size=len(seq), input_ids=torch.zeros(t, dtype=torch.int64, device=device),
        positions=torch.zeros(t, dtype=torch.int64, device=device), req_pool_indices=rows,
        seq_lens=torch.tensor(seq, device=device), out_cache_loc=loc, seq_lens_cpu=seq,
        extend_prefix_lens=torch.tensor(prefix_lens, device=device),
        extend_seq_lens=torch.tensor(ext_lens, device=device), extend_prefix_lens_cpu=list(prefix_lens),
        extend_seq_lens_cpu=list(ext_lens))
    return batch, (q, k, v)
