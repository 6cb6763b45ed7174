"""The training loop end to end: metrics, checkpoints, exact resume after SIGKILL, bad steps."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import qlora.train.checkpoint as checkpoint
import qlora.train.loop as loop
from qlora.train import TrainConfig, TrainingError, train
from qlora.train.report import read_metrics

FAST = dict(batch_size=2, grad_accum=2, lora_r=8, lr=1e-3, max_length=64, demo=False)


def test_end_to_end(model_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    summary = train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(out), max_steps=8,
                                save_every=3, keep_last=2, eval_every=4, **FAST))
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all({"loss", "lr", "tokens_per_s", "peak_mem_mb"} <= set(r) for r in steps)
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert summary["steps"] == 8 and summary["final_eval_loss"] is not None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000006", "step-0000008"]
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.yaml", "summary.json",
                 "loss.png", "checkpoints/step-0000006/optimizer.safetensors"):
        assert (out / name).exists(), name


def test_qlora_follows_16bit_lora(model_dir, alpaca_file, tmp_path):
    curves = {}
    for quant in ("nf4", "none"):
        train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(tmp_path / quant), max_steps=12,
                          quant_type=quant, lora_dropout=0.0, **FAST))
        curves[quant] = [r["loss"] for r in read_metrics(tmp_path / quant / "metrics.jsonl") if "loss" in r]
    gaps = [abs(a - b) / b for a, b in zip(curves["nf4"], curves["none"])]
    assert max(gaps) < 0.05, gaps  # stated tolerance: within 5% at every step on this tiny model


def _cli(model_dir, data, out, *extra):
    return [sys.executable, "-m", "qlora", "train", "--model", str(model_dir), "--data", str(data), "--output", str(out),
            "--max-steps", "10", "--save-every", "2", "--batch-size", "2", "--grad-accum", "2", "--lora-r", "8",
            "--lr", "1e-3", "--max-length", "64", "--no-demo", *extra]


def test_resume_after_sigkill_reproduces_the_loss_curve(model_dir, alpaca_file, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the uninterrupted run and the one to kill train side by side (one thread each)
    with open(tmp_path / "full.log", "w") as log:  # the child keeps its own copy of the descriptor
        whole = subprocess.Popen(_cli(model_dir, alpaca_file, tmp_path / "full"), env=env, stdout=log, stderr=log)
    kill_at = random.Random().randint(3, 8)  # a random step, checkpoints every 2
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(model_dir, alpaca_file, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and any(
                r.get("step", 0) >= kill_at for r in read_metrics(out / "metrics.jsonl") if "loss" in r):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    subprocess.run(_cli(model_dir, alpaca_file, out, "--resume"), check=True, env=env, capture_output=True)
    assert whole.wait() == 0, (tmp_path / "full.log").read_text()[-3000:]
    full = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    resumed = [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert resumed == full  # step for step, bit for bit


def test_resume_without_checkpoint(model_dir, alpaca_file, tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(tmp_path), resume=True, **FAST))


def test_a_transient_nonfinite_step_is_skipped(model_dir, alpaca_file, tmp_path, monkeypatch):
    real, calls = loop.clip_grad_norm, {"n": 0}

    def flaky(params, max_norm, **kw):
        calls["n"] += 1
        norm = real(params, max_norm, **kw)
        return norm * float("nan") if calls["n"] == 3 else norm

    monkeypatch.setattr(loop, "clip_grad_norm", flaky)
    summary = train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(tmp_path), max_steps=5, **FAST))
    assert summary["steps"] == 5 and summary["skipped_steps"] == 1


def test_persistent_nonfinite_stops_and_keeps_the_last_good_checkpoint(model_dir, alpaca_file, tmp_path, monkeypatch):
    real = loop.clip_grad_norm
    state = {"n": 0}

    def broken_after_4(params, max_norm, **kw):
        state["n"] += 1
        norm = real(params, max_norm, **kw)
        return norm if state["n"] <= 4 else norm * float("inf")

    monkeypatch.setattr(loop, "clip_grad_norm", broken_after_4)
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(tmp_path), max_steps=10,
                          save_every=2, max_bad_steps=3, **FAST))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    state_json = json.loads((tmp_path / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state_json["step"] == 4 and state_json["bad_steps"] == 0


def _nan_at_clip_call(n: int, calls: dict):
    real = loop.clip_grad_norm

    def clip(params, max_norm, **kw):
        calls["clip"] = calls.get("clip", 0) + 1
        norm = real(params, max_norm, **kw)
        return norm * float("nan") if calls["clip"] == n else norm
    return clip


def _rows_and_adapter(out):
    from qlora.model.adapter import read_adapter
    rows = [{k: r[k] for k in ("step", "loss", "lr", "grad_norm", "tokens")}
            for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    return rows, read_adapter(out / "adapter")[1]


def _same_run(a, b):
    (rows_a, ad_a), (rows_b, ad_b) = _rows_and_adapter(a), _rows_and_adapter(b)
    assert rows_a == rows_b
    assert ad_a.keys() == ad_b.keys()
    for name in ad_a:
        assert all(torch.equal(ad_a[name][k], ad_b[name][k]) for k in ad_a[name]), name


def test_a_skipped_step_leaves_the_run_as_if_its_batches_had_been_passed_over(model_dir, alpaca_file, tmp_path,
                                                                              monkeypatch):
    """The skip is decided on the device and read a step later; taking back the step's count,
    lr and tokens then leaves the run bit for bit a run that never tried those micro-batches
    (which the oracle passes over by their data position). No dropout: no RNG in the way."""
    cfg = dict(FAST, max_steps=5, schedule="linear", warmup_ratio=0.4, lora_dropout=0.0)
    with monkeypatch.context() as m:
        m.setattr(loop, "clip_grad_norm", _nan_at_clip_call(3, {}))
        skipped = train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(tmp_path / "a"), **cfg))
    real_batch = loop.D.Batches.batch
    with monkeypatch.context() as m:  # the third step's micro-batches (4 and 5) passed over
        m.setattr(loop.D.Batches, "batch", lambda self, k: real_batch(self, k + 2 if k >= 4 else k))
        passed = train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(tmp_path / "b"), **cfg))
    assert skipped["skipped_steps"] == 1 and passed["skipped_steps"] == 0
    _same_run(tmp_path / "a", tmp_path / "b")
    assert len(_rows_and_adapter(tmp_path / "a")[0]) == 5


@pytest.mark.parametrize("nan_at", [2, 3, 6])
def test_reading_a_step_late_is_the_run_that_reads_at_once(model_dir, alpaca_file, tmp_path, monkeypatch, nan_at):
    """With a checkpoint every step the loop reads each step at once (the order before the read
    moved); without, a step late, except at eval steps (every 2nd) and the last. With dropout
    and a NaN step (an eval step, a plain one, the last) both give the same losses, lrs,
    norms, tokens and adapter, bit for bit."""
    cfg = dict(FAST, max_steps=6, schedule="cosine", warmup_ratio=0.3, lora_dropout=0.1, eval_every=2)
    for name, save_every in (("late", 0), ("at-once", 1)):
        with monkeypatch.context() as m:
            m.setattr(loop, "clip_grad_norm", _nan_at_clip_call(nan_at, {}))
            summary = train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(tmp_path / name),
                                        save_every=save_every, **cfg))
        assert summary["skipped_steps"] == 1
    _same_run(tmp_path / "late", tmp_path / "at-once")


def test_ctrl_c_right_after_reading_a_skipped_step_resumes_exactly(model_dir, alpaca_file, tmp_path, monkeypatch):
    """Ctrl-C landing just after the read that finds step 3 skipped (on a GPU the host waits in
    that read, so that is where a Ctrl-C lands): the step is still taken back before the
    checkpoint, and --resume gives the uninterrupted run."""
    cfg = dict(FAST, max_steps=6, schedule="linear", warmup_ratio=0.3, lora_dropout=0.1)
    with monkeypatch.context() as m:
        m.setattr(loop, "clip_grad_norm", _nan_at_clip_call(3, {}))
        train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(tmp_path / "full"), **cfg))
    calls: dict = {}
    real_tolist = torch.Tensor.tolist

    def tolist(t):
        values = real_tolist(t)
        if sys._getframe(1).f_globals.get("__name__") != loop.__name__:  # (varlen attention reads its bounds)
            return values
        calls["read"] = calls.get("read", 0) + 1
        if calls["read"] == 3 and not math.isfinite(values[1]):  # the read of step 3
            raise KeyboardInterrupt
        return values

    out = tmp_path / "interrupted"
    monkeypatch.setattr(loop, "clip_grad_norm", _nan_at_clip_call(3, calls))
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", tolist)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(out), **cfg))
    state = json.loads((out / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert (state["step"], state["skipped_steps"], state["bad_steps"]) == (2, 1, 1)
    train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(out), resume=True, **cfg))
    _same_run(out, tmp_path / "full")


def test_held_interrupt_raises_ctrl_c_on_its_way_out():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with loop.held_interrupt():
            signal.raise_signal(signal.SIGINT)
            done.append("the rest of the block")
    assert done == ["the rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_steps_loss_is_read_after_the_next_step_is_queued(model_dir, alpaca_file, tmp_path, monkeypatch):
    """The step's one host read (loss and gradient norm) waits until the next step's forward and
    backward are queued (on a GPU the device then never idles on it), except where the outcome is
    needed at once: the last step."""
    events = []
    real_fb, real_tolist = loop.forward_backward, torch.Tensor.tolist

    def fb(*a, **k):
        events.append("backward")
        return real_fb(*a, **k)

    def tolist(t):
        if sys._getframe(1).f_globals.get("__name__") == loop.__name__:  # (varlen attention reads its bounds)
            events.append("read")
        return real_tolist(t)

    monkeypatch.setattr(loop, "forward_backward", fb)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(tmp_path), max_steps=4, **FAST))
    assert events[:8] == ["backward", "backward", "read", "backward", "read", "backward", "read", "read"]


def test_cli_errors_are_clear(model_dir, tmp_path):
    from qlora.cli import main

    (tmp_path / "bad.jsonl").write_text('{"instruction": "x"}\n')
    assert main(["train", "--model", str(model_dir), "--data", str(tmp_path / "bad.jsonl"), "--output",
                 str(tmp_path / "o")]) == 2
    assert main(["train", "--model", str(model_dir), "--data", str(tmp_path / "none.jsonl"), "--output",
                 str(tmp_path / "o")]) == 2


def test_generate_with_adapter(model_dir, alpaca_file, tmp_path, capsys):
    from qlora.train.generate import generate

    train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(tmp_path), max_steps=2, **FAST))
    text = generate(str(model_dir), "Write a function that adds 3.", adapter=str(tmp_path / "adapter"),
                    max_new_tokens=8)
    assert isinstance(text, str) and text == capsys.readouterr().out.strip("\n") or text.strip() in capsys.readouterr().out
    sampled = generate(str(model_dir), "def", max_new_tokens=8, temperature=0.8, top_p=0.9, raw=True, stream=False)
    assert isinstance(sampled, str)
    with pytest.raises(ValueError, match="temperature"):
        generate(str(model_dir), "x", temperature=-1)


@pytest.mark.parametrize("packing", [True, False])
def test_ctrl_c_mid_step_saves_a_checkpoint_that_resumes_exactly(model_dir, alpaca_file, tmp_path, monkeypatch,
                                                                 packing):
    """Ctrl-C inside a step (after its micro-batches were drawn and dropout seeds taken) saves
    the position and RNG the step started from, so --resume repeats that step exactly; packed
    (9 micro-batches an epoch here: the stop falls mid-epoch) or padded."""
    flags = dict(max_steps=6, lora_dropout=0.1, packing=packing, **FAST)
    train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(tmp_path / "full"), **flags))
    full = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]

    real, calls = loop.causal_lm_loss, {"n": 0}

    def interrupted(model, batch):
        calls["n"] += 1
        assert ("position_ids" in batch) == packing
        if calls["n"] == 8:  # the second micro-batch of step 4
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(loop, "causal_lm_loss", interrupted)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(out), **flags))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000003"]
    monkeypatch.setattr(loop, "causal_lm_loss", real)
    train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(out), resume=True, **flags))
    assert [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == full


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu.py --sections resume checks it end to end)")
def test_checkpoint_rng_includes_the_cuda_generator():
    """The model's own dropout (e.g. GPT-2's) draws from the device's generator: a checkpoint
    restores it, so the draws after a resume are those of the uninterrupted run."""
    device = torch.device("cuda")
    state = checkpoint.rng_state(device)
    assert set(state) == {"torch", "cuda"}
    want = (torch.rand(4), torch.rand(4, device=device))
    checkpoint.set_rng_state(state, device)
    assert torch.equal(torch.rand(4), want[0]) and torch.equal(torch.rand(4, device=device), want[1])


def test_tensorboard_events_are_flushed_at_the_end(model_dir, alpaca_file, tmp_path, monkeypatch):
    """With tensorboard installed, every metrics row also goes to a SummaryWriter, which
    buffers on a thread: the run closes it (flushes) before it returns."""
    import types

    writers = []

    class FakeWriter:
        def __init__(self, logdir):
            self.logdir, self.scalars, self.closed = logdir, [], False
            writers.append(self)

        def add_scalar(self, tag, value, step):
            assert not self.closed, "written after close"
            self.scalars.append((tag, step))

        def close(self):
            self.closed = True

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(tmp_path / "run"), max_steps=2, **FAST))
    (writer,) = writers
    assert writer.closed and writer.logdir == str(tmp_path / "run" / "tensorboard")
    assert {("loss", 1), ("loss", 2), ("eval_loss", 2)} <= set(writer.scalars)


def test_a_cpu_run_on_a_machine_with_a_gpu_measures_the_cpu(model_dir, alpaca_file, tmp_path, monkeypatch):
    """--device cpu where torch also sees a GPU: the peaks (metrics, summary, memory.json) are
    the process's, and no CUDA memory counter is read (it would say ~0 for this run)."""
    def no_cuda(*args, **kwargs):
        raise AssertionError("a CUDA memory counter was read for a CPU run")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("max_memory_allocated", "memory_allocated", "reset_peak_memory_stats", "mem_get_info"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    out = tmp_path / "run"
    summary = train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(out), max_steps=2,
                                device="cpu", **FAST))
    assert summary["peak_mem_mb"] > 10
    assert all(r["peak_mem_mb"] > 10 for r in read_metrics(out / "metrics.jsonl") if "loss" in r)
    measured = json.loads((out / "memory.json").read_text())
    assert "max_allocated_bytes" not in json.dumps(measured), measured  # the CUDA form of the measurement


