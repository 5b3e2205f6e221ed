"""GRPO arithmetic: group advantages, the clipped policy-gradient loss, the k3 KL estimator.

Legend: B images, G captions per image, R = B*G rows, L completion tokens.
Sign convention: `policy_loss` returns a loss to *minimise*; its gradient ascends advantage-weighted log-probs.
Normalisation: the loss of a micro-batch is a *sum* divided by the global count of the whole batch (tokens for
"token" aggregation, captions for "sequence"), so summing micro-batch losses (gradient accumulation) gives
exactly the gradient of the whole batch at once, whatever the split (tests/test_grpo.py checks it).
"""
import torch


def advantages(rewards, group_size, scale="std", eps=1e-4):
    """Per-caption advantages from rewards (R,), rows grouped by image.
    scale="std": (r - mean) / (std + eps) per group (GRPO); scale="none": r - mean (Dr. GRPO, no length/std bias).
    Zero-variance groups get advantage 0 either way."""
    r = rewards.view(-1, group_size)  # (B, G)
    a = r - r.mean(1, keepdim=True)
    if scale == "std":
        a = a / (r.std(1, keepdim=True, unbiased=False) + eps)
    elif scale != "none":
        raise ValueError(f"unknown advantage scale {scale!r} (std, none)")
    return a.reshape(-1)


def policy_loss(logp, old_logp, adv, mask, norm, eps_low=0.2, eps_high=0.28, aggregation="token",
                ref_logp=None, beta=0.0):
    """Clipped surrogate (PPO / GRPO, asymmetric clip as DAPO) over a micro-batch.

    logp, old_logp, mask (r, L); adv (r,). norm: the *global* number of tokens (aggregation="token", DAPO) or of
    captions (aggregation="sequence", each caption's token mean, original GRPO) in the whole batch.
    With ref_logp and beta > 0 adds beta * KL(pi || ref) per token, k3 estimator: exp(q) - q - 1, q = ref - logp.
    Returns (loss, stats) with sums (not means) in stats, so micro-batches can be added up."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    per_tok = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    if ref_logp is not None and beta > 0:
        q = ref_logp - logp
        per_tok = per_tok + beta * (torch.exp(q) - q - 1)
    if aggregation == "token":
        loss = (per_tok * mask).sum() / norm
    elif aggregation == "sequence":
        loss = ((per_tok * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / norm
    else:
        raise ValueError(f"unknown loss aggregation {aggregation!r} (token, sequence)")
    clipped = ((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
    stats = {"ratio_sum": (ratio.detach() * mask).sum().item(), "clipped": (clipped * mask).sum().item(),
             "tokens": mask.sum().item()}
    return loss, stats
