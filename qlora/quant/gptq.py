"""GPTQ into the bitsandbytes NF4 layout: codes and block scales that minimise OUTPUT error.

    qt = gptq_quantize(w, H)               # w [out, in], H = X^T X of the layer's inputs [in, in]
    w_hat = qt.dequantize(torch.bfloat16)  # the ordinary decode; bitsandbytes loads qt unchanged
    absmax = search_scales(w, hessian_diag=H.diagonal())  # no-calibration path: scales only

The format is fixed (formats.md 2-3): NF4 codes, one scale per 64 consecutive elements of
the row-major weight (so, with in % 64 == 0, 64 consecutive input columns of one row),
scales double-quantized. Nothing says a block's scale must be its max |w|, nor that a code
must be the nearest one, so both can be chosen to minimise the layer's output error
tr((W - Q) H (W - Q)^T), H = sum of x x^T over calibration inputs x.

Design:
- Scales first: per block, scale = alpha * absmax for alpha on a grid (`SHRINK`), keeping
  the alpha with the smallest H-weighted block error (the exact block quadratic form
  e H_bb e^T with a full Hessian; sum_j H_jj e_j^2 with only its diagonal; plain squared
  error with neither). Then the scales are double-quantized as `quantize` does, and GPTQ
  runs with the RECONSTRUCTED scales, so every code is chosen against the scale a loader
  will decode with.
- Codes by GPTQ (Frantar et al. 2022): H += damp * mean(diag H) I, upper Cholesky factor of
  H^-1, columns in decreasing diag(H) order (act_order), each column rounded to the
  nearest code given its block's scale and its error fed forward to the columns not yet
  quantized, in lazy batches of `group` columns.
- `rechoose_scales` (natural order only): pick each block's scale again when its first
  column is reached, from the error-updated weights, snapped to the double-quant grid
  fixed from the first-pass scales. On a 576 x 1536 weight with a correlated synthetic
  Hessian (output error relative to absmax): act order + fixed scales 0.46, natural order
  0.55, natural order + re-chosen scales 0.52, so act order stays the default (not yet
  measured in perplexity).

Tests: tests/quant/test_gptq.py.
"""
from __future__ import annotations

import torch

from .blockwise import TINY
from .codebooks import codebook
from .tensor import QuantizedTensor, from_codes

SHRINK = torch.linspace(0.6, 1.0, 17)
"""Candidate scale factors (of the block's absmax) tried by the scale search: steps of 0.025."""


