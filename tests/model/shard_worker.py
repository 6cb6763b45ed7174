"""Worker for tests/model/test_shard.py::test_fsdp2_shards_linear4bit_for_real (run by torchrun).

Every rank builds the same two Linear4bit + LoRA layers (uneven shapes), keeps a dense
reference, shards the layers with FSDP2 and checks: the gathered bytes are exactly the
quantized tensor, forward and LoRA gradients equal the unsharded module's, the weight of a
sharded layer outside forward raises a clear error, and an 8-bit AdamW step on the shards
stays within the 8-bit quantization error of the unsharded step. Then, for each model
directory given as an argument, `load_sharded` (each rank streams, quantizes, keeps its
shard) is compared with the single-process `load_model` + `prepare_model`: the gathered
parameters are bit-identical (4-bit bytes, scales, 16-bit weights, LoRA init from the same
seed), each rank holds about 1/world of the bytes, and the logits agree.
Exits non-zero on failure.
"""
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from qlora.nn.linear4bit import FLAT_PARAMETERS, Linear4bit
from qlora.nn.lora import LoraLinear
from qlora.optim import AdamW
from qlora.optim.adamw import local

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
layers = nn.Sequential(
    LoraLinear(Linear4bit.from_linear(nn.Linear(70, 300), "nf4", 64, True, torch.float32), r=4),   # 329 blocks
    LoraLinear(Linear4bit.from_linear(nn.Linear(300, 7), "nf4", 64, False, torch.bfloat16), r=4),  # 33 blocks, no DQ,
    # bf16 compute: qlora's mixed precision (fp32 LoRA, bf16 matmuls) under FSDP2
)
for m in layers:
    nn.init.normal_(m.lora_B.weight, std=0.1)  # a non-trivial adapter
ref = copy.deepcopy(layers)
for m in layers:
    m.base_layer.to_flat_parameters()
full_bytes = {n: p.detach().clone() for n, p in layers.named_parameters() if n.rsplit(".", 1)[1] in FLAT_PARAMETERS}
mesh = init_device_mesh("cpu", (world,))
for m in layers:
    fully_shard(m, mesh=mesh)
fully_shard(layers, mesh=mesh)

for name, p in layers.named_parameters():
    if name in full_bytes:
        assert torch.equal(p.full_tensor(), full_bytes[name]), f"{name}: gathered bytes differ"
        assert local(p).numel() <= -(-full_bytes[name].numel() // world), name
try:
    layers[0].base_layer.weight
except RuntimeError as e:
    assert "is sharded" in str(e), e
else:
    raise AssertionError("reading a sharded weight outside forward did not raise")

x = torch.randn(5, 70)
y, y_ref = layers(x), ref(x)
assert torch.equal(y, y_ref), float((y - y_ref).abs().max())
y.square().sum().backward()
y_ref.square().sum().backward()
ref_params = dict(ref.named_parameters())
for name, p in layers.named_parameters():
    if p.requires_grad:
        torch.testing.assert_close(p.grad.full_tensor(), ref_params[name].grad, rtol=1e-5, atol=1e-6)

opt = AdamW([p for p in layers.parameters() if p.requires_grad], lr=1e-2, state_bits=8, min_8bit_size=256)
opt_ref = AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, state_bits=8, min_8bit_size=256)
opt.step()
opt_ref.step()
for name, p in layers.named_parameters():
    if p.requires_grad:
        state = [t for t in opt.state[p].values() if isinstance(t, torch.Tensor)]  # not the int step
        assert all(local(t).numel() <= local(p).numel() for t in state), name
        torch.testing.assert_close(p.detach().full_tensor(), ref_params[name].detach(), rtol=0, atol=1e-4)

# ---- whole models: load_sharded against load_model + prepare_model --------------------------------
from qlora.model.load import load_model  # noqa: E402
from qlora.model.prepare import prepare_model  # noqa: E402
from qlora.model.shard import load_sharded  # noqa: E402
from qlora.nn.linear4bit import flat_bytes  # noqa: E402
from qlora.nn.lora import LoraConfig  # noqa: E402

lora = LoraConfig(r=4, alpha=8, dropout=0.0)
for path in sys.argv[1:]:
    torch.manual_seed(7)
    single = prepare_model(load_model(path, compute_dtype=torch.float32, progress=False), lora=lora, quant_type=None,
                           compute_dtype=torch.float32, gradient_checkpointing=False, verbose=False)
    torch.manual_seed(7)
    sharded = load_sharded(path, lora, rank=rank, world_size=world, device=torch.device("cpu"), mesh=mesh,
                           compute_dtype=torch.float32, gradient_checkpointing=False)
    want = dict(single.named_parameters())
    for name, m in single.named_modules():
        if isinstance(m, Linear4bit):
            want.update({f"{name}.{k}": v for k, v in flat_bytes(m.weight).items()})
    held = whole = 0
    for name, p in sharded.named_parameters():
        assert name in want, f"{path}: {name} has no single-process counterpart"
        assert torch.equal(p.full_tensor(), want[name]), f"{path}: {name} differs from the single-process model"
        held += local(p).numel() * p.element_size()
        whole += p.numel() * p.element_size()
    assert held <= whole / world + 4096, f"{path}: rank {rank} holds {held} of {whole} bytes"
    tokens = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(sharded(tokens).logits, single(tokens).logits, rtol=1e-5, atol=1e-5)
    print(f"rank {rank}: {path}: holds {held} of {whole} bytes")

dist.barrier()
dist.destroy_process_group()
print(f"rank {rank}/{world}: ok", flush=True)
# Skip interpreter finalization: once in CI a rank aborted there after all of the above
# ("terminate called without an active exception", gloo/FSDP2 teardown in C++, not
# reproduced in 35 runs since); every check has run and printed by now.
sys.stderr.flush()
os._exit(0)
