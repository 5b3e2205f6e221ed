"""Prism-style evaluation: captioner -> captions -> the judge answers every question from the caption alone.

The score is the reward's own function (judge.score_questions), read with argmax over freshly shuffled
options, over *all* question types, the held-out ones (never in the reward) reported separately. On the
built-in world the captions are also parsed into facts and scored exactly: precision (stated facts that are
true) and recall (true facts that are stated), so a reward bought with hallucinations shows up here.
Not the paper's Prism protocol, which asks each benchmark's own questions with its own prompt (the image replaced
by the caption), answered by generation at temperature 1.0 with no abstain option: these are not Prism numbers.
"""
import hashlib
import json
import os
import random

from tqdm import tqdm

from . import shapes
from .judge import gold_option, score_questions
from .models import CAPTION_INSTRUCTION, encode_prompts
from .sampling import decode, sample


def caption_items(model, proc, items, batch_size=50, max_new_tokens=64, temperature=0.0, n=1, seed=0,
                  instruction=CAPTION_INSTRUCTION):
    """n captions per item (greedy when temperature is 0): list of lists of (caption, token count). Sampled captions
    of an item depend on (seed, its id) only, not on the batching."""
    out = []
    for i0 in tqdm(range(0, len(items), batch_size), desc="captioning", unit="batch", disable=len(items) <= batch_size):
        batch = items[i0:i0 + batch_size]
        prompt = encode_prompts(proc, [it["image"] for it in batch], instruction)
        prompt = {k: v.to(model.device) for k, v in prompt.items()}
        s = sample(model, prompt, n, max_new_tokens, temperature, seeds=[item_seed(seed, it["id"]) for it in batch])
        caps, lens = decode(proc, s), s["mask"].sum(1).tolist()
        out += [list(zip(caps[j * n:(j + 1) * n], lens[j * n:(j + 1) * n])) for j in range(len(batch))]
    return out


