"""FlashInfer's attention and sampling backends on a real GPU: paged decode and extend at
Llama-3.1-8B's attention shapes (32 q heads, 8 KV heads, head dim 128) with page sizes 1 and 16
against the fp32 torch reference, a step without host syncs, the sampler's greedy rows, seeds and
distributions against the torch sampler, and the engine's greedy tokens against the Triton backend.
Skipped without the flashinfer package (benchmarks/pack_flashinfer.sh carries it to the GPU
machine). Everything runs bf16 with head dim 128, so the first run JIT-compiles three FlashInfer
modules (decode, fa2 extend, sampling) with nvcc: minutes."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from test_sampling import DIST_CASES, FIXED_LOGITS, MIXED_PARAMS, analytic, sp
from test_triton_kernels_gpu import LLAMA_8B, make_case, reference

from engine.runner.forward_batch import ForwardMode
from engine.sampling.sampling_batch_info import SamplingBatchInfo

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
flashinfer = pytest.importorskip("flashinfer", reason="flashinfer-python is not installed")

DEVICE = torch.device("cuda")


# -- attention ---------------------------------------------------------------------------------
def make_step(mode, prefix_lens, ext_lens, page_size, shapes=LLAMA_8B, **backend_kw):
    from backends.cuda.flashinfer_attention import FlashInferAttentionBackend

    hq, hkv, d, dtype = shapes["num_q_heads"], shapes["num_kv_heads"], shapes["head_dim"], torch.bfloat16
    pool, req_to_token, rows, batch, (q, k, v) = make_case(mode, prefix_lens, ext_lens, page_size, dtype, shapes)
    backend = FlashInferAttentionBackend(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, kv_pool=pool,
                                         req_to_token=req_to_token, page_size=page_size, dtype=dtype,
                                         device=DEVICE, **backend_kw)
    return backend, pool, req_to_token, rows, batch, (q, k, v)


def check(mode, prefix_lens, ext_lens, page_size, shapes=LLAMA_8B, scaling=None, sliding_window=None,
          **backend_kw):
    if sliding_window is not None:
        backend_kw.setdefault("sliding_windows", (None, sliding_window))
    backend, pool, req_to_token, rows, batch, (q, k, v) = make_step(mode, prefix_lens, ext_lens, page_size,
                                                                    shapes, **backend_kw)
    scaling = scaling or shapes["head_dim"] ** -0.5
    backend.init_forward_metadata(batch)
    window = {} if sliding_window is None else dict(sliding_window=sliding_window)
    out = backend.forward(q, k, v, 0, scaling, batch, **window)
    loc = batch.out_cache_loc
    assert torch.equal(pool.k_buffers[0][loc], k) and torch.equal(pool.v_buffers[0][loc], v)
    ref = reference(q, pool, req_to_token, rows, prefix_lens, ext_lens, scaling, sliding_window)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("page_size", [1, 16])
def test_decode_llama8b_shapes_up_to_8k(page_size):
    lens = [1, 17, 512, 1000, 4096, 8192, 3001, 64]
    check(ForwardMode.DECODE, [n - 1 for n in lens], [1] * len(lens), page_size)


@pytest.mark.parametrize("page_size", [1, 16])
def test_extend_llama8b_shapes_with_prefixes(page_size):
    check(ForwardMode.EXTEND, [0, 4000, 7000, 15, 0], [1024, 96, 1192, 1, 333], page_size)


@pytest.mark.parametrize("mode", [ForwardMode.DECODE, ForwardMode.EXTEND], ids=["decode", "extend"])
def test_eight_query_heads_per_kv_head_take_the_tensor_core_decode(mode):
    shapes = dict(num_q_heads=64, num_kv_heads=8, head_dim=128)
    if mode.is_decode:
        check(mode, [2047, 99, 0], [1, 1, 1], 16, shapes=shapes)
    else:
        check(mode, [0, 1500, 33], [700, 64, 1], 16, shapes=shapes)


@pytest.mark.parametrize("window", [1, 100, 4096])
@pytest.mark.parametrize("page_size", [1, 16])
def test_sliding_window_decode_and_extend(window, page_size):
    """window_left = W - 1: the same keys as transformers' mask (the reference)."""
    lens = [1, 17, 512, 1000, 4096, 8192, 3001, 64]
    check(ForwardMode.DECODE, [n - 1 for n in lens], [1] * len(lens), page_size, sliding_window=window)
    check(ForwardMode.EXTEND, [0, 4000, 7000, 15, 0], [1024, 96, 1192, 1, 333], page_size, sliding_window=window)


