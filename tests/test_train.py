"""End-to-end: the real train_grpo.py as a subprocess, from the shipped checkpoints."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import shipped

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = {"gen_tokens_per_s", "gen_seconds", "reward_seconds", "step_seconds"}


def run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_grpo.py"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def metrics(out):
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in open(os.path.join(out, "metrics.jsonl"))]


def test_four_steps_equal_two_plus_resume_plus_two(tmp_path):
    """Weights and metrics of an interrupted-and-resumed run equal those of an uninterrupted one, exactly."""
    shipped("captioner")
    common = ["--judge", "oracle", "--images-per-step", "2", "--group-size", "4", "--max-new-tokens", "40",
              "--eval-images", "0", "--lr", "1e-3", "--warmup-steps", "1", "--micro-batch-images", "1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(*common, "--steps", "4", "--save-every", "2", "--out", a)
    run(*common, "--steps", "2", "--save-every", "2", "--out", b)  # stops after step 2 (a checkpoint at 2)
    run(*common, "--steps", "4", "--save-every", "2", "--out", b, "--resume")
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in mb] == [0, 1, 2, 3] and ma == mb
    assert any(m["grad_norm"] > 0 for m in ma)  # the updates were real, so equality means something
    wa, wb = load_file(os.path.join(a, "final", "model.safetensors")), load_file(os.path.join(b, "final", "model.safetensors"))
    w0 = load_file(os.path.join(shipped("captioner"), "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], w0[k]) for k in wa)


def test_short_grpo_training_moves_the_reward(tmp_path):
    """A real, short CapRL training from the shipped SFT captioner and judge: the reward must go up."""
    shipped("captioner"), shipped("judge")
    out = str(tmp_path / "run")
    run("--steps", "40", "--eval-images", "50", "--out", out, "--save-every", "0")
    r = [json.loads(ln)["reward_mean"] for ln in open(os.path.join(out, "metrics.jsonl"))]
    first, last = sum(r[:10]) / 10, sum(r[-10:]) / 10
    assert last > first + 0.05, (first, last)
    res = json.load(open(os.path.join(out, "eval", "results.json")))["captioners"]
    assert len(res) == 2 and res[1]["fact_recall"] > res[0]["fact_recall"]
