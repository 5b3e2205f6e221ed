"""The CapRL reward as a standalone tool: captions + MCQs -> per-caption reward (the same function the trainer
optimises, caprl_mini.judge.caption_rewards).

    python reward.py score --captions caps.jsonl --data qa.jsonl --judge assets/judge --out rewards.jsonl
    python reward.py score --captions caps.jsonl --judge oracle        # built-in world ids (shapes-eval-12)

--captions: JSONL of {"id", "caption"}; each id must be an id of --data (or of the built-in world:
shapes-<split>-<index>). Writes {"id", "caption", "reward"} per line and prints the mean.
"""
import argparse
import json
import random
import re

from caprl_mini import shapes
from caprl_mini.data import DataError, QAFile
from caprl_mini.judge import caption_rewards
from caprl_mini.models import JUDGE, load_judge, pick_device

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("command", choices=["score"], help="score: reward each caption")
parser.add_argument("--captions", required=True, help="JSONL of {id, caption}")
parser.add_argument("--data", default=None, help="QA JSONL the ids refer to (default: the built-in world)")
parser.add_argument("--judge", default=JUDGE, help="judge folder or hub id, or 'oracle'")
parser.add_argument("--judge-format", default=None, choices=["caprl", "letter", "cloze"],
                    help="how MCQs are posed (default: the judge folder's judge.json, else caprl: the paper's prompt)")
parser.add_argument("--judge-mode", default="prob", choices=["prob", "sample", "argmax"], help="how the answer is read")
parser.add_argument("--questions-per-caption", type=int, default=8, help="N question draws per caption")
parser.add_argument("--all-types", action="store_true", help="built-in world: draw held-out question types too")
parser.add_argument("--seed", type=int, default=0, help="seed of question draws and option shuffling")
parser.add_argument("--out", default=None, help="output JSONL (default: print only the mean)")
args = parser.parse_args()

if args.data:
    qa = QAFile(args.data)
    by_id = {row["id"]: i for i, row in enumerate(qa.rows)}
records = []
for n, line in enumerate(open(args.captions, encoding="utf-8"), 1):
    if not line.strip():
        continue
    try:
        rec = json.loads(line)
        cid, cap = str(rec["id"]), rec["caption"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DataError(f"{args.captions}:{n}: expected a JSON object with 'id' and 'caption'") from None
    if args.data:
        if cid not in by_id:
            raise DataError(f"{args.captions}:{n}: id {cid!r} is not in {args.data}")
        questions = qa.rows[by_id[cid]]["questions"]
    else:
        m = re.fullmatch(r"shapes-(\w+)-(\d+)", cid)
        if not m:
            raise DataError(f"{args.captions}:{n}: id {cid!r} is not a built-in world id (shapes-<split>-<index>)")
        questions = shapes.world_item(int(m.group(2)), m.group(1))["questions"]
    records.append((cid, cap, {"questions": questions}))

device, dtype = pick_device()
judge, jtok, meta = load_judge(args.judge, device, dtype)
fmt = args.judge_format or meta["format"]
types = None if (args.data or args.all_types) else shapes.REWARD_TYPES
rewards = caption_rewards(judge, jtok, [c for _, c, _ in records], [it for _, _, it in records],
                          args.questions_per_caption, fmt, args.judge_mode, random.Random(args.seed), types)
if args.out:
    with open(args.out, "w") as f:
        for (cid, cap, _), r in zip(records, rewards.tolist()):
            f.write(json.dumps({"id": cid, "caption": cap, "reward": r}) + "\n")
print(f"{len(records)} captions, mean reward {rewards.mean().item():.4f}" + (f", wrote {args.out}" if args.out else ""))
