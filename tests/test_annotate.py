"""annotate.py as users run it: killed and rerun, sharded over torchrun ranks, fed broken files."""
import json
import os
import runpy
import signal
import subprocess
import sys
import time

import pytest

from caprl_mini import shapes
from caprl_mini.data import list_images, load_image
from caprl_mini.evaluation import caption_items
from caprl_mini.models import load_policy
from conftest import shipped

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def annotate(*args, launcher=(sys.executable,)):
    r = subprocess.run([*launcher, os.path.join(ROOT, "annotate.py"), "--model", shipped("captioner"), *args],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def world_folder(path, n):
    os.makedirs(path, exist_ok=True)
    for i in range(n):
        shapes.world_item(i, "test")["image"].save(os.path.join(path, f"{i:03d}.png"))
    return sorted(f"{i:03d}.png" for i in range(n))


def ids(path):
    return [json.loads(line)["id"] for line in open(path)]


def test_killed_run_resumes_with_every_image_exactly_once(tmp_path):
    names = world_folder(str(tmp_path / "imgs"), 48)
    out = str(tmp_path / "caps.jsonl")
    cmd = [sys.executable, os.path.join(ROOT, "annotate.py"), "--model", shipped("captioner"), "--images",
           str(tmp_path / "imgs"), "--out", out, "--batch-size", "4"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None and (not os.path.exists(out) or len(open(out).readlines()) < 8):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    first = len(ids(out))
    assert 8 <= first < 48  # really killed part-way
    printed = annotate("--images", str(tmp_path / "imgs"), "--out", out, "--batch-size", "4")
    assert f"{first} already done" in printed
    got = ids(out)
    assert sorted(got) == names and len(got) == len(set(got))


def test_two_torchrun_ranks_cover_every_image_once(tmp_path):
    names = world_folder(str(tmp_path / "imgs"), 13)
    out = str(tmp_path / "caps.jsonl")
    sampled = ["--temperature", "1", "--seed", "3"]  # each image's caption drawn from (seed, its id) alone
    annotate("--images", str(tmp_path / "imgs"), "--out", out, "--batch-size", "3", *sampled,
             launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"))
    got = ids(out)
    assert sorted(got) == names and len(got) == len(set(got))
    single = str(tmp_path / "single.jsonl")  # the same captions as one process in other batches
    annotate("--images", str(tmp_path / "imgs"), "--out", single, "--batch-size", "5", *sampled)
    caps = lambda p: {json.loads(x)["id"]: json.loads(x)["caption"] for x in open(p)}  # noqa: E731
    assert caps(out) == caps(single)
    # "image" resolves from the output's folder, as sft.py --captions reads it ("imgs/000.png", not "000.png")
    assert all(os.path.isfile(tmp_path / json.loads(x)["image"]) for x in open(out))


def test_unreadable_files_are_listed_with_a_reason_and_skipped(tmp_path):
    folder = str(tmp_path / "imgs")
    good = world_folder(folder, 3)
    raw = open(os.path.join(folder, good[0]), "rb").read()
    open(os.path.join(folder, "truncated.png"), "wb").write(raw[: len(raw) // 2])
    open(os.path.join(folder, "text.jpg"), "w").write("not an image\n")
    open(os.path.join(folder, "notes.txt"), "w").write("ignored: not an image extension\n")
    out = str(tmp_path / "caps.jsonl")
    printed = annotate("--images", folder, "--out", out)
    assert sorted(ids(out)) == good
    errors = {json.loads(x)["id"]: json.loads(x)["error"] for x in open(out + ".errors.jsonl")}
    assert set(errors) == {"truncated.png", "text.jpg"} and all(errors.values())
    assert "unreadable 2" in printed
    printed = annotate("--images", folder, "--out", out)  # a rerun neither retries nor duplicates them
    assert "0 to caption" in printed and len(open(out + ".errors.jsonl").readlines()) == 2


def test_a_rerun_refuses_other_settings_and_retries_paths_that_named_no_file(tmp_path):
    """One caption file, one captioner: a rerun with another temperature is refused naming the setting. A list
    whose paths name no file (the wrong --image-root) is counted, not recorded as unreadable, so the rerun with the
    right root captions those images."""
    names = world_folder(str(tmp_path / "imgs"), 3)
    listed = tmp_path / "list.txt"
    listed.write_text("".join(n + "\n" for n in names))  # relative to imgs/, not to the list's folder
    out = str(tmp_path / "caps.jsonl")
    printed = annotate("--images", str(listed), "--out", out)
    assert "captioned 0, unreadable 0" in printed and "missing 3" in printed
    assert open(out + ".errors.jsonl").read() == ""
    printed = annotate("--images", str(listed), "--image-root", str(tmp_path / "imgs"), "--out", out)
    assert "captioned 3" in printed and sorted(ids(out)) == names
    r = subprocess.run([sys.executable, os.path.join(ROOT, "annotate.py"), "--model", shipped("captioner"),
                        "--images", str(listed), "--image-root", str(tmp_path / "imgs"), "--out", out,
                        "--temperature", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: {out}:1: written with other settings (--temperature 0.0 there, 1.0 now): rerun with the file's, "
        "or choose another --out")


def test_captions_are_caption_items_with_the_flags_given_and_a_rerun_refuses_each_other_setting(tmp_path, monkeypatch,
                                                                                               capsys):
    """In this process: the records hold what caption_items makes with --temperature, --seed, --max-new-tokens,
    --instruction and the pixel bounds (captions and token counts; a flag not passed on samples other captions), and
    every recorded setting is compared on a rerun: each one changed alone is refused, naming it, before the captioner
    loads."""
    folder, out = str(tmp_path / "imgs"), str(tmp_path / "caps.jsonl")
    world_folder(folder, 2)
    flags = {"--model": shipped("captioner"), "--temperature": "1", "--seed": "5", "--max-new-tokens": "6",
             "--instruction": "Name the shapes.", "--min-pixels": "50176", "--max-pixels": "200704"}  # 84 px -> 224

    def run(**changed):
        argv = [x for k, v in {**flags, **changed}.items() for x in (k, v)]
        monkeypatch.setattr(sys, "argv", ["annotate.py", "--images", folder, "--out", out, *argv])
        runpy.run_path(os.path.join(ROOT, "annotate.py"), run_name="__main__")

    run()
    model, proc = load_policy(shipped("captioner"), min_pixels=50176, max_pixels=200704)
    items = [{"id": i, "image": load_image(ref, root)} for i, ref, root in list_images(folder)]
    want = caption_items(model, proc, items, max_new_tokens=6, temperature=1.0, seed=5, instruction="Name the shapes.")
    got = [json.loads(line) for line in open(out)]
    assert [[(r["caption"], r["tokens"])] for r in got] == want and all(0 < r["tokens"] <= 6 for r in got)
    for flag, other in [("--model", str(tmp_path / "other")), ("--temperature", "0.5"), ("--seed", "6"),
                        ("--max-new-tokens", "7"), ("--instruction", "Describe."), ("--min-pixels", "3136"),
                        ("--max-pixels", "100352")]:
        with pytest.raises(SystemExit) as e:
            run(**{flag: other})
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"written with other settings ({flag} " in err, (flag, err)
