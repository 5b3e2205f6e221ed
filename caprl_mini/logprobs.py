"""Fused, chunked per-token log-probabilities (and the loss and entropy), without ever holding [N, V] logits.

Naive:  logits = h @ W.T / temperature          (N, V)   <- at N = 16k tokens and V = 152k this is 9.7 GB in fp32
        logp   = log_softmax(logits).gather(y)  (N,)     and autograd keeps the (N, V) softmax for backward.
Fused:  rows are processed in chunks of `row_chunk`, and each row chunk's vocabulary in chunks of `vocab_chunk`
        with an online logsumexp, so the largest temporary is (row_chunk, vocab_chunk). The backward recomputes
        each chunk's logits from h and W (one extra matmul) instead of storing them:
            d logp_i / d logits_ij = onehot(y_i)_j - softmax_ij,     d logits / d h = W / temperature.
Fused log-prob + loss (`logprobs_and_loss`, Liger-style): `token_logprobs` costs 4 matmuls of [N, D] x [D, V]
        (forward logits; backward: logits again, grad h, grad W) against naive's 3. When the loss is a sum of
        per-token terms, each a function of that token's own log-prob only (the GRPO loss is), dLoss/dlogp of a
        row chunk is known as soon as its logits are, so the forward forms the gradients right there (3 matmuls,
        no recompute) and the backward only scales them by the incoming scalar. Rows are chunked, the vocabulary
        is not: the temporary is one (row_chunk, V) buffer (256 x 151,936 x 4 B = 155 MB), updated in place.
Logits are computed in fp32 whatever the input dtype, and divided by the same temperature as the sampler, so
on-policy importance ratios are exactly 1 up to matmul rounding.
Legend: N tokens (rows), D hidden, V vocabulary, n rows in a chunk, v vocabulary entries in a chunk.
"""
import torch


def _acc(t):
    """Accumulation dtype: fp32 for fp32 / bf16 / fp16 inputs, fp64 for fp64 (so tests can be exact)."""
    return torch.promote_types(t.dtype, torch.float32)


def _chunk_logits(h, W, v0, v1, temperature):
    with torch.autocast(h.device.type, enabled=False):  # fp32 logits even inside a bf16 autocast region
        return (h.to(_acc(h)) @ W[v0:v1].to(_acc(h)).T).div_(temperature)  # (n, v); in place: no second (n, v)


def _online(h, W, temperature, vocab_chunk, y):
    """One pass over the vocabulary in chunks with a running max m: lse = m + log s, s = sum exp(z - m); returns
    (lse, the logits of the targets y (n,)). h (n, D)."""
    n, V = h.shape[0], W.shape[0]
    m = torch.full((n,), -float("inf"), device=h.device, dtype=_acc(h))
    s, t = torch.zeros_like(m), torch.zeros_like(m)
    for v0 in range(0, V, vocab_chunk):
        z = _chunk_logits(h, W, v0, min(v0 + vocab_chunk, V), temperature)
        m_new = torch.maximum(m, z.amax(-1))
        scale, e = torch.exp(m - m_new), (z - m_new[:, None]).exp_()
        s = s * scale + e.sum(-1)
        inside = (y >= v0) & (y < v0 + z.shape[1])  # gather + where, not boolean indexing: no host sync
        t = torch.where(inside, z.gather(1, (y - v0).clamp(0, z.shape[1] - 1)[:, None])[:, 0], t)
        m = m_new
    return m + torch.log(s), t


class _FusedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, y, temperature, row_chunk, vocab_chunk):
        out = torch.empty(h.shape[0], device=h.device, dtype=_acc(h))
        lse = torch.empty_like(out)
        for r0 in range(0, h.shape[0], row_chunk):
            r = slice(r0, r0 + row_chunk)
            lse[r], tgt = _online(h[r], W, temperature, vocab_chunk, y[r])
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
                inside = (yr >= v0) & (yr < v1)  # + g at each target inside the chunk (no nonzero: no host sync)
                dz.scatter_add_(1, (yr - v0).clamp(0, v1 - v0 - 1)[:, None], (gr * inside)[:, None])
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


