"""GRPO rollouts: the project's sampler (caprl_mini/sampling.py) against `model.generate` on the same model.

    python benchmarks/bench_sampling.py                   # CPU: shipped captioner + random 512-wide, 8-layer policy
    python benchmarks/bench_sampling.py --device cuda     # GPU: random Qwen2.5-VL-3B-shaped policy, bf16
    python benchmarks/bench_sampling.py --models random --new-tokens 32 --repeats 3

    python benchmarks/bench_sampling.py --models shipped --stop-at-eos 1   # the real workload: captions end at EOS

Workload: B images x G captions each, temperature 1, exactly --new-tokens new tokens per caption (EOS ignored by both:
`stop_at_eos=False` / `min_new_tokens`), so both do the same decode work. generate gets `num_return_sequences=G,
do_sample=True, top_k=0, top_p=1, repetition_penalty=1` (plain sampling, as the sampler). The sampler runs the vision
tower and the prompt once per image and keeps the prompt's cache once per image (an image's G rows read it together);
generate expands the prompt G times before its prefill. On a GPU the sampler decodes with a fixed batch and a compiled
step recorded as a CUDA graph (KVDecoder, static=True; the first call compiles, in the warm-up round); "sampler-flex" is
the same static step with its attention as one flex_attention kernel a layer (KVDecoder.flex) in place of the matmuls,
softmax and layout copies (~8 kernels a layer), "sampler-fused" that and q/k/v and gate/up as one product each
(KVDecoder.fuse); "sampler-dynamic" is the CPU path (rows leave at EOS, eager) on the GPU, to show what the graph buys;
"sampler-cast" (GPU, --amp 1) is the static step reading the fp32 parameters, autocast casting each matrix inside the
compiled step every token (as before 2026-11-27 21:00 UTC; the default makes bf16 copies once a call). With
--stop-at-eos 1 both stop captions at EOS; the sampler drops finished rows, generate pads them until the last row ends
(the two sample different captions: compare tokens/s, caption tokens only).
Reported: seconds (median of --repeats, all runs interleaved), new tokens per second, the prefill (time with 1
new token), the decode step (time(L) - time(1)) / (L - 1), and the memory floor of a step: bytes of language-model
weights + KV cache read per step over a measured copy bandwidth. Models other than the shipped captioner are
random-init (no download; speed does not depend on weight values). The last line is one JSON object with the
figures ("speedup": the default sampler's tokens/s over generate's, the smallest over the models).
"""
import argparse
import itertools
import json
import statistics
import sys
import time

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from caprl_mini import models, shapes  # noqa: E402
from caprl_mini import sampling  # noqa: E402
from caprl_mini.sampling import sample  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--models", default="", help="comma list of shipped, random, 3b (default: shipped,random on "
                                                 "CPU, 3b on GPU)")
parser.add_argument("--images", type=int, default=8, help="B images per rollout batch")
parser.add_argument("--group-size", type=int, default=8, help="G captions per image")
parser.add_argument("--new-tokens", type=int, default=0, help="L new tokens per caption (0: 64 on CPU, 256 on GPU)")
parser.add_argument("--image-size", type=int, default=0, help="square image side in pixels (0: 84 on CPU, "
                                                              "448 on GPU = 256 image tokens)")
parser.add_argument("--stop-at-eos", type=int, default=0, help="1: both stop a caption at EOS (the real workload; "
                                                                 "tokens/s counts caption tokens), 0: fixed length")
parser.add_argument("--methods", default="",
                    help="comma list of generate, sampler, sampler-flex, sampler-fused, sampler-dynamic, sampler-cast "
                         "(default: the first four on GPU, two on CPU)")
parser.add_argument("--amp", type=int, default=0, help="1: fp32 weights under bf16 autocast (the trainer's setting on "
                                                         "a GPU; default: bf16 weights on a GPU, fp32 on a CPU)")
parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved (after one warm-up)")
parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
parser.add_argument("--profile", default="", help="folder: also profile 16 decode steps per model, the compiled step"
                                                  " launched kernel by kernel (torch.profiler): the ops' table and "
                                                  "the kernels' time per step")