def test_requantized_base_is_written_once_and_paired_with_the_adapter(model_dir, alpaca_file, tmp_path, monkeypatch):
    """--calibrate / --init loftq: the base the adapter was trained on goes to <output>/base-4bit,
    the adapter names it, and a resumed run reads it back instead of re-calibrating."""
    import qlora

    calib = tmp_path / "calib.txt"
    calib.write_text("".join(f"def g{i}(a, b):\n    return a * {i} + b\n" for i in range(400)))
    out = tmp_path / "run"
    cfg = dict(model=str(model_dir), data=str(alpaca_file), output=str(out), calibrate=str(calib), calibrate_rows=4,
               calibrate_seq=64, init="loftq", loftq_iters=2, save_every=2, compute_dtype="float32", **FAST)
    train(TrainConfig(max_steps=2, **cfg))
    base = out / loop.BASE
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    written = (base / "model.safetensors").stat().st_mtime_ns

    import qlora.model.calibrate as calibrate

    calls = []
    real = calibrate.load_calibrated
    monkeypatch.setattr(calibrate, "load_calibrated", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert train(TrainConfig(max_steps=4, resume=True, **cfg))["steps"] == 4
    assert not calls
    assert (base / "model.safetensors").stat().st_mtime_ns == written

    ids = torch.arange(3, 40).view(1, -1)
    model = qlora.load_model(base, compute_dtype=torch.float32, progress=False)
    qlora.load_adapter(model, out / "adapter")
    plain = qlora.load_model(model_dir, compute_dtype=torch.float32, progress=False)
    qlora.load_adapter(plain, out / "adapter")
    with torch.no_grad():  # the adapter belongs to the calibrated base, not to absmax codes of the original
        assert not torch.equal(model(ids).logits, plain(ids).logits)


def test_packing_is_on_and_the_eval_rows_are_never_packed(model_dir, alpaca_file, tmp_path, monkeypatch):
    """The default packs the training rows only: the eval rows are the padded run's, held out
    before packing, and evaluated unpacked. The tokens counted are the rows' own, not padding."""
    seen = {}
    real_eval, real_loss = loop.evaluate, loop.causal_lm_loss

    def evaluate(model, examples, *args):
        seen["eval"] = examples
        return real_eval(model, examples, *args)

    def loss(model, batch):
        if model.training:  # evaluate() calls it too
            seen["packed"].add("position_ids" in batch)
            seen["tokens"] += int(batch["attention_mask"].sum())
        return real_loss(model, batch)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    monkeypatch.setattr(loop, "causal_lm_loss", loss)
    runs = {}
    for packing in (None, False):  # None: the default
        seen.update(packed=set(), tokens=0)
        out = tmp_path / str(packing)
        flags = dict(FAST, max_steps=2, eval_split=0.1, **({} if packing is None else {"packing": packing}))
        train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(out), **flags))
        runs[packing] = (seen["eval"], seen["packed"])
        assert read_metrics(out / "metrics.jsonl")[-2]["tokens"] == seen["tokens"]  # (the last row: eval)
        assert f"packing: {str(packing is None).lower()}" in (out / "config.yaml").read_text()
    (eval_packed, packed), (eval_padded, padded) = runs[None], runs[False]
    assert packed == {True} and padded == {False}
    assert eval_packed == eval_padded and len(eval_packed) == 4 and not any(e.lengths for e in eval_packed)


