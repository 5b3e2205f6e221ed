"""CapRL with hand-written GRPO: a captioner learns to write captions from which a text-only judge can answer
multiple-choice questions about the image it never sees.

    python train_grpo.py                                  # CPU: shipped SFT captioner + judge, built-in world,
                                                          # then SFT vs GRPO evaluated side by side (~2.5 min)
    python train_grpo.py --policy Qwen/Qwen2.5-VL-3B-Instruct --judge Qwen/Qwen2.5-3B-Instruct --data qa.jsonl \
        --lr 1e-6 --warmup-steps 20 --lr-schedule cosine --judge-mode sample --max-new-tokens 1024 \
        --max-pixels 1003520 --images-per-step 16 --micro-batch-images 1 \
        --gradient-checkpointing 1 --steps 500            # one 80 GB GPU: README's recipe and memory plan
    python train_grpo.py --steps 4 --save-every 2 --out runs/x && python train_grpo.py ... --resume

The exact variant (each a flag; defaults in brackets):
  rollout   per step B images [8], G captions each [8], sampled at temperature 1 with no top-k / top-p, by the
            KV-cached sampler (prompt prefilled once per image; its G rows read that one cache);
  reward    per caption, N [8] questions drawn with replacement from its image's MCQs (built-in world: the reward
            types, held-out types never; --data: all), options shuffled each draw, abstain option appended; the
            judge's reading [prob: probability of the gold option; the paper samples at temperature 0.6,
            --judge-mode sample];
  advantage (r - mean_group) / (std_group + 1e-4) [std]; or r - mean_group [none] (Dr. GRPO);
  loss      clipped surrogate -min(rho A, clip(rho, 1 - 0.2, 1 + 0.28) A) per token, rho = pi / pi_old,
            summed over all completion tokens of the step and divided by their count (DAPO token level) [token];
            or each caption's token mean averaged over captions (original GRPO) [sequence];
            the normaliser is the whole step's, so micro-batching does not change the gradient;
  updates   one optimizer step per rollout [1]: then pi_old is the sampler's own log-probs (no extra forward) and
            rho is 1 up to rounding (logged as ratio_mean); more updates reuse the rollout (PPO epochs);
  KL        none [beta 0, no reference model in memory]; with beta > 0, k3 against the frozen initial policy;
  extras    captions without EOS by the length cap get reward 0 [--zero-truncated 1] (README: without it captions
            run on); with --mask-truncated 1 they get no loss
            (DAPO's overlong filtering; with --zero-truncated 1 their zeros still enter their group's mean and std);
            zero-variance groups counted (and dropped with --drop-zero-std 1);
            AdamW, linear warm-up then constant lr [constant] or cosine (--lr-schedule); grad-norm clip 1.0.
Memory (README, "Train a real captioner"): fp32 weights and AdamW with bf16 autocast on a GPU, a bf16 judge, fused
log-probs + loss (logprobs.py), each image's prompt once with its captions packed after it (models.completion_hidden),
--micro-batch-images, and optionally --gradient-checkpointing 1 and --freeze-vision 1.
More than one GPU: `torchrun --nproc_per_node W train_grpo.py ...` (data parallel, W ranks). Rank r samples and
scores the step's images r*B/W ... (r+1)*B/W - 1 (their groups are whole, so advantages need no communication), the
loss is normalised by the step's global token count and the gradients are summed over ranks (all-reduce), so W ranks
make the update 1 rank makes at the same B. A rollout's randomness derives from (seed, step, image) alone. Rank 0 writes
logs and checkpoints. (Data parallel only: every rank holds the whole model, so no FSDP.)
Faults: `--resume` continues from the newest checkpoint exactly as if never stopped (checkpoints are atomic, a log
line cut by a kill is dropped); a non-finite reward, loss or gradient skips that update (logged, counted), so it
never reaches the weights or a checkpoint; Ctrl-C (SIGINT) finishes the step, writes a checkpoint and exits 130
(under torchrun, which kills its workers 30 s after passing Ctrl-C on, give it longer than a step and a checkpoint
write: `torchrun --shutdown-timeout 900 ...`).
Simplified on purpose: no LoRA, no value model, no reward server.
"""
import argparse
import gc
import itertools
import json
import math
import os
import random
import signal
import sys
import time