args = parser.parse_args()
dev = torch.device(args.device)
torch.set_num_threads(args.threads)
gpu = dev.type == "cuda"
names = (args.models or ("3b" if gpu else "shipped,random")).split(",")
B, G = args.images, args.group_size
L = args.new_tokens or (256 if gpu else 64)
side = args.image_size or (448 if gpu else 84)
assert L >= 2, "the decode step is measured as (time(L) - time(1)) / (L - 1)"
dtype = torch.bfloat16 if gpu and not args.amp else torch.float32  # the weights'
compute = torch.bfloat16 if gpu or args.amp else torch.float32  # the matmuls' and the KV cache's
amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bool(args.amp))


def qwen25_vl_3b_config(tok):
    """Qwen2.5-VL-3B-Instruct's published shapes (config.json on the hub), with the tiny tokenizer's special ids."""
    cfg = models.tiny_policy_config(tok)  # special token ids of the tokenizer used here
    cfg.text_config.update(dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                    "mrope_section": [16, 24, 24]}))
    cfg.text_config.layer_types = ["full_attention"] * 36
    cfg.vision_config.update(dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                  out_hidden_size=2048, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]))
    return cfg


def build(name):
    """(model, processor) on dev in dtype."""
    model, proc = models.load_policy(models.SFT_CAPTIONER)  # the shipped captioner and its tokenizer
    ip = models.image_processor(min_pixels=side * side, max_pixels=side * side)
    proc = models.ImageProcessorOnly(image_processor=ip, tokenizer=proc.tokenizer, chat_template=proc.chat_template)
    if name == "random":
        model, _ = models.build_tiny_policy(proc.tokenizer, hidden=512, layers=8, heads=8)
    elif name == "3b":
        torch.manual_seed(0)
        with torch.device(dev):  # initialise on the device: 3.8B fp32 parameters on the host would be 15 GB
            model = Qwen2_5_VLForConditionalGeneration._from_config(qwen25_vl_3b_config(proc.tokenizer), dtype=dtype)
    return model.to(dev, dtype).eval(), proc


def sync():
    if gpu:
        torch.cuda.synchronize()


def copy_bandwidth():
    """Bytes per second of a large on-device copy (each byte read once and written once)."""
    x = torch.empty(2**28 if gpu else 2**26, device=dev)  # 1 GiB on GPU, 256 MiB on CPU
    y = torch.empty_like(x)
    y.copy_(x)
    best = float("inf")
    for _ in range(5):
        sync()
        t = time.perf_counter()
        y.copy_(x)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * x.numel() * x.element_size() / best


def rollout(model, prompt, mm, seed, method, n):
    """(R, n) new tokens and how many of them are caption tokens (up to and including EOS)."""
    if method.startswith("sampler"):  # "sampler": the default decode of the device, "sampler-dynamic": CPU's on GPU
        copies = sampling.needs_copies  # "sampler-cast": the static step reads the parameters (autocast casts them)
        sampling.needs_copies = (lambda *a: False) if method == "sampler-cast" else copies
        sampling.KVDecoder.flex = method in ("sampler-flex", "sampler-fused")  # fixed, flex_attention
        sampling.KVDecoder.fuse = method == "sampler-fused"  # and q/k/v, gate/up fused
        try:
            out = sample(model, prompt, G, n, 1.0, seeds=[next(seed) for _ in range(B)],
                         stop_at_eos=bool(args.stop_at_eos),
                         static={"sampler-dynamic": False, "sampler-flex": True, "sampler-fused": True}.get(method))
        finally:
            sampling.needs_copies, sampling.KVDecoder.flex, sampling.KVDecoder.fuse = copies, False, False
        return out["tokens"], int(out["mask"].sum())
    fixed = {} if args.stop_at_eos else {"min_new_tokens": n}  # min_new_tokens masks EOS until n tokens
    seq = model.generate(**prompt, mm_token_type_ids=mm, max_new_tokens=n, do_sample=True, temperature=1.0, top_k=0,
                         top_p=1.0, repetition_penalty=1.0, num_return_sequences=G,
                         **fixed)[:, prompt["input_ids"].shape[1]:]
    eos = model.generation_config.eos_token_id  # what generate stops at (the sampler too)
    hit = torch.isin(seq, torch.tensor(eos if isinstance(eos, list) else [eos], device=seq.device))  # padded after
    return seq, int(torch.where(hit.any(1), hit.int().argmax(1) + 1, n).sum())