def _blocks(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    out, inp = weight.shape
    if inp % blocksize:
        raise ValueError(
            f"weight {tuple(weight.shape)}: in_features must be a multiple of blocksize={blocksize} "
            "so that a block is 64 columns of one row"
        )
    return weight.float().reshape(out, inp // blocksize, blocksize)


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """blockwise.nearest (ties to the lower value), as the count of code midpoints below x:
    one comparison per midpoint, counted in bytes: here 1.6-2x a count in int64, 1.2x bucketize."""
    order = torch.argsort(code)
    ordered = code[order]
    idx = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    above = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    for m in ((ordered[:-1] + ordered[1:]) / 2).tolist():
        idx += torch.gt(x, m, out=above)
    return order[idx.long()]


def _round(w: torch.Tensor, scale: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Nearest code index of w given scale (broadcast), normalising as `quantize` does."""
    safe = torch.where(scale.abs() < TINY, torch.full_like(scale, TINY), scale)
    return _nearest((w * (1.0 / safe)).clamp(-1, 1), code)


def _search(
    wb: torch.Tensor, code: torch.Tensor, diag: torch.Tensor | None, hblocks: torch.Tensor | None
) -> torch.Tensor:
    """Best scale per block of wb [out, nb, bs]: diag [nb, bs] or hblocks [nb, bs, bs] weights."""
    absmax = wb.abs().amax(dim=2)
    best, best_err = absmax.clone(), torch.full_like(absmax, float("inf"))
    for alpha in SHRINK.tolist():
        s = (absmax * alpha).unsqueeze(2)
        e = wb - code[_round(wb, s, code)] * s
        if hblocks is not None:  # e_b H_bb e_b^T for every (row, block)
            err = (torch.bmm(e.transpose(0, 1), hblocks).transpose(0, 1) * e).sum(dim=2)
        elif diag is not None:
            err = (e * e * diag).sum(dim=2)
        else:
            err = (e * e).sum(dim=2)
        better = err < best_err
        best = torch.where(better, absmax * alpha, best)
        best_err = torch.where(better, err, best_err)
    return best


def search_scales(
    weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, hessian_diag: torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 scale per block [out * in / blocksize] minimising the block's rounding error.

    Without `hessian_diag` the error is the weight's squared error; with it (e.g. the mean
    squared input per column, a cheap activation norm) each column's error is weighted by it.
    """
    code = codebook(quant_type).to(weight.device)
    diag = None
    if hessian_diag is not None:
        diag = hessian_diag.float().reshape(1, -1, blocksize)
    return _search(_blocks(weight, blocksize), code, diag, None).reshape(-1)


def fit_scales(weight: torch.Tensor, codes: torch.Tensor, hessian: torch.Tensor, code: torch.Tensor,
               blocksize: int, old: torch.Tensor) -> torch.Tensor:
    """Block scales [out * nb] minimising tr((W - Q) H (W - Q)^T) for fixed codes [out, in].

    Q_r = sum_b s_rb C_rb, so each row's scales solve G_r s_r = g_r with
    G_r[a, b] = C_ra H_ab C_rb^T and g_r[a] = C_ra (H W_r^T)_a. Blocks whose codes are all
    zero (or whose fit is not positive) keep their `old` scale.
    """
    out, inp = weight.shape
    nb = inp // blocksize
    C = code[codes].reshape(out, nb, blocksize)
    H = hessian.reshape(nb, blocksize, nb, blocksize)
    G = torch.einsum("rai,aibj,rbj->rab", C, H, C)
    g = (C * (weight.float() @ hessian).reshape(out, nb, blocksize)).sum(dim=2)
    live = G.diagonal(dim1=1, dim2=2) > 0
    eye = torch.eye(nb, device=G.device).expand_as(G)
    G = torch.where(live.unsqueeze(1) & live.unsqueeze(2), G, eye)  # dead blocks decouple: s = g = 0 ...
    g = torch.where(live, g, torch.zeros_like(g))
    G = G + 1e-6 * G.diagonal(dim1=1, dim2=2).mean(dim=1).view(out, 1, 1) * eye
    s = torch.linalg.solve(G, g.unsqueeze(2)).squeeze(2)
    old = old.reshape(out, nb)
    return torch.where(live & (s > 0), s, old).reshape(-1)  # ... and keep the old scale


def _gptq_codes(W: torch.Tensor, S: torch.Tensor, Hinv: torch.Tensor, perm: torch.Tensor, code: torch.Tensor,
                blocksize: int, group: int) -> torch.Tensor:
    """GPTQ's column loop: code indices [out, in] (original column order) for weight W [out, in]
    (already in `perm` order) with block scales S [out, nb] and the upper Cholesky factor of H^-1.

    Works on W^T so that a column is a contiguous row; the nearest code is the count of
    midpoints below w / s (blockwise.nearest, without its per-call set-up)."""
    order = torch.argsort(code)
    mid = (code[order][:-1] + code[order][1:]) / 2
    safe = torch.where(S.abs() < TINY, torch.full_like(S, TINY), S)
    St = S.t()[perm // blocksize].contiguous()  # [in, out]: the scale each column is rounded with
    inv = (1.0 / safe).t()[perm // blocksize].contiguous()
    Wt = W.t().contiguous()
    codes = torch.empty(Wt.shape, dtype=torch.long, device=W.device)
    for i1 in range(0, Wt.shape[0], group):
        i2 = min(i1 + group, Wt.shape[0])
        W1, Hinv1 = Wt[i1:i2].clone(), Hinv[i1:i2, i1:i2]
        err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            w = W1[i]
            c = order[((w * inv[j]).clamp_(-1, 1).unsqueeze(1) > mid).sum(dim=1)]
            codes[j] = c
            e = (w - code[c] * St[j]).div_(Hinv1[i, i])
            W1[i + 1:].addr_(Hinv1[i, i + 1:], e, alpha=-1)
            err1[i] = e
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), err1, alpha=-1)
    unperm = torch.empty_like(codes)
    unperm[perm] = codes
    return unperm.t()


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    act_order: bool = True,
    damp: float = 0.01,
    scale_search: bool = True,
    refit: int = 1,
    group: int = 128,
) -> QuantizedTensor:
    """Quantize weight [out, in] to minimise tr((W - Q) H (W - Q)^T); see the module docstring."""
    out, inp = weight.shape
    if hessian.shape != (inp, inp):
        raise ValueError(f"hessian must be [{inp}, {inp}] for weight {tuple(weight.shape)}, got {tuple(hessian.shape)}")
    device = weight.device
    code = codebook(quant_type).to(device)
    nb = inp // blocksize
    W = _blocks(weight, blocksize).reshape(out, inp)
    H = hessian.float().to(device).clone()
    dead = H.diagonal() <= 0
    H[dead, dead] = 1.0

    # 1. block scales from the original weight.
    if scale_search:
        hb = H.reshape(nb, blocksize, nb, blocksize).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()
        scales = _search(W.view(out, nb, blocksize), code, None, hb).reshape(-1)
    else:
        scales = W.view(out, nb, blocksize).abs().amax(dim=2).reshape(-1)

    # 2. GPTQ against the scales a loader decodes with (after double quantization); then,
    #    `refit` times, the least-squares scales for those codes and GPTQ again.
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(inp, device=device)
    Hp = H[perm][:, perm]
    Hp.diagonal().add_(damp * Hp.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True)
    dummy = torch.zeros(out * inp, dtype=torch.uint8, device=device)
    for round_ in range(refit + 1):
        qt = from_codes(dummy, scales, weight.shape, weight.dtype, quant_type, blocksize, double_quant)
        codes = _gptq_codes(W[:, perm], qt.scales().reshape(out, nb), Hinv, perm, code, blocksize, group)
        if round_ < refit:
            scales = fit_scales(W, codes, H, code, blocksize, qt.scales())
    qt.data = from_codes(codes.reshape(-1), scales, weight.shape, weight.dtype, quant_type, blocksize, False).data
    return qt


def output_error(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T): the summed squared output error over the inputs in H."""
    e = (weight.float() - w_hat.float())
    return float(((e @ hessian.float()) * e).sum())


@torch.no_grad()
def quantize_with_scales(
    weight: torch.Tensor, absmax: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> QuantizedTensor:
    """Round-to-nearest with chosen block scales (e.g. from `search_scales`), no calibration.

    With `double_quant` each code is the nearest one given the RECONSTRUCTED (8-bit) scale.
    """
    code = codebook(quant_type).to(weight.device)
    qt = from_codes(torch.zeros(weight.numel(), dtype=torch.uint8, device=weight.device), absmax,
                    weight.shape, weight.dtype, quant_type, blocksize, double_quant)
    scale = qt.scales().repeat_interleave(blocksize)[: weight.numel()]
    codes = _round(weight.reshape(-1).float(), scale, code)
    qt.data = from_codes(codes, absmax, weight.shape, weight.dtype, quant_type, blocksize, False).data
    return qt
