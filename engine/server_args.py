"""Every flag of anyserve in one dataclass: default, help text and validation.

The command line is generated from the fields below (``add_cli_args``), so a flag
exists exactly once. Names follow SGLang's where the meaning is the same.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


def _flag(default: Any, help: str, choices: Optional[list] = None, group: str = "model") -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "group": group})


SCHEDULE_POLICIES = ["lpm", "fcfs", "dfs-weight", "lof", "random"]
DTYPES = ["auto", "float32", "bfloat16", "float16"]
KV_CACHE_DTYPES = ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
LOAD_BALANCE_METHODS = ["round_robin", "shortest_queue", "cache_aware"]
REASONING_PARSERS = ["deepseek-r1", "qwen3"]     # engine.entrypoints.openai.reasoning_parsers
SPECULATIVE_ALGORITHMS = ["NGRAM"]                # engine/speculative/


def kernel_config_overrides(text: Optional[str]) -> dict[str, int]:
    """--kernel-config as a dict of checked KernelConfig overrides (empty when not given)."""
    from hal.kernel_config import KernelConfig

    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"is not JSON ({e.msg}): {text!r}") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"must be a JSON object of field: integer, got {text!r}")
    KernelConfig().with_overrides(overrides)      # names, integers and the dataclass's rules
    return overrides


def device_choices() -> list[str]:
    """'auto' plus every platform a backends/ folder registered (the HAL knows them)."""
    from hal.platform import registered_platforms

    return ["auto", *sorted(registered_platforms())]


@dataclass
class ServerArgs:
    # Model and tokenizer
    model_path: Optional[str] = _flag(
        None, "Folder of a Hugging Face checkpoint (config.json, *.safetensors, tokenizer files). "
        "Left out: a tiny random-weight demo model is made on first use in the cache folder.")
    tokenizer_path: Optional[str] = _flag(None, "Tokenizer folder, when it differs from --model-path.")
    served_model_name: Optional[str] = _flag(
        None, "Model name reported by /v1/models and expected in requests (default: the model folder's name).")
    dtype: str = _flag("auto", "Weight and activation dtype. 'auto' takes the checkpoint's torch_dtype "
                       "when the device supports it, else the device's default.", DTYPES)
    load_format: str = _flag("auto", "'auto' reads safetensors; 'dummy' makes random weights of the real "
                             "shape (for benchmarks).", ["auto", "safetensors", "dummy"])
    context_length: Optional[int] = _flag(
        None, "Longest prompt plus output, in tokens (default: the model's max_position_embeddings).")
    chat_template: Optional[str] = _flag(
        None, "A Jinja chat template (a file path or the template text) replacing the tokenizer's.")
    trust_remote_code: bool = _flag(False, "Allow custom tokenizer code from the model folder.")

    # Device and backends
    device: str = _flag("auto", "Where to run: a registered platform, or auto (the first available "
                        "in the HAL's order: accelerators first, cpu last).", "devices", group="device")
    attention_backend: Optional[str] = _flag(
        None, "Attention implementation (e.g. torch, triton, flashinfer). Default: the platform's "
        "first available preference.", group="device")
    sampling_backend: Optional[str] = _flag(
        None, "Sampling implementation (e.g. torch, flashinfer). Default: the platform's preference. "
        "torch draws the same tokens for a seed in any batch; flashinfer (faster at large batch) only "
        "at the same row of the batch.",
        group="device")
    disable_cuda_graph: bool = _flag(False, "Do not capture decode steps as device graphs "
                                     "(CUDA/HIP graphs).", group="device")
    cuda_graph_max_bs: int = _flag(512, "Largest decode batch captured as a device graph (larger batches run "
                                   "eagerly).", group="device")
    enable_piecewise_cuda_graph: bool = _flag(
        False, "Also capture extend steps (prompt chunks, and mixed steps with --enable-mixed-chunk) "
        "as device graphs, in pieces between the attention calls, which run eagerly; one set per "
        "padded token count up to --piecewise-cuda-graph-max-tokens. Cuts the host's launch time of "
        "small and medium extend steps.", group="device")
    piecewise_cuda_graph_max_tokens: int = _flag(
        2048, "Largest extend step (in tokens) run as piecewise graphs; larger ones run eagerly.",
        group="device")
    kernel_config: Optional[str] = _flag(
        None, "Launch-parameter overrides for the Triton kernels, as a JSON object of "
        "hal/kernel_config.py's KernelConfig fields, e.g. '{\"min_split_tokens\": 128, "
        "\"balance_splits\": 4}' or '{\"gemv_max_rows\": 0}' (tuning and A/B runs; the platform's "
        "values otherwise).", group="device")
    disable_overlap_schedule: bool = _flag(
        False, "Run the plain scheduler loop instead of preparing step N+1 while step N runs.",
        group="device")
    tp_size: int = _flag(1, "Tensor-parallel size: ranks (GPUs, or CPU processes) that split each "
                         "layer's weights and heads; one scheduler process per rank.", group="parallel")
    dp_size: int = _flag(1, "Data-parallel replicas, each its own tensor-parallel group, behind the "
                         "front end's router.", group="parallel")
    load_balance_method: str = _flag(
        "round_robin", "How the router picks a data-parallel replica: round_robin, shortest_queue "
        "(fewest requests in flight) or cache_aware (longest routed prefix unless the load is out "
        "of balance).", LOAD_BALANCE_METHODS, group="parallel")
    router_balance_abs_threshold: int = _flag(
        32, "cache_aware: the load counts as out of balance when the busiest replica has more than "
        "this many requests in flight above the idlest ...", group="parallel")
    router_balance_rel_threshold: float = _flag(
        1.5, "... and more than this many times the idlest's load.", group="parallel")
    router_cache_threshold: float = _flag(
        0.5, "cache_aware: below this matched fraction of the prompt, a request goes to the replica "
        "whose tree is smallest instead of the best match.", group="parallel")
    router_max_tree_size: int = _flag(
        1 << 20, "cache_aware: most tokens (or characters) each replica's approximate tree keeps; "
        "least recently routed leaves are trimmed beyond it.", group="parallel")
    base_gpu_id: int = _flag(0, "First device index used; rank r of replica d uses "
                             "base_gpu_id + d * tp_size + r (local to its node).", group="parallel")
    nnodes: int = _flag(1, "Machines the tensor-parallel group spans.", group="parallel")
    node_rank: int = _flag(0, "This machine's index among --nnodes; node 0 runs the front end.",
                           group="parallel")
    dist_init_addr: Optional[str] = _flag(
        None, "HOST:PORT of node 0 where the ranks meet (torch.distributed TCP store); needed with "
        "--nnodes > 1, default a free local port.", group="parallel")
    dist_timeout: float = _flag(600.0, "Seconds to wait for every rank to join and for one "
                                "collective.", group="parallel")
    random_seed: int = _flag(0, "Seed of the server's random generator (requests without a seed draw "
                             "theirs from it).", group="device")

    # Memory and scheduling
    mem_fraction_static: Optional[float] = _flag(
        None, "Fraction of device memory for weights plus KV cache (default 0.88 on accelerators; "
        "on the CPU, of available RAM capped at 4 GiB of KV).", group="memory")
    max_total_tokens: Optional[int] = _flag(
        None, "KV cache capacity in tokens; overrides --mem-fraction-static.", group="memory")
    page_size: int = _flag(1, "Tokens per KV page; prefixes are shared in whole pages.", group="memory")
    kv_cache_dtype: str = _flag(
        "auto", "How the KV cache stores K and V: auto (the model's dtype), or 8-bit floats, fp8_e4m3 "
        "or fp8_e5m2 (the device's variant of the format, e.g. fnuz where the chip uses it), which "
        "hold twice the tokens in the same memory and halve what decode attention reads, at some "
        "accuracy: values are "
        "stored unscaled (scale 1.0) and saturate at the format's largest (448 for e4m3). fp8 is "
        "fp8_e4m3 (vLLM's name). Attention backends triton and torch read fp8 caches.",
        KV_CACHE_DTYPES, group="memory")
    max_running_requests: Optional[int] = _flag(
        None, "Most requests decoding at once (default: KV capacity / 16 tokens, at most 2048 on "
        "accelerators and 512 on the CPU).", group="memory")
    max_prefill_tokens: int = _flag(16384, "Most new prompt tokens in one prefill batch.", group="memory")
    chunked_prefill_size: int = _flag(
        8192, "Longest prompt chunk computed in one step; longer prompts are split. -1 disables "
        "chunking.", group="memory")
    schedule_policy: str = _flag(
        "lpm", "Order of waiting requests: lpm (longest cached prefix first), fcfs, dfs-weight (requests "
        "sharing a cached prefix together), lof (longest output first: largest max_new_tokens, so the "
        "longest requests start first and do not run alone at the end of a batch job), random.",
        SCHEDULE_POLICIES, group="memory")
    enable_mixed_chunk: bool = _flag(
        False, "Run the running requests' decode tokens in the same forward pass as a prefill batch, so "
        "decoding does not pause while new prompts are prefilled (one read of the weights for both). "
        "The prefill chunk shrinks by one token per running request. Not with speculative decoding.",
        group="memory")
    disable_radix_cache: bool = _flag(False, "Do not share KV between requests (no prefix caching).",
                                      group="memory")

    # Speculative decoding
    speculative_algorithm: Optional[str] = _flag(
        None, "Speculative decoding. NGRAM: prompt lookup, drafts copied from where the newest tokens "
        "occurred earlier in the request's own prompt and output, verified by one forward pass of "
        "the model; outputs are the same as without it (greedy and seeded sampling). It turns the "
        "overlap scheduler off; verify steps run eagerly, plain decode steps keep their device graphs. "
        "Default: off.", SPECULATIVE_ALGORITHMS, group="speculative")
    speculative_num_draft_tokens: int = _flag(
        4, "Most draft tokens proposed per request and step (each verify step emits up to this many "
        "plus one).", group="speculative")
    speculative_ngram_min_match_window_size: int = _flag(
        1, "NGRAM: the shortest suffix of a request's tokens that must have occurred before to "
        "propose the tokens that followed it.", group="speculative")
    speculative_ngram_max_match_window_size: int = _flag(
        12, "NGRAM: the longest suffix tried; the longest one that occurred before wins, and its most "
        "recent occurrence.", group="speculative")

    # Server
    host: str = _flag("127.0.0.1", "HTTP host to listen on.", group="server")
    port: int = _flag(30000, "HTTP port.", group="server")
    grpc_port: Optional[int] = _flag(None, "gRPC port (default: --port + 1; 0 disables gRPC).",
                                     group="server")
    api_key: Optional[str] = _flag(None, "Require this bearer token (HTTP) or 'authorization' "
                                   "metadata (gRPC).", group="server")
    log_requests: bool = _flag(False, "Log one line per finished request.", group="server")
    stream_interval: int = _flag(1, "Send a streamed request's new tokens every this many tokens (the first "
                                 "and the last at once): fewer, larger chunks, less host work at high "
                                 "concurrency.", group="server")
    decode_log_interval: int = _flag(40, "Log a 'Decode batch' line (running requests, KV usage, recent "
                                     "generation throughput) every this many decode steps; 0 turns it "
                                     "off. Every prefill batch is logged too.", group="server")
    enable_metrics: bool = _flag(True, "Serve Prometheus metrics at /metrics.", group="server")
    watchdog_timeout: float = _flag(300.0, "Seconds a single scheduler step may take before the server "
                                    "is declared stuck and exits.", group="server")
    grammar_backend: str = _flag("xgrammar", "Constrained decoding backend; 'none' turns it off.",
                                 ["xgrammar", "none"], group="server")
    tool_call_parser: Optional[str] = _flag(None, "Tool-call format of the model family (llama3, qwen25 = hermes, "
                                            "mistral for [TOOL_CALLS] [list], mistral_v11 for [TOOL_CALLS]name[ARGS]"
                                            "); default: detected from the chat template, tokenizer or architecture.",
                                            ["llama3", "qwen25", "hermes", "mistral", "mistral_v11"], group="server")
    reasoning_parser: Optional[str] = _flag(
        None, "Reasoning format of the model family: /v1/chat/completions returns the <think> block as "
        "message.reasoning_content (delta.reasoning_content when streamed) and the rest as content. "
        "deepseek-r1: the answer starts inside the reasoning (opening tag optional); qwen3: the same "
        "unless the request sets chat_template_kwargs {\"enable_thinking\": false}. A request's "
        "separate_reasoning false keeps everything in content. Default: off (the answer as generated).",
        REASONING_PARSERS, group="server")
    log_level: str = _flag("info", "Logging level.", ["debug", "info", "warning", "error"], group="server")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(flag: str, msg: str) -> None:
            raise ValueError(f"--{flag.replace('_', '-')} {msg}")

        if self.page_size < 1:
            bad("page_size", f"must be >= 1, got {self.page_size}")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            bad("mem_fraction_static", f"must be in (0, 1), got {self.mem_fraction_static}")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            bad("max_total_tokens", f"must be >= page_size ({self.page_size}), got {self.max_total_tokens}")
        if self.max_running_requests is not None and self.max_running_requests < 1:
            bad("max_running_requests", f"must be >= 1, got {self.max_running_requests}")
        if self.kernel_config is not None:
            try:
                kernel_config_overrides(self.kernel_config)
            except ValueError as e:
                bad("kernel_config", str(e))
        if self.piecewise_cuda_graph_max_tokens < 1:
            bad("piecewise_cuda_graph_max_tokens", f"must be >= 1, got {self.piecewise_cuda_graph_max_tokens}")
        if self.stream_interval < 1:
            bad("stream_interval", f"must be >= 1, got {self.stream_interval}")
        if self.decode_log_interval < 0:
            bad("decode_log_interval", f"must be >= 0, got {self.decode_log_interval}")
        if self.max_prefill_tokens < 1:
            bad("max_prefill_tokens", f"must be >= 1, got {self.max_prefill_tokens}")
        if self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1:
            bad("chunked_prefill_size", f"must be -1 or >= 1, got {self.chunked_prefill_size}")
        if self.tp_size < 1 or self.dp_size < 1:
            bad("tp_size", "and --dp-size must be >= 1")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            bad("node_rank", f"must be in [0, --nnodes {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1:
            if self.tp_size % self.nnodes:
                bad("tp_size", f"({self.tp_size}) must be a multiple of --nnodes ({self.nnodes})")
            if not self.dist_init_addr:
                bad("dist_init_addr", "(HOST:PORT of node 0) is needed with --nnodes > 1")
            if self.dp_size > 1:
                bad("dp_size", "> 1 with --nnodes > 1 is not supported: run one server per node "
                    "behind 'anyserve router'")
        if self.dist_init_addr and ":" not in self.dist_init_addr:
            bad("dist_init_addr", f"must be HOST:PORT, got {self.dist_init_addr!r}")
        if self.base_gpu_id < 0:
            bad("base_gpu_id", f"must be >= 0, got {self.base_gpu_id}")
        check_router_thresholds(self, bad)
        if self.context_length is not None and self.context_length < 2:
            bad("context_length", f"must be >= 2, got {self.context_length}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            bad("reasoning_parser", f"must be one of {REASONING_PARSERS}, got {self.reasoning_parser!r}")
        if self.speculative_algorithm is not None and self.speculative_algorithm not in SPECULATIVE_ALGORITHMS:
            bad("speculative_algorithm", f"must be one of {SPECULATIVE_ALGORITHMS}, got "
                f"{self.speculative_algorithm!r}")
        if self.enable_mixed_chunk and self.speculative_algorithm is not None:
            bad("enable_mixed_chunk", "cannot be combined with --speculative-algorithm (verify steps "
                "run their own batches)")
        if self.speculative_num_draft_tokens < 1:
            bad("speculative_num_draft_tokens", f"must be >= 1, got {self.speculative_num_draft_tokens}")
        lo, hi = self.speculative_ngram_min_match_window_size, self.speculative_ngram_max_match_window_size
        if not 1 <= lo <= hi:
            bad("speculative_ngram_min_match_window_size", f"must be >= 1 and <= "
                f"--speculative-ngram-max-match-window-size, got {lo} and {hi}")
        for name in ("dtype", "kv_cache_dtype", "device", "schedule_policy", "load_format", "load_balance_method"):
            choices = _choices(name)
            if getattr(self, name) not in choices:
                bad(name, f"must be one of {choices}, got {getattr(self, name)!r}")

    @property
    def effective_grpc_port(self) -> int:
        return self.port + 1 if self.grpc_port is None else self.grpc_port

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        groups: dict[str, argparse._ArgumentGroup] = {}
        for f in dataclasses.fields(cls):
            meta = f.metadata
            g = meta.get("group", "model")
            if g not in groups:
                groups[g] = parser.add_argument_group(f"{g} options")
            flag = "--" + f.name.replace("_", "-")
            default = f.default
            help_text = meta["help"] + ("" if default is None or default is False else f" (default: {default})")
            if f.type in ("bool", bool):
                if default:
                    groups[g].add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                           help=help_text)
                else:
                    groups[g].add_argument(flag, action="store_true", help=help_text)
                continue
            typ = _type_of(f)
            choices = _choices(f.name)
            # SGLang spells the tensor/data-parallel flags both ways: --tp-size and --tp.
            aliases = [flag[: -len("-size")]] if f.name in ("tp_size", "dp_size") else []
            groups[g].add_argument(flag, *aliases, type=typ, default=default, choices=choices,
                                   help=help_text, metavar=None if choices else f.name.upper())

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "ServerArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown server argument(s): {', '.join(unknown)}")
        return cls(**kwargs)


def check_router_thresholds(args: Any, bad: Callable[[str, str], None]) -> None:
    """The --router-* thresholds, shared by `serve --dp` and `anyserve router`."""
    if args.router_balance_abs_threshold < 0 or args.router_balance_rel_threshold < 1.0:
        bad("router_balance_abs_threshold", "must be >= 0 and --router-balance-rel-threshold >= 1")
    if not 0.0 <= args.router_cache_threshold <= 1.0:
        bad("router_cache_threshold", f"must be in [0, 1], got {args.router_cache_threshold}")
    if args.router_max_tree_size < 1:
        bad("router_max_tree_size", f"must be >= 1, got {args.router_max_tree_size}")


_FIELDS = {f.name: f for f in dataclasses.fields(ServerArgs)}


def _choices(name: str) -> Optional[list]:
    choices = _FIELDS[name].metadata.get("choices")
    return device_choices() if choices == "devices" else choices


def _type_of(f: dataclasses.Field) -> type:
    t = str(f.type)
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str
