"""The CapRL reward as a standalone tool, and the curation of its questions.

    python reward.py score --captions caps.jsonl --data qa.jsonl --judge assets/judge --out rewards.jsonl
    python reward.py score --captions caps.jsonl --judge oracle        # built-in world ids (shapes-eval-12)
    python reward.py filter --data qa.jsonl --judge Qwen/Qwen2.5-3B-Instruct --out qa_filtered.jsonl
    python reward.py world --images 300 --leaky --out runs/world/qa.jsonl   # the built-in world as QA JSONL + PNGs

score   --captions: JSONL of {"id", "caption"}; each id must be an id of --data (or of the built-in world:
        shapes-<split>-<index>). Writes {"id", "caption", "reward"} per line and prints the mean. The reward is
        the function the trainer optimises (caprl_mini.judge.caption_rewards). A caption's question draws and
        option shuffles depend on (--seed, its id) only: it scores the same wherever it stands in the file, and
        captions of one image (e.g. two captioners') are asked the same questions. Resumable with --out (below).
        (The trainer also gives a caption cut at its length cap 0, --zero-truncated, and can add a length term,
        --length-bounds: both read the policy's tokens, which a caption file does not carry; score is the judge's
        accuracy alone.)
filter  the paper's leak filter: every question is asked --filter-asks times with an EMPTY caption, options
        shuffled each time; a question the judge still gets right in --max-blind-accuracy of the asks or more
        is answerable without the image (from priors or its own wording) and is dropped (paper: kept only when
        right in fewer than 0.25 of 4 asks, i.e. never). Prints the drops per question type; images left without
        questions are dropped and counted. (The paper also keeps only questions a VLM answers right with the
        image, > 0.75; that needs a VLM judge, not done here.)
world   writes the built-in world as a QA JSONL with PNG files, optionally with a deliberately leaky question type
        (shapes.LEAKY_TYPE: "the object at the X is red. what color is the object at the X?").
score and filter are resumable: rerun a killed run with the same settings and it goes on from OUT.partial.jsonl
(deleted at the end), writing what one uninterrupted run writes; other settings are refused.
Bad input (a malformed line, a missing field, an unknown id) stops the run with `error: <file>:<line>: ...` and
exit status 2; with --skip-bad such lines are left out, listed and counted instead.
"""
import argparse
import hashlib
import json
import os
import random
import re
import sys

import torch
from tqdm import tqdm

from caprl_mini import shapes
from caprl_mini.data import (DataError, QAFile, at_least, caption_records, print_skipped, skip_bad, user_errors,
                             write_qa, write_whole, write_world_qa)
from caprl_mini.judge import caption_rewards, score_questions
from caprl_mini.models import JUDGE, load_judge, pick_device

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("command", choices=["score", "filter", "world"], help="see above")
parser.add_argument("--captions", default=None, help="score: JSONL of {id, caption}")
parser.add_argument("--data", default=None, help="QA JSONL the ids refer to (default: the built-in world)")
parser.add_argument("--image-root", default=None, help="folder that relative image paths in --data resolve against")
parser.add_argument("--judge", default=JUDGE, help="judge folder or hub id, or 'oracle'")
parser.add_argument("--judge-format", default=None, choices=["caprl", "letter", "cloze"],
                    help="how MCQs are posed (default: the judge folder's judge.json, else caprl: the paper's prompt)")
parser.add_argument("--judge-mode", default="prob", choices=["prob", "sample", "argmax"],
                    help="score: how the judge's answer is read (filter always reads argmax)")
parser.add_argument("--questions-per-caption", type=at_least(1), default=8, help="N question draws per caption")
parser.add_argument("--all-types", action="store_true", help="built-in world: draw held-out question types too")
parser.add_argument("--seed", type=int, default=0, help="seed of question draws and option shuffling")
parser.add_argument("--out", default=None, help="output JSONL (score: default prints only the mean)")
parser.add_argument("--skip-bad", action="store_true",
                    help="skip bad rows, list and count them in the summary instead of stopping")
