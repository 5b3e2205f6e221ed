import base64
import io
import random
import re
from html import unescape
from html.parser import HTMLParser

from PIL import Image

from caprl_mini import shapes
from caprl_mini.evaluation import summary_rows, write_results
from caprl_mini.report import write_report

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
NAMES = ["sft <baseline>", "caprl"]


class Page(HTMLParser):
    """Records tag nesting errors, <img> sources, heading texts, the text inside <mark class="wrong"> (one string
    per mark), the summary table's rows (a list of cell texts each) and the whole text."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.srcs, self.tags = [], [], [], []
        self.h3, self.th, self.marks, self.text, self.rows = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.srcs.append(attrs["src"])
        if tag == "mark" and attrs.get("class") == "wrong":
            self.marks.append("")
        if tag in ("h3", "th"):
            getattr(self, tag).append("")
        summary = any(t == "table" and a.get("class") == "summary" for t, a in self.stack)
        if summary and tag == "tr":
            self.rows.append([])
        if summary and tag in ("th", "td"):
            self.rows[-1].append("")
        if tag not in VOID:
            self.stack.append((tag, attrs))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1][0] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)
        open_tags = [t for t, _ in self.stack]
        for t in ("h3", "th"):
            if t in open_tags:
                getattr(self, t)[-1] += data
        if any(t == "mark" and a.get("class") == "wrong" for t, a in self.stack):
            self.marks[-1] += data
        if any(t == "table" and a.get("class") == "summary" for t, a in self.stack) and self.rows:
            self.rows[-1][-1] += data


def sentences(caption):
    return [c.strip() for c in caption.split(".") if c.strip()]


def swap_color(caption, scene):
    """The full caption with the first object's color swapped for another: one false clause."""
    old = scene[0]["color"]
    new = next(c for c in shapes.COLORS if c != old)
    cap = caption.replace(f" {old} ", f" {new} ", 1)
    assert cap != caption
    return cap


def answers(caption, item):
    out = []
    for q in item["questions"]:
        gold = q["options"]["ABCD".index(q["answer"])]
        chosen = shapes.oracle_choice(caption, q)
        out.append({"question": q["question"], "options": q["options"] + [shapes.ABSTAIN], "gold": gold,
                    "chosen": chosen, "right": chosen == gold, "type": q["type"]})
    return out


def build(tmp_path, n=4):
    records, goods, bads = [], [], []
    for i in range(n):
        item = shapes.world_item(i, "test")
        good = shapes.full_caption(item["scene"], random.Random(i))
        bad = swap_color(good, item["scene"])
        swapped = next(c for c in sentences(bad) if c not in sentences(good))
        human = shapes.human_caption(item["scene"], random.Random(i))
        short = f"<script>alert(1)</script> {swapped}. {human} <script>alert(2)</script>"  # marked, then not
        goods.append(good)
        bads.append(bad)
        caps = [[good], [bad, bad.replace(". ", ", "), short]]  # one clause per comma: only one marked
        records.append({"id": item["id"], "image": item["image"], "scene": item["scene"], "captioners": [
            {"name": name, "captions": [{"caption": c, "answers": answers(c, item)} for c in cs]}
            for name, cs in zip(NAMES, caps)]})
    by_type = {t: 0.5 for t in shapes.QUESTION_TYPES}
    results = [{"path": name, "qa_accuracy": 0.5 + k / 10, "qa_accuracy_by_type": by_type, "fact_precision": 0.9,
                "heldout_types_accuracy": 0.4, "fact_recall": 0.8, "mean_caption_tokens": 20.0,
                "captions_per_image": k + 1}
               for k, name in enumerate(NAMES)]
    path = tmp_path / "report.html"
    write_report(path, results, records)
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page, records, goods, bads


def test_page_is_well_formed_and_has_no_script(tmp_path):
    page, *_ = build(tmp_path)
    assert page.errors == [] and page.stack == []
    assert "script" not in page.tags  # the caption's <script> came through as text
    assert "<script>alert(1)</script>" in "".join(page.text) and "<script>alert(2)</script>" in "".join(page.text)
    assert any(m.startswith("<script>") for m in page.marks)  # escaped inside a highlight too


