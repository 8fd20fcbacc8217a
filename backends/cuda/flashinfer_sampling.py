"""FlashInferSampler: the sampling role with FlashInfer's fused sampling kernels for the random draw.

Everything but the draw is the torch sampler's own code (backends/cpu/torch_sampler.py): the logit
adjustments, greedy rows (argmax, so greedy tokens are identical), and the log-probabilities of the
raw model. The draw is softmax with per-row temperature, then FlashInfer's rejection sampling over
the tokens that top-k, top-p and min-p keep: the same kept set as the torch sampler, the
intersection of the three filters on the temperature-scaled distribution (top-p measured on the full
distribution, min-p relative to the most likely token).

Determinism. Each row's Philox seed is derived from the request's (seed, step), as the torch
sampler's keys are, so a request with a fixed seed draws the same tokens again for the same logits
-- but only at the same row of the batch: FlashInfer feeds the row index into Philox's subsequence,
so the draw of a request that lands in another batch slot differs. The torch sampler's draws never
depend on the batch around a request; this one's do. The draws also differ from the torch
sampler's (another random stream), with the same distribution.
"""
from __future__ import annotations

from typing import Optional

import torch

from backends.cpu.torch_sampler import TorchSampler, rng_keys
from backends.cuda.flashinfer_attention import import_flashinfer
from engine.sampling.sampling_batch_info import SamplingBatchInfo


class FlashInferSampler(TorchSampler):
    def __init__(self, vocab_size: int, device: torch.device, **kw) -> None:
        super().__init__(vocab_size, device, **kw)
        self._sampling = import_flashinfer().sampling

    def _draw(self, x: torch.Tensor, info: SamplingBatchInfo, rows: Optional[torch.Tensor]) -> torch.Tensor:
        """Rows ``rows`` (None: all) of the adjusted logits x: [B, V] float32 -> [R] int64 token ids."""
        fs = self._sampling
        pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))  # noqa: E731
        probs = fs.softmax(pick(x), temperature=pick(info.temperatures))           # [R, V] float32
        top_ks, top_ps = pick(info.top_ks).to(torch.int32), pick(info.top_ps)
        seed = rng_keys(pick(info.seeds), pick(info.steps))                         # [R] int64, a fresh stream per step
        offset = torch.zeros_like(seed)
        if info.need_min_p:
            # top-p on the full distribution first; top-k and min-p keep the same tokens of the
            # renormalised one (a prefix by rank; a ratio to the largest probability)
            if info.need_top_p:
                probs = fs.top_p_renorm_probs(probs, top_ps)
            if info.need_top_k:
                probs = fs.top_k_renorm_probs(probs, top_ks)
            ids = fs.min_p_sampling_from_probs(probs, pick(info.min_ps), seed=seed, offset=offset)
        elif not (info.need_top_k or info.need_top_p):
            ids = fs.sampling_from_probs(probs, seed=seed, offset=offset)                  # plain draw
        else:
            # "joint": a token is kept when fewer than k tokens, and less than top_p of the mass,
            # are more likely than it -- the torch sampler's kept set
            ids = fs.top_k_top_p_sampling_from_probs(probs, top_ks, top_ps, filter_apply_order="joint",
                                                     seed=seed, offset=offset)
        return ids.to(torch.int64)