import torch
import torch.distributed as dist

from caprl_mini import shapes
from caprl_mini.checkpoint import (load_trainer_state, resume_checkpoint, save_checkpoint, truncate_jsonl,
                                   write_config)
from caprl_mini.data import DataError, QAFile, World, at_least, print_skipped, skip_bad, user_errors
from caprl_mini.evaluation import caption_items, evaluate_captions, item_seed, write_results
from caprl_mini.grpo import advantages, flat_token_loss, policy_stats, zero_variance
from caprl_mini.judge import caption_rewards
from caprl_mini.logprobs import logprobs_and_loss, token_logprobs
from caprl_mini.models import (CAPTION_INSTRUCTION, JUDGE, SFT_CAPTIONER, completion_hidden, encode_prompts,
                               load_judge, load_policy, pick_device, prepare_for_training, rope_positions, save_model)
from caprl_mini.sampling import decode, sample

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# models and data
parser.add_argument("--policy", default=SFT_CAPTIONER, help="captioner: folder or hub id (Qwen2/2.5/3-VL)")
parser.add_argument("--judge", default=JUDGE, help="judge: folder or hub id of a chat LM, or 'oracle' (built-in world)")
parser.add_argument("--data", default=None, help="QA JSONL; without it the built-in shapes world supplies images")
parser.add_argument("--image-root", default=None, help="folder that relative image paths in --data resolve against")
parser.add_argument("--skip-bad", action="store_true",
                    help="skip bad --data lines and unreadable images (each listed once, counted at the end) instead "
                         "of stopping with an error naming the file and line")
parser.add_argument("--instruction", default=CAPTION_INSTRUCTION, help="the caption instruction (the paper's)")
parser.add_argument("--min-pixels", type=at_least(1), default=None,
                    help="images are resized to at least this many pixels (default: the processor's)")
parser.add_argument("--max-pixels", type=at_least(1), default=None,
                    help="... and at most this many (an image costs pixels / 784 tokens; Qwen3-VL: / 1024)")
# rollout
parser.add_argument("--steps", type=at_least(0), default=150, help="GRPO steps")
parser.add_argument("--images-per-step", type=at_least(1), default=8, help="B: images per step")
parser.add_argument("--group-size", type=at_least(2), default=8, help="G: captions sampled per image")
parser.add_argument("--max-new-tokens", type=at_least(1), default=64, help="caption length cap in tokens")
parser.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
parser.add_argument("--decode", default="auto", choices=["auto", "static", "dynamic"],
                    help="rollout decoding: static, a fixed batch (finished rows ride along; on CUDA a compiled step "
                         "replayed as a CUDA graph), or dynamic, eager, finished rows dropped; both allocate for the "
                         "rollout only (auto: static on CUDA)")
# reward
parser.add_argument("--questions-per-caption", type=at_least(1), default=8, help="N: question draws per caption")
parser.add_argument("--judge-format", default=None, choices=["caprl", "letter", "cloze"],
                    help="how MCQs are posed (default: the judge folder's judge.json, else caprl: the paper's prompt)")
parser.add_argument("--judge-mode", default="prob", choices=["prob", "sample", "argmax"],
                    help="how the judge's answer is read (the paper: sample at temperature 0.6)")
parser.add_argument("--length-bounds", type=int, nargs=2, default=None, metavar=("L1", "L2"),
                    help="CapRL++ length term, added to the reward: --length-weight up to L1 caption tokens, linearly "
                         "down to 0 at L2 (off by default; CapRL++'s video recipe: 2048 3072). A penalty of c per "
                         "token past L1, up to a constant: L2 >= --max-new-tokens, weight c * (L2 - L1)")