def test_every_image_inline_as_png_of_the_right_size(tmp_path):
    page, records, *_ = build(tmp_path)
    assert len(page.srcs) == len(records)
    for src, rec in zip(page.srcs, records):
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        img = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):])))
        assert img.format == "PNG" and img.size == rec["image"].size
        assert list(img.convert("RGB").getdata()) == list(rec["image"].getdata())


def test_captioner_names_head_every_column_and_the_summary(tmp_path):
    page, records, *_ = build(tmp_path)
    assert page.h3 == NAMES * len(records)  # escaped "<" read back as text
    assert all(name in page.th for name in NAMES)
    rows = {r[0].strip(): r[1:] for r in page.rows}  # label -> one cell per captioner, in NAMES' order
    assert page.rows[0] == [""] + NAMES and rows["QA accuracy"] == ["0.500", "0.600"]
    assert rows["captions per image"] == ["1.0", "2.0"] and rows["fact recall"] == ["0.800", "0.800"]
    held = {label.split(" held out")[0] for label in rows if label.endswith(" held out")}
    assert held == set(shapes.HELDOUT_TYPES)  # exactly the held-out question types are marked


def test_only_the_false_clause_is_marked(tmp_path):
    page, records, goods, bads = build(tmp_path)
    wrong = [c for g, b in zip(goods, bads) for c in sentences(b) if c not in sentences(g)]
    assert len(wrong) == len(records)  # one swapped clause per image
    assert set(wrong) <= set(page.marks)
    assert not {c for g in goods for c in sentences(g)} & set(page.marks)
    # in page order, the marks are exactly the clauses where score_facts counts a false fact
    false = [clause.strip() for rec in records for c in rec["captioners"] for k in c["captions"]
             for clause in re.split("[.;,]", k["caption"])
             if any(r < n for r, n in shapes.score_facts(clause, rec["scene"])["stated"].values())]
    assert page.marks == false and not any("," in m for m in page.marks)


def test_right_and_wrong_counts_match_the_answers(tmp_path):
    page, records, *_ = build(tmp_path)
    flags = [a["right"] for rec in records for c in rec["captioners"] for k in c["captions"] for a in k["answers"]]
    text = "".join(page.text)
    assert text.count("✓") == sum(flags) and text.count("✗") == len(flags) - sum(flags)
    assert 0 < sum(flags) < len(flags)  # the test exercises both


