"""AdamW with 32-bit or 8-bit block-wise state, optionally paged to host memory.

    opt = AdamW(model.parameters(), lr=2e-4, weight_decay=0.0, state_bits=8, paged=True)
    loss.backward(); clip_grad_norm(model.parameters(), 0.3); opt.step(); opt.zero_grad()

Tested by `pytest tests/optim` (torch.optim.AdamW is the oracle for 32-bit state).

- Decoupled weight decay, exactly torch.optim.AdamW(fused=True)'s arithmetic (its kernel,
  `torch._fused_adamw_`: one launch for any number of tensors, the transformers Trainer's
  default optimizer): p *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g*g;
  p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps). Steps are Python ints; the kernel
  reads the step from a float32 scalar made on the device per step (a fill, no copy).
- step(found_inf=t), t a float32 0-dim tensor, 1.0 or 0.0: where it is 1.0 the step changes
  no parameter and no state, decided on the device (torch's fused kernels' `found_inf`; no
  host read). Its step count is taken all the same: `rewind()` gives it back once the host
  has read t (train/loop.py reads it a step later).
- state_bits=32: m and v in float32 (also for bf16 parameters: the math runs in float32
  and the parameter is rounded once).
- state_bits=8 (formats.md sections 3 and 9): m and v cut into blocks of 256 elements,
  each block scaled by its float32 absmax and stored as the index of the nearest value
  of bitsandbytes' dynamic map (m: signed map, v: unsigned map; ties to the lower code:
  quant/blockwise8.py, `quantize_8bit_nearest`).
  1 + 1 bytes + 2 x 4 bytes per 256 elements = 2.03125 bytes/param. Parameters with
  fewer than `min_8bit_size` (4096) elements keep float32 state. The update uses the
  new m and v before they are re-quantized, as bitsandbytes does.
- paged=True (the QLoRA default; paging.py): state lives on the device within a budget,
  the rest in (pinned) host memory, streamed through two staging pages; a spike in
  device memory evicts state to the host before the step. On a CPU-only machine the
  default budget keeps everything in place: same API, same numbers.
- All state is flat 1-D per parameter; big parameters are updated in chunks (multiples
  of 256 elements, so 8-bit blocks never straddle a chunk) to bound temporaries and
  page sizes; float32 parameters with resident state go whole (the fused kernel makes no
  temporaries), with m and v viewed in the parameter's shape (views kept across steps, so a
  step makes no view op per parameter). Elementwise math makes chunked and whole updates identical.
- Sharded parameters (FSDP2's DTensors) are updated through their local shard: the state
  covers this rank's elements only (so state_dict() is this rank's shard), while the
  8-bit-or-not choice follows the whole parameter's size, the same on every rank.
- state_dict() holds plain CPU tensors (uint8 codes, float32 scales and moments, an
  int64 step) whatever the variant or page placement; train/checkpoint.py flattens it
  for safetensors. load_state_dict() never casts state to the parameter dtype.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from qlora.errors import InputError
from qlora.optim.paging import ALIGN, DEFAULT_PAGE_BYTES, Job, Pager, align, chunks, nbytes
from qlora.quant.blockwise8 import BLOCK, dequantize_8bit, dynamic_map_on, quantize_8bit_nearest
from qlora.quant.codebooks import signed_dynamic_map

MIN_8BIT_SIZE = 4096
"""Parameters with fewer elements keep float32 state in 8-bit mode (as bitsandbytes)."""

MATH_CHUNK = 1 << 22
"""Most elements updated at once: bounds the float32 temporaries (16 MiB each)."""


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameter or gradient), else `t` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _adamw_(p: list[torch.Tensor], g: list[torch.Tensor], m: list[torch.Tensor], v: list[torch.Tensor],
            group: dict, step: int, found_inf: torch.Tensor | None = None) -> None:
    """torch.optim.AdamW(fused=True)'s update in place on lists of float32 p/g/m/v (pairwise of
    one shape, on one device), all at step `step`: one kernel launch, plus one to make the step.
    Nothing changes where `found_inf` (float32, 0-dim, on the device) is 1.0."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    steps = [torch.full((), float(step), dtype=torch.float32, device=p[0].device)] * len(p)
    torch._fused_adamw_(p, g, m, v, [], steps, lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps,
                        amsgrad=False, maximize=False, found_inf=found_inf)


