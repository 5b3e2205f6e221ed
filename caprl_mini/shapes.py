"""The built-in "shapes" world: scenes, rendering, captions, MCQs, fact parser, oracle reader.

Everything is deterministic from (split, index), needs no files, and is fully verifiable: a caption can
be parsed back into facts and scored exactly, and any MCQ can be answered from a caption by rule.

A scene is 1..K objects, at most one per cell of a 3x3 grid. Objects are keyed by their cell, so a fact
is (cell, attribute, value). An 84x84 image with patch 14 and spatial merge 2 gives exactly one image
token per cell.
"""
import math
import random
import re

from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "star"]
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230),
          "yellow": (235, 200, 30), "purple": (150, 60, 200), "cyan": (30, 200, 210)}
SIZES = ["small", "large"]
POSITIONS = ["top left", "top middle", "top right", "middle left", "center", "middle right",
             "bottom left", "bottom middle", "bottom right"]
NUMBERS = ["one", "two", "three", "four"]  # count words; K <= 4
ATTRIBUTES = ["shape", "color", "size"]  # besides position, which keys the object
IMAGE_SIZE, CELL = 84, 28
MAX_OBJECTS = 4
QUESTION_TYPES = ["color", "shape", "size", "count", "position", "existence"]
HELDOUT_TYPES = ["position", "existence"]  # never in the reward; evaluation only (generalisation)
REWARD_TYPES = [t for t in QUESTION_TYPES if t not in HELDOUT_TYPES]
LEAKY_TYPE = "leaky_color"  # opt-in: "the object at the X is red. what color is the object at the X?"
ABSTAIN = "can not answer based on the caption"


def make_scene(index, split="train", max_objects=MAX_OBJECTS):
    """A scene is a list of objects {pos, shape, color, size}, sorted by cell. Same (split, index), same scene."""
    rng = random.Random(f"{split}:{index}")
    cells = sorted(rng.sample(range(9), rng.randint(1, max_objects)))
    return [{"pos": POSITIONS[c], "shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)),
             "size": rng.choice(SIZES)} for c in cells]


