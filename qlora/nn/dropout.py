"""Seeded dropout: the mask is a hash of (seed, element index), so backward regenerates it.

    seed = new_seed(x.device)               # a 0-dim int64 tensor on x's device: no host read
    y = seeded_dropout(x, p, seed)          # x * mask / (1 - p'), mask from (seed, index)
    g = seeded_dropout(g, p, seed)          # the same mask again: dropout's own backward
    h, d = seeded_dropout_pair(x, g, p, seed, gain)   # both at once: one mask, one pass
    bank = SeedBank(7); seed = bank.take(i, x.device)   # the seeds of a block's layers, one draw a pass

torch's dropout draws its mask from a sequential generator and must keep it (or the
dropped input) for backward. LoRA's dropout feeds a rank-r matmul, so keeping dropout(x)
costs a full copy of each adapted layer's input per layer: q, k and v each keep their own.
With a counter-based mask, LoraLinear keeps only x (shared by q, k and v) and the seed.

Definition (bit-exact in the C and Triton kernels and in `seeded_dropout_ref`): element i (row-major) is
kept when the 16-bit half (i & 1) of fmix32((i >> 1) mod 2^32 XOR key) is >= threshold,
key = fmix32(seed_hi XOR (i >> 33)) XOR seed_lo, fmix32 being MurmurHash3's finalizer and
threshold = round(p * 65536). The drop probability is threshold / 65536 (p rounded to
1/65536) and kept values are scaled by 1 / (1 - threshold / 65536), in float32 (times `gain`
where a caller folds a factor in). A seed is a Python int (its low 64 bits) or a 0-dim int64
tensor (the same 64 bits, two's complement) that the kernels read on the device: new_seed()
draws one there, so a step reads nothing back to the host and a captured graph replays a
fresh draw instead of a frozen constant. A SeedBank draws the seeds of all the dropouts of one
block (a decoder layer's seven LoRA layers) in one launch per pass of the block, instead of one each.
Tests: tests/nn/test_dropout.py.
"""
from __future__ import annotations

import torch

from .. import kernels

M32 = 0xFFFFFFFF


def threshold_and_scale(p: float) -> tuple[int, float]:
    """The 16-bit keep threshold for drop probability p, and the scale of kept values."""
    threshold = round(p * 65536)
    if not 0 <= threshold < 65536:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return threshold, 1.0 / (1.0 - threshold / 65536)


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for int64 h < 2^32, without int64 overflow."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


Seed = int | torch.Tensor
"""A dropout seed: a Python int or a 0-dim int64 tensor (see the module docstring)."""


def keep_mask(n: int, p: float, seed: Seed, device: torch.device | str = "cpu") -> torch.Tensor:
    """The boolean keep mask of n elements (the reference definition, in int64 tensor ops)."""
    threshold, _ = threshold_and_scale(p)
    i = torch.arange(n, dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device)
    key = _fmix32(((seed >> 32) & M32) ^ (i >> 33)) ^ (seed & M32)
    r = _fmix32(((i >> 1) & M32) ^ key)
    return ((r >> ((i & 1) * 16)) & 0xFFFF) >= threshold


def seeded_dropout_ref(x: torch.Tensor, p: float, seed: Seed, gain: float = 1.0) -> torch.Tensor:
    """Pure-PyTorch seeded dropout (the oracle, and the path off the CPU): kept values x * gain / (1 - p')."""
    _, scale = threshold_and_scale(p)
    mask = keep_mask(x.numel(), p, seed, x.device).view(x.shape)
    return torch.where(mask, x.float() * (scale * gain), 0.0).to(x.dtype)


def seeded_dropout(x: torch.Tensor, p: float, seed: Seed, gain: float = 1.0) -> torch.Tensor:
    """Dropout of x with the mask of (seed, index), kept values times `gain`: a fast kernel where
    kernels.seeded_dropout has one (Triton on CUDA, C on CPU; QLORA_KERNELS applies), else the reference."""
    threshold, scale = threshold_and_scale(p)
    x = x.contiguous()
    out = torch.empty_like(x)
    done = kernels.seeded_dropout(x, out, threshold, scale * gain, seed)
    return out if done else seeded_dropout_ref(x, p, seed, gain)


def seeded_dropout_pair(x: torch.Tensor, g: torch.Tensor, p: float, seed: Seed,
                        gain: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(seeded_dropout(x, p, seed), seeded_dropout(g, p, seed, gain)) for x and g of one shape and
    dtype: the mask is made once, in one pass over both, where a kernel runs."""
    threshold, scale = threshold_and_scale(p)
    x, g = x.contiguous(), g.contiguous()
    out, out_g = torch.empty_like(x), torch.empty_like(g)
    if g.shape == x.shape and kernels.seeded_dropout(x, out, threshold, scale, seed, g, out_g, scale * gain):
        return out, out_g
    return seeded_dropout(x, p, seed), seeded_dropout(g, p, seed, gain)


def new_seed(device: torch.device | str = "cpu", shape: tuple[int, ...] = ()) -> torch.Tensor:
    """A 64-bit seed drawn on `device` by its default generator, as a 0-dim int64 tensor there
    (`shape`: that many seeds in one draw); checkpointing's RNG restore replays the draw, and
    nothing is read back to the host."""
    return torch.randint(-2**63, 2**63 - 1, shape, dtype=torch.int64, device=device)


class SeedBank:
    """The dropout seeds of n layers of one block (nn/lora.py: share_seeds), one draw per pass.

    Layer i takes seed i of the bank. The layer that takes first, in the first pass, is the
    drawer: each time it takes, it draws all n seeds in one launch (new_seed's distribution),
    and the others take from that draw. A pass of the block (forward, and checkpointing's
    recomputation, which restores the RNG before it replays the block) calls its layers in the
    same order, so each layer gets the same seed in both. A layer that runs before the drawer in
    a later pass gets the previous pass's seed: still a fresh mask for its new input, but one
    that a recomputation of this pass would not see, so blocks whose layers run in a varying
    order must not share a bank.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.seeds: tuple[torch.Tensor, ...] | None = None
        self.drawer: int | None = None

    def take(self, i: int, device: torch.device) -> torch.Tensor:
        """Seed i (a 0-dim int64 view on `device`), drawing the bank's seeds first if i is the drawer."""
        if self.drawer is None:
            self.drawer = i
        if i == self.drawer or self.seeds is None or self.seeds[0].device != device:
            self.seeds = new_seed(device, (self.n,)).unbind()  # n views made in one call
        return self.seeds[i]


class SeededDropout(torch.autograd.Function):
    """y = seeded_dropout(x, p, seed); grad_x = seeded_dropout(grad_y, p, seed). Saves only the seed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: Seed) -> torch.Tensor:
        ctx.p, ctx.seed = p, seed
        return seeded_dropout(x, p, seed)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return seeded_dropout(g, ctx.p, ctx.seed), None, None
