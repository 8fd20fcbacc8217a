"""Free-page allocator of KV slots, and the request -> token table.

Slots are handed out in whole pages. A request's position ``i`` sits at offset
``i % page_size`` of its page, so extending a request first fills the rest of its last
page, then takes fresh pages.
"""
from __future__ import annotations

from typing import Optional

import torch

from engine.runner.host_to_device import to_device


class PagedAllocator:
    def __init__(self, num_pages: int, page_size: int, device: torch.device) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.device = device
        self.capacity = num_pages * page_size
        self.clear()

    def clear(self) -> None:
        # A stack of free page ids (on the host: allocation happens between steps).
        self._free_pages: list[int] = list(range(self.num_pages - 1, -1, -1))

    def available_size(self) -> int:
        """Free slots, in tokens."""
        return len(self._free_pages) * self.page_size

    def free_pages(self) -> int:
        return len(self._free_pages)

    def pages_needed(self, prefix_len: int, seq_len: int) -> int:
        """Fresh pages a request growing from prefix_len to seq_len tokens needs."""
        p = self.page_size
        return (seq_len + p - 1) // p - (prefix_len + p - 1) // p

    def alloc(self, prefix_lens: list[int], seq_lens: list[int],
              last_locs: list[int]) -> Optional[torch.Tensor]:
        """Slots for positions [prefix_len, seq_len) of each request, concatenated, on the
        host (the caller keeps the last slot of each request and copies them to the device).

        ``last_locs[i]`` is the slot of position prefix_len - 1 (ignored when prefix_len is
        page-aligned). Returns None, allocating nothing, when there are not enough pages.
        """
        p = self.page_size
        need = sum(self.pages_needed(a, b) for a, b in zip(prefix_lens, seq_lens))
        if need > len(self._free_pages):
            return None
        if p == 1:  # every position is its own page: one pop for the whole batch
            pages = self._free_pages[len(self._free_pages) - need:][::-1]
            del self._free_pages[len(self._free_pages) - need:]
            return torch.tensor(pages, dtype=torch.int64)
        out: list[torch.Tensor] = []
        for a, b, last in zip(prefix_lens, seq_lens, last_locs):
            if b <= a:
                continue
            pieces = []
            pos = a
            if a % p:  # finish the partly filled last page
                take = min(b, (a // p + 1) * p) - a
                pieces.append(torch.arange(last + 1, last + 1 + take, dtype=torch.int64))
                pos += take
            n_new = (b - pos + p - 1) // p
            if n_new:
                pages = torch.tensor([self._free_pages.pop() for _ in range(n_new)], dtype=torch.int64)
                slots = (pages[:, None] * p + torch.arange(p, dtype=torch.int64)[None, :]).flatten()
                pieces.append(slots[: b - pos])
            out.append(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
        if not out:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat(out)

    def free(self, slots: torch.Tensor) -> None:
        """Return the pages holding ``slots``. The caller owns every slot of those pages."""
        if slots.numel() == 0:
            return
        if self.page_size == 1:
            self._free_pages.extend(slots.tolist())
        else:
            self._free_pages.extend(torch.unique(slots // self.page_size).tolist())


class ReqToTokenPool:
    """Row per running request: the KV slot of each of its positions.

    The device table is what attention reads; a host mirror answers the scheduler's reads, so
    releasing a request never waits for the device (the overlap scheduler depends on it)."""

    def __init__(self, size: int, max_context_len: int, device: torch.device) -> None:
        self.size = size
        self.max_context_len = max_context_len
        # [size, max_context_len] int32
        self.req_to_token = torch.zeros(size, max_context_len, dtype=torch.int32, device=device)
        self.host = self.req_to_token if device.type == "cpu" else torch.zeros(
            size, max_context_len, dtype=torch.int32)
        self._free_rows = list(range(size - 1, -1, -1))
        # With tensor parallelism, rank 0 records its writes here and sends them with the next
        # batch, so the other ranks' tables (which their attention reads) stay the same.
        self.journal: Optional[list[tuple]] = None

    def available_size(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> Optional[int]:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Positions [start, start + len(slots)) of ``row``; ``slots`` on the host."""
        slots = slots.to(torch.int32)
        end = start + slots.numel()
        self.host[row, start:end] = slots
        if self.host is not self.req_to_token:
            self.req_to_token[row, start:end] = to_device(slots, self.req_to_token.device)
        if self.journal is not None:
            self.journal.append(("row", row, start, slots))

    def write_cells(self, rows: list[int], cols: list[int], slots: torch.Tensor) -> None:
        """req_to_token[rows[i], cols[i]] = slots[i] (one new token per request); ``slots`` on
        the host."""
        # rows, cols and slots as one int32 [3, N] tensor: one copy to the device per step
        cells = torch.stack([torch.tensor(rows, dtype=torch.int32), torch.tensor(cols, dtype=torch.int32),
                             slots.to(torch.int32)])
        if self.journal is not None:
            self.journal.append(("cells", cells, None, None))
        self._write_cells(cells)

    def _write_cells(self, cells: torch.Tensor) -> None:
        self.host[cells[0], cells[1]] = cells[2]
        if self.host is not self.req_to_token:
            dev = to_device(cells, self.req_to_token.device)
            self.req_to_token[dev[0], dev[1]] = dev[2]

    def take_journal(self) -> list[tuple]:
        entries, self.journal = self.journal or [], [] if self.journal is not None else None
        return entries

    def replay(self, journal: list[tuple]) -> None:
        """Apply another rank's writes (see ``journal``)."""
        for kind, a, b, slots in journal:
            if kind == "row":
                self.write(a, b, slots)
            else:
                self._write_cells(a)

    def read(self, row: int, start: int, end: int) -> torch.Tensor:
        """Host int64 slots of positions [start, end) of ``row``."""
        return self.host[row, start:end].to(torch.int64)

    def clear(self) -> None:
        self._free_rows = list(range(self.size - 1, -1, -1))
