"""End-to-end: the real train_grpo.py as a subprocess (or in this process, its calls recorded), from the shipped
checkpoints; sft.py's stages and helpers in this process, on tiny models it builds with a few steps."""
import json
import os
import random
import runpy
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from caprl_mini import grpo, judge, logprobs, models, sampling, shapes
from caprl_mini.logprobs import token_logprobs
from conftest import sft, shipped

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
              "--eval-images", "0", "--lr", "1e-3", "--warmup-steps", "1", "--micro-batch-images", "1",
              "--beta", "0.5"]  # KL on: the resumed run must keep the initial policy as its reference
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(*common, "--steps", "4", "--save-every", "2", "--out", a)
    run(*common, "--steps", "2", "--save-every", "2", "--out", b)  # stops after step 2 (a checkpoint at 2)
    run(*common, "--steps", "4", "--save-every", "2", "--out", b, "--resume")
    last = os.stat(os.path.join(b, "checkpoints", "step_000004")).st_ino
    run(*common, "--steps", "4", "--save-every", "2", "--out", b, "--resume")  # finished: nothing to train or rewrite
    assert os.stat(os.path.join(b, "checkpoints", "step_000004")).st_ino == last
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
    # the trainer's closing table is evaluate.py's on the same two captioners and images, to the last digit
    ev = str(tmp_path / "eval")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--captioner", shipped("captioner"),
                        "--captioner", os.path.join(out, "final"), "--images", "50", "--out", ev], cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    strip = lambda rs: [{k: v for k, v in x.items() if k != "path"} for x in rs]  # noqa: E731
    assert strip(json.load(open(os.path.join(ev, "results.json")))["captioners"]) == strip(res)


def _qa_file(tmp_path, n=4):
    """A QA JSONL of built-in world images saved as PNG files, half in CapRL-QA row form."""
    rows = []
    for i in range(n):
        item = shapes.world_item(i, "test")
        item["image"].save(tmp_path / f"{i}.png")
        qs = [{k: q[k] for k in ("question", "options", "answer")} for q in item["questions"]]
        if i % 2:
            gt = [{"question": q["question"], "choices": [f"{L}) {o}" for L, o in zip("ABCD", q["options"])],
                   "answer": q["answer"]} for q in qs]
            rows.append({"id": f"img{i}", "images": [f"{i}.png"], "reward_model": {"ground_truth": gt}})
        else:
            rows.append({"id": f"img{i}", "image": f"{i}.png", "questions": qs})
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("tiny_policy_dir, memory_flags", [  # memory flags: on Qwen2.5-VL only (CI time)
    ("qwen2_5_vl", []), ("qwen2_vl", []), ("qwen3_vl", []),
    ("qwen2_5_vl", ["--gradient-checkpointing", "1", "--freeze-vision", "1"])], indirect=["tiny_policy_dir"],
    ids=["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen2_5_vl-memory-flags"])
def test_two_grpo_steps_with_saved_checkpoints_and_a_chat_judge(tiny_policy_dir, chat_judge_dir, tmp_path,
                                                                  memory_flags):
    """Qwen2-VL and Qwen2.5-VL policies and a Qwen2 chat judge, saved by the test, go through the same loading
    path as hub ids; the judge (no judge.json) is asked with the paper's prompt. Two steps change the weights
    (all but a frozen vision tower)."""
    out = str(tmp_path / "run")
    run("--policy", tiny_policy_dir, "--judge", chat_judge_dir, "--data", _qa_file(tmp_path), "--steps", "2",
        "--images-per-step", "2", "--group-size", "4", "--max-new-tokens", "8", "--micro-batch-images", "1",
        "--questions-per-caption", "2",
        "--lr", "1e-2", "--zero-truncated", "0", "--eval-images", "2", "--save-every", "0", "--out", out,
        *memory_flags)  # random weights never stop: keep the reward of captions cut at the cap
    assert json.load(open(os.path.join(out, "config.json")))["policy"] == tiny_policy_dir
    assert len(metrics(out)) == 2 and len(json.load(open(os.path.join(out, "eval", "results.json")))["captioners"]) == 2
    w0 = load_file(os.path.join(tiny_policy_dir, "model.safetensors"))
    w1 = load_file(os.path.join(out, "final", "model.safetensors"))
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    visual = {k for k in w0 if k.startswith(("visual.", "model.visual."))}  # Qwen2/2.5-VL save the original names
    assert visual and changed - visual  # the language model trained
    assert bool(changed & visual) == (not memory_flags)  # the vision tower too, unless frozen


