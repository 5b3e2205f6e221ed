"""One GRPO step of train_grpo.py against TRL's GRPOTrainer doing the same work, in captions trained per second.

    /work/trl-venv/bin/python benchmarks/bench_trl.py              # CPU: 4 runs of 4 steps each side (5-10 min)
    /work/trl-venv/bin/python benchmarks/bench_trl.py --threads 1   # on a machine shared with other jobs
    python benchmarks/bench_trl.py --policy P --judge J --data qa.jsonl --images-per-step 4 --max-new-tokens 256 \
        --micro-batch-images 1 --gradient-checkpointing 1 --zero-truncated 0 --rounds 1   # GPU, 3B-shaped models
        (benchmarks/run_gpu.sh, part trl: bench_real_step.py --write-only writes P, J and qa.jsonl)

TRL is not a dependency of the project: install it in a separate venv (benchmarks/README.md).
Same work on both sides: the shipped tiny captioner (Qwen2.5-VL) and judge (or --policy / --judge), B images x G
captions per step from the built-in world or --data (the same images at the same step on both sides), the chat
prompt (image + the caption instruction), sampling at temperature 1 with no top-k / top-p, stop at EOS or at
--max-new-tokens, reward = caption_rewards (N = 8 question draws, the judge's format and "prob" reading; built-in
world: reward types only, --data: all) times "not truncated" (the project's --zero-truncated, default 1),
group-std advantages, clip 0.2 / 0.28, token-level (DAPO) loss, beta 0, AdamW lr 1e-4 after a 10-step linear
warm-up, grad clip 1, one optimizer step per rollout, fp32 on a CPU, fp32 weights under bf16 autocast on a GPU (both
sides). --micro-batch-images M: both sides run the update in B / M micro-batches of M x G captions (TRL: per-device
batch M x G, B / M accumulation steps, one generation batch of B x G); without it the project runs its default (4)
and TRL one batch of B x G.
Both stop at EOS, so the captions each side samples differ: generated tokens per caption are reported next to
captions/s.
How each side runs: the project as `train_grpo.py --steps K --eval-images 0` in a subprocess, step_seconds read
from its metrics.jsonl; TRL in a child process of this script (--child), timed between consecutive optimizer steps.
The sides alternate run by run, the first step of each run is a warm-up and not counted; reported are the median
step and, as a check against other load on the machine, the fastest one. The last line is one JSON object.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = __file__.rsplit("/benchmarks/", 1)[0]
sys.path.insert(0, ROOT)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--rounds", type=int, default=4, help="runs of each side, interleaved")
parser.add_argument("--steps", type=int, default=4, help="GRPO steps per run; the first is a warm-up")
parser.add_argument("--images-per-step", type=int, default=8, help="B (the project's default)")
parser.add_argument("--group-size", type=int, default=8, help="G (the project's default)")
parser.add_argument("--max-new-tokens", type=int, default=64, help="caption length cap (the project's default)")
parser.add_argument("--threads", type=int, default=2, help="torch threads of each side")
parser.add_argument("--policy", default="", help="captioner folder (default: the shipped one)")
parser.add_argument("--judge", default="", help="judge folder (default: the shipped one)")
parser.add_argument("--data", default="", help="QA JSONL (default: the built-in world)")
parser.add_argument("--micro-batch-images", type=int, default=0, help="M (0: the project's default, TRL one batch)")
parser.add_argument("--gradient-checkpointing", type=int, default=0, help="1: on both sides")
parser.add_argument("--zero-truncated", type=int, default=1, help="1: a caption without EOS gets reward 0 (both)")
parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # run the TRL side, print its steps
parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
args = parser.parse_args()
B, G = args.images_per_step, args.group_size
M = args.micro_batch_images or B  # TRL's images per micro-batch (0: one batch of B x G)
assert B % M == 0, "--images-per-step must be a multiple of --micro-batch-images"
ENV = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}


def trl_child():
    """TRL's GRPOTrainer on the same model, data and reward; prints one JSON object per optimizer step."""
    import random
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from caprl_mini import shapes
    from caprl_mini.data import QAFile, World
    from caprl_mini.judge import caption_rewards
    from caprl_mini.models import CAPTION_INSTRUCTION, JUDGE, SFT_CAPTIONER, load_judge, load_policy, pick_device
    torch.set_num_threads(args.threads)
    torch.backends.cuda.enable_cudnn_sdp(False)  # as the project's side (models.prepare_for_training)
    device, dtype = pick_device()  # as train_grpo.py: the judge on it in dtype; the policy fp32 (+ bf16 autocast)
    # the processor explicitly: without torchvision AutoProcessor may return only a tokenizer
    model, proc = load_policy(args.policy or SFT_CAPTIONER)
    judge, jtok, meta = load_judge(args.judge or JUDGE, device, dtype)
    eos = model.generation_config.eos_token_id or model.config.text_config.eos_token_id  # as sampling.sample
    eos = eos if isinstance(eos, list) else [eos]
    world = QAFile(args.data) if args.data else World("train")
    types = None if args.data else shapes.REWARD_TYPES  # as train_grpo.py
    items = []  # train_grpo.py's images, step by step (B draws from (seed, step)); with
    for step in range(args.steps + 1):  # shuffle_dataset=False TRL's step s takes prompts s*B ... s*B+B-1: the same
        rng = random.Random(f"{args.seed}:images:{step}")
        items += [world[rng.randrange(len(world))] for _ in range(B)]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": CAPTION_INSTRUCTION}], "image": it["image"],
                               "idx": i} for i, it in enumerate(items)])
    clock = {"gen": 0.0, "reward": 0.0}
    generate = model.generate

    def timed_generate(*a, **k):  # TRL calls model.generate once per step for the whole (B*G) batch
        t = time.perf_counter()
        out = generate(*a, **k)
        clock["gen"] += time.perf_counter() - t
        return out
    model.generate = timed_generate

    def caprl_reward(completions, completion_ids, idx, **kwargs):
        t = time.perf_counter()
        caps = [c[-1]["content"].strip() for c in completions]
        r = caption_rewards(judge, jtok, caps, [items[i] for i in idx], 8, meta["format"], "prob",
                            random.Random(f"{args.seed}:reward:{idx[0]}"), types)
        if args.zero_truncated:
            r = [x * (ids[-1] in eos) for x, ids in zip(r.tolist(), completion_ids)]
        clock["reward"] += time.perf_counter() - t
        return r

    class StepClock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = self.t if hasattr(self, "t") else time.perf_counter()

        def on_step_end(self, a, state, control, **kw):  # step time = between consecutive optimizer steps
            now, m = time.perf_counter(), trainer._metrics["train"]
            print(json.dumps({"step_seconds": now - self.t, "gen_seconds": clock["gen"],
                              "reward_seconds": clock["reward"], "tokens": m["completions/mean_length"][-1],
                              "reward": m["reward"][-1]}), flush=True)
            self.t, clock["gen"], clock["reward"] = now, 0.0, 0.0

    cfg = GRPOConfig(  # train_grpo.py's defaults, one optimizer step per generation batch of B * G completions
        output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=M * G, num_generations=G,
        gradient_accumulation_steps=B // M, steps_per_generation=B // M, num_iterations=1,
        max_completion_length=args.max_new_tokens, temperature=1.0,
        top_k=0, top_p=1.0, learning_rate=1e-4, warmup_steps=10, lr_scheduler_type="constant_with_warmup",
        weight_decay=0.0, max_grad_norm=1.0, beta=0.0, loss_type="dapo", scale_rewards="group", epsilon=0.2,
        epsilon_high=0.28, shuffle_dataset=False, use_vllm=False, bf16=dtype == torch.bfloat16, fp16=False,
        gradient_checkpointing=bool(args.gradient_checkpointing),
        logging_steps=10**6, report_to="none", save_strategy="no", disable_tqdm=True, seed=args.seed)
    trainer = GRPOTrainer(model=model, reward_funcs=caprl_reward, args=cfg, train_dataset=data,
                          processing_class=proc, callbacks=[StepClock()])
    trainer.train()


