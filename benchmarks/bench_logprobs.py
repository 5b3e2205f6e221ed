"""Fused, chunked log-probs (caprl_mini/logprobs.py) against the naive log_softmax(h @ W.T).gather(y), under the
GRPO loss the trainer takes.

    python benchmarks/bench_logprobs.py                   # CPU: 1,024 tokens; GPU: 16,384 tokens
    python benchmarks/bench_logprobs.py --tokens 4096

Same inputs for all (N tokens x hidden D, Qwen's vocabulary V = 151,936), fp32, forward + backward of the GRPO loss
(grpo.py, token aggregation, each token its own caption with a random advantage, old log-probs = float64
reference + noise) with gradients w.r.t. the hidden states and the unembedding W. Three variants:
    naive       log_softmax(h @ W.T).gather(y) -> policy_loss
    fused       token_logprobs -> policy_loss            (chunked; backward recomputes the logits: 4 matmuls)
    fused+loss  logprobs_and_loss(flat_token_loss(...))  (gradient formed in the forward: 3 matmuls; the trainer's)
With --entropy, two more: the trainer also logs each token's entropy,
    +entropy    logprobs_and_loss(..., entropy=True)     (read off the loss's logits: the trainer's since 2026-11-27)
    +apart      fused+loss, then a separate pass over the vocabulary for the entropy (a 4th matmul, as the trainer's
                separate online pass did before)
Reported: seconds (median of --repeats, the variants interleaved), peak memory above the inputs, the same less the
gradients (every variant must hold grad h and grad W: at N = 1k the (V, D) grad W is most of every peak, so this
column shows what the method itself needs), and the max |error| of the log-probs against a float64 reference.
Peak memory: on CUDA max_memory_allocated; on a CPU each variant runs once more in a fresh child process and reports
how far its peak resident memory grew over the inputs, gradients included (they are the same size for
all; VmHWM, Linux). The last line is one JSON object with the figures; "speedup", "memory_reduction" (peaks,
gradients included), "working_memory_reduction" (gradients excluded) and "max_error" are fused+loss's (the trainer's
path) against naive.
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from caprl_mini.grpo import flat_token_loss, policy_loss  # noqa: E402
from caprl_mini.logprobs import logprobs_and_loss, token_logprobs  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tokens", type=int, default=0, help="N (0: 1,024 on CPU, 16,384 on GPU)")
parser.add_argument("--hidden", type=int, default=2048, help="D, the hidden width (3B: 2048)")
parser.add_argument("--vocab", type=int, default=151936, help="V, the vocabulary (Qwen's)")
parser.add_argument("--repeats", type=int, default=1, help="timed runs of each variant, interleaved (median)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
parser.add_argument("--entropy", action="store_true", help="also time the loss with the entropy (two ways)")
parser.add_argument("--child", help=argparse.SUPPRESS)  # CPU memory probe: the variant to run
args = parser.parse_args()
dev = torch.device(args.device)
N = args.tokens or (16384 if dev.type == "cuda" else 1024)


def inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, args.hidden, generator=g).to(dev).requires_grad_()
    W = torch.randn(args.vocab, args.hidden, generator=g).mul_(0.02).to(dev).requires_grad_()  # in place: no temporary
    y = torch.randint(0, args.vocab, (N,), generator=g).to(dev)
    return h, W, y


def variants(old):
    """name -> fn(h, W, y) -> (log-probs (N,), GRPO loss). old (N, 1): old log-probs; each token is its own caption."""
    adv = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(dev)
    mask = torch.ones(N, 1, device=dev)

    def naive(h, W, y):
        lp = torch.log_softmax(h @ W.T, -1).gather(-1, y[:, None])[:, 0]
        return lp, policy_loss(lp.view(N, 1), old, adv, mask, N)[0]

    def fused(h, W, y):
        lp = token_logprobs(h, W, y)
        return lp, policy_loss(lp.view(N, 1), old, adv, mask, N)[0]

    def fused_loss(h, W, y):
        return logprobs_and_loss(h, W, y, flat_token_loss(old, adv, mask, N))

    def with_entropy(h, W, y):
        return logprobs_and_loss(h, W, y, flat_token_loss(old, adv, mask, N), entropy=True)[:2]

    def entropy_apart(h, W, y):
        out = fused_loss(h, W, y)
        with torch.no_grad():  # one more pass over the vocabulary, 256 rows at a time
            ent = torch.cat([torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)
                             for z in (h[r:r + 256] @ W.T for r in range(0, N, 256))])
        return out[0] + 0 * ent, out[1]  # the entropy is used: nothing is skipped
    extra = {"+entropy": with_entropy, "+apart": entropy_apart} if args.entropy or args.child else {}
    return {"naive": naive, "fused": fused, "fused+loss": fused_loss, **extra}


def run(fn, h, W, y):
    h.grad = W.grad = None
    lp, loss = fn(h, W, y)
    loss.backward()
    return lp.detach()


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(name):
    """Peak memory of one forward + backward above the inputs."""
    if dev.type == "cuda":
        h, W, y = inputs()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(fns[name], h, W, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    cmd = [sys.executable, __file__, "--child", name, "--tokens", str(N), "--hidden", str(args.hidden),
           "--vocab", str(args.vocab), "--device", "cpu"]
    return int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])


def peak_rss():
    """This process's peak resident memory in bytes (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024


