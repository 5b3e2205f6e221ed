"""reward.py as users run it: the leak filter on the built-in world with a deliberately leaky question type."""
import json
import os
import random
import runpy
import subprocess
import sys

import pytest
import torch

from caprl_mini import judge, models, shapes
from caprl_mini.data import QAFile, write_world_qa
from conftest import shipped

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reward(*args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "reward.py"), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_leak_filter_drops_the_leaky_type_and_keeps_the_others(tmp_path):
    """The shipped judge answers "the object at the X is red. what color is ...?" with no caption at all; it
    abstains on every honest question. The filter must drop the first and keep the second."""
    shipped("judge")
    qa, out = str(tmp_path / "w" / "qa.jsonl"), str(tmp_path / "filtered.jsonl")
    reward("world", "--images", "20", "--leaky", "--out", qa)
    printed = reward("filter", "--data", qa, "--out", out)
    before, after = QAFile(qa), QAFile(out)
    count = lambda f, t: sum(q["type"] == t for r in f.rows for q in r["questions"])  # noqa: E731
    leaky = count(before, shapes.LEAKY_TYPE)
    assert leaky >= 20 and count(after, shapes.LEAKY_TYPE) <= 0.1 * leaky
    for t in shapes.QUESTION_TYPES:
        assert count(after, t) >= 0.95 * count(before, t) > 0, t
    assert f"{shapes.LEAKY_TYPE:16s} dropped" in printed
    # the written file is a valid QA file wherever it lives: images resolve, scenes survive
    assert after[0]["image"].size == (84, 84) and after[0]["scene"] == json.loads(json.dumps(before[0]["scene"]))


def test_leak_filter_drops_questions_answered_blind_at_least_the_threshold_fraction(tmp_path, monkeypatch, capsys):
    """A scripted judge answers question j right blind in right[j] of 4 asks. With --max-blind-accuracy 0.5 the
    filter keeps exactly the questions right in fewer than 2 asks; an image left without questions goes. Every ask
    is argmax with an empty caption, and the asks reshuffle (one generator that moves on, not reseeded)."""
    right = [0, 1, 2, 3, 4, 4, 2]  # questions 0-4 of image "a", 5-6 of image "b"
    q = lambda j: {"question": f"q{j}?", "options": ["x", "y"], "answer": "A", "type": "t"}  # noqa: E731
    qa, out = tmp_path / "qa.jsonl", tmp_path / "kept.jsonl"
    qa.write_text(json.dumps({"id": "a", "image": "a.png", "questions": [q(j) for j in range(5)]}) + "\n"
                  + json.dumps({"id": "b", "image": "b.png", "questions": [q(5), q(6)]}) + "\n")
    asks = []

    def scripted(model, tok, captions, questions, fmt, mode, rng):
        asks.append((mode, set(captions), rng.getstate()))
        rng.shuffle(list(range(10)))  # as the real shuffles move the generator on
        return [float(len(asks) <= right[int(x["question"][1:-1])]) for x in questions]

    monkeypatch.setattr(judge, "score_questions", scripted)
    monkeypatch.setattr(sys, "argv", ["reward.py", "filter", "--data", str(qa), "--judge", "oracle", "--out", str(out),
                                      "--filter-asks", "4", "--max-blind-accuracy", "0.5"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "reward.py"), run_name="__main__")
    assert e.value.code == 0
    kept = [json.loads(line) for line in open(out)]
    assert [(r["id"], [x["question"] for x in r["questions"]]) for r in kept] == [("a", ["q0?", "q1?"])]
    assert [(m, c) for m, c, _ in asks] == [("argmax", {""})] * 4 and len({s for _, _, s in asks}) == 4
    assert "kept 2 of 7 questions, 1 of 2 images (dropped 1 left without questions)" in capsys.readouterr().out


