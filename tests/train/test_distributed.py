"""qlora train under torchrun on CPU (gloo): 2 ranks follow the single-process run.

    pytest tests/train/test_distributed.py      (about a minute on 2 cores)

Stated tolerance: with --compute-dtype float32 and no dropout, every step's loss and gradient
norm of a 2-rank run equals the single-process run with the same flags within 1e-5
(relative), and the saved adapters agree within 1e-5 (absolute; the weights are ~0.1).
Measured: about 2e-7. The runs differ only in the order of float sums: each rank's share
of a micro-batch, the gradient reduce-scatter / all-reduce and the global gradient norm.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qlora.train import TrainConfig, TrainingError, train
from qlora.train.report import read_metrics

FLAGS = dict(batch_size=4, grad_accum=2, lora_r=8, lr=1e-3, max_length=64, demo=False, lora_dropout=0.0,
             compute_dtype="float32", save_every=3)
RTOL = 1e-5


def _free_ports(n):
    """n distinct free TCP ports (held open together while chosen, so two runs never share one)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _torchrun(model_dir, data, out, steps, *extra, port, new_session=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "qlora",
           "train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--max-steps", str(steps)]
    for key, value in FLAGS.items():
        flag = "--" + key.replace("_", "-")
        cmd += ([flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)])
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(cmd + list(extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=new_session)


def _wait(proc):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def _curve(out):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def _same_curve(got, want):
    assert [s for s, _, _ in got] == [s for s, _, _ in want]
    for (s, loss, norm), (_, loss_ref, norm_ref) in zip(got, want):
        assert loss == pytest.approx(loss_ref, rel=RTOL), (s, loss, loss_ref)
        assert norm == pytest.approx(norm_ref, rel=RTOL), (s, norm, norm_ref)


def _same_adapter(a, b):
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=RTOL)
    assert json.loads((a / "adapter_config.json").read_text())["target_modules"] == \
        json.loads((b / "adapter_config.json").read_text())["target_modules"]


def test_two_ranks_follow_the_single_process_run(model_dir, alpaca_file, tmp_path):
    # the 2-rank runs start first (they run in other processes while the reference trains here);
    # resuming under torchrun is checked by the signal test below
    ports = _free_ports(2)
    fsdp = _torchrun(model_dir, alpaca_file, tmp_path / "fsdp", 3, port=ports[0])
    ddp = _torchrun(model_dir, alpaca_file, tmp_path / "ddp", 3, "--distributed", "ddp", port=ports[1])
    train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(tmp_path / "one"), max_steps=3, **FLAGS))
    single = _curve(tmp_path / "one")
    _wait(fsdp)
    log = _wait(ddp)
    assert log.count("summary") == 1  # only rank 0 reports
    _same_curve(_curve(tmp_path / "fsdp"), single)
    _same_curve(_curve(tmp_path / "ddp"), single)
    step3 = tmp_path / "fsdp" / "checkpoints" / "step-0000003"
    assert sorted(p.name for p in step3.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "optimizer-rank0.safetensors",
        "optimizer-rank1.safetensors", "rng-rank0.safetensors", "rng-rank1.safetensors", "trainer_state.json"]
    assert json.loads((step3 / "trainer_state.json").read_text())["world_size"] == 2
    # rank 0 plans one rank (FSDP shards the model, DDP does not) and records every rank's peak
    for mode, sharded in (("fsdp", 2), ("ddp", 1)):
        memory = json.loads((tmp_path / mode / "memory.json").read_text())
        assert (memory["settings"]["world_size"], memory["settings"]["batch_size"]) == (sharded, 2), mode
        assert len(memory["rank_peak_bytes"]) == 2 and memory["measured_peak_bytes"] == max(memory["rank_peak_bytes"])
        assert memory["predicted_peak_bytes"] > 0
    _same_adapter(tmp_path / "fsdp" / "adapter", tmp_path / "one" / "adapter")
    _same_adapter(tmp_path / "ddp" / "adapter", tmp_path / "one" / "adapter")

    # resuming with another world size is refused with a clear message
    with pytest.raises(TrainingError, match="written by 2 processes"):
        train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(tmp_path / "fsdp"), max_steps=9,
                          resume=True, **FLAGS))


