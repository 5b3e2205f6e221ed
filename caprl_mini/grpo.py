"""GRPO arithmetic: group advantages, the clipped policy-gradient loss, the k3 KL estimator.

Legend: B images, G captions per image, R = B*G rows, r rows of a micro-batch, L completion tokens, n the tokens of a
micro-batch that flat_token_loss keeps (`keep`), flattened.
Sign convention: `policy_loss` returns a loss to *minimise*; its gradient ascends advantage-weighted log-probs.
Normalisation: the loss of a micro-batch is a *sum* divided by the global count of the whole batch (tokens for
"token" aggregation, captions for "sequence"), so summing micro-batch losses (gradient accumulation) gives
exactly the gradient of the whole batch at once, whatever the split (tests/test_grpo.py checks it).
Structure: loss = sum(token_weights * token_loss), each token's term a function of its own log-prob only. The
trainer relies on it: `flat_token_loss` hands the terms to logprobs.logprobs_and_loss, which forms the gradient in
its forward pass (3 matmuls over the vocabulary instead of 4); `policy_loss` is the same sum from given log-probs.
"""
import torch


def zero_variance(rewards, group_size):
    """(B,) True where all G rewards of a group are equal, compared exactly: in floats their mean and std need not
    come out 0 (8 rewards of 0.1 in fp32: std 7e-9, which std-scaling turns into advantages of 7e-5)."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(1)


def advantages(rewards, group_size, scale="std", eps=1e-4):
    """Per-caption advantages from rewards (R,), rows grouped by image.
    scale="std": (r - mean) / (std + eps) per group (GRPO); scale="none": r - mean (Dr. GRPO's: no std division; its
    other half, no length normalisation, is the trainer's --loss-aggregation). "none" is RLOO's leave-one-out
    advantage r - mean(others) times (G - 1) / G, a constant scale that AdamW cancels (but for its eps and gradient
    clipping).
    Zero-variance groups get advantage exactly 0 either way."""
    r = rewards.view(-1, group_size)  # (B, G)
    a = r - r.mean(1, keepdim=True)
    if scale == "std":
        a = a / (r.std(1, keepdim=True, unbiased=False) + eps)
    elif scale != "none":
        raise ValueError(f"unknown advantage scale {scale!r} (std, none)")
    a[zero_variance(rewards, group_size)] = 0
    return a.reshape(-1)


def token_loss(logp, old_logp, adv, eps_low=0.2, eps_high=0.28, ref_logp=None, beta=0.0):
    """Per-token loss, elementwise over any shape (adv broadcast to logp's): the clipped surrogate (PPO / GRPO,
    asymmetric clip as DAPO), plus beta * KL(pi || ref) by the k3 estimator exp(q) - q - 1, q = ref - logp, when
    ref_logp is given and beta > 0. Each token's term depends on its own logp only (logprobs_and_loss needs it)."""
    ratio = torch.exp(logp - old_logp)
    per_tok = -torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    if ref_logp is not None and beta > 0:
        q = ref_logp - logp
        per_tok = per_tok + beta * (torch.exp(q) - q - 1)
    return per_tok


def token_weights(mask, norm, aggregation="token", dtype=torch.float32):
    """(r, L) weights w with loss = sum(w * token_loss). norm: the *global* number of tokens (aggregation="token",
    DAPO: w = mask / norm) or of captions (aggregation="sequence", each caption's token mean, original GRPO:
    w = mask / (caption length * norm)) in the whole batch."""
    mask = mask.to(dtype)
    if aggregation == "token":
        return mask / norm
    if aggregation == "sequence":
        return mask / (mask.sum(1, keepdim=True).clamp(min=1) * norm)
    raise ValueError(f"unknown loss aggregation {aggregation!r} (token, sequence)")


def policy_stats(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.28):
    """Sums (not means, so micro-batches add up) over masked tokens: ratio, clipped tokens, tokens. (r, L), adv (r,)."""
    mask = mask.to(logp.dtype)
    ratio, a = torch.exp(logp.detach() - old_logp), adv[:, None]
    clipped = ((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
    return {"ratio_sum": (ratio * mask).sum().item(), "clipped": (clipped * mask).sum().item(),
            "tokens": mask.sum().item()}


def policy_loss(logp, old_logp, adv, mask, norm, eps_low=0.2, eps_high=0.28, aggregation="token",
                ref_logp=None, beta=0.0):
    """The GRPO loss of a micro-batch from its log-probs: sum(token_weights * token_loss).
    logp, old_logp, mask (r, L); adv (r,); norm, aggregation as token_weights. Returns (loss, policy_stats)."""
    w = token_weights(mask, norm, aggregation, logp.dtype)
    loss = (w * token_loss(logp, old_logp, adv[:, None], eps_low, eps_high, ref_logp, beta)).sum()
    return loss, policy_stats(logp, old_logp, adv, mask, eps_low, eps_high)


def flat_token_loss(old_logp, adv, mask, norm, eps_low=0.2, eps_high=0.28, aggregation="token",
                    ref_logp=None, beta=0.0, keep=None):
    """policy_loss's per-token terms, weighted, as a function of flat token rows, the token_loss that
    logprobs.logprobs_and_loss takes: (lp (n,), rows slice) -> (n,). Same arguments as policy_loss; the flat rows
    are the (r, L) tokens where `keep` is True, in row-major order (default: all r*L; the trainer keeps the real
    tokens, so padding costs no vocabulary work)."""
    keep = torch.ones_like(old_logp, dtype=torch.bool) if keep is None else keep.bool()
    w = token_weights(mask, norm, aggregation, old_logp.dtype)[keep]  # (n,)
    old, a = old_logp[keep], adv[:, None].expand_as(old_logp)[keep]
    ref = ref_logp[keep] if ref_logp is not None else None
    return lambda lp, rows: w[rows] * token_loss(lp, old[rows], a[rows], eps_low, eps_high,
                                                 None if ref is None else ref[rows], beta)
