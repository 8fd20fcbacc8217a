"""Run a model step by step without the scheduler: naive KV slots, hand-built ForwardBatch
objects for extend and decode, and greedy decoding. For model and attention tests."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from engine.mem_cache.kv_pool import KVPool
from engine.runner.forward_batch import ForwardBatch, ForwardMode
from hal.attention import AttentionBackend


class ModelHarness:
    """Request slot ``r`` owns positions [0, max_context) at contiguous KV slots starting at a
    page boundary; ``self.lens[r]`` tokens of it are cached."""

    def __init__(self, model: torch.nn.Module, *, page_size: int = 1, max_reqs: int = 8,
                 max_context: int = 256, backend: str = "torch", device: str = "cpu",
                 kv_dtype: Optional[torch.dtype] = None) -> None:
        cfg = model.config
        attn = model.model.layers[0].self_attn
        self.model = model
        self.device = torch.device(device)
        self.max_context = max_context
        dtype = next(model.parameters()).dtype
        pages_per_req = -(-max_context // page_size)
        self.kv_pool = KVPool(num_layers=cfg.num_hidden_layers, num_kv_heads=attn.num_kv_heads, head_dim=cfg.head_dim,
                              dtype=kv_dtype or dtype, device=self.device, num_pages=max_reqs * pages_per_req,
                              page_size=page_size)
        base = torch.arange(max_reqs, dtype=torch.int32)[:, None] * (pages_per_req * page_size)
        self.req_to_token = (base + torch.arange(max_context, dtype=torch.int32)).to(self.device)
        self.attn_backend = make_backend(backend, num_q_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads,
                                         head_dim=cfg.head_dim, kv_pool=self.kv_pool,
                                         req_to_token=self.req_to_token, page_size=page_size, dtype=dtype,
                                         device=self.device)
        self.lens = [0] * max_reqs

    def reset(self) -> None:
        self.lens = [0] * len(self.lens)

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def extend(self, reqs: Sequence[int], tokens: Sequence[Sequence[int]], all_logits: bool = False) -> torch.Tensor:
        """Append ``tokens[i]`` to request ``reqs[i]`` after what it has cached. Returns fp32
        logits of each request's last token [B, vocab] (every token's with ``all_logits``)."""
        prefix = [self.lens[r] for r in reqs]
        ext = [len(t) for t in tokens]
        seq = [p + n for p, n in zip(prefix, ext)]
        if max(seq) > self.max_context:
            raise ValueError(f"sequence of {max(seq)} tokens exceeds the harness's max_context {self.max_context}")
        rows = self._tensor(list(reqs))
        positions = torch.cat([torch.arange(p, s) for p, s in zip(prefix, seq)]).to(self.device)
        loc = torch.cat([self.req_to_token[r, p:s] for r, p, s in zip(reqs, prefix, seq)]).long()
        batch = ForwardBatch(
            mode=ForwardMode.EXTEND, batch_size=len(reqs),
            input_ids=self._tensor([t for ts in tokens for t in ts]), positions=positions,
            req_pool_indices=rows, seq_lens=self._tensor(seq), out_cache_loc=loc, seq_lens_cpu=seq,
            extend_prefix_lens=self._tensor(prefix), extend_seq_lens=self._tensor(ext),
            extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=ext,
            logits_indices=None if all_logits else torch.cumsum(self._tensor(ext), 0) - 1,
            attn_backend=self.attn_backend)
        logits = self._run(batch)
        for r, s in zip(reqs, seq):
            self.lens[r] = s
        return logits

    def decode(self, reqs: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """One new token per request -> fp32 logits [B, vocab]."""
        prefix = [self.lens[r] for r in reqs]
        seq = [p + 1 for p in prefix]
        batch = ForwardBatch(
            mode=ForwardMode.DECODE, batch_size=len(reqs), input_ids=self._tensor(list(tokens)),
            positions=self._tensor(prefix), req_pool_indices=self._tensor(list(reqs)),
            seq_lens=self._tensor(seq),
            out_cache_loc=self.req_to_token[self._tensor(list(reqs)), self._tensor(prefix)].long(),
            seq_lens_cpu=seq, logits_indices=torch.arange(len(reqs), device=self.device),
            attn_backend=self.attn_backend)
        logits = self._run(batch)
        for r, s in zip(reqs, seq):
            self.lens[r] = s
        return logits

    def _run(self, batch: ForwardBatch) -> torch.Tensor:
        self.attn_backend.init_forward_metadata(batch)
        with torch.inference_mode():
            return self.model(batch.input_ids, batch.positions, batch)

    def generate_greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                        eos_ids: Sequence[int] = (), first_chunk: Optional[int] = None) -> list[list[int]]:
        """Greedy decoding of all prompts as one batch (one extend, then decode steps); a request
        stops after an EOS token. ``first_chunk`` splits each prompt's extend in two steps."""
        self.reset()
        reqs = list(range(len(prompts)))
        if first_chunk:
            self.extend(reqs, [p[:first_chunk] for p in prompts])
            logits = self.extend(reqs, [p[first_chunk:] for p in prompts])
        else:
            logits = self.extend(reqs, prompts)
        outputs: list[list[int]] = [[] for _ in prompts]
        active = reqs
        while True:
            next_ids = logits.argmax(-1).tolist()
            still = []
            for r, t in zip(active, next_ids):
                outputs[r].append(t)
                if t not in eos_ids and len(outputs[r]) < max_new_tokens:
                    still.append(r)
            if not still:
                return outputs
            active = still
            logits = self.decode(active, [outputs[r][-1] for r in active])


def make_backend(name: str, **kw) -> AttentionBackend:
    from hal.registry import entries

    return entries("attention")[name].factory(**kw)
