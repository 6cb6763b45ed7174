"""lr schedules against transformers' (the oracle) and clipping against torch's."""
import pytest
import torch
import transformers

from qlora.optim import AdamW, clip_grad_norm, lr_schedule, scheduler, step_back

ORACLES = {
    "constant": lambda opt, w, t: transformers.get_constant_schedule(opt),
    "constant_with_warmup": lambda opt, w, t: transformers.get_constant_schedule_with_warmup(opt, w),
    "linear": lambda opt, w, t: transformers.get_linear_schedule_with_warmup(opt, w, t),
    "cosine": lambda opt, w, t: transformers.get_cosine_schedule_with_warmup(opt, w, t),
}


@pytest.mark.parametrize("name", list(ORACLES))
@pytest.mark.parametrize("warmup,total", [(0, 50), (7, 50), (1, 2)])
def test_schedules_match_transformers(name, warmup, total):
    if name == "constant":
        warmup = 0
    p = torch.nn.Parameter(torch.zeros(1))
    ours = scheduler(AdamW([p], lr=2e-4), name, warmup, total)
    ref = ORACLES[name](torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-4), warmup, total)
    for _ in range(total + 5):  # also past the end: linear/cosine stay at 0
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], rel=1e-12, abs=1e-18)
        ours.optimizer.step()
        ref.optimizer.step()
        ours.step()
        ref.step()


def test_warmup_really_warms_up():
    f = lr_schedule("constant_with_warmup", 10)
    assert [f(s) for s in (0, 5, 10, 1000)] == [0.0, 0.5, 1.0, 1.0]
    f = lr_schedule("cosine", 10, 110)
    assert f(60) == pytest.approx(0.5) and f(110) == 0.0


def test_schedule_errors():
    with pytest.raises(ValueError, match="'constant' takes no warmup.*constant_with_warmup"):
        lr_schedule("constant", warmup_steps=30)
    with pytest.raises(ValueError, match="unknown schedule 'cosin'"):
        lr_schedule("cosin")
    with pytest.raises(ValueError, match="needs total_steps > warmup_steps"):
        lr_schedule("linear", 10, 10)


def _model_grads(seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(30, 20), (5000,), (3,)]]
    for p in params[:2]:
        p.grad = torch.randn(p.shape, generator=g)
    return params  # the last one has no gradient


def test_clip_matches_torch():
    ours, ref = _model_grads(0), _model_grads(0)
    total = clip_grad_norm(ours, 0.3)
    expected = torch.nn.utils.clip_grad_norm_(ref, 0.3)
    assert torch.equal(total, expected)
    for p, q in zip(ours, ref):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
    norm = torch.cat([p.grad.reshape(-1) for p in ours if p.grad is not None]).norm()
    assert norm == pytest.approx(0.3, rel=1e-4)
    small = _model_grads(1)
    for p in small[:2]:
        p.grad *= 1e-4
    grads = [p.grad.clone() for p in small[:2]]
    clip_grad_norm(small, 0.3)  # under the limit: untouched
    assert all(torch.equal(p.grad, g) for p, g in zip(small, grads))


def test_clip_then_paged_8bit_step_equals_unpaged():
    a, b = _model_grads(2), _model_grads(2)
    opt_a = AdamW(a, lr=1e-2, state_bits=8, budget=14_000, page_size=4096)  # pages the 5000
    opt_b = AdamW(b, lr=1e-2, state_bits=8, paged=False)
    for step in range(5):
        clip_grad_norm(a, 0.3)
        clip_grad_norm(b, 0.3)
        opt_a.step()
        opt_b.step()
        for p, q in zip(a[:2], b[:2]):
            g = torch.Generator().manual_seed(step)
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
    assert opt_a.state_bytes("host") > 0 and opt_a.state_bytes("device") > 0
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_clip_refuses_nonfinite():
    params = _model_grads(3)
    params[1].grad[7] = float("nan")
    with pytest.raises(RuntimeError, match="1 of 2 gradients hold NaN or inf"):
        clip_grad_norm(params, 0.3)
    clip_grad_norm(params, 0.3, error_if_nonfinite=False)  # allowed when asked for


@pytest.mark.parametrize("name", ["cosine", "linear", "constant_with_warmup"])
def test_step_back_undoes_a_step(name):
    """After step_back the schedule is where it was before the step: the same lr, bit for bit,
    the same state, and the steps after it match a schedule that never took the extra step."""
    p = torch.nn.Parameter(torch.zeros(1))
    ours, ref = (scheduler(torch.optim.SGD([p], lr=3e-4), name, 8, 20) for _ in range(2))

    def step(*scheds):
        for s in scheds:
            s.optimizer.step()
            s.step()
    for _ in range(4):
        step(ours, ref)
    step(ours)
    assert ours.get_last_lr() != ref.get_last_lr()  # still warming up: the lr moves every step
    step_back(ours)
    for _ in range(10):
        assert ours.get_last_lr() == ref.get_last_lr()
        assert ours.optimizer.param_groups[0]["lr"] == ref.optimizer.param_groups[0]["lr"]
        assert ours.state_dict() == ref.state_dict()
        step(ours, ref)
