"""The GPU paths against the CPU ones, on the shipped models (fp32 both; the CPU paths are the ones the tests check
exact against unshared references). Run first on a GPU machine (run_gpu.sh's `check` part):

    python benchmarks/check_gpu.py                   # cuda against cpu
    python benchmarks/check_gpu.py --device cpu      # the script itself, anywhere (cpu against cpu)

  sampling   greedy captions of the static decode (KVDecoder, fixed batch, CUDA graphs) == the dynamic one's (eager),
             twice (each call records its own graph), its step compiled as two graphs (the first step, one layer
             step for all layers); 20 more rollouts free all they allocate, and a new caption length compiles once
             more;
             under bf16 autocast with fp32 weights (the trainer's setting), sampled captions' log-probs against
             teacher forcing (bf16 rounding: tolerance 0.1, as tests/test_sampling.py);
             the same two checks with the static step's attention as one flex_attention kernel (KVDecoder.flex),
             and with q/k/v and gate/up fused too (KVDecoder.fuse);
  teacher    completion_hidden (prompt cached once, each image's captions packed under a block-diagonal bool mask)
             on the device against the CPU: max |state difference| over the real tokens and the parameter
             gradients of a fixed linear function of them, and the same under gradient checkpointing (prompt and
             packed captions as one sequence per image, no cache);
  loss       logprobs_and_loss (the trainer's GRPO loss, gradient formed in the forward, and the entropy) at Qwen's
             vocabulary on the device against the CPU: max |log-prob difference|, the loss's and the gradients'
             differences relative to their scale, max |entropy difference|;
  judge      option_logits (captions' prefixes cached, questions as rows reading them through reused buffers) on
             the device against the CPU, cloze and letter: max |logit difference|.
Prints one line per check and, last, one JSON object; exits 1 if a check fails (tolerance --atol).
"""
import argparse
import json
import random
import sys

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from caprl_mini import judge, models, shapes  # noqa: E402
from caprl_mini.grpo import flat_token_loss  # noqa: E402
from caprl_mini.logprobs import logprobs_and_loss, token_logprobs  # noqa: E402
from caprl_mini.sampling import KVDecoder, sample  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cuda", help="the device checked against the CPU")
parser.add_argument("--atol", type=float, default=1e-3, help="largest difference accepted (fp32, other kernels)")
args = parser.parse_args()
dev = torch.device(args.device)
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 both sides: kernels differ only


class Results(dict):
    """The checks' results, each printed as it is found: a run cut short by its time limit still shows them."""

    def __setitem__(self, k, v):
        super().__setitem__(k, v)
        print(f"{k}: {v if isinstance(v, bool) else f'{v:.2e}'}", flush=True)


results = Results()

# sampling and teacher forcing: the shipped captioner, 4 images x G = 3 captions
policy, proc = models.load_policy(models.SFT_CAPTIONER)
prompt = models.encode_prompts(proc, [shapes.world_item(i, "test")["image"] for i in range(4)])
on = {k: v.to(dev) for k, v in prompt.items()}
with torch.no_grad():
    policy.to(dev)
    kv = sample(policy, on, 3, 64, 0, static=False)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    static, again = (sample(policy, on, 3, 64, 0, static=True) for _ in range(2))
if dev.type == "cuda":  # compiled there: the first step, and one layer step for all layers
    results["sampling: the static step compiled as 2 graphs, not 1 per layer"] = \
        torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2
results["sampling: greedy static (compiled) == dynamic (eager)"] = bool(torch.equal(kv["tokens"], static["tokens"]))
results["sampling: a second static call (new buffers, graph recorded again) == the first"] = \
    bool(torch.equal(again["tokens"], static["tokens"]))


def amp_error():
    """Under bf16 autocast with fp32 weights (the trainer's setting): max |sampled log-prob - teacher-forced|."""
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        out = sample(policy, on, 3, 64, 1.0, seeds=[0, 1, 2, 3], static=True)
        pos, nxt = models.rope_positions(policy, on["input_ids"], on["attention_mask"], on["image_grid_thw"])
        h = models.completion_hidden(policy, on["input_ids"], on["attention_mask"], pos, nxt, on["pixel_values"],
                                     on["image_grid_thw"], out["tokens"], out["mask"], 3)
        tf = token_logprobs(h, policy.get_output_embeddings().weight, out["tokens"][out["mask"].bool()])
    return (tf - out["logprobs"][out["mask"].bool()]).abs().max().item()


AMP = "sampling, bf16 autocast: max |static log-prob - teacher-forced|"
results[AMP] = amp_error()
if dev.type == "cuda":  # each rollout's buffers and graph are freed when it returns; one compile per new shape
    with torch.no_grad():
        graphs, base = torch._dynamo.utils.counters["stats"]["unique_graphs"], torch.cuda.memory_allocated()
        for n in [64] * 10 + [200] * 10:  # the caption length grows past its 128-rounded buffer once
            sample(policy, on, 3, n, 0, static=True)
    results["sampling: 20 more rollouts leave no memory allocated"] = torch.cuda.memory_allocated() <= base
    results["sampling: ... and compile once more (the new length)"] = \
        torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
