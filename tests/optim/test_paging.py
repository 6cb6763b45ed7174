"""Paging, with both tiers on the CPU: same numbers as unpaged, the budget holds, spikes evict.

The pager's bookkeeping (what is resident, how many device bytes it holds, the peak) is
the same code that runs on CUDA; only the copies are synchronous here.
"""
import gc
import weakref

import pytest
import torch

from qlora.optim import AdamW, Pager
from qlora.optim.paging import MIN_PAGE_BYTES, nbytes

SHAPES = [(96, 80), (5000,), (33,), (64, 64), (3, 1000), (12000,)]


def _params(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
    params[4] = torch.nn.Parameter(torch.randn(1000, 3, generator=g).to(dtype).t())  # non-contiguous
    return params


def _grads(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _run(opt: AdamW, params, steps: range, before_step=None) -> None:
    for step in steps:
        for p, grad in zip(params, _grads(step)):
            p.grad = grad.to(p.dtype)
        if before_step is not None:
            before_step(step)
        opt.step()


def _total_state(bits):
    params = _params()
    opt = AdamW(params, state_bits=bits, paged=False)
    _run(opt, params, range(1))
    return opt.state_bytes()


@pytest.mark.parametrize("bits", [32, 8])
def test_paged_under_a_small_budget_matches_unpaged_exactly(bits):
    ref_params, params = _params(), _params()
    ref = AdamW(ref_params, lr=1e-2, state_bits=bits, paged=False)
    budget = _total_state(bits) // 2  # about half the state cannot be resident
    opt = AdamW(params, lr=1e-2, state_bits=bits, paged=True, budget=budget, page_size=4096)
    _run(ref, ref_params, range(12))
    _run(opt, params, range(12))
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
    pager = opt.pagers[torch.device("cpu")]
    assert pager.peak_device_bytes <= budget
    assert opt.state_bytes("host") > 0 and opt.state_bytes("device") > 0
    assert opt.state_bytes("device") + opt.state_bytes("host") == opt.state_bytes() == ref.state_bytes()
    assert pager.moved_bytes > 12 * opt.state_bytes("host")  # streamed in and out each step
    for p, q in zip(params, ref_params):
        for key, t in ref.state[q].items():
            assert torch.equal(torch.as_tensor(opt.state[p][key]), torch.as_tensor(t)), key


def test_steady_budget_moves_nothing_and_resident_first_fit():
    params = _params()
    budget = 60_000  # state bytes: 61440, 40000, 264, 32768, 24000, 96000
    opt = AdamW(params, paged=True, budget=budget, page_size=8192)
    _run(opt, params, range(2))
    pager = opt.pagers[torch.device("cpu")]
    resident = [i for i, p in enumerate(params) if pager.is_resident(p)]
    sizes = [nbytes(opt.state[p]) for p in params]
    assert sum(sizes[i] for i in resident) + 2 * 8192 <= budget
    assert resident == [1, 2]  # first fit, in order, within 60000 - 2 pages
    restores = pager.restores
    _run(opt, params, range(2, 5))
    assert pager.restores == restores and pager.evictions == 0


@pytest.mark.parametrize("bits", [32, 8])
def test_spike_evicts_before_the_step_and_state_comes_back(bits):
    ref_params, params = _params(), _params()
    ref = AdamW(ref_params, lr=1e-2, state_bits=bits, paged=False)
    total = _total_state(bits)
    free = {"bytes": 10 * total}  # the faked device: plenty free at first
    margin = 1000
    opt = AdamW(
        params, lr=1e-2, state_bits=bits, margin=margin, page_size=4096, free_memory=lambda: free["bytes"]
    )  # budget "auto": what the probe says is free, plus what the pager holds, minus the margin
    log = []

    def device(step):
        # step 3: something else takes most of the card; step 6: it is released.
        # The probe reports free memory as the device sees it: the state we hold is not free.
        held = opt.pagers[torch.device("cpu")].device_bytes if opt.pagers else 0
        capacity = {3: total // 3, 4: total // 3, 5: total // 3}.get(step, 10 * total)
        free["bytes"] = capacity + margin - held
        log.append(capacity)

    _run(ref, ref_params, range(9))
    for step in range(9):
        before = opt.pagers[torch.device("cpu")].evictions if opt.pagers else 0
        if opt.pagers:
            opt.pagers[torch.device("cpu")].peak_device_bytes = 0  # the peak within this step
        held = {p: [weakref.ref(t) for k, t in opt.state[p].items() if k != "step"] for p in params}
        _run(opt, params, [step], before_step=device)
        pager = opt.pagers[torch.device("cpu")]
        assert pager.peak_device_bytes <= log[-1]  # never more than the device had for us
        if step == 3:
            assert pager.evictions > before  # evicted instead of running out of memory
            assert 0 < opt.state_bytes("device") and opt.state_bytes("host") > 0
            gc.collect()
            evicted = [p for p in params if not pager.is_resident(p)]
            assert evicted and all(t() is None for p in evicted for t in held[p])  # nothing (no kept view) pins them
        if step in (0, 1, 2, 6, 7, 8):
            assert opt.state_bytes("host") == 0  # all resident: no spike, or after it
    assert pager.restores > len(SHAPES)  # first placement + the return after the spike
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)


def test_cpu_default_is_a_no_op():
    params, ref_params = _params(), _params()
    opt = AdamW(params, lr=1e-2)  # paged=True by default; no probe, "auto" budget
    ref = AdamW(ref_params, lr=1e-2, paged=False)
    _run(opt, params, range(3))
    _run(ref, ref_params, range(3))
    pager = opt.pagers[torch.device("cpu")]
    assert pager.pages is None and opt.state_bytes("host") == 0 and pager.evictions == 0
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)


def test_params_without_grad_keep_their_accounting():
    params = _params()
    opt = AdamW(params, paged=True, budget=60_000, page_size=8192)
    _run(opt, params, range(2))
    params[1].grad = None  # resident, not stepped this time
    opt.step()
    pager = opt.pagers[torch.device("cpu")]
    assert pager.is_resident(params[1])
    assert pager.device_bytes == nbytes(opt.state[params[1]]) + nbytes(opt.state[params[2]]) + 2 * 8192
    assert pager.peak_device_bytes <= 60_000


def test_bf16_params_paged_match_unpaged():
    params, ref_params = _params(torch.bfloat16), _params(torch.bfloat16)
    opt = AdamW(params, lr=1e-2, state_bits=8, budget=30_000, page_size=4096)
    ref = AdamW(ref_params, lr=1e-2, state_bits=8, paged=False)
    _run(opt, params, range(4))
    _run(ref, ref_params, range(4))
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)


