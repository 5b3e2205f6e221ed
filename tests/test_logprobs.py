import pytest
import torch

from caprl_mini import logprobs
from caprl_mini.grpo import flat_token_loss, policy_loss
from caprl_mini.logprobs import logprobs_and_loss, token_logprobs


def naive(h, W, y, temperature):
    return torch.log_softmax(h @ W.T / temperature, -1).gather(1, y[:, None])[:, 0]


@pytest.mark.parametrize("row_chunk,vocab_chunk,temperature", [(7, 13, 1.0), (64, 1000, 0.7), (1, 50, 1.3)])
def test_fused_logprobs_and_grads_equal_float64_reference(row_chunk, vocab_chunk, temperature):
    torch.manual_seed(0)
    N, D, V = 53, 24, 211
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,))
    g = torch.randn(N, dtype=torch.float64)
    ref = naive(h, W, y, temperature)
    gh, gW = torch.autograd.grad((ref * g).sum(), (h, W))
    out = token_logprobs(h, W, y, temperature, row_chunk, vocab_chunk)
    fh, fW = torch.autograd.grad((out * g).sum(), (h, W))
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    assert torch.allclose(fh, gh, atol=1e-12, rtol=0) and torch.allclose(fW, gW, atol=1e-12, rtol=0)


def test_fused_fp32_close_to_float64():
    torch.manual_seed(1)
    h, W, y = torch.randn(40, 16) * 3, torch.randn(300, 16), torch.randint(0, 300, (40,))
    ref = naive(h.double(), W.double(), y, 1.0)
    assert (token_logprobs(h, W, y, 1.0, 8, 64).double() - ref).abs().max() < 1e-4


def test_entropy_equals_reference():
    """The entropy logprobs_and_loss reads off the loss's logits, row chunks not dividing N, a vocabulary wider than
    the 16k-column blocks it is summed in; its log-probs and loss are the same with or without it."""
    torch.manual_seed(2)
    h, W = torch.randn(30, 8, dtype=torch.float64), torch.randn(40000, 8, dtype=torch.float64)
    y = torch.randint(0, 40000, (30,))
    p = torch.softmax(h @ W.T / 0.9, -1)
    ref = -(p * p.log()).sum(-1)
    lp, loss, ent = logprobs_and_loss(h, W, y, lambda lp, rows: lp, 0.9, 7, entropy=True)
    assert torch.allclose(ent, ref, atol=1e-12, rtol=0) and not ent.requires_grad
    assert torch.allclose(lp, naive(h, W, y, 0.9), atol=1e-12, rtol=0)
    lp2, loss2 = logprobs_and_loss(h, W, y, lambda lp, rows: lp, 0.9, 7)
    assert torch.equal(lp, lp2) and torch.equal(loss, loss2)