def test_settings_that_cannot_be_split_are_refused_clearly(model_dir, monkeypatch):
    from qlora.train import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--batch-size 3 is the global micro-batch and must be a multiple of the 2"):
        distributed.setup(TrainConfig(model=str(model_dir), batch_size=3))
    ranks = distributed.Ranks(rank=0, world_size=2, mode="fsdp")
    with pytest.raises(ValueError, match="use --distributed ddp"):
        distributed.build_sharded(TrainConfig(model=str(model_dir), quant_type="none"), ranks, str(model_dir))
    from qlora.train.loop import _training_model
    with pytest.raises(TrainingError, match="--compile runs in one process or under --distributed ddp"):
        _training_model(TrainConfig(model=str(model_dir), compile=True), str(model_dir), ranks)


def test_a_signal_stops_every_rank_at_one_step_with_a_checkpoint_that_resumes(model_dir, alpaca_file, tmp_path):
    """Ctrl-C on torchrun (SIGINT to the whole process group, as a terminal sends it): the ranks
    agree to stop at the same step, write one checkpoint together, and --resume continues the
    single-process curve."""
    import signal
    import time

    single = tmp_path / "one"
    train(TrainConfig(model=str(model_dir), data=str(alpaca_file), output=str(single), max_steps=6, **FLAGS))
    ports = _free_ports(2)
    out = tmp_path / "fsdp"
    flags = ("--save-every", "0")  # no periodic checkpoint: the one found is the signal's
    proc = _torchrun(model_dir, alpaca_file, out, 8, *flags, port=ports[0], new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (
            (out / "metrics.jsonl").exists() and _curve(out)):  # the first step is done
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the run finished before the signal"
    stopped = _curve(out)[-1][0]
    assert f"stopped by a signal at step {stopped}" in log, log[-3000:]
    saved = out / "checkpoints" / f"step-{stopped:07d}"
    assert [p.name for p in (out / "checkpoints").iterdir()] == [saved.name]
    assert {"optimizer-rank0.safetensors", "optimizer-rank1.safetensors"} <= {p.name for p in saved.iterdir()}
    assert stopped < 6, "stopped too late to check the resumed steps"
    _wait(_torchrun(model_dir, alpaca_file, out, 8, *flags, "--resume", port=ports[1]))
    _same_curve(_curve(out)[:6], _curve(single))


def test_two_ranks_train_dpo_like_one_process(model_dir, tmp_path):
    """--method dpo under torchrun: each rank scores whole pairs (chosen and rejected rows are
    interleaved), the reference is each rank's own model with adapters off; FSDP2 (the default;
    DDP's split of the batch is the same, and it trains SFT above) follows the single process's
    loss, gradient norm and reward margin."""
    from test_preference import ROWS

    from conftest import write_rows

    pairs = write_rows(tmp_path / "pairs.jsonl", ROWS)
    runs = {"fsdp": _torchrun(model_dir, pairs, tmp_path / "fsdp", 2, "--method", "dpo", "--eval-split", "0",
                              port=_free_ports(1)[0])}
    train(TrainConfig(model=str(model_dir), data=str(pairs), output=str(tmp_path / "one"), max_steps=2, method="dpo",
                      eval_split=0, **FLAGS))
    single = read_metrics(tmp_path / "one" / "metrics.jsonl")
    for mode, proc in runs.items():
        _wait(proc)
        got = read_metrics(tmp_path / mode / "metrics.jsonl")
        _same_curve(_curve(tmp_path / mode), _curve(tmp_path / "one"))
        for a, b in zip(got, single):
            assert a["reward_margin"] == pytest.approx(b["reward_margin"], rel=1e-4, abs=1e-6), mode
            assert a["reward_accuracy"] == b["reward_accuracy"], mode
