"""Fused, chunked per-token log-probabilities and entropy, without ever holding [N, V] logits.

Naive:  logits = h @ W.T / temperature          (N, V)   <- at N = 16k tokens and V = 152k this is 9.7 GB in fp32
        logp   = log_softmax(logits).gather(y)  (N,)     and autograd keeps the (N, V) softmax for backward.
Fused:  rows are processed in chunks of `row_chunk`, and each row chunk's vocabulary in chunks of `vocab_chunk`
        with an online logsumexp, so the largest temporary is (row_chunk, vocab_chunk). The backward recomputes
        each chunk's logits from h and W (one extra matmul) instead of storing them:
            d logp_i / d logits_ij = onehot(y_i)_j - softmax_ij,     d logits / d h = W / temperature.
Logits are computed in fp32 whatever the input dtype, and divided by the same temperature as the sampler, so
on-policy importance ratios are exactly 1 up to matmul rounding.
Legend: N tokens (rows), D hidden, V vocabulary.
"""
import torch


def _acc(t):
    """Accumulation dtype: fp32 for fp32 / bf16 / fp16 inputs, fp64 for fp64 (so tests can be exact)."""
    return torch.promote_types(t.dtype, torch.float32)


def _chunk_logits(h, W, v0, v1, temperature):
    with torch.autocast(h.device.type, enabled=False):  # fp32 logits even inside a bf16 autocast region
        return (h.to(_acc(h)) @ W[v0:v1].to(_acc(h)).T) / temperature  # (n, v)


def _lse_and_target(h, W, y, temperature, vocab_chunk):
    """Online logsumexp over vocabulary chunks, and the target tokens' logits. h (n, D), y (n,)."""
    n, V = h.shape[0], W.shape[0]
    m = torch.full((n,), -float("inf"), device=h.device, dtype=_acc(h))
    s, tgt = torch.zeros_like(m), torch.zeros_like(m)
    for v0 in range(0, V, vocab_chunk):
        z = _chunk_logits(h, W, v0, min(v0 + vocab_chunk, V), temperature)
        m_new = torch.maximum(m, z.amax(-1))
        s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(-1)
        m = m_new
        inside = (y >= v0) & (y < v0 + z.shape[1])
        tgt[inside] = z[inside, y[inside] - v0]
    return m + torch.log(s), tgt


class _FusedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, y, temperature, row_chunk, vocab_chunk):
        out = torch.empty(h.shape[0], device=h.device, dtype=_acc(h))
        lse = torch.empty_like(out)
        for r0 in range(0, h.shape[0], row_chunk):
            r = slice(r0, r0 + row_chunk)
            lse[r], tgt = _lse_and_target(h[r], W, y[r], temperature, vocab_chunk)
            out[r] = tgt - lse[r]
        ctx.save_for_backward(h, W, y, lse)  # lse is (N,): the only thing kept besides the inputs
        ctx.cfg = (temperature, row_chunk, vocab_chunk)
        return out

    @staticmethod
    def backward(ctx, g):  # g (N,) = dL / dlogp
        h, W, y, lse = ctx.saved_tensors
        temperature, row_chunk, vocab_chunk = ctx.cfg
        V = W.shape[0]
        acc = _acc(h)
        gh = torch.zeros_like(h, dtype=acc) if ctx.needs_input_grad[0] else None
        gW = torch.zeros_like(W, dtype=acc) if ctx.needs_input_grad[1] else None
        for r0 in range(0, h.shape[0], row_chunk):
            r = slice(r0, r0 + row_chunk)
            hr, yr, gr = h[r].to(acc), y[r], g[r].to(acc)
            for v0 in range(0, V, vocab_chunk):
                v1 = min(v0 + vocab_chunk, V)
                p = _chunk_logits(hr, W, v0, v1, temperature).sub_(lse[r, None]).exp_()  # softmax chunk (n, v)
                dz = p.mul_(-gr[:, None])  # d L / d logits for the chunk (in place: one (n, v) buffer)
                inside = (yr >= v0) & (yr < v1)
                rows = inside.nonzero().squeeze(-1)
                dz[rows, yr[rows] - v0] += gr[rows]
                dz /= temperature
                with torch.autocast(h.device.type, enabled=False):
                    if gh is not None:  # addmm_ accumulates in place: no (V, D)-chunk temporary
                        gh[r].addmm_(dz, W[v0:v1].to(acc))
                    if gW is not None:
                        gW[v0:v1].addmm_(dz.T, hr)
        return (gh.to(h.dtype) if gh is not None else None, gW.to(W.dtype) if gW is not None else None,
                None, None, None, None)


def token_logprobs(h, W, y, temperature=1.0, row_chunk=1024, vocab_chunk=32768):
    """log softmax(h @ W.T / temperature)[y] for every row, differentiable w.r.t. h and W. h (N, D), y (N,)."""
    return _FusedLogProbs.apply(h, W, y, float(temperature), row_chunk, vocab_chunk)


@torch.no_grad()
def token_entropy(h, W, temperature=1.0, row_chunk=1024, vocab_chunk=32768):
    """Entropy of softmax(h @ W.T / temperature) per row, online over vocabulary chunks, no gradient.
    H = lse - E_p[z], accumulated as running max m, s = sum exp(z - m), t = sum exp(z - m) * z."""
    out = torch.empty(h.shape[0], device=h.device, dtype=_acc(h))
    V = W.shape[0]
    for r0 in range(0, h.shape[0], row_chunk):
        hr = h[r0:r0 + row_chunk]
        m = torch.full((hr.shape[0],), -float("inf"), device=h.device, dtype=_acc(h))
        s, t = torch.zeros_like(m), torch.zeros_like(m)
        for v0 in range(0, V, vocab_chunk):
            z = _chunk_logits(hr, W, v0, min(v0 + vocab_chunk, V), temperature)
            m_new = torch.maximum(m, z.amax(-1))
            scale = torch.exp(m - m_new)
            e = torch.exp(z - m_new[:, None])
            s, t, m = s * scale + e.sum(-1), t * scale + (e * z).sum(-1), m_new
        out[r0:r0 + row_chunk] = m + torch.log(s) - t / s
    return out
