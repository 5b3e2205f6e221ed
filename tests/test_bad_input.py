"""Bad input wherever data enters (QA JSONL, images, list files, caption JSONL): a DataError naming the file and line
(or the image) and what to fix, or, with a `skipped` list (--skip-bad), the bad line left out, listed and counted
while the good ones load. Scripts end such errors with `error: ...` and exit status 2, never a traceback."""
import contextlib
import json
import os
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from caprl_mini import checkpoint, models
from caprl_mini.data import (CaptionFile, DataError, QAFile, list_images, load_image, read_captions, skip_bad,
                             user_errors)
from conftest import sft, shipped

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, *lines):
    """One line per entry: a dict as JSON, text as is, bytes raw (to write what is not UTF-8)."""
    with open(path, "wb") as f:
        for x in lines:
            x = json.dumps(x) if isinstance(x, dict) else x
            f.write((x if isinstance(x, bytes) else x.encode()) + b"\n")
    return str(path)


def row(id_="a", image="img.png", **question):
    return {"id": id_, "image": image, "questions": [{"question": "what?", "options": ["x", "y", "z"], "answer": "B",
                                                      **question}]}


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "img.png")
    return tmp_path


# ---------------------------------------------------------------- QA JSONL lines
QA_BAD = {
    "malformed JSON": ('{"id": "b", "image": ', "not valid JSON (Expecting value at column 21)"),
    "not UTF-8": (b'{"id": "b\xe9"}', "not UTF-8 (byte 10 of the line is 0xe9); save the file as UTF-8"),
    "not an object": ("[1, 2]", "a line must be a JSON object"),
    "no image": ({"id": "b", "questions": row()["questions"]}, "needs 'image' (or 'images')"),
    "no questions": ({"id": "b", "image": "img.png"}, "a non-empty 'questions' list"),
    "no question text": (row("b", question=None), "each question needs a 'question' field (text)"),
    "answer not an option": (row("b", answer="D"), "answer 'D' is not one of the option letters ABC"),
    "one option": (row("b", options=["x"], answer="A"), "a question needs at least two options"),
    "repeated options": (row("b", options=["x", "y", "x"]), "options repeat (['x', 'y', 'x'])"),
    "type not text": (row("b", type=None), "a question's 'type' must be text, got None"),
    "duplicate id": (row("a"), "duplicate id 'a' (first on line 1); ids must be unique"),
}


@pytest.mark.parametrize("kind", QA_BAD)
def test_bad_qa_line_names_file_and_line_or_is_skipped(folder, kind):
    bad, message = QA_BAD[kind]
    path = write(folder / "qa.jsonl", row("a"), bad, row("c"))
    with pytest.raises(DataError) as e:
        QAFile(path)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)
    skipped = []
    qa = QAFile(path, skipped=skipped)
    assert [r["id"] for r in qa.rows] == ["a", "c"] and qa[1]["image"].size == (8, 8)
    assert len(skipped) == 1 and skipped[0][0] == f"{path}:2" and message in skipped[0][1]


def test_empty_files_say_so(tmp_path):
    qa, caps, paths = (write(tmp_path / name, "", "  ") for name in ("qa.jsonl", "caps.jsonl", "list.txt"))
    with pytest.raises(DataError, match=f"^{qa}: no rows$"):
        QAFile(qa)
    with pytest.raises(DataError, match=f"^{caps}: no captions$"):
        read_captions(caps)
    with pytest.raises(DataError, match=f"^{paths}: no image paths$"):
        list_images(paths)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no image files in this folder"):
        list_images(str(tmp_path / "empty"))


def test_every_line_bad_under_skip_says_why_nothing_is_left(tmp_path):
    path = write(tmp_path / "qa.jsonl", "{", "[]")
    skipped = []
    with pytest.raises(DataError, match=f"{path}: no rows left: every line was bad, e.g. {path}:2: a line must be"):
        QAFile(path, skipped=skipped)
    assert [w for w, _ in skipped] == [f"{path}:1", f"{path}:2"]


# ---------------------------------------------------------------- images
def truncated_png(path):
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)  # noise: does not compress to a few bytes
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])