def test_a_killed_leak_filter_resumes_and_writes_what_one_run_writes(tmp_path, monkeypatch, capsys):
    """reward.py filter killed after 2 of its 4 calls (one an ask here) goes on from OUT.partial.jsonl: the rerun
    makes only calls 3 and 4, each with the generator state of the uninterrupted run's, and writes the same file;
    the partial file goes at the end. A rerun with another seed is refused, naming the file and the setting."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"id": f"i{k}", "image": "a.png", "questions": [
        {"question": f"q{k}{j}?", "options": ["x", "y", "z"], "answer": "A", "type": "t"} for j in range(3)]}) + "\n"
        for k in range(4)))
    calls = []

    def scripted(model, tok, captions, questions, fmt, mode, rng):
        if len(calls) == kill_at:
            raise KeyboardInterrupt
        calls.append(rng.getstate())
        return [float(rng.random() < 0.3) for _ in questions]  # right or not by the generator: draws must line up

    def run(out, *extra):
        monkeypatch.setattr(sys, "argv", ["reward.py", "filter", "--data", str(qa), "--judge", "oracle", "--out",
                                          str(out), "--max-blind-accuracy", "0.5", *extra])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, "reward.py"), run_name="__main__")
        return e.value.code

    monkeypatch.setattr(judge, "score_questions", scripted)
    kill_at = None
    assert run(tmp_path / "whole.jsonl") == 0
    whole_calls, calls[:] = list(calls), []
    kill_at, out = 2, tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(out)
    assert not out.exists() and os.path.exists(f"{out}.partial.jsonl")
    assert run(out, "--seed", "1") == 2
    err = capsys.readouterr().err
    assert f"{out}.partial.jsonl" in err and "seed 0 there, 1 now" in err
    kill_at, calls[:] = None, []
    assert run(out) == 0 and calls == whole_calls[2:]
    assert "resuming from" in capsys.readouterr().out
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text() and not os.path.exists(f"{out}.partial.jsonl")
    assert 0 < sum(len(json.loads(x)["questions"]) for x in out.read_text().splitlines()) < 12  # some dropped


def test_a_captions_reward_does_not_depend_on_the_other_lines(tmp_path):
    """reward.py score: the same (id, caption) scores the same alone, after other lines and twice in one file (one
    generator for the whole file made each line's question draws depend on every line before it)."""
    item = shapes.world_item(5, "eval")  # 3 objects, 2 in the caption: the draws decide the reward
    cap = shapes.human_caption(item["scene"], random.Random(1))  # partial: draws matter
    line = {"id": item["id"], "caption": cap}
    other = {"id": shapes.world_item(7, "eval")["id"], "caption": "a red circle at the center."}

    def scores(*lines):
        caps, out = str(tmp_path / "caps.jsonl"), str(tmp_path / "r.jsonl")
        with open(caps, "w") as f:
            f.write("".join(json.dumps(x) + "\n" for x in lines))
        reward("score", "--captions", caps, "--judge", "oracle", "--judge-mode", "argmax", "--out", out)
        return [json.loads(x)["reward"] for x in open(out)]

    alone = scores(line)[0]
    assert 0 < alone < 1 and scores(other, line, line)[1:] == [alone, alone]


def _score_in_process(monkeypatch, *args):
    """reward.py score run as a script in this process (no model to load: the oracle)."""
    monkeypatch.setattr(sys, "argv", ["reward.py", "score", *args])
    runpy.run_path(os.path.join(ROOT, "reward.py"), run_name="__main__")


def test_score_writes_the_trainers_reward_with_each_captions_seeded_draws(tmp_path, monkeypatch):
    """reward.py score's line k is caption_rewards over --questions-per-caption draws with --judge-mode, the
    generator Random(f"{--seed}:{id}"), the id's own world item (its split) and the reward types (every type with
    --all-types), also past the first 256-caption call. A judge with graded option scores (the oracle's choice
    preferred, not certain) so that prob, sample and argmax read different numbers and every draw shows."""
    def graded(captions, posed):
        return [torch.tensor([2.0 if o == shapes.oracle_choice(c, q) else 0.3 * len(o) for o in q["options"]])
                for c, q in zip(captions, posed)]
    monkeypatch.setattr(judge, "_oracle_logits", graded)
    items = [shapes.world_item(i, "eval") for i in range(20)]
    lines = [(items[k % 20], shapes.human_caption(items[k % 20]["scene"], random.Random(k))) for k in range(260)]
    caps, out = tmp_path / "caps.jsonl", tmp_path / "r.jsonl"
    caps.write_text("".join(json.dumps({"id": it["id"], "caption": c}) + "\n" for it, c in lines))

    def want(n, mode, seed, types, k=len(lines)):
        return judge.caption_rewards("oracle", None, [c for _, c in lines[:k]], [it for it, _ in lines[:k]], n,
                                     "cloze", mode, [random.Random(f"{seed}:{it['id']}") for it, _ in lines[:k]],
                                     types).tolist()

    _score_in_process(monkeypatch, "--captions", str(caps), "--judge", "oracle", "--seed", "3",
                      "--questions-per-caption", "5", "--judge-mode", "sample", "--out", str(out))
    assert [json.loads(x)["reward"] for x in open(out)] == want(5, "sample", 3, shapes.REWARD_TYPES)
    caps.write_text("".join(caps.read_text().splitlines(True)[:4]))
    _score_in_process(monkeypatch, "--captions", str(caps), "--judge", "oracle", "--all-types", "--out", str(out))
    assert [json.loads(x)["reward"] for x in open(out)] == want(8, "prob", 0, None, 4)


def test_a_killed_score_resumes_and_writes_what_one_run_writes(tmp_path, monkeypatch, capsys):
    """reward.py score --out killed in its 3rd 256-caption call goes on from OUT.partial.jsonl, also when the kill
    cut a line short and the rerun is killed in turn: the last rerun makes only the 4th call (the last 8 captions,
    their own draws) and writes what one uninterrupted run writes; the partial file goes at the end. A rerun with
    another --judge-mode is refused, naming the file and the setting."""
    items = [shapes.world_item(i, "eval") for i in range(30)]
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"id": items[k % 30]["id"], "caption": shapes.human_caption(
        items[k % 30]["scene"], random.Random(k))}) + "\n" for k in range(776)))
    real, calls = judge.caption_rewards, []

    def killable(model, tok, captions, *rest):
        if len(calls) == kill_at:
            raise KeyboardInterrupt
        calls.append(list(captions))
        return real(model, tok, captions, *rest)

    def run(out, *extra):
        _score_in_process(monkeypatch, "--captions", str(caps), "--judge", "oracle", "--questions-per-caption", "3",
                          "--out", str(out), *extra)

    monkeypatch.setattr(judge, "caption_rewards", killable)
    kill_at, out = None, tmp_path / "out.jsonl"
    run(tmp_path / "whole.jsonl")
    whole_calls, calls[:], kill_at = list(calls), [], 2
    assert [len(c) for c in whole_calls] == [256, 256, 256, 8]
    with pytest.raises(KeyboardInterrupt):
        run(out)
    lines = open(f"{out}.partial.jsonl").readlines()
    assert not out.exists() and json.loads(lines[0])["command"] == "score" and len(lines) == 3
    with open(f"{out}.partial.jsonl", "a") as f:
        f.write('{"rewards": [0.5, 0.')  # a third call's line, cut short
    with pytest.raises(SystemExit) as e:
        run(out, "--judge-mode", "sample")
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{out}.partial.jsonl" in err and "judge_mode 'prob' there, 'sample' now" in err
    kill_at, calls[:] = 1, []  # the rerun's 1st call appends its line (after the cut one unless that was dropped)
    with pytest.raises(KeyboardInterrupt):
        run(out)
    assert calls == whole_calls[2:3] and len(open(f"{out}.partial.jsonl").readlines()) == 4
    kill_at, calls[:] = None, []
    run(out)
    assert calls == whole_calls[3:] and "resuming from" in capsys.readouterr().out
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text() and not os.path.exists(f"{out}.partial.jsonl")
    assert len({json.loads(x)["reward"] for x in out.read_text().splitlines()}) > 1