def render(scene, seed=0):
    """Pillow drawing of a scene; a small per-object jitter so pixels are not a lookup table."""
    rng = random.Random(seed)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    for obj in scene:
        c = POSITIONS.index(obj["pos"])
        cx = (c % 3) * CELL + CELL // 2 + rng.randint(-2, 2)
        cy = (c // 3) * CELL + CELL // 2 + rng.randint(-2, 2)
        r = 11 if obj["size"] == "large" else 6
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj["shape"] == "square":
            s = int(r * 0.85)
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif obj["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:  # star: 5 outer points at radius r, 5 inner at r * 0.4
            pts = [(cx + (r if i % 2 == 0 else r * 0.4) * math.sin(i * math.pi / 5),
                    cy - (r if i % 2 == 0 else r * 0.4) * math.cos(i * math.pi / 5)) for i in range(10)]
            draw.polygon(pts, fill=fill)
    return img


# ---------------------------------------------------------------- captions
# Object clause templates; {d} is the object's description ("large red circle"). The full caption uses one
# template for all its clauses; the "human" captions mix them.
CLAUSES = ["a {d} at the {pos}", "at the {pos} there is a {d}", "{pos}: a {d}"]
COUNTS = ["{n} objects", "there are {n} objects"]


def count_sentence(n, template):
    return template.format(n=NUMBERS[n - 1]).replace("one objects", "one object").replace("are one", "is one")


def describe(obj, keep=("size", "color", "shape")):
    words = [obj[a] for a in ("size", "color") if a in keep]
    return " ".join(words + [obj["shape"] if "shape" in keep else "shape"])


def full_caption(scene, rng=None):
    """States every fact: the count, then each object in reading order."""
    rng = rng or random.Random(0)
    clause, count = rng.choice(CLAUSES), rng.choice(COUNTS)
    parts = [count_sentence(len(scene), count)]
    parts += [clause.format(d=describe(o), pos=o["pos"]) for o in scene]
    return ". ".join(parts) + "."


def human_caption(scene, rng):
    """Like a short human caption: it stops early and drops attributes. The objects it mentions are the first
    ones in reading order (each next one with probability 0.5): a captioner trained on a random subset in any
    order named one cell and described the object of another (measured: color precision 1.00 -> 0.60 within
    500 steps; with cell-first clauses 1.00 -> 0.83 within 400), because full captions had taught it to read
    "the next object in reading order"."""
    k = 1
    while k < len(scene) and rng.random() < 0.5:
        k += 1
    objs = scene[:k]
    parts = [count_sentence(len(scene), rng.choice(COUNTS))] if rng.random() < 0.25 else []
    for o in objs:
        keep = [a for a, p in (("size", 0.4), ("color", 0.6), ("shape", 0.7)) if rng.random() < p]
        parts.append(rng.choice(CLAUSES).format(d=describe(o, keep), pos=o["pos"]))
    return ". ".join(parts) + "."


# ---------------------------------------------------------------- fact parser
_POS_RE = re.compile("|".join(sorted(POSITIONS, key=len, reverse=True)))
_COUNT_RE = re.compile(r"\b(" + "|".join(NUMBERS) + r") objects?\b")
_VOCAB = {"shape": SHAPES, "color": list(COLORS), "size": SIZES}


def parse_caption(caption):
    """Caption -> {"count": int|None, "objects": [{"pos": str|None, attr: value, ...}]}, one per clause.

    A clause is a sentence; a clause that names an attribute but no cell gets pos None (never true)."""
    out = {"count": None, "objects": []}
    for sent in caption.lower().split("."):
        m = _COUNT_RE.search(sent)
        if m and not _POS_RE.search(sent):
            out["count"] = NUMBERS.index(m.group(1)) + 1
            continue
        pos = _POS_RE.search(sent)
        obj = {"pos": pos.group(0) if pos else None}
        words = set(re.findall(r"[a-z]+", _POS_RE.sub(" ", sent)))
        for attr, values in _VOCAB.items():
            hits = [v for v in values if v in words]
            if hits:
                obj[attr] = hits[0]
        if obj["pos"] or len(obj) > 1:
            out["objects"].append(obj)
    return out


def score_facts(caption, scene):
    """Exact fact precision / recall of a caption against its scene.

    Stated facts: the count if stated, plus per parsed object its position and each attribute it names.
    A fact is true when the cell holds an object (position) with that value (attribute).
    Returns per-attribute (correct, stated) counts, recall = true facts stated correctly / all true facts, and
    "wrong": each false fact as (cell, attribute, stated value, value in the image); the cell and value are None
    where there is none (the count has no cell, an empty cell no value)."""
    parsed, truth = parse_caption(caption), {o["pos"]: o for o in scene}
    facts = [(None, "count", parsed["count"], len(scene))] if parsed["count"] is not None else []
    for obj in parsed["objects"]:
        real = truth.get(obj["pos"], {})
        facts.append((obj["pos"], "position", obj["pos"], real.get("pos")))
        facts += [(obj["pos"], a, obj[a], real.get(a)) for a in ATTRIBUTES if a in obj]
    stated = {a: [0, 0] for a in ["position"] + ATTRIBUTES + ["count"]}  # attr -> [correct, stated]
    recalled, wrong = set(), []
    for pos, a, value, real in facts:
        stated[a][1] += 1
        if real is not None and value == real:  # a clause naming no cell: None == None, still false
            stated[a][0] += 1
            recalled.add((pos, a))
        else:
            wrong.append((pos, a, value, real))
    n_true = 4 * len(scene) + 1  # position, shape, color, size per object, plus the count
    return {"stated": stated, "recall": len(recalled) / n_true, "n_recalled": len(recalled), "n_true": n_true,
            "wrong": wrong}


# ---------------------------------------------------------------- MCQs
def make_questions(scene, rng, leaky=False):
    """All MCQs of a scene: dicts {type, question, options, answer (letter)}. Options hold the answer once.
    leaky=True adds LEAKY_TYPE, questions whose wording gives the answer away (to show the leak filter at work)."""
    qs = []

    def add(qtype, text, gold, pool, k=4):
        distractors = rng.sample([v for v in pool if v != gold], min(k, len(pool)) - 1)
        options = distractors + [gold]
        rng.shuffle(options)
        qs.append({"type": qtype, "question": text, "options": options, "answer": "ABCD"[options.index(gold)]})

    for o in scene:
        add("color", f"what color is the object at the {o['pos']}?", o["color"], list(COLORS))
        add("shape", f"what shape is the object at the {o['pos']}?", o["shape"], SHAPES)
        add("size", f"what size is the object at the {o['pos']}?", o["size"], SIZES)
    add("count", "how many objects are there?", NUMBERS[len(scene) - 1], NUMBERS)
    combos = [(o["color"], o["shape"]) for o in scene]
    for o in scene:  # position of an object named by color and shape, when that names it uniquely
        if combos.count((o["color"], o["shape"])) == 1:
            add("position", f"where is the {o['color']} {o['shape']}?", o["pos"], POSITIONS)
    present = rng.choice(combos)
    absent = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in combos])
    for (c, s), gold in ((present, "yes"), (absent, "no")):
        add("existence", f"is there a {c} {s}?", gold, ["yes", "no"])
    for o in scene if leaky else []:  # last, so that the other questions' random draws do not change
        add(LEAKY_TYPE, f"the object at the {o['pos']} is {o['color']}. what color is the object at the {o['pos']}?",
            o["color"], list(COLORS))
    return qs