def test_real_data_has_no_marks_and_missing_metrics_are_left_out(tmp_path):
    item = shapes.world_item(0, "test")
    bad = swap_color(shapes.full_caption(item["scene"]), item["scene"])
    rec = {"id": "real-0", "image": Image.new("RGB", (400, 300), "white"), "scene": None,
           "captioners": [{"name": "a", "captions": [{"caption": bad, "answers": answers(bad, item)}]}]}
    res = [{"path": "a", "qa_accuracy": 0.5, "qa_accuracy_by_type": {"qa": 0.5}, "heldout_types_accuracy": None,
            "mean_caption_tokens": 9.0, "captions_per_image": 1}]
    rec["captioners"][0]["captions"].append({"caption": "<script>x</script>", "answers": []})
    write_report(tmp_path / "r.html", res, [rec])
    page = Page()
    page.feed((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert page.errors == [] and page.marks == [] and "script" not in page.tags
    assert not {"fact precision", "held-out types", "best of n"} & {th.strip() for th in page.th}


def test_highlight_titles_say_what_is_stated_and_what_the_image_holds():
    """The tooltip of a false clause names the cell, the value the caption states, then the value in the image;
    a clause at an empty cell says nothing is there. True clauses and the right count stay unmarked."""
    from caprl_mini.report import _caption_html
    scene = [{"pos": "top left", "shape": "circle", "color": "red", "size": "small"},
             {"pos": "center", "shape": "star", "color": "blue", "size": "large"}]
    cap = "two objects. a large blue circle at the top left, a small green star at the bottom right."
    assert _caption_html(cap, scene) == (
        'two objects. <mark class="wrong" title="color at the top left: blue stated, red in the image; size at the top '
        'left: large stated, small in the image">a large blue circle at the top left</mark>, <mark class="wrong" '
        'title="nothing at the bottom right">a small green star at the bottom right</mark>.')


def test_images_shown_at_whole_multiples_and_never_shrunk_to_nothing(tmp_path):
    """84 px images show at 2x (168 px); an image wider than 168 px shows at its own size, not at width 0."""
    recs = [{"id": i, "image": Image.new("RGB", size, "white"), "scene": None, "captioners": []}
            for i, size in enumerate([(84, 84), (400, 300)])]
    write_report(tmp_path / "r.html", [], recs)
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert re.findall(r'<img( class="px")? src="[^"]*" width="(\d+)" height="(\d+)"', html) == [
        (' class="px"', "168", "168"), ("", "400", "300")]


def test_summary_numbers_accuracies_to_three_decimals_also_when_perfect(tmp_path, capsys):
    """An accuracy of 1.0 reads 1.000 like its neighbours; the means of counts (tokens, captions per image: floats in
    real results) read to one decimal whatever their size, an integer too; the console table alike, cell for cell."""
    res = [{"path": "a", "qa_accuracy": 1.0, "fact_precision": 0.25, "mean_caption_tokens": 20.0,
            "captions_per_image": 1.0}, {"path": "b", "qa_accuracy": 0.5, "mean_caption_tokens": 0.5,
                                         "captions_per_image": 4}]
    write_report(tmp_path / "r.html", res, [])
    page = Page()
    page.feed((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert {r[0].strip(): r[1:] for r in page.rows[1:]} == {
        "QA accuracy": ["1.000", "0.500"], "fact precision": ["0.250", "–"], "mean caption tokens": ["20.0", "0.5"],
        "captions per image": ["1.0", "4.0"]}
    write_results(str(tmp_path / "eval"), res)
    console = {line[:24].strip(): line[24:].split() for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert console == {"QA accuracy": ["1.000", "0.500"], "fact precision": ["0.250", "-"],
                       "mean caption tokens": ["20.0", "0.5"], "captions per image": ["1.0", "4.0"]}


def test_each_captions_answers_count_the_right_ones_and_show_judge_and_gold():
    """Under a caption: "k/n right" with k its right answers, then each answer with its type (held-out ones say so);
    a wrong one shows the judge's choice, then the gold."""
    from caprl_mini.report import _answers_html
    answers = [{"question": "what color is the object at the center?", "gold": "red", "chosen": "red", "right": True,
                "type": "color"},
               {"question": "how many objects are there?", "gold": "two", "chosen": "two", "right": True,
                "type": "count"},
               {"question": "where is the blue star?", "gold": "top left", "chosen": "center", "right": False,
                "type": "position"}]
    assert _answers_html(answers) == (
        '<ul class="qs"><li class="type">2/3 right</li>'
        '<li><span class="ok">✓</span> <span class="type">[color]</span> what color is the object at the center? '
        '<b>red</b></li>'
        '<li><span class="ok">✓</span> <span class="type">[count]</span> how many objects are there? <b>two</b></li>'
        '<li><span class="bad">✗</span> <span class="type">[position (held out)]</span> where is the blue star? '
        'judge: <b class="bad">center</b>, gold: <b>top left</b></li></ul>')


def test_highlighting_keeps_every_character_of_the_caption():
    """Tags stripped and entities read back, the highlighted caption is the caption, character for character: the
    spaces around a marked clause (before a delimiter too) and text that looks like HTML included."""
    from caprl_mini.report import _caption_html
    scene = [{"pos": "top left", "shape": "circle", "color": "red", "size": "small"}]
    cap = " one object .  a large blue circle at the top left ; a small red circle at the top left ,<b>&amp;</b>  "
    out = _caption_html(cap, scene)
    assert out.count('<mark class="wrong"') == 1  # the blue clause alone
    assert unescape(re.sub("<[^>]+>", "", out)) == cap


def test_a_wrong_count_says_the_count_stated_then_the_images():
    """The tooltip of a false count: "count: <stated> stated, <real> in the image"."""
    from caprl_mini.report import _caption_html
    scene = [{"pos": "top left", "shape": "circle", "color": "red", "size": "small"},
             {"pos": "center", "shape": "star", "color": "blue", "size": "large"}]
    assert _caption_html("three objects.", scene) == (
        '<mark class="wrong" title="count: 3 stated, 2 in the image">three objects</mark>.')


def test_small_images_scale_to_the_display_width(tmp_path):
    """A small image that is not square scales by its width: 56x28 shows at 3x, 168 px wide like the world's."""
    rec = {"id": 0, "image": Image.new("RGB", (56, 28), "white"), "scene": None, "captioners": []}
    write_report(tmp_path / "r.html", [], [rec])
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert re.findall(r'<img class="px" src="[^"]*" width="(\d+)" height="(\d+)"', page) == [("168", "84")]


def test_page_title_counts_images_and_captioners(tmp_path):
    recs = [{"id": i, "image": Image.new("RGB", (84, 84), "white"), "scene": None, "captioners": []} for i in range(3)]
    write_report(tmp_path / "r.html", [{"path": "a", "qa_accuracy": 0.5}], recs)
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<title>Caption evaluation: 3 images, 1 captioners</title>" in page


def test_a_zero_reads_as_a_number_and_only_a_missing_value_as_a_dash(tmp_path, capsys):
    """An accuracy of 0.0 (a captioner the judge never agrees with) reads 0.000, on the page and the console alike;
    the dash is for a value the captioner has not got."""
    res = [{"path": "a", "qa_accuracy": 0.0, "fact_precision": 0.0, "mean_caption_tokens": 0.0},
           {"path": "b", "qa_accuracy": 0.5, "mean_caption_tokens": 3.0}]
    write_report(tmp_path / "r.html", res, [])
    page = Page()
    page.feed((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert {r[0].strip(): r[1:] for r in page.rows[1:]} == {
        "QA accuracy": ["0.000", "0.500"], "fact precision": ["0.000", "–"], "mean caption tokens": ["0.0", "3.0"]}
    write_results(str(tmp_path / "eval"), res)
    console = {line[:24].strip(): line[24:].split() for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert console == {"QA accuracy": ["0.000", "0.500"], "fact precision": ["0.000", "-"],
                       "mean caption tokens": ["0.0", "3.0"]}


def test_summary_rows_read_each_metric_from_its_own_key():
    """Every metric a distinct value: each row holds its own key's values, per captioner; a question type only one
    captioner has gets a row (the other's cell None), marked held out when it is."""
    res = [{"path": "a", "qa_accuracy": 0.1, "qa_accuracy_by_type": {"color": 0.2}, "heldout_types_accuracy": 0.3,
            "best_of_n_accuracy": 0.4, "fact_precision": 0.5, "fact_recall": 0.6, "mean_caption_tokens": 7.0,
            "captions_per_image": 8.0},
           {"path": "b", "qa_accuracy": 0.9, "qa_accuracy_by_type": {"color": 0.8, "position": 0.7}}]
    assert summary_rows(res) == [
        ("QA accuracy", False, [0.1, 0.9], 3), ("  color", False, [0.2, 0.8], 3), ("  position", True, [None, 0.7], 3),
        ("held-out types", False, [0.3, None], 3), ("best of n", False, [0.4, None], 3),
        ("fact precision", False, [0.5, None], 3), ("fact recall", False, [0.6, None], 3),
        ("mean caption tokens", False, [7.0, None], 1), ("captions per image", False, [8.0, None], 1)]


def test_console_names_long_paths_by_their_end_and_marks_held_out_types(tmp_path, capsys):
    """A captioner path over 28 characters heads its 30-wide column as "..." and its last 25; a held-out type's row
    says so."""
    long = "runs/an_ablation_with_a_long_name/checkpoints/step_000400"
    write_results(str(tmp_path / "eval"), [{"path": long, "qa_accuracy_by_type": {"position": 0.25}},
                                           {"path": "assets/captioner", "qa_accuracy_by_type": {"position": 0.5}}])
    head, row = capsys.readouterr().out.splitlines()[:2]
    assert head == " " * 24 + ("..." + long[-25:]).rjust(30) + "assets/captioner".rjust(30)
    assert row == "  position (held out)".ljust(24) + "0.250".rjust(30) + "0.500".rjust(30)
