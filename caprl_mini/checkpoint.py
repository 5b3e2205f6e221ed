"""Run folders, atomic checkpoints and exact resume.

    RUN/config.json        every flag of the run
    RUN/metrics.jsonl      one line per step
    RUN/samples.jsonl      a few sampled captions per step, with their rewards
    RUN/checkpoints/step_NNNNNN/   model + processor (save_pretrained, safetensors, loadable by transformers)
                                   + trainer_state.pt (optimizer state, step, skipped-update count, data source)
    RUN/final/             the last model, same layout as a checkpoint's model part
    RUN/eval/results.json  train_grpo.py's final evaluation, SFT and trained captioner side by side

A checkpoint is written into a temporary folder and renamed into place (atomic on POSIX), so a run killed
mid-write leaves the previous checkpoint intact and never a half-written one that looks complete.
Resume needs no RNG state: every random draw of a step is seeded from (seed, step) (the images) or
(seed, step, image) (sampling, question draws), so step k+1 after a resume is step k+1 of an uninterrupted run.
sft.py's runs use RUN = OUT/run (its --out is the model folder), config.json and checkpoints/ alone; their data
streams are sequential, so its trainer_state.pt also holds their generator's state (and the captioner's stage and
aux head).
"""
import json
import os
import re
import shutil

import torch

from .data import write_whole
from .models import save_model


def save_checkpoint(run_dir, step, model, proc, optimizer, keep=2, extra=None, meta=None):
    """Atomically write checkpoint `step` (trainer_state.pt holds the optimizer, the step and `extra`; a judge's
    `meta` goes to judge.json, as save_model writes it); keep the newest `keep` checkpoints. Refuses weights that
    are not finite. If writing fails (disk full, a kill), the temporary folder goes and the previous checkpoints
    are untouched."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"not saving checkpoint {step}: non-finite weights in {bad[:3]}")
    final = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
    try:
        save_model(model, proc, tmp, meta)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), **(extra or {})},
                   os.path.join(tmp, "trainer_state.pt"))
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        raise RuntimeError(f"could not write checkpoint {final} ({type(e).__name__}: {e}); "
                           f"the previous checkpoint is intact: {previous}") from e
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return [os.path.join(d, n) for n in sorted(os.listdir(d)) if re.fullmatch(r"step_\d{6}", n)]


def latest_checkpoint(run_dir):
    return (list_checkpoints(run_dir) or [None])[-1]


def resume_checkpoint(run_dir, resume, flags, may_change, default):
    """The newest checkpoint of run_dir to continue from, or None. Refuses (ValueError) a folder that holds
    checkpoints without `resume` (a fresh run would mix with them and prune them by name), and a resume whose
    `flags` differ from the run's config.json in any flag not in `may_change` (it would silently train another run).
    A flag the config lacks (a run started before the flag existed) ran at default(flag)."""
    ckpt = latest_checkpoint(run_dir)
    if resume and not ckpt:  # a mistyped --out would otherwise start over unnoticed
        print(f"--resume: no checkpoint in {run_dir}, starting from step 0", flush=True)
    if ckpt and not resume:
        raise ValueError(f"{run_dir} holds an earlier run's checkpoints ({ckpt}): add --resume to continue it, or "
                         "choose another --out")
    if ckpt and os.path.exists(os.path.join(run_dir, "config.json")):  # write_config's: never half-written
        saved = json.load(open(os.path.join(run_dir, "config.json")))
        shown = lambda v: ("on" if v else "off") if isinstance(v, bool) else v  # noqa: E731 (store_true flags)
        changed = [f"--{k.replace('_', '-')} {shown(v)} (was {shown(saved.get(k, default(k)))})"
                   for k, v in flags.items() if saved.get(k, default(k)) != v and k not in may_change]
        if changed:
            raise ValueError(f"--resume with other flags than {run_dir} was started with: {', '.join(changed)}")
    return ckpt


def write_config(run_dir, flags):
    """run_dir/config.json, every flag, atomically (a kill mid-write leaves the previous one)."""
    write_whole(os.path.join(run_dir, "config.json"), [json.dumps(flags, indent=1)])


def load_trainer_state(path):
    return torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)


def truncate_jsonl(path, last_step):
    """Drop log lines of steps after `last_step` (written after the checkpoint a run resumes from), and a last line
    cut short by a kill."""
    if not os.path.exists(path):
        return
    keep = []
    for line in open(path, encoding="utf-8"):
        try:
            if json.loads(line).get("step", -1) <= last_step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except json.JSONDecodeError:  # only a kill mid-write makes one, and only the last line
            break
    write_whole(path, keep)