# filter and world
parser.add_argument("--filter-asks", type=at_least(1), default=4, help="filter: blind asks per question")
parser.add_argument("--max-blind-accuracy", type=float, default=0.25,
                    help="filter: keep a question only if answered right blind in less than this fraction of the "
                    "asks (paper: 0.25, i.e. never in 4)")
parser.add_argument("--images", type=at_least(1), default=300, help="world: number of images")
parser.add_argument("--split", default="eval", help="world: split of the built-in world")
parser.add_argument("--leaky", action="store_true", help="world: add the leaky question type")
args = parser.parse_args()
if not 0 < args.max_blind_accuracy <= 1:
    parser.error("--max-blind-accuracy is a fraction of the asks: above 0, at most 1")
if args.out and (os.path.isdir(args.out) or args.out.endswith(os.sep)):
    parser.error(f"--out {args.out} is a folder; give a file path, e.g. {os.path.join(args.out, 'out.jsonl')}")
if not args.out and args.command != "score" or args.command == "filter" and not args.data:
    parser.error(f"{args.command} needs --out" + (" and --data" if args.command == "filter" else ""))
if args.command == "score" and not args.captions:
    parser.error("score needs --captions")
skipped = [] if args.skip_bad else None  # --skip-bad: bad lines are listed here instead of stopping the run
if args.command == "world":
    write_world_qa(args.out, args.images, args.split, args.leaky)
    print(f"wrote {args.images} images and {args.out}")
    sys.exit(0)
with user_errors():  # the input is read and checked before the judge loads
    qa = QAFile(args.data, args.image_root, skipped) if args.data else None
    by_id = {row["id"]: i for i, row in enumerate(qa.rows)} if qa else None
    records = []  # score: (id, caption, {"questions"}) per caption line
    for rec in caption_records(args.captions, skipped) if args.command == "score" else []:
        cid, where = rec["id"], rec["where"]
        with skip_bad(skipped):
            if qa:
                if cid not in by_id:
                    raise DataError(f"{where}: id {cid!r} is not in {args.data}")
                questions = qa.rows[by_id[cid]]["questions"]
            else:
                m = re.fullmatch(r"shapes-(\w+)-(\d+)", cid)
                if not m:
                    raise DataError(f"{where}: id {cid!r} is not a built-in world id (shapes-<split>-<index>)")
                questions = shapes.world_item(int(m.group(2)), m.group(1))["questions"]
            records.append((cid, rec["caption"], {"questions": questions}))
    if args.command == "score" and not records:
        raise DataError(f"{args.captions}: no caption left to score")
device, dtype = pick_device()
with user_errors():  # a mistyped judge path: one line
    judge, jtok, meta = load_judge(args.judge, device, dtype, args.judge_format)
fmt = meta["format"]  # --judge-format, else the judge folder's
# resumable: OUT.partial.jsonl holds the run's settings, then one line per judge call (appended as it ends); a rerun
# with the same settings takes those calls' results from it and makes only the rest, writing what one uninterrupted
# run writes; the file goes at the end. Appended, not rewritten: its size and writes grow with the work, not its square
partial = args.out and args.out + ".partial.jsonl"


def logged_calls(settings):
    """The calls a killed run with these settings logged in `partial` ([] if none, and the settings line written);
    a last line the kill cut short is dropped. Other settings are refused, naming the file and each setting."""
    if not partial:
        return []
    lines = open(partial).readlines() if os.path.exists(partial) else [json.dumps(settings) + "\n"]
    with user_errors():
        changed = [f"{k} {v!r} there, {settings.get(k)!r} now" for k, v in json.loads(lines[0]).items()
                   if settings.get(k) != v]
        if changed:
            raise DataError(f"{partial}: a run with other settings ({'; '.join(changed)}): rerun with its settings, "
                            "or delete the file to start over")
    lines = lines[:1] + [x for x in lines[1:] if x.endswith("\n")]  # a line is whole once its newline is written
    write_whole(partial, lines)
    return [json.loads(x) for x in lines[1:]]


def log_call(result):
    if partial:
        with open(partial, "a") as f:
            f.write(json.dumps(result) + "\n")


