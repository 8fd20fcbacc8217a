"""TorchSampler: the portable sampler in plain torch (the reference every backend must match).

Randomness is counter-based and keyed by (seed, step, token id): a splitmix64-style hash done
with int64 tensor ops, the same integers on every device, so a request's tokens depend only on
its own seed and logits, never on the batch around it (float rounding that differs between
devices can flip a draw only on a near-tie). A token is drawn by the exponential race
argmax_i p_i / E_i with E_i = -log u_i, which samples exactly from p.

Hashing the whole vocabulary for every row would cost more than the rest of the step, so a
row is drawn in two exact stages. The head is the row's top ``head_size`` tokens. When the
kept set (after top-k/top-p/min-p) lies inside the head, the race runs over the head only.
Otherwise the row first picks head or tail with probability mass(head) / mass(kept) using a
per-(seed, step) uniform, then races inside the chosen part; only rows that land in the tail
hash the full vocabulary.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from engine.sampling.sampling_batch_info import SamplingBatchInfo
from hal.sampling import SampleOutput, Sampler

_NEG_INF = float("-inf")


@functools.lru_cache(maxsize=None)
def _argmax_chunks(vocab: int) -> int:
    """How many equal chunks a row of ``vocab`` splits into for a two-pass argmax: the largest
    divisor in [32, 256] that leaves chunks of at least 512; 1 (one pass) when there is none."""
    return next((c for c in range(256, 31, -1) if vocab % c == 0 and vocab // c >= 512), 1)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) for x [B, V], the first index on ties and NaN counting as the largest, as
    argmax. A few long rows reduce in two passes (each chunk's max, then the best chunk): on a GPU
    one pass gives a whole row to one block (~28 us for a 128k vocabulary on an H200)."""
    b, v = x.shape
    chunks = _argmax_chunks(v)
    if b > 32 or chunks == 1:
        return x.argmax(dim=-1)
    vals, idx = x.reshape(b, chunks, v // chunks).max(dim=-1)       # [B, C] each chunk's first max
    best = vals.argmax(dim=-1, keepdim=True)                          # [B, 1] the first best chunk
    return (best * (v // chunks) + idx.gather(1, best)).squeeze(1)


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (multiplication wraps modulo 2**64)."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def rng_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[R] int64 key of the random stream for (seed, step)."""
    return mix64(mix64(seeds) ^ (steps * _GOLDEN))


def counter_hashes(counters: torch.Tensor) -> torch.Tensor:
    """int64 hash of each counter: counter t >= 0 belongs to token t, counter -1 is a row's
    head-or-tail draw. Key-independent, so a sampler caches the vocabulary's once."""
    return mix64((counters + 1) * _GOLDEN)


def uniform(keys: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in (0, 1) for (key, counter hash), broadcasting. Two multiply-xorshift
    rounds over key ^ hash; 23 bits, exact in float32."""
    z = (keys ^ hashes).mul_(_MIX1)
    z ^= (z >> 29).bitwise_and_((1 << 35) - 1)
    z.mul_(_MIX2).bitwise_right_shift_(41).bitwise_and_((1 << 23) - 1)
    return z.to(torch.float32).add_(0.5).mul_(2.0 ** -23)


def race_scores(scaled_logits: torch.Tensor, keys: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
    """log(p / E) up to a per-row constant, with E = -log u exponential: a row's argmax is a
    draw from p = softmax(scaled_logits). Overwrites scaled_logits."""
    return scaled_logits.sub_(uniform(keys, hashes).log_().neg_().log_())


def topk_rows(x: torch.Tensor, k: int, groups: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact torch.topk(x, k) along the last dim of a row-contiguous x: [R, V], faster on CPU for
    a large V (ties may come in another order). Each row is cut into ``groups`` strided slices;
    position j's group holds x[j], x[j + n], x[j + 2n], ...; the k groups with the largest maxima
    hold the k largest values."""
    rows, vocab = x.shape
    n = vocab // groups
    if n < 2 * k or x.stride(1) != 1:
        return torch.topk(x, k, dim=-1)
    group_max = x.as_strided((rows, groups, n), (x.stride(0), n, 1)).amax(dim=1)   # [R, n]
    top = torch.topk(group_max, k, dim=-1).indices                                  # [R, k]
    cols = (top.unsqueeze(-1) + torch.arange(groups, device=x.device) * n).flatten(1)  # [R, k*groups]
    if n * groups < vocab:
        rest = torch.arange(n * groups, vocab, device=x.device).expand(rows, -1)
        cols = torch.cat([cols, rest], dim=1)
    vals, idx = torch.topk(x.gather(1, cols), k, dim=-1)
    return vals, cols.gather(1, idx)


class TorchSampler(Sampler):
    def __init__(self, vocab_size: int, device: torch.device, head_size: int = 256,
                 wide_head_size: int = 4096) -> None:
        super().__init__(vocab_size, device)
        if not 1 <= head_size <= wide_head_size:
            raise ValueError(f"need 1 <= head_size <= wide_head_size, got {head_size}, {wide_head_size}")
        self.head_size = head_size
        self.wide_head_size = wide_head_size
        self._workspace: dict[str, torch.Tensor] = {}
        self._vocab_hash_cache: Optional[torch.Tensor] = None

    def sample(self, logits: torch.Tensor, info: SamplingBatchInfo) -> SampleOutput:
        """logits: [B, vocab]. Sparse adjustments and the grammar mask are applied in place to a
        float32 ``logits``; temperature and filtering never write to it."""
        x = logits if logits.dtype == torch.float32 else logits.float()   # [B, V]
        raw = x
        if info.need_logprobs and info.modifies_logits:
            x = x.clone()
        info.apply_logit_adjustments(x)
        next_ids = self._choose(x, info)
        out = SampleOutput(next_token_ids=next_ids)
        if info.need_logprobs:
            # Log-probabilities are those of the raw model: log_softmax of the logits as the model
            # produced them, before logit_bias, masks, penalties and temperature.
            lse = torch.logsumexp(raw, dim=-1)                                # [B]
            out.logprobs = raw.gather(1, next_ids.unsqueeze(1)).squeeze(1) - lse
            k = min(info.max_top_logprobs, raw.shape[1])
            if k > 0:
                vals, ids = topk_rows(raw, k)                                 # [B, k] descending
                out.top_logprobs, out.top_logprob_ids = vals - lse.unsqueeze(1), ids
        return out

    def _choose(self, x: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        if info.is_all_greedy:
            return argmax_rows(x)
        if info.is_all_sampled:
            return self._draw(x, info, rows=None)
        out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        out[info.greedy_rows] = argmax_rows(x.index_select(0, info.greedy_rows))
        out[info.sample_rows] = self._draw(x, info, info.sample_rows)
        return out

    def _buffer(self, name: str, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """A reused float32 scratch tensor (fresh [B, vocab] allocations cost more than the math)."""
        n = shape[0] * shape[1]
        buf = self._workspace.get(name)
        if buf is None or buf.numel() < n or buf.device != like.device:
            buf = torch.empty(n, dtype=torch.float32, device=like.device)
            self._workspace[name] = buf
        return buf[:n].view(shape)

    def _vocab_hashes(self, like: torch.Tensor) -> torch.Tensor:
        """[V] counter_hashes of every token id, computed once per device."""
        cached = self._vocab_hash_cache
        if cached is None or cached.device != like.device or cached.numel() != like.shape[1]:
            cached = counter_hashes(torch.arange(like.shape[1], device=like.device))
            self._vocab_hash_cache = cached
        return cached

    def _draw(self, x: torch.Tensor, info: SamplingBatchInfo, rows) -> torch.Tensor:
        """Rows ``rows`` (None: all) of the adjusted logits x: [B, V] -> [R] int64 token ids."""
        if rows is None:
            pick, xs = (lambda t: t), x
        else:
            pick = lambda t: t.index_select(0, rows)  # noqa: E731
            xs = torch.index_select(x, 0, rows, out=self._buffer("rows", (rows.numel(), x.shape[1]), x))
        temps, top_ks, top_ps, min_ps = (pick(info.temperatures), pick(info.top_ks),
                                         pick(info.top_ps), pick(info.min_ps))
        keys = rng_keys(pick(info.seeds), pick(info.steps))                 # [R]
        vocab = xs.shape[1]
        t = temps.unsqueeze(1)                                               # [R, 1]
        head = min(self.head_size, vocab)
        # top-k commutes with dividing by a positive temperature: select on the unscaled logits
        head_logits, head_ids = topk_rows(xs, head)                          # [R, head] descending
        h = head_logits / t                                                  # [R, head] scaled
        tail_possible = head < vocab and info.max_top_k > head
        lse = self._logsumexp(xs, t, head_logits[:, 0]) if (info.need_top_p or tail_possible) else None

        # The kept set is {scaled logit >= thr}: top-k, top-p and min-p each keep a prefix of the
        # sorted row, so their intersection is the prefix above the largest threshold.
        thr, pending = _prefix_cut(h, top_ks, top_ps, lse, vocab, info.need_top_p)
        if info.need_min_p:
            thr = torch.maximum(thr, h[:, 0] + torch.log(min_ps))            # p >= min_p * p_max
        if head < vocab and (info.need_top_p or tail_possible):
            self._resolve_pending(xs, t, thr, pending & (thr < h[:, -1]), top_ks, top_ps, lse, info)

        score = race_scores(h.clone(), keys.unsqueeze(1), counter_hashes(head_ids))   # [R, head]
        score.masked_fill_(h < thr.unsqueeze(1), _NEG_INF)
        choice = head_ids.gather(1, score.argmax(dim=1, keepdim=True)).squeeze(1)   # [R]
        if lse is not None and head < vocab:
            self._draw_tail(xs, t, h, head_ids, thr, lse, keys, choice)
        return choice

    def _logsumexp(self, xs: torch.Tensor, t: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
        """[R] logsumexp of xs / t given the rows' maxima of xs, without a fresh [R, V] tensor."""
        m = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).unsqueeze(1) / t
        e = self._buffer("exp", tuple(xs.shape), xs)
        torch.addcmul(-m, xs, 1.0 / t, out=e).exp_()                         # exp(xs / t - max)
        return m.squeeze(1) + torch.log(e.sum(dim=1))

    def _resolve_pending(self, xs, t, thr, pending, top_ks, top_ps, lse, info) -> None:
        """Rows whose top-k/top-p cut lies past the head: find it in a wider head, and in the
        rare rows where even that is too narrow, in a full sort. Updates thr in place."""
        rows = torch.nonzero(pending).squeeze(1)
        if not rows.numel():
            return
        vocab = xs.shape[1]
        wide = min(self.wide_head_size, vocab)
        s = topk_rows(xs[rows], wide)[0] / t[rows]                           # [n, wide]
        cut, still = _prefix_cut(s, top_ks[rows], top_ps[rows], lse[rows], vocab, info.need_top_p)
        thr[rows] = torch.maximum(thr[rows], cut)
        rows = rows[still & (thr[rows] < s[:, -1])]
        if rows.numel():
            s = torch.sort(xs[rows], dim=-1, descending=True).values / t[rows]   # [n, V]
            cut, _ = _prefix_cut(s, top_ks[rows], top_ps[rows], lse[rows], vocab, info.need_top_p)
            thr[rows] = torch.maximum(thr[rows], cut)

    def _draw_tail(self, xs, t, h, head_ids, thr, lse, keys, choice) -> None:
        """Rows whose kept set extends past the head: with probability mass(tail)/mass(kept),
        replace the head draw in ``choice`` by a race over the kept tail."""
        ext = torch.nonzero(thr < h[:, -1]).squeeze(1)                        # [C]
        if not ext.numel():
            return
        head_mass = torch.exp(h[ext] - lse[ext].unsqueeze(1)).sum(dim=1)      # [C]
        kept_mass = torch.ones_like(head_mass)
        finite = torch.nonzero(torch.isfinite(thr[ext])).squeeze(1)
        if finite.numel():
            r = ext[finite]
            hv = xs[r] / t[r]                                                 # [F, V]
            kept = hv >= thr[r].unsqueeze(1)
            kept_mass[finite] = (hv.sub_(lse[r].unsqueeze(1)).exp_() * kept).sum(dim=1)
        stage_u = uniform(keys[ext], counter_hashes(torch.full_like(ext, -1)))
        tail = ext[stage_u * kept_mass >= head_mass]                          # [N]
        if not tail.numel():
            return
        hv = xs[tail] / t[tail]                                               # [N, V] scaled
        dropped = hv < thr[tail].unsqueeze(1)
        score = race_scores(hv, keys[tail].unsqueeze(1), self._vocab_hashes(xs))
        score.masked_fill_(dropped, _NEG_INF).scatter_(1, head_ids[tail], _NEG_INF)
        best, idx = score.max(dim=1)
        # an empty kept tail (rounding of the masses) keeps the head draw
        choice[tail] = torch.where(best > _NEG_INF, idx, choice[tail])


def _prefix_cut(s: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                lse: Optional[torch.Tensor], vocab: int, need_top_p: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k and top-p thresholds from s: [n, k], each row's k largest scaled logits, descending.
    Returns (thr [n], pending [n]): pending rows cut somewhere below s[:, -1], not yet known."""
    n, k = s.shape
    complete = k == vocab
    in_s = top_ks <= k
    kth = s.gather(1, (top_ks.clamp(max=k) - 1).unsqueeze(1)).squeeze(1)
    thr = torch.where(in_s & (top_ks < vocab), kth, torch.full_like(kth, _NEG_INF))
    pending = ~in_s & (top_ks < vocab)
    if need_top_p:
        # keep the smallest prefix whose mass under the full distribution reaches top_p
        p = torch.exp(s - lse.unsqueeze(1))                                   # [n, k]
        cum = p.cumsum(dim=1)
        n_keep = ((cum - p) < top_ps.unsqueeze(1)).sum(dim=1).clamp_(min=1)   # NaN rows: all -inf
        known = (n_keep < k) | (cum[:, -1] >= top_ps) | complete
        cut = s.gather(1, (n_keep - 1).unsqueeze(1)).squeeze(1)
        active = top_ps < 1.0
        thr = torch.where(active & known, torch.maximum(thr, cut), thr)
        pending |= active & ~known
    return thr, pending
