"""ModelRunner: loads the model, sizes the KV cache, builds the HAL's attention, sampler and graph
runner, and runs one step (forward + sample). Decode batches the graph runner captured replay a
device graph; with --enable-piecewise-cuda-graph, extend batches up to its token limit replay
graph pieces with the attention run between them; everything else runs eagerly. With tensor
parallelism there is one per rank: rank 0 sends each batch to the others before running it
(engine/runner/tp_worker.py)."""
from __future__ import annotations

import json
import logging
import time
from typing import Optional

import torch

import hal
from engine.layers.ops import set_layer_ops
from engine.mem_cache.allocator import PagedAllocator, ReqToTokenPool
from engine.mem_cache.kv_pool import KVPool, is_fp8
from engine.models.config import ModelConfig
from engine.runner.forward_batch import ForwardBatch
from engine.runner.model_loader import load_model
from engine.runner.tp_worker import (TPStep, batch_from_host, batch_to_host, init_tensor_parallel,
                                     local_device_index)
from engine.sampling.sampling_batch_info import SamplingBatchInfo
from engine.server_args import ServerArgs, kernel_config_overrides
from hal.graph_runner import GraphRunner, attention_can_be_captured
from hal.piecewise_graph import PiecewiseGraphRunner
from hal.kernel_config import set_overrides as set_kernel_config_overrides
from hal.sampling import SampleOutput

logger = logging.getLogger(__name__)

GiB = 1 << 30
# Without --mem-fraction-static or --max-total-tokens, a host-memory KV cache takes at most
# this much, and at most this many contexts' worth of tokens.
_HOST_KV_CAP_BYTES = 2 * GiB
_HOST_KV_CAP_CONTEXTS = 64
_DEFAULT_MEM_FRACTION = 0.88
# Default cap on requests decoding at once (also bounded by the KV capacity / 16): an accelerator
# admits a whole burst at once (SGLang's default is 2048 to 4096); a CPU's step time grows with the batch.
_MAX_RUNNING_DEVICE = 2048
_MAX_RUNNING_HOST = 512


