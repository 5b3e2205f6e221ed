"""Shared fixtures: tiny models built from configs and saved to a temporary folder (no downloads)."""
import os
import runpy
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

from caprl_mini import models  # noqa: E402


@pytest.fixture(scope="session")
def tok():
    return models.letter_tokenizer()  # " A" one token: letter formats testable on tiny judges


@pytest.fixture(scope="session", params=["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def tiny_policy_dir(tok, tmp_path_factory, request):
    """A random tiny Qwen2.5-VL (and Qwen2-VL, Qwen3-VL: every test using this runs on all three), scaled up so
    that sampling and greedy decoding are not degenerate."""
    model, proc = models.build_tiny_policy(tok, seed=1, arch=request.param)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 and "visual" not in n:
                p.mul_(4.0)
    path = str(tmp_path_factory.mktemp(request.param))
    models.save_model(model, proc, path)
    return path


@pytest.fixture(scope="session")
def tiny_judge_dir(tok, tmp_path_factory):
    """A random tiny Qwen2 judge with grouped-query attention (2 query heads per key/value head), as the real ones."""
    model, t = models.build_tiny_judge(tok, seed=2, kv_heads=2)
    path = str(tmp_path_factory.mktemp("judge"))
    models.save_model(model, t, path, meta={"format": "cloze"})
    return path


def shipped(name):
    """A shipped checkpoint's folder. They are in git: one missing is a broken checkout, a failure, not a skip."""
    path = os.path.join(models.ASSETS, name)
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        pytest.fail(f"shipped checkpoint {path} missing: a partial checkout?")
    return path


@pytest.fixture(scope="session")
def chat_judge_dir(tok, tmp_path_factory):
    """A random tiny Qwen2 saved like a real chat judge: no judge.json, so it is asked with the paper's prompt."""
    model, t = models.build_tiny_judge(tok, seed=3)
    path = str(tmp_path_factory.mktemp("chat_judge"))
    models.save_model(model, t, path)
    return path


def sft(monkeypatch, *args):
    """sft.py's namespace, these arguments parsed and nothing run: a test replaces there what it watches, then calls
    a stage (train_captioner, train_judge) or a helper itself."""
    monkeypatch.setattr(sys, "argv", ["sft.py", *args])
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sft.py")
    return runpy.run_path(path, run_name="sft")["update"].__globals__  # the functions' own (run_path returns a copy)
