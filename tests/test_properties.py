"""Property-based tests (hypothesis): MCQ option shuffling, answer-letter parsing, the fact parser and oracle on
arbitrary scenes, and the data readers on arbitrary unicode (round trips, a caption file cut at any byte)."""
import itertools
import json
import os
import random
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from caprl_mini import data, shapes
from caprl_mini.judge import LETTERS, shuffle_options

SETTINGS = settings(max_examples=50, deadline=None)
# any unicode, often a line break that json.dumps(ensure_ascii=False) leaves raw and str.splitlines splits on
chars = st.characters(codec="utf-8") | st.sampled_from("\x85\u2028\u2029")
solid = st.characters(codec="utf-8", exclude_categories=("Zs", "Zl", "Zp", "Cc"))  # never whitespace
text = st.tuples(solid, st.text(chars, max_size=12)).map(lambda t: (t[0] + t[1]).rstrip())  # not blank, not padded
options = st.lists(text, min_size=2, max_size=len(LETTERS) - 1, unique=True)
# one character whose upper case is several, starting with a letter ("ẚ" -> "Aʾ", "ﬀ" -> "FF"): a trap for parsers
TRAPS = [c for c in map(chr, range(0x10000)) if len(c.upper()) > 1 and c.upper()[0] in LETTERS]


@st.composite
def questions(draw):
    opts = draw(options)
    return {"question": draw(text), "options": opts, "answer": LETTERS[draw(st.integers(0, len(opts) - 1))],
            "type": "qa"}


@SETTINGS
@given(questions(), st.integers(0, 2**32))
def test_shuffled_options_keep_the_gold_and_are_a_permutation_with_abstain_last(q, seed):
    opts, gold = shuffle_options(q, random.Random(seed))
    assert sorted(opts[:-1]) == sorted(q["options"]) and opts[-1] == shapes.ABSTAIN
    assert opts[gold] == q["options"][LETTERS.index(q["answer"])] and gold < len(q["options"])
    assert shuffle_options(q, random.Random(seed)) == (opts, gold)  # the same generator state, the same shuffle


@SETTINGS
@given(options, st.data())
def test_answer_letters_parse_to_their_option_and_anything_else_is_refused(opts, draws):
    """An answer the reader accepts is exactly one of the option letters (any case, any surrounding whitespace)
    and names that option; any other text is a DataError, never a wrong letter."""
    k = draws.draw(st.integers(0, len(opts) - 1))
    pad = st.sampled_from(["", " ", "\t", "\n "])
    letter = draws.draw(pad) + draws.draw(st.sampled_from([LETTERS[k], LETTERS[k].lower()])) + draws.draw(pad)
    parsed = data._question({"question": "q", "options": opts, "answer": letter}, "f:1")
    assert parsed["options"] == opts and parsed["answer"] == LETTERS[k]
    for garbage in [draws.draw(st.text(max_size=5)), *TRAPS]:
        try:
            got = data._question({"question": "q", "options": opts, "answer": garbage}, "f:1")["answer"]
        except data.DataError as e:
            assert str(e).startswith("f:1: answer ")
        else:
            assert got == garbage.strip().upper() and got in LETTERS[:len(opts)]


@SETTINGS
@given(options)
def test_caprl_choices_lose_their_letter_prefix_only(opts):
    choices = [f"{LETTERS[i]}) {o}" for i, o in enumerate(opts)]  # CapRL-QA's "A) text"
    assert data._question({"question": "q", "choices": choices, "answer": "A"}, "f:1")["options"] == opts


@st.composite
def scenes(draw):
    cells = draw(st.lists(st.integers(0, 8), min_size=1, max_size=shapes.MAX_OBJECTS, unique=True))
    return [{"pos": shapes.POSITIONS[c], "shape": draw(st.sampled_from(shapes.SHAPES)),
             "color": draw(st.sampled_from(list(shapes.COLORS))), "size": draw(st.sampled_from(shapes.SIZES))}
            for c in sorted(cells)]


