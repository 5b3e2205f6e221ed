"""The benchmark scripts run on the current library, at toy sizes, and keep their contract (issue 6): the last line
of stdout is one JSON object with "bench", "device" and "speedup", and the figures that say the two methods compute
the same thing are within fp32 rounding. A GPU session has minutes, not hours: a script broken by a library change
must fail here, not there. Nothing here is timed (the ratios are the benchmarks' business, BENCHMARKS.md)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
    """Run benchmarks/<script> with args; its last line, parsed. A failure shows the script's own error."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], cwd=ROOT, text=True,
                       capture_output=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bench"] and out["device"], out
    return out


def test_sampling_bench_reports_both_methods():
    out = run("bench_sampling.py", "--models", "shipped", "--images", "2", "--group-size", "2", "--new-tokens", "8",
              "--repeats", "1", "--threads", "1", "--device", "cpu")
    shipped = out["models"]["shipped"]
    assert out["new_tokens"] == 8 and out["speedup"] == shipped["speedup"] > 0
    assert set(shipped["tokens_per_s"]) >= {"generate", "sampler"}


def test_logprobs_bench_fused_equals_naive_within_fp32():
    out = run("bench_logprobs.py", "--tokens", "64", "--hidden", "32", "--vocab", "1000", "--device", "cpu")
    assert out["max_error"] <= 1e-5  # the bound, against float64
    assert out["speedup"] > 0 and out["memory_reduction"] > 0


def test_judge_bench_scores_what_generate_reads():
    out = run("bench_judge.py", "--models", "tiny", "--captions", "2", "--questions", "2", "--caption-tokens", "40",
              "--repeats", "1", "--threads", "1", "--device", "cpu")
    assert out["models"]["tiny"]["max_logit_diff"] <= 1e-5  # judge.py's option logits == generate's first step
    assert out["speedup"] > 0


def test_teacher_bench_packed_states_equal_per_row():
    out = run("bench_teacher.py", "--hidden", "128", "--layers", "1", "--images", "1", "--group-size", "2",
              "--new-tokens", "8", "--image-side", "56", "--repeats", "1", "--threads", "1")
    assert max(out["max_state_difference"].values()) <= 1e-5 and out["speedup"] > 0


def test_real_step_bench_runs_train_grpo_at_toy_width():
    out = run("bench_real_step.py", "--scale", "tiny", "--images", "2", "--group-size", "2", "--new-tokens", "8",
              "--image-side", "56")
    assert out["caption_tokens_mean"] == 8  # no caption stopped early: the fixed work the TRL comparison needs
    assert out["step_seconds"] > 0 and out["plan_fixed_gib"] > 0


def test_trl_bench_both_sides_do_the_same_work():
    """Only where TRL is installed (benchmarks/README.md: its own venv; never a project dependency)."""
    pytest.importorskip("trl")
    out = run("bench_trl.py", "--rounds", "1", "--steps", "2", "--threads", "1", "--images-per-step", "2",
              "--group-size", "2", "--max-new-tokens", "8")
    assert out["median"]["project"]["tokens"] == out["median"]["trl"]["tokens"] == 8 and out["speedup"] > 0


def test_gpu_check_passes_on_the_cpu_against_itself():
    """check_gpu.py is the first thing a GPU session runs: the script itself, its static (compiled) decode, flex and
    fused variants, packed teacher forcing, loss and judge, device cpu against cpu."""
    assert run("check_gpu.py", "--device", "cpu")["ok"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_paths_equal_the_cpu_ones():
    assert run("check_gpu.py", "--device", "cuda")["ok"] is True