def _update(p: list[torch.Tensor], g: list[torch.Tensor], m: list[torch.Tensor], v: list[torch.Tensor],
            group: dict, step: int, found_inf: torch.Tensor | None = None) -> None:
    """_adamw_ on parameter and gradient slices of any float dtype: float32 math, p rounded once
    (rounding back an unchanged float32 copy gives p's own values: a skipped step stays exact)."""
    p32 = [t if t.dtype == torch.float32 else t.float() for t in p]
    g32 = [t if t.dtype == torch.float32 else t.float() for t in g]
    _adamw_(p32, g32, m, v, group, step, found_inf)
    for t, t32 in zip(p, p32):
        if t32 is not t:
            t.copy_(t32)


def _update_chunk(p: torch.Tensor, g: torch.Tensor, state: list[torch.Tensor], eight_bit: bool, group: dict,
                  step: int, found_inf: torch.Tensor | None = None) -> None:
    """Update flat slices `p`, `g` and their state slices (m, v or mq, ma, vq, va) in place."""
    if not eight_bit:
        _update([p], [g], state[:1], state[1:], group, step, found_inf)
        return
    mq, ma, vq, va = state
    m = dequantize_8bit(mq, ma, dynamic_map_on(mq.device, True)[0])
    v = dequantize_8bit(vq, va, dynamic_map_on(vq.device, False)[0])
    _update([p], [g], [m], [v], group, step, found_inf)
    if found_inf is None:
        quantize_8bit_nearest(m, True, mq, ma)
        quantize_8bit_nearest(v, False, vq, va)
        return
    new = [torch.empty_like(t) for t in state]  # re-quantizing an unchanged m may still move a code:
    quantize_8bit_nearest(m, True, new[0], new[1])  # a skipped step keeps the codes and scales it had
    quantize_8bit_nearest(v, False, new[2], new[3])
    skipped = found_inf == 1
    for t, t_new in zip(state, new):
        torch.where(skipped, t, t_new, out=t)


