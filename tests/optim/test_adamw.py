"""32-bit AdamW against torch.optim.AdamW(fused=True) (the oracle), and the optimizer's contract."""
import pytest
import torch

from qlora.optim import AdamW, lr_schedule
from qlora.optim import adamw as adamw_mod


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(64, 48, generator=g)),
        torch.nn.Parameter(torch.randn(3000, generator=g)),  # several chunks once MATH_CHUNK is small
        torch.nn.Parameter(torch.randn(7, generator=g)),
        torch.nn.Parameter(torch.randn(40, 30, generator=g).t()),  # non-contiguous
    ]


def _clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _set_grads(step: int, *param_lists) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=g) * (1 + i) for i, p in enumerate(param_lists[0])]
    for params in param_lists:
        for p, grad in zip(params, grads):
            p.grad = torch.empty_like(p).copy_(grad)  # laid out as the parameter, as autograd makes it
            # (torch's fused kernel pairs elements by memory order: a transposed parameter with a
            # row-major gradient would pair the wrong elements)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("paged", [False, True])
def test_matches_torch_adamw_over_100_steps(monkeypatch, paged):
    """Bit for bit torch's fused AdamW; within float32 rounding its single-tensor loop."""
    monkeypatch.setattr(adamw_mod, "MATH_CHUNK", 1024)  # exercise chunked updates
    ours, ref = _params(), None
    ref = _clone(ours)
    groups = lambda ps: [  # noqa: E731
        {"params": ps[:2], "lr": 3e-3, "weight_decay": 0.1},
        {"params": ps[2:], "lr": 1e-2, "weight_decay": 0.0, "betas": (0.8, 0.99)},
    ]
    loop = _clone(ours)
    opt = AdamW(groups(ours), eps=1e-6, paged=paged)
    oracle = torch.optim.AdamW(groups(ref), eps=1e-6, fused=True)
    unfused = torch.optim.AdamW(groups(loop), eps=1e-6, foreach=False)
    for step in range(100):
        _set_grads(step, ours, ref, loop)
        opt.step()
        oracle.step()
        unfused.step()
    for p, q, r in zip(ours, ref, loop):
        assert torch.equal(p, q)  # the same kernel, bit for bit
        assert _rel(p, r) <= 1e-6
    for p, q in zip(ours, ref):
        assert torch.equal(opt.state[p]["exp_avg"], oracle.state[q]["exp_avg"].reshape(-1))
        assert torch.equal(opt.state[p]["exp_avg_sq"], oracle.state[q]["exp_avg_sq"].reshape(-1))


def test_resident_float32_state_is_updated_by_one_fused_call_per_group(monkeypatch):
    """One update launch per group and step on a GPU, not one per parameter (or chunk)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += func.overloadpacket.__name__ == "_fused_adamw_"
            return func(*args, **(kwargs or {}))

    ours = _params()
    opt = AdamW([{"params": ours[:2]}, {"params": ours[2:], "lr": 0.1}], paged=False)
    _set_grads(0, ours)
    with Count():
        opt.step()
    assert Count.calls == 2
    monkeypatch.setattr(adamw_mod, "MATH_CHUNK", 1024)
    Count.calls = 0
    with Count():  # float32 parameters go whole: the fused kernel makes no temporaries for them
        opt.step()
    assert Count.calls == 2
    half = [torch.nn.Parameter(p.detach().bfloat16().contiguous()) for p in ours]
    opt = AdamW([{"params": half[:2]}, {"params": half[2:], "lr": 0.1}], paged=False)
    _set_grads(0, half)
    Count.calls = 0
    with Count():  # bf16 ones in float32 copies of at most MATH_CHUNK elements a batch
        opt.step()
    want = sum(-(-p.numel() // 1024) for p in half)  # at most one chunk of a parameter per batch here
    assert 2 < Count.calls <= want, (Count.calls, [p.numel() for p in half])


def test_lambda_lr_scheduler_and_closure():
    ours = _params()
    ref = _clone(ours)
    opt, oracle = AdamW(ours, lr=1e-2), torch.optim.AdamW(ref, lr=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule("cosine", 5, 30))
    osched = torch.optim.lr_scheduler.LambdaLR(oracle, lr_schedule("cosine", 5, 30))
    for step in range(30):
        _set_grads(step, ours, ref)
        loss = opt.step(lambda: torch.tensor(float(step)))
        assert loss.item() == step
        oracle.step()
        sched.step()
        osched.step()
    assert opt.param_groups[0]["lr"] == oracle.param_groups[0]["lr"]
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)


def test_bf16_parameter_gets_float32_state_and_one_rounding():
    p = torch.nn.Parameter(torch.randn(100).bfloat16())
    p32 = torch.nn.Parameter(p.detach().float())
    opt, oracle = AdamW([p], lr=1e-2), torch.optim.AdamW([p32], lr=1e-2, fused=True)
    grad = torch.randn(100)
    p.grad, p32.grad = grad.bfloat16(), grad.bfloat16().float()
    opt.step()
    oracle.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(p.detach(), p32.detach().bfloat16())


def test_params_without_grad_are_skipped():
    a, b = torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(10))
    opt = AdamW([a, b], lr=0.1)
    a.grad = torch.ones(10)
    opt.step()
    assert b not in opt.state and torch.equal(b.detach(), torch.ones(10))
    assert int(opt.state[a]["step"]) == 1
    assert opt.state_bytes() == 2 * 10 * 4


def test_errors_name_the_problem():
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match="state_bits must be 32 or 8"):
        AdamW([p], state_bits=4)
    with pytest.raises(ValueError, match="state_bits must be 32 or 8"):
        AdamW([{"params": [p], "state_bits": 16}])
    with pytest.raises(ValueError, match="betas"):
        AdamW([p], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="budget"):
        AdamW([p], paged=True, budget=100)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradient for parameter of shape \(10, 3\)"):
        AdamW(emb.parameters()).step()


def test_state_that_is_gone_is_not_kept_alive():
    """The step's kept views of m and v let go of a parameter's state once the optimizer drops it."""
    import gc
    import weakref

    ours = _params()[:3]
    opt = AdamW(ours, paged=False)
    _set_grads(0, ours)
    opt.step()
    gone = ours.pop()
    group = opt.param_groups[0]["params"]
    del group[next(i for i, q in enumerate(group) if q is gone)]
    m = weakref.ref(opt.state.pop(gone)["exp_avg"])
    _set_grads(1, ours)
    opt.step()
    gc.collect()
    assert m() is None