IMAGE_BAD = {
    "missing": ("nope.png", None, "no such file"),
    "truncated": ("trunc.png", truncated_png, "truncated or corrupt"),
    "text named .jpg": ("text.jpg", lambda p: open(p, "w").write("not an image\n"), "not an image"),
    "empty file": ("empty.png", lambda p: open(p, "wb").close(), "the file is empty"),
    "1 x 300 pixels": ("thin.png", lambda p: Image.new("RGB", (1, 300)).save(p), "1x300 pixels, sides over 200:1"),
}


@pytest.mark.parametrize("kind", IMAGE_BAD)
def test_unreadable_image_names_row_and_image_or_is_skipped(folder, kind):
    name, make, message = IMAGE_BAD[kind]
    if make:
        make(str(folder / name))
    qa = QAFile(write(folder / "qa.jsonl", row("a"), row("b", image=name)))
    with pytest.raises(DataError) as e:
        qa[1]
    assert str(e.value).startswith(f"{qa.path}:2: cannot read image {name!r}: ") and message in str(e.value)
    with pytest.raises(DataError, match=f"cannot read image {name!r}: .*{message}"):  # as annotate.py reads it
        load_image(name, str(folder))
    skipped, items = [], []
    for i in range(len(qa)):
        with skip_bad(skipped):
            items.append(qa[i])
    assert [it["id"] for it in items] == ["a"] and [w for w, _ in skipped] == [f"{qa.path}:2"]


