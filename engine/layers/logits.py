"""LogitsProcessor: final hidden states of the rows that need a next token -> fp32 logits; and,
for requests that asked, the log-probabilities of their prompt tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.vocab_embedding import VocabParallelEmbedding
from engine.runner.forward_batch import PromptLogprobs

# Prompt logprobs are computed this many logits at a time ([rows, vocab] fp32 = 256 MiB), so a
# long prompt never holds a [prompt_len, vocab] tensor.
_PROMPT_LOGPROB_CHUNK_ELEMS = 1 << 26


class LogitsProcessor(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor, lm_head: VocabParallelEmbedding, forward_batch) -> torch.Tensor:
        """hidden: [num_tokens, hidden_size] -> logits [num_logits, vocab_size] fp32, for the rows
        ``forward_batch.logits_indices`` (all rows when it is None)."""
        if forward_batch.prompt_logprob_rows is not None:
            forward_batch.prompt_logprobs = self._prompt_logprobs(hidden, lm_head, forward_batch)
        idx = forward_batch.logits_indices
        if idx is not None:
            hidden = hidden.index_select(0, idx)
        logits = self._logits(hidden, lm_head)
        out = forward_batch.logits_out
        if out is not None:
            out = out[: logits.shape[0]]
            out.copy_(logits)     # the same one conversion to fp32 as .float(), into place
            return out
        return logits.float()

    def _logits(self, hidden: torch.Tensor, lm_head: VocabParallelEmbedding) -> torch.Tensor:
        logits = F.linear(hidden, lm_head.weight)  # [rows, rows_per_rank]
        if lm_head.tp_size > 1:
            logits = lm_head.collectives.all_gather(logits, dim=-1)
        if logits.shape[-1] != self.vocab_size:
            logits = logits[:, : self.vocab_size]
        return logits

    def _prompt_logprobs(self, hidden: torch.Tensor, lm_head: VocabParallelEmbedding,
                         forward_batch) -> PromptLogprobs:
        """log_softmax at ``prompt_logprob_rows``, gathered at their targets (and the top k), a
        chunk of rows at a time. Every tensor-parallel rank runs it: the all-gather is collective."""
        rows, targets = forward_batch.prompt_logprob_rows, forward_batch.prompt_logprob_targets
        k = forward_batch.prompt_top_logprobs_num
        step = max(1, _PROMPT_LOGPROB_CHUNK_ELEMS // self.vocab_size)
        values, top_values, top_ids = [], [], []
        for a in range(0, rows.numel(), step):
            logprobs = torch.log_softmax(self._logits(hidden.index_select(0, rows[a: a + step]), lm_head)
                                         .float(), dim=-1)   # [chunk, vocab]
            values.append(logprobs.gather(1, targets[a: a + step, None]).squeeze(1))
            if k:
                v, i = logprobs.topk(k, dim=-1)
                top_values.append(v)
                top_ids.append(i)
        return PromptLogprobs(torch.cat(values), torch.cat(top_values) if k else None,
                              torch.cat(top_ids) if k else None)