def test_a_model_specific_softmax_scale():
    check(ForwardMode.DECODE, [4095, 10], [1, 1], 16, scaling=0.05)
    check(ForwardMode.EXTEND, [100, 0], [300, 257], 1, scaling=0.05)


def test_consecutive_steps_of_both_modes_share_one_backend():
    """Steps alternate between two sets of wrappers; each step must still see its own plan."""
    # the pool and req_to_token hold 320 positions per request: room for the three decode steps
    backend, pool, req_to_token, rows, batch, _ = make_step(ForwardMode.EXTEND, [0, 0, 0], [320, 17, 64], 16)
    d = LLAMA_8B["head_dim"]
    for prefix in ([0, 0, 0], [300, 17, 64], [301, 18, 65], [302, 19, 66]):
        mode = ForwardMode.EXTEND if prefix == [0, 0, 0] else ForwardMode.DECODE
        ext = [300, 17, 64] if mode.is_extend else [1, 1, 1]
        seq = [p + n for p, n in zip(prefix, ext)]
        batch.mode, batch.seq_lens_cpu = mode, seq
        batch.seq_lens = torch.tensor(seq, device=DEVICE)
        batch.extend_seq_lens_cpu, batch.extend_prefix_lens_cpu = ext, prefix
        batch.out_cache_loc = torch.cat([req_to_token[r, p:s].long() for r, p, s in zip(rows.tolist(), prefix, seq)])
        t = sum(ext)
        q, k, v = (torch.randn(t, h, d, device=DEVICE, dtype=torch.bfloat16) for h in (32, 8, 8))
        backend.init_forward_metadata(batch)
        out = backend.forward(q, k, v, 0, d ** -0.5, batch)
        ref = reference(q, pool, req_to_token, rows, prefix, ext, d ** -0.5)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("mode", [ForwardMode.DECODE, ForwardMode.EXTEND], ids=["decode", "extend"])
