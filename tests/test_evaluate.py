"""evaluate.py as users run it: captions from a JSONL (annotate.py's) against the captioner that wrote them."""
import html
import json
import os
import random
import re
import runpy
import subprocess
import sys
from html.parser import HTMLParser

from caprl_mini import shapes
from caprl_mini.evaluation import caption_items, evaluate_captions, item_seed
from caprl_mini.models import build_tiny_judge, load_judge, load_policy
from conftest import shipped

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(name, *args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, name), *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_captions_from_jsonl_score_as_the_captioner_that_wrote_them(tmp_path):
    captioner, _ = shipped("captioner"), shipped("judge")
    qa, ann, out = str(tmp_path / "w" / "qa.jsonl"), str(tmp_path / "ann.jsonl"), str(tmp_path / "eval")
    script("reward.py", "world", "--images", "12", "--out", qa)
    script("annotate.py", "--model", captioner, "--images", qa, "--out", ann, "--batch-size", "50")
    bare = str(tmp_path / "bare.jsonl")  # the same captions without token counts: counted by the evaluation
    with open(bare, "w") as f:
        f.writelines(json.dumps({"id": r["id"], "caption": r["caption"]}) + "\n" for r in map(json.loads, open(ann)))
    script("evaluate.py", "--data", qa, "--captioner", captioner, "--captions", ann, "--captions", bare, "--out", out,
           "--report", "pages/report.html")  # a folder the report makes
    a, b, c = json.load(open(os.path.join(out, "results.json")))["captioners"]
    assert (a["path"], b["path"], c["path"]) == (captioner, ann, bare)
    assert {k: v for k, v in a.items() if k != "path"} == {k: v for k, v in b.items() if k != "path"} \
        == {k: v for k, v in c.items() if k != "path"}  # the world's judge and captioner share a tokenizer
    assert "fact_precision" in a  # the world's scenes travel through the QA JSONL
    imgs = []
    parser = HTMLParser()
    parser.handle_starttag = lambda tag, attrs: imgs.append(dict(attrs)) if tag == "img" else None
    parser.feed(open(os.path.join(out, "pages", "report.html"), encoding="utf-8").read())
    assert len(imgs) == 12 and all(i["src"].startswith("data:image/png;base64,") for i in imgs)