parser.add_argument("--length-weight", type=float, default=0.2, help="weight of the length term (CapRL++'s)")
# optimisation
parser.add_argument("--lr", type=at_least(0.0, float), default=1e-4, help="AdamW learning rate (paper, 3B: 1e-6)")
parser.add_argument("--warmup-steps", type=at_least(0), default=10, help="linear lr warm-up steps (paper: 20)")
parser.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                    help="after warm-up: constant, or cosine down to 0 (reached one step after the last; paper)")
parser.add_argument("--advantage", default="std", choices=["std", "none"],
                    help="std: GRPO's (r - mean) / std per group; none: r - mean (Dr. GRPO; RLOO's up to a constant)")
parser.add_argument("--loss-aggregation", default="token", choices=["token", "sequence"], help="see docstring")
parser.add_argument("--eps-low", type=at_least(0.0, float), default=0.2, help="ratio clip below 1")
parser.add_argument("--eps-high", type=at_least(0.0, float), default=0.28, help="ratio clip above 1 (DAPO clip-higher)")
parser.add_argument("--beta", type=at_least(0.0, float), default=0.0,
                    help="KL coefficient (k3, frozen initial policy); 0 = off")
parser.add_argument("--updates-per-rollout", type=at_least(1), default=1,
                    help="optimizer steps per rollout (more: PPO epochs on the rollout)")
parser.add_argument("--micro-batch-images", type=at_least(1), default=4,
                    help="images (x G captions) per forward/backward")
parser.add_argument("--drop-zero-std", type=int, default=0, help="1: drop groups whose rewards are all equal")
parser.add_argument("--mask-truncated", type=int, default=0, help="1: no loss on captions cut at the length cap")
parser.add_argument("--zero-truncated", type=int, default=1,
                    help="1: captions cut at the length cap (no EOS) get reward 0 (DAPO's overlong penalty, hard)")
parser.add_argument("--grad-clip", type=at_least(0.0, float), default=1.0, help="max gradient norm (0: no clipping)")
# memory (README, "Train a real captioner")
parser.add_argument("--policy-dtype", default="fp32", choices=["fp32", "bf16"],
                    help="the policy's weights and optimizer state; compute runs in the device's dtype (bf16 autocast "
                    "on a GPU). bf16 halves their memory, but AdamW steps below bf16's resolution are lost")
parser.add_argument("--gradient-checkpointing", type=int, default=0, help="1: recompute layer activations in backward")
parser.add_argument("--freeze-vision", type=int, default=0, help="1: train only the language model")
# run
parser.add_argument("--out", default="runs/grpo", help="run folder")
parser.add_argument("--save-every", type=at_least(0), default=50, help="steps between checkpoints (0: only final)")
parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
parser.add_argument("--save-final", type=int, default=1, help="0: no final save (benchmarks of a step)")
parser.add_argument("--seed", type=int, default=0, help="seed of everything random (images, rollouts, draws)")
parser.add_argument("--eval-images", type=at_least(0), default=200,  # evaluate.py scores any other file
                    help="images in the final evaluation: the world's held-out split, or --data's first rows; 0: none")
parser.add_argument("--log-samples", type=at_least(0), default=4, help="captions per step written to samples.jsonl")
args = parser.parse_args()
if args.images_per_step % args.micro_batch_images:
    parser.error("--images-per-step must be a multiple of --micro-batch-images")
if args.eps_low >= 1:  # the ratio's clip range [1 - eps_low, 1 + eps_high]
    parser.error("--eps-low must be below 1")
if os.path.isfile(args.out):
    parser.error(f"--out {args.out} is a file, not a run folder")
if args.length_bounds and not 0 <= args.length_bounds[0] < args.length_bounds[1]:
    parser.error("--length-bounds L1 L2 needs 0 <= L1 < L2")
if args.temperature <= 0:  # greedy rollouts: no distribution to take log-probs under (the loss divides by it)
    parser.error("--temperature must be > 0")

