"""Random-weight checkpoints in the exact Hugging Face layout, for the test suite and the demo server.

`make_model` writes config.json, generation_config.json, safetensors weights (one file or N shards) and a
byte-level BPE tokenizer trained on the text kept in engine/models/data/, with each family's real special
tokens and chat format. `default_model_path` makes the demo model once in the cache folder.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
DENSE_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")
GEMMA_ARCHS = ("gemma3",)   # dense, with a decoder of its own (sandwich norms, GeGLU, local/global layers)
PHI_ARCHS = ("phi3",)       # dense, but swept by tests/test_phi3.py rather than the suite's tiny_model
ARCHS = DENSE_ARCHS + MOE_ARCHS + GEMMA_ARCHS + PHI_ARCHS
# a mixture-of-experts arch speaks the chat format of its dense family
CHAT_OF_ARCH = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
SIZES = ("tiny", "small")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Written into every checkpoint made here; bump when the output changes so cached demo models are rebuilt.
MAKE_MODEL_VERSION = 1
MARKER_FILE = "anyserve_make_model.json"
DEMO_DIR_NAME = "demo-llama-tiny"

# Pre-tokenization in the style of Llama 3 / Qwen 2 / Tekken: contractions, letter runs (with one leading
# non-letter), numbers (NUMBER: Llama groups up to three digits, Qwen and Mistral take one digit at a time),
# punctuation runs, newlines, other whitespace.
_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|NUMBER"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class ChatFamily:
    """Special tokens and chat format of one model family, as its released checkpoints have them."""

    template_file: str              # Jinja chat template in engine/models/data/
    control_tokens: tuple[str, ...]  # special: one id each, dropped by decode(skip_special_tokens=True)
    text_tokens: tuple[str, ...]     # one id each but decoded as text (Qwen's <tool_call>, <think>)
    control_tokens_first: bool       # Mistral numbers its control tokens from 0; Llama and Qwen after the BPE vocab
    bos_token: Optional[str]         # added in front of every encode() when set
    eos_token: str                   # ends an assistant turn
    stop_tokens: tuple[str, ...]     # generation_config.json eos_token_id
    config_bos_token: Optional[str] = None  # config.json bos_token_id when no bos is added (Qwen)
    pad_token: Optional[str] = None
    unk_token: Optional[str] = None
    normalize_nfc: bool = False      # Qwen normalizes input text to NFC before splitting
    number_pattern: str = r"\p{N}"   # one digit per piece; Llama 3 takes up to three (r"\p{N}{1,3}")


_QWEN_CONTROL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_TEXT = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
FAMILIES: dict[str, ChatFamily] = {
    "llama": ChatFamily(
        template_file="llama3.jinja",
        control_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"),
        text_tokens=(), control_tokens_first=False,
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        stop_tokens=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), number_pattern=r"\p{N}{1,3}"),
    "mistral": ChatFamily(
        template_file="mistral.jinja",
        control_tokens=("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                        "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
        text_tokens=(), control_tokens_first=True,
        bos_token="<s>", eos_token="</s>", stop_tokens=("</s>",), unk_token="<unk>"),
    # a chat variant of the mistral arch (chat="mistral_v11"): v11+ tokenizers' [ARGS] / [CALL_ID] tool calls
    "mistral_v11": ChatFamily(
        template_file="mistral_v11.jinja",
        control_tokens=("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                        "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[ARGS]", "[CALL_ID]"),
        text_tokens=(), control_tokens_first=True,
        bos_token="<s>", eos_token="</s>", stop_tokens=("</s>",), unk_token="<unk>"),
    "qwen2": ChatFamily(
        template_file="qwen2.jinja", control_tokens=_QWEN_CONTROL, text_tokens=_QWEN_TEXT,
        control_tokens_first=False, bos_token=None, eos_token="<|im_end|>",
        stop_tokens=("<|im_end|>", "<|endoftext|>"), config_bos_token="<|endoftext|>",
        pad_token="<|endoftext|>", normalize_nfc=True),
    "qwen3": ChatFamily(
        template_file="qwen3.jinja", control_tokens=_QWEN_CONTROL, text_tokens=_QWEN_TEXT + ("<think>", "</think>"),
        control_tokens_first=False, bos_token=None, eos_token="<|im_end|>",
        stop_tokens=("<|im_end|>", "<|endoftext|>"), config_bos_token="<|endoftext|>",
        pad_token="<|endoftext|>", normalize_nfc=True),
    # gemma-3-*-it: <pad> <eos> <bos> <unk> <mask> are ids 0-4 as released; a turn ends with <end_of_turn>,
    # which generation_config.json lists beside <eos>
    "gemma3": ChatFamily(
        template_file="gemma3.jinja",
        control_tokens=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"),
        text_tokens=(), control_tokens_first=True, bos_token="<bos>", eos_token="<eos>",
        stop_tokens=("<eos>", "<end_of_turn>"), pad_token="<pad>", unk_token="<unk>"),
    # Phi-3.5-mini-instruct's: <unk>, <s>, </s> numbered first as in its Llama-2 vocabulary (the others follow them
    # here, not the BPE vocab); <s> is the config's bos but not added; generation stops at <|end|>, <|assistant|>
    # or <|endoftext|>
    "phi3": ChatFamily(
        template_file="phi3.jinja",
        control_tokens=("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
        text_tokens=(), control_tokens_first=True, bos_token=None, eos_token="<|endoftext|>",
        stop_tokens=("<|end|>", "<|assistant|>", "<|endoftext|>"), config_bos_token="<s>",
        pad_token="<|endoftext|>", unk_token="<unk>"),
}

# tiny: 2 layers of hidden 64 with GQA (4 q heads, 2 kv heads). small: Qwen2.5-0.5B's shape for every arch.
_SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
    "small": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, max_position_embeddings=32768, vocab_size=151936),
}
# Mixture-of-experts archs. tiny: the dense tiny shape with 8 experts, top-2, of intermediate size 32 (Qwen) or
# 128 (Mixtral's experts take intermediate_size). small: 16 layers of hidden 512 with Qwen's vocabulary; Qwen:
# 16 experts of 352, top-4 (300-340M params); Mixtral: 8 experts of 1408, top-2 (440M).
_MOE_SHAPES = {
    "tiny": dict(_SHAPES["tiny"], num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                 shared_expert_intermediate_size=96),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=16, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=32768, vocab_size=151936, num_experts=16,
                  num_experts_per_tok=4, moe_intermediate_size=352, shared_expert_intermediate_size=1408),
}
# Gemma 3. tiny: 4 layers (sliding, sliding, full, sliding: every 3rd full) with a window of 8, head_dim 32 and a
# query_pre_attn_scalar of 24 (so the attention scale is not head_dim ** -0.5), linear rope scaling of the full
# layers as gemma-3-4b and up have. small: gemma-3-1b's shape (1.0B params, 262144-token vocabulary).
_GEMMA_SHAPES = {
    "tiny": dict(_SHAPES["tiny"], num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
                 sliding_window_pattern=3, rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "small": dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                  sliding_window_pattern=6, max_position_embeddings=32768, vocab_size=262144, rope_scaling=None),
}
_TOKENIZER_VOCAB = {"tiny": 2048, "small": 8192}


def make_model(arch: str, size: str, out_dir: str | Path, *, dtype: str = "float32", seed: int = 0,
               num_shards: int = 1, chat: Optional[str] = None) -> Path:
    """Write a random-weight `arch` checkpoint of `size` to `out_dir`, loadable by AutoModelForCausalLM and
    AutoTokenizer; `chat` picks another tokenizer and template of the arch (FAMILIES, e.g. mistral_v11).
    The same arguments always give the same files. Returns the folder."""
    _check_args(arch, size, dtype, num_shards)
    default_chat = CHAT_OF_ARCH.get(arch, arch)
    chat = chat or default_chat
    if chat not in FAMILIES or not chat.startswith(default_chat):
        raise ValueError(f"unknown chat format {chat!r} for {arch}: choose one of "
                         f"{', '.join(f for f in FAMILIES if f.startswith(default_chat))}")
    started = time.perf_counter()
    out = _prepare_out_dir(Path(out_dir))
    family = FAMILIES[chat]
    tokenizer = _tokenizer(chat, _TOKENIZER_VOCAB[size])
    ids = {tok: tokenizer.token_to_id(tok) for tok in family.control_tokens + family.text_tokens}
    config = _model_config(arch, size, tokenizer.get_vocab_size(), _token_ids(family, ids))

    model = _random_model(config, DTYPES[dtype], seed, tokenizer.get_vocab_size())
    _save_weights(model, out, num_shards)
    _write_config(out, dtype)
    _write_generation_config(out, _token_ids(family, ids))
    _write_tokenizer(out, tokenizer, family, config.max_position_embeddings)
    (out / MARKER_FILE).write_text(json.dumps({
        "version": MAKE_MODEL_VERSION, "arch": arch, "size": size, "dtype": dtype, "seed": seed,
        "num_shards": num_shards, **({"chat": chat} if chat != default_chat else {}),
        "note": "random weights made by anyserve make-model; output is meaningless"},
        indent=2) + "\n")
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("made %s %s (%.1fM random params, %s, seed %d, %d shard(s)) in %s in %.1fs",
                arch, size, num_params / 1e6, dtype, seed, num_shards, out, time.perf_counter() - started)
    return out


def cache_root() -> Path:
    return Path(os.environ.get("ANYSERVE_CACHE") or Path.home() / ".cache" / "anyserve")


def default_model_path() -> Path:
    """The demo model (llama tiny, float32), made on first use under $ANYSERVE_CACHE (default
    ~/.cache/anyserve)."""
    path = cache_root() / DEMO_DIR_NAME
    logger.warning("no model path given: using the demo model at %s. Its weights are RANDOM, so its output is "
                   "meaningless text; pass --model-path to serve a real model.", path)
    return cached_model_path("llama", "tiny", name=DEMO_DIR_NAME)


def cached_model_path(arch: str, size: str, *, dtype: str = "float32", seed: int = 0,
                      name: Optional[str] = None) -> Path:
    """A make_model checkpoint kept in the cache folder, made on first use. Safe when several
    processes ask at once: each builds in a temp folder and renames."""
    root = cache_root()
    name = name or f"{arch}-{size}-{dtype}-seed{seed}"
    path = root / name
    if _is_current(path):
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        make_model(arch, size, tmp, dtype=dtype, seed=seed)
        if path.exists() and not _is_current(path):  # made by an older make_model: move it out of the way
            stale = root / f".{name}-stale-{os.getpid()}-{time.monotonic_ns()}"
            with contextlib.suppress(OSError):  # another process may have moved it first
                path.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(path)
        except OSError:
            if not _is_current(path):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def add_make_model_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `anyserve make-model`."""
    parser.add_argument("out_dir", help="Folder to write the checkpoint to (created; must be empty or a "
                        "previous make-model output).")
    parser.add_argument("--arch", choices=ARCHS, default="llama", help="Model family (default: llama).")
    parser.add_argument("--size", choices=SIZES, default="tiny",
                        help="tiny: 2 layers, hidden 64 (gemma3: 4 layers, sliding and full). small: Qwen2.5-0.5B's "
                        "shape (494M params); for the MoE archs 16 layers of hidden 512 with 8 or 16 experts "
                        "(300-440M params); for gemma3 gemma-3-1b's shape (1.0B params).")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="Weight dtype on disk.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    parser.add_argument("--num-shards", type=int, default=1, help="Number of *.safetensors files.")


