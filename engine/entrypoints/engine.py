"""The offline Engine, shaped like SGLang's: ``Engine(model_path=..., **server_args)``,
``generate``, ``async_generate``, streaming, ``shutdown``. The scheduler runs in a thread of
this process (with dp_size > 1, one process per replica); the same TokenizerManager as the
server handles text."""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, AsyncIterator, Iterator, Optional, Union

from engine.entrypoints.fanout import FanOut
from engine.entrypoints.dp_client import make_scheduler_client
from engine.entrypoints.tokenizer_manager import TokenizerManager
from engine.io_struct import GenerateRequest
from engine.server_args import ServerArgs

logger = logging.getLogger(__name__)

Prompt = Union[str, list[str], None]
InputIds = Union[list[int], list[list[int]], None]
Params = Union[dict[str, Any], list[dict[str, Any]], None]


def resolve_model_path(model_path: Optional[str]) -> str:
    """The checkpoint folder to serve (the demo model when none is given); fails fast and
    plainly when the folder is not a checkpoint."""
    if not model_path:
        from engine.models.make_model import default_model_path

        return str(default_model_path())
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        what = "does not exist" if not os.path.exists(model_path) else "has no config.json"
        raise FileNotFoundError(f"--model-path {model_path} {what}: give a folder holding a Hugging "
                                f"Face checkpoint (config.json, *.safetensors, tokenizer files)")
    return model_path