# ---------------------------------------------------------------- setup
world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun sets WORLD_SIZE, RANK, LOCAL_RANK
device, dtype = pick_device()
if world > 1:
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
rank = dist.get_rank() if world > 1 else 0
if args.images_per_step % (world * args.micro_batch_images):
    parser.error(f"--images-per-step must be a multiple of {world} ranks x --micro-batch-images")
pdtype = torch.float32 if args.policy_dtype == "fp32" else torch.bfloat16
amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != pdtype)  # mixed precision: fp32 weights, bf16 math
os.makedirs(args.out, exist_ok=True)
start, skipped_updates = 0, 0
try:  # a fresh run into a folder with checkpoints, or a resume with other training flags: refused. Paths may
    # differ (a moved folder); --steps too, except under the cosine schedule, which it would stretch
    ckpt = resume_checkpoint(args.out, args.resume, vars(args), may_change=(
        "resume", "out", "policy", "judge", "data", "image_root", "skip_bad", "decode", "save_every", "save_final",
        "eval_images", "log_samples", "micro_batch_images", "gradient_checkpointing")
        + (("steps",) if args.lr_schedule == "constant" else ()), default=parser.get_default)
except ValueError as e:
    parser.error(str(e))
pixels = dict(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
with user_errors():  # a mistyped model path: one line, not the hub client's traceback
    model, proc = load_policy(ckpt or args.policy, device, pdtype, **pixels)
    judge, jtok, meta = load_judge(args.judge, device, dtype, args.judge_format)  # inference only, device's dtype
    # KL's frozen initial policy, only when KL is on: from --policy, also when a resume loaded a checkpoint
    ref_model = load_policy(args.policy, device, pdtype, **pixels)[0].requires_grad_(False) if args.beta > 0 else None
jfmt = meta["format"]  # --judge-format, else the judge folder's
params = prepare_for_training(model, args.gradient_checkpointing, args.freeze_vision)
# fused on accelerators: no parameter-sized temporaries in the update (foreach's are GBs at 3B)
opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=device.type != "cpu")
if ckpt:
    state = load_trainer_state(ckpt)
    opt.load_state_dict(state["optimizer"])
    start, skipped_updates = state["step"], state.get("skipped_updates", 0)
    if start > args.steps:
        parser.error(f"--resume --steps {args.steps}: the run is at step {start} already")
    print(f"resumed from {ckpt} at step {start}")
if rank == 0:  # the logs keep the steps before `start`: a fresh run (start 0) starts them empty
    for name in ("metrics.jsonl", "samples.jsonl"):
        truncate_jsonl(os.path.join(args.out, name), start - 1)
    write_config(args.out, vars(args))
skipped = [] if args.skip_bad else None  # (where, reason) of every bad line and image left out
with user_errors():
    data = QAFile(args.data, args.image_root, skipped) if args.data else World("train")
source = f"a QA file of {len(data)} rows" if args.data else "the built-in world"  # picks index it: keep it on resume
if ckpt and state.get("data", source) != source:
    parser.error(f"--resume: the run trained on {state['data']}, not {source} (the steps would draw other images)")
bad_images = set()  # indices found unreadable (--skip-bad): never tried again
reward_types = None if args.data else shapes.REWARD_TYPES
W = model.get_output_embeddings().weight
B, G = args.images_per_step, args.group_size
Bl = B // world  # images of this rank per step
mine = range(rank * Bl, rank * Bl + Bl)  # their positions among the step's B images
stop = []  # SIGINT sets it; the step in flight finishes, then a checkpoint is written
printed = time.time()  # when the last progress line was printed: one every 10 steps, and at least one a minute


def on_sigint(signum, frame):
    stop.append(signum)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
    print("\nCtrl-C: finishing this step, then writing a checkpoint (Ctrl-C again to stop now)", flush=True)


signal.signal(signal.SIGINT, on_sigint)


def all_sum(x):
    """Sum of a tensor over ranks (itself in one process)."""
    x = torch.as_tensor(x, dtype=torch.float64, device=device).clone()
    if world > 1:
        dist.all_reduce(x)
    return x


