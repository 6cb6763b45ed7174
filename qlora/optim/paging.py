"""Paged optimizer state: which parameters' state sits on the accelerator, and the stream
that pages the rest through it. No CUDA managed memory.

    pager = Pager(device, budget="auto")        # or an int number of bytes
    pager.place(states)                          # before a step: evict / restore whole states
    pager.stream(jobs)                           # run the paged updates through staging pages

`AdamW(paged=True)` owns one Pager per device; you rarely build one yourself. Tested by
`pytest tests/optim/test_paging.py`, which runs both tiers on the CPU under a small budget
and a faked free-memory probe.

Design:
- Two tiers. Each parameter's state (a dict of flat tensors) lives whole on the device
  ("resident") or whole in host memory ("paged"; pinned when the device is CUDA). Nothing
  uses cudaMallocManaged: it fails on virtual GPUs and can hang a card when oversubscribed
  (formats.md section 9); the pages are ordinary host tensors and explicit copies.
- The budget bounds every byte of state this pager holds on the device: resident state
  plus two staging pages. `budget="auto"` means: free device memory before the step
  (the probe) plus what the pager already holds, minus `margin`. An int budget is
  additionally capped the same way when a probe exists, so a spike always wins.
- `place()` runs before each step: when the limit has dropped (a spike) it evicts resident
  state to the host, last parameter first, instead of running out of memory; when memory
  has come back it restores state, first parameter first, as far as it fits. Currently
  resident state is kept where possible, so a steady budget moves nothing.
- `stream()` runs a list of jobs in order. A resident job runs on its own tensors; a paged
  job's host slices are copied into one of two device staging pages on a side stream,
  updated on the main stream, and copied back on the side stream. The next page loads
  while the current job (resident or paged) computes; stream order plus one event per
  page keeps the two pages from being overwritten early.
- The free-memory probe defaults to the driver's free memory (`torch.cuda.mem_get_info`),
  so PyTorch's cached blocks (next batch's activations) are not taken for state. Memory a
  spike frees inside PyTorch's cache counts again after `torch.cuda.empty_cache()`.
- Without CUDA (the tier device is the CPU) the same code runs with synchronous copies;
  with the default "auto" budget and no probe everything is resident: a no-op.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

ALIGN = 64
"""Byte alignment of each tensor inside a staging page (any dtype view, vector loads)."""

DEFAULT_PAGE_BYTES = 32 << 20
"""Size of one staging page; two are allocated while anything is paged."""

MIN_PAGE_BYTES = 4096
"""Smallest page: holds the 32-bit state of one 256-element block plus alignment."""

DEFAULT_CUDA_MARGIN = 1 << 30
"""Free device memory "auto" leaves untouched (allocator slack, workspaces, fragmentation)."""

State = dict[str, torch.Tensor]


def align(n: int) -> int:
    """n rounded up to a multiple of ALIGN."""
    return -(-n // ALIGN) * ALIGN


def nbytes(tensors: Sequence[torch.Tensor] | State) -> int:
    """Bytes of a state dict's (or a list's) tensors, "step" counters excluded."""
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
    return sum(t.numel() * t.element_size() for k, t in items if k != "step")


def page_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes a job's tensors take inside a staging page (each start aligned)."""
    return sum(align(t.numel() * t.element_size()) for t in tensors)


@dataclass
class Job:
    """One unit of update work: `run(tensors)` updates `tensors` in place.

    `paged=True`: `tensors` are host slices; `run` gets device copies in a staging page
    and the pager writes them back. `paged=False`: `run` gets `tensors` themselves.
    """

    tensors: list[torch.Tensor]
    run: Callable[[list[torch.Tensor]], None]
    paged: bool