def profile(model, prompt, mm, seed, name, steps=16):
    """The fixed decode step's kernels: a rollout of `steps` new tokens under torch.profiler with the compiled step
    launched kernel by kernel (no CUDA graph: a replay hides its kernels from the profiler; each kernel's own time
    is the same), its ops by device time into <--profile>/sampler_<name>.txt, and their time per step, to set
    against the measured step: what the kernels take, and what the gaps between them do."""
    import os
    from torch.profiler import ProfilerActivity
    os.makedirs(args.profile, exist_ok=True)
    init = sampling.KVDecoder.__init__

    def unrecorded(self, *a, **k):
        init(self, *a, **k)
        if self.graphed:
            self.graphed = False  # the compiled step itself, launched kernel by kernel
    sampling.KVDecoder.__init__ = unrecorded
    device_ms = {}  # new tokens -> the rollout's kernel time: steps - 1 decode steps apart, the prefill the same
    try:
        for n in (steps, 1, steps, 1):  # the first two compile the step for this length if it is a new shape
            with torch.profiler.profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * gpu) as prof:
                with torch.no_grad(), amp:
                    rollout(model, prompt, mm, seed, "sampler", n)
                sync()
            ops = prof.key_averages()
            device_ms[n] = sum(e.self_device_time_total for e in ops if e.device_type.name == "CUDA") / 1e3
            if n == steps:
                with open(os.path.join(args.profile, f"sampler_{name}.txt"), "w") as f:
                    f.write(ops.table(sort_by="self_device_time_total" if gpu else "self_cpu_time_total",
                                      row_limit=60))
    finally:
        sampling.KVDecoder.__init__ = init
    print(f"profile ({name}): {args.profile}/sampler_{name}.txt (a rollout of {steps} new tokens); the kernels' own "
          f"time per decode step {(device_ms[steps] - device_ms[1]) / (steps - 1):.2f} ms "
          f"(against the measured step above: the rest is gaps between kernels)")


bandwidth = copy_bandwidth()
results = {}
methods = args.methods.split(",") if args.methods else ["generate", "sampler"] + ["sampler-flex", "sampler-fused"] * gpu
if methods[0] != "generate" or len(methods) < 2:  # the ratios are over generate's tokens/s
    parser.error("--methods: generate first, then at least one of the samplers")
if {"sampler-flex", "sampler-fused"} & set(methods) and not gpu:  # eager on a CPU: flex_attention's unfused reference
    parser.error("--methods sampler-flex, sampler-fused: only with --device cuda")
if "sampler-cast" in methods and not (gpu and args.amp):  # on a CPU the static step runs eagerly: autocast's cache
    parser.error("--methods sampler-cast: only with --device cuda --amp 1")  # casts each matrix once a call anyway