def test_sft_on_caption_jsonl_learns_its_captions(tmp_path):
    """sft.py captioner --captions: a fresh captioner trained on caption JSONL (annotate.py's format) writes what
    the file taught it (here one fixed caption for every image, so the check is exact)."""
    qa = _qa_file(tmp_path, 6)
    caps = str(tmp_path / "caps.jsonl")
    with open(caps, "w") as f:
        for i in range(6):
            f.write(json.dumps({"id": f"img{i}", "caption": "a large red star at the center."}) + "\n")
    out = str(tmp_path / "student")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), "captioner", "--captions", caps, "--data", qa,
                        "--out", out, "--caption-steps", "60", "--batch-size", "8", "--eval-images", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from caprl_mini.evaluation import caption_items
    from caprl_mini.models import load_policy
    model, proc = load_policy(out)
    got = caption_items(model.eval(), proc, [shapes.world_item(50, "test")])
    assert got[0][0][0] == "a large red star at the center."


def test_sft_judge_goes_on_training_a_saved_judge(tmp_path):
    """sft.py judge --judge-init <judge folder>, the second run that made the shipped judge: the loaded judge trains
    (load_judge loads for inference, frozen: this failed at the first backward) and nothing is evaluated with
    --eval-images 0."""
    out = str(tmp_path / "judge")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), "judge", "--judge-init", shipped("judge"),
                        "--out", out, "--judge-steps", "2", "--batch-size", "4", "--eval-every", "1",
                        "--eval-images", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert '"judge' not in r.stdout and "acc" not in r.stdout  # no evaluation printed
    w0 = load_file(os.path.join(shipped("judge"), "model.safetensors"))
    w1 = load_file(os.path.join(out, "model.safetensors"))
    assert w0.keys() == w1.keys() and any(not torch.equal(w0[k], w1[k]) for k in w0)


def test_cosine_schedule_warms_up_then_decays_and_the_last_step_still_learns(tmp_path):
    """--lr-schedule cosine, 1 warm-up step of 4: lr, lr, then half a cosine that would reach 0 one step after the
    last (it reached 0 at the last step, whose rollout and update were then wasted)."""
    out = str(tmp_path / "run")
    run("--judge", "oracle", "--steps", "4", "--warmup-steps", "1", "--lr-schedule", "cosine", "--lr", "1e-3",
        "--images-per-step", "1", "--group-size", "2", "--max-new-tokens", "4", "--micro-batch-images", "1",
        "--eval-images", "0", "--save-final", "0", "--out", out)
    lrs = [m["lr"] for m in metrics(out)]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3 * 0.75, 1e-3 * 0.25])  # 0.5 (1 + cos(pi t)), t = 0, 0, 1/3, 2/3


def run_in_process(monkeypatch, *args):
    """train_grpo.py in this process, so that tests can wrap what it calls; returns its globals."""
    monkeypatch.setattr(sys, "argv", ["train_grpo.py", *args])
    handler = signal.getsignal(signal.SIGINT)
    try:
        return runpy.run_path(os.path.join(ROOT, "train_grpo.py"), run_name="__main__")
    finally:
        signal.signal(signal.SIGINT, handler)


def spy(monkeypatch, owner, name, calls):
    """Wrap owner.name: every call's arguments and result are appended to calls."""
    real = getattr(owner, name)

    def wrapped(*a, **k):
        out = real(*a, **k)
        calls.append((a, k, out))
        return out
    monkeypatch.setattr(owner, name, wrapped)