SHARED = ["--steps", str(args.steps), "--images-per-step", str(B), "--group-size", str(G), "--max-new-tokens",
          str(args.max_new_tokens), "--gradient-checkpointing", str(args.gradient_checkpointing), "--zero-truncated",
          str(args.zero_truncated)]  # both sides' flags


def run_trl(seed):
    cmd = [sys.executable, __file__, "--child", "--seed", str(seed), "--threads", str(args.threads),
           "--micro-batch-images", str(M), "--policy", args.policy, "--judge", args.judge, "--data", args.data, *SHARED]
    return [json.loads(l) for l in run(cmd).splitlines() if l.startswith('{"step_seconds"')]


def run(cmd):
    """A side's process; its stdout, or on failure the end of its stderr (an out-of-memory, say) and exit 1."""
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    if r.returncode:
        sys.exit(f"failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stderr[-4000:]}")
    return r.stdout


def run_project(seed):
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "train_grpo.py", "--eval-images", "0", "--save-every", "0", "--save-final", "0",
               "--seed", str(seed), "--out", out, *SHARED]
        for flag in ("policy", "judge", "data"):  # given: as given; else the project's default
            if getattr(args, flag):
                cmd += ["--" + flag, getattr(args, flag)]
        cmd += ["--micro-batch-images", str(args.micro_batch_images or math.gcd(B, 4))]  # its default 4, if it fits
        run(cmd)
        rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return [{"step_seconds": r["step_seconds"], "gen_seconds": r["gen_seconds"], "reward_seconds": r["reward_seconds"],
             "tokens": r["caption_tokens_mean"], "reward": r["reward_mean"]} for r in rows]


