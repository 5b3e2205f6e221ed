"""End-to-end: the real train_grpo.py as a subprocess (or in this process, its calls recorded), from the shipped
checkpoints."""
import json
import os
import random
import runpy
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from caprl_mini import grpo, judge, logprobs, models, sampling, shapes
from caprl_mini.logprobs import token_logprobs
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

    def caption_rewards(*a):  # the generators' states as they arrive (the call moves them on)
        states = [rng.getstate() for rng in a[7]]
        rewards.append((a, states, real_rewards(*a)))
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
        assert a[8] == shapes.REWARD_TYPES and a[9] == (roll["mask"].sum(1) - done.long()).tolist()
        assert a[10:] == ([3, 6], 0.5)
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