def test_every_flag_reaches_the_arithmetic(tmp_path, monkeypatch):
    """One short run with non-default flags, its calls recorded: each flag arrives where it acts. --advantage none
    (r - group mean), --mask-truncated (no loss on captions without EOS) with sequence aggregation (those captions
    leave the normaliser), --beta (a frozen reference: the policy at step 0, apart from it by the last step),
    --length-bounds/--length-weight (token counts without the end token), --grad-clip, --updates-per-rollout, the
    warm-up learning rate, --gradient-checkpointing, the reward's generators from (seed, step, image), samples.jsonl."""
    rolls, advs, losses, clips, lrs, rewards = [], [], [], [], [], []
    spy(monkeypatch, sampling, "sample", rolls)
    spy(monkeypatch, grpo, "advantages", advs)
    spy(monkeypatch, grpo, "flat_token_loss", losses)
    spy(monkeypatch, torch.nn.utils, "clip_grad_norm_", clips)
    real_rewards = judge.caption_rewards

    def caption_rewards(*a, **k):  # the generators' states as they arrive (the call moves them on)
        states = [rng.getstate() for rng in a[7]]
        rewards.append(((*a, k), states, real_rewards(*a, **k)))
        return rewards[-1][2]
    monkeypatch.setattr(judge, "caption_rewards", caption_rewards)

    class AdamW(torch.optim.AdamW):
        def step(self, *a, **k):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(*a, **k)
    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    out = str(tmp_path / "run")
    g = run_in_process(monkeypatch, "--judge", "oracle", "--images-per-step", "2", "--group-size", "4",
                       "--micro-batch-images", "1", "--max-new-tokens", "24", "--steps", "3", "--warmup-steps", "2",
                       "--lr", "1e-3", "--eval-images", "0", "--save-final", "0", "--log-samples", "8", "--out", out,
                       "--advantage", "none", "--mask-truncated", "1", "--zero-truncated", "0", "--loss-aggregation",
                       "sequence", "--beta", "0.5", "--length-bounds", "3", "6", "--length-weight", "0.5",
                       "--grad-clip", "0.5", "--updates-per-rollout", "2", "--gradient-checkpointing", "1")
    assert g["model"].is_activation_checkpointing and g["ref_model"] is not None
    assert lrs == [5e-4] * 2 + [1e-3] * 4  # 2 updates a step; warm-up: lr (step + 1) / 2
    assert [a[1] for a, _, _ in clips] == [0.5] * 6
    logged = metrics(out)
    samples = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
    assert 0 < sum(m["truncated_frac"] for m in logged) < 3  # captions with and without EOS
    for step, m in enumerate(logged):
        roll, (a, states, r) = rolls[step][2], rewards[step]
        done = ~roll["truncated"]  # (8,) the captions that ended with EOS
        assert a[8] == shapes.REWARD_TYPES and a[9] == {"tokens": (roll["mask"].sum(1) - done.long()).tolist(),
                                                         "length_bounds": [3, 6], "length_weight": 0.5}
        assert states[::4] == [random.Random(f"0:reward:{step}:{b}").getstate() for b in (0, 1)]
        assert advs[step][0][1:] == (4, "none")
        assert torch.allclose(advs[step][2], r - r.view(2, 4).mean(1).repeat_interleave(4))
        for update in range(2):
            for b in range(2):  # micro-batch b: image b's 4 captions
                la = losses[4 * step + 2 * update + b][0]
                rows = slice(4 * b, 4 * b + 4)
                assert torch.equal(la[2], roll["mask"][rows] * done[rows, None])  # the loss mask
                assert la[3] == max(1, done.sum().item()) and la[6] == "sequence" and la[8] == 0.5
        assert [s["reward"] for s in samples if s["step"] == step] == pytest.approx(r.tolist())
        assert m["reward_mean"] == pytest.approx(r.mean().item())
    # the first update of steps 0 and 2, where the policy is the one that sampled: the reference equals it at first,
    # not after 4 updates
    kl = [(la[7] - la[0])[la[9].bool()].abs().max().item() for la, _, _ in (losses[0], losses[8])]
    assert kl[0] < 1e-4 < 1e-3 < kl[1], kl
    ref, first = g["ref_model"], models.load_policy(shipped("captioner"))[0].state_dict()  # still the initial policy
    assert all(torch.equal(v, first[k]) for k, v in ref.state_dict().items())
    la = losses[-2][0]  # the last step's last update, image 0: its reference log-probs are the reference's own
    h = g["completion_states"](ref, g["prompt"], g["pos"], g["nxt"], g["tokens"], g["mask"], 0, 1)
    want = token_logprobs(h, ref.get_output_embeddings().weight, g["tokens"][:4][la[9].bool()])
    assert torch.allclose(la[7][la[9].bool()], want, atol=1e-5)


TINY = ["--judge", "oracle", "--images-per-step", "2", "--group-size", "4", "--max-new-tokens", "24", "--steps", "2",
        "--lr", "1e-3", "--warmup-steps", "1", "--eval-images", "0", "--save-final", "0", "--micro-batch-images", "1"]


