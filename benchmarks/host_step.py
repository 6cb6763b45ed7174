"""Host cost of one training step, qlora vs transformers + peft + bitsandbytes, counted on the CPU.

    .venv/bin/python benchmarks/host_step.py [--layers 22] [--steps 5] [--rounds 3] [--setups qlora,peer[,qlora-compile]]
                                             [--against REV]
                                             [--where] [--dtype bfloat16|float32] [--kernels]
                                             [--rows full|padded|packed]

A proxy for where a GPU step spends its host time: the 1.1B Llama's shape (22 layers, GQA 8:1,
LoRA r=16 on all seven linear layers, gradient checkpointing) at tiny widths (hidden 64,
intermediate 176, vocab 512; batch 2 x 64 tokens), bf16, so that a step's wall time is Python,
dispatch and kernel-call overhead, not arithmetic. (Mostly: this CPU's bf16 matmuls cost 25-40
us a call even at these sizes, fp32 ones a third of that; `--dtype float32` runs both stacks in
fp32, without autocast, where more of the step is host time.) Per setup, in a fresh subprocess, one
training step as each trainer runs it:
- qlora  the body of qlora/train/loop.py's step: forward_backward (the fused head + loss),
         clip_grad_norm, the finite check on the device, the logged read of the step before's
         loss and norm, qlora's AdamW (paged, skipping on the device), the schedule, zero_grad;
- qlora-compile  the same with each decoder layer compiled (`--compile`: inductor, which on
         the CPU generates C++; only host ms and Python calls are measured, the kernels inside
         the graphs are not aten dispatches);
- qlora@REV  (with --against REV) the qlora step of another git revision (a temporary worktree;
         one recent enough to run this step: AdamW.step(found_inf=), from 2026-12-06), interleaved
         with the others: what a change is worth, side by side;
- peer   bnb nf4 + DQ, prepare_model_for_kbit_training (non-reentrant checkpointing), peft
         LoRA, bf16 autocast (none with --dtype float32), model(**batch).loss, clip_grad_norm_, PagedAdamW32bit, zero_grad,
         float(loss) (what a plain loop or the HF Trainer's logging reads).
Printed per setup: host ms per step (median of --steps after 3 warm-up steps; the median of
--rounds fresh runs, the setups interleaved), then in one
counted step: aten ops that compute (each a kernel launch on a GPU), native qlora kernel calls
(each one Triton launch there), allocations (empty, empty_like, new_empty: no launch on a GPU,
so not counted as launches), view/metadata ops (no launch), host reads (ops that bring a
tensor's value to the host: _local_scalar_dense from .item()/float()/bool(), .tolist(), nonzero,
masked_select, indexing by a boolean mask, ...: a device sync where that tensor lives on the device; `--where` lists the
lines they come from), of them "on dev" the reads while the step works on the batch where the model is (qlora:
after the trainer's copy, `share`; the peer: the whole step), the logged reads left out: each a device sync inside
the step on a GPU; and Python function calls (sys.setprofile). The top computing ops are
listed by count.
With --kernels, also the step's kernel time and its host time less it: the self time that
torch.profiler gives the GEMMs, attention, torch's fused AdamW and bitsandbytes' ops, plus qlora's
C kernel calls timed around the call, per step over 3 profiled steps: the work a GPU runs
asynchronously while the host goes on. An estimate (a difference of two measurements, so it
carries their noise; bitsandbytes' ops count whole, their Python included, which lowers the
peer's host time).
Not measured: a fake-tensor trace of the CUDA path (here both stacks run their CPU kernels:
qlora decodes with its C kernel, bitsandbytes with its own CPU code), so launch counts are
the CPU dispatch counts, a proxy for the CUDA ones. Such a trace cannot run on this machine's
CPU-only torch (2.13.0+cpu): fake CUDA tensors can be made and moved, but autograd aborts the
process (C++ terminate) as soon as it records a fake CUDA tensor that requires grad (its
InputMetadata asks for the CUDA stream: getDeviceGuardImpl, "not linked with support for cuda
devices"), already at `mm(x, p)` with `p` a fake CUDA parameter; tensor indexing and
`.to("cuda")` of a host tensor stop at the same guard in their Python bindings. With a no-op
CUDA device guard registered from a small C++ extension (c10::impl::NoOpDeviceGuardImpl), the
forward, indexing and copies run, and backward stops in autograd's engine: "Cannot access
accelerator device when none is available".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import collections, json, math, statistics, sys, time, torch
    from torch.utils._python_dispatch import TorchDispatchMode
    path, setup, steps, WHERE, DT = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", getattr(torch, sys.argv[5])
    KERNELS, ROWS = sys.argv[6] == "1", sys.argv[7]
    KERNEL_OPS = {"aten::" + op for op in ("mm", "addmm", "addmm_", "bmm", "baddbmm", "_fused_adamw_",
                  "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
                  "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward")}
    torch.set_num_threads(1)
    SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique", "_unique2",
             "repeat_interleave", "nonzero_static"}
    ALLOCS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}  # no kernel on a GPU

    ON_DEVICE = [False]  # True while the step works on the batch where the model is (after the copy)

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.views, self.allocs, self.syncs = collections.Counter(), 0, 0, collections.Counter()
            self.where, self.device_reads = collections.Counter(), collections.Counter()
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
                name = "index (boolean mask)"  # nonzero inside: on a GPU the host waits for the count
            if name in SYNCS or name == "index (boolean mask)":
                self.syncs[name] += 1
                import traceback
                if ON_DEVICE[0] and not any(f.name == "unpadded_on_host" for f in traceback.extract_stack()):
                    self.device_reads[name] += 1  # unpadded_on_host reads a mask only where it is on the host
                if WHERE:
                    frames = [f for f in traceback.extract_stack()[:-1] if "site-packages/torch/" not in f.filename]
                    self.where[f"{frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno}"] += 1
            elif func.is_view or name in ("detach", "alias", "lift_fresh", "_unsafe_view"):
                self.views += 1
            elif name in ALLOCS:
                self.allocs += 1
            else:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps + 4):
        ids = torch.randint(0, 512, (2, 64), generator=g)
        mask, labels = torch.ones_like(ids), ids.clone()
        if ROWS == "packed":  # documents of 20, 30 and 14 tokens side by side, then one of 64
            pos = torch.stack([torch.cat([torch.arange(n) for n in (20, 30, 14)]), torch.arange(64)])
            labels[pos == 0] = -100
            batches.append({"input_ids": ids, "position_ids": pos, "labels": labels})
            continue
        if ROWS == "padded":  # the second row 48 tokens, right-padded
            mask[1, 48:], labels[1, 48:] = 0, -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    native = collections.Counter()
    native_s = [0.0]  # seconds inside qlora's C kernels
    if setup in ("qlora", "qlora-compile"):
        import qlora, qlora.kernels as K
        from qlora.train.loop import forward_backward
        from qlora.train import distributed as dist_
        from qlora.optim import clip_grad_norm, scheduler
        for fn in [f for f in ("decode_4bit", "seeded_dropout", "rotary") if hasattr(K, f)]:  # (an older tree: fewer)
            def counted(*a, _f=getattr(K, fn), _n=fn, **k):
                native[_n] += 1
                return _f(*a, **k)
            setattr(K, fn, counted)
        lib = K.cpu.load()
        # the C kernels' own time: device work on a GPU
        for fn in [f for f in ("qlora_decode_4bit", "qlora_dropout2", "qlora_rotary") if hasattr(lib, f)]:
            def timed(*a, _f=getattr(lib, fn)):
                t = time.perf_counter()
                _f(*a)
                native_s[0] += time.perf_counter() - t
            setattr(lib, fn, timed)
        model = qlora.prepare_model(qlora.load_model(path, compute_dtype=DT, progress=False),
                                    lora=qlora.LoraConfig(r=16, alpha=32, dropout=0.05), compute_dtype=DT,
                                    verbose=False)
        if setup == "qlora-compile":
            from qlora.model.prepare import compile_layers
            compile_layers(model)  # inductor: the warm-up steps compile
        params = [p for p in model.parameters() if p.requires_grad]
        opt = qlora.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
        sched = scheduler(opt, "cosine", 0, 1000)
        ranks = dist_.Ranks()
        host_share = dist_.share
        def share(batch, ranks, *more):  # the trainer's copy to the device: what follows works on the device
            out = host_share(batch, ranks, *more)
            ON_DEVICE[0] = True
            return out
        dist_.share = share
        last = []  # the step before's loss and norm: the loop reads them once this step is queued
        def step(batch):
            loss_sum, _ = forward_backward(model, [batch], ranks)
            norm = clip_grad_norm(params, 1.0, error_if_nonfinite=False).to(loss_sum.device, torch.float32)
            found_inf = (~(torch.isfinite(loss_sum) & torch.isfinite(norm))).float()  # the skip, on the device
            ON_DEVICE[0] = False  # the logged read, counted apart
            if last:
                loss_v, norm_v = torch.stack(last).tolist()
                if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
                    raise SystemExit("non-finite")
            ON_DEVICE[0] = True
            opt.step(found_inf=found_inf); sched.step(); opt.zero_grad(set_to_none=True)
            last[:] = [loss_sum, norm]
            ON_DEVICE[0] = False
    else:
        import bitsandbytes, peft, transformers
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=DT)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=DT,
                                                                  device_map="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = bitsandbytes.optim.PagedAdamW32bit(params, lr=2e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        def step(batch):
            ON_DEVICE[0] = True  # the batch as it would be on the device
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=DT == torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
            ON_DEVICE[0] = False  # the logged reads, counted apart
            return float(loss), float(norm)
    model.train()
    times = []
    for i, b in enumerate(batches[:steps + 3]):
        t = time.perf_counter()
        step(b)
        if i >= 3:
            times.append(time.perf_counter() - t)
    native.clear()
    mode = Count()
    tolist = torch.Tensor.tolist  # reads the values without an aten op: counted by hand

    def counted_tolist(t):
        mode.syncs["tolist"] += 1
        return tolist(t)
    torch.Tensor.tolist = counted_tolist
    counted = setup != "qlora-compile"  # compiled graphs run inductor's kernels: no aten dispatch to count
    if counted:
        with mode:
            step(batches[-1])
    torch.Tensor.tolist = tolist
    native_step = dict(native)  # the counted step's calls only (the profiled step below adds more)
    calls = [0]
    def prof(frame, event, arg):
        if event == "call":
            calls[0] += 1
    sys.setprofile(prof)
    step(batches[-1])
    sys.setprofile(None)
    kernel_ms = None
    if KERNELS:  # device work a GPU would run asynchronously: the GEMMs, attention, 4-bit decode, optimizer kernels
        from torch.profiler import profile
        native_s[0] = 0.0
        with profile() as prof:
            for b in batches[:3]:
                step(b)
        heavy = sum(e.self_cpu_time_total for e in prof.key_averages()
                    if e.key in KERNEL_OPS or e.key.startswith("bitsandbytes::"))
        kernel_ms = (heavy / 1000 + 1000 * native_s[0]) / 3
    print(json.dumps({"host_ms": 1000 * statistics.median(times), "kernel_ms": kernel_ms, "ops": sum(mode.ops.values()),
                      "native": sum(native_step.values()), "native_by": native_step, "views": mode.views,
                      "allocs": mode.allocs, "syncs": dict(mode.syncs), "device_reads": dict(mode.device_reads),
                      "python_calls": calls[0], "counted": counted,
                      "top": mode.ops.most_common(40), "where": mode.where.most_common(12)}))
""")


