"""The reference the engine is held to: transformers' model on the same checkpoint, decoding
greedily with its own KV cache (no EOS handling, so any length can be compared)."""
from __future__ import annotations

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