def test_score_on_a_qa_file_asks_each_ids_own_questions_in_the_judge_format_given(tmp_path, monkeypatch,
                                                                                   tiny_judge_dir):
    """With --data, a line's questions are its id's row (whatever the two files' orders), every type drawn, and
    --judge-format overrides the judge's judge.json (cloze here; asked as letters): the rewards are those of
    caption_rewards with that format, to float precision."""
    qa, caps, out = str(tmp_path / "w" / "qa.jsonl"), tmp_path / "caps.jsonl", tmp_path / "r.jsonl"
    write_world_qa(qa, 4, "eval")
    rows = QAFile(qa).rows
    lines = [(rows[k], f"caption {k}: a red circle at the center.") for k in (2, 0, 3)]
    caps.write_text("".join(json.dumps({"id": r["id"], "caption": c}) + "\n" for r, c in lines))
    _score_in_process(monkeypatch, "--captions", str(caps), "--data", qa, "--judge", tiny_judge_dir,
                      "--judge-format", "letter", "--questions-per-caption", "3", "--out", str(out))
    model, tok, meta = models.load_judge(tiny_judge_dir)
    assert meta["format"] == "cloze"
    want = judge.caption_rewards(model, tok, [c for _, c in lines], [{"questions": r["questions"]} for r, _ in lines],
                                 3, "letter", "prob", [random.Random(f"0:{r['id']}") for r, _ in lines])
    assert [json.loads(x)["reward"] for x in open(out)] == pytest.approx(want.tolist(), abs=1e-6)
