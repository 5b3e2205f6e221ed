"""Prism-style evaluation: each captioner captions held-out images, the judge answers every question from the
caption alone; QA accuracy overall, per question type and on the held-out types, and on the built-in world
exact fact precision / recall; several captioners side by side, optionally as one HTML page.

    python evaluate.py --captioner assets/captioner --captioner runs/grpo/final --out runs/eval --report report.html
    python evaluate.py --captioner Qwen/Qwen2.5-VL-3B-Instruct --judge Qwen/Qwen2.5-3B-Instruct --data qa.jsonl \
        --captions-per-image 4 --temperature 1.0 --out runs/eval_real          # Prism's setting, the reward's scoring
    python evaluate.py --captions runs/annotations.jsonl --data runs/world/qa.jsonl   # captions made elsewhere

--captions-per-image n reports the mean over all captions (Prism's number) and best-of-n (per image, the best
caption's answers; both pool the questions, so with n = 1 they are equal). --captions JSONL ({"id", "caption"} per
line, e.g. annotate.py's output, several lines per id allowed) evaluates captions without loading a captioner; every
evaluated image's id must be in it.
Under `torchrun --nproc_per_node N evaluate.py ...` rank r captions images r, r + N, ...; rank 0 gathers the
captions, scores them and writes: the same results as one process (sampled captions are seeded per image).
"""
import argparse
import gc
import os

import torch
import torch.distributed as dist

from caprl_mini.data import DataError, QAFile, World, at_least, print_skipped, read_captions, skip_bad, user_errors
from caprl_mini.evaluation import caption_items, evaluate_captions, write_results
from caprl_mini.report import write_report
from caprl_mini.models import (CAPTION_INSTRUCTION, JUDGE, SFT_CAPTIONER, check_policy, judge_meta, load_judge,
                               load_policy, pick_device)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--captioner", action="append", default=[], help="captioner folder or hub id (repeatable)")
parser.add_argument("--captions", action="append", default=[], help="caption JSONL to evaluate as is (repeatable)")
parser.add_argument("--judge", default=JUDGE, help="judge folder or hub id, or 'oracle' (built-in world)")
parser.add_argument("--judge-format", default=None, choices=["caprl", "letter", "cloze"],
                    help="how MCQs are posed (default: the judge folder's judge.json, else caprl: the paper's prompt)")
parser.add_argument("--data", default=None, help="QA JSONL; without it, held-out images of the built-in world")
parser.add_argument("--image-root", default=None, help="folder that relative image paths in --data resolve against")
parser.add_argument("--skip-bad", action="store_true",
                    help="skip bad --data / --captions lines and unreadable images (listed and counted) instead of "
                         "stopping with an error naming the file and line")
parser.add_argument("--images", type=at_least(1), default=200,
                    help="images to evaluate: the built-in world's held-out split, or --data's first readable rows")
parser.add_argument("--captions-per-image", type=at_least(1), default=1, help="captions per image (the paper: 4)")
parser.add_argument("--temperature", type=at_least(0.0, float), default=0.0,
                    help="caption sampling temperature (0 = greedy)")
parser.add_argument("--max-new-tokens", type=at_least(1), default=64, help="caption length cap")
parser.add_argument("--instruction", default=CAPTION_INSTRUCTION, help="the caption instruction")
parser.add_argument("--min-pixels", type=at_least(1), default=None, help="images resized to at least this many pixels")
parser.add_argument("--max-pixels", type=at_least(1), default=None, help="... and at most this many")
parser.add_argument("--seed", type=int, default=0, help="seed of option shuffling and caption sampling")
parser.add_argument("--out", default="runs/eval", help="output folder for results.json")
parser.add_argument("--report", default=None, help="also write this self-contained HTML page (in --out if relative)")
args = parser.parse_args()
captioners = args.captioner or ([] if args.captions else [SFT_CAPTIONER])
captioned = {}  # captioner path -> per image a list of (caption, tokens)
if args.captions_per_image > 1 and args.temperature == 0:
    parser.error("several captions per image need --temperature > 0")
if os.path.isfile(args.out):
    parser.error(f"--out {args.out} is a file, not a folder")
if not captioners and (args.captions_per_image > 1 or args.temperature > 0):  # they would be silently ignored
    parser.error("--captions-per-image and --temperature set how a --captioner captions; --captions files are "
                 "evaluated as they are")

world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun
device, dtype = pick_device()
if world > 1:
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
rank = dist.get_rank() if world > 1 else 0
skipped = [] if args.skip_bad else None  # (where, reason) of every bad line and image left out
items = []
with user_errors():
    data = QAFile(args.data, args.image_root, skipped) if args.data else World("eval")
    for i in range(len(data)):  # the first --images readable ones
        if len(items) == args.images:
            break
        with skip_bad(skipped):
            items.append(data[i])
    given = {}  # the --captions files, read and checked before any model loads
    for path in args.captions:
        given[path] = read_captions(path, skipped)
        missing = [it["id"] for it in items if it["id"] not in given[path]]
        if missing:
            print_skipped(skipped)  # --skip-bad: the bad lines behind the missing ids
            raise DataError(f"{path}: no caption for {len(missing)} of the {len(items)} images, e.g. {missing[0]!r}")
    judge_meta(args.judge, args.judge_format)  # the models checked now, not after an earlier one's captioning
    for path in captioners:
        check_policy(path)
for path in captioners:  # every rank captions its share; rank 0 keeps all captions
    with user_errors():
        model, proc = load_policy(path, device, dtype, args.min_pixels, args.max_pixels)
    model.eval()
    with torch.no_grad():
        mine = caption_items(model, proc, items[rank::world], max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, n=args.captions_per_image, seed=args.seed,
                             instruction=args.instruction)
    parts = [mine]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    # rank k captioned items k, k + world, ...: item i is rank i % world's caption i // world
    captioned[path] = [parts[i % world][i // world] for i in range(len(items))]
    del model
    gc.collect()  # whatever of it sits in a reference cycle goes now, not at the collector's next run
if world > 1:
    dist.destroy_process_group()
    if rank > 0:
        raise SystemExit(0)

with user_errors():
    judge, jtok, meta = load_judge(args.judge, device, dtype, args.judge_format)
fmt = meta["format"]  # --judge-format, else the judge folder's
results, details = [], []  # details: per captioner, per image, the captions and the judge's answers
for path in captioners + args.captions:
    if path in captioners:
        caps = captioned[path]
    else:  # token counts the file lacks: the judge tokenizer's (the oracle: words) + 1 for the end token, as sampled
        count = (lambda c: len(jtok.encode(c)) + 1) if jtok else (lambda c: len(c.split()) + 1)
        caps = [[(c, n if n is not None else count(c)) for c, n in given[path][it["id"]]] for it in items]
    details.append([])
    results.append({"path": path, **evaluate_captions(judge, jtok, fmt, items, caps, args.seed, details[-1])})
write_results(args.out, results)
print_skipped(skipped)
if args.report:
    records = [{"id": it["id"], "image": it["image"], "scene": it.get("scene"),
                "captioners": [{"name": r["path"], **d[i]} for r, d in zip(results, details)]}
               for i, it in enumerate(items)]
    path = os.path.join(args.out, args.report)
    write_report(path, results, records)
    print(f"wrote {path}")