@pytest.mark.parametrize("side", [12, 20])  # PIL warns above its limit and refuses above twice it: both are errors
def test_oversized_image_is_refused_with_the_limit_and_how_to_raise_it(folder, monkeypatch, side):
    Image.new("RGB", (side, side)).save(folder / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    qa = QAFile(write(folder / "qa.jsonl", row("a", image="big.png")))
    with pytest.raises(DataError, match=f"^{qa.path}:1: cannot read image 'big.png': more than 100 pixels .* "
                                        "raise the limit with the environment variable CAPRL_MAX_IMAGE_PIXELS"):
        qa[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", side * side)
    assert qa[0]["image"].size == (side, side)


def palette_with_transparency():
    img = Image.new("P", (2, 1))
    img.putpalette([10, 200, 30, 0, 0, 0] + [0] * 762)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 1
    return img


MODES = {  # image, file suffix, its two pixels as RGB
    "RGBA": (Image.frombytes("RGBA", (2, 1), bytes([0, 0, 0, 0, 255, 0, 0, 128])), ".png",
             [(255, 255, 255), (255, 127, 127)]),  # transparent -> white, half-transparent red on white
    "P with transparency": (palette_with_transparency(), ".png", [(10, 200, 30), (255, 255, 255)]),
    "L": (Image.frombytes("L", (2, 1), bytes([0, 100])), ".png", [(0, 0, 0), (100, 100, 100)]),
    "LA": (Image.frombytes("LA", (2, 1), bytes([0, 0, 100, 255])), ".png", [(255, 255, 255), (100, 100, 100)]),
    "I;16": (Image.fromarray(np.array([[32768, 65535]], dtype=np.uint16)), ".png", [(127, 127, 127), (255,) * 3]),
    "I": (Image.fromarray(np.array([[32768, 0]], dtype=np.int32)), ".tif", [(127, 127, 127), (0, 0, 0)]),
}


@pytest.mark.parametrize("mode", MODES)
def test_unusual_modes_load_as_the_rgb_they_look_like(tmp_path, mode):
    """16-bit mid-gray stays mid-gray (a plain convert clips it to white); transparency is white, not black."""
    img, suffix, pixels = MODES[mode]
    img.save(tmp_path / f"x{suffix}")
    assert Image.open(tmp_path / f"x{suffix}").mode == mode.split()[0]  # the file really holds this mode
    rgb = load_image(f"x{suffix}", str(tmp_path))
    assert rgb.mode == "RGB"
    for x, want in enumerate(pixels):
        assert max(abs(a - b) for a, b in zip(rgb.getpixel((x, 0)), want)) <= 1, (x, rgb.getpixel((x, 0)), want)


# ---------------------------------------------------------------- caption JSONL and list files
CAPTION_BAD = {
    "malformed JSON": ('{"id": "b", "caption": "x"', "not valid JSON"),
    "not UTF-8": (b'{"id": "b", "caption": "caf\xe9"}', "not UTF-8 (byte 28 of the line is 0xe9)"),
    "no caption": ({"id": "b"}, "expected a JSON object with 'id' and 'caption' (text); fix or delete the line"),
    "no id": ({"caption": "a red star."}, "expected a JSON object with 'id' and 'caption'"),
    "empty caption": ({"id": "b", "caption": " \n\t"}, "empty caption; delete the line (or skip it with --skip-bad)"),
    "tokens not a number": ({"id": "b", "caption": "x", "tokens": "many"}, "'tokens' must be a whole number"),
    "lone surrogate": ('{"id": "b", "caption": "\\ud83c a star"}', "a \\u escape of a lone surrogate ('\\ud83c')"),
}


@pytest.mark.parametrize("kind", CAPTION_BAD)
def test_bad_caption_line_names_file_and_line_or_is_skipped(tmp_path, kind):
    bad, message = CAPTION_BAD[kind]
    path = write(tmp_path / "caps.jsonl", {"id": "a", "caption": "one.", "tokens": 2}, bad,
                 {"id": "a", "caption": "two."})
    with pytest.raises(DataError) as e:
        read_captions(path)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)
    skipped = []
    assert read_captions(path, skipped) == {"a": [("one.", 2), ("two.", None)]}  # several per id: kept, in order
    assert len(skipped) == 1 and skipped[0][0] == f"{path}:2" and message in skipped[0][1]


def test_caption_file_refuses_a_record_without_its_field_and_text_that_is_not_utf8(tmp_path):
    path = write(tmp_path / "caps.jsonl", {"id": "a", "caption": "x"}, {"id": "b", "error": "unreadable"})
    with pytest.raises(DataError, match=f"^{path}:2: expected a JSON object with 'id' and 'caption'"):
        CaptionFile(path)
    errors = write(tmp_path / "caps.errors.jsonl", {"id": "b", "error": "unreadable"})
    assert CaptionFile(errors, field="error").done == {"b"}  # annotate.py's errors file
    write(path, {"id": "a", "caption": "x"}, b'{"id": "\xff", "caption": "y"}')
    with pytest.raises(DataError, match=f"^{path}:2: not UTF-8"):
        CaptionFile(path)


def test_caption_file_keeps_a_last_record_without_its_newline(tmp_path):
    """A file edited by hand often ends without a newline: its last record is whole and is kept (it was truncated
    away as if cut by a kill), and the next append goes on a line of its own. A cut record is still dropped."""
    path = tmp_path / "caps.jsonl"
    path.write_bytes(b'{"id": "a", "caption": "one"}\n{"id": "b", "caption": "two"}')
    f = CaptionFile(str(path))
    f.append({"id": "c", "caption": "three"})
    f.append({"id": 4, "caption": "four"})  # a number id: done as text, before a reopen as after
    assert f.done == CaptionFile(str(path)).done == {"a", "b", "c", "4"}
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["a", "b", "c", 4]
    path.write_bytes(b'{"id": "a", "caption": "one"}\n{"id": "b", "capt')
    assert CaptionFile(str(path)).done == {"a"} and path.read_bytes() == b'{"id": "a", "caption": "one"}\n'
    path.write_bytes(b'{"id": "a", "caption": "one"}\n{"id": "b", "text": "two"}')  # whole, but not a record
    with pytest.raises(DataError, match=f"^{path}:2: expected a JSON object with 'id' and 'caption'"):
        CaptionFile(str(path))


def test_bad_list_file_lines_name_file_and_line_or_are_skipped(folder):
    path = write(folder / "list.txt", "img.png", b"caf\xe9.png", "img.png", "other.png")
    with pytest.raises(DataError, match=f"^{path}:2: not UTF-8 \\(byte 4 of the line is 0xe9\\)"):
        list_images(path)
    skipped = []
    assert [i for i, _, _ in list_images(path, skipped=skipped)] == ["img.png", "other.png"]
    assert [w for w, _ in skipped] == [f"{path}:2", f"{path}:3"]
    assert "duplicate id 'img.png' (first on line 1)" in skipped[1][1]


def test_user_errors_is_one_line_and_exit_status_2(tmp_path, capsys):
    for error, line in [(DataError("qa.jsonl:3: answer 'E' is not ..."), "error: qa.jsonl:3: answer 'E' is not ...\n"),
                        (None, f"error: {tmp_path / 'nope.jsonl'}: No such file or directory\n")]:
        with pytest.raises(SystemExit) as e, user_errors():
            if error:
                raise error
            QAFile(str(tmp_path / "nope.jsonl"))
        assert e.value.code == 2 and capsys.readouterr().err == line


# ---------------------------------------------------------------- scripts
def script(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def scripts(*arglists):
    """Run the scripts side by side (their starts are mostly imports); each one's last stderr line, all exited 2."""
    procs = [subprocess.Popen([sys.executable, *a], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}) for a in arglists]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2] * len(procs), [err for _, err in outs]
    return [err.strip().splitlines()[-1] for _, err in outs]