def oracle_answer(caption, question):
    """The exact reader: the answer text a perfect judge gives from the caption alone, or ABSTAIN."""
    parsed = parse_caption(caption)
    by_pos = {o["pos"]: o for o in parsed["objects"] if o["pos"]}
    q, t = question["question"], question.get("type")
    if t not in QUESTION_TYPES + [LEAKY_TYPE]:  # e.g. "qa": a QA file's question in free text
        raise ValueError(f"the oracle judge reads only the built-in world's questions (types "
                         f"{', '.join(QUESTION_TYPES)}), not {q!r} of type {t!r}: use a language-model judge")
    if t in ("color", "shape", "size", LEAKY_TYPE):
        return by_pos.get(_POS_RE.search(q).group(0), {}).get(t if t != LEAKY_TYPE else "color", ABSTAIN)
    if t == "count":
        return NUMBERS[parsed["count"] - 1] if parsed["count"] else ABSTAIN
    color, shape = re.search(r"(?:where is the|is there a) (\w+) (\w+)\?", q).groups()
    hits = [p for p, o in by_pos.items() if o.get("color") == color and o.get("shape") == shape]
    if t == "position":
        return hits[0] if len(hits) == 1 else ABSTAIN
    complete = parsed["count"] == len(by_pos) and all("color" in o and "shape" in o for o in by_pos.values())
    return "yes" if hits else ("no" if complete else ABSTAIN)


def restate_questions(caption, scene):
    """Training-only questions for a judge (sft.py --restate): "what is at the <cell>?" for every object, answered
    with every attribute the caption gives that cell ("large red circle", "small shape"), or ABSTAIN."""
    by_pos = {o["pos"]: o for o in parse_caption(caption)["objects"] if o["pos"]}
    return [(f"what is at the {o['pos']}?", describe(by_pos[o["pos"]], keep=by_pos[o["pos"]].keys())
             if o["pos"] in by_pos else ABSTAIN) for o in scene]


def oracle_choice(caption, question):
    """The oracle's answer as an option text among the question's options, or ABSTAIN."""
    ans = oracle_answer(caption, question)
    return ans if ans in question["options"] else ABSTAIN


def world_item(index, split="train", leaky=False):
    """One built-in example in the QA-data format, plus its scene (for exact fact scoring)."""
    scene = make_scene(index, split)
    rng = random.Random(f"q:{split}:{index}")
    return {"id": f"shapes-{split}-{index}", "image": render(scene, seed=f"{split}:{index}"),
            "questions": make_questions(scene, rng, leaky), "scene": scene}


def world_text(n=2000):
    """A corpus of the world's language (captions, questions, options) to train the tokenizer on."""
    rng = random.Random("corpus")
    lines = []
    for i in range(n):
        scene = make_scene(i, "corpus")
        lines += [full_caption(scene, rng), human_caption(scene, rng)]
        lines += [q["question"] + " " + " ".join(q["options"]) for q in make_questions(scene, rng)]
    return lines + [ABSTAIN, "the answer is", "please describe this image in detail."]
