"""QA data on disk and the built-in world behind one interface: `dataset[i]` -> an item
{"id", "image" (PIL RGB), "questions": [{"question", "options", "answer" (letter), "type"}], "scene" (built-in)}.

QA JSONL, one image per line:   {"id", "image": "path", "questions": [{"question", "options": [...], "answer": "C"}]}
CapRL-QA rows (the released CapRL-QA-75K exported to JSONL) are accepted too:
    {"id"?, "image" | "images", "reward_model": {"ground_truth": [{"question", "choices": ["A) ...", ...], "answer": "C"}]}}
Images: a path (relative paths resolve against --image-root, else the JSONL's folder), or bytes / base64.
Every line is validated on load; a bad line raises DataError naming the file and line and what to fix.

Captions on disk (annotate.py writes them, evaluate.py --captions and sft.py --captions read them): JSONL of
{"id", "image", "caption", ...}, appended and flushed one record at a time (CaptionFile).
"""
import base64
import binascii
import contextlib
import fcntl
import io
import json
import os

from PIL import Image

from . import shapes
from .judge import LETTERS


class DataError(ValueError):
    pass


class World:
    """The built-in shapes world as a dataset: item i of a split is generated on demand; unbounded."""

    def __init__(self, split="train", size=None):
        self.split, self.size = split, size

    def __len__(self):
        return self.size if self.size is not None else 10**9

    def __getitem__(self, i):
        return shapes.world_item(i, self.split)


def _question(q, where):
    if not isinstance(q, dict) or "question" not in q:
        raise DataError(f"{where}: each question needs a 'question' field")
    if "choices" in q and "options" not in q:  # CapRL-QA: "A) text"
        q = {**q, "options": [c.split(")", 1)[1].strip() if c[1:2] == ")" else c for c in q["choices"]]}
    opts, ans = q.get("options"), q.get("answer")
    if not isinstance(opts, list) or len(opts) < 2:
        raise DataError(f"{where}: a question needs at least two options, got {opts!r}")
    if len(opts) > len(LETTERS) - 1:
        raise DataError(f"{where}: at most {len(LETTERS) - 1} options (one letter is kept for abstain)")
    if not (isinstance(ans, str) and ans.strip().upper()[:1] in LETTERS[:len(opts)] and len(ans.strip()) == 1):
        raise DataError(f"{where}: answer {ans!r} is not one of the option letters {LETTERS[:len(opts)]}")
    return {"question": q["question"], "options": [str(o) for o in opts], "answer": ans.strip().upper(),
            "type": q.get("type", "qa")}


def load_image(ref, root):
    """A path (relative to root), raw bytes, or base64 text -> RGB PIL image."""
    if isinstance(ref, dict):  # {"bytes": ...} or {"path": ...} as datasets exports them
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, str) and not os.path.isabs(ref) and os.path.exists(os.path.join(root, ref)):
        ref = os.path.join(root, ref)
    if isinstance(ref, str) and os.path.exists(ref):
        img = Image.open(ref)
    else:
        try:
            raw = ref if isinstance(ref, (bytes, bytearray)) else base64.b64decode(ref, validate=True)
        except (binascii.Error, ValueError):  # neither an existing file nor base64: a missing file
            raise FileNotFoundError(f"no such file {os.path.join(root, ref)!r}") from None
        img = Image.open(io.BytesIO(raw))
    img.load()
    return img.convert("RGB")


class QAFile:
    """A QA JSONL file, validated on load; images are read when an item is accessed."""

    def __init__(self, path, image_root=None):
        self.path, self.root = path, image_root or os.path.dirname(os.path.abspath(path))
        self.rows, seen = [], {}
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = self._parse(line, f"{path}:{n}")
                    if row["id"] in seen:
                        raise DataError(f"{path}:{n}: duplicate id {row['id']!r} (first on line {seen[row['id']]})")
                    seen[row["id"]] = n
                    self.rows.append(row)
        if not self.rows:
            raise DataError(f"{path}: no rows")

    def _parse(self, line, where):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: a line must be a JSON object")
        qs = row.get("questions")
        if qs is None and isinstance(row.get("reward_model"), dict):
            qs = row["reward_model"].get("ground_truth")
            if isinstance(qs, str):  # table exports often keep it as JSON text
                try:
                    qs = json.loads(qs)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: reward_model.ground_truth is text but not JSON ({e.msg})") from None
        image = row.get("image", row.get("images"))
        if isinstance(image, list):
            image = image[0] if image else None
        if image is None or not isinstance(qs, list) or not qs:
            raise DataError(f"{where}: needs 'image' (or 'images') and a non-empty 'questions' list "
                            "(or reward_model.ground_truth)")
        out = {"id": str(row.get("id", where)), "image": image, "where": where,
               "questions": [_question(q, where) for q in qs]}
        if "scene" in row:  # the built-in world written out by write_world_qa: facts stay checkable
            out["scene"] = row["scene"]
        return out

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        try:
            image = load_image(row["image"], self.root)
        except (OSError, ValueError) as e:
            raise DataError(f"{row['where']}: cannot read image {str(row['image'])[:80]!r}: {e}") from None
        return {"id": row["id"], "image": image, "questions": row["questions"],
                **({"scene": row["scene"]} if "scene" in row else {})}