def checkpoint(directory: Path, layers: int) -> Path:
    from transformers import LlamaConfig

    from qlora.model.random_checkpoint import write_random_checkpoint

    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=1, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
    return write_random_checkpoint(config, directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--setups", default="qlora,peer")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each setup, interleaved (host ms: their median)")
    ap.add_argument("--where", action="store_true", help="also list where the host reads come from (file:line)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="compute dtype of both stacks (float32: no autocast; this CPU's fp32 matmuls cost "
                         "a fraction of its bf16 ones, so more of a step is host time)")
    ap.add_argument("--kernels", action="store_true",
                    help="also profile 3 steps for the time inside the GEMM, attention, 4-bit decode and optimizer "
                         "kernels (device work on a GPU), and print host ms less it")
    ap.add_argument("--rows", default="full", choices=["full", "padded", "packed"],
                    help="the batch: two full rows of 64 (default), the second padded after 48 tokens, or packed "
                         "documents (position ids restarting, no 2-D mask: DataCollatorWithFlattening's form)")
    ap.add_argument("--against", help="another git revision: its qlora step too, as setup qlora@REV")
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    setups = args.setups.split(",") + ([f"qlora@{args.against}"] if args.against else [])
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint(Path(tmp), args.layers)
        trees = {setup: root for setup in setups}
        if args.against:
            other = Path(tmp) / "tree"
            made = subprocess.run(["git", "-C", str(root), "worktree", "add", "-q", "--detach", str(other),
                                   args.against], capture_output=True, text=True)
            if made.returncode:
                sys.exit(f"--against {args.against}: git cannot check it out ({made.stderr.strip()}); "
                         "give a commit, branch or tag of this repository")
            trees[setups[-1]] = other
        results, host_ms, kernel_ms = {}, {}, {}
        try:
            for _ in range(args.rounds):  # setups interleaved, so that a busy spell hits each alike
                for setup in setups:
                    tree = trees[setup]
                    out = subprocess.run([sys.executable, "-c", CHILD, str(path), setup.split("@")[0], str(args.steps),
                                          str(int(args.where)), args.dtype, str(int(args.kernels)), args.rows],
                                         capture_output=True, text=True, cwd=tree,
                                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)})
                    if out.returncode:
                        sys.exit(f"{setup} failed:\n{out.stderr[-3000:]}")
                    results[setup] = json.loads(out.stdout.strip().splitlines()[-1])
                    host_ms.setdefault(setup, []).append(results[setup]["host_ms"])
                    kernel_ms.setdefault(setup, []).append(results[setup]["kernel_ms"])
        finally:
            if args.against:
                subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(other)], check=True)
    for setup, times in host_ms.items():
        results[setup]["host_ms"] = statistics.median(times)
        if args.kernels:
            results[setup]["kernel_ms"] = statistics.median(kernel_ms[setup])
    base = results.get("peer")
    rounds = ", ".join(f"{k} {'/'.join(f'{t:.0f}' for t in v)}" for k, v in host_ms.items())
    print(f"one training step, {args.layers}-layer Llama at tiny widths, {args.dtype}, batch 2 x 64 ({args.rows} rows), "
          f"1 thread; host ms: "
          f"median of {args.rounds} rounds {rounds}")
    print(f"{'setup':14} {'host ms':>8} {'launches':>9} {'(aten':>7} {'native)':>8} {'allocs':>7} {'views':>7} "
          f"{'reads':>6} {'on dev':>7} {'py calls':>9} {'ms vs peer':>11} {'launches vs peer':>17}")
    for name, r in results.items():
        launches = r["ops"] + r["native"]
        ms = f"{r['host_ms'] / base['host_ms']:>10.2f}x" if base else ""
        rel = f"{launches / (base['ops'] + base['native']):>16.2f}x" if base and r["counted"] else ""
        counts = (f"{launches:9d} {r['ops']:7d} {r['native']:8d} {r['allocs']:7d} {r['views']:7d} "
                  f"{sum(r['syncs'].values()):6d} {sum(r['device_reads'].values()):7d}" if r["counted"]
                  else f"{'(inside compiled graphs)':>57}")
        print(f"{name:14} {r['host_ms']:8.1f} {counts} {r['python_calls']:9d} {ms} {rel}")
    if args.kernels:
        print(f"\nless the kernels (self time of GEMMs, attention, 4-bit decode and optimizer kernels, profiled over "
              f"3 steps: device work on a GPU)\n{'setup':14} {'host ms':>8} {'kernel ms':>10} {'host less kernels':>18} "
              f"{'vs peer':>8}")
        rest = {name: r["host_ms"] - r["kernel_ms"] for name, r in results.items()}
        for name, r in results.items():
            vs = f"{rest[name] / rest['peer']:>7.2f}x" if base else ""
            print(f"{name:14} {r['host_ms']:8.1f} {r['kernel_ms']:10.1f} {rest[name]:18.1f} {vs}")
    for name, r in results.items():
        if not r["counted"]:
            continue
        print(f"\n{name}: host reads {r['syncs']}, of them on the device {r['device_reads']}; native {r['native_by']}")
        print("  top ops: " + ", ".join(f"{op} {n}" for op, n in r["top"]))
        if r["where"]:
            print("  host reads from: " + ", ".join(f"{w} {n}" for w, n in r["where"]))


if __name__ == "__main__":
    main()