class Engine:
    def __init__(self, model_path: Optional[str] = None, device: str = "auto", **kwargs: Any) -> None:
        from engine.entrypoints.logging_setup import setup_logging

        self.server_args = ServerArgs.from_kwargs(model_path=resolve_model_path(model_path),
                                                  device=device, **kwargs)
        setup_logging(self.server_args.log_level)
        # Data-parallel replicas run in processes: threads would share one interpreter lock.
        self._client = make_scheduler_client(self.server_args,
                                             "thread" if self.server_args.dp_size == 1 else "process")
        self.loop = asyncio.new_event_loop()
        self.tokenizer_manager = TokenizerManager(self.server_args, self._client, self._client.info)
        self.tokenizer_manager.attach_loop(self.loop)
        self.tokenizer = self.tokenizer_manager.tokenizer
        self._closed = False

    # the scheduler object, for tests and tools that inspect the cache
    @property
    def scheduler(self):
        if not hasattr(self._client, "scheduler"):
            raise AttributeError("Engine.scheduler is only there with dp_size=1 (the scheduler runs "
                                 "in this process); data-parallel replicas run in their own processes")
        if self._client.scheduler is None:
            raise RuntimeError("Engine.scheduler: the engine is shut down (its device memory was given back)")
        return self._client.scheduler

    # -- public API ----------------------------------------------------------------------------
    def generate(self, prompt: Prompt = None, sampling_params: Params = None, input_ids: InputIds = None,
                 stream: bool = False, return_logprob: bool = False, top_logprobs_num: int = 0,
                 rid: Optional[Union[str, list[str]]] = None,
                 logprob_start_len: Optional[Union[int, list[int]]] = None) -> Any:
        """One prompt -> a dict; a list of prompts (or n > 1) -> a list of dicts, prompt-major.
        With stream=True, an iterator of cumulative dicts (each with its "index").
        ``logprob_start_len`` (one, or one per prompt; with return_logprob): the prompt tokens from
        there on get logprobs in meta_info["input_token_logprobs"], SGLang's way."""
        reqs, single = self._make_requests(prompt, sampling_params, input_ids, stream, return_logprob,
                                           top_logprobs_num, rid, logprob_start_len)
        if stream:
            return self._sync_iter(self._stream(reqs))
        results = self.loop.run_until_complete(self._gather(reqs))
        return results[0] if single else results

    async def async_generate(self, prompt: Prompt = None, sampling_params: Params = None,
                             input_ids: InputIds = None, stream: bool = False, return_logprob: bool = False,
                             top_logprobs_num: int = 0, rid: Optional[Union[str, list[str]]] = None,
                             logprob_start_len: Optional[Union[int, list[int]]] = None) -> Any:
        """The same as generate, from a coroutine running on ``engine.loop``; with stream=True
        it returns an async iterator."""
        reqs, single = self._make_requests(prompt, sampling_params, input_ids, stream, return_logprob,
                                           top_logprobs_num, rid, logprob_start_len)
        if stream:
            return self._stream(reqs)
        results = await self._gather(reqs)
        return results[0] if single else results

    def flush_cache(self) -> bool:
        return self.loop.run_until_complete(self.tokenizer_manager.flush_cache())

    def get_stats(self):
        return self.loop.run_until_complete(self.tokenizer_manager.get_stats())

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client.shutdown()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- internals -----------------------------------------------------------------------------
    def _make_requests(self, prompt: Prompt, sampling_params: Params, input_ids: InputIds, stream: bool,
                       return_logprob: bool, top_logprobs_num: int, rid: Optional[Union[str, list[str]]],
                       logprob_start_len: Optional[Union[int, list[int]]] = None
                       ) -> tuple[list[GenerateRequest], bool]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt or input_ids")
        if prompt is not None:
            single = isinstance(prompt, str)
            items = [prompt] if single else list(prompt)
            key = "text"
        else:
            single = not input_ids or not isinstance(input_ids[0], list)
            items = [input_ids] if single else list(input_ids)
            key = "input_ids"
        if not items:
            raise ValueError(f"{'prompt' if key == 'text' else 'input_ids'}: the batch is empty")
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(items):
                raise ValueError(f"sampling_params: {len(sampling_params)} given for {len(items)} prompts")
            plist = sampling_params
        else:
            plist = [sampling_params or {}] * len(items)
        rids = rid if isinstance(rid, list) else [rid] * len(items)
        starts = logprob_start_len if isinstance(logprob_start_len, list) else [logprob_start_len] * len(items)
        if len(starts) != len(items):
            raise ValueError(f"logprob_start_len: {len(starts)} given for {len(items)} prompts")
        tm = self.tokenizer_manager
        reqs = []
        for i, (item, p) in enumerate(zip(items, plist)):
            if not isinstance(p, dict):
                raise ValueError(f"sampling_params must be a dict, got {type(p).__name__}")
            n = p.get("n", 1)
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"n must be an integer >= 1, got {n!r}")
            base = rids[i] or tm.new_rid()
            for j in range(n):
                pj = dict(p, n=1)  # samples are separate requests sharing the prompt's KV
                if n > 1 and pj.get("seed") is not None:
                    pj["seed"] += j
                r = GenerateRequest(**{key: item}, sampling_params=pj, rid=base if n == 1 else f"{base}-{j}",
                                    stream=stream, return_logprob=return_logprob,
                                    top_logprobs_num=top_logprobs_num, logprob_start_len=starts[i])
                # every request is checked before any is sent; keep the ids so that
                # generate() does not tokenize the prompt a second time
                r.input_ids, r.text = tm.validate(r)[0], None
                tm.prompt_logprob_start(r, len(r.input_ids))
                reqs.append(r)
        return reqs, single and len(reqs) == 1

    async def _collect(self, req: GenerateRequest) -> dict[str, Any]:
        result = None
        async for result in self.tokenizer_manager.generate(req):
            pass
        return result

    async def _gather(self, reqs: list[GenerateRequest]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self._collect(r) for r in reqs)))

    async def _stream(self, reqs: list[GenerateRequest]) -> AsyncIterator[dict[str, Any]]:
        fan = FanOut(self.tokenizer_manager, reqs)
        try:
            async for i, out in fan.updates():
                yield dict(out, index=i)
        finally:
            fan.close()

    def _sync_iter(self, agen: AsyncIterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        try:
            while True:
                try:
                    yield self.loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self.loop.run_until_complete(agen.aclose())