if args.command == "filter":
    rows_q = [q for row in qa.rows for q in row["questions"]]
    n_q, asks = len(rows_q), args.filter_asks * len(rows_q)
    digest = hashlib.sha256(json.dumps(rows_q, sort_keys=True).encode()).hexdigest()[:16]
    calls = logged_calls({"command": "filter", "questions": f"{n_q} questions, sha256 {digest}", "judge": args.judge,
                          "judge_format": fmt, "seed": args.seed, "filter_asks": args.filter_asks})
    rng, right = random.Random(args.seed), torch.zeros(n_q)
    if calls:
        print(f"resuming from {partial}: {sum(len(c['right']) for c in calls)} of {asks} blind asks done")
    bar = tqdm(total=asks, desc="blind asks", unit="q")
    for ask in range(args.filter_asks):  # each ask reshuffles the options (rng: in question order, whatever the chunks)
        for i in range(0, n_q, 4096):  # 4,096 questions a call: the progress bar's and the partial file's step
            chunk = rows_q[i:i + 4096]
            if calls:  # done before the kill: its results, and the generator's state after it
                call = calls.pop(0)
                version, internal, gauss = call["rng"]
                rng.setstate((version, tuple(internal), gauss))
            else:
                call = {"right": score_questions(judge, jtok, [""] * len(chunk), chunk, fmt, "argmax", rng),
                        "rng": rng.getstate()}
                log_call(call)
            right[i:i + len(chunk)] += torch.tensor(call["right"])
            bar.update(len(chunk))
    bar.close()
    leaks = iter((right / args.filter_asks >= args.max_blind_accuracy).tolist())
    kept, dropped = [], {}
    for row in qa.rows:
        qs = []
        for q in row["questions"]:
            stats = dropped.setdefault(q["type"], [0, 0])
            stats[1] += 1
            if next(leaks):
                stats[0] += 1
            else:
                qs.append(q)
        if qs:
            kept.append({**row, "questions": qs})
    write_qa(args.out, kept, qa.root)
    print_skipped(skipped)
    for t, (d, n) in sorted(dropped.items()):
        print(f"{t:16s} dropped {d:5d} of {n:5d} ({d / n:.0%})")
    print(f"kept {sum(len(r['questions']) for r in kept)} of {n_q} questions, {len(kept)} of {len(qa)} "
          f"images (dropped {len(qa) - len(kept)} left without questions); wrote {args.out}")
    os.remove(partial)
    sys.exit(0)

types = None if (args.data or args.all_types) else shapes.REWARD_TYPES
rngs = [random.Random(f"{args.seed}:{cid}") for cid, _, _ in records]  # a caption's draws: (seed, its id) only
digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]
rewards = [r for call in logged_calls({
    "command": "score", "captions": f"{len(records)} captions, sha256 {digest}", "judge": args.judge,
    "judge_format": fmt, "judge_mode": args.judge_mode, "seed": args.seed, "all_types": args.all_types,
    "questions_per_caption": args.questions_per_caption}) for r in call["rewards"]]
if rewards:
    print(f"resuming from {partial}: {len(rewards)} of {len(records)} captions scored")
bar = tqdm(total=len(records), initial=len(rewards), desc="scoring", unit="captions")
for i in range(len(rewards), len(records), 256):  # 256 captions a call: each draws from its own rng, so the chunks
    chunk = records[i:i + 256]  # (and a resume) leave the rewards as they are
    call = {"rewards": caption_rewards(judge, jtok, [c for _, c, _ in chunk], [it for _, _, it in chunk],
                                       args.questions_per_caption, fmt, args.judge_mode, rngs[i:i + 256],
                                       types).tolist()}
    log_call(call)
    rewards += call["rewards"]
    bar.update(len(chunk))
bar.close()
if args.out:
    write_whole(args.out, (json.dumps({"id": cid, "caption": cap, "reward": r}) + "\n"
                           for (cid, cap, _), r in zip(records, rewards)))
    os.remove(partial)
print_skipped(skipped)
print(f"{len(records)} captions, mean reward {torch.tensor(rewards).mean().item():.4f}" +
      (f", wrote {args.out}" if args.out else ""))