def test_pager_errors():
    with pytest.raises(ValueError, match="at least 8192 bytes"):
        Pager("cpu", budget=MIN_PAGE_BYTES)
    with pytest.raises(ValueError, match="page_size"):
        Pager("cpu", page_size=100)
    with pytest.raises(RuntimeError, match="call place"):
        from qlora.optim.paging import Job

        Pager("cpu").stream([Job([torch.zeros(4)], lambda ts: None, True)])


def test_a_step_where_everything_stays_resident_does_no_bookkeeping(monkeypatch):
    """The probe of free memory runs every step (a spike must be seen), the per-state sizing only
    when something may move."""
    import qlora.optim.paging as paging

    free = {"bytes": 10**9}
    probes = []
    params = _params()
    opt = AdamW(params, paged=True, budget="auto", margin=4096,
                free_memory=lambda: probes.append(1) or free["bytes"])
    _run(opt, params, range(2))
    sized = []
    monkeypatch.setattr(paging, "nbytes", lambda s: sized.append(1) or nbytes(s))
    probes.clear()
    _run(opt, params, range(2, 5))
    assert len(probes) == 3 and sized == []
    pager = opt.pagers[torch.device("cpu")]
    assert all(pager.is_resident(p) for p in params)
    free["bytes"] = 0  # a spike: less than the margin free, so the next step evicts
    _run(opt, params, range(5, 6))
    assert sized and pager.evictions > 0 and not all(pager.is_resident(p) for p in params)


@pytest.mark.parametrize("bits,paged,dtype", [(32, False, torch.float32), (32, True, torch.float32),
                                              (8, True, torch.float32), (8, False, torch.bfloat16),
                                              (32, True, torch.bfloat16)])
def test_a_step_with_found_inf_changes_nothing_and_rewind_gives_its_count_back(bits, paged, dtype):
    """The trainer's skip decided on the device: found_inf=1 with non-finite gradients leaves
    parameters, state and (after rewind) counts as they were, so the run goes on as if the step
    had not been tried; found_inf=0 is a plain step. Paged under half the state's bytes."""
    budget = dict(budget=_total_state(bits) // 2, page_size=4096) if paged else {}
    ref_params, params = _params(dtype), _params(dtype)
    ref = AdamW(ref_params, lr=1e-2, state_bits=bits, paged=paged, **budget)
    opt = AdamW(params, lr=1e-2, state_bits=bits, paged=paged, **budget)
    _run(ref, ref_params, range(3))
    _run(opt, params, range(3))
    before = [p.detach().clone() for p in params], {p: {k: torch.as_tensor(t).clone() for k, t in opt.state[p].items()}
                                                     for p in params}
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    opt.step(found_inf=torch.ones((), dtype=torch.float32))
    for p, was in zip(params, before[0]):
        assert torch.equal(p, was)
    for p in params:
        for key, t in before[1][p].items():
            got = torch.as_tensor(opt.state[p][key])
            assert torch.equal(got, t + 1 if key == "step" else t), key  # the count is taken until rewind
    opt.rewind()
    for step in range(3, 6):
        for p, grad in zip(params, _grads(step)):
            p.grad = grad.to(p.dtype)
        opt.step(found_inf=torch.zeros((), dtype=torch.float32))
    _run(ref, ref_params, range(3, 6))
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
        for key, t in ref.state[q].items():
            assert torch.equal(torch.as_tensor(opt.state[p][key]), torch.as_tensor(t)), key
    with pytest.raises(ValueError, match="0-dim float32"):
        opt.step(found_inf=torch.ones(1))
