"""QA data on disk and the built-in world behind one interface: `dataset[i]` -> an item
{"id", "image" (PIL RGB), "questions": [{"question", "options", "answer" (letter), "type"}], "scene" (built-in)}.

QA JSONL, one image per line:   {"id", "image": "path", "questions": [{"question", "options": [...], "answer": "C"}]}
CapRL-QA rows (the released CapRL-QA-75K exported to JSONL) are accepted too:
    {"id"?, "image" | "images", "reward_model": {"ground_truth": [{"question", "choices": ["A) ...", ...], "answer": "C"}]}}
Images: a path (relative paths resolve against --image-root, else the JSONL's folder), or bytes / base64.

Captions on disk (annotate.py writes them; evaluate.py, sft.py and reward.py score read them with --captions): JSONL of
{"id", "image", "caption", ...}, appended and flushed one record at a time (CaptionFile).

Bad input. Text files are read as UTF-8, one JSON object per line, every line validated on load; images are read
(and checked) when an item is accessed. Anything bad raises DataError "<file>:<line>: <what is wrong, what to fix>"
(images: "...: cannot read image '<path>': <why>"). Scripts run their reading under `with user_errors():`, which
turns it into one line `error: ...` and exit status 2. With --skip-bad, scripts pass a list as `skipped`: a bad line
is then left out and recorded there as (where, reason); for a bad image, the caller wraps the access,
`with skip_bad(skipped): item = data[i]`, and print_skipped(skipped) lists and counts them all at the end.
"""
import argparse
import base64
import binascii
import contextlib
import fcntl
import io
import json
import os
import sys
import warnings

from PIL import Image

from . import shapes
from .judge import LETTERS