def all_cat(x):
    """Ranks' equal-sized tensors concatenated in rank order: the whole step's per-caption values."""
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def load(i):
    """Item i; with --skip-bad, if its image cannot be read, the next readable item (the same on every rank and on
    resume: it depends on the data alone)."""
    for j in itertools.chain(range(i, len(data)), range(i)) if args.skip_bad else [i]:
        if j in bad_images:
            continue
        with skip_bad(skipped):
            return data[j]
        bad_images.add(j)
        print(f"skipped (--skip-bad): {': '.join(skipped[-1])}", flush=True)
    raise DataError(f"{args.data}: no readable image left")


def lr_at(step):
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    if args.lr_schedule == "cosine":  # half a cosine from lr after warm-up to 0, reached one step after the last
        t = max(0, step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)  # (the last step still learns)
        return args.lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return args.lr * warm


def completion_states(m, prompt, pos, nxt, tokens, mask, b0, b1):
    """Teacher-forced hidden states (n, D) predicting the n real completion tokens of images b0..b1 (G rows each),
    each image's prompt run once (models.completion_hidden)."""
    rows = slice(b0 * G, b1 * G)  # b0, b1: this rank's images
    n_patch = prompt["image_grid_thw"].prod(-1)
    pv = prompt["pixel_values"][int(n_patch[:b0].sum()):int(n_patch[:b1].sum())]
    return completion_hidden(m, prompt["input_ids"][b0:b1], prompt["attention_mask"][b0:b1], pos[:, b0:b1],
                             nxt[b0:b1], pv, prompt["image_grid_thw"][b0:b1], tokens[rows], mask[rows], G)