class _Batch:
    """Resident float32 state of one group at one step (whole float32 parameters, or chunks of
    other dtypes' of at most MATH_CHUNK elements in all), updated by one _update call: one fused
    kernel launch for all of them, not one per parameter or chunk."""

    def __init__(self, group: dict, step: int, found_inf: torch.Tensor | None) -> None:
        self.group, self.step, self.found_inf, self.numel = group, step, found_inf, 0
        self.p: list[torch.Tensor] = []
        self.g: list[torch.Tensor] = []
        self.m: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def add(self, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
        self.p.append(p)
        self.g.append(g)
        self.m.append(m)
        self.v.append(v)
        self.numel += p.numel()

    def run(self, _: list[torch.Tensor]) -> None:
        _update(self.p, self.g, self.m, self.v, self.group, self.step, self.found_inf)


def _state_slices(state: dict[str, torch.Tensor], eight_bit: bool, start: int, end: int) -> list[torch.Tensor]:
    """The state tensors covering parameter elements [start, end) (start a multiple of 256)."""
    if eight_bit:
        b0, b1 = start // BLOCK, -(-end // BLOCK)
        return [
            state["exp_avg_q"][start:end],
            state["exp_avg_absmax"][b0:b1],
            state["exp_avg_sq_q"][start:end],
            state["exp_avg_sq_absmax"][b0:b1],
        ]
    return [state["exp_avg"][start:end], state["exp_avg_sq"][start:end]]


def _page_elements(eight_bit: bool, page: int) -> int:
    """Largest multiple of 256 elements whose state chunk fits a page of `page` bytes."""
    per_block = (2 * BLOCK + 8) if eight_bit else 8 * BLOCK
    overhead = (4 if eight_bit else 2) * ALIGN  # each tensor starts aligned
    blocks = max(1, (page - overhead) // per_block)
    while blocks > 1 and _chunk_page_bytes(eight_bit, blocks * BLOCK) > page:
        blocks -= 1
    return blocks * BLOCK


def _chunk_page_bytes(eight_bit: bool, n: int) -> int:
    """Page bytes the state of n parameter elements takes (see paging.page_bytes)."""
    if eight_bit:
        return 2 * align(n) + 2 * align(4 * -(-n // BLOCK))
    return 2 * align(4 * n)


class AdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay; float32 or 8-bit block-wise state; optional paging.

    Args:
        params: parameters or parameter groups (groups may set their own `state_bits`).
        lr, betas, eps, weight_decay: as torch.optim.AdamW.
        state_bits: 32 or 8.
        min_8bit_size: parameters with fewer elements keep float32 state when 8-bit.
        paged: page state between the device and host memory (paging.py).
        budget: device bytes for state per device, or "auto" (free memory minus margin).
        margin: bytes "auto" leaves free (default 1 GiB on CUDA, 0 elsewhere).
        free_memory: probe returning free device bytes (default: the CUDA driver's; none
            on CPU). Tests pass a fake one to simulate a spike.
        page_size: bytes of each of the two staging pages.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        state_bits: int = 32,
        *,
        min_8bit_size: int = MIN_8BIT_SIZE,
        paged: bool = True,
        budget: int | str = "auto",
        margin: int | None = None,
        free_memory: Callable[[], int] | None = None,
        page_size: int = DEFAULT_PAGE_BYTES,
    ) -> None:
        if not lr >= 0.0:
            raise InputError(f"AdamW: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise InputError(f"AdamW: betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise InputError(f"AdamW: eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise InputError(f"AdamW: weight_decay must be >= 0, got {weight_decay}")
        _check_bits(state_bits)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, state_bits=state_bits)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_bits(group["state_bits"])
        self.min_8bit_size = min_8bit_size
        self.paged = paged
        self._pager_args = dict(budget=budget, margin=margin, free_memory=free_memory, page_size=page_size)
        self.pagers: dict[torch.device, Pager] = {}
        if paged:  # fail early on a bad budget, not at the first step
            Pager("cpu", **self._pager_args)

    # ---- state layout -----------------------------------------------------------------
    def is_8bit(self, p: torch.Tensor, group: dict) -> bool:
        """Whether `p`'s state is block-wise 8-bit (else float32)."""
        return group["state_bits"] == 8 and p.numel() >= self.min_8bit_size

    def _init_state(self, p: torch.Tensor, group: dict) -> dict[str, torch.Tensor]:
        """Zero state for `p`: on the host tier when paged (place() may restore it)."""
        n = local(p).numel()
        device = p.device
        pin = False
        if self.paged:
            pager = self._pager(p.device)
            device, pin = pager.host, pager.pin
        state: dict[str, torch.Tensor | int] = {"step": 0}  # a Python int: no tensor op per step
        if self.is_8bit(p, group):
            zero_m = int(torch.searchsorted(signed_dynamic_map(), torch.tensor(0.0)))
            state["exp_avg_q"] = torch.full((n,), zero_m, dtype=torch.uint8, device=device, pin_memory=pin)
            state["exp_avg_absmax"] = torch.zeros(-(-n // BLOCK), device=device, pin_memory=pin)
            state["exp_avg_sq_q"] = torch.zeros(n, dtype=torch.uint8, device=device, pin_memory=pin)
            state["exp_avg_sq_absmax"] = torch.zeros(-(-n // BLOCK), device=device, pin_memory=pin)
        else:
            state["exp_avg"] = torch.zeros(n, device=device, pin_memory=pin)
            state["exp_avg_sq"] = torch.zeros(n, device=device, pin_memory=pin)
        return state

    def _pager(self, device: torch.device) -> Pager:
        if device not in self.pagers:
            self.pagers[device] = Pager(device, **self._pager_args)
        return self.pagers[device]

    def state_bytes(self, where: str | None = None) -> int:
        """Bytes of optimizer state (moments and scales, step counters excluded).

        where: None (all), "device" (resident on an accelerator tier) or "host" (paged out).
        Unpaged state counts as "device".
        """
        if where not in (None, "device", "host"):
            raise ValueError(f"state_bytes: where must be None, 'device' or 'host', got {where!r}")
        total = 0
        for p, state in self.state.items():
            on_device = not self.paged or self._pager(p.device).is_resident(p)
            if where is None or (where == "device") == on_device:
                total += nbytes(state)
        return total

    # ---- the step ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, found_inf: torch.Tensor | None = None):
        """One AdamW update of every parameter that has a gradient; returns closure's loss.
        found_inf: a float32 0-dim tensor, 1.0 or 0.0; at 1.0 the update changes nothing
        (decided on the device), though the step is counted: see rewind()."""
        if found_inf is not None and (found_inf.dtype != torch.float32 or found_inf.dim() != 0):
            raise ValueError(f"AdamW.step: found_inf must be a 0-dim float32 tensor, got {found_inf.dtype} "
                             f"{tuple(found_inf.shape)}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work: dict[torch.device, list[tuple[torch.Tensor, dict]]] = defaultdict(list)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"AdamW: sparse gradient for parameter of shape {tuple(p.shape)} is not supported"
                    )
                if p.grad.shape != p.shape:
                    raise RuntimeError(
                        f"AdamW: gradient shape {tuple(p.grad.shape)} != parameter shape {tuple(p.shape)}"
                    )
                if not self.state[p]:
                    self.state[p] = self._init_state(p, group)
                work[p.device].append((p, group))
        self._counted = [self.state[p] for items in work.values() for p, _ in items]
        for device, items in work.items():
            self._step_device(device, items, found_inf)
        return loss

    def rewind(self) -> None:
        """Take back the last step's count, for a step that `found_inf` made change nothing
        (the next step then uses the bias correction the skipped one had). Call it at most
        once, before the next step(), and only for a skipped step: after a real update it
        would repeat that update's bias correction."""
        for state in self.__dict__.pop("_counted", []):
            state["step"] -= 1

    def _step_device(self, device: torch.device, items: list[tuple[torch.Tensor, dict]],
                     found_inf: torch.Tensor | None) -> None:
        if found_inf is not None:
            found_inf = found_inf.to(device, non_blocking=True)  # the kernels read it where they run
        pager = self._pager(device) if self.paged else None
        views = self.__dict__.setdefault("_views", {})
        if len(views) > len(self.state):  # parameters whose state is gone: let their old m and v go
            views.clear()
        if pager is not None:
            pager.place(*self._held(device), before_moving=views.clear)  # kept views would pin moved state
        jobs: list[Job] = []
        batches: dict[tuple[int, int, bool], _Batch] = {}  # resident 32-bit state, by (group, step, whole)

        def batch_for(group: dict, step: int, whole: bool, numel: int) -> _Batch:
            """The open batch of (group, step), or a new one where a chunk would pass MATH_CHUNK."""
            batch = batches.get((id(group), step, whole))
            if batch is None or (not whole and batch.numel + numel > MATH_CHUNK):
                batch = batches[id(group), step, whole] = _Batch(group, step, found_inf)
                jobs.append(Job([], batch.run, False))
            return batch

        for p, group in items:
            state = self.state[p]
            state["step"] = step = state["step"] + 1
            eight_bit = self.is_8bit(p, group)
            paged = pager is not None and not pager.is_resident(p)
            lp = local(p)
            whole = not (paged or eight_bit) and lp.dtype == torch.float32
            if whole and lp.is_contiguous():
                # whole, not in chunks: for float32 parameters the fused kernel makes no temporaries;
                # p and its gradient as they are, m and v viewed in their shape once (no view op a step)
                g = local(p.grad)
                batch_for(group, step, True, 0).add(lp, g if g.is_contiguous() else g.contiguous(),
                                                    *_shaped(views, p, state, lp.shape))
                continue
            flat_g = local(p.grad).reshape(-1)
            flat_p, writeback = _flat(lp)
            if whole:
                batch_for(group, step, True, 0).add(flat_p, flat_g, state["exp_avg"], state["exp_avg_sq"])
                if writeback is not None:  # after the batch's job, which is earlier in the list
                    jobs.append(Job([], writeback, False))
                continue
            if paged:
                assert pager.pages is not None
                size = min(MATH_CHUNK, _page_elements(eight_bit, pager.pages.shape[1]))
            else:
                size = MATH_CHUNK
            for start, end in chunks(lp.numel(), size):
                tensors = _state_slices(state, eight_bit, start, end)
                if paged or eight_bit:
                    runner = _chunk_runner(flat_p[start:end], flat_g[start:end], eight_bit, group, step, found_inf)
                    jobs.append(Job(tensors, runner, paged))
                    continue
                batch_for(group, step, False, end - start).add(flat_p[start:end], flat_g[start:end], *tensors)
            if writeback is not None:
                jobs.append(Job([], writeback, False))
        if pager is not None:
            pager.stream(jobs)
        else:
            for job in jobs:
                job.run(job.tensors)

    def _held(self, device: torch.device) -> tuple[dict[torch.Tensor, dict], int]:
        """(every state on `device`, stepped this time or not, by parameter in group order; the
        page bytes of the largest chunk): worked out again only when states or groups change."""
        key = (device, len(self.state), sum(len(g["params"]) for g in self.param_groups))
        cached = self.__dict__.get("_held_cache")  # (self.state, key, result): the dict itself, not its id
        if cached is not None and cached[0] is self.state and cached[1] == key:
            return cached[2]
        held = [(p, g) for g in self.param_groups for p in g["params"] if p.device == device and self.state.get(p)]
        largest = max(_chunk_page_bytes(self.is_8bit(p, g), local(p).numel()) for p, g in held)
        result = ({p: self.state[p] for p, _ in held}, largest)
        self._held_cache = (self.state, key, result)
        return result

    # ---- checkpoints ------------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for pending page copies (before reading state on the CPU)."""
        for pager in self.pagers.values():
            pager.synchronize()

    def state_dict(self) -> dict[str, Any]:
        """Standard optimizer state dict whose state values are CPU tensor copies.

        The same bytes whether state was resident, paged or unpaged.
        """
        self.synchronize()
        sd = super().state_dict()
        sd["state"] = {
            i: {k: torch.tensor(t, dtype=torch.int64) if k == "step" else t.detach().to("cpu", copy=True)
                for k, t in s.items()}
            for i, s in sd["state"].items()
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from `state_dict()`; tensors are copied, never cast.

        Paged state goes to the host and returns to the device at the next step's placement.
        """
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"load_state_dict: {len(saved_groups)} saved parameter groups, optimizer has {len(groups)}"
            )
        index: dict[int, torch.Tensor] = {}
        for g, sg in zip(groups, saved_groups):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"load_state_dict: a saved group has {len(sg['params'])} parameters, "
                    f"the optimizer's has {len(g['params'])}"
                )
            index.update(zip(sg["params"], g["params"]))
        for g, sg in zip(groups, saved_groups):
            _check_bits(sg["state_bits"])
            g.update({k: v for k, v in sg.items() if k != "params"})
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        group_of = {p: g for g in groups for p in g["params"]}
        self.synchronize()
        for pager in self.pagers.values():
            pager.forget()
        self.__dict__.pop("_views", None)  # views of the old state
        self.state = defaultdict(dict)
        for i, saved in state_dict["state"].items():
            i = int(i)
            if i not in index:
                raise ValueError(f"load_state_dict: state for parameter index {i}, which no group holds")
            p = index[i]
            expected = set(self._init_state_keys(p, group_of[p]))
            if set(saved) != expected:
                raise ValueError(
                    f"load_state_dict: parameter {i} (shape {tuple(p.shape)}) has state keys {sorted(saved)}, "
                    f"expected {sorted(expected)} for state_bits={group_of[p]['state_bits']}"
                )
            state = {}
            for k, t in saved.items():
                if k == "step":
                    state[k] = int(t)
                else:
                    _check_state_shape(i, p, k, t)
                    if self.paged:
                        state[k] = self._pager(p.device).to_host(t.detach().reshape(-1))
                    else:
                        state[k] = t.detach().reshape(-1).to(p.device, copy=True)
            self.state[p] = state
        self.__dict__.pop("_counted", None)  # the loaded counts are not the last step's

    def _init_state_keys(self, p: torch.Tensor, group: dict) -> list[str]:
        if self.is_8bit(p, group):
            return ["step", "exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax"]
        return ["step", "exp_avg", "exp_avg_sq"]


def _check_bits(bits: int) -> None:
    if bits not in (32, 8):
        raise InputError(f"AdamW: state_bits must be 32 or 8, got {bits!r}")


def _check_state_shape(i: int, p: torch.Tensor, key: str, t: torch.Tensor) -> None:
    n = local(p).numel()
    want_n, want_dtype = {
        "exp_avg": (n, torch.float32),
        "exp_avg_sq": (n, torch.float32),
        "exp_avg_q": (n, torch.uint8),
        "exp_avg_sq_q": (n, torch.uint8),
        "exp_avg_absmax": (-(-n // BLOCK), torch.float32),
        "exp_avg_sq_absmax": (-(-n // BLOCK), torch.float32),
    }[key]
    if t.numel() != want_n or t.dtype != want_dtype:
        raise ValueError(
            f"load_state_dict: parameter {i} (shape {tuple(p.shape)}) state {key!r} is {t.dtype} with "
            f"{t.numel()} elements, expected {want_dtype} with {want_n}"
        )


def _shaped(views: dict, p: torch.Tensor, state: dict, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """p's flat float32 m and v viewed in `shape`, kept in `views` (the optimizer's, outside the
    state dict) and made again when m or v is another tensor."""
    m, v = state["exp_avg"], state["exp_avg_sq"]
    kept = views.get(p)  # (m, v, m viewed, v viewed)
    if kept is None or kept[0] is not m or kept[1] is not v or kept[2].shape != shape:
        kept = views[p] = (m, v, m.view(shape), v.view(shape))
    return kept[2], kept[3]


def _flat(p: torch.Tensor):
    """(flat view of p's data, None) or, for a non-contiguous p, (flat copy, write-back job)."""
    if p.is_contiguous():
        return p.detach().view(-1), None
    flat = p.detach().contiguous().view(-1)
    return flat, lambda _: p.detach().copy_(flat.view_as(p))


def _chunk_runner(p: torch.Tensor, g: torch.Tensor, eight_bit: bool, group: dict, step: int,
                  found_inf: torch.Tensor | None):
    def run(state: list[torch.Tensor]) -> None:
        _update_chunk(p, g, state, eight_bit, group, step, found_inf)

    return run


__all__ = ["AdamW", "MIN_8BIT_SIZE"]