def test_scripts_end_bad_input_with_one_error_line_and_status_2(folder):
    """Every stage script stops on a bad line with one line naming its file:line and exit status 2 (side by side:
    their starts are mostly imports)."""
    qa = write(folder / "qa.jsonl", row("a"), row("b", answer="Z"))
    caps = write(folder / "caps.jsonl", {"id": "a", "caption": "a red square."}, {"id": "b", "caption": ""})
    runs = {"reward.py": ["filter", "--data", qa, "--judge", "oracle", "--out", str(folder / "filtered.jsonl")],
            "sft.py": ["captioner", "--captions", caps, "--out", str(folder / "student"), "--caption-steps", "1"],
            "annotate.py": ["--model", "unused", "--images", qa, "--out", str(folder / "caps_out.jsonl")],
            "train_grpo.py": ["--data", qa, "--judge", "oracle", "--out", str(folder / "run")],
            "evaluate.py": ["--data", qa, "--judge", "oracle", "--out", str(folder / "eval")]}
    errors = scripts(*[[name, *args] for name, args in runs.items()])
    for name, err in zip(runs, errors):
        bad = f"{caps}:2: empty caption" if name == "sft.py" else f"{qa}:2: answer 'Z' is not one of the option letters"
        assert err.startswith(f"error: {bad}"), (name, err)


