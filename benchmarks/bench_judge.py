"""The reward's MCQ scoring: letter scoring with shared caption prefixes (caprl_mini/judge.py) against
generate-based scoring as the paper's reward server does it.

    python benchmarks/bench_judge.py                      # CPU: random judges of the shipped shape and 512-wide
    python benchmarks/bench_judge.py --device cuda        # GPU: random Qwen2.5-3B-shaped judge, bf16
    python benchmarks/bench_judge.py --caption-tokens 300 --questions 16

Workload: C captions of about --caption-tokens tokens (full captions of the built-in world, several scenes
concatenated), N questions each (drawn with replacement from the world's MCQs), posed as the reward poses them to
a real judge (--format caprl: the paper's prompt, shuffled lettered options + abstain, the assistant turn
pre-filled with "The answer is"), argmax reading.
  judge.py  `score_questions(..., "caprl", "argmax")`: each caption's prefix once into a KV cache (the instruction
            once for all), every question a short row over it, the letter logits read at its last token.
  generate  per (caption, question) the same prompt ids (judge.prompt_ids, same option shuffle), left-padded in
            batches of --gen-batch, `generate(max_new_tokens=10, do_sample=False, repetition_penalty=1.0)` (no
            penalty from a real judge's generation config), the first letter A-J parsed.
            Also shown: the same with 1 new token, the least any generate-based scorer can do.
Reported: seconds (median of --repeats, interleaved), questions per second, and the max |difference| between
judge.py's option logits and generate's first-step logits at the letter tokens (both compute the same thing).
The shipped judge's tokenizer splits " A" into two tokens, so the letter format cannot run on it: the judges here
are random-init Qwen2 models (speed does not depend on weight values) with the tests' tokenizer, in which the
letters are single tokens. The last line is one JSON object with the figures ("speedup": judge.py vs generate
with 10 new tokens, the smallest over the models).
"""
import argparse
import json
import random
import re
import statistics
import sys
import time

import torch
from transformers import Qwen2ForCausalLM

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from caprl_mini import judge, models, shapes  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--models", default="", help="comma list of tiny (the shipped judge's shape), random "
                                                 "(512 wide, 8 layers), 3b (default: tiny,random on CPU, 3b on GPU)")
parser.add_argument("--captions", type=int, default=0, help="C captions (0: 8 on CPU, 64 on GPU)")
parser.add_argument("--questions", type=int, default=8, help="N questions per caption")
parser.add_argument("--format", default="caprl", choices=["caprl", "letter"],
                    help="caprl: the paper's prompt (instruction + two worked examples, ~300 tokens shared with the "
                    "caption); letter: the built-in world's short prompt")
parser.add_argument("--caption-tokens", type=int, default=200, help="about this many tokens per caption")
parser.add_argument("--gen-batch", type=int, default=0, help="rows per generate call, left-padded (0: 64 on CPU, "
                    "where more was slower; 256 on GPU, the rows judge.py scores per forward)")
parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved (after one warm-up)")
parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
args = parser.parse_args()
dev = torch.device(args.device)
torch.set_num_threads(args.threads)
gpu = dev.type == "cuda"
if not gpu:  # freed memory kept for reuse, as the trainer runs (models.pick_device); the same for both methods
    models.keep_freed_memory()
names = (args.models or ("3b" if gpu else "tiny,random")).split(",")
C, N = args.captions or (64 if gpu else 8), args.questions
args.gen_batch = args.gen_batch or (256 if gpu else 64)
dtype = torch.bfloat16 if gpu else torch.float32

# the tests' tokenizer: the world's text plus lettered options, so that " A" ... " E" are single tokens
tok = models.letter_tokenizer()
rng = random.Random(0)
captions, rows_q = [], []
for c in range(C):
    parts, j = [], 0
    while len(tok.encode(" ".join(parts))) < args.caption_tokens:  # scenes c*100, c*100+1, ... back to back
        parts.append(shapes.full_caption(shapes.make_scene(c * 100 + j, "test"), rng))
        j += 1
    pool = shapes.world_item(c * 100, "test")["questions"]  # the first scene's MCQs
    captions.append(" ".join(parts))
    rows_q += [rng.choice(pool) for _ in range(N)]
rows_c = [cap for cap in captions for _ in range(N)]  # (C*N,) rows grouped by caption, as caption_rewards
cap_tokens = statistics.mean(len(tok.encode(cap)) for cap in captions)