class ModelRunner:
    def __init__(self, server_args: ServerArgs, platform: Optional[hal.Platform] = None, tp_rank: int = 0) -> None:
        self.server_args = server_args
        self.platform = platform or hal.get_platform(server_args.device)
        # --kernel-config: the Triton kernels' launch parameters, read when the backends are built
        self.kernel_config_overrides = kernel_config_overrides(server_args.kernel_config)
        set_kernel_config_overrides(self.kernel_config_overrides)
        self.tp_rank, self.tp_size = tp_rank, server_args.tp_size
        index = local_device_index(server_args, tp_rank)
        self.platform.set_device(index)
        self.device = self.platform.device(index)
        self.platform.manual_seed(server_args.random_seed)
        self.tp_group = init_tensor_parallel(server_args, self.platform, tp_rank)

        self.model_config = ModelConfig.from_pretrained(
            server_args.model_path, context_length=server_args.context_length, dtype=server_args.dtype,
            platform_dtypes=self.platform.supported_dtypes(), platform_default=self.platform.default_dtype)
        self.dtype = self.model_config.dtype
        self.kv_cache_dtype = self.platform.kv_cache_dtype(server_args.kv_cache_dtype, self.dtype)
        self.context_len = self.model_config.context_len
        self.vocab_size = self.model_config.vocab_size
        cfg, tp = self.model_config, self.tp_size
        # this rank's heads (with fewer KV heads than ranks, each rank keeps a copy of one)
        self.num_q_heads = cfg.num_attention_heads // tp
        self.num_kv_heads = max(1, cfg.num_key_value_heads // tp)

        # layers take their element-wise kernels (norm, activation, rotary) when they are built
        entry, self.layer_ops_reason = hal.select("layer_ops", self.platform)
        self.layer_ops_name = entry.name
        self.layer_ops = entry.factory(device=self.device)
        set_layer_ops(self.layer_ops)

        free_before, _ = self.platform.memory_info()
        t0 = time.perf_counter()
        self.model = load_model(self.model_config, server_args.load_format, self.device, self.dtype)
        self.load_seconds = time.perf_counter() - t0
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

        self._init_memory(free_before)
        self._init_backends()
        self._init_graph_runner()
        self._init_piecewise_runner()

    # -- memory ------------------------------------------------------------------------------
    def _kv_budget_tokens(self, free_before: int) -> int:
        args, cfg = self.server_args, self.model_config
        per_token = KVPool.bytes_per_token(cfg.num_hidden_layers, self.num_kv_heads, cfg.head_dim,
                                           self.kv_cache_dtype)
        self.kv_bytes_per_token = per_token
        if args.max_total_tokens is not None:
            return args.max_total_tokens
        tokens = self._local_kv_budget_tokens(per_token)
        if self.tp_size > 1:  # every rank holds the same slots: the smallest rank decides
            t = torch.tensor([tokens], dtype=torch.int64, device=self.device)
            tokens = int(self.tp_group.all_reduce(t, op="min").item())
        return tokens

    def _local_kv_budget_tokens(self, per_token: int) -> int:
        args = self.server_args
        free_now, total = self.platform.memory_info()
        if self.platform.uses_host_memory:
            fraction = args.mem_fraction_static or 0.3
            budget = min(free_now * fraction, _HOST_KV_CAP_BYTES if args.mem_fraction_static is None
                         else free_now * fraction)
            tokens = int(budget // per_token)
            return min(tokens, _HOST_KV_CAP_CONTEXTS * self.context_len)
        fraction = args.mem_fraction_static or _DEFAULT_MEM_FRACTION
        # weights + KV together may take `fraction` of the device; activations get the rest.
        budget = total * fraction - (total - free_now)
        if budget <= 0:
            raise RuntimeError(
                f"no memory left for the KV cache: weights use {self.weight_bytes / GiB:.2f} GiB and "
                f"--mem-fraction-static {fraction} of {total / GiB:.1f} GiB is already taken; raise it")
        return int(budget // per_token)

    def _init_memory(self, free_before: int) -> None:
        args, cfg = self.server_args, self.model_config
        page = args.page_size
        tokens = self._kv_budget_tokens(free_before)
        num_pages = tokens // page
        if num_pages < 1:
            raise RuntimeError(f"KV cache would hold {tokens} tokens, less than one page of {page}")
        self.max_total_tokens = num_pages * page
        cap = _MAX_RUNNING_HOST if self.platform.uses_host_memory else _MAX_RUNNING_DEVICE
        self.max_running_requests = args.max_running_requests or max(1, min(cap, self.max_total_tokens // 16))
        # One page more than the allocator hands out: padded rows of captured decode steps write
        # their K/V to its first slot, which no request ever owns.
        self.kv_pool = KVPool(num_layers=cfg.num_hidden_layers, num_kv_heads=self.num_kv_heads,
                              head_dim=cfg.head_dim, dtype=self.kv_cache_dtype, device=self.device,
                              num_pages=num_pages + 1, page_size=page)
        self.pad_slot = num_pages * page
        self.allocator = PagedAllocator(num_pages, page, self.device)
        # +1 row: a chunked-prefill request that is not yet running
        self.req_to_token_pool = ReqToTokenPool(self.max_running_requests + 1, self.context_len + 1,
                                                self.device)
        if self.tp_size > 1 and self.tp_rank == 0:
            self.req_to_token_pool.journal = []
        # Sampled tokens stay here on the device for the next step's inputs (overlap scheduling
        # reads them back later); a ring, reserved a batch at a time.
        self.future_tokens = torch.zeros(4 * (self.max_running_requests + 8), dtype=torch.int64,
                                         device=self.device)
        self._future_next = 0

    def _init_backends(self) -> None:
        args, cfg = self.server_args, self.model_config
        needs = {"fp8_kv_cache": f"--kv-cache-dtype {args.kv_cache_dtype}"} if is_fp8(self.kv_cache_dtype) else {}
        if cfg.sliding_windows:
            needs["sliding_window"] = f"the model's sliding-window layers ({_windows(cfg)})"
        entry, why = hal.select("attention", self.platform, args.attention_backend, needs=needs)
        self.attention_backend_name = entry.name
        layer_windows = [cfg.sliding_window_of(i) for i in range(cfg.num_hidden_layers)]
        self.attn_backend = entry.factory(
            num_q_heads=self.num_q_heads, num_kv_heads=self.num_kv_heads,
            head_dim=cfg.head_dim, kv_pool=self.kv_pool, req_to_token=self.req_to_token_pool.req_to_token,
            page_size=args.page_size, dtype=self.dtype, device=self.device,
            sliding_windows=tuple(dict.fromkeys(layer_windows)))        # distinct; None: a full-attention layer
        self.attention_reason = why
        entry, why = hal.select("sampling", self.platform, args.sampling_backend)
        self.sampling_backend_name = entry.name
        self.sampling_reason = why
        self.sampler = entry.factory(vocab_size=self.vocab_size, device=self.device)

    def _init_graph_runner(self) -> None:
        """Capture decode steps now that the KV pool exists, unless graphs are off or unavailable."""
        args = self.server_args
        self.graph_runner: Optional[GraphRunner] = None
        if not self.platform.supports_graphs:
            self.graphs_reason = f"off ({self.platform.name} has no device graphs)"
        elif args.disable_cuda_graph:
            self.graphs_reason = "off (--disable-cuda-graph)"
        elif self._moe_blocks_graphs():
            self.graphs_reason = self._moe_graphs_off
        elif not attention_can_be_captured(self.attn_backend):
            self.graphs_reason = f"off (attention backend {self.attention_backend_name} cannot be captured)"
        else:
            entry, why = hal.select("graph_runner", self.platform)
            max_bs = min(args.cuda_graph_max_bs, self.max_running_requests)
            runner = entry.factory(forward=self._forward_eager, attn_backend=self.attn_backend,
                                   max_batch_size=max_bs, max_running_requests=self.max_running_requests,
                                   pad_slot=self.pad_slot, pad_req_row=0, device=self.device)
            gib = self._capture(runner, f"decode graphs up to batch size {max_bs}",
                                f"--cuda-graph-max-bs (now {args.cuda_graph_max_bs}), or pass --disable-cuda-graph")
            self.graph_runner = runner
            self.graphs_reason = f"{runner.describe()} ({why})"
            logger.info("captured decode graphs for batch sizes %s in %.1f s (%.2f GiB)",
                        runner.batch_sizes, runner.capture_seconds, gib)

    def _init_piecewise_runner(self) -> None:
        """With --enable-piecewise-cuda-graph: capture extend steps in pieces around the attention."""
        args = self.server_args
        self.piecewise_runner: Optional[PiecewiseGraphRunner] = None
        if not args.enable_piecewise_cuda_graph:
            hint = (" (mixed steps run eagerly; --enable-piecewise-cuda-graph captures them)"
                    if args.enable_mixed_chunk and self.platform.supports_graphs and not args.disable_cuda_graph
                    else "")
            self.piecewise_reason = "off" + hint
            return
        if not self.platform.supports_graphs:
            self.piecewise_reason = f"off ({self.platform.name} has no device graphs)"
            return
        if args.disable_cuda_graph:
            self.piecewise_reason = "off (--disable-cuda-graph)"
            return
        if self._moe_blocks_graphs():
            self.piecewise_reason = self._moe_graphs_off
            return
        entry, why = hal.select("piecewise_graph_runner", self.platform)
        cfg, limit = self.model_config, args.piecewise_cuda_graph_max_tokens
        runner = entry.factory(model=self.model, attn_backend=self.attn_backend,
                               max_tokens=limit, num_q_heads=self.num_q_heads,
                               num_kv_heads=self.num_kv_heads, head_dim=cfg.head_dim, hidden_size=cfg.hidden_size,
                               dtype=self.dtype, device=self.device)
        gib = self._capture(runner, f"extend steps in pieces up to {limit} tokens",
                            f"--piecewise-cuda-graph-max-tokens (now {limit}), or leave out "
                            "--enable-piecewise-cuda-graph")
        self.piecewise_runner = runner
        self.piecewise_reason = f"{runner.describe()} ({why})"
        logger.info("captured extend steps in pieces for token counts %s in %.1f s (%.2f GiB)",
                    runner.token_counts, runner.capture_seconds, gib)

    def _moe_blocks_graphs(self) -> bool:
        """A mixture-of-experts model whose layer ops run the experts with host reads (the
        reference fused_moe) cannot be captured: its steps stay eager rather than break."""
        return self.model_config.is_moe and not self.layer_ops.fused_moe_graph_safe

    @property
    def _moe_graphs_off(self) -> str:
        return (f"off (mixture-of-experts model: layer ops {self.layer_ops_name} run the experts with host "
                f"reads, fused_moe is not graph-safe)")

    def _capture(self, runner, what: str, or_else: str) -> float:
        """``runner.capture()``; returns the device memory it took, in GiB. Out of memory: an error
        naming the KV cache's size and the flags that would leave room."""
        args = self.server_args
        free_before, _ = self.platform.memory_info()
        try:
            runner.capture()
        except torch.OutOfMemoryError:
            kv = (f"--max-total-tokens (now {args.max_total_tokens})" if args.max_total_tokens is not None
                  else f"--mem-fraction-static (now {args.mem_fraction_static or _DEFAULT_MEM_FRACTION})")
            raise RuntimeError(
                f"capturing {what} ran out of device memory after the KV cache took "
                f"{self.max_total_tokens * self.kv_bytes_per_token / GiB:.2f} GiB: lower {kv} or {or_else}") from None
        return (free_before - self.platform.memory_info()[0]) / GiB

    # -- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [num_logits, vocab] fp32. A decode batch the graph runner can run replays its
        graph (the logits are then valid until the next step); an extend batch the piecewise
        runner can run replays its pieces."""
        if self.tp_size > 1 and self.tp_rank == 0:
            self.tp_group.broadcast_object(TPStep(self.req_to_token_pool.take_journal(), batch_to_host(batch)))
        return self._run(batch)

    def _run(self, batch: ForwardBatch) -> torch.Tensor:
        if batch.has_future_inputs:
            ids = batch.input_ids
            batch.input_ids = torch.where(ids < 0, self.future_tokens[(-ids - 1).clamp(min=0)], ids)
        if self.graph_runner is not None and self.graph_runner.can_run(batch):
            return self.graph_runner.replay(batch)
        if self.piecewise_runner is not None and self.piecewise_runner.can_run(batch):
            return self.model.compute_logits(self.piecewise_runner.replay(batch), batch)
        return self._forward_eager(batch)

    @property
    def piecewise_replays(self) -> int:
        """Steps run as piecewise graphs so far."""
        return self.piecewise_runner.replays if self.piecewise_runner is not None else 0

    def reserve_future(self, n: int) -> int:
        """The first of n consecutive future-token slots for the tokens one step samples."""
        size = self.future_tokens.numel()
        if n > size // 4:
            raise ValueError(f"{n} sampled tokens in one step: more than max_running_requests allows")
        if self._future_next + n > size:
            self._future_next = 0
        base, self._future_next = self._future_next, self._future_next + n
        return base

    def serve_rank0(self) -> None:
        """Ranks > 0: run each batch rank 0 broadcasts, until it sends stop (or goes away)."""
        assert self.tp_rank > 0
        while True:
            step: TPStep = self.tp_group.broadcast_object(None)
            self.req_to_token_pool.replay(step.journal)
            if step.batch is None:
                return
            batch = batch_from_host(step.batch, self.device)
            with torch.inference_mode():
                self._run(batch)
                if batch.future_slots is not None:   # the tokens rank 0 sampled from it
                    base, n = batch.future_slots
                    self.tp_group.broadcast(self.future_tokens[base: base + n])

    def shutdown(self) -> None:
        """Rank 0: tell the other ranks to stop."""
        if self.tp_size > 1 and self.tp_rank == 0:
            self.tp_group.broadcast_object(TPStep([], None))

    def _forward_eager(self, batch: ForwardBatch) -> torch.Tensor:
        batch.attn_backend = self.attn_backend
        self.attn_backend.init_forward_metadata(batch)
        return self.model.forward(batch.input_ids, batch.positions, batch)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, info: SamplingBatchInfo, future_base: Optional[int] = None
               ) -> SampleOutput:
        """Draw the next tokens; with ``future_base`` (the batch's ``future_slots``) also keep them
        on the device for the next step, on every rank."""
        out = self.sampler.sample(logits, info)
        if future_base is not None:
            n = out.next_token_ids.numel()
            dst = self.future_tokens[future_base: future_base + n]
            dst.copy_(out.next_token_ids)
            if self.tp_size > 1:
                self.tp_group.broadcast(dst)
        return out

    def describe(self) -> str:
        tp = f"tp_rank={self.tp_rank}/{self.tp_size} " if self.tp_size > 1 else ""
        return (f"{tp}device={self.platform.description()} dtype={str(self.dtype).replace('torch.', '')} "
                f"attention={self.attention_backend_name} ({self.attention_reason}) "
                f"sampling={self.sampling_backend_name} ({self.sampling_reason}) "
                f"layer_ops={self.layer_ops_name} ({self.layer_ops_reason}) "
                f"graphs={self.graphs_reason} piecewise_graphs={self.piecewise_reason} "
                f"kv_capacity={self.max_total_tokens} tokens "
                f"({self.max_total_tokens * self.kv_bytes_per_token / GiB:.2f} GiB, "
                f"{str(self.kv_cache_dtype).replace('torch.', '')}, page_size="
                f"{self.server_args.page_size}) max_running_requests={self.max_running_requests} "
                f"context_len={self.context_len}"
                + (f" sliding_window={_windows(self.model_config)}" if self.model_config.sliding_windows else "")
                + (f" kernel_config={json.dumps(self.kernel_config_overrides)}" if self.kernel_config_overrides else ""))


def _windows(cfg: ModelConfig) -> str:
    """The model's sliding windows for the startup log, e.g. "4096 on 32 of 32 layers"."""
    layers = sum(w is not None for w in cfg.layer_sliding_windows)
    return f"{'/'.join(map(str, cfg.sliding_windows))} on {layers} of {cfg.num_hidden_layers} layers"