def test_flags_out_of_range_stop_before_any_work(tmp_path, monkeypatch, capsys):
    """A value a flag cannot take stops the script at once with one line naming the flag, where it used to crash deep
    in the run (--max-new-tokens 0: an index error in the sampler after the models loaded; --batch-size 0: an empty
    batch; evaluate.py --out naming a file: after all the captioning) or run on silently (--grad-clip -1 flipped every
    gradient: clip_grad_norm_ scales by max_norm / norm; --questions-per-caption 0: NaN rewards, every update skipped
    and the untrained policy saved; --max-blind-accuracy 0 dropped every question). In-process: the scripts' imports
    are loaded already. Each also names a missing model or file, which a script that let the value through would
    stop on instead, with another message."""
    f, nope = tmp_path / "file", str(tmp_path / "nope")
    f.write_text("")
    runs = [(["train_grpo.py", "--grad-clip", "-1"], "argument --grad-clip: must be at least 0.0, got -1"),
            (["train_grpo.py", "--questions-per-caption", "0"],
             "argument --questions-per-caption: must be at least 1, got 0"),
            (["train_grpo.py", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
            (["train_grpo.py", "--eps-low", "1"], "--eps-low must be below 1"),
            (["train_grpo.py", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
            (["train_grpo.py", "--out", str(f)], f"--out {f} is a file, not a run folder"),
            (["sft.py", "judge", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
            (["sft.py", "eval", "--eval-images", "0"], "eval needs --eval-images of at least 1"),
            (["sft.py", "judge", "--judge-heads", "5"], "argument --judge-heads: invalid choice: 5 (choose from 1, 2, "
                                                        "4, 8, 16, 32, 64)"),
            (["evaluate.py", "--temperature", "-1"], "argument --temperature: must be at least 0.0, got -1"),
            (["evaluate.py", "--out", str(f)], f"--out {f} is a file, not a folder"),
            (["evaluate.py", "--judge-format", "letter"],  # the judge loads after the captioners: checked before
             f"--judge-format letter with {models.JUDGE}: letter format needs ' A' to be one token"),
            (["annotate.py", "--model", nope, "--images", nope, "--max-pixels", "-5"],
             "argument --max-pixels: must be at least 1, got -5"),
            (["reward.py", "filter", "--data", nope, "--max-blind-accuracy", "0"],
             "--max-blind-accuracy is a fraction of the asks: above 0, at most 1"),
            (["reward.py", "world", "--images", "1", "--out", str(tmp_path)],
             f"--out {tmp_path} is a folder; give a file path, e.g. {tmp_path / 'out.jsonl'}")]
    guard = {"train_grpo.py": ["--policy", nope], "sft.py": ["--judge-init", nope, "--judge", nope],
             "evaluate.py": ["--captioner", nope], "annotate.py": [], "reward.py": ["--out", nope]}
    for argv, message in runs:
        name, *args = argv
        out = [] if "--out" in args else ["--out", str(tmp_path / "o")]
        monkeypatch.setattr(sys, "argv", [name, *guard[name], *out, *args])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, name), run_name="__main__")
        assert e.value.code == 2 and f"error: {message}" in capsys.readouterr().err.strip().splitlines()[-1]


def test_evaluate_checks_every_model_before_any_captioning(tmp_path, monkeypatch, capsys):
    """evaluate.py --captioner A --captioner B with B mistyped or a text-only model used to stop only after A had
    captioned every image (minutes to hours at 3B)."""
    monkeypatch.setattr("caprl_mini.evaluation.caption_items", lambda *a, **k: pytest.fail("captioned before checks"))
    nope = str(tmp_path / "nope")
    for second, message in [(nope, f"{nope}: no such model folder"),
                            (models.JUDGE, f"{models.JUDGE}: a text-only language model, not a vision-language")]:
        monkeypatch.setattr(sys, "argv", ["evaluate.py", "--captioner", models.SFT_CAPTIONER, "--captioner", second,
                                          "--images", "1", "--judge", "oracle", "--out", str(tmp_path / "e")])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, "evaluate.py"), run_name="__main__")
        assert e.value.code == 2 and f"error: {message}" in capsys.readouterr().err.strip().splitlines()[-1]


def test_wrong_models_and_unreadable_letters_are_refused_before_the_weights_load(tmp_path):
    """The judge given as the captioner, or the captioner as the judge, used to end in transformers' "Unrecognized
    configuration class" and a long traceback; another family's captioner (LLaVA) loaded and failed in the sampler;
    a letter format with a judge whose tokenizer splits the letters failed after the first rollout (train_grpo.py)
    or all the captioning (evaluate.py). Each is one DataError now."""
    cap, judge = shipped("captioner"), shipped("judge")
    llava = str(tmp_path / "llava")  # a vision-language model the sampler is not written for: its config alone
    transformers.LlavaConfig(text_config=transformers.AutoConfig.from_pretrained(judge)).save_pretrained(llava)
    for call, message in [(lambda: models.load_policy(judge),
                           f"{judge}: a text-only language model, not a vision-language captioner"),
                          (lambda: models.load_policy(llava), f"{llava}: a llava model; the captioner must be a "
                                                              "Qwen2-VL, Qwen2.5-VL or Qwen3-VL (dense) model"),
                          (lambda: models.load_judge(cap), f"{cap}: a vision-language model; the judge is a text-only "
                                                           "chat language model"),
                          (lambda: models.load_judge(judge, fmt="caprl"), f"--judge-format caprl with {judge}: letter "
                                                                          "format needs ' A' to be one token")]:
        with pytest.raises(DataError) as e:
            call()
        assert str(e.value).startswith(message)
    assert models.judge_meta(judge)[1] == {"format": "cloze"} and models.judge_meta("oracle", "letter")[1] == {
        "format": "letter"}


def test_sft_caption_jsonl_skip_bad_lists_and_counts_unknown_ids_and_unreadable_images(folder, monkeypatch, capsys):
    """sft.py --captions --data: a caption whose id --data lacks, or whose image cannot be read, stops the run with
    its file:line; with --skip-bad it is left out, listed and counted, with the bad lines, and the rest trains."""
    truncated_png(folder / "trunc.png")
    qa = write(folder / "qa.jsonl", row("a"), row("b", "trunc.png"))
    caps = write(folder / "caps.jsonl", {"id": "a", "caption": "a red square."}, {"id": "nope", "caption": "x."},
                 {"id": "b", "caption": "a star."}, {"id": "a", "caption": ""})
    args = ["captioner", "--captions", caps, "--data", qa, "--out", str(folder / "unused")]
    for flags, line in [([], f"error: {caps}:4: empty caption"), (["--skip-bad"], None)]:
        with pytest.raises(SystemExit) if line else contextlib.nullcontext():
            sft(monkeypatch, *args, *flags)["caption_file_batch"]()
        printed = capsys.readouterr()
        assert printed.err.strip().splitlines()[-1].startswith(line) if line else "Traceback" not in printed.err
    assert "skipped 3 bad rows / images (--skip-bad):" in printed.out and "1 (image, caption) pairs" in printed.out
    for where, why in [(f"{caps}:4", "empty caption"), (f"{caps}:2", f"id 'nope' is not in {qa}"),
                       (f"{qa}:2", "cannot read image 'trunc.png'")]:
        assert f"  {where}: {why}" in printed.out, (where, printed.out)
    write(caps, {"id": "nope", "caption": "x."})
    with pytest.raises(SystemExit):
        sft(monkeypatch, *args)["caption_file_batch"]()
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {caps}:1: id 'nope' is not in {qa}"


def test_reward_score_skip_bad_lists_and_counts_the_bad_lines(tmp_path):
    caps = write(tmp_path / "caps.jsonl", {"id": "shapes-eval-0", "caption": "one object."},
                 {"id": "shapes-eval-1", "caption": ""}, {"id": "not-a-world-id", "caption": "x."}, "{",
                 {"id": "shapes-eval-2", "caption": "a red star at the center."})
    r = script("reward.py", "score", "--captions", caps, "--judge", "oracle", "--skip-bad")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    assert "skipped 3 bad rows / images (--skip-bad):" in r.stdout
    for n, why in [(2, "empty caption"), (3, "id 'not-a-world-id' is not a built-in world id"), (4, "not valid JSON")]:
        assert f"  {caps}:{n}: {why}" in r.stdout
    assert "2 captions, mean reward" in r.stdout


def test_training_with_skip_bad_replaces_unreadable_images_and_lists_every_bad_row(tmp_path):
    """A bad line is left out at load; an unreadable image, met when a step draws it, is replaced by the next readable
    one, every step (the bug this caught: the list of skipped rows was overwritten after the first step)."""
    rows = [row(str(i), f"{i}.png") for i in range(3)]
    for i in range(3):
        Image.new("RGB", (28, 28), (40 * i, 30, 30)).save(tmp_path / f"{i}.png")
    truncated_png(tmp_path / "1.png")
    qa = write(tmp_path / "qa.jsonl", *rows, row("3", answer="Z"))
    args = ["train_grpo.py", "--data", qa, "--steps", "3", "--images-per-step", "3", "--group-size", "2",
            "--micro-batch-images", "1", "--max-new-tokens", "8", "--eval-images", "3", "--save-final", "0",
            "--out", str(tmp_path / "run")]  # the final evaluation reads --data as training did
    r = script(*args)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: {qa}:4: answer 'Z'")
    r = script(*args, "--skip-bad")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("skipped (--skip-bad): ") == 1  # the bad image is reported once, then never tried again
    assert "skipped 2 bad rows / images (--skip-bad):" in r.stdout
    assert f"  {qa}:4: answer 'Z'" in r.stdout and f"  {qa}:2: cannot read image '1.png'" in r.stdout
    assert len(open(tmp_path / "run" / "metrics.jsonl").readlines()) == 3
    evaluated = json.load(open(tmp_path / "run" / "eval" / "results.json"))["captioners"]
    assert [c["n_images"] for c in evaluated] == [2, 2]  # rows 0, 2 and row 1's replacement, 2 again: counted once


def test_a_mistyped_model_path_is_one_error_line(tmp_path):
    from caprl_mini.models import check_model_path
    assert check_model_path("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"  # a hub id: the hub decides
    with pytest.raises(FileNotFoundError, match="needs a config.json"):
        check_model_path(str(tmp_path))
    nope = str(tmp_path / "nope" / "model")
    Image.new("RGB", (28, 28)).save(tmp_path / "img.png")
    hub = "nobody/no-such-model"  # a hub id the hub cannot serve (offline here, and not cached): one line, not the
    # hub client's traceback (the same for no network, a mistyped or a gated repo)
    errors = scripts(["train_grpo.py", "--policy", nope, "--out", str(tmp_path / "run")],  # side by side
                     ["annotate.py", "--model", nope, "--images", str(tmp_path), "--out", str(tmp_path / "caps.jsonl")],
                     ["train_grpo.py", "--judge", hub, "--out", str(tmp_path / "run2")])
    assert errors[:2] == [f"error: {nope}: no such model folder, and not a hub id like Qwen/Qwen2.5-VL-3B-Instruct"] * 2
    assert errors[2].startswith(f"error: {hub}: We couldn't connect to 'https://huggingface.co'"), errors[2]
    for load in (models.load_policy, models.load_judge):
        with pytest.raises(DataError, match=f"^{hub}: .*couldn't find them in the cached files"):
            load(hub)


def test_train_refuses_to_mix_runs_or_resume_with_other_training_flags(tmp_path):
    """A fresh run into a folder with checkpoints would prune them by name and mix with them; a resume with another
    learning rate (or any flag that changes the training) would silently train another run. Both stop with one line.
    A flag the run's config.json lacks (written before the flag existed) is compared with its default."""
    for name, config in (("a", {"lr": 1e-6, "steps": 10, "out": "elsewhere"}), ("b", {"lr_schedule": "cosine",
                                                                                    "steps": 10})):
        os.makedirs(tmp_path / name / "checkpoints" / "step_000002")
        json.dump(config, open(tmp_path / name / "config.json", "w"))
    a, b = tmp_path / "a", tmp_path / "b"
    errors = scripts(["train_grpo.py", "--out", str(a)],  # the five at once: ~7 s of imports each
                     ["train_grpo.py", "--out", f"{a}/", "--resume", "--steps", "20"],  # --steps, paths may change
                     ["train_grpo.py", "--out", str(b), "--resume", "--steps", "20", "--lr-schedule", "cosine"],
                     ["train_grpo.py", "--out", str(tmp_path / "new"), "--temperature", "0"],
                     ["train_grpo.py", "--out", str(a), "--resume", "--lr", "1e-6", "--beta", "0.1", "--steps", "10"])
    assert errors[0] == (f"train_grpo.py: error: {a} holds an earlier run's checkpoints ({a}/checkpoints/step_000002):"
                         " add --resume to continue it, or choose another --out")
    assert errors[1] == (f"train_grpo.py: error: --resume with other flags than {a}/ was started with: "
                         "--lr 0.0001 (was 1e-06)")
    assert errors[2].endswith("--steps 20 (was 10)")  # it would stretch the cosine
    assert errors[3].endswith("error: --temperature must be > 0")
    assert errors[4].endswith("was started with: --beta 0.1 (was 0.0)")  # "a" has no "beta": it ran at the default


def test_resume_without_a_checkpoint_says_it_starts_from_step_0(tmp_path, capsys):
    """--resume into a folder that holds no checkpoint (a mistyped --out) starts over: it says so. A fresh run
    into a fresh folder says nothing."""
    for resume, says in ((True, f"--resume: no checkpoint in {tmp_path}, starting from step 0\n"), (False, "")):
        assert checkpoint.resume_checkpoint(str(tmp_path), resume, {"lr": 1.0}, (), lambda flag: None) is None
        assert capsys.readouterr().out == says


def test_resume_refuses_other_training_data_but_follows_a_moved_file(tmp_path):
    """The step's images are drawn by index into the data: a resume on the built-in world of a run trained on a file,
    or on a file of another length, would silently train on other images. A moved copy of the file resumes, and its
    checkpoint records the data in turn."""
    for i in range(3):
        Image.new("RGB", (28, 28), (60 * i, 30, 30)).save(tmp_path / f"{i}.png")
    qa = write(tmp_path / "qa.jsonl", *[row(str(i), f"{i}.png") for i in range(3)])
    out = str(tmp_path / "run")  # step 1 of a run on qa.jsonl, as train_grpo.py saves it (no training needed)
    model, proc = models.load_policy(shipped("captioner"))
    checkpoint.save_checkpoint(out, 1, model, proc, torch.optim.AdamW(model.parameters()),
                               extra={"skipped_updates": 0, "data": "a QA file of 3 rows"})
    more = write(tmp_path / "more.jsonl", *[row(str(i), f"{i}.png") for i in range(4)])
    resume = ["train_grpo.py", "--steps", "2", "--images-per-step", "2", "--micro-batch-images", "1", "--group-size",
              "2", "--max-new-tokens", "4", "--eval-images", "0", "--out", out, "--resume"]
    other = shutil.copytree(out, str(tmp_path / "run2"))  # side by side, each its own folder: both write config.json
    errors = scripts(resume, [*resume, "--data", more, "--out", other])
    assert errors[0] == "train_grpo.py: error: --resume: the run trained on a QA file of 3 rows, not the built-in " \
                        "world (the steps would draw other images)"
    assert errors[1].endswith("the run trained on a QA file of 3 rows, not a QA file of 4 rows (the steps would draw "
                              "other images)")
    os.makedirs(tmp_path / "moved")
    moved = shutil.copy(qa, tmp_path / "moved" / "qa.jsonl")
    r = script(*resume, "--data", moved, "--image-root", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1]
    assert checkpoint.load_trainer_state(checkpoint.latest_checkpoint(out))["data"] == "a QA file of 3 rows"


def test_resume_refusal_names_every_changed_flag_as_it_is_typed(tmp_path):
    """Each flag that differs from the run's config.json is named, in --kebab-case, with its old value; a store_true
    flag as on / off (as typed: present or not)."""
    os.makedirs(tmp_path / "checkpoints" / "step_000002")
    json.dump({"lr": 1e-4, "lr_schedule": "constant", "steps": 10, "restate": False, "skip_bad": True},
              open(tmp_path / "config.json", "w"))
    flags = {"lr": 1e-3, "lr_schedule": "cosine", "steps": 10, "restate": True, "skip_bad": False}
    with pytest.raises(ValueError) as e:
        checkpoint.resume_checkpoint(str(tmp_path), True, flags, (), lambda flag: None)
    assert str(e.value) == (f"--resume with other flags than {tmp_path} was started with: --lr 0.001 (was 0.0001), "
                            "--lr-schedule cosine (was constant), --restate on (was off), --skip-bad off (was on)")


def test_a_run_folder_without_checkpoints_starts_over_with_any_flags(tmp_path, capsys):
    """A run killed before its first checkpoint leaves config.json alone: there is nothing to continue, so a new run
    (fresh, or --resume, which says it starts from step 0) may use other flags."""
    json.dump({"lr": 1e-4}, open(tmp_path / "config.json", "w"))
    for resume in (False, True):
        assert checkpoint.resume_checkpoint(str(tmp_path), resume, {"lr": 1e-3}, (), lambda flag: None) is None
    assert capsys.readouterr().out == f"--resume: no checkpoint in {tmp_path}, starting from step 0\n"
