"""Loading the Hugging Face tokenizer and applying its chat template."""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

logger = logging.getLogger(__name__)


def load_tokenizer(path: str, *, trust_remote_code: bool = False, chat_template: Optional[str] = None):
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if chat_template:
        if os.path.isfile(chat_template):
            with open(chat_template) as f:
                chat_template = f.read()
        tok.chat_template = chat_template
    return tok


def apply_chat_template(tokenizer, messages: list[dict[str, Any]], tools: Optional[list[dict]] = None,
                        add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
    """Render messages with the tokenizer's template and tokenize (no extra special tokens).
    ``kwargs``: extra template variables (a request's chat_template_kwargs, e.g. enable_thinking)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; pass --chat-template or use "
                         "/v1/completions")
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                         tokenize=False, **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)