if args.child:  # CPU memory probe: print how far peak RSS grew over the inputs
    h, W, y = inputs()
    fns = variants(torch.full((N, 1), -math.log(args.vocab)))  # values do not matter for memory
    before = peak_rss()
    run(fns[args.child], h, W, y)
    print(peak_rss() - before)
    sys.exit()

h, W, y = inputs()
with torch.no_grad():  # float64 reference, in row chunks to bound its memory
    ref = torch.cat([torch.log_softmax(h[i:i + 256].double() @ W.double().T, -1).gather(-1, y[i:i + 256, None])[:, 0]
                     for i in range(0, N, 256)])
old = (ref.float() + 0.1 * torch.randn(N, generator=torch.Generator().manual_seed(2)).to(dev)).view(N, 1)
fns = variants(old)
times = {k: [] for k in fns}
out = {}
if dev.type == "cuda":  # an untimed round: first-use kernels and the allocator's growth would be charged to the
    for fn in fns.values():  # variant that runs first (naive); on the CPU a first round measured no slower
        run(fn, h, W, y)
for _ in range(args.repeats):
    for name, fn in fns.items():
        sync()
        t = time.perf_counter()
        out[name] = run(fn, h, W, y)
        sync()
        times[name].append(time.perf_counter() - t)
err = {k: (v.double() - ref).abs().max().item() for k, v in out.items()}
t = {k: statistics.median(v) for k, v in times.items()}
mem = {k: peak_bytes(k) for k in fns}
name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
print(f"GRPO loss over log-probs, forward + backward, N={N} D={args.hidden} V={args.vocab}, fp32, {name}")
grads = (h.numel() + W.numel()) * 4  # fp32 grad h and grad W, held by every variant
work = {k: v - grads for k, v in mem.items()}
print(f"{'':10s} {'seconds':>9s} {'peak MB':>9s} {'less grads':>10s} {'max |err| vs fp64':>18s}")
for k in fns:
    print(f"{k:10s} {t[k]:9.3f} {mem[k] / 2**20:9.0f} {work[k] / 2**20:10.0f} {err[k]:18.2e}")
for k in ("fused", "fused+loss"):
    print(f"{k}: {t[k] / t['naive']:.2f}x naive's time, {mem['naive'] / mem[k]:.1f}x less peak memory "
          f"({work['naive'] / work[k]:.1f}x less without the gradients)")
if args.entropy:
    print(f"the loss with the entropy: +entropy {t['+entropy'] / t['fused+loss']:.2f}x fused+loss's time, "
          f"+apart {t['+apart'] / t['fused+loss']:.2f}x")
print(json.dumps({"bench": "logprobs", "device": name, "tokens": N, "hidden": args.hidden, "vocab": args.vocab,
                  "seconds": t, "peak_bytes": mem, "speedup": t["naive"] / t["fused+loss"],
                  "memory_reduction": mem["naive"] / mem["fused+loss"],
                  "working_memory_reduction": work["naive"] / work["fused+loss"], "max_error": err["fused+loss"]}))
