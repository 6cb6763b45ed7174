"""CPU kernels for torch's varlen attention ops (torch_attn::_varlen_attn and its backward), for
tests: torch ships them for CUDA only. With them, `torch.nn.attention.varlen.varlen_attn` runs
on the CPU through torch's own custom op and autograd (what it saves, how it is called): the
forward is qlora's per-document reference (model/varlen.py: varlen_reference) plus the
logsumexp flash returns, the backward flash's, from the saved output and logsumexp."""
import torch

from qlora.model.varlen import varlen_reference

_installed = []


def _window(is_causal: bool, window_size) -> tuple[int, int]:
    return (-1, 0) if is_causal else tuple(window_size) if window_size is not None else (-1, -1)


def _documents(query, key, cu_seq_q, scale, window):
    """Per document: (start, end, q [heads, L, d] fp32, k repeated to q's heads, scores scaled, keep)."""
    bounds = cu_seq_q.tolist()
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k = query[s:e].transpose(0, 1).float(), key[s:e].transpose(0, 1).float()
        k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
        i = torch.arange(e - s)
        back = i[:, None] - i[None, :]
        keep = torch.ones_like(back, dtype=torch.bool)
        if window[0] >= 0:
            keep &= back <= window[0]
        if window[1] >= 0:
            keep &= -back <= window[1]
        yield s, e, q, k, q @ k.transpose(1, 2) * scale, keep, scale


def _forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None, window_size=None,
             enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    window = _window(is_causal, window_size)
    out = varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window,
                           enable_gqa=query.shape[1] != key.shape[1])
    lse = torch.empty(query.shape[1], query.shape[0], dtype=torch.float32)  # [heads, tokens], as flash's
    for s, e, _, _, scores, keep, _ in _documents(query, key, cu_seq_q, scale, window):
        lse[:, s:e] = scores.masked_fill(~keep, float("-inf")).logsumexp(-1)
    return out, lse, torch.zeros(2, dtype=torch.uint64)


def _backward(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, rng_state,
              scale=None, window_size=None):
    """Attention's backward from the saved output and logsumexp, as flash's: P = exp(S - lse),
    dV = P^T dO, dS = P (dO V^T - rowsum(dO O)), dQ = dS K s, dK = dS^T Q s (GQA: summed per group)."""
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32) for t in (query, key, value))
    group = query.shape[1] // key.shape[1]
    for s, e, q, k, scores, keep, sc in _documents(query, key, cu_seq_q, scale, _window(is_causal, window_size)):
        p = (scores - lse[:, s:e, None]).exp().masked_fill(~keep, 0.0)
        do, o = grad_out[s:e].transpose(0, 1).float(), out[s:e].transpose(0, 1).float()
        v = value[s:e].transpose(0, 1).float().repeat_interleave(group, dim=0)
        ds = p * (do @ v.transpose(1, 2) - (do * o).sum(-1, keepdim=True))
        dq[s:e] = (ds @ k * sc).transpose(0, 1)
        heads_k = (ds.transpose(1, 2) @ q * sc).unflatten(0, (-1, group)).sum(1)
        heads_v = (p.transpose(1, 2) @ do).unflatten(0, (-1, group)).sum(1)
        dk[s:e], dv[s:e] = heads_k.transpose(0, 1), heads_v.transpose(0, 1)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


def install() -> None:
    """Register the CPU kernels (once a process)."""
    if _installed:
        return
    from torch.nn.attention import varlen

    varlen._varlen_attn.register_kernel("cpu")(_forward)
    varlen._varlen_attn_backward.register_kernel("cpu")(_backward)
    _installed.append(True)