def test_missing_caption_ids_are_named_before_any_model_loads(tmp_path):
    """The --captions files are checked first: here the error is theirs, not the (missing) captioner's, which
    would load and caption every image first."""
    qa, ann = str(tmp_path / "w" / "qa.jsonl"), str(tmp_path / "ann.jsonl")
    script("reward.py", "world", "--images", "3", "--out", qa)
    open(ann, "w").write(json.dumps({"id": "shapes-eval-0", "caption": "one object"}) + "\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--data", qa, "--captions", ann,
                        "--captioner", str(tmp_path / "no_such_captioner"), "--out", str(tmp_path / "e")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {ann}: no caption for 2 of the 3 images, e.g. 'shapes-eval-1'"


def test_torchrun_two_ranks_evaluate_as_one_process(tmp_path):
    """Rank r captions images r, r + 2, ...; rank 0 gathers and scores: sampled captions (seeded per image) and every
    figure equal one process's."""
    captioner, _ = shipped("captioner"), shipped("judge")
    args = ["--captioner", captioner, "--images", "7", "--temperature", "1.0", "--captions-per-image", "2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    script("evaluate.py", *args, "--out", one)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        os.path.join(ROOT, "evaluate.py"), *args, "--out", two], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = (json.load(open(os.path.join(d, "results.json")))["captioners"] for d in (one, two))
    assert a == b and a[0]["qa_accuracy"] > 0


def test_best_of_n_weighs_images_as_qa_accuracy_does():
    """Both pool (caption, question) pairs, so one caption per image gives best-of-n == QA accuracy also when images
    have different numbers of questions (a mean over images weighed a 7-question image like a 19-question one, and
    best-of-n came out below QA accuracy); with a full and an empty caption per image, best-of-n is the full one's."""
    items = [shapes.world_item(i, "eval") for i in range(8)]  # 1 to 4 objects: 7 to 19 questions
    full = [shapes.full_caption(it["scene"]) if len(it["scene"]) > 1 else "an image." for it in items]
    one = evaluate_captions("oracle", None, "cloze", items, [[(c, 1)] for c in full])
    assert 0 < one["qa_accuracy"] < 1 and one["best_of_n_accuracy"] == one["qa_accuracy"]
    # by hand: the oracle answers every question of a fully captioned image and none of "an image."
    by_type = {}
    for it in items:
        for q in it["questions"]:
            by_type.setdefault(q["type"], []).append(len(it["scene"]) > 1)
    assert one["qa_accuracy_by_type"] == {t: sum(v) / len(v) for t, v in sorted(by_type.items())}
    held = [r for t in shapes.HELDOUT_TYPES for r in by_type[t]]
    assert one["heldout_types_accuracy"] == sum(held) / len(held) and 0 < sum(held) < len(held)
    n_true = [4 * len(it["scene"]) + 1 for it in items]  # every object's 4 facts, and the count
    assert one["fact_precision"] == 1.0  # "an image." states no fact
    assert one["fact_recall"] == sum(n for n, it in zip(n_true, items) if len(it["scene"]) > 1) / sum(n_true)
    two = evaluate_captions("oracle", None, "cloze", items, [[(c, 1), ("", 1)] for c in full])
    assert two["best_of_n_accuracy"] == one["qa_accuracy"] and two["qa_accuracy"] == one["qa_accuracy"] / 2


def test_sampling_flags_with_only_caption_files_are_a_usage_error(tmp_path):
    """--captions files are evaluated as they are: --temperature / --captions-per-image with them alone were
    silently ignored."""
    caps = str(tmp_path / "caps.jsonl")
    open(caps, "w").write(json.dumps({"id": "shapes-eval-0", "caption": "one object."}) + "\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--captions", caps, "--temperature", "1",
                        "--out", str(tmp_path / "e")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "--captions files are evaluated as they are" in r.stderr, r.stderr[-2000:]


def test_details_hold_each_captions_own_answers():
    """The report's material: per item, per caption, the judge's answers to that caption. A full caption gets every
    question right, the empty one after it abstains on every question (not a copy of the first caption's answers).
    An item with no caption gets an entry with none."""
    items = [shapes.world_item(i, "eval") for i in range(3)]
    details, caps = [], [[(shapes.full_caption(it["scene"]), 1), ("", 1)] for it in items]
    evaluate_captions("oracle", None, "cloze", items, caps, details=details)
    assert [[c["caption"] for c in d["captions"]] for d in details] == [[shapes.full_caption(it["scene"]), ""]
                                                                       for it in items]
    details = []  # an item with no caption keeps its place: the next item's answers are not shifted onto it
    evaluate_captions("oracle", None, "cloze", items, [caps[0], [], caps[2]], details=details)
    assert [len(d["captions"]) for d in details] == [2, 0, 2]
    for it, d in zip(items[:1] + items[2:], details[:1] + details[2:]):
        gold = [q["options"]["ABCD".index(q["answer"])] for q in it["questions"]]
        full, empty = d["captions"]
        assert [a["question"] for a in full["answers"]] == [q["question"] for q in it["questions"]]
        assert [(a["gold"], a["chosen"], a["right"]) for a in full["answers"]] == [(g, g, True) for g in gold]
        assert [(a["gold"], a["chosen"], a["right"]) for a in empty["answers"]] == [(g, shapes.ABSTAIN, False)
                                                                                   for g in gold]


def test_results_and_report_are_evaluate_captions_with_the_flags_given(tmp_path, monkeypatch, tiny_judge_dir):
    """In this process, a captioner and a caption file side by side: the results are evaluate_captions over the first
    --images images with --seed (option shuffles) and --judge-format (letters, overriding the judge's cloze), on
    caption_items' captions sampled with --seed, --temperature, --captions-per-image and the pixel bounds, and on the
    file's captions with its token counts (the judge tokenizer's count + 1 where a line has none); the report shows
    each image's own captions."""
    items = [shapes.world_item(i, "eval") for i in range(3)]
    caps = tmp_path / "caps.jsonl"
    lines = [{"id": f"shapes-eval-{i}", "caption": f"image {i}: a red circle at the center."} for i in range(4)]
    for i in (0, 2):
        lines[i]["tokens"] = 30 + i
    caps.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "eval"
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--captioner", shipped("captioner"), "--captions", str(caps),
                                      "--images", "3", "--seed", "5", "--temperature", "1", "--captions-per-image",
                                      "2", "--max-new-tokens", "8", "--min-pixels", "50176", "--max-pixels", "200704",
                                      "--judge", tiny_judge_dir, "--judge-format", "letter", "--out", str(out),
                                      "--report", "r.html"])
    runpy.run_path(os.path.join(ROOT, "evaluate.py"), run_name="__main__")
    got = json.load(open(out / "results.json"))["captioners"]
    model, proc = load_policy(shipped("captioner"), min_pixels=50176, max_pixels=200704)  # 84 px -> 224
    sampled = caption_items(model, proc, items, max_new_tokens=8, temperature=1.0, n=2, seed=5)
    judge, jtok, _ = load_judge(tiny_judge_dir)
    given = [[(x["caption"], x.get("tokens", len(jtok.encode(x["caption"])) + 1))] for x in lines[:3]]
    assert given[1][0][1] != len(lines[1]["caption"].split()) + 1  # counted in tokens, not words
    for r, captions in zip(got, [sampled, given]):
        want = evaluate_captions(judge, jtok, "letter", items, captions, seed=5)
        assert {k: v for k, v in r.items() if k != "path"} == want
    page = open(out / "r.html", encoding="utf-8").read()
    shown = [html.unescape(re.sub("<[^>]+>", "", p)) for p in re.findall(r'<p class="cap">(.*?)</p>', page, re.S)]
    assert shown == [c for s, g in zip(sampled, given) for c, _ in s + g]


def test_every_figure_of_one_image_with_two_captions_by_hand():
    """One small red circle at the top left; a full caption (10 tokens) and "a blue circle at the top left." (4).
    By hand: the full one answers all 7 questions, the short one only the shape; its facts are position and shape
    true, color false (no count, no size), so precision pools 5 + 2 true of 5 + 3 stated facts, recall 5 + 2 of
    the 5 true facts per caption. An image with no caption changes only the image count and captions per image."""
    scene = [{"pos": "top left", "shape": "circle", "color": "red", "size": "small"}]
    item = {"id": "x", "scene": scene, "questions": shapes.make_questions(scene, random.Random(0))}
    assert sorted(q["type"] for q in item["questions"]) == sorted(shapes.QUESTION_TYPES + ["existence"])
    caps = [("one object. a small red circle at the top left.", 10), ("a blue circle at the top left.", 4)]
    res = evaluate_captions("oracle", None, "cloze", [item], [caps])
    assert res == {"n_images": 1, "captions_per_image": 2.0, "qa_accuracy": 8 / 14, "best_of_n_accuracy": 1.0,
                   "qa_accuracy_by_type": {"color": 0.5, "count": 0.5, "existence": 0.5, "position": 0.5,
                                           "shape": 1.0, "size": 0.5},
                   "heldout_types_accuracy": 3 / 6, "mean_caption_tokens": 7.0, "fact_precision": 7 / 8,
                   "fact_recall": 7 / 10}
    other = shapes.world_item(0, "eval")
    assert evaluate_captions("oracle", None, "cloze", [item, other], [caps, []]) == {
        **res, "n_images": 2, "captions_per_image": 1.0}


def test_without_held_out_questions_their_accuracy_is_missing_not_zero():
    """A QA file's questions are no held-out type: the held-out accuracy is None (a dash in the table), not 0.0."""
    items = [shapes.world_item(i, "eval") for i in range(2)]
    for it in items:
        it["questions"] = [q for q in it["questions"] if q["type"] not in shapes.HELDOUT_TYPES]
    res = evaluate_captions("oracle", None, "cloze", items, [[(shapes.full_caption(it["scene"]), 1)] for it in items])
    assert res["qa_accuracy"] == 1.0 and res["heldout_types_accuracy"] is None


def test_letter_judges_see_options_shuffled_by_the_seed(tok):
    """A letter judge's answer depends on the option order: the same seed gives the same choices, another seed
    other ones (with the seed ignored, every evaluation would read one order)."""
    judge, jtok = build_tiny_judge(tok, seed=2, kv_heads=2)
    items = [shapes.world_item(i, "eval") for i in range(2)]
    caps = [[(shapes.full_caption(it["scene"]), 1)] for it in items]

    def choices(seed):
        details = []
        evaluate_captions(judge, jtok, "letter", items, caps, seed=seed, details=details)
        return [a["chosen"] for d in details for c in d["captions"] for a in c["answers"]]
    assert choices(0) == choices(0) != choices(1)


def test_item_seeds_depend_on_seed_and_id_and_never_on_the_process():
    """63-bit, a function of (seed, id) alone: a pinned value (Python's hash() of a str differs per process), and
    another seed or id gives another."""
    assert item_seed(0, "shapes-eval-0") == 3641031929105473671
    seeds = {item_seed(s, i) for s in (0, 1) for i in ("shapes-eval-0", "shapes-eval-1")}
    assert len(seeds) == 4 and all(0 <= s < 2 ** 63 for s in seeds)
