import pytest
import torch

from caprl_mini.grpo import advantages, flat_token_loss, policy_loss, zero_variance
from caprl_mini.logprobs import logprobs_and_loss, token_logprobs


def test_advantages_per_group():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2])
    a = advantages(r, 4, "none")
    assert torch.allclose(a, torch.tensor([0.5, -0.5, 0, 0, 0, 0, 0, 0]))
    s = advantages(r, 4, "std")
    assert torch.allclose(s[:4], (r[:4] - 0.5) / (r[:4].std(unbiased=False) + 1e-4))
    assert torch.all(s[4:] == 0)  # zero-variance group
    tenths = torch.tensor([0.1] * 8 + [0.1] * 7 + [0.2])  # equal rewards whose fp32 mean and std are not exactly 0
    assert zero_variance(tenths, 8).tolist() == [True, False]
    for scale in ("std", "none"):
        assert torch.all(advantages(tenths, 8, scale)[:8] == 0) and advantages(tenths, 8, scale)[15] > 0


@pytest.mark.parametrize("fused", [False, True])  # token_logprobs -> policy_loss, or logprobs_and_loss (trainer)
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("split", [[8], [4, 4], [2, 3, 3], [1] * 8])
def test_gradient_same_for_1_or_k_micro_batches(aggregation, split, fused):
    torch.manual_seed(0)
    R, L, D, V = 8, 6, 10, 31
    W = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    h = torch.randn(R, L, D, dtype=torch.float64)
    y = torch.randint(0, V, (R, L))
    mask = (torch.arange(L)[None] < torch.tensor([6, 2, 5, 1, 6, 3, 4, 6])[:, None]).long()
    old = token_logprobs(h.reshape(-1, D), W.detach(), y.reshape(-1)).view(R, L) + 0.05 * torch.randn(R, L, dtype=torch.float64)
    adv = advantages(torch.rand(R, dtype=torch.float64), 4)
    norm = mask.sum() if aggregation == "token" else R

    def grad(parts):
        W.grad = None
        r0 = 0
        for n in parts:
            rows = slice(r0, r0 + n)
            if fused:
                tl = flat_token_loss(old[rows], adv[rows], mask[rows], norm, aggregation=aggregation)
                _, loss = logprobs_and_loss(h[rows].reshape(-1, D), W, y[rows].reshape(-1), tl, row_chunk=5)
            else:
                logp = token_logprobs(h[rows].reshape(-1, D), W, y[rows].reshape(-1)).view(n, L)
                loss, _ = policy_loss(logp, old[rows], adv[rows], mask[rows], norm, aggregation=aggregation)
            loss.backward()
            r0 += n
        return W.grad.clone()

    full = grad([R])
    assert full.abs().sum() > 0
    assert torch.allclose(grad(split), full, atol=1e-12, rtol=0)


def test_token_and_sequence_aggregation_by_hand():
    """Two captions of 3 and 1 tokens: token level averages the 4 tokens, sequence level averages the captions' own
    token means (written out here, not through token_weights, which both of the tests above share)."""
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.1, 1.0, 0.9], [1.2, 1.0, 1.0]]))  # ratios inside the clip range
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, -2.0])
    terms = [-1.1, -1.0, -0.9, 2 * 1.2]  # -ratio * A of each real token
    token, _ = policy_loss(logp, old, adv, mask, 4, aggregation="token")
    sequence, _ = policy_loss(logp, old, adv, mask, 2, aggregation="sequence")
    assert torch.isclose(token, torch.tensor(sum(terms) / 4))
    assert torch.isclose(sequence, torch.tensor((sum(terms[:3]) / 3 + terms[3]) / 2))
    assert not torch.isclose(token, sequence)


def test_clip_and_kl():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1.0 against old = 0
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    loss, st = policy_loss(logp, old, torch.tensor([1.0]), mask, 3)
    # A > 0: ratio 1.5 clipped to 1.28, 0.5 stays 0.5 (min), 1.0 stays
    assert torch.isclose(loss, -(torch.tensor(1.28) + 0.5 + 1.0) / 3)
    assert st["clipped"] == 1 and abs(st["ratio_sum"] - 3.0) < 1e-6
    loss_neg, st = policy_loss(logp, old, torch.tensor([-1.0]), mask, 3)
    assert torch.isclose(loss_neg, (torch.tensor(1.5) + 0.8 + 1.0) / 3)  # A < 0: 0.5 clipped up to 0.8
    assert st["clipped"] == 1  # ... and counted (the logged clip_frac): 1.5 is not clipped when A < 0
    kl_loss, _ = policy_loss(old, old, torch.tensor([0.0]), mask, 3, ref_logp=old, beta=0.1)
    assert kl_loss.item() == 0.0  # k3 is 0 at pi = ref
    kl_loss, _ = policy_loss(old, old, torch.tensor([0.0]), mask, 3, ref_logp=old - 1.0, beta=1.0)
    assert torch.isclose(kl_loss, torch.exp(torch.tensor(-1.0)) + 1 - 1)
