import random

import pytest

from caprl_mini import shapes
from caprl_mini.judge import score_questions


@pytest.mark.parametrize("index", range(30))
def test_full_caption_round_trips(index):
    scene = shapes.make_scene(index, "test")
    for t in range(6):  # several paraphrase templates
        cap = shapes.full_caption(scene, random.Random(t))
        parsed = shapes.parse_caption(cap)
        assert parsed["count"] == len(scene)
        assert sorted(parsed["objects"], key=lambda o: o["pos"]) == sorted(scene, key=lambda o: o["pos"])
        f = shapes.score_facts(cap, scene)
        assert f["recall"] == 1.0
        assert all(c == n for c, n in f["stated"].values())


def test_partial_and_wrong_captions_scored_exactly():
    scene = [{"pos": "top left", "shape": "circle", "color": "red", "size": "small"},
             {"pos": "center", "shape": "star", "color": "blue", "size": "large"}]
    # one object, size wrong, color right, shape right; a second clause at an empty cell; a wrong count
    cap = "a large red circle at the top left. at the bottom right there is a green square. three objects."
    f = shapes.score_facts(cap, scene)
    assert f["stated"] == {"position": [1, 2], "shape": [1, 2], "color": [1, 2], "size": [0, 1], "count": [0, 1]}
    # true facts: 4 per object + count = 9; recalled: top-left position, shape, color = 3
    assert f["n_true"] == 9 and f["n_recalled"] == 3
    partial = "top left: a red shape."
    f = shapes.score_facts(partial, scene)
    assert f["stated"]["shape"] == [0, 0] and f["stated"]["color"] == [1, 1] and f["n_recalled"] == 2


@pytest.mark.parametrize("index", range(40))
def test_oracle_right_from_full_captions_and_abstains_when_missing(index):
    item = shapes.world_item(index, "test")
    rng = random.Random(index)
    full = shapes.full_caption(item["scene"], rng)
    qs = item["questions"]
    assert score_questions("oracle", None, [full] * len(qs), qs, "cloze", "argmax", rng) == [1.0] * len(qs)
    # drop the object of each attribute question: the oracle must abstain
    for q in qs:
        if q["type"] in ("color", "shape", "size"):
            pos = next(p for p in shapes.POSITIONS if p in q["question"])
            rest = [o for o in item["scene"] if o["pos"] != pos]
            cap = ". ".join(f"a {shapes.describe(o)} at the {o['pos']}" for o in rest) + "."
            assert shapes.oracle_answer(cap, q) == shapes.ABSTAIN
    assert shapes.oracle_answer("", qs[0]) == shapes.ABSTAIN


def test_oracle_refuses_questions_it_cannot_read():
    """A QA file's free-text question (type "qa") is not the world's: a clear error, not a failed regex deep inside."""
    q = {"question": "what is the man holding?", "options": ["a cup", "a pen"], "answer": "A", "type": "qa"}
    with pytest.raises(ValueError, match="reads only the built-in world's questions .* of type 'qa'"):
        shapes.oracle_answer("a red circle at the top left.", q)


@pytest.mark.parametrize("index", range(40))
def test_options_hold_the_answer_once_and_valid_distractors(index):
    item = shapes.world_item(index, "test")
    vocab = {"color": list(shapes.COLORS), "shape": shapes.SHAPES, "size": shapes.SIZES, "count": shapes.NUMBERS,
             "position": shapes.POSITIONS, "existence": ["yes", "no"]}
    for q in item["questions"]:
        gold = q["options"]["ABCD".index(q["answer"])]
        assert q["options"].count(gold) == 1
        assert len(set(q["options"])) == len(q["options"]) >= 2
        assert all(o in vocab[q["type"]] for o in q["options"])
        # the gold answer is the truth of the scene
        full = shapes.full_caption(item["scene"])
        assert shapes.oracle_answer(full, q) == gold


