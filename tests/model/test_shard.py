"""The FSDP2 chunk rule and flat-mode Linear4bit, sharded and gathered by hand for 1, 2 and 3
ranks on shapes that do not divide: uneven rows, element counts not a multiple of
blocksize x 256, shards that come out empty. The real multi-process runs are in
tests/train/test_distributed.py.

    pytest tests/model/test_shard.py
"""
import pytest
import torch
from torch import nn
from torch.distributed.fsdp._fully_shard._fsdp_common import _chunk_with_empty

from qlora.model.shard import shard_bounds, shard_rows
from qlora.nn.linear4bit import FLAT_PARAMETERS, Linear4bit


def gather_rows(shards: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of shard_rows over all ranks (what an all-gather returns, unpadded)."""
    return torch.cat(shards, dim=0)


# (out, in): 7 x 96 = 672 elements (10.5 blocks of 64); 300 x 70 = 21000 (329 blocks: 2 nested
# blocks, the second partial); 33 x 64 = 2112 (33 blocks); 1 x 64 (one row: shards come out empty)
SHAPES = [(7, 96), (300, 70), (33, 64), (1, 64)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 5, 7, 10, 11, 336, 10501])
def test_shard_rows_is_fsdp2s_chunk_rule(rows, world):
    t = torch.arange(rows)
    ours = [shard_rows(t, r, world) for r in range(world)]
    fsdp = _chunk_with_empty(t, world, dim=0)  # the function FSDP2 shards every parameter with
    assert [x.tolist() for x in ours] == [x.tolist() for x in fsdp]
    assert torch.equal(gather_rows(ours), t)
    assert sum(shard_bounds(rows, r, world)[1] - shard_bounds(rows, r, world)[0] for r in range(world)) == rows


def _layer(shape, double_quant, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(shape[1], shape[0], bias=bias)
    return Linear4bit.from_linear(lin, "nf4", 64, double_quant, torch.float32)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_flat_parameters_shard_and_gather_exactly(shape, double_quant, world):
    ref = _layer(shape, double_quant)
    flat = _layer(shape, double_quant).to_flat_parameters()
    assert flat.flat and not ref.flat
    params = dict(flat.named_parameters())
    assert set(params) >= set(FLAT_PARAMETERS[: 3 if double_quant else 2])
    assert all(params[n].dtype == torch.uint8 and params[n].dim() == 1 and not params[n].requires_grad
               for n in FLAT_PARAMETERS if n in params)
    # each rank keeps its piece; every byte is held by exactly one rank; the gather is the whole
    for name in [n for n in FLAT_PARAMETERS if n in params]:
        full = params[name].detach().clone()
        shards = [shard_rows(full, r, world).clone() for r in range(world)]
        assert sum(s.numel() for s in shards) == full.numel()
        params[name].data = torch.zeros_like(full)  # forget the original bytes
        params[name].data = gather_rows(shards)
    ref_sd, flat_sd = ref.state_dict(), flat.state_dict()
    assert list(ref_sd) == list(flat_sd)  # the bitsandbytes layout, in flat mode too
    for k in ref_sd:
        assert torch.equal(ref_sd[k], flat_sd[k]), k
    x = torch.randn(3, shape[1])
    assert torch.equal(flat(x), ref(x))


def test_flat_mode_is_invisible_to_dtype_casts_and_names_the_sharded_case():
    layer = _layer((7, 96), double_quant=False).to_flat_parameters()
    before = layer.weight.dequantize(torch.float32)
    layer.to(torch.bfloat16)  # a module-wide cast leaves the (uint8) quantization state alone
    assert layer.weight_absmax.dtype == torch.uint8
    assert torch.equal(layer.weight.dequantize(torch.float32), before)

    class Sharded(torch.Tensor):  # stands in for a DTensor shard outside forward
        pass

    layer._parameters["weight_packed"] = nn.Parameter(layer.weight_packed.detach().as_subclass(Sharded),
                                                      requires_grad=False)
    with pytest.raises(RuntimeError, match="weight_packed is sharded"):
        layer.weight


def test_fsdp2_shards_linear4bit_and_loads_models_for_real_on_3_ranks(tmp_path):
    """Real FSDP2 over gloo, 3 ranks (one gets an empty shard of the nested scales), on single
    layers and on a tiny Llama (tied embeddings) and GPT-2 (Conv1D): see shard_worker.py."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tiny_models import tiny_model

    dirs = []
    for arch, extra in (("llama", {"tie_word_embeddings": True}), ("gpt2", {})):
        tiny_model(arch, **extra).save_pretrained(tmp_path / arch)
        dirs.append(str(tmp_path / arch))
    worker = Path(__file__).with_name("shard_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                          str(worker), *dirs], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert all(f"rank {r}/3: ok" in run.stdout for r in range(3)), run.stdout  # (lines may interleave)
    assert all(f"rank {r}: {d}: holds" in run.stdout for r in range(3) for d in dirs), run.stdout


def test_a_prequantized_checkpoint_is_refused_under_fsdp2(tmp_path):
    import qlora
    from qlora.model.checkpoint_files import CheckpointError
    from qlora.model.shard import load_sharded
    from tiny_models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "dense")
    qlora.save_quantized(qlora.load_model(tmp_path / "dense", progress=False), tmp_path / "4bit")
    with pytest.raises(CheckpointError, match="pre-quantized bitsandbytes checkpoint.*--distributed ddp"):
        load_sharded(tmp_path / "4bit", qlora.LoraConfig(r=4), rank=0, world_size=2, device=torch.device("cpu"))
