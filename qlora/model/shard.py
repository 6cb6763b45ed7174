"""Shard a QLoRA model over ranks: FSDP2 per transformer block (each rank quantizes what it
keeps), or DDP for models that fit on every rank.

    model = load_sharded(path, lora, rank=r, world_size=n, device=dev)   # FSDP2, bounded load
    model = wrap_ddp(prepared_model, device)                              # DDP

Used by `qlora train` under torchrun (qlora/train/distributed.py). Tested by
`pytest tests/model/test_shard.py` (the chunk rule and flat Linear4bit by hand for 1-3 ranks;
real FSDP2 on 3 gloo ranks against load_model + prepare_model) and
tests/train/test_distributed.py (2-rank training runs).

Design:
- FSDP2 (`torch.distributed.fsdp.fully_shard`) on every transformer block (the model's
  `_no_split_modules` classes) and on the root. Each Linear4bit is in flat mode
  (linear4bit.py): its packed codes and scales are frozen flat uint8 Parameters, so FSDP2
  shards them like any Parameter: dim 0 cut by torch.chunk into `world_size` pieces, the
  missing tail pieces empty (`shard_rows` below is that rule). Any element count, any
  world size: the gathered bytes are exactly the quantized tensor.
- Loading is memory-bounded per rank, by "each rank streams, quantizes, keeps its shard":
  the model is built on the meta device, sharded there (no memory), then materialized
  shard by shard; the checkpoint is read one tensor at a time, each targeted weight is
  quantized whole (double quantization's offset is a mean over the whole tensor, so a
  shard cannot be quantized alone and stay bit-exact with the single-process model) and
  only this rank's bytes are kept. Peak per rank: its shard of the model + one 16-bit
  tensor + its 4-bit copy. "Rank 0 quantizes and broadcasts" would cost rank 0 the same
  plus the broadcast buffers, and every rank the time of a broadcast per tensor; since
  every rank can read the files, redundant quantization (fast: native kernel, or the
  GPU) is cheaper than communication, and no rank is special.
- LoRA adapters are created for real (CPU, in module order, from the same seed) before
  sharding, so their initial values equal the single-process run's; they are tiny.
- No FSDP2 MixedPrecisionPolicy casting: qlora's own mixed precision already runs the
  4-bit decode, LoRA and matmuls in the compute dtype while LoRA stays fp32 and norms
  fp32; gradients (fp32, LoRA only) are reduce-scattered in fp32.
- Only 16-bit safetensors checkpoints load this way; a pre-quantized bitsandbytes checkpoint
  is refused under FSDP2 (use --distributed ddp, or quantize from the 16-bit weights).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..nn.linear4bit import Linear4bit, features, flat_bytes, is_conv1d
from ..nn.lora import LoraConfig, LoraLinear, share_seeds
from ..nn.rotary import use_fused_rotary
from ..quant.codebooks import codebook, signed_dynamic_map
from ..quant.tensor import NESTED_BLOCKSIZE, QuantizedTensor, quantize
from .checkpoint_files import CheckpointError, resolve, stream_tensors
from .load import _checkpoint_dtype, bnb_quantization, build_model, read_config
from .prepare import enable_checkpointing, keep_norms_fp32, select_modules


# ---- FSDP2's chunk rule ------------------------------------------------------------------------
def shard_bounds(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of dim-0 rows that `rank` holds under FSDP2: torch.chunk(rows, world_size),
    whose chunks have ceil(rows / world_size) rows; ranks past the last chunk hold none."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    size = -(-rows // world_size) if rows else 0
    start = min(rank * size, rows)
    return start, min(start + size, rows)


def shard_rows(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's dim-0 piece of `t` (a view), as FSDP2 cuts it."""
    start, end = shard_bounds(t.shape[0], rank, world_size)
    return t.narrow(0, start, end - start)


# ---- building the sharded model -------------------------------------------------------------------
def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one by one: instances of the model's `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer block class (_no_split_modules="
                         f"{sorted(names)}); FSDP2 needs one to shard per block: use --distributed ddp")
    return blocks