class Pager:
    """State placement and paging for one device (see the module docstring)."""

    def __init__(
        self,
        device: torch.device | str,
        budget: int | str = "auto",
        margin: int | None = None,
        free_memory: Callable[[], int] | None = None,
        page_size: int = DEFAULT_PAGE_BYTES,
    ) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if budget != "auto" and not (isinstance(budget, int) and budget >= 2 * MIN_PAGE_BYTES):
            raise ValueError(
                f"budget must be 'auto' or an int of at least {2 * MIN_PAGE_BYTES} bytes "
                f"(two pages), got {budget!r}"
            )
        if page_size < MIN_PAGE_BYTES:
            raise ValueError(f"page_size must be at least {MIN_PAGE_BYTES} bytes, got {page_size}")
        self.budget = budget
        self.margin = margin if margin is not None else (DEFAULT_CUDA_MARGIN if self.cuda else 0)
        if free_memory is None and self.cuda:
            index = self.device.index

            def free_memory() -> int:
                return torch.cuda.mem_get_info(index)[0]

        self.free_memory = free_memory
        self.page_size = page_size // ALIGN * ALIGN  # both pages start aligned
        self.pin = self.cuda  # pinned host pages: async copies, no staging through pageable memory
        self.host = torch.device("cpu")
        self.resident: dict[torch.Tensor, int] = {}  # param -> bytes of its state on the device
        self.pages: torch.Tensor | None = None  # uint8 [2, page], the staging pages
        self.peak_device_bytes = 0
        self.moved_bytes = 0  # host <-> device traffic, cumulative
        self.evictions = 0  # states moved device -> host by place(), cumulative
        self.restores = 0  # states moved host -> device by place(), cumulative
        self._side = torch.cuda.Stream(self.device) if self.cuda else None

    # ---- accounting -------------------------------------------------------------------
    @property
    def device_bytes(self) -> int:
        """Bytes of state this pager holds on the device now (resident + staging pages)."""
        pages = 0 if self.pages is None else self.pages.numel()
        return sum(self.resident.values()) + pages

    def _note_peak(self) -> None:
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)

    def limit(self) -> float:
        """Device bytes the state may use for this step (inf when nothing bounds it)."""
        limit = math.inf if self.budget == "auto" else float(self.budget)
        if self.free_memory is not None:
            limit = min(limit, self.free_memory() + self.device_bytes - self.margin)
        return limit

    def is_resident(self, param: torch.Tensor) -> bool:
        """Whether `param`'s state is on the device (else in host memory)."""
        return param in self.resident

    def host_empty_like(self, t: torch.Tensor) -> torch.Tensor:
        """An uninitialized host tensor shaped like `t` (pinned when the device is CUDA)."""
        return torch.empty(t.shape, dtype=t.dtype, device=self.host, pin_memory=self.pin)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of `t` (pinned when the device is CUDA)."""
        host = self.host_empty_like(t)
        host.copy_(t)
        return host

    def forget(self) -> None:
        """Drop all bookkeeping (after the owner replaced every state with host tensors)."""
        self.resident.clear()
        self.pages = None

    def synchronize(self) -> None:
        """Wait for all page copies, so host state may be read by the CPU."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # ---- placement --------------------------------------------------------------------
    def place(self, states: dict[torch.Tensor, State], largest_job: int,
              before_moving: Callable[[], None] | None = None) -> None:
        """Evict or restore whole states so that resident + pages fit `limit()`.

        `states` maps each parameter (in update order) to its state dict; tensors are
        replaced in those dicts when they move. `largest_job` is the page bytes the
        largest chunk the owner will stream needs (it sizes the pages). `before_moving` is
        called first where anything may move (the owner drops what it holds of the states).
        """
        limit = self.limit()
        if (self.pages is None and len(self.resident) == len(states) and self.device_bytes <= limit
                and all(p in self.resident for p in states)):
            return  # all resident, no pages, and it fits: nothing moves (the common step)
        if before_moving is not None:
            before_moving()
        for p in [p for p in self.resident if p not in states]:  # params that left
            del self.resident[p]
        sizes = {p: nbytes(s) for p, s in states.items()}
        if sum(sizes.values()) <= limit:
            page, capacity = 0, limit
        else:
            page = max(MIN_PAGE_BYTES, min(self.page_size, align(largest_job)))
            if 2 * page > limit:  # shrink the pages to fit (spike): never below the minimum
                page = max(MIN_PAGE_BYTES, int(limit // 2) // ALIGN * ALIGN)
            capacity = limit - 2 * page
        # Keep what is resident while it fits, in order; evict the rest, last first.
        keep, used = set(), 0  # ids: `in` on a list of tensors would compare values
        for p in states:
            if p in self.resident and used + sizes[p] <= capacity:
                keep.add(id(p))
                used += sizes[p]
        for p in reversed(list(self.resident)):
            if id(p) not in keep:
                self._evict(p, states[p])
        if self.pages is not None and self.pages.numel() != 2 * page:
            self.pages = None
        # Restore first-fit, in order.
        for p in states:
            if p not in self.resident and used + sizes[p] <= capacity:
                if not self._restore(p, states[p]):
                    break
                used += sizes[p]
        if any(p not in self.resident for p in states) and self.pages is None:
            # (page is 0 only if everything fit but a restore hit out-of-memory)
            page = page or max(MIN_PAGE_BYTES, min(self.page_size, align(largest_job)))
            self.pages = self._allocate_pages(page, states)
        self._note_peak()

    def _evict(self, p: torch.Tensor, state: State) -> None:
        for k, t in state.items():
            if k != "step":
                state[k] = self.to_host(t)
        self.moved_bytes += self.resident.pop(p)
        self.evictions += 1

    def _restore(self, p: torch.Tensor, state: State) -> bool:
        """Move one state to the device; False (state left on the host) on out-of-memory."""
        try:
            moved = {k: t.to(self.device, non_blocking=self.pin, copy=True) for k, t in state.items() if k != "step"}
        except torch.OutOfMemoryError:
            return False
        state.update(moved)
        self.resident[p] = nbytes(moved)
        self.moved_bytes += self.resident[p]
        self.restores += 1
        self._note_peak()
        return True

    def _allocate_pages(self, page: int, states: dict[torch.Tensor, State]) -> torch.Tensor:
        try:
            return torch.empty((2, page), dtype=torch.uint8, device=self.device)
        except torch.OutOfMemoryError:
            for p in reversed(list(self.resident)):  # last resort: everything to the host
                self._evict(p, states[p])
            try:
                return torch.empty((2, MIN_PAGE_BYTES), dtype=torch.uint8, device=self.device)
            except torch.OutOfMemoryError as e:
                raise torch.OutOfMemoryError(
                    f"paged optimizer: no room on {self.device} even for two {MIN_PAGE_BYTES}-byte "
                    f"staging pages after evicting all state; free device memory and retry"
                ) from e

    # ---- streaming --------------------------------------------------------------------
    def _side_stream(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self._side) if self.cuda else contextlib.nullcontext()

    def _views(self, slot: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        assert self.pages is not None
        views, offset = [], 0
        for t in tensors:
            n = t.numel() * t.element_size()
            views.append(self.pages[slot, offset : offset + n].view(t.dtype).view(t.shape))
            offset += align(n)
        return views

    def stream(self, jobs: Sequence[Job]) -> None:
        """Run `jobs` in order, paging the paged ones through the two staging pages."""
        paged = [job for job in jobs if job.paged]
        if not paged:
            for job in jobs:
                job.run(job.tensors)
            return
        if self.pages is None:
            raise RuntimeError("Pager.stream: paged jobs but no staging pages; call place() first")
        page = self.pages.shape[1]
        for job in paged:
            if page_bytes(job.tensors) > page:
                raise ValueError(f"Pager.stream: a job needs {page_bytes(job.tensors)} bytes, the page holds {page}")
        main = torch.cuda.current_stream(self.device) if self.cuda else None
        if self.cuda:
            self._side.wait_stream(main)  # evictions / last step's work on the pages come first
        loaded: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}

        def load(i: int) -> None:
            views = self._views(i % 2, paged[i].tensors)
            with self._side_stream():
                for view, host in zip(views, paged[i].tensors):
                    view.copy_(host, non_blocking=self.pin)
                event = self._side.record_event() if self.cuda else None
            loaded[i] = (views, event)
            self.moved_bytes += nbytes(views)

        load(0)
        i = 0
        for job in jobs:
            if not job.paged:
                job.run(job.tensors)
                continue
            if i + 1 < len(paged):
                # Page (i+1) % 2 last held job i-1, whose write-back is already queued on
                # the side stream: stream order makes this load wait for it.
                load(i + 1)
            views, event = loaded.pop(i)
            if self.cuda:
                main.wait_event(event)
            job.run(views)
            done = main.record_event() if self.cuda else None
            with self._side_stream():
                if self.cuda:
                    self._side.wait_event(done)
                for view, host in zip(views, job.tensors):
                    host.copy_(view, non_blocking=self.pin)
            self.moved_bytes += nbytes(views)
            i += 1
        if self.cuda:
            main.wait_stream(self._side)  # the pages are free again for main-stream work


def chunks(n: int, step: int) -> Iterator[tuple[int, int]]:
    """[start, end) ranges covering range(n) in pieces of `step` (the last may be short)."""
    for start in range(0, n, step):
        yield start, min(n, start + step)