class _FusedLogProbLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, y, token_loss, temperature, row_chunk, entropy):
        N, V, acc = h.shape[0], W.shape[0], _acc(h)
        need_h, need_W = ctx.needs_input_grad[:2]
        logp = torch.empty(N, device=h.device, dtype=acc)
        ent = torch.empty(N if entropy else 0, device=h.device, dtype=acc)
        loss = torch.zeros((), device=h.device, dtype=acc)
        gh = torch.empty_like(h, dtype=acc) if need_h else None
        gW = torch.zeros_like(W, dtype=acc) if need_W else None
        Wa = W.to(acc)  # converted once, not per chunk (no copy when W is already fp32)
        buf = torch.empty(min(row_chunk, N), V, device=h.device, dtype=acc)  # the one big buffer, every chunk's
        with torch.autocast(h.device.type, enabled=False):  # fp32 matmuls even inside a bf16 autocast region
            for r0 in range(0, N, row_chunk):
                r = slice(r0, min(r0 + row_chunk, N))
                hr, yr = h[r].to(acc), y[r, None]
                # (n, V) logits into buf (z = h @ W.T would hold the last chunk's z while making the next: 2 buffers)
                z = torch.mm(hr, Wa.T, out=buf[:hr.shape[0]]).div_(temperature)
                z -= z.amax(-1, keepdim=True)  # shifted for a stable exp
                tgt = z.gather(1, yr)  # (n, 1)
                s = z.exp_().sum(-1, keepdim=True)  # z now holds exp(logits - max)
                logp[r] = (tgt - s.log())[:, 0]
                if entropy:  # H = log s - E_p[z - max] = log s - sum(e log e) / s, e = exp(z - max): what z holds now
                    ez = sum(torch.xlogy(e, e).sum(-1) for e in z.split(16384, 1))  # 16k columns: small temporaries
                    ent[r] = s[:, 0].log() - ez / s[:, 0]
                with torch.enable_grad():  # dloss/dlogp of these rows only: a tiny graph on a detached leaf
                    lp = logp[r].detach().requires_grad_()
                    l = token_loss(lp, r)  # (n,)
                    g, = torch.autograd.grad(l.sum(), lp)
                loss += l.detach().sum()
                if not (need_h or need_W):
                    continue
                g = g[:, None] / temperature  # (n, 1); d logits / d (h @ W.T) = 1 / temperature
                dz = z.mul_(-g / s)  # -g * softmax / T: dloss/d(h @ W.T) off the target...
                dz.scatter_add_(1, yr, g)  # ...and + g / T on it
                if need_h:
                    torch.mm(dz, Wa, out=gh[r])
                if need_W:  # addmm_ accumulates in place: no (V, D) temporary
                    gW.addmm_(dz.T, hr)
        ctx.mark_non_differentiable(logp, ent)
        ctx.grads, ctx.dtypes = (gh, gW), (h.dtype, W.dtype)
        return logp, loss, ent

    @staticmethod
    def backward(ctx, _, g, __):  # g: d(outer) / d(loss), a scalar; logp and the entropy have no gradient
        if ctx.grads is None:
            raise RuntimeError("logprobs_and_loss: backward runs once per forward (its gradients are handed over)")
        (gh, gW), ctx.grads = ctx.grads, None  # handed to autograd, not copied: W.grad can take the (V, D) buffer
        gh = gh.mul_(g).to(ctx.dtypes[0]) if gh is not None else None
        gW = gW.mul_(g).to(ctx.dtypes[1]) if gW is not None else None
        return gh, gW, None, None, None, None, None


def logprobs_and_loss(h, W, y, token_loss, temperature=1.0, row_chunk=256, entropy=False):
    """(logp, loss): logp = log softmax(h @ W.T / temperature)[y] per row (N,), no gradient, and
    loss = sum over rows of token_loss(logp[rows], rows), differentiable w.r.t. h and W, with 3 matmuls.
    entropy=True: (logp, loss, entropy), each row's softmax entropy (no gradient) from the same logits, with no
    fourth matmul. Contract: token_loss(lp, rows) returns (n,) per-token losses of the rows `rows` (a slice of
    0..N), each a function of its own lp alone; tensors it closes over are constants (no gradient reaches them).
    A backward runs once per call (no retain_graph). h (N, D), W (V, D), y (N,)."""
    out = _FusedLogProbLoss.apply(h, W, y, token_loss, float(temperature), row_chunk, entropy)
    return out if entropy else out[:2]