tokens, mask = kv["tokens"], kv["mask"]
D = policy.config.get_text_config().hidden_size
weights = torch.randn(int(mask.sum()), D, generator=torch.Generator().manual_seed(0))  # a fixed linear readout
for name, checkpointing in (("packed", False), ("one sequence (checkpointing)", True)):
    h, grads = {}, {}
    for d in (torch.device("cpu"), dev):
        policy.to(d).zero_grad()
        if checkpointing:  # completion_hidden's other path: prompt and packed captions in one forward
            policy.activation_checkpointing_enable()
        p = {k: v.to(d) for k, v in prompt.items()}
        pos, nxt = models.rope_positions(policy, p["input_ids"], p["attention_mask"], p["image_grid_thw"])
        out = models.completion_hidden(policy, p["input_ids"], p["attention_mask"], pos, nxt, p["pixel_values"],
                                       p["image_grid_thw"], tokens.to(d), mask.to(d), 3)
        (out * weights.to(d)).sum().backward()  # the backward the trainer runs, through the same masks
        h[d.type] = out.detach().cpu()
        grads[d.type] = {n: q.grad.to("cpu", copy=True) for n, q in policy.named_parameters() if q.grad is not None}
        policy.activation_checkpointing_disable()
    results[f"teacher forcing, {name}: max |state difference|"] = (h["cpu"] - h[dev.type]).abs().max().item()
    results[f"teacher forcing, {name}: max gradient difference / gradient scale"] = max(
        ((grads["cpu"][n] - grads[dev.type][n]).abs().max() / grads["cpu"][n].abs().max().clamp(min=1e-12)).item()
        for n in grads["cpu"])

# the trainer's loss: fused log-probs + GRPO loss, and the entropy, at Qwen's vocabulary (N = 600, D = 256)
g = torch.Generator().manual_seed(1)
h0, W0 = torch.randn(600, 256, generator=g), torch.randn(151936, 256, generator=g) * 0.05
y, adv = torch.randint(0, 151936, (600,), generator=g), torch.randn(600, generator=g)  # a caption per token
lp, loss, gh, gW, ent = {}, {}, {}, {}, {}
for d in (torch.device("cpu"), dev):
    h, W = h0.to(d).detach().requires_grad_(), W0.to(d).detach().requires_grad_()
    old = torch.full((600, 1), -12.0, device=d)  # old log-probs: ratios far from 1, so the clip is exercised
    lp_d, loss_d, ent_d = logprobs_and_loss(h, W, y.to(d), flat_token_loss(old, adv.to(d), torch.ones(600, 1, device=d),
                                                                           600), temperature=0.7, entropy=True)
    loss_d.backward()
    lp[d.type], loss[d.type], gh[d.type], gW[d.type] = lp_d.cpu(), loss_d.item(), h.grad.cpu(), W.grad.cpu()
    ent[d.type] = ent_d.cpu()
rel = lambda a, b: ((a - b).abs().max() / a.abs().max()).item()  # noqa: E731
results["loss: max |log-prob difference|"] = (lp["cpu"] - lp[dev.type]).abs().max().item()
results["loss: loss and gradient differences / their scale"] = max(
    abs(loss["cpu"] - loss[dev.type]) / abs(loss["cpu"]), rel(gh["cpu"], gh[dev.type]), rel(gW["cpu"], gW[dev.type]))
results["loss: max |entropy difference|"] = (ent["cpu"] - ent[dev.type]).abs().max().item()

# the judge: the shipped (cloze) judge, and a random one with single-token letters for the letter format
rng = random.Random(0)
items = [shapes.world_item(i, "test") for i in range(6)]
captions = [shapes.human_caption(it["scene"], rng) for it in items for _ in range(2)]
questions = [{**q, "options": judge.shuffle_options(q, rng)[0]} for it in items for _ in range(2)
             for q in rng.sample(it["questions"], 4)]
rows_c = [c for c in captions for _ in range(4)]
letter_tok = models.letter_tokenizer()
for fmt, (jm, jtok) in (("cloze", models.load_judge(models.JUDGE)[:2]),
                        ("letter", models.build_tiny_judge(letter_tok))):
    z = {}
    for d in (torch.device("cpu"), dev):
        z[d.type] = torch.cat(judge.option_logits(jm.to(d).eval(), jtok, rows_c, questions, fmt)).cpu()
    results[f"judge, {fmt}: max |logit difference|"] = (z["cpu"] - z[dev.type]).abs().max().item()

# the decode options, not yet defaults (never compiled on a GPU so far): an error is a failed check, printed with
# the others, not the end of the script
policy.to(dev).eval().zero_grad(set_to_none=True)
AMPS = [AMP]
for variant, fuse in (("flex attention", False), ("flex attention, q/k/v and gate/up fused", True)):
    KVDecoder.flex, KVDecoder.fuse = True, fuse
    try:
        with torch.no_grad():
            out = sample(policy, on, 3, 64, 0, static=True)
        results[f"sampling: greedy static with {variant} == dynamic"] = bool(torch.equal(kv["tokens"], out["tokens"]))
        AMPS.append(f"sampling, {variant}, bf16 autocast: max |static log-prob - teacher-forced|")
        results[AMPS[-1]] = amp_error()
    except Exception as e:
        results[f"sampling, {variant}: {type(e).__name__}: {str(e)[:300]}"] = False
KVDecoder.flex = KVDecoder.fuse = False

tolerance = lambda k: 0.1 if k in AMPS else args.atol  # noqa: E731
ok = all(v is True or (not isinstance(v, bool) and v <= tolerance(k)) for k, v in results.items())
name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
print(f"{'all checks passed' if ok else 'A CHECK FAILED'} on {name} (tolerance {args.atol})")
print(json.dumps({"bench": "check_gpu", "device": name, "ok": ok, **results}))
sys.exit(0 if ok else 1)
