"""Caption many images with a trained captioner (the paper's CapRL-5M stage): batched, resumable, sharded.

    python annotate.py --model runs/grpo/final --images runs/world/qa.jsonl --out runs/annotations.jsonl
    python annotate.py --model Qwen/Qwen2.5-VL-3B-Instruct --images photos/ --out caps.jsonl --max-new-tokens 1024
    torchrun --nproc_per_node 8 annotate.py --model runs/caprl3b/final --images list.txt --out caps.jsonl

--images: a folder (every image file in it, recursively), a QA JSONL (its images and ids), or a text file with
one image path per line. Each captioned image is appended and flushed as one JSON record {"id", "image" (its path
relative to --out's folder), "caption", "tokens", and the settings: "model", "temperature", "max_new_tokens",
"seed", "instruction", "min_pixels", "max_pixels"}; a rerun skips the ids already in --out, so a killed run loses at
most the batch in flight and never writes an id twice, and refuses other settings than the file's (one file, one
captioner). Under torchrun, rank r of W takes the images whose position in the list is r mod W; all ranks append to
the same file (one locked write per record). An image that cannot be read is skipped and recorded, with the reason,
in OUT.errors.jsonl; reruns do not retry it (delete that file to retry). A path that names no file is counted, not
recorded (a wrong --image-root): a rerun tries it again. A bad line in a QA JSONL or list file stops the run with
`error: <file>:<line>: ...` (exit status 2); with --skip-bad it is left out, listed and counted. Captions are greedy
by default; with --temperature > 0 an image's caption depends on (--seed, its id) only, not on the batching or the
rank.
"""
import argparse
import os
import time

import torch
from tqdm import tqdm

from caprl_mini.data import (CaptionFile, DataError, MissingImage, at_least, list_images, load_image, print_skipped,
                             rebase, user_errors)
from caprl_mini.evaluation import caption_items
from caprl_mini.models import CAPTION_INSTRUCTION, load_policy, pick_device

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True, help="captioner: folder or hub id")
parser.add_argument("--images", required=True, help="folder, QA JSONL or list file of images")
parser.add_argument("--image-root", default=None, help="folder that relative paths in a QA JSONL / list resolve to")
parser.add_argument("--out", required=True, help="caption JSONL to append to")
parser.add_argument("--batch-size", type=at_least(1), default=32, help="images per sampler call")
parser.add_argument("--max-new-tokens", type=at_least(1), default=64, help="caption length cap in tokens")
parser.add_argument("--temperature", type=at_least(0.0, float), default=0.0, help="0: greedy")
parser.add_argument("--instruction", default=CAPTION_INSTRUCTION, help="the caption instruction")
parser.add_argument("--min-pixels", type=at_least(1), default=None, help="images resized to at least this many pixels")
parser.add_argument("--max-pixels", type=at_least(1), default=None, help="... and at most this many")
parser.add_argument("--seed", type=int, default=0, help="seed of sampling (with --temperature > 0)")
parser.add_argument("--skip-bad", action="store_true",
                    help="skip bad rows (QA JSONL / list file lines), list and count them in the summary instead of "
                    "stopping; unreadable images are always skipped and listed in OUT.errors.jsonl")
args = parser.parse_args()

rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
device, dtype = pick_device()  # under torchrun: the GPU of this process's LOCAL_RANK
skipped = [] if args.skip_bad else None  # --skip-bad: bad lines are listed here instead of stopping the run
settings = {"model": args.model, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
            "seed": args.seed, "instruction": args.instruction, "min_pixels": args.min_pixels,
            "max_pixels": args.max_pixels}
with user_errors():
    out, errors = CaptionFile(args.out), CaptionFile(args.out + ".errors.jsonl", field="error")
    old = out.first or {}  # the file's settings (files written before a setting was recorded: the ones it has)
    changed = [f"--{k.replace('_', '-')} {old[k]!r} there, {v!r} now" for k, v in settings.items() if k in old and
               old[k] != v]
    if changed:
        raise DataError(f"{args.out}:1: written with other settings ({'; '.join(changed)}): rerun with the file's, "
                        "or choose another --out")
    todo = [im for k, im in enumerate(list_images(args.images, args.image_root, skipped)) if k % world == rank]
before = len(todo)
todo = [im for im in todo if im[0] not in out.done and im[0] not in errors.done]
print(f"rank {rank}/{world}: {before} images in this shard, {before - len(todo)} already done or failed, "
      f"{len(todo)} to caption")
with user_errors():
    model, proc = load_policy(args.model, device, dtype, args.min_pixels, args.max_pixels)
model.eval()
folder = os.path.dirname(os.path.abspath(args.out))
n_ok = n_bad = n_missing = 0
t0 = time.time()
bar = tqdm(total=len(todo), unit="img", disable=rank != 0 and world > 1)
for b0 in range(0, len(todo), args.batch_size):
    batch, items = todo[b0:b0 + args.batch_size], []
    for image_id, ref, root in batch:
        # a path (not inline bytes / base64), written relative to --out's folder: sft.py --captions resolves it there
        shown = rebase(ref, root, folder) if isinstance(ref, str) and len(ref) < 1024 else None
        try:
            items.append((image_id, shown, {"id": image_id, "image": load_image(ref, root)}))  # id: its sampling seed
        except MissingImage as e:  # not recorded: a rerun with the right --image-root tries it again
            if not n_missing:  # the first one (the bar counts them)
                print(f"skipped: {e}", flush=True)
            n_missing += 1
        except (OSError, DataError) as e:  # unreadable (empty, corrupt, too large): record it, go on
            errors.append({"id": image_id, "image": shown, "error": f"{type(e).__name__}: {e}"})
            n_bad += 1
    if items:
        with torch.no_grad():
            caps = caption_items(model, proc, [it for _, _, it in items], batch_size=len(items),
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 seed=args.seed, instruction=args.instruction)
        for (image_id, shown, _), [(cap, n_tok)] in zip(items, caps):
            out.append({"id": image_id, "image": shown, "caption": cap, "tokens": n_tok, **settings})
        n_ok += len(items)
    bar.update(len(batch))
    bar.set_postfix(errors=n_bad, missing=n_missing)
bar.close()
if rank == 0:
    print_skipped(skipped)
rate = (n_ok + n_bad) / max(1e-9, time.time() - t0)
print(f"rank {rank}/{world}: captioned {n_ok}, unreadable {n_bad} (listed in {args.out}.errors.jsonl), "
      f"missing {n_missing} (not recorded: check --image-root; a rerun tries them again), {rate:.1f} images/s; "
      f"{args.out} now holds {len(CaptionFile(args.out).done)} ids")