def test_logits_stay_fp32_inside_bf16_autocast():
    """The trainer runs the policy under bf16 autocast on a GPU; the log-probs must still be computed in fp32
    (a bf16 matmul errs by ~1e-2 here)."""
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(64, 32, generator=g, requires_grad=True), torch.randn(100, 32, generator=g, requires_grad=True)
    y = torch.randint(0, 100, (64,), generator=g)
    ref = torch.log_softmax(h.double() @ W.double().T, -1).gather(1, y[:, None])[:, 0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = token_logprobs(h, W, y, vocab_chunk=48)
        ent = logprobs_and_loss(h.detach(), W.detach(), y, lambda lp, rows: lp, row_chunk=16, entropy=True)[2]
    lp.sum().backward()
    assert lp.dtype == torch.float32 and (lp.double() - ref).abs().max() < 1e-4
    hd, Wd = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    torch.log_softmax(hd @ Wd.T, -1).gather(1, y[:, None]).sum().backward()
    assert (h.grad - hd.grad).abs().max() < 1e-4 and (W.grad - Wd.grad).abs().max() < 1e-4
    p = torch.softmax(hd.detach() @ Wd.detach().T, -1)
    assert (ent.double() + (p * p.log()).sum(-1)).abs().max() < 1e-4


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_logprobs_and_loss_equals_naive_policy_loss(aggregation, monkeypatch):
    """The loss, its gradients w.r.t. h and W (formed in the forward) and the log-probs equal naive log-probs ->
    policy_loss in float64, with a KL term, temperature != 1, a row chunk that does not divide N, an upstream
    gradient != 1; and no logits chunk is ever wider than row_chunk rows."""
    torch.manual_seed(3)
    R, L, D, V, T, chunk = 6, 8, 12, 97, 0.7, 7
    h = torch.randn(R * L, D, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (R * L,))
    mask = (torch.arange(L)[None] < torch.tensor([8, 3, 0, 5, 1, 8])[:, None]).long()
    ref = naive(h, W, y, T).detach().view(R, L)
    old, ref_logp = ref + 0.3 * torch.randn(R, L, dtype=torch.float64), ref + 0.2 * torch.randn(R, L, dtype=torch.float64)
    adv = torch.randn(R, dtype=torch.float64)
    norm = mask.sum() if aggregation == "token" else 5
    args = (old, adv, mask, norm, 0.2, 0.28, aggregation, ref_logp, 0.1)
    loss, st = policy_loss(naive(h, W, y, T).view(R, L), *args)
    gh, gW = torch.autograd.grad(2.5 * loss, (h, W))
    assert 0 < st["clipped"] < st["tokens"]  # both branches of the clip are exercised
    chunk_logits = logprobs._chunk_logits

    def checked(hc, *a):
        assert hc.shape[0] <= chunk
        return chunk_logits(hc, *a)
    monkeypatch.setattr(logprobs, "_chunk_logits", checked)
    lp, floss = logprobs_and_loss(h, W, y, flat_token_loss(*args), T, chunk)
    fh, fW = torch.autograd.grad(2.5 * floss, (h, W))
    assert not lp.requires_grad and torch.allclose(lp, ref.reshape(-1), atol=1e-12, rtol=0)
    assert abs(floss.item() - loss.item()) < 1e-12
    assert torch.allclose(fh, gh, atol=1e-10, rtol=0) and torch.allclose(fW, gW, atol=1e-10, rtol=0)
    # the trainer's way: only the real tokens' rows (keep = mask), padding gets no vocabulary work; same loss
    keep = mask.bool().reshape(-1)
    lp, kloss = logprobs_and_loss(h[keep], W, y[keep], flat_token_loss(*args, keep=mask), T, chunk)
    kh, kW = torch.autograd.grad(2.5 * kloss, (h, W))
    assert torch.allclose(lp, ref.reshape(-1)[keep], atol=1e-12, rtol=0)
    assert abs(kloss.item() - loss.item()) < 1e-12
    assert torch.allclose(kh, gh, atol=1e-10, rtol=0) and torch.allclose(kW, gW, atol=1e-10, rtol=0)


def test_logprobs_and_loss_fp32_under_bf16_autocast():
    """Inside the trainer's bf16 autocast region the fused loss still computes fp32 logits and gradients."""
    g = torch.Generator().manual_seed(4)
    h, W = torch.randn(40, 32, generator=g, requires_grad=True), torch.randn(300, 32, generator=g, requires_grad=True)
    y = torch.randint(0, 300, (40,), generator=g)
    hd, Wd = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    (naive(hd, Wd, y, 1.0) ** 2).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, loss = logprobs_and_loss(h, W, y, lambda lp, rows: lp ** 2, row_chunk=16)
    loss.backward()
    assert lp.dtype == loss.dtype == torch.float32 and (lp.double() - naive(hd, Wd, y, 1.0)).abs().max() < 1e-4
    assert (h.grad - hd.grad).abs().max() < 1e-3 and (W.grad - Wd.grad).abs().max() < 1e-3


@pytest.mark.parametrize("shift", [-1000.0, 1000.0])
def test_fp32_logprobs_stable_under_a_large_logit_shift(shift):
    """log softmax is shift-invariant: logits all far above (overflow of an unshifted exp) or all far below
    (underflow of an exp shifted by anything but the running max) give the same fp32 log-probs, loss and gradients
    as the float64 reference, in both the chunked token_logprobs and the fused logprobs_and_loss."""
    g = torch.Generator().manual_seed(5)
    h = torch.cat([torch.randn(20, 8, generator=g), torch.ones(20, 1)], 1)  # a constant column: logits + shift
    W = torch.cat([torch.randn(50, 8, generator=g), torch.full((50, 1), shift)], 1).requires_grad_()
    y = torch.randint(0, 50, (20,), generator=g)
    Wd = W.detach().double().requires_grad_()
    ref = naive(h.double(), Wd, y, 0.5)
    (ref ** 2).sum().backward()
    lp = token_logprobs(h, W, y, 0.5, 8, 16)
    assert (lp.double() - ref).abs().max() < 1e-3
    flp, loss = logprobs_and_loss(h, W, y, lambda lp, rows: lp ** 2, 0.5, 8)
    loss.backward()
    assert (flp.double() - ref).abs().max() < 1e-3 and abs(loss.item() - (ref ** 2).sum().item()) < 1e-2
    assert (W.grad.double() - Wd.grad).abs().max() < 1e-2


def test_fused_loss_backward_runs_once():
    """logprobs_and_loss hands its precomputed gradients to autograd (no copy, scaled in place): a second backward
    through the same graph must raise, not rescale the already returned gradient and accumulate it again."""
    g = torch.Generator().manual_seed(6)
    h, W = torch.randn(6, 4, generator=g, requires_grad=True), torch.randn(10, 4, generator=g, requires_grad=True)
    _, loss = logprobs_and_loss(h, W, torch.randint(0, 10, (6,), generator=g), lambda lp, rows: lp)
    (2.0 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()
