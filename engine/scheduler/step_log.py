"""Where the scheduler's time goes: wall time per kind of step, and SGLang-style log lines.

A step's time is the host's view of the device: the gap between one step's tokens arriving and
the next's, while steps run back to back (the clock restarts when the device was left idle).
With the overlap scheduler that gap is the device time of the step read back; a prefill chunk
that samples nothing is counted with the step read after it.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from engine.io_struct import StepTotals

logger = logging.getLogger("engine.scheduler")

PREFILL, DECODE = "prefill", "decode"


class StepClock:
    """Accumulates StepTotals and writes the periodic decode log line."""

    def __init__(self, decode_log_interval: int) -> None:
        self.totals = StepTotals()
        self.decode_log_interval = decode_log_interval
        self._last_done = time.perf_counter()
        self._busy = False
        self._decode_launched = 0
        # the log window: decoded tokens, and the device's busy seconds (idle time not counted)
        self._window_seconds = 0.0
        self._window_tokens = 0
        self.gen_throughput = 0.0        # decoded tokens per busy second over the last log window

    def starting_step(self) -> None:
        """Before a step launches: a device left idle starts the clock again."""
        if not self._busy:
            self._last_done = time.perf_counter()

    def step_ran(self, ran: bool) -> None:
        self._busy = ran

    def done(self, kind: str, tokens: int, mixed_decodes: int = 0, in_pieces: bool = False) -> None:
        """A step's tokens are on the host. ``mixed_decodes``: a prefill step's running requests
        that decoded a token in it (--enable-mixed-chunk); ``in_pieces``: it ran as graph pieces."""
        now = time.perf_counter()
        seconds, self._last_done = now - self._last_done, now
        self.totals.add(kind, seconds, tokens)
        self.totals.mixed_decode_tokens += mixed_decodes
        self.totals.piecewise_prefill_steps += in_pieces
        self._window_seconds += seconds
        self._window_tokens += tokens if kind == DECODE else mixed_decodes

    def decode_launched(self) -> bool:
        """Count a decode step; returns whether a log line is due (``log_decode``)."""
        self._decode_launched += 1
        return self.decode_log_interval > 0 and self._decode_launched % self.decode_log_interval == 0

    def log_decode(self, running: int, used_tokens: int, usage: float, queued: int,
                   accept_len: Optional[float] = None) -> None:
        """``accept_len``: with speculative decoding, tokens emitted per request and step in the window."""
        self.gen_throughput = self._window_tokens / max(self._window_seconds, 1e-9)
        self._window_seconds, self._window_tokens = 0.0, 0
        spec = "" if accept_len is None else f"accept len: {accept_len:.2f}, "
        logger.info("Decode batch. #running-req: %d, #token: %d, token usage: %.2f, %sgen throughput "
                    "(token/s): %.2f, #queue-req: %d", running, used_tokens, usage, spec, self.gen_throughput,
                    queued)


def log_prefill(new_seqs: int, new_tokens: int, cached_tokens: int, usage: float, running: int,
                queued: int) -> None:
    logger.info("Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
                "#running-req: %d, #queue-req: %d", new_seqs, new_tokens, cached_tokens, usage, running, queued)