def test_step_reads_nothing_back_from_the_device(mode):
    """Page ids are built on the device from req_to_token; plan() reads only host lengths."""
    ext = [1, 1, 1, 1] if mode.is_decode else [40, 1, 300, 7]
    backend, _, _, _, batch, (q, k, v) = make_step(mode, [3000, 0, 17, 511], ext, 16)
    backend.init_forward_metadata(batch)
    backend.forward(q, k, v, 0, 0.1, batch)          # JIT build and first-call setup, outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        backend.init_forward_metadata(batch)
        backend.forward(q, k, v, 0, 0.1, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("page_size", [1, 16])
def test_decode_captured_in_a_cuda_graph_replays_other_lengths(page_size):
    """One capture, then replays at other lengths: each planned by prepare_graph_replay."""
    backend, pool, req_to_token, rows, batch, _ = make_step(ForwardMode.EXTEND, [0, 0, 0], [320, 17, 64],
                                                            page_size)
    d, bs, scale = LLAMA_8B["head_dim"], 3, LLAMA_8B["head_dim"] ** -0.5
    backend.reserve(bs)
    static = [torch.zeros(bs, h, d, device=DEVICE, dtype=torch.bfloat16) for h in (32, 8, 8)]
    batch.mode, batch.batch_size = ForwardMode.DECODE, bs
    batch.seq_lens = torch.zeros(bs, dtype=torch.int64, device=DEVICE)
    batch.out_cache_loc = torch.zeros(bs, dtype=torch.int64, device=DEVICE)

    def set_step(prefix):
        seq = [p + 1 for p in prefix]
        batch.seq_lens.copy_(torch.tensor(seq))
        batch.out_cache_loc.copy_(torch.stack([req_to_token[r, p].long() for r, p in zip(rows.tolist(), prefix)]))
        batch.seq_lens_cpu, batch.extend_seq_lens_cpu, batch.extend_prefix_lens_cpu = seq, [1] * bs, prefix
        qkv = [torch.randn_like(t) for t in static]
        for s, x in zip(static, qkv):
            s.copy_(x)
        return qkv[0]

    set_step([0, 0, 0])
    backend.begin_graph_capture(batch)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                     # warm-up, as the graph runner does
        backend.init_forward_metadata(batch)
        backend.forward(*static, 0, scale, batch)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.init_forward_metadata(batch)
        out = backend.forward(*static, 0, scale, batch)
    backend.end_graph_capture()
    for prefix in ([300, 16, 63], [5, 3, 40], [319, 0, 1]):
        q = set_step(prefix)
        backend.prepare_graph_replay(batch)
        graph.replay()
        ref = reference(q, pool, req_to_token, rows, prefix, [1] * bs, scale)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


# -- sampling ----------------------------------------------------------------------------------
def make_info(params, *, vocab, seeds=None, steps=None, top_logprobs=None, return_logprob=None):
    n = len(params)
    return SamplingBatchInfo.build(
        params, seeds=seeds if seeds is not None else list(range(n)), steps=steps if steps is not None else [0] * n,
        output_ids=[[] for _ in range(n)], prompt_ids=[[] for _ in range(n)], banned_token_ids=[[] for _ in range(n)],
        top_logprobs_nums=top_logprobs or [0] * n, return_logprob=return_logprob or [False] * n,
        vocab_size=vocab, device=DEVICE)


def samplers(vocab):
    from backends.cpu.torch_sampler import TorchSampler
    from backends.cuda.flashinfer_sampling import FlashInferSampler

    return FlashInferSampler(vocab, DEVICE), TorchSampler(vocab, DEVICE)


def test_greedy_rows_and_logprobs_equal_the_torch_sampler():
    vocab = 128256
    ours, ref = samplers(vocab)
    params = MIXED_PARAMS * 4                 # every filter path, and one greedy row in seven
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(len(params), vocab, device=DEVICE, generator=g) * 3
    info = make_info(params, vocab=vocab, top_logprobs=[5] * len(params), return_logprob=[True] * len(params))
    a, b = ours.sample(logits.clone(), info), ref.sample(logits.clone(), info)
    greedy = info.greedy_rows
    assert greedy.numel() == 4
    assert torch.equal(a.next_token_ids[greedy], logits[greedy].argmax(-1))
    torch.testing.assert_close(a.top_logprobs, b.top_logprobs, atol=0, rtol=0)
    lse = torch.logsumexp(logits, -1)
    torch.testing.assert_close(a.logprobs, logits.gather(1, a.next_token_ids[:, None]).squeeze(1) - lse)


def test_seeded_draws_repeat_at_the_same_batch_row_and_vary_with_step():
    vocab = 32000
    ours, _ = samplers(vocab)
    logits = torch.zeros(256, vocab, device=DEVICE)                          # uniform
    first = ours.sample(logits.clone(), make_info([sp()] * 256, vocab=vocab, seeds=[7] * 256)).next_token_ids
    again = ours.sample(logits.clone(), make_info([sp()] * 256, vocab=vocab, seeds=[7] * 256)).next_token_ids
    later = ours.sample(logits.clone(), make_info([sp()] * 256, vocab=vocab, seeds=[7] * 256,
                                                  steps=[1] * 256)).next_token_ids
    assert torch.equal(first, again)
    assert (first != later).float().mean() > 0.9
    assert len(set(first.tolist())) > 200      # the row index enters the stream: rows differ


@pytest.mark.parametrize("case", list(DIST_CASES))
def test_empirical_distribution_matches_analytic(case):
    """The kept set and the probabilities within it: the torch sampler's, from the definitions."""
    from scipy.stats import chisquare

    vocab, n = FIXED_LOGITS.numel(), 40000
    ours, _ = samplers(vocab)
    params = DIST_CASES[case]
    info = make_info([sp(**params)] * n, vocab=vocab, seeds=list(range(n)))
    tokens = ours.sample(FIXED_LOGITS.to(DEVICE).expand(n, vocab).clone(), info).next_token_ids.cpu()
    observed = torch.bincount(tokens, minlength=vocab).double()
    expected = analytic(FIXED_LOGITS, **params) * n
    assert observed[expected == 0].sum() == 0, "drew a token the filters exclude"
    keep = expected > 0
    assert chisquare(observed[keep].numpy(), expected[keep].numpy()).pvalue > 1e-3, (observed, expected)


# -- the engine --------------------------------------------------------------------------------
GREEDY = {"temperature": 0.0, "ignore_eos": True}
N_TOKENS = 32
ENGINE_KW = dict(device="cuda", max_total_tokens=1 << 15, page_size=16, load_format="dummy")


@pytest.fixture(scope="module")
def llama_hd128(llama_tiny, tmp_path_factory):
    """The tiny Llama reshaped to a head dim FlashInfer supports (2 layers, 4 q heads, 2 KV heads of
    128), with random weights of that shape (--load-format dummy, the same in every engine)."""
    path = tmp_path_factory.mktemp("llama-hd128")
    shutil.copytree(llama_tiny, path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_size=512, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=128)
    (path / "config.json").write_text(json.dumps(config))
    return path


def prompts(n, seed, lo=3, hi=300, vocab=2000):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def generate(path, params, batch, **kw):
    from engine import Engine

    with Engine(model_path=str(path), dtype="bfloat16", **ENGINE_KW, **kw) as eng:
        runner = eng.scheduler.runner
        names = runner.attention_backend_name, runner.sampling_backend_name, runner.graphs_reason
        return [o["output_ids"] for o in eng.generate(input_ids=batch, sampling_params=params)], names


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_engine_greedy_tokens_match_the_triton_backend(llama_hd128):
    batch = prompts(8, seed=3)
    params = {**GREEDY, "max_new_tokens": N_TOKENS}
    ours, (attention, _, graphs) = generate(llama_hd128, params, batch, attention_backend="flashinfer")
    theirs, _ = generate(llama_hd128, params, batch, attention_backend="triton")
    assert attention == "flashinfer" and graphs.startswith("cuda_graph")
    agree = [common_prefix(a, b) for a, b in zip(ours, theirs)]
    assert min(agree) >= 16, f"greedy tokens identical to the Triton backend's (bf16) per prompt: {agree}"


def test_engine_flashinfer_graphs_on_and_off_agree(llama_hd128):
    """Captured decode (13 requests padded to 16, then fewer as they finish) against eager decode.
    The captured wrappers always split the sequence (FlashInfer's graph mode) where eager decode
    may not, so bf16 sums differ in order: the same bar as against Triton."""
    batch = prompts(13, seed=5)
    params = {**GREEDY, "max_new_tokens": N_TOKENS}
    graphs, (_, _, on) = generate(llama_hd128, params, batch, attention_backend="flashinfer")
    eager, (_, _, off) = generate(llama_hd128, params, batch, attention_backend="flashinfer",
                                  disable_cuda_graph=True)
    assert on.startswith("cuda_graph") and off.startswith("off")
    agree = [common_prefix(a, b) for a, b in zip(graphs, eager)]
    assert min(agree) >= 16, f"greedy tokens, graphs on and off, per prompt: {agree}"


def test_engine_flashinfer_sampler_greedy_identical_and_seeds_repeat(llama_hd128):
    batch = prompts(4, seed=4)
    greedy = {**GREEDY, "max_new_tokens": N_TOKENS}
    ours, (_, sampling, _) = generate(llama_hd128, greedy, batch, sampling_backend="flashinfer")
    theirs, _ = generate(llama_hd128, greedy, batch, sampling_backend="torch")
    assert sampling == "flashinfer" and ours == theirs
    seeded = {"temperature": 1.0, "top_p": 0.9, "seed": 1234, "ignore_eos": True, "max_new_tokens": N_TOKENS}
    alone = [generate(llama_hd128, seeded, [batch[0]], sampling_backend="flashinfer")[0][0] for _ in range(2)]
    assert alone[0] == alone[1]
