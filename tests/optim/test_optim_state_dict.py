"""state_dict / load_state_dict: bit-identical resume for every variant, through safetensors."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qlora.optim import AdamW, scheduler
from qlora.train.checkpoint import state_dict_from_tensors, state_dict_to_tensors

SHAPES = [(96, 80), (5000,), (33,), (12000,)]
VARIANTS = {
    "32bit": dict(state_bits=32, paged=False),
    "8bit": dict(state_bits=8, paged=False),
    "32bit-paged": dict(state_bits=32, paged=True, budget=40_000, page_size=4096),
    "8bit-paged": dict(state_bits=8, paged=True, budget=20_000, page_size=4096),
    "8bit-paged-auto": dict(state_bits=8, paged=True),
}


def _params(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _make(params, variant):
    opt = AdamW(
        [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0}],
        lr=1e-2,
        weight_decay=0.05,
        **VARIANTS[variant],
    )
    return opt, scheduler(opt, "cosine", warmup_steps=3, total_steps=20)


def _run(opt, sched, params, steps) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
        sched.step()


def _through_safetensors(sd, path):
    tensors, metadata = state_dict_to_tensors(sd)
    save_file(tensors, path, metadata=metadata)
    with safe_open(path, "pt") as f:
        return state_dict_from_tensors({k: f.get_tensor(k) for k in f.keys()}, f.metadata())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("saved_as", list(VARIANTS))
def test_resume_is_bit_identical(saved_as, dtype, tmp_path):
    straight = _params(dtype)
    opt, sched = _make(straight, saved_as)
    _run(opt, sched, straight, range(10))

    first = _params(dtype)
    opt1, sched1 = _make(first, saved_as)
    _run(opt1, sched1, first, range(5))
    sd = _through_safetensors(opt1.state_dict(), tmp_path / "optimizer.safetensors")
    sched_sd = sched1.state_dict()
    for t in (t for s in sd["state"].values() for t in s.values()):
        assert t.device.type == "cpu"

    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2, sched2 = _make(resumed, saved_as)
    opt2.load_state_dict(sd)
    sched2.load_state_dict(sched_sd)
    _run(opt2, sched2, resumed, range(5, 10))
    for p, q in zip(resumed, straight):
        assert torch.equal(p, q)
    want, got = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert want.keys() == got.keys()
    for i, state in want.items():
        for key, t in state.items():
            assert torch.equal(got[i][key], t), (i, key)


@pytest.mark.parametrize("bits", [32, 8])
def test_saved_form_does_not_depend_on_where_pages_lived(bits):
    dicts = []
    for variant in ([f"{bits}bit", f"{bits}bit-paged"] + (["8bit-paged-auto"] if bits == 8 else [])):
        params = _params()
        opt, sched = _make(params, variant)
        _run(opt, sched, params, range(4))
        if variant.endswith("-paged"):
            assert opt.state_bytes("host") > 0  # some state really was paged out
        dicts.append(opt.state_dict())
    for other in dicts[1:]:
        assert other["param_groups"] == dicts[0]["param_groups"]
        for i, state in dicts[0]["state"].items():
            assert state.keys() == other["state"][i].keys()
            for key, t in state.items():
                assert torch.equal(other["state"][i][key], t) and other["state"][i][key].dtype == t.dtype


def test_a_paged_run_resumes_unpaged_and_back():
    straight = _params()
    opt, sched = _make(straight, "8bit")
    _run(opt, sched, straight, range(8))
    params = _params()
    paged, psched = _make(params, "8bit-paged")
    _run(paged, psched, params, range(4))
    unpaged, usched = _make(params, "8bit")
    unpaged.load_state_dict(paged.state_dict())
    usched.load_state_dict(psched.state_dict())
    _run(unpaged, usched, params, range(4, 8))
    for p, q in zip(params, straight):
        assert torch.equal(p, q)


def test_state_dict_is_a_snapshot():
    params = _params()
    opt, sched = _make(params, "32bit")
    _run(opt, sched, params, range(2))
    sd = opt.state_dict()
    before = sd["state"][0]["exp_avg"].clone()
    _run(opt, sched, params, range(2, 3))
    assert torch.equal(sd["state"][0]["exp_avg"], before)
    assert sd["state"][0]["step"].dtype == torch.int64 and int(sd["state"][0]["step"]) == 2


def test_load_rejects_a_mismatched_state():
    params = _params()
    opt, sched = _make(params, "8bit")
    _run(opt, sched, params, range(1))
    sd = opt.state_dict()
    other, _ = _make(_params(), "32bit")
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(96, 80\)\) has state keys"):
        other.load_state_dict({"state": sd["state"], "param_groups": other.state_dict()["param_groups"]})
    sd["state"][1]["exp_avg_absmax"] = sd["state"][1]["exp_avg_absmax"][:-1]
    with pytest.raises(ValueError, match="'exp_avg_absmax' is torch.float32 with 19 elements, expected .* 20"):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="1 saved parameter groups, optimizer has 2"):
        opt.load_state_dict({"state": {}, "param_groups": sd["param_groups"][:1]})