def write_qa(path, rows, root):
    """QA JSONL from rows as QAFile holds them (CapRL-QA rows come out in the project's form). Relative image paths
    are rewritten relative to the new file's folder, so the file can live anywhere."""
    folder = os.path.dirname(os.path.abspath(path))
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            image = row["image"]
            if isinstance(image, str) and os.path.exists(os.path.join(root, image)):
                image = os.path.relpath(os.path.join(root, image), folder)
            out = {"id": row["id"], "image": image, "questions": row["questions"]}
            f.write(json.dumps({**out, **({"scene": row["scene"]} if "scene" in row else {})}) + "\n")
    os.replace(path + ".tmp", path)


def write_world_qa(path, n, split="eval", leaky=False):
    """The built-in world on disk: n PNG images next to a QA JSONL at `path` (with each scene, so that fact
    precision / recall still work). leaky=True adds shapes.LEAKY_TYPE questions (see reward.py filter)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(n):
        item = shapes.world_item(i, split, leaky)
        item["image"].save(os.path.join(folder, item["id"] + ".png"))
        rows.append({"id": item["id"], "image": item["id"] + ".png", "questions": item["questions"],
                     "scene": item["scene"]})
    write_qa(path, rows, folder)


# ---------------------------------------------------------------- images to caption, and caption JSONL
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_images(source, image_root=None):
    """What annotate.py captions: [(id, image reference, root)] from a folder (every file with an image extension,
    recursively, id = path inside the folder), a QA JSONL (its rows) or a list file (one path per line, relative
    to the list's folder). Sorted by id in folders; file order otherwise."""
    if os.path.isdir(source):
        found = [os.path.relpath(os.path.join(d, f), source) for d, _, fs in os.walk(source) for f in fs
                 if f.lower().endswith(IMAGE_EXTENSIONS)]
        return [(f, f, source) for f in sorted(found)]
    if source.endswith(".jsonl"):
        qa = QAFile(source, image_root)
        return [(r["id"], r["image"], qa.root) for r in qa.rows]
    root = image_root or os.path.dirname(os.path.abspath(source))
    with open(source, encoding="utf-8") as f:
        paths = [line.strip() for line in f if line.strip()]
    if not paths:
        raise DataError(f"{source}: no image paths")
    return [(p, p, root) for p in paths]


class CaptionFile:
    """An append-only caption JSONL that survives kills and shares: records are appended with one write each under
    an exclusive lock (several processes, e.g. torchrun ranks, can append to one file), and reopening it drops a
    line cut short by a kill, so a rerun knows exactly which ids are done."""

    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        with self._locked():
            raw = open(path, "rb").read()
            good = raw[:raw.rfind(b"\n") + 1]  # everything up to the last complete line
            if len(good) < len(raw):
                os.truncate(path, len(good))
        self.done = set()
        for n, line in enumerate(good.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                self.done.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{n}: not a record with an 'id' (fix or delete the line to resume)") from None

    @contextlib.contextmanager
    def _locked(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def append(self, record):
        with self._locked():
            os.write(self.fd, (json.dumps(record) + "\n").encode("utf-8"))
        self.done.add(record["id"])


def read_captions(path):
    """Caption JSONL -> {id: [(caption, tokens or None), ...]} in file order (several captions per id are kept),
    validated."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out.setdefault(str(rec["id"]), []).append((str(rec["caption"]), rec.get("tokens")))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{n}: expected a JSON object with 'id' and 'caption'") from None
    if not out:
        raise DataError(f"{path}: no captions")
    return out