@pytest.mark.parametrize("index", range(20))
def test_restate_answers_agree_with_the_oracle(index):
    scene, rng = shapes.make_scene(index, "test"), random.Random(index)
    for cap in (shapes.full_caption(scene, rng), shapes.human_caption(scene, rng), ""):
        qs = {(q["type"], q["question"].rsplit(" at the ", 1)[-1]): q for q in shapes.make_questions(scene, rng)}
        for (question, answer), o in zip(shapes.restate_questions(cap, scene), scene):
            oracle = {a: shapes.oracle_answer(cap, qs[(a, o["pos"] + "?")]) for a in ("size", "color", "shape")}
            if all(v == shapes.ABSTAIN for v in oracle.values()) and o["pos"] not in cap:
                assert answer == shapes.ABSTAIN
                continue
            stated = [v for a, v in oracle.items() if v != shapes.ABSTAIN]
            if oracle["shape"] == shapes.ABSTAIN:
                stated.append("shape")
            assert answer == " ".join(stated), (cap, question)


def test_same_seed_same_scenes_and_pixels():
    a, b = shapes.world_item(7, "train"), shapes.world_item(7, "train")
    assert a["scene"] == b["scene"] and a["questions"] == b["questions"]
    assert a["image"].tobytes() == b["image"].tobytes()
    scenes = [repr(shapes.make_scene(i, "train")) for i in range(50)]
    assert len(set(scenes)) > 45  # different indices, different scenes
    assert shapes.make_scene(7, "train") != shapes.make_scene(7, "eval")


def test_human_captions_are_partial():
    rng = random.Random(0)
    recalls = [shapes.score_facts(shapes.human_caption(shapes.make_scene(i), rng), shapes.make_scene(i))["recall"]
               for i in range(200)]
    assert 0.15 < sum(recalls) / len(recalls) < 0.6


@pytest.mark.parametrize("size, pixels", [("small", 11 * 11), ("large", 19 * 19)])
def test_render_draws_each_object_in_its_own_cell_at_its_size(size, pixels):
    """The image must show the scene's facts: a square at cell c (reading order) covers exactly its side^2 pixels
    (int(r * 0.85) each way, r = 6 small / 11 large), all of them inside cell c's 28x28 block."""
    for c, pos in enumerate(shapes.POSITIONS):
        img = shapes.render([{"pos": pos, "shape": "square", "color": "red", "size": size}], seed=c)
        red = [(x // shapes.CELL, y // shapes.CELL) for x in range(shapes.IMAGE_SIZE) for y in range(shapes.IMAGE_SIZE)
               if img.getpixel((x, y)) == shapes.COLORS["red"]]
        assert len(red) == pixels and set(red) == {(c % 3, c // 3)}, pos


def test_a_clause_naming_no_cell_states_only_false_facts():
    """"a red circle." names no cell: its position, shape and color are stated and all false (no None == None
    match counts as true), and nothing is recalled."""
    scene = [{"pos": "top left", "shape": "circle", "color": "red", "size": "small"}]
    f = shapes.score_facts("a red circle.", scene)
    assert f["stated"] == {"position": [0, 1], "shape": [0, 1], "color": [0, 1], "size": [0, 0], "count": [0, 0]}
    assert f["n_recalled"] == 0 and f["n_true"] == 5
    assert f["wrong"] == [(None, "position", None, None), (None, "shape", "circle", None), (None, "color", "red", None)]


def test_oracle_abstains_on_where_when_the_caption_names_two_such_objects():
    """"where is the red circle?" from a caption with two red circles has no single answer: the oracle abstains
    (it does not pick the first), and answers the cell when the caption names one."""
    q = {"type": "position", "question": "where is the red circle?", "options": ["top left", "center"], "answer": "A"}
    two = "a small red circle at the top left. a large red circle at the center."
    assert shapes.oracle_answer(two, q) == shapes.ABSTAIN
    assert shapes.oracle_answer("a small red circle at the center. a blue star at the top left.", q) == "center"
