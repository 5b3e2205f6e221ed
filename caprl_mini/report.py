"""One self-contained HTML page for a Prism-style caption evaluation: the summary table, then every image with
each captioner's captions side by side, the clauses that state a false fact highlighted (built-in world only),
and under each caption the judge's answers, right or wrong.

Self-contained on purpose: images are inline base64 PNGs and the CSS is inline, so the file can be mailed or
attached to a run and still open offline years later. No JavaScript; every piece of text goes through
html.escape, since captions are model output and may hold anything.

    write_report("runs/eval/report.html", results, records)

results: the results.json records, one per captioner ("path" is its name). records, one per image:
    {"id", "image": PIL RGB, "scene": the world's scene or None,
     "captioners": [{"name", "captions": [{"caption", "answers": [
         {"question", "options" (the data's order, abstain appended; the judge saw them shuffled), "gold", "chosen",
          "right", "type"}]}]}]}
"""
import base64
import io
import os
import re
from html import escape

from . import shapes
from .evaluation import summary_rows

DISPLAY = 168  # px: the world's 84x84 images shown at 2x, pixel for pixel
CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 1400px;
       margin: 1.5em auto; padding: 0 1em; }
h1 { font-size: 1.4em; } h2 { font-size: 1em; margin: 0 0 .4em; } h3 { font-size: .95em; margin: 0 0 .3em; }
table.summary { border-collapse: collapse; margin-bottom: 2em; }
table.summary th, table.summary td { border: 1px solid #bbb; padding: .25em .7em; }
table.summary td { text-align: right; font-variant-numeric: tabular-nums; }
table.summary th { text-align: left; background: #f3f3f3; overflow-wrap: anywhere; max-width: 18em;
                   white-space: pre-wrap; }  /* pre-wrap: per-type rows keep their indent */
.held { color: #8a5a00; font-size: .85em; }
.item { display: flex; flex-wrap: wrap; gap: 1em; border-top: 1px solid #ccc; padding: 1em 0; }
.item img { max-width: 320px; height: auto; border: 1px solid #ddd; }
img.px { image-rendering: pixelated; }
.cols { display: flex; gap: 1em; flex: 1 1 30em; min-width: 0; }
.col { flex: 1 1 0; min-width: 0; overflow-wrap: anywhere; }
.cap { margin: 0 0 .2em; padding: .3em .5em; background: #fafafa; border-left: 3px solid #ccc; }
mark.wrong { background: #ffd6d6; text-decoration: underline dotted #c00; }
ul.qs { list-style: none; margin: 0 0 .8em; padding: 0; font-size: .85em; }
.ok { color: #1a7f37; } .bad { color: #c62828; } .type { color: #777; }
"""


def _png_uri(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _errors(clause, scene):
    """What a clause states that is false (shapes.score_facts' "wrong" facts), in words."""
    out = []
    for pos, attr, stated, real in shapes.score_facts(clause, scene)["wrong"]:
        if attr == "count":
            out.append(f"count: {stated} stated, {real} in the image")
        elif attr == "position":  # nothing there (or no cell named): every fact of the clause is false
            out.append(f"nothing at the {pos}" if pos else "names no cell")
        elif real is not None:  # (an attribute at an empty cell: "nothing at" above says it)
            out.append(f"{attr} at the {pos}: {stated} stated, {real} in the image")
    return out


def _caption_html(caption, scene):
    """The caption, escaped; on the built-in world each clause (split at . ; ,) stating a false fact in a <mark>.
    Finer than parse_caption's sentences, so that "a red circle at the top left, a blue star at the center" marks
    only the wrong half."""
    if scene is None:
        return escape(caption)
    out = []
    for piece in re.split(r"([.;,])", caption):  # (clause, delimiter, clause, ...): delimiters kept
        errs = _errors(piece, scene) if piece.strip() else []
        if errs:
            lead = piece[:len(piece) - len(piece.lstrip())]  # keep the space outside the highlight
            out.append(f'{escape(lead)}<mark class="wrong" title="{escape("; ".join(errs))}">'
                       f"{escape(piece.strip())}</mark>{escape(piece[len(piece.rstrip()):])}")
        else:
            out.append(escape(piece))
    return "".join(out)


def _answers_html(answers):
    lines = [f'<li class="type">{sum(a["right"] for a in answers)}/{len(answers)} right</li>']
    for a in answers:
        held = " (held out)" if a["type"] in shapes.HELDOUT_TYPES else ""
        head = f'<span class="type">[{escape(a["type"])}{held}]</span> {escape(a["question"])}'
        if a["right"]:
            lines.append(f'<li><span class="ok">✓</span> {head} <b>{escape(a["chosen"])}</b></li>')
        else:
            lines.append(f'<li><span class="bad">✗</span> {head} judge: <b class="bad">{escape(a["chosen"])}</b>,'
                         f' gold: <b>{escape(a["gold"])}</b></li>')
    return '<ul class="qs">' + "".join(lines) + "</ul>"


def _number(v, digits):
    """A value to `digits` decimals (as the console's table), missing as a dash."""
    return "–" if v is None else f"{v:.{digits}f}"


def _summary_html(results):
    """Rows = metrics (evaluation.summary_rows), columns = captioners."""
    head = "<tr><th></th>" + "".join(f"<th>{escape(str(r['path']))}</th>" for r in results) + "</tr>"
    body = []
    for label, held, vals, digits in summary_rows(results):
        mark = ' <span class="held">held out</span>' if held else ""
        cells = "".join(f"<td>{_number(v, digits)}</td>" for v in vals)
        body.append(f"<tr><th>{escape(label)}{mark}</th>{cells}</tr>")
    return f'<table class="summary">{head}{"".join(body)}</table>'


def _item_html(rec):
    img = rec["image"]
    scale = max(1, DISPLAY // img.width)  # integer upscaling only, so pixels stay square
    cls = ' class="px"' if scale > 1 else ""
    cols = []
    for c in rec["captioners"]:
        caps = "".join(f'<p class="cap">{_caption_html(k["caption"], rec["scene"])}</p>{_answers_html(k["answers"])}'
                       for k in c["captions"])
        cols.append(f'<div class="col"><h3>{escape(c["name"])}</h3>{caps}</div>')
    return (f'<section class="item"><div><h2>{escape(str(rec["id"]))}</h2>'
            f'<img{cls} src="{_png_uri(img)}" width="{img.width * scale}" height="{img.height * scale}"'
            f' alt="{escape(str(rec["id"]))}"></div><div class="cols">{"".join(cols)}</div></section>')


def write_report(path, results, records):
    """Write the page to path (UTF-8). results: one dict per captioner; records: one dict per image (see top)."""
    title = f"Caption evaluation: {len(records)} images, {len(results)} captioners"
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1>{_summary_html(results)}\n"
            + "\n".join(_item_html(r) for r in records) + "\n</body></html>\n")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # --report sub/report.html
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
