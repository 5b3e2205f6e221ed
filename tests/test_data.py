import base64
import io
import json

import pytest

from caprl_mini import shapes
from caprl_mini.data import DataError, QAFile


def write(tmp_path, rows, name="qa.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(p)


def image_file(tmp_path):
    shapes.world_item(0, "test")["image"].save(tmp_path / "img.png")
    return "img.png"


def good_row(img, id_="a"):
    return {"id": id_, "image": img, "questions": [{"question": "what?", "options": ["x", "y", "z"], "answer": "B"}]}


def test_reads_qa_jsonl_and_caprl_rows(tmp_path):
    img = image_file(tmp_path)
    buf = io.BytesIO()
    shapes.world_item(1, "test")["image"].save(buf, format="PNG")
    caprl = {"images": [base64.b64encode(buf.getvalue()).decode()], "id": "b",
             "reward_model": {"ground_truth": [{"question": "which?", "choices": ["A) red", "B) blue"], "answer": "B"}]}}
    qa = QAFile(write(tmp_path, [good_row(img), caprl]))
    assert len(qa) == 2
    a, b = qa[0], qa[1]
    assert a["image"].size == (84, 84) and a["questions"][0]["options"] == ["x", "y", "z"]
    assert b["questions"][0]["options"] == ["red", "blue"] and b["questions"][0]["answer"] == "B"
    assert b["image"].mode == "RGB"


def test_relative_image_paths_resolve_against_the_root_only(tmp_path, monkeypatch):
    """An image missing from the root is missing, even when the working folder holds one of the same name (it was
    read from there, silently the wrong image)."""
    (tmp_path / "data").mkdir()
    img = image_file(tmp_path)  # tmp_path/img.png, not in tmp_path/data
    monkeypatch.chdir(tmp_path)
    qa = QAFile(write(tmp_path / "data", [good_row(img)]))
    with pytest.raises(DataError, match=r"qa.jsonl:1: cannot read image 'img.png': no such file"):
        qa[0]
    assert QAFile(write(tmp_path / "data", [good_row(img)]), image_root=".")[0]["image"].size == (84, 84)


def test_a_row_without_id_gets_the_same_id_however_the_path_is_written(tmp_path, monkeypatch):
    """The default id is the file's name and line, not the path as typed: a resumed annotate.py or evaluate.py
    --captions matches it whether the file is named qa.jsonl, ./qa.jsonl or by its absolute path."""
    row = good_row(image_file(tmp_path))
    del row["id"]
    path = write(tmp_path, [row, row])
    monkeypatch.chdir(tmp_path)
    ids = [[r["id"] for r in QAFile(p).rows] for p in (path, "qa.jsonl", "./qa.jsonl")]
    assert ids == [["qa.jsonl:1", "qa.jsonl:2"]] * 3


def test_write_qa_rewrites_relative_image_paths_in_both_forms(tmp_path):
    """reward.py filter writes its output elsewhere: a plain path and datasets' {"path": ...} both still load."""
    from caprl_mini.data import write_qa
    img = image_file(tmp_path)
    qa = QAFile(write(tmp_path, [good_row(img, "a"), {**good_row(None, "b"), "image": {"path": img}}]))
    (tmp_path / "out").mkdir()
    write_qa(str(tmp_path / "out" / "f.jsonl"), qa.rows, qa.root)
    out = QAFile(str(tmp_path / "out" / "f.jsonl"))
    assert [out[i]["image"].size for i in range(2)] == [(84, 84)] * 2


def test_caprl_qa_rows_with_paths_text_ground_truth_and_a_bad_row(tmp_path):
    """CapRL-QA rows exported to JSONL: image as a path (under --image-root), ground truth as a list or as JSON
    text; a row whose answer is not among its choices is rejected naming the file and line."""
    (tmp_path / "imgs").mkdir()
    shapes.world_item(2, "test")["image"].save(tmp_path / "imgs" / "x.png")
    gt = [{"question": "how many?", "choices": ["A) 1", "B) 2", "C) 3", "D) 4"], "answer": "C"}]
    rows = [{"id": "r1", "image": "x.png", "reward_model": {"ground_truth": gt}},
            {"id": "r2", "images": ["x.png"], "reward_model": {"ground_truth": json.dumps(gt)}}]
    qa = QAFile(write(tmp_path, rows), image_root=str(tmp_path / "imgs"))
    assert [qa[i]["questions"][0]["options"] for i in range(2)] == [["1", "2", "3", "4"]] * 2
    assert qa[1]["questions"][0]["answer"] == "C" and qa[1]["image"].size == (84, 84)
    bad = {"id": "r3", "image": "x.png", "reward_model": {"ground_truth": [{**gt[0], "answer": "E"}]}}
    with pytest.raises(DataError, match=r"qa.jsonl:3: answer 'E' is not one of the option letters ABCD"):
        QAFile(write(tmp_path, rows + [bad]), image_root=str(tmp_path / "imgs"))


def test_nine_options_at_most_so_that_abstain_keeps_a_letter(tmp_path):
    """Nine options take A-I and the judge lists abstain as J; a tenth option would leave abstain no letter (the
    judge's prompt would fail mid-training), so the row is refused on load."""
    from caprl_mini.judge import user_message
    img = image_file(tmp_path)
    nine = [f"o{i}" for i in range(9)]
    qa = QAFile(write(tmp_path, [{**good_row(img), "questions": [{"question": "q?", "options": nine, "answer": "i"}]}]))
    q = qa.rows[0]["questions"][0]
    assert q["answer"] == "I" and q["options"] == nine
    assert user_message("c", "q?", nine + [shapes.ABSTAIN], "caprl").endswith("- I) o8\n- J) Can not answer based on "
                                                                             "the caption")
    ten = {**good_row(img), "questions": [{"question": "q?", "options": nine + ["o9"], "answer": "A"}]}
    with pytest.raises(DataError, match=r"qa.jsonl:1: at most 9 options \(one letter is kept for abstain\)"):
        QAFile(write(tmp_path, [ten]))


def test_caprl_choices_without_a_letter_prefix_keep_their_parentheses(tmp_path):
    """Only a leading "X) " with the choice's own letter is CapRL-QA's prefix: a ")" later in the text, or after
    another character, is the option's own text and stays."""
    choices = ["A) f(x) = 1", "B) g(x)", "3 (approx.)", "(d) none", "5) kg", "x)y"]
    gt = [{"question": "which?", "choices": choices, "answer": "C"}]
    qa = QAFile(write(tmp_path, [{"id": "r", "image": image_file(tmp_path), "reward_model": {"ground_truth": gt}}]))
    assert qa.rows[0]["questions"][0]["options"] == ["f(x) = 1", "g(x)", "3 (approx.)", "(d) none", "5) kg", "x)y"]