# ---------------------------------------------------------------- GRPO loop
for step in range(start, args.steps):
    t0 = time.time()
    rng = random.Random(f"{args.seed}:images:{step}")  # the step's images from (seed, step) alone: the same ones
    picks = [rng.randrange(len(data)) for _ in range(B)]  # after a resume and on every rank
    with user_errors():
        items = [load(picks[b]) for b in mine]  # only this rank's share is loaded
    prompt = {k: v.to(device) for k, v in encode_prompts(proc, [it["image"] for it in items], args.instruction).items()}
    model.eval()
    with amp:  # image b's G captions are drawn with the seed (seed, step, b): independent of the other images
        roll = sample(model, prompt, G, args.max_new_tokens, args.temperature,
                      seeds=[item_seed(args.seed, f"{step}:{b}") for b in mine],
                      static={"auto": None, "static": True, "dynamic": False}[args.decode])
    model.train()
    t_gen = time.time() - t0
    tokens, mask, old_logp = roll["tokens"], roll["mask"], roll["logprobs"]
    captions = decode(proc, roll)
    n_tok = mask.sum(1)  # tokens per caption, its end token included (logged so; the length term counts without it)
    rrngs = [random.Random(f"{args.seed}:reward:{step}:{b}") for b in mine]  # one per image: its G captions
    # draw from it in turn, each its own questions and shuffles, as the paper's reward server draws per caption
    rewards = caption_rewards(judge, jtok, captions, [it for it in items for _ in range(G)],
                              args.questions_per_caption, jfmt, args.judge_mode, [r for r in rrngs for _ in range(G)],
                              reward_types, tokens=(n_tok - (~roll["truncated"]).long()).tolist(),  # no end token
                              length_bounds=args.length_bounds, length_weight=args.length_weight).to(device)
    if args.zero_truncated:  # a caption that never ends is not a caption: no credit for what it rambled
        rewards = rewards * (~roll["truncated"]).float()
    t_reward = time.time() - t0 - t_gen
    adv = advantages(rewards, G, args.advantage)
    zero_std = zero_variance(rewards, G)  # (Bl,)
    loss_mask = mask.clone()
    if args.drop_zero_std:
        loss_mask *= (~zero_std).repeat_interleave(G)[:, None]
    if args.mask_truncated:
        loss_mask *= (~roll["truncated"])[:, None]
    norm = loss_mask.sum() if args.loss_aggregation == "token" else (loss_mask.sum(1) > 0).sum()
    norm = all_sum(norm).item()  # the whole step's count, over ranks: the loss sums to the global mean
    finite_reward = bool(all_sum((~torch.isfinite(rewards)).sum()) == 0)
    pos, nxt = rope_positions(model, prompt["input_ids"], prompt["attention_mask"], prompt["image_grid_thw"])
    for g in opt.param_groups:
        g["lr"] = lr_at(step)
    for update in range(args.updates_per_rollout):
        opt.zero_grad(set_to_none=True)
        stats = {"ratio_sum": 0.0, "clipped": 0.0, "tokens": 0.0}
        loss_total, ent_sum = 0.0, 0.0
        for b0 in range(0, Bl, args.micro_batch_images):
            b1, rows = b0 + args.micro_batch_images, slice(b0 * G, (b0 + args.micro_batch_images) * G)
            keep = mask[rows].bool()  # the real tokens: padding gets no vocabulary work
            with amp:  # the forward in bf16 on a GPU; log-probs themselves are fp32 (logprobs.py)
                flat = completion_states(model, prompt, pos, nxt, tokens, mask, b0, b1)  # (n, D)
                ref_logp = None
                if ref_model is not None:
                    with torch.no_grad():
                        hr = completion_states(ref_model, prompt, pos, nxt, tokens, mask, b0, b1)
                        ref_logp = torch.zeros_like(old_logp[rows]).masked_scatter(keep, token_logprobs(
                            hr, ref_model.get_output_embeddings().weight, tokens[rows][keep], args.temperature))
                # policy_loss's sum, with its gradient formed in the forward (logprobs.py: 3 matmuls, not 4)
                tl = flat_token_loss(old_logp[rows], adv[rows], loss_mask[rows], max(norm, 1), args.eps_low,
                                     args.eps_high, args.loss_aggregation, ref_logp, args.beta, keep)
                lp, loss, ent = logprobs_and_loss(flat, W, tokens[rows][keep], tl, args.temperature, entropy=True)
                st = policy_stats(torch.zeros_like(old_logp[rows]).masked_scatter(keep, lp), old_logp[rows],
                                  adv[rows], loss_mask[rows], args.eps_low, args.eps_high)
            loss.backward()
            loss_total += loss.item()
            stats = {k: stats[k] + st[k] for k in stats}
            ent_sum += ent.sum().item()
        if world > 1:  # sum the ranks' gradients (their losses are parts of one sum); then every rank steps alike
            for p in params:
                if p.grad is None:  # a parameter no loss reached on this rank: zeros, so every rank sends a tensor
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf")).item()  # 0: norm only
        loss_total = all_sum(loss_total).item()
        skip_reason = ("non-finite reward" if not finite_reward else "non-finite loss" if not math.isfinite(loss_total)
                       else "non-finite gradient" if not math.isfinite(grad_norm)
                       else "no token has a loss" if norm == 0  # all dropped or masked: AdamW's momentum would still
                       else None)  # move the weights
        if skip_reason:  # a NaN/inf step must not touch the weights or AdamW's state
            skipped_updates += 1
            print(f"step {step}: {skip_reason}, update skipped ({skipped_updates} so far)", flush=True)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)  # free the gradients before the next rollout needs the memory
    if device.type == "cuda":  # the optimizer step is queued, not done: count it in the step's time
        torch.cuda.synchronize()
    step_s = time.time() - t0
    r_all, n_all, tr_all = all_cat(rewards), all_cat(n_tok.float()), all_cat(roll["truncated"].float())
    n_mask, stats = all_sum(mask.sum()).item(), {k: all_sum(v).item() for k, v in stats.items()}
    metrics = {"step": step, "reward_mean": r_all.mean().item(), "reward_std": r_all.std().item(),
               "frac_zero_std_groups": all_cat(zero_std.float()).mean().item(),
               "caption_tokens_mean": n_all.mean().item(), "truncated_frac": tr_all.mean().item(),
               "entropy": all_sum(ent_sum).item() / max(1, n_mask),
               "ratio_mean": stats["ratio_sum"] / max(1, stats["tokens"]),
               "clip_frac": stats["clipped"] / max(1, stats["tokens"]), "loss": loss_total,
               "grad_norm": grad_norm, "lr": lr_at(step), "skipped": skip_reason, "skipped_updates": skipped_updates,
               "gen_tokens_per_s": n_mask / t_gen, "gen_seconds": t_gen, "reward_seconds": t_reward,
               "step_seconds": step_s}
    if device.type == "cuda":
        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if rank == 0:  # rank 0 logs its own images' captions as samples
        with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        with open(os.path.join(args.out, "samples.jsonl"), "a") as f:
            for i in range(min(args.log_samples, len(captions))):
                f.write(json.dumps({"step": step, "id": items[i // G]["id"], "caption": captions[i],
                                    "reward": rewards[i].item()}) + "\n")
    if rank == 0 and (step % 10 == 0 or step == args.steps - 1 or time.time() - printed > 60):
        printed = time.time()
        print(f"step {step:4d} reward {metrics['reward_mean']:.3f} tokens {metrics['caption_tokens_mean']:.1f} "
              f"ratio {metrics['ratio_mean']:.4f} entropy {metrics['entropy']:.3f} gen {t_gen:.2f}s "
              f"reward {t_reward:.2f}s step {step_s:.2f}s | {captions[0][:90]}", flush=True)
    interrupted = bool(all_sum(len(stop)) > 0)  # every rank stops after the same step
    if rank == 0 and (interrupted or args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps):
        save_checkpoint(args.out, step + 1, model, proc, opt, extra=dict(skipped_updates=skipped_updates, data=source))
    if interrupted:
        if world > 1:  # every rank waits for rank 0's checkpoint: torchrun stops the group once one rank exits
            dist.barrier()
        print(f"interrupted after step {step}: checkpoint written; continue with --resume", flush=True)
        sys.exit(130)

# ---------------------------------------------------------------- final save and side-by-side evaluation
signal.signal(signal.SIGINT, signal.default_int_handler)  # no step left to finish: Ctrl-C stops at once
final = os.path.join(args.out, "final")
if world > 1:
    if skipped is not None:  # rank 0's summary lists every rank's bad rows and images, each once
        parts = [None] * world
        dist.all_gather_object(parts, skipped)
        skipped = list(dict.fromkeys(s for part in parts for s in part))
    dist.destroy_process_group()
    if rank > 0:
        sys.exit(0)  # rank 0 saves and evaluates
if args.save_final:
    save_model(model, proc, final)
    if start < args.steps:  # else resumed from this very checkpoint: rewriting it would only open a window to lose it
        save_checkpoint(args.out, args.steps, model, proc, opt,
                        extra=dict(skipped_updates=skipped_updates, data=source))
    print(f"saved {final}")
if args.eval_images:  # both captioners as evaluate.py runs a saved one: weights in the device's dtype, no autocast
    model.eval().to(dtype)
    del opt, ref_model  # AdamW's state (8 bytes a parameter) and the KL reference are not needed to caption
    with user_errors():  # --data: read as training read it (--skip-bad: a bad image's replacement, once)
        items = list({it["id"]: it for it in map(load, range(min(args.eval_images, len(data))))}.values()) \
            if args.data else [World("eval")[i] for i in range(args.eval_images)]
    results = []
    for i, path in enumerate((args.policy, final)):  # the SFT policy, then the trained one
        m = (model, proc) if i else load_policy(path, device, dtype, **pixels)
        caps = caption_items(*m, items, max_new_tokens=args.max_new_tokens, instruction=args.instruction)
        results.append({"path": path, **evaluate_captions(judge, jtok, jfmt, items, caps)})
        del m
        gc.collect()  # whatever of it sits in a reference cycle goes now, not at the collector's next run
    write_results(os.path.join(args.out, "eval"), results)
print_skipped(skipped)