# A guard against decompression bombs (a small file that decodes to billions of pixels): PIL's limit, 89.5M pixels,
# unless the environment variable CAPRL_MAX_IMAGE_PIXELS sets another.
Image.MAX_IMAGE_PIXELS = int(os.environ.get("CAPRL_MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS))


class DataError(ValueError):
    """Bad input; the message names the file and line (or the image) and says what to fix."""


class MissingImage(DataError):
    """An image path that names no file (often a wrong --image-root, not a bad image)."""


@contextlib.contextmanager
def skip_bad(skipped):
    """Run the block. A DataError in it stops the run, or, with a list for `skipped` (--skip-bad), is recorded there
    as (where, reason) and the rest of the block is skipped."""
    try:
        yield
    except DataError as e:
        if skipped is None:
            raise
        where, _, reason = str(e).partition(": ")
        skipped.append((where, reason))


def print_skipped(skipped):
    """The --skip-bad summary: how many bad lines and images were left out, and each one."""
    if skipped:
        print(f"skipped {len(skipped)} bad rows / images (--skip-bad):")
        print("\n".join(f"  {where}: {reason}" for where, reason in skipped))


@contextlib.contextmanager
def user_errors():
    """For scripts: bad input (a DataError, or an input path that is missing, a folder or unreadable) ends the run
    with one line `error: <message>` on stderr and exit status 2 instead of a traceback."""
    try:
        yield
    except (DataError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"error: {f'{e.filename}: {e.strerror}' if getattr(e, 'filename', None) else e}", file=sys.stderr)
        raise SystemExit(2)


def at_least(low, kind=int):
    """An argparse type: a `kind` number not below `low`, so a flag out of range stops the script with one line
    ("argument --steps: must be at least 0, got -3") before any work, not with a traceback deep in it, or silently."""
    def parse(text):
        if kind(text) < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return kind(text)
    parse.__name__ = kind.__name__  # not a number: argparse's own "invalid int value: 'x'"
    return parse


def _read_lines(path, f, parse, skipped, what=None, key=None):
    """[parse(line, "path:n") for each non-blank line of the binary file f], checking that the lines are UTF-8, that
    key(item) is unique (when given) and, when `what` names them, that there is at least one. A bad line raises
    DataError, or with a `skipped` list is recorded there and left out."""
    out, first, n_skipped = [], {}, len(skipped or [])  # first: key -> the line it first appeared on
    for n, raw in enumerate(f, 1):
        where = f"{path}:{n}"
        with skip_bad(skipped):
            try:
                line = raw.decode("utf-8-sig")  # -sig: a byte-order mark (Windows editors) is dropped
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 (byte {e.start + 1} of the line is 0x{raw[e.start]:02x}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            item = parse(line, where)
            if key:
                if key(item) in first:
                    raise DataError(f"{where}: duplicate id {key(item)!r} (first on line {first[key(item)]}); "
                                    "ids must be unique")
                first[key(item)] = n
            out.append(item)
    if what and not out:
        bad = f" left: every line was bad, e.g. {': '.join(skipped[-1])}" if len(skipped or []) > n_skipped else ""
        raise DataError(f"{path}: no {what}{bad}")
    return out


def _json_object(line, where):
    try:
        obj = json.loads(line.rstrip())  # without the newline, so that a cut line's column is on this line
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a line must be a JSON object")
    try:  # JSON may escape half of a surrogate pair (an emoji cut by a UTF-16 tool): text no tokenizer can take
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: a \\u escape of a lone surrogate ({e.object[e.start]!r}), half of a character; "
                        "fix the text") from None
    return obj


class World:
    """The built-in shapes world as a dataset: item i of a split is generated on demand; unbounded."""

    def __init__(self, split="train"):
        self.split = split

    def __len__(self):
        return 10**9

    def __getitem__(self, i):
        return shapes.world_item(i, self.split)


def _question(q, where):
    if not isinstance(q, dict) or not isinstance(q.get("question"), str):
        raise DataError(f"{where}: each question needs a 'question' field (text)")
    if isinstance(q.get("choices"), list) and "options" not in q:  # CapRL-QA: "A) text"
        choices = map(str, q["choices"])  # "X) " stripped only with the choice's own letter ("5) kg" is text)
        q = {**q, "options": [c[2:].strip() if c[:2] == f"{L})" else c for L, c in zip(LETTERS, choices)]}
    opts, ans = q.get("options"), q.get("answer")
    if not isinstance(opts, list) or len(opts) < 2:
        raise DataError(f"{where}: a question needs at least two options, got {opts!r}")
    if len(opts) > len(LETTERS) - 1:
        raise DataError(f"{where}: at most {len(LETTERS) - 1} options (one letter is kept for abstain)")
    opts = [str(o) for o in opts]
    if len(set(opts)) < len(opts):  # the judge could pick the gold text under the wrong letter
        raise DataError(f"{where}: options repeat ({opts!r}); each option must be different")
    letter = ans.strip().upper() if isinstance(ans, str) else None  # upper() can lengthen: "ﬀ" -> "FF"
    if letter is None or len(letter) != 1 or letter not in LETTERS[:len(opts)]:
        raise DataError(f"{where}: answer {ans!r} is not one of the option letters {LETTERS[:len(opts)]}")
    if not isinstance(q.get("type", "qa"), str):  # evaluation groups and sorts the results by it
        raise DataError(f"{where}: a question's 'type' must be text, got {q['type']!r}")
    return {"question": q["question"], "options": opts, "answer": letter, "type": q.get("type", "qa")}


def to_rgb(img):
    """Any PIL mode -> RGB as it looks. 16-bit samples (modes I;16*, and I, which 16-bit PNG / TIFF give) are scaled
    to 8 bits (a plain convert clips everything above 255 to white); transparent pixels are put on white (a plain
    convert shows the colour hidden under them, often black)."""
    if img.mode.startswith("I"):
        img = img.convert("I").point(lambda v: v / 257).convert("L")  # 0..65535 -> 0..255
    if img.has_transparency_data:  # RGBA, LA, PA, or a palette / grayscale image with a transparent colour
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def load_image(ref, root, where=None):
    """A path (relative to root), raw bytes, or base64 text -> RGB PIL image (to_rgb). One that cannot be read raises
    DataError "<where>: cannot read image '<ref>': <why>"; `where` is the file:line that names the image."""
    if isinstance(ref, dict):  # {"bytes": ...} or {"path": ...} as datasets exports them
        ref = ref.get("bytes") or ref.get("path")
    shown = repr(ref) if isinstance(ref, str) and len(ref) < 256 else "(inline data)"
    prefix = f"{where + ': ' if where else ''}cannot read image {shown}: "
    if isinstance(ref, str) and os.path.exists(os.path.join(root, ref)):  # an absolute ref ignores root
        ref = os.path.abspath(os.path.join(root, ref))
    if isinstance(ref, str) and os.path.isabs(ref) and os.path.isfile(ref):  # never a same-named file elsewhere
        with open(ref, "rb") as f:
            raw = f.read()
    else:
        try:
            raw = ref if isinstance(ref, (bytes, bytearray)) else base64.b64decode(ref, validate=True)
        except (binascii.Error, ValueError, TypeError):  # neither an existing file nor base64: a missing file
            raise MissingImage(prefix + f"no such file {os.path.join(root, str(ref))!r} (relative paths resolve "
                               "against --image-root, else the folder of the file that lists them)") from None
    if not raw:
        raise DataError(prefix + "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: an error
            img = Image.open(io.BytesIO(raw))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(prefix + f"more than {Image.MAX_IMAGE_PIXELS:,} pixels (a guard against decompression "
                        "bombs); if the image is genuine, raise the limit with the environment variable "
                        "CAPRL_MAX_IMAGE_PIXELS") from None
    except Image.UnidentifiedImageError:
        raise DataError(prefix + "not an image (no image format recognises its bytes)") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, EOFError, ... depending on the format
        raise DataError(prefix + f"truncated or corrupt ({type(e).__name__}: {e})") from None
    if max(img.size) > 200 * min(img.size):  # else the Qwen-VL processor raises mid-batch, whatever --skip-bad says
        raise DataError(prefix + f"{img.width}x{img.height} pixels, sides over 200:1 (Qwen-VL's processors refuse it)")
    return to_rgb(img)


class QAFile:
    """A QA JSONL file, validated on load; images read when an item is accessed (bad input: module docstring)."""

    def __init__(self, path, image_root=None, skipped=None):
        self.path, self.root = path, image_root or os.path.dirname(os.path.abspath(path))
        with open(path, "rb") as f:
            self.rows = _read_lines(path, f, self._parse, skipped, "rows", key=lambda row: row["id"])

    def _parse(self, line, where):
        row = _json_object(line, where)
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
        if isinstance(image, dict):  # {"bytes": ...} or {"path": ...} as datasets exports them
            image = image.get("bytes") or image.get("path")
        if not isinstance(image, str) or not isinstance(qs, list) or not qs:
            raise DataError(f"{where}: needs 'image' (or 'images') and a non-empty 'questions' list "
                            "(or reward_model.ground_truth)")
        # no id: "qa.jsonl:7", the same however the file's path is written (a resumed annotate.py matches it)
        out = {"id": str(row.get("id", os.path.basename(where))), "image": image, "where": where,
               "questions": [_question(q, where) for q in qs]}
        if "scene" in row:  # the built-in world written out by write_world_qa: facts stay checkable
            out["scene"] = row["scene"]
        return out

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return {"id": row["id"], "image": load_image(row["image"], self.root, row["where"]),
                "questions": row["questions"], **({"scene": row["scene"]} if "scene" in row else {})}


def rebase(ref, root, folder):
    """An image reference read relative to root, made relative to folder (where the file that lists it is
    written), so that it resolves from there; absolute paths and inline data unchanged."""
    if isinstance(ref, str) and not os.path.isabs(ref) and os.path.exists(os.path.join(root, ref)):
        return os.path.relpath(os.path.join(root, ref), folder)
    return ref


def write_whole(path, lines):
    """Write lines to path as a whole: into path.tmp (its folder created), then renamed into place, so a kill
    mid-write leaves the previous file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def write_qa(path, rows, root):
    """QA JSONL from rows as QAFile holds them (CapRL-QA rows come out in the project's form). Relative image paths
    are rewritten relative to the new file's folder, so the file can live anywhere."""
    folder = os.path.dirname(os.path.abspath(path))
    write_whole(path, (json.dumps({"id": row["id"], "image": rebase(row["image"], root, folder), "questions":
                                   row["questions"], **({"scene": row["scene"]} if "scene" in row else {})}) + "\n"
                       for row in rows))


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


def list_images(source, image_root=None, skipped=None):
    """What annotate.py captions: [(id, image reference, root)] from a folder (every file with an image extension,
    recursively, id = path inside the folder), a QA JSONL (its rows) or a list file (one path per line, relative
    to the list's folder). Sorted by id in folders; file order otherwise. Bad lines: see QAFile."""
    if os.path.isdir(source):
        found = [os.path.relpath(os.path.join(d, f), source) for d, _, fs in os.walk(source) for f in fs
                 if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise DataError(f"{source}: no image files in this folder ({' '.join(IMAGE_EXTENSIONS)})")
        return [(f, f, source) for f in sorted(found)]
    if source.lower().endswith(".jsonl"):
        qa = QAFile(source, image_root, skipped)
        return [(r["id"], r["image"], qa.root) for r in qa.rows]
    root = image_root or os.path.dirname(os.path.abspath(source))
    with open(source, "rb") as f:
        paths = _read_lines(source, f, lambda line, where: line.strip(), skipped, "image paths", key=lambda p: p)
    return [(p, p, root) for p in paths]


def _record(line, where, field):
    rec = _json_object(line, where)
    if "id" not in rec or not isinstance(rec.get(field), str):
        raise DataError(f"{where}: expected a JSON object with 'id' and '{field}' (text); fix or delete the line")
    return rec


class CaptionFile:
    """An append-only caption JSONL that survives kills and shares: records are appended with one write each under
    an exclusive lock (several processes, e.g. torchrun ranks, can append to one file), and reopening it drops a
    line cut short by a kill (a whole record missing only its newline is kept), so a rerun knows which ids are
    done. Every record holds an id and `field` (annotate.py's errors file holds "error" instead of "caption"); a
    bad line raises DataError."""

    def __init__(self, path, field="caption"):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        with self._locked():
            with open(path, "rb") as f:
                raw = f.read()
            good, tail = raw[:raw.rfind(b"\n") + 1], raw[raw.rfind(b"\n") + 1:]  # tail: after the last newline
            try:  # whole JSON without its newline (a file edited by hand): kept, and checked as every line is
                json.loads(tail.decode("utf-8"))
                good += tail + b"\n"
                os.write(self.fd, b"\n")
            except ValueError:  # empty, or a line cut short by a kill (not JSON, or not UTF-8): dropped
                os.truncate(path, len(good))
        records = _read_lines(path, io.BytesIO(good), lambda line, where: _record(line, where, field), None)
        self.done = {str(rec["id"]) for rec in records}
        self.first = records[0] if records else None  # what a rerun checks its settings against

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
        self.done.add(str(record["id"]))  # as a reopened file reads it


def caption_records(path, skipped=None):
    """Caption JSONL -> its records in file order, each with an 'id' (made text) and a non-empty 'caption', plus
    "where" (file:line). A bad line raises DataError, or with a `skipped` list is recorded there and left out."""
    def parse(line, where):
        rec = _record(line, where, "caption")
        if not rec["caption"].strip():
            raise DataError(f"{where}: empty caption; delete the line (or skip it with --skip-bad)")
        if rec.get("tokens") is not None and not isinstance(rec["tokens"], int):
            raise DataError(f"{where}: 'tokens' must be a whole number (the caption's token count) or absent")
        return {**rec, "id": str(rec["id"]), "where": where}
    with open(path, "rb") as f:
        return _read_lines(path, f, parse, skipped, "captions")


def read_captions(path, skipped=None):
    """Caption JSONL -> {id: [(caption, tokens or None), ...]} in file order (several captions per id are kept),
    validated as caption_records."""
    out = {}
    for rec in caption_records(path, skipped):
        out.setdefault(rec["id"], []).append((rec["caption"], rec.get("tokens")))
    return out