def build(name):
    if name == "3b":  # Qwen2.5-3B-Instruct's published shapes (config.json on the hub), the tiny tokenizer's ids
        cfg = models.tiny_judge_config(tok)
        cfg.update(dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
        cfg.layer_types = ["full_attention"] * 36
        torch.manual_seed(0)
        with torch.device(dev):  # initialise on the device: 3B fp32 parameters on the host would be 12 GB
            model = Qwen2ForCausalLM._from_config(cfg, dtype=dtype)
    else:
        model, _ = models.build_tiny_judge(tok, **(dict(hidden=512, layers=8, heads=8) if name == "random" else {}))
    return model.to(dev, dtype).eval()


def generate_scores(model, new_tokens, posed, gold, return_logits=False):
    """The reward server's way: every (caption, question) prompt in full, batched generate, parse the letter."""
    scores, first_logits = [], []
    for i in range(0, len(rows_c), args.gen_batch):
        prompts = [sum(judge.prompt_ids(tok, c, q["question"], q["options"], args.format), [])
                   for c, q in zip(rows_c[i:i + args.gen_batch], posed[i:i + args.gen_batch])]
        T = max(map(len, prompts))
        ids = torch.tensor([[tok.pad_token_id] * (T - len(p)) + p for p in prompts], device=dev)  # left-padded
        am = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=dev)
        out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=new_tokens, do_sample=False,
                             repetition_penalty=1.0, pad_token_id=tok.pad_token_id, return_dict_in_generate=True,
                             output_logits=return_logits)
        for k, text in enumerate(tok.batch_decode(out.sequences[:, T:], skip_special_tokens=True)):
            m = re.search(f"[{judge.LETTERS}]", text)
            scores.append(float(m is not None and judge.LETTERS.index(m.group(0)) == gold[i + k]))
        if return_logits:
            first_logits.append(out.logits[0].float())
    return (scores, torch.cat(first_logits)) if return_logits else scores


# the same option shuffle as score_questions draws from a Random(0): identical prompts for every method
shuffle_rng = random.Random(0)
shuffled = [judge.shuffle_options(q, shuffle_rng) for q in rows_q]
posed = [{**q, "options": o} for q, (o, _) in zip(rows_q, shuffled)]
gold = [g for _, g in shuffled]
results = {}
start = time.perf_counter()
for name in names:
    model = build(name)
    print(f"[{time.perf_counter() - start:.0f}s] {name} built", file=sys.stderr, flush=True)
    with torch.no_grad():  # same work, same numbers: judge.py's option logits vs generate's first-step logits
        z = judge.option_logits(model, tok, rows_c, posed, args.format)
        _, first = generate_scores(model, 1, posed, gold, return_logits=True)
        ids = [[judge.letter_id(tok, judge.LETTERS[j]) for j in range(len(q["options"]))] for q in posed]
        err = max((zi.cpu() - f[i].cpu()).abs().max().item() for zi, f, i in zip(z, first, ids))
    runs = {"judge.py": lambda: judge.score_questions(model, tok, rows_c, rows_q, args.format, "argmax",
                                                      random.Random(0)),
            "generate, 10 tokens": lambda: generate_scores(model, 10, posed, gold),
            "generate, 1 token": lambda: generate_scores(model, 1, posed, gold)}
    times = {k: [] for k in runs}
    for r in range(args.repeats + 1):  # the first round warms up and is not counted
        for k, fn in runs.items():
            if gpu:
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                scores = fn()
            if gpu:
                torch.cuda.synchronize()
            if r:
                times[k].append(time.perf_counter() - t)
            assert len(scores) == C * N
            print(f"[{time.perf_counter() - start:.0f}s] round {r} {k}", file=sys.stderr, flush=True)
    t = {k: statistics.median(v) for k, v in times.items()}
    results[name] = {"seconds": t, "questions_per_s": {k: C * N / v for k, v in t.items()},
                     "speedup": t["generate, 10 tokens"] / t["judge.py"],
                     "speedup_vs_1_token": t["generate, 1 token"] / t["judge.py"], "max_logit_diff": err}
    del model

name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
print(f"{args.format} prompt, C={C} captions x N={N} questions, captions {cap_tokens:.0f} tokens (mean), "
      f"{str(dtype)[6:]}, {name}")
print(f"{'model':7s} {'method':20s} {'seconds':>8s} {'questions/s':>11s} {'judge.py speedup':>16s}")
for k, v in results.items():
    for m, s in v["seconds"].items():
        print(f"{k:7s} {m:20s} {s:8.3f} {v['questions_per_s'][m]:11.1f} {s / v['seconds']['judge.py']:15.2f}x")
    print(f"{k:7s} max |judge.py option logit - generate first-step logit|: {v['max_logit_diff']:.1e}")
print(json.dumps({"bench": "judge", "device": name, "captions": C, "questions": N, "caption_tokens": cap_tokens,
                  "dtype": str(dtype)[6:], "models": results,
                  "speedup": min(v["speedup"] for v in results.values())}))
