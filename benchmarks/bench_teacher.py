"""The update's teacher-forced pass (models.completion_hidden, forward + backward) against the per-row batch a
trainer without prompt sharing runs (every caption row with its own copy of the prompt, as TRL's), with and without
gradient checkpointing.

    python benchmarks/bench_teacher.py                    # CPU: a random 512-wide policy, 448-pixel images (P = 282)
    python benchmarks/bench_teacher.py --device cuda --hidden 2048 --layers 36 --image-side 896 --new-tokens 256

B images x G captions of L tokens (no caption stops early), random Qwen2.5-VL policy (built from a config), fp32 on
a CPU, fp32 weights under bf16 autocast on a GPU. Four ways: per-row (B*G rows of P + L tokens) and packed (each
image's prompt once, its captions after it: B*P + B*G*L tokens), each plain and under gradient checkpointing (the
one-GPU recipe's setting: packed then runs prompt and captions as one sequence per image, no cache). Reported:
seconds of forward + backward of a fixed readout of the states (median of --repeats, interleaved after a warm-up),
and the largest state difference from per-row. The last line is one JSON object; "speedup" is packed over per-row
under checkpointing.
"""
import argparse
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from caprl_mini import models, shapes  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--hidden", type=int, default=512, help="the language model's width (3B: 2048)")
parser.add_argument("--layers", type=int, default=4, help="decoder layers (3B: 36)")
parser.add_argument("--images", type=int, default=2, help="B images (the trainer's --micro-batch-images)")
parser.add_argument("--group-size", type=int, default=8, help="G captions per image")
parser.add_argument("--new-tokens", type=int, default=64, help="L caption tokens")
parser.add_argument("--image-side", type=int, default=448, help="square images: (side / 28)^2 image tokens")
parser.add_argument("--repeats", type=int, default=3, help="timed runs of each way, interleaved (after a warm-up)")
parser.add_argument("--threads", type=int, default=2, help="CPU threads")
parser.add_argument("--device", default="cpu", help="cpu or cuda")
args = parser.parse_args()
if args.hidden % 128:  # heads of 64, two key/value heads
    parser.error("--hidden must be a multiple of 128")
torch.set_num_threads(args.threads)
dev, B, G, L = torch.device(args.device), args.images, args.group_size, args.new_tokens
gpu = dev.type == "cuda"
model, proc = models.build_tiny_policy(models.letter_tokenizer(), seed=0, hidden=args.hidden, layers=args.layers,
                                       heads=args.hidden // 64, kv_heads=2)
models.prepare_for_training(model)
model.to(dev)
proc.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 2048 * 2048}  # the images' own size
images = [shapes.world_item(i, "test")["image"].resize((args.image_side,) * 2) for i in range(B)]
prompt = {k: v.to(dev) for k, v in models.encode_prompts(proc, images).items()}
P = prompt["input_ids"].shape[1]
pos, nxt = models.rope_positions(model, prompt["input_ids"], prompt["attention_mask"], prompt["image_grid_thw"])
g = torch.Generator().manual_seed(0)
comp = torch.randint(0, 100, (B * G, L), generator=g).to(dev)
cmask = torch.ones(B * G, L, dtype=torch.long, device=dev)
readout = torch.randn(B * G * L, args.hidden, generator=g).to(dev)


def per_row():
    pr = {k: prompt[k].repeat_interleave(G, 0) for k in ("input_ids", "attention_mask")}
    ids, am, ps = models.with_completions(pr, pos.repeat_interleave(G, 1), nxt.repeat_interleave(G), comp, cmask)
    h, _ = models.policy_hidden(model, ids, am, ps, prompt["pixel_values"], prompt["image_grid_thw"], repeat=G,
                                prompt_len=P)
    return h[:, P - 1:P - 1 + L][cmask.bool()]


def packed():
    return models.completion_hidden(model, prompt["input_ids"], prompt["attention_mask"], pos, nxt,
                                    prompt["pixel_values"], prompt["image_grid_thw"], comp, cmask, G)


def sync():
    if gpu:
        torch.cuda.synchronize()


ways = {"per-row": per_row, "packed": packed, "per-row, checkpointing": per_row, "packed, checkpointing": packed}
times, states = {w: [] for w in ways}, {}
for r in range(args.repeats + 1):
    for w, f in ways.items():
        if "checkpointing" in w:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        model.zero_grad(set_to_none=True)
        sync()
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=gpu):
            h = f()
            (h.float() * readout).sum().backward()
        sync()
        if r:  # round 0 warms up
            times[w].append(time.perf_counter() - t)
        print(f"round {r} {w}: {time.perf_counter() - t:.3f} s", flush=True)  # a run cut short still shows these
        states[w] = h.detach().float()
        model.gradient_checkpointing_disable()
t = {w: statistics.median(v) for w, v in times.items()}
error = {w: (states[w] - states["per-row"]).abs().max().item() for w in ways}
name = torch.cuda.get_device_name() if gpu else f"CPU, {args.threads} threads"
print(f"teacher forcing, forward + backward: B={B} images x G={G} captions x L={L} tokens, prompt P={P}, "
      f"{args.layers} layers x {args.hidden} wide, {'fp32 weights, bf16 autocast' if gpu else 'fp32'}, {name}")
print(f"{'way':24s} {'tokens':>7s} {'seconds':>8s} {'max |state - per-row|':>22s}")
tokens = {"per-row": B * G * (P + L), "packed": B * (P + G * L)}
for w in ways:
    print(f"{w:24s} {tokens[w.split(',')[0]]:7d} {t[w]:8.3f} {error[w]:22.2e}")
speedup = t["per-row, checkpointing"] / t["packed, checkpointing"]
print(f"packed over per-row: {t['per-row'] / t['packed']:.2f}x plain, {speedup:.2f}x under checkpointing")
print(json.dumps({"bench": "teacher", "device": name, "images": B, "group_size": G, "new_tokens": L, "prompt": P,
                  "hidden": args.hidden, "layers": args.layers, "seconds": t, "max_state_difference": error,
                  "speedup": speedup}))
