"""chat_template_kwargs on the tiny Qwen3 model (random weights, CPU): enable_thinking false
prefills the template's empty think block, which the engine then sees as prompt tokens."""
from __future__ import annotations

from engine import Engine
from engine.entrypoints.openai.context import ApiContext

USER = [{"role": "user", "content": "What is 2 + 2?"}]


def test_enable_thinking_false_prefills_an_empty_think_block(qwen3_tiny):
    with Engine(model_path=str(qwen3_tiny), device="cpu", dtype="float32", reasoning_parser="qwen3") as e:
        tm = e.tokenizer_manager
        thinking = tm.apply_chat_template(USER)
        plain = tm.apply_chat_template(USER, template_kwargs={"enable_thinking": False})
        outs = e.generate(input_ids=[thinking, plain], sampling_params={"max_new_tokens": 1, "temperature": 0.0})
        end_id = ApiContext(tm, e.server_args).single_token_id("</think>")
    assert tm.tokenizer.decode(plain[len(thinking):]) == "<think>\n\n</think>\n\n"
    assert plain[:len(thinking)] == thinking
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [len(thinking), len(plain)]
    # the end tag is one token, so answers can report completion_tokens_details.reasoning_tokens
    assert end_id is not None and end_id in plain