@SETTINGS
@given(scenes(), st.integers(0, 2**32))
def test_any_scene_full_caption_parses_back_exactly_and_the_oracle_answers_every_question(scene, seed):
    rng = random.Random(seed)
    cap = shapes.full_caption(scene, rng)
    facts = shapes.score_facts(cap, scene)
    assert facts["recall"] == 1.0 and all(c == n for c, n in facts["stated"].values())
    for q in shapes.make_questions(scene, rng):
        assert len(set(q["options"])) == len(q["options"])
        assert shapes.oracle_choice(cap, q) == q["options"][LETTERS.index(q["answer"])], (cap, q)


# the world's words in any order and case, with punctuation and noise: text that parses (plain text seldom does)
world_words = st.sampled_from(shapes.SHAPES + list(shapes.COLORS) + shapes.SIZES + shapes.POSITIONS + shapes.NUMBERS
                              + [f"{n} objects." for n in shapes.NUMBERS] + ["there is a", "at the", ".", ",", ":"])
world_text = st.lists(world_words.map(lambda w: w.upper() if len(w) % 3 == 0 else w) | st.text(max_size=4),
                      max_size=16).map(" ".join)


@settings(max_examples=300, deadline=None)  # 0.6 s: enough draws that state a count
@given(world_text | st.text(max_size=60))
def test_fact_parser_on_any_text_states_only_known_values(caption):
    """Every value read is one of the world's, and one the text names (the count: the number word it states)."""
    parsed = shapes.parse_caption(caption)
    assert parsed["count"] is None or shapes.NUMBERS[parsed["count"] - 1] in caption.lower()
    vocab = {"shape": shapes.SHAPES, "color": list(shapes.COLORS), "size": shapes.SIZES}
    for obj in parsed["objects"]:
        assert obj["pos"] is None or obj["pos"] in shapes.POSITIONS
        assert all(obj[a] in vocab[a] and obj[a] in caption.lower() for a in shapes.ATTRIBUTES if a in obj)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(text, st.lists(questions(), min_size=1, max_size=2)), min_size=1, max_size=3,
                unique_by=lambda r: r[0]))
def test_write_qa_then_qafile_reads_back_the_same_rows(rows):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "qa.jsonl")
        data.write_qa(path, [{"id": i, "image": "img.png", "questions": qs} for i, qs in rows], d)
        qa = data.QAFile(path)
    assert [(r["id"], r["questions"]) for r in qa.rows] == rows


captions = st.lists(st.tuples(st.text(chars, max_size=8), st.text(chars, max_size=30).filter(str.strip)), min_size=1,
                    max_size=8)


@SETTINGS
@given(captions)
def test_read_captions_round_trips_any_unicode_in_utf8(records):
    """Raw UTF-8 (ensure_ascii=False), so line separators such as U+2028 and U+0085 reach the reader unescaped."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "caps.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": i, "caption": c}, ensure_ascii=False) + "\n" for i, c in records)
        got = data.read_captions(path)
    want = {}
    for i, c in records:
        want.setdefault(i, []).append((c, None))
    assert got == want


@SETTINGS
@given(captions, st.floats(0, 1))
def test_caption_file_survives_a_cut_at_any_byte(records, where):
    """A kill mid-write leaves a partial last line: reopening drops exactly it, keeps every whole record (also one
    whose newline is missing: a complete record, as a file edited by hand ends), and the next append starts on a
    clean line."""
    lines = [(json.dumps({"id": i, "caption": c}, ensure_ascii=False) + "\n").encode() for i, c in records]
    raw = b"".join(lines)
    cut = int(where * len(raw))
    ends = itertools.accumulate(map(len, lines))
    whole = [i for (i, _), end in zip(records, ends) if end - 1 <= cut]  # end - 1: the record without its newline
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "caps.jsonl")
        with open(path, "wb") as f:
            f.write(raw[:cut])
        f = data.CaptionFile(path)
        assert f.done == set(whole)
        f.append({"id": "new", "caption": "x"})
        assert data.CaptionFile(path).done == set(whole) | {"new"}
        assert [json.loads(x)["id"] for x in open(path, encoding="utf-8")] == whole + ["new"]