def test_logged_metrics_count_what_they_say_whatever_the_micro_batches(tmp_path, monkeypatch):
    """reward_mean is after the zero for captions without EOS, truncated_frac and frac_zero_std_groups count what
    they name; and micro-batches of 1 or 2 images log the same step (entropy, loss, ratio, gradient norm)."""
    runs = []
    for micro in ("1", "2"):
        rolls, rewards = [], []
        spy(monkeypatch, sampling, "sample", rolls)
        spy(monkeypatch, judge, "caption_rewards", rewards)
        out = str(tmp_path / micro)
        run_in_process(monkeypatch, *TINY, "--micro-batch-images", micro, "--out", out)
        runs.append(metrics(out))
        monkeypatch.undo()
    assert 0 < sum(m["truncated_frac"] for m in runs[0]) < 2  # captions with and without EOS
    for step, m in enumerate(runs[0]):
        done = ~rolls[step][2]["truncated"]
        r = rewards[step][2] * done  # --zero-truncated 1
        assert m["truncated_frac"] == pytest.approx(1 - done.float().mean().item())
        assert m["reward_mean"] == pytest.approx(r.mean().item())
        assert m["frac_zero_std_groups"] == sum(len(set(g.tolist())) == 1 for g in r.view(2, 4)) / 2
        assert runs[1][step] == pytest.approx(m, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("broken", ["loss", "gradient"])
def test_a_non_finite_loss_or_gradient_skips_the_update_and_says_which(tmp_path, monkeypatch, broken):
    """A NaN loss or an inf gradient entry: AdamW never steps, and each step's log names which of the two it was."""
    steps = []

    class AdamW(torch.optim.AdamW):
        def step(self, *a, **k):
            steps.append(1)
            return super().step(*a, **k)
    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    if broken == "loss":
        real = logprobs.logprobs_and_loss
        monkeypatch.setattr(logprobs, "logprobs_and_loss", lambda *a, **k: (lambda lp, loss, ent: (
            lp, loss * float("nan"), ent))(*real(*a, **k)))
    else:
        real = torch.nn.utils.clip_grad_norm_

        def clip(params, *a, **k):
            next(p for p in params if p.grad is not None).grad[0] = float("inf")
            return real(params, *a, **k)
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    out = str(tmp_path / "run")
    run_in_process(monkeypatch, *TINY, "--out", out)
    assert [m["skipped"] for m in metrics(out)] == [f"non-finite {broken}"] * 2 and steps == []


# ---------------------------------------------------------------- sft.py
def record_lr(g):
    """Record each (step, total) the learning rate is asked for."""
    calls, lr_at = [], g["lr_at"]
    g["lr_at"] = lambda step, total, peak: calls.append((step, total)) or lr_at(step, total, peak)
    return calls


def test_sft_lr_warms_up_over_100_steps_then_decays_to_a_tenth(monkeypatch):
    lr_at = sft(monkeypatch, "judge", "--out", "unused")["lr_at"]
    assert [lr_at(s, 1100, 1.0) for s in (0, 49, 99, 100, 600, 1100)] == pytest.approx([0.01, 0.5, 1, 1, 0.55, 0.1])
    assert lr_at(1099, 1100, 1.0) > 0.1


def test_sft_update_steps_at_its_lr_on_this_loss_gradient_clipped_to_norm_1(monkeypatch):
    """Under SGD the step is lr x the gradient: of this loss only (the last one's cleared), at norm 1 (clipped)."""
    update = sft(monkeypatch, "judge", "--out", "unused")["update"]
    model = torch.nn.Linear(2, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    w0 = model.weight.detach().clone()
    update(model, opt, 10 * model.weight[0, 0], 0.1)
    update(model, opt, 10 * model.weight[0, 1], 0.1)
    assert torch.allclose(w0 - model.weight.detach(), torch.tensor([[0.1, 0.1]]))


def test_sft_stage_two_alone_from_the_saved_stage_one_is_the_same_model(tmp_path, monkeypatch):
    """`--init <stage 1> --full-steps 0` redoes stage 2 exactly (sft.py's docstring): each stage has its own seeds,
    optimizer, schedule and data, full captions in stage 1 and human ones (some facts left out) in stage 2."""
    p, a, b = (str(tmp_path / n) for n in "pab")
    common = ["--human-steps", "2", "--batch-size", "4", "--eval-images", "0"]
    runs = []
    for args in (["--full-steps", "2", "--perception-out", p, "--out", a],
                 ["--init", p, "--full-steps", "0", "--out", b]):
        g = sft(monkeypatch, "captioner", *common, *args)
        lrs, recalls, world_batch = record_lr(g), [], g["world_batch"]

        def recorded(human):  # world_batch, each batch's (human?, recall of each caption) recorded
            draw = world_batch(human)

            def d(rng):
                images, caps, scenes = draw(rng)
                recalls.append((human, [shapes.score_facts(c, s)["recall"] for c, s in zip(caps, scenes)]))
                return images, caps, scenes
            return d
        g["world_batch"] = recorded
        g["train_captioner"]()
        runs.append((lrs, recalls))
    assert runs[0][0] == [(0, 2), (1, 2)] * 2 and runs[1][0] == [(0, 2), (1, 2)]
    assert runs[0][1][2:] == runs[1][1]  # stage 2's data, whatever ran before it
    assert all(h is False and min(r) == 1 for h, r in runs[0][1][:2])  # stage 1: every fact
    assert all(h is True for h, _ in runs[1][1]) and min(min(r) for _, r in runs[1][1]) < 1
    wa, wb, wp = (load_file(os.path.join(x, "model.safetensors")) for x in (a, b, p))
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and any(not torch.equal(wa[k], wp[k]) for k in wa)


class Killed(Exception):
    pass


def killed_at(g, n):
    """sft.py's `update` raises at its n-th call, as a kill would stop the run there."""
    calls, update = [], g["update"]

    def u(*a):
        calls.append(1)
        if len(calls) == n:
            raise Killed
        update(*a)
    g["update"] = u


@pytest.mark.parametrize("stage, stops", [("judge", [4, "stop-at"]), ("captioner", [3, 4, 5]), ("captions", [3])])
def test_sft_killed_and_resumed_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch, capsys, stage, stops):
    """A run killed in its n-th update goes on from its newest checkpoint (OUT/run, every 2 steps and at each
    stage's end) with --resume to the weights of an uninterrupted run, bit for bit: the judge from step 2, and from
    a run that stopped at step 3 with --judge-stop-at; the captioner (3 + 3 steps) from stage 1's step 2, from stage
    1's end (its stage 2 starts afresh, stage 1's model saved again) and from stage 2's step 1 (stage 1 not redone);
    a captioner on caption JSONL from step 2. A fresh run over the checkpoints and a resume with another --lr are
    refused."""
    flags = {"judge": ["--judge-init", "", "--judge-steps", "6"],
             "captioner": ["--full-steps", "3", "--human-steps", "3"],
             "captions": ["--captions", str(tmp_path / "caps.jsonl"), "--data", world_qa(tmp_path, 4),
                          "--caption-steps", "4"]}[stage]
    with open(tmp_path / "caps.jsonl", "w") as f:
        f.writelines(json.dumps({"id": str(i), "caption": f"{i} large red stars."}) + "\n" for i in range(4))
    train = "train_judge" if stage == "judge" else "train_captioner"
    out = lambda name: ["--out", str(tmp_path / name), "--perception-out", str(tmp_path / f"{name}_perception")]
    common = ["judge" if stage == "judge" else "captioner", *flags, "--batch-size", "2", "--eval-images", "0",
              "--save-every", "2"]
    sft(monkeypatch, *common, *out("a"))[train]()
    weights = lambda name, folder="": load_file(os.path.join(tmp_path, name + folder, "model.safetensors"))
    for n in stops:
        b = f"b{n}"
        if n == "stop-at":
            sft(monkeypatch, *common, *out(b), "--judge-stop-at", "3")[train]()
        else:
            g = sft(monkeypatch, *common, *out(b))
            killed_at(g, n)
            with pytest.raises(Killed):
                g[train]()
        for extra, says in (([], "holds an earlier run's checkpoints"), (["--resume", "--lr", "0.01"], "--lr 0.01")):
            with pytest.raises(SystemExit):
                sft(monkeypatch, *common, *out(b), *extra)[train]()
            assert says in capsys.readouterr().err
        g = sft(monkeypatch, *common, *out(b), "--resume")
        lrs = record_lr(g)
        g[train]()
        went_on = {"judge": {4: (2, 6), "stop-at": (3, 6)}, "captioner": {3: (2, 3), 4: (0, 3), 5: (1, 3)},
                   "captions": {3: (2, 4)}}[stage][n]  # (step of its stage, the stage's steps)
        assert lrs[0] == went_on
        wa, wb = weights("a"), weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        if stage == "captioner":
            wa, wb = weights("a", "_perception"), weights(b, "_perception")
            assert all(torch.equal(wa[k], wb[k]) for k in wa)
        last = 4 if stage == "captions" else 6
        assert sorted(os.listdir(tmp_path / b / "run" / "checkpoints")) == [f"step_{last - 2:06d}", f"step_{last:06d}"]
    w4, w6 = weights("a", f"/run/checkpoints/step_{last - 2:06d}"), weights("a")  # the last steps moved the weights
    assert any(not torch.equal(w6[k], w4[k]) for k in w6)


def world_qa(folder, n, scenes=True):
    """A QA JSONL of built-in world images in folder/imgs, with their scenes (as `reward.py world` writes them)."""
    os.makedirs(os.path.join(folder, "imgs"), exist_ok=True)
    rows = []
    for i in range(n):
        it = shapes.world_item(i, "test")
        it["image"].save(os.path.join(folder, "imgs", f"{i}.png"))
        qs = [{k: q[k] for k in ("question", "options", "answer", "type")} for q in it["questions"]]
        rows.append({"id": str(i), "image": f"imgs/{i}.png", "questions": qs,
                     **({"scene": it["scene"]} if scenes else {})})
    path = os.path.join(folder, "qa.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def cells(scenes):
    """Reference per-cell targets, 9 rows per image (row-major cells): occupied, shape, color, size; -100 if empty."""
    rows = []
    for scene in scenes:
        at = {o["pos"]: o for o in scene}
        rows += [[1, shapes.SHAPES.index(at[p]["shape"]), list(shapes.COLORS).index(at[p]["color"]),
                  shapes.SIZES.index(at[p]["size"])] if p in at else [0, -100, -100, -100] for p in shapes.POSITIONS]
    return torch.tensor(rows)


def test_sft_captioner_loss_is_the_caption_tokens_plus_the_weighted_cell_loss(tmp_path, monkeypatch):
    """A --captions stage with scenes (--data as `reward.py world` writes it): each step's loss is the mean NLL of
    exactly the captions' tokens and EOS, plus --aux-weight times the four per-cell cross-entropies against the
    scenes of the images drawn; the head trains with the model; the schedule runs over --caption-steps."""
    qa = world_qa(str(tmp_path), 3)
    caps = tmp_path / "caps.jsonl"  # image i's caption starts with NUMBERS[i] and has its own length (padding)
    caps.write_text("".join(json.dumps({"id": str(i), "caption": f"{shapes.NUMBERS[i]} objects." + " a red star." * i})
                            + "\n" for i in range(3)))
    g = sft(monkeypatch, "captioner", "--captions", str(caps), "--data", qa, "--caption-steps", "2", "--batch-size",
            "3", "--aux-weight", "0.5", "--eval-images", "0", "--out", str(tmp_path / "out"))
    lrs, seen = record_lr(g), {k: [] for k in ("batch", "nll", "ce", "loss", "opt", "stage")}
    real = {k: g[k] for k in ("caption_file_batch", "token_logprobs", "update", "captioner_stage")}

    def caption_file_batch():
        draw = real["caption_file_batch"]()
        return lambda rng: seen["batch"].append(draw(rng)) or seen["batch"][-1]

    def token_logprobs(h, W, y):
        seen["nll"].append((y, real["token_logprobs"](h, W, y)))
        return seen["nll"][-1][1]

    def cross_entropy(x, y, **k):
        seen["ce"].append((y, F.cross_entropy(x, y, **k)))
        return seen["ce"][-1][1]

    def update(model, opt, loss, lr):
        seen["loss"].append(loss.item())
        seen["opt"].append(opt)
        real["update"](model, opt, loss, lr)

    def captioner_stage(model, proc, *a, **k):
        seen["stage"].append((proc.tokenizer, model.config.text_config.hidden_size))
        real["captioner_stage"](model, proc, *a, **k)
    g.update(caption_file_batch=caption_file_batch, token_logprobs=token_logprobs, update=update,
             captioner_stage=captioner_stage, F=types.SimpleNamespace(cross_entropy=cross_entropy))
    g["train_captioner"]()
    assert lrs == [(0, 2), (1, 2)] and len(seen["loss"]) == 2
    params = seen["opt"][0].param_groups[0]["params"]
    (tok, D), K = seen["stage"][0], 2 + len(shapes.SHAPES) + len(shapes.COLORS) + len(shapes.SIZES)
    assert [tuple(p.shape) for p in params[-2:]] == [(K, D), (K,)]  # the per-cell head, in the optimizer
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    assert any(len(set(texts)) > 1 for _, texts, _ in seen["batch"])  # captions of several lengths in a batch
    for step, (images, texts, scenes) in enumerate(seen["batch"]):
        y, lp = seen["nll"][step]
        assert y.tolist() == [t for c in texts for t in tok.encode(c, add_special_tokens=False) + [eos]]
        assert scenes == [shapes.make_scene(shapes.NUMBERS.index(c.split()[0]), "test") for c in texts]
        ce = seen["ce"][4 * step:4 * step + 4]
        assert [t.tolist() for t, _ in ce] == [cells(scenes)[:, k].tolist() for k in range(4)]
        assert seen["loss"][step] == pytest.approx(-lp.mean().item() + 0.5 * sum(v.item() for _, v in ce), rel=1e-5)


def test_sft_judge_loss_is_the_mean_nll_of_the_answer_tokens_alone(tok, monkeypatch):
    """judge_loss on a padded batch equals, for each (caption, question, answer) run alone, the NLL of the answer
    tokens (with the end of turn) and of nothing else, averaged over all answer tokens."""
    rows = [("a red circle at the center.", "what color is the object at the center?", "red"),
            ("", "how many objects are there?", shapes.ABSTAIN),
            ("two objects. a small blue star at the top left.", "what is at the top left?", "small blue star")]
    g = sft(monkeypatch, "judge", "--out", "unused", "--batch-size", "3")
    examples = iter(rows)
    g["judge_example"] = lambda: (lambda cap, q, a: (cap, [(q, a)]))(*next(examples))
    model, _ = models.build_tiny_judge(tok, seed=0)
    loss = g["judge_loss"](model, tok, model.get_output_embeddings().weight, model.config.hidden_size)
    nll = []
    with torch.no_grad():
        for cap, q, a in rows:
            pre, suf = judge.prompt_ids(tok, cap, q, None, "cloze")
            ans = judge.answer_ids(tok, a)
            ids = torch.tensor(pre + suf + ans)
            lp = model(input_ids=ids[None]).logits[0, :-1].log_softmax(-1)  # row j predicts token j + 1
            nll += (-lp[-len(ans):].gather(1, ids[-len(ans):, None])).flatten().tolist()
    assert loss.item() == pytest.approx(sum(nll) / len(nll), rel=1e-5)


def test_sft_judge_data_follows_its_flags(monkeypatch):
    """The judge reads the caption, not the scene: with an empty caption every answer is abstain. --restate adds
    'what is at the <cell>?'; --many-objects draws scenes in proportion to their object count (3 objects on average
    instead of 2.5); --full-frac 1 makes every caption a full one; at the default some captions are empty."""
    plain = sft(monkeypatch, "judge", "--out", "unused")
    flags = sft(monkeypatch, "judge", "--out", "unused", "--many-objects", "--restate", "--full-frac", "1")
    objects = lambda g: sum(sum(q.startswith("what color") for q, _ in g["judge_example"]()[1])  # noqa: E731
                            for _ in range(400)) / 400
    assert objects(plain) < 2.75 < objects(flags)
    cap, qa = flags["judge_example"]()
    assert any(q.startswith("what is at the") for q, _ in qa) and not any(q.startswith("what is at the")
                                                                          for q, _ in plain["judge_example"]()[1])
    rng = random.Random(0)
    scenes = [shapes.make_scene(i, "test") for i in range(100)]
    assert all(shapes.score_facts(flags["mixed_caption"](s, rng), s)["recall"] == 1 for s in scenes)
    assert 0 < sum(plain["mixed_caption"](s, rng) == "" for s in scenes * 4) < 40
    flags["mixed_caption"] = lambda scene, rng: ""
    assert all(a == shapes.ABSTAIN for _ in range(20) for _, a in flags["judge_example"]()[1])


def test_sft_judge_starts_as_the_captioners_language_model_and_stop_at_keeps_its_schedule(tmp_path, monkeypatch):
    """A judge from a captioner (--judge-init) reads text exactly as the captioner's language model does. Training
    it with --judge-stop-at stops early on the --judge-steps schedule, evaluated and saved every --eval-every steps;
    --seed decides the initial weights of a captioner and of a judge from scratch."""
    cap = str(tmp_path / "cap")
    for stage, zero_steps in (("captioner", ["--full-steps", "0", "--human-steps", "0"]),
                              ("judge", ["--judge-init", "", "--judge-steps", "0"])):
        for seed in "10":
            sft(monkeypatch, stage, *zero_steps, "--seed", seed, "--out", str(tmp_path / f"{stage}{seed}"))[
                f"train_{stage}"]()
        w0, w1 = (load_file(os.path.join(tmp_path, f"{stage}{seed}", "model.safetensors")) for seed in "01")
        assert not any(torch.equal(w0[k], w1[k]) for k in w0 if w0[k].dim() == 2)  # norms and biases start at 1, 0
    os.rename(tmp_path / "captioner0", cap)
    j = str(tmp_path / "judge")
    sft(monkeypatch, "judge", "--judge-init", cap, "--judge-steps", "0", "--out", j)["train_judge"]()
    policy, proc = models.load_policy(cap)
    jm, jtok, meta = models.load_judge(j)
    ids = torch.tensor([jtok.encode("two objects. a large red star at the center. what color is the object at the "
                                    "center?")])
    with torch.no_grad():
        assert torch.allclose(policy(input_ids=ids).logits, jm(input_ids=ids).logits, atol=1e-5)
    g = sft(monkeypatch, "judge", "--judge-init", j, "--judge-steps", "10", "--judge-stop-at", "5", "--eval-every",
            "2", "--eval-images", "1", "--batch-size", "2", "--out", j)
    lrs, evals = record_lr(g), []
    g["judge_eval"] = lambda *a: evals.append(len(lrs)) or {}
    g["train_judge"]()
    assert lrs == [(s, 10) for s in range(5)] and evals == [2, 4]


def test_sft_eval_numbers_of_an_exact_judge_and_captioner(monkeypatch):
    """judge_eval with the oracle as judge: every question right from the full caption, an abstention wherever the
    human caption lacks the answer; accuracy pooled over questions (not types). caption_eval on the eval split, in
    eval mode: full captions score precision and recall 1, empty ones state nothing (precision None, recall 0)."""
    g = sft(monkeypatch, "eval", "--out", "unused")
    j = g["judge_eval"]("oracle", None, {"format": "cloze"}, 6)
    assert j["full_caption_accuracy"] == j["abstain_when_missing"] == 1
    assert all(v["full_caption_accuracy"] == 1 for v in j["by_type"].values())
    real = g["score_questions"]  # the oracle's choices, but right on color questions alone
    g["score_questions"] = lambda m, t, caps, qs, fmt, mode, rng, return_choice=False: (
        real("oracle", t, caps, qs, fmt, mode, rng, return_choice=True) if return_choice
        else [float(q["type"] == "color") for q in qs])
    qs = [q for i in range(6) for q in shapes.world_item(i, "eval")["questions"]]
    j = g["judge_eval"](None, None, {"format": "cloze"}, 6)
    assert j["full_caption_accuracy"] == pytest.approx(sum(q["type"] == "color" for q in qs) / len(qs))
    seen = []
    for caption, precision, recall in ((lambda s: shapes.full_caption(s), 1, 1), (lambda s: "", None, 0)):
        def caption_items(model, proc, items, caption=caption):
            seen.append((model.training, [it["id"] for it in items]))
            return [[(caption(it["scene"]), 7)] for it in items]
        g["caption_items"] = caption_items
        c = g["caption_eval"](torch.nn.Linear(1, 1), None, 5)
        assert c == {"precision_by_attribute": dict.fromkeys(["position", *shapes.ATTRIBUTES, "count"], precision),
                     "recall": recall, "mean_caption_tokens": 7}
    assert seen == [(False, [f"shapes-eval-{i}" for i in range(5)])] * 2


def test_sft_eval_writes_what_it_prints(tmp_path, monkeypatch, capsys):
    """`python sft.py eval` (here of a random pair, built by sft.py with 0 steps): warmstart.json holds the numbers
    of the printed table."""
    cap, jdg, out = (str(tmp_path / n) for n in ("cap", "judge", "eval"))
    sft(monkeypatch, "captioner", "--full-steps", "0", "--human-steps", "0", "--out", cap)["train_captioner"]()
    sft(monkeypatch, "judge", "--judge-init", cap, "--judge-steps", "0", "--out", jdg)["train_judge"]()
    capsys.readouterr()
    sft(monkeypatch, "eval", "--out", out, "--eval-images", "2", "--captioner", cap, "--judge", jdg)["evaluate_pair"]()
    printed = capsys.readouterr().out
    res = json.load(open(os.path.join(out, "warmstart.json")))
    j, c = res["judge"], res["captioner"]
    assert f"  {'all':28s}  {j['full_caption_accuracy']:16.3f}   {j['abstain_when_missing']:18.3f}" in printed
    for t, v in j["by_type"].items():
        assert f"  {t:28s}  {v['full_caption_accuracy']:16.3f}" in printed
    assert f"captioner recall {c['recall']:.3f}, mean caption tokens {c['mean_caption_tokens']:.1f}" in printed


def test_sft_caption_jsonl_pairs_each_caption_with_its_own_image(tmp_path, monkeypatch):
    """--captions draws (image, caption) pairs: the image by id from --data (with its scenes when the file has them,
    else none), or from each record's "image" path, relative to --image-root, else to the caption file's folder
    (not the working directory)."""
    data, own = tmp_path / "data", tmp_path / "own"
    qa, bare = world_qa(str(data), 4), world_qa(str(own), 4, scenes=False)
    pixels = [np.asarray(Image.open(data / "imgs" / f"{i}.png").convert("RGB")) for i in range(4)]
    assert all((pixels[i] != pixels[k]).any() for i in range(4) for k in range(i))
    records = [{"id": str(i), "image": f"imgs/{i}.png", "caption": f"caption {i}."} for i in (2, 0, 3, 1)]
    for caps, flags, scenes in [(data / "caps.jsonl", ["--data", qa], True),
                                (own / "caps.jsonl", ["--data", bare], False),
                                (own / "caps.jsonl", [], False),  # the images next to the caption file
                                (tmp_path / "caps.jsonl", ["--image-root", str(data)], False)]:
        caps.write_text("".join(json.dumps(r) + "\n" for r in records))
        g = sft(monkeypatch, "captioner", "--captions", str(caps), *flags, "--batch-size", "12", "--out", "unused")
        images, texts, drawn = g["caption_file_batch"]()(random.Random(0))
        index = [int(t.split()[1][:-1]) for t in texts]
        assert len(set(index)) == 4 and all((np.asarray(im) == pixels[i]).all() for im, i in zip(images, index))
        assert drawn == ([shapes.make_scene(i, "test") for i in index] if scenes else None)
