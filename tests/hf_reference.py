"""The reference the engine is held to: transformers' model on the same checkpoint, decoding
greedily with its own KV cache (no EOS handling, so any length can be compared)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


def hf_greedy(model, prompt_ids: list[int], n_tokens: int) -> list[int]:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    out, past = [], None
    with torch.inference_mode():
        for _ in range(n_tokens):
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.tensor([[nxt]], device=device)
    return out


def hf_model(path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()


@contextlib.contextmanager
def kv_rounded_to(dtype: Optional[torch.dtype]) -> Iterator[None]:
    """Within it, transformers' KV cache stores K and V as an engine's KV pool of ``dtype`` does
    (fp8: saturated and rounded, read back in the model's dtype), so its attention sees the same
    keys and values: the reference for --kv-cache-dtype fp8_*. None changes nothing."""
    from transformers.cache_utils import DynamicCache

    from engine.mem_cache.kv_pool import to_kv_dtype

    if dtype is None:
        yield
        return
    update = DynamicCache.update

    def rounded_update(self, key_states, value_states, *args, **kwargs):
        return update(self, to_kv_dtype(key_states, dtype).to(key_states.dtype),
                      to_kv_dtype(value_states, dtype).to(value_states.dtype), *args, **kwargs)

    DynamicCache.update = rounded_update
    try:
        yield
    finally:
        DynamicCache.update = update