for name in names:
    model, proc = build(name)
    images = [shapes.world_item(i, "test")["image"].resize((side, side)) for i in range(B)]
    prompt = {k: v.to(dev) for k, v in models.encode_prompts(proc, images).items()}
    prompt["pixel_values"] = prompt["pixel_values"].to(dtype)
    mm = (prompt["input_ids"] == model.config.image_token_id).int()
    seed = itertools.count()  # fresh per-image seeds for every sampler call
    runs = [(m, n) for m in methods for n in (L, 1)]  # 1 token: the prefill (and one lm head)
    times, rates = {r: [] for r in runs}, {r: [] for r in runs}
    for r in range(args.repeats + 1):  # the first round warms up (allocator, kernels) and is not counted
        for m, n in list(runs):
            if m not in methods:
                continue
            sync()
            t = time.perf_counter()
            try:
                with torch.no_grad(), amp:
                    out, n_tokens = rollout(model, prompt, mm, seed, m, n)
            except Exception as e:  # an option never compiled on a GPU before: left out, the others still timed
                if r or m not in ("sampler-flex", "sampler-fused"):
                    raise
                print(f"{name}: {m} failed in the warm-up round and is left out: {type(e).__name__}: {e}"[:2000],
                      file=sys.stderr)
                methods.remove(m)
                continue
            sync()
            t = time.perf_counter() - t
            assert out.shape[0] == B * G and (args.stop_at_eos or n_tokens == B * G * n), (m, out.shape, n_tokens)
            print(f"{name} round {r}{' (warm-up)' * (r == 0)}: {m}, {n} new tokens, {t:.3f} s", file=sys.stderr)
            if r:
                times[m, n].append(t)
                rates[m, n].append(n_tokens / t)
    if args.profile:
        profile(model, prompt, mm, seed, name)
    t = {k: statistics.median(v) for k, v in times.items() if v}  # a method left out has no times
    rate = {m: statistics.median(rates[m, L]) for m in methods}
    # decode-step floor: every language-model weight is read once per step in the compute dtype (the tied
    # unembedding is the embedding matrix, counted once), plus the KV cache, which grows from P to P + L - 1 tokens
    tc = model.config.text_config
    weights = sum(p.numel() for p in model.model.language_model.parameters()) * torch.finfo(compute).bits // 8
    P = prompt["input_ids"].shape[1]
    kv = 2 * tc.num_hidden_layers * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) \
        * (P + L / 2) * B * G * torch.finfo(compute).bits // 8
    results[name] = {"seconds": {f"{m}, L={n}": v for (m, n), v in t.items()}, "tokens_per_s": rate,
                     "speedup": rate.get("sampler", rate.get("sampler-dynamic")) / rate["generate"], "prompt_tokens": P,
                     "prefill_s": {m: t[m, 1] for m in methods},
                     "step_s": {m: (t[m, L] - t[m, 1]) / (L - 1) for m in methods}
                     if not args.stop_at_eos else None,  # captions of different lengths: no per-step time
                     "step_floor_s": (weights + kv) / bandwidth, "weight_bytes": weights, "kv_bytes": kv}
    del model

name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
precision = "fp32 weights, bf16 autocast" if args.amp else str(dtype)[6:]
print(f"sampling, B={B} images x G={G} captions x L={L} new tokens{' (EOS ends a caption)' if args.stop_at_eos else ''}"
      f", temperature 1, {precision}, {name}, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
print(f"{'model':8s} {'prompt':>6s} {'method':15s} {'seconds':>8s} {'tokens/s':>9s} {'prefill s':>9s} "
      f"{'step ms':>8s} {'floor ms':>8s}")
for k, v in results.items():
    for m in methods:
        step = f"{v['step_s'][m] * 1e3:8.2f}" if v["step_s"] else f"{'-':>8s}"
        print(f"{k:8s} {v['prompt_tokens']:6d} {m:15s} {v['seconds'][f'{m}, L={L}']:8.3f} {v['tokens_per_s'][m]:9.0f} "
              f"{v['prefill_s'][m]:9.3f} {step} {v['step_floor_s'] * 1e3:8.2f}")
    for m in methods[1:]:
        print(f"{k:8s} {m}: {v['tokens_per_s'][m] / v['tokens_per_s']['generate']:.2f}x generate's tokens/s")
print("prefill: time with 1 new token; step: (time(L) - time(1)) / (L - 1); floor: (LM weights + mean KV cache) "
      "bytes / copy bandwidth")
print(json.dumps({"bench": "sampling", "device": name, "images": B, "group_size": G, "new_tokens": L,
                  "stop_at_eos": args.stop_at_eos, "image_size": side, "dtype": precision,
                  "copy_bandwidth": bandwidth, "models": results,
                  "speedup": min(v["speedup"] for v in results.values())}))