def item_seed(seed, item_id):
    """A 63-bit seed from (seed, item id), the same in every process (Python's hash() of a str is not)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{item_id}".encode()).digest()[:8], "little") >> 1


def evaluate_captions(judge, jtok, fmt, items, captions, seed=0, details=None):
    """captions: per item a list of (caption, tokens). Returns the results.json record (without "path"): QA accuracy,
    the fraction of (caption, question) pairs answered right, over all captions (Prism's mean over n), and
    best-of-n, the same fraction with each image's best caption alone (equal to it when n = 1: an image with more
    questions weighs more in both). With a list as `details`, appends per item {"captions": [{"caption", "answers":
    [...]}]} (the HTML report's material)."""
    rng = random.Random(seed)
    rows_c, rows_q = [], []
    for it, caps in zip(items, captions):
        for cap, _ in caps:
            rows_c += [cap] * len(it["questions"])
            rows_q += it["questions"]
    chosen = score_questions(judge, jtok, rows_c, rows_q, fmt, "argmax", rng, return_choice=True)
    gold = [gold_option(q) for q in rows_q]
    right = [float(c == g) for c, g in zip(chosen, gold)]
    by_type, best, k = {}, [], 0
    for q, r in zip(rows_q, right):
        by_type.setdefault(q.get("type", "qa"), []).append(r)
    for it, caps in zip(items, captions):  # rows are grouped by item, then caption
        per_caption = []
        if details is not None:  # one entry per item, also one with no caption: the report pairs them by position
            details.append({"captions": []})
        for cap, _ in caps:
            n = len(it["questions"])
            per_caption.append(sum(right[k:k + n]))  # questions this caption answered right
            if details is not None:
                answers = [{"question": q["question"], "options": q["options"] + [shapes.ABSTAIN], "type": q.get(
                    "type", "qa"), "gold": g, "chosen": c, "right": bool(r)}
                    for q, g, c, r in zip(it["questions"], gold[k:k + n], chosen[k:k + n], right[k:k + n])]
                details[-1]["captions"].append({"caption": cap, "answers": answers})
            k += n
        best.append(max(per_caption, default=0.0))
    held = [r for q, r in zip(rows_q, right) if q.get("type") in shapes.HELDOUT_TYPES]
    res = {"n_images": len(items), "captions_per_image": sum(map(len, captions)) / max(1, len(captions)),
           "qa_accuracy": sum(right) / max(1, len(right)),
           "best_of_n_accuracy": sum(best) / max(1, sum(len(it["questions"]) for it, c in zip(items, captions) if c)),
           "qa_accuracy_by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
           "heldout_types_accuracy": sum(held) / len(held) if held else None,
           "mean_caption_tokens": sum(n for caps in captions for _, n in caps) / max(1, sum(map(len, captions)))}
    if items and "scene" in items[0]:  # the built-in world: exact facts
        f = fact_totals((cap, it["scene"]) for it, caps in zip(items, captions) for cap, _ in caps)
        res["fact_precision"] = (sum(c for c, _ in f["stated"].values())
                                 / max(1, sum(n for _, n in f["stated"].values())))
        res["fact_recall"] = f["n_recalled"] / max(1, f["n_true"])
    return res


def fact_totals(pairs):
    """shapes.score_facts pooled over (caption, scene) pairs: {"stated": attribute -> [correct, stated],
    "n_recalled", "n_true"}, so that precision and recall weigh every fact alike, not every caption."""
    out = {"stated": {a: [0, 0] for a in ["position"] + shapes.ATTRIBUTES + ["count"]}, "n_recalled": 0, "n_true": 0}
    for cap, scene in pairs:
        f = shapes.score_facts(cap, scene)
        for a, (c, n) in f["stated"].items():
            out["stated"][a][0] += c
            out["stated"][a][1] += n
        out["n_recalled"], out["n_true"] = out["n_recalled"] + f["n_recalled"], out["n_true"] + f["n_true"]
    return out


def summary_rows(results):
    """The summary table of write_results (console) and the HTML report: rows (label, held-out type?, one value per
    captioner, None where it has none, decimals to show: 3 for rates, 1 for means of counts); per-type rows are
    indented two spaces; a row nobody has (fact scores on real data) is left out."""
    types = dict.fromkeys(t for r in results for t in r.get("qa_accuracy_by_type", {}))
    rows = [("QA accuracy", False, [r.get("qa_accuracy") for r in results], 3)]
    rows += [(f"  {t}", t in shapes.HELDOUT_TYPES, [r.get("qa_accuracy_by_type", {}).get(t) for r in results], 3)
             for t in types]
    rows += [(label, False, [r.get(k) for r in results], digits) for label, k, digits in [
        ("held-out types", "heldout_types_accuracy", 3), ("best of n", "best_of_n_accuracy", 3),
        ("fact precision", "fact_precision", 3), ("fact recall", "fact_recall", 3),
        ("mean caption tokens", "mean_caption_tokens", 1), ("captions per image", "captions_per_image", 1)]]
    return [row for row in rows if any(v is not None for v in row[2])]


def write_results(folder, results):
    """folder/results.json, {"captioners": [one evaluate_captions record + "path" each]} (evaluate.py, and
    train_grpo.py's final evaluation), and the table on the console: captioners side by side, one column each."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "results.json")
    with open(path, "w") as f:
        json.dump({"captioners": results}, f, indent=1)
    names = [r["path"] if len(r["path"]) <= 28 else "..." + r["path"][-25:] for r in results]
    print(f"{'':24s}" + "".join(f"{n:>30s}" for n in names))
    for label, held, vals, digits in summary_rows(results):
        print(f"{label + (' (held out)' if held else ''):24s}"
              + "".join(f"{v:30.{digits}f}" if v is not None else f"{'-':>30s}" for v in vals))
    print(f"wrote {path}")