def _meta_linear4bit(layer: nn.Module, quant_type: str, blocksize: int, double_quant: bool,
                     compute_dtype: torch.dtype) -> Linear4bit:
    """A flat-mode Linear4bit on the meta device with the byte sizes `quantize` will produce."""
    in_f, out_f = features(layer)
    n = out_f * in_f
    nblocks = -(-n // blocksize)
    meta = dict(device="meta")
    qt = QuantizedTensor(torch.empty((n + 1) // 2, 1, dtype=torch.uint8, **meta),
                         torch.empty(nblocks, dtype=torch.uint8 if double_quant else torch.float32, **meta),
                         torch.Size((out_f, in_f)), layer.weight.dtype, quant_type, blocksize, codebook(quant_type).clone())
    if double_quant:
        qt.nested_absmax = torch.empty(-(-nblocks // NESTED_BLOCKSIZE), dtype=torch.float32, **meta)
        qt.nested_code, qt.nested_offset = signed_dynamic_map().clone(), 0.0
    bias = getattr(layer, "bias", None)
    new = Linear4bit(qt, bias, compute_dtype).to_flat_parameters()
    new.fan_in_fan_out = is_conv1d(layer)
    return new


def load_sharded(
    path_or_hub_id: str | Path,
    lora: LoraConfig,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    mesh=None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype = torch.bfloat16,
    target_modules: str | list[str] = "all-linear",
    gradient_checkpointing: bool = True,
    keep_attention: bool = False,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A QLoRA model sharded with FSDP2 per transformer block, loaded shard by shard (see the
    module docstring). Collective: every rank of the default process group calls it."""
    from torch.distributed.fsdp import fully_shard

    path = resolve(path_or_hub_id)
    config = read_config(path, trust_remote_code)
    if getattr(config, "quantization_config", None) is not None and bnb_quantization(config, path) is not None:
        raise CheckpointError(f"{path}: a pre-quantized bitsandbytes checkpoint cannot be loaded shard by shard under "
                              "FSDP2; use --distributed ddp, or train from the 16-bit checkpoint")
    model = build_model(config, path / "config.json", trust_remote_code)
    store_dtype = torch.float32 if compute_dtype == torch.float32 else _checkpoint_dtype(config)
    model.requires_grad_(False)
    targets = select_modules(model, target_modules)
    for name in targets:
        model.set_submodule(name, _meta_linear4bit(model.get_submodule(name), quant_type, blocksize, double_quant,
                                            compute_dtype))
    for m in model.modules():  # the dtype load_model stores each unquantized tensor in (meta: no memory)
        for pname, p in m.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != store_dtype:
                m._parameters[pname] = nn.Parameter(p.detach().to(store_dtype), requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    keep_norms_fp32(model)
    use_fused_rotary(model)
    # LoRA for real, in prepare_model's order and from the same RNG state: the same initial values
    for name in select_modules(model, lora.target_modules, lora.exclude_modules):
        model.set_submodule(name, LoraLinear(model.get_submodule(name), lora.r, lora.alpha, lora.dropout, lora.use_rslora,
                                      lora.dtype, device="cpu"))
    share_seeds(model)
    if gradient_checkpointing:
        enable_checkpointing(model, keep_attention=keep_attention)
    model.config.use_cache = False

    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # materialize only what is still on meta (the frozen base); the LoRA shards are already real
    model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    _fill(model, path, rank, world_size, device, set(targets), quant_type, blocksize, double_quant, store_dtype)
    model.qlora_source = str(path)
    return model.eval()  # as load_model: the caller turns training mode on


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


@torch.no_grad()
def _fill(model: nn.Module, path: Path, rank: int, world_size: int, device: torch.device,
          targets: set[str], quant_type: str, blocksize: int, double_quant: bool, store_dtype: torch.dtype) -> None:
    """Stream the checkpoint and copy this rank's piece of every tensor into its shard."""
    params = dict(model.named_parameters(remove_duplicate=False))
    base_of = {name.replace(".base_layer", ""): name for name in params if ".base_layer." in name}
    prefix = getattr(model, "base_model_prefix", "")
    pending = {name for name, p in params.items() if not p.requires_grad}  # the frozen base, to be filled

    def module_of(key: str) -> str | None:
        for k in (key, f"{prefix}.{key}" if prefix else None):
            if k is None:
                continue
            module = k[: -len(".weight")] if k.endswith(".weight") else None
            if module is not None and module in targets:
                return module
        return None

    def param_name(key: str) -> str | None:
        for k in (key, f"{prefix}.{key}" if prefix else None):
            if k is not None and (k in params or k in base_of):
                return base_of.get(k, k)
        return None

    scratch = lambda key: module_of(key) is not None  # noqa: E731
    for file, key, tensor in stream_tensors(path, progress=False, scratch=scratch):
        module = module_of(key)
        if module is not None:
            layer = model.get_submodule(module)
            layer = layer.base_layer if isinstance(layer, LoraLinear) else layer
            w = tensor.t().contiguous() if layer.fan_in_fan_out else tensor
            if tuple(w.shape) != (layer.out_features, layer.in_features):
                raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, the config expects "
                                      f"({layer.out_features}, {layer.in_features}); the weights do not belong to "
                                      "this config.json")
            qt = quantize(w.to(device), quant_type, blocksize, double_quant)
            layer.set_tensor_meta(qt)
            owner = f"{module}.base_layer" if f"{module}.base_layer.weight_packed" in params else module
            for attr, full in flat_bytes(qt).items():
                _copy_shard(params, f"{owner}.{attr}", full, rank, world_size, file, key, pending)
            continue
        name = param_name(key)
        if name is None:
            continue  # e.g. rotary buffers saved by old exporters; load_model warns about these
        full = tensor.to(device)
        if full.is_floating_point():  # as load_model, then prepare_model (norms to fp32) would store it
            full = full.to(store_dtype).to(params[name].dtype)
        _copy_shard(params, name, full, rank, world_size, file, key, pending)
    if pending:
        missing = sorted(pending)
        raise CheckpointError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. "
                              f"{missing[:3]}; it is incomplete or belongs to another config")


def _copy_shard(params: dict, name: str, full: torch.Tensor, rank: int, world_size: int, file: Path, key: str,
                pending: set[str]) -> None:
    p = params[name]
    if tuple(full.shape) != tuple(p.shape):
        raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(full.shape)}, the model expects "
                              f"{tuple(p.shape)} for {name}; the weights do not belong to this config.json")
    local = _local(p)
    piece = shard_rows(full, rank, world_size)
    if tuple(piece.shape) != tuple(local.shape):
        raise RuntimeError(f"{name}: rank {rank} of {world_size} holds a shard of shape {tuple(local.shape)}, the "
                           f"chunk rule gives {tuple(piece.shape)}; FSDP2's sharding changed (report this)")
    local.copy_(piece)
    for alias in [n for n, q in params.items() if q is p]:
        pending.discard(alias)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over a prepared model that every rank holds whole.

    The 4-bit buffers and frozen weights are identical on every rank (each loaded them), so
    DDP ignores them: no broadcast at start, none before every forward."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [n for n, _ in model.named_buffers()] + [n for n, p in model.named_parameters() if not p.requires_grad]
    model._ddp_params_and_buffers_to_ignore = frozen
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