def run_make_model(args: argparse.Namespace) -> Path:
    """Run `anyserve make-model` with parsed flags; returns the checkpoint folder."""
    return make_model(args.arch, args.size, args.out_dir, dtype=args.dtype, seed=args.seed,
                      num_shards=args.num_shards)


# ---------------------------------------------------------------------------------------------- checks and files

def _check_args(arch: str, size: str, dtype: str, num_shards: int) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")


def _prepare_out_dir(out: Path) -> Path:
    """An empty folder; a previous make_model output there is replaced, anything else is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER_FILE).exists():
            raise FileExistsError(f"{out} is not empty and was not made by make_model: pass a new or empty folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _is_current(path: Path) -> bool:
    try:
        return json.loads((path / MARKER_FILE).read_text()).get("version") == MAKE_MODEL_VERSION
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------- tokenizer

def _tokenizer(chat: str, vocab_target: int):
    """A fresh `tokenizers.Tokenizer` (trained once per process for each chat family and size)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_tokenizer_json(chat, vocab_target))


@functools.lru_cache(maxsize=None)
def _trained_tokenizer_json(chat: str, vocab_target: int) -> str:
    """Byte-level BPE trained on data/corpus.txt so that, with the family's added tokens, it has
    `vocab_target` entries (fewer if the corpus runs out of merges). Deterministic."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    family = FAMILIES[chat]
    tok = Tokenizer(models.BPE())
    if family.normalize_nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN.replace("NUMBER", family.number_pattern)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    first = list(family.control_tokens) if family.control_tokens_first else []
    appended = len(family.control_tokens) - len(first) + len(family.text_tokens)
    trainer = BpeTrainer(vocab_size=vocab_target - appended, special_tokens=first, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = (DATA_DIR / "corpus.txt").read_text(encoding="utf-8")
    tok.train_from_iterator(corpus.splitlines(keepends=True), trainer)
    if not family.control_tokens_first:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.control_tokens])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.text_tokens])

    byte_level = processors.ByteLevel(trim_offsets=False)
    if family.bos_token is None:
        tok.post_processor = byte_level
    else:
        bos = family.bos_token
        tok.post_processor = processors.Sequence([byte_level, processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.token_to_id(bos))])])
    return tok.to_str()


def _write_tokenizer(out: Path, tokenizer, family: ChatFamily, max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json, in the
    layout of released checkpoints (PreTrainedTokenizerFast)."""
    tokenizer.save(str(out / "tokenizer.json"))
    added = {}
    for token in family.control_tokens + family.text_tokens:
        added[str(tokenizer.token_to_id(token))] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": token in family.control_tokens}
    special = {"bos_token": family.bos_token, "eos_token": family.eos_token, "pad_token": family.pad_token,
               "unk_token": family.unk_token}
    config = {
        "add_bos_token": family.bos_token is not None,
        "add_eos_token": False,
        "added_tokens_decoder": dict(sorted(added.items(), key=lambda kv: int(kv[0]))),
        **special,
        "chat_template": (DATA_DIR / family.template_file).read_text(encoding="utf-8"),
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", {k: v for k, v in special.items() if v is not None})


# ------------------------------------------------------------------------------------------------ config, weights

def _token_ids(family: ChatFamily, ids: dict[str, int]) -> dict:
    """bos/eos/pad ids as config.json and generation_config.json give them (eos: every stop token)."""
    stops = [ids[t] for t in family.stop_tokens]
    return {"bos_token_id": ids[family.bos_token or family.config_bos_token],
            "eos_token_id": stops if len(stops) > 1 else stops[0],
            "pad_token_id": ids[family.pad_token] if family.pad_token else None}


def _model_config(arch: str, size: str, tokenizer_vocab: int, token_ids: dict):
    """The transformers config object. Each arch keeps its distinguishing feature: llama3 rope scaling and tied
    embeddings (llama), no sliding window (mistral), qkv bias (qwen2), explicit head_dim and q/k norm (qwen3);
    the MoE archs are built on their dense family's choices; phi3 has longrope (_phi3_model_config)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if arch in MOE_ARCHS:
        return _moe_model_config(arch, size, tokenizer_vocab, token_ids)
    if arch in GEMMA_ARCHS:
        return _gemma_model_config(size, tokenizer_vocab, token_ids)
    shape = dict(_SHAPES[size], **token_ids)
    shape.setdefault("vocab_size", -(-tokenizer_vocab // 64) * 64)
    max_pos = shape["max_position_embeddings"]
    if arch == "phi3":
        return _phi3_model_config(shape)
    if arch == "llama":
        return LlamaConfig(**shape, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                           rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": max_pos // 4})
    if arch == "mistral":
        return MistralConfig(**shape, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
                             tie_word_embeddings=(size == "small"))
    if arch == "qwen2":
        return Qwen2Config(**shape, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                           use_sliding_window=False)
    return Qwen3Config(**shape, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                       head_dim=32 if size == "tiny" else 64, use_sliding_window=False)


def _phi3_model_config(shape: dict):
    """Phi-3.5-mini's choices: longrope over a context 4x the original one (short and long factors per frequency,
    rising to 1.25 and to 4), no sliding window, untied head. The checkpoint holds the fused qkv_proj and
    gate_up_proj tensors, as the Hub's do. Partial rotary (Phi-4-mini) and Phi-3-mini-4k's window are config.json
    edits away (partial_rotary_factor with factor lists of rotary_dim / 2; sliding_window)."""
    from transformers import Phi3Config

    half = shape["hidden_size"] // shape["num_attention_heads"] // 2
    ramp = [i / (half - 1) for i in range(half)]
    rope = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [round(1.0 + 0.25 * r, 4) for r in ramp],
            "long_factor": [round(1.0 + 3.0 * r * r, 4) for r in ramp]}
    return Phi3Config(**shape, rms_norm_eps=1e-5, rope_parameters=rope, sliding_window=None,
                      original_max_position_embeddings=shape["max_position_embeddings"] // 4, tie_word_embeddings=False)


def _moe_model_config(arch: str, size: str, tokenizer_vocab: int, token_ids: dict):
    """Mixtral: Mistral's choices, every layer sparse, experts of the dense intermediate size, top-k always
    renormalized. Qwen2-MoE: Qwen2's, a shared expert beside the routed ones, top-k not renormalized
    (Qwen1.5-MoE's setting). Qwen3-MoE: Qwen3's, renormalized top-k (Qwen3-30B-A3B's setting). Untied heads,
    as the released MoE checkpoints have."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    shape = dict(_MOE_SHAPES[size], **token_ids)
    shape.setdefault("vocab_size", -(-tokenizer_vocab // 64) * 64)
    experts, top_k, moe_size, shared_size = (shape.pop(k) for k in (
        "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"))
    if arch == "mixtral":
        if size == "small":
            experts, top_k = 8, 2
        return MixtralConfig(**shape, num_local_experts=experts, num_experts_per_tok=top_k, rms_norm_eps=1e-5,
                             rope_theta=1e6, sliding_window=None, tie_word_embeddings=False)
    common = dict(shape, num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=moe_size,
                  decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1e6,
                  tie_word_embeddings=False, use_sliding_window=False)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(**common, shared_expert_intermediate_size=shared_size, norm_topk_prob=False)
    return Qwen3MoeConfig(**common, head_dim=32 if size == "tiny" else 64, norm_topk_prob=True)


def _gemma_model_config(size: str, tokenizer_vocab: int, token_ids: dict):
    """Gemma 3 text: tied embeddings, the global rope (theta 1e6, scaled on tiny) on full layers and the local one
    (theta 1e4) on sliding layers, no logit soft-capping."""
    from transformers import Gemma3TextConfig

    shape = dict(_GEMMA_SHAPES[size], **token_ids)
    shape.setdefault("vocab_size", -(-tokenizer_vocab // 64) * 64)
    scaling = shape.pop("rope_scaling")
    rope = {"full_attention": {"rope_type": "default", **(scaling or {}), "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    # sliding_window_pattern (in shape) makes every pattern-th layer full: transformers writes layer_types from it
    return Gemma3TextConfig(**shape, rope_parameters=rope, rms_norm_eps=1e-6,
                            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                            final_logit_softcapping=None, attn_logit_softcapping=None)


def _random_model(config, dtype: torch.dtype, seed: int, used_vocab: int) -> torch.nn.Module:
    """The model with every weight drawn from a generator seeded with `seed` (the global torch RNG is left
    alone). Built on the meta device first so that the 0.5B `small` never holds two copies. Embedding and
    head rows past the tokenizer (`small` pads to 151936) are shrunk 100x, as never-trained rows are in real
    checkpoints, so greedy decoding picks ids the tokenizer can decode."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(dtype).to_empty(device="cpu")
    model.tie_weights()  # to_empty gives tied parameters separate storage
    gen = torch.Generator().manual_seed(seed)
    # Gemma's norms scale by 1 + weight: the same scales as the other families' are drawn, stored less 1
    norm_offset = 1.0 if config.model_type == "gemma3_text" else 0.0
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied lm_head is listed once, as embed_tokens
            values = _random_values(name, tuple(param.shape), config.hidden_size, gen)
            if norm_offset and name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                values *= config.hidden_size ** 0.5  # sublayer outputs as large as the sqrt(hidden)-scaled embeddings
            if name.endswith("norm.weight"):
                values -= norm_offset
            if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                values[used_vocab:] *= 0.01
            param.copy_(values)
    return model.eval()


def _random_values(name: str, shape: tuple[int, ...], hidden_size: int, gen: torch.Generator) -> torch.Tensor:
    """fp32 values for one weight (cast to the model's dtype by the caller, so bf16 == fp32 rounded).

    The scales make greedy decoding of the tiny models varied (not one token repeated) and their top-1/top-2
    logit gaps typically 100x to 1000x the fp32 rounding noise, so engine-vs-transformers token comparisons
    are stable: unit-variance embeddings, matrices of variance 1/fan_in, norm weights near 1, and a final
    norm with random signs, which stops tied-embedding models from predicting their own input token."""
    noise = torch.randn(shape, generator=gen)  # [*shape]
    if name == "model.norm.weight":
        return 2.0 * noise
    if name.endswith("norm.weight"):  # input/post-attention layernorms, Qwen3's q_norm/k_norm
        return 1.0 + 0.1 * noise
    if name.endswith(".bias"):  # Qwen2's q/k/v bias
        return 0.1 * noise
    if name.endswith("embed_tokens.weight"):
        return noise
    if name == "lm_head.weight":  # untied head
        return noise * (4.0 / hidden_size ** 0.5)
    return noise / shape[-1] ** 0.5  # fan_in: the last dim, of a linear's weight or of stacked experts' [E, N, K]


def _save_weights(model: torch.nn.Module, out: Path, num_shards: int) -> None:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True, max_shard_size=_max_shard_size(model, num_shards))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    found = len(list(out.glob("*.safetensors")))
    if found != num_shards:
        logger.warning("asked for %d weight shards, transformers wrote %d", num_shards, found)


def _max_shard_size(model: torch.nn.Module, num_shards: int) -> int:
    """The smallest max_shard_size (bytes) for which transformers' greedy split gives at most num_shards files;
    for the layouts made here that is exactly num_shards."""
    from huggingface_hub import split_torch_state_dict_into_shards

    state = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values())
    if num_shards == 1:
        return total + 1
    lo, hi = 1, total + 1  # count(hi) == 1 <= num_shards; find the smallest size that still fits
    while lo < hi:
        mid = (lo + hi) // 2
        if len(split_torch_state_dict_into_shards(state, max_shard_size=mid).filename_to_tensors) <= num_shards:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _write_config(out: Path, dtype: str) -> None:
    """config.json as transformers saved it, plus the keys released checkpoints carry (torch_dtype, top-level
    rope_theta and rope_scaling, Qwen3-MoE's num_experts) so that readers of either transformers 4 or 5 layout
    find them."""
    path = out / "config.json"
    data = json.loads(path.read_text())
    if "rope_parameters" in data:  # transformers 5
        rope = dict(data["rope_parameters"])
        if "full_attention" in rope:  # Gemma 3: one per layer type; released configs name the local base apart
            data["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
            rope = dict(rope["full_attention"])
        data["rope_theta"] = rope.pop("rope_theta")
        data["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    if data.get("model_type") == "qwen3_moe" and "num_local_experts" in data:  # transformers 5's name for it
        data["num_experts"] = data.pop("num_local_experts")
    data["dtype"] = data["torch_dtype"] = dtype
    _write_json(path, dict(sorted(data.items())))


def _write_generation_config(out: Path, token_ids: dict) -> None:
    """Stop tokens, bos and pad only: no sampling defaults, so requests get exactly the parameters they send."""
    import transformers

    data = {k: v for k, v in token_ids.items() if v is not None}
    data.update(do_sample=False, transformers_version=transformers.__version__)
    _write_json(out / "generation_config.json", data)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _parser = argparse.ArgumentParser(prog="python -m engine.models.make_model", description=__doc__)
    add_make_model_args(_parser)
    run_make_model(_parser.parse_args())