if args.child:
    trl_child()
    sys.exit()

import torch  # noqa: E402
import trl  # noqa: E402  (fail here, before any run, when TRL is missing)

steps = {"project": [], "trl": []}
load = [os.getloadavg()[0]]  # other processes on the machine skew both sides: reported with the figures
for r in range(args.rounds):
    for side, fn in (("project", run_project), ("trl", run_trl)):
        rows = fn(r)
        assert len(rows) == args.steps, f"{side}: expected {args.steps} steps, got {len(rows)}"
        steps[side] += rows[1:]  # the first step of each run is a warm-up
        load.append(os.getloadavg()[0])
        print(f"round {r} {side:8s} step seconds " + " ".join(f"{x['step_seconds']:.2f}" for x in rows)
              + f" (load average {load[-1]:.1f})", flush=True)
med = {s: {k: statistics.median(x[k] for x in rows) for k in rows[0]} for s, rows in steps.items()}
best = {s: min(x["step_seconds"] for x in rows) for s, rows in steps.items()}  # the least disturbed step
cps = {s: B * G / m["step_seconds"] for s, m in med.items()}
name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} threads"
print(f"one GRPO step, B={B} images x G={G} captions, cap {args.max_new_tokens} tokens, stop at EOS, {name}, "
      f"TRL {trl.__version__}; medians over {len(steps['trl'])} steps each; "
      f"1-min load average {min(load):.1f}-{max(load):.1f}")
print(f"{'':8s} {'step s':>7s} {'gen s':>6s} {'reward s':>8s} {'rest s':>6s} {'tokens/caption':>14s} "
      f"{'reward':>6s} {'captions/s':>10s} {'best step s':>11s}")
for s, m in med.items():
    rest = m["step_seconds"] - m["gen_seconds"] - m["reward_seconds"]
    print(f"{s:8s} {m['step_seconds']:7.2f} {m['gen_seconds']:6.2f} {m['reward_seconds']:8.2f} {rest:6.2f} "
          f"{m['tokens']:14.1f} {m['reward']:6.3f} {cps[s]:10.1f} {best[s]:11.2f}")
print(f"project: {cps['project'] / cps['trl']:.2f}x TRL's captions per second (median step), "
      f"{best['trl'] / best['project']:.2f}x (best step)")
print(json.dumps({"bench": "trl", "device": name, "trl_version": trl.__version__,
                  "images_per_step": B, "group_size": G, "max_new_tokens": args.max_new_tokens,
                  "steps_counted": len(steps["trl"]), "load_average": [min(load), max(load)], "median": med,
                  "best_step_seconds": best,
                  "captions_per_second": cps, "speedup": cps["project"] / cps["trl"],
                  "speedup_best_step": best["trl"] / best["project"]}))