def test_packing_is_off_where_it_is_not_exact(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    cfg = TrainConfig(model=str(tmp_path))
    cpu = torch.device("cpu")
    assert cfg.packing and not loop._packing(cfg, str(tmp_path), True, cpu).packing
    assert "packing: off for model type 'gpt_neox'" in capsys.readouterr().out
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert loop._packing(cfg, str(tmp_path), True, cpu).packing


def test_auto_attention_is_varlen_for_packed_fp32_rows_on_a_cpu(tmp_path):
    """--attn-implementation auto: varlen (SDPA's CPU flash kernels once per document) where packed
    rows run in fp32 on a CPU and the model takes it; the model's own attention elsewhere."""
    def resolved(config, device="cpu", **flags):
        (tmp_path / "config.json").write_text(json.dumps(config))
        cfg = TrainConfig(model=str(tmp_path), **{"compute_dtype": "float32", **flags})
        return loop._packing(cfg, str(tmp_path), False, torch.device(device)).attn_implementation

    llama = {"model_type": "llama"}
    assert resolved(llama) == "varlen"
    assert resolved({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}) == "varlen"
    assert resolved(llama, packing=False) == "auto"
    assert resolved(llama, compute_dtype="bfloat16") == "auto"
    assert resolved(llama, "cuda") == "auto"
    assert resolved(llama, attn_implementation="sdpa") == "sdpa"  # a choice is kept
    assert resolved({"model_type": "mistral", "sliding_window": 4096}) == "auto"  # (its window: the reference)
    assert resolved({"model_type": "gpt2", "attn_pdrop": 0.1}) == "auto"  # (no dropout in varlen)
    assert resolved({"model_type": "gpt_neox"}) == "auto"  # not packed at all


@pytest.mark.parametrize("packing", [True, False])
def test_bad_rows_are_handled_alike_packed_or_padded(model_dir, tmp_path, packing):
    """A row with a missing field or nothing to learn: the same named error, or skipped and
    counted with --skip-bad-rows, whether the rows are packed or padded."""
    from qlora.rows import DataError

    rows = [{"instruction": f"Write a function that adds {i}.", "output": f"def f{i}(x):\n    return x + {i}\n"}
            for i in range(12)]
    rows[3] = {"instruction": "no output"}
    rows[5] = {"text": "  "}  # no tokens
    rows[7] = {"instruction": "word " * 100, "output": "x"}  # the prompt fills --max-length: nothing to learn
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = dict(model=str(model_dir), data=str(data), max_steps=1, packing=packing, **FAST)
    with pytest.raises(DataError, match=r"bad\.jsonl:4: field 'output' is missing or empty"):
        train(TrainConfig(output=str(tmp_path / "a"), **flags))
    summary = train(TrainConfig(output=str(tmp_path / "b"), skip_bad_rows=True, **flags))
    assert summary["skipped_rows"] == 3


def test_dora_trains_saves_and_resumes(model_dir, alpaca_file, tmp_path):
    from safetensors.torch import load_file

    cfg = dict(model=str(model_dir), data=str(alpaca_file), output=str(tmp_path), use_dora=True, save_every=2,
               eval_split=0, **FAST)
    train(TrainConfig(max_steps=2, **cfg))
    train(TrainConfig(max_steps=4, resume=True, **cfg))
    steps = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and steps[-1]["loss"] < steps[0]["loss"]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    magnitudes = [k for k in tensors if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 2 * 7  # every adapted layer, and the magnitudes were trained
    start = load_file(str(tmp_path / "checkpoints" / "step-0000002" / "adapter_model.safetensors"))
    assert any(not torch.equal(tensors[k], start[k]) for k in magnitudes)


def test_attn_implementation_reaches_the_trained_model(model_dir, alpaca_file, tmp_path, monkeypatch):
    """--attn-implementation eager: the model train() steps runs it, packed (packs_exactly allows it)."""
    trained = []
    build = loop._training_model
    monkeypatch.setattr(loop, "_training_model", lambda *a: trained.append(build(*a)) or trained[-1])
    cfg = TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(tmp_path / "run"), max_steps=1,
                      attn_implementation="eager", **FAST)
    train(cfg)
    assert cfg.packing and [m.config._attn_implementation for m in trained] == ["eager"]
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert "attn_implementation: eager" in (tmp_path / "run" / "config.yaml").read_text()  # a resume keeps it
