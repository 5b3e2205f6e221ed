"""Warm start: supervised training of the built-in world's captioner and judge, and their evaluation.

    python sft.py captioner --out assets/captioner     # SFT captioner; stage 1 also saved to runs/sft_perception
    python sft.py judge --out runs/judge_stage1 --batch-size 64 --lr 1e-3 --judge-stop-at 3000   # judge, from
    python sft.py judge --judge-init runs/judge_stage1 --out assets/judge --restate --many-objects \
        --full-frac 0.5 --batch-size 64 --lr 5e-4 --judge-steps 6000       # runs/sft_perception's LM, in two runs
    python sft.py eval --out runs/warmstart            # held-out numbers of the shipped pair -> warmstart.json
    python sft.py captioner --captions caps.jsonl --data qa.jsonl --out runs/student   # a fresh captioner trained
                                                       # on caption JSONL (annotate.py's): "pretrain on CapRL data"

Captioner. Trained from scratch, a tiny VLM did not learn color from the caption loss alone in this project's first
experiments (2026-11-26), although its image tokens carry it. So it is trained in two stages, both with an auxiliary
loss:
  1. perception: full captions (every fact) + a linear head on each image token predicting its grid cell's
     content (occupied, shape, color, size). Think of it as the pretrained vision encoder a real VLM starts from.
  2. style: short "human" captions (the first objects in reading order, some attributes dropped), aux loss kept.
The result sees well and says little: high fact precision, low recall. That gap is what GRPO must close.
Each stage has its own optimizer, schedule and data stream, so `--init runs/sft_perception --full-steps 0`
redoes stage 2 alone, exactly.

Judge. A tiny Qwen2 LM trained on (caption, question) -> answer text, with labels from the oracle reader: the
fact the caption states, or "can not answer based on the caption" when it does not. Cloze format (judge.py): at
scoring time each option's text is scored by log-likelihood, so the judge never has to bind an answer to a
letter, a step tiny judges fail at. Its weights start from the stage-1 captioner's language model (same shapes; it
already reads and writes the world's language), like a real judge starts pretrained. Captions come from a wide mix
(full, partial, wrong, empty) so that it reads what a caption says, not the truth. The hard part is binding:
finding the clause of the asked cell among several; two training-only aids (the commands above, README) help:
--restate adds "what is at the <cell>?" -> every attribute the caption gives that cell, and --many-objects draws
scenes in proportion to their object count (a one-object scene needs no binding).

Caption JSONL (--captions): instead of the two stages, one stage on the given (image, caption) pairs, drawn at
random with replacement. Images come from --data (a QA JSONL, by id) or from each record's "image" path (relative
to --image-root, else the caption file's folder). The per-cell auxiliary loss needs the built-in world's scenes
(a QA JSONL written by `reward.py world` has them); without scenes it is off. A bad line or image in these files
stops the run with `error: <file>:<line>: ...` (exit status 2); with --skip-bad it is left out, listed and counted.

Resume: --out is a model folder, so the run's flags and checkpoints live in OUT/run (config.json, checkpoints/
step_NNNNNN: checkpoint.py's layout, atomic), one every --save-every steps and at the end of each stage. A killed
run goes on from the newest with --resume and ends with the weights of an uninterrupted run, bit for bit at the
same --threads (a checkpoint holds the optimizer, the data stream's generator and the captioner's aux head); flags
that change the training are refused, as in train_grpo.py. A judge run that stopped at --judge-stop-at goes on to
the end of its schedule with --resume and another --judge-stop-at. To train afresh into an --out, delete OUT/run.

Simplifications: fresh scenes every step (no epochs), one process.
"""
import argparse
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from caprl_mini import shapes
from caprl_mini.checkpoint import load_trainer_state, resume_checkpoint, save_checkpoint, write_config
from caprl_mini.data import (DataError, QAFile, at_least, caption_records, load_image, print_skipped, skip_bad,
                             user_errors)
from caprl_mini.evaluation import caption_items, fact_totals
from caprl_mini.judge import answer_ids, prompt_ids, score_questions
from caprl_mini.logprobs import token_logprobs
from caprl_mini.models import (JUDGE, SFT_CAPTIONER, build_tiny_judge, build_tiny_policy, build_tokenizer,
                               encode_prompts, load_judge, load_policy, pad_right, policy_hidden, rope_positions,
                               save_model, with_completions)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("stage", choices=["captioner", "judge", "eval"], help="what to train, or eval the pair")
parser.add_argument("--out", required=True, help="output folder (a save_pretrained folder, or eval results)")
# captioner
parser.add_argument("--full-steps", type=at_least(0), default=1800, help="captioner stage 1 steps (full captions)")
parser.add_argument("--human-steps", type=at_least(0), default=400, help="captioner stage 2 steps (human captions)")
parser.add_argument("--perception-out", default="runs/sft_perception", help="where stage 1's model is saved")
parser.add_argument("--init", default=None, help="start the captioner from this folder (e.g. a saved stage 1)")
parser.add_argument("--aux-weight", type=float, default=1.0, help="weight of the per-cell auxiliary loss")
parser.add_argument("--captions", default=None, help="captioner: train on this caption JSONL instead (see above)")
parser.add_argument("--data", default=None, help="--captions: QA JSONL holding the images (and scenes) by id")
parser.add_argument("--image-root", default=None, help="--captions without --data: folder image paths resolve to")
parser.add_argument("--caption-steps", type=at_least(0), default=1000, help="--captions: training steps")
parser.add_argument("--skip-bad", action="store_true",
                    help="--captions: skip bad rows/images, list and count them in the summary instead of stopping")
# judge
parser.add_argument("--judge-steps", type=at_least(0), default=4000,
                    help="judge training steps (length of its lr schedule; 0: the initial judge saved)")
parser.add_argument("--judge-stop-at", type=at_least(0), default=0,
                    help="stop the judge early at this step (schedule kept; 0: at the end)")
parser.add_argument("--judge-init", default="runs/sft_perception",
                    help="start the judge from this captioner's language model, or go on training this judge "
                         "folder ('' = from scratch)")
parser.add_argument("--restate", action="store_true",
                    help="judge also trained on 'what is at the <cell>?' -> every attribute the caption states there")
parser.add_argument("--many-objects", action="store_true",
                    help="judge scenes drawn in proportion to their object count (binding is hard only with several)")
parser.add_argument("--full-frac", type=float, default=0.25, help="fraction of judge examples with a full caption")
parser.add_argument("--judge-heads", type=int, default=8, choices=[1, 2, 4, 8, 16, 32, 64],
                    help="attention heads of a judge trained from scratch (its width, 128, in heads of an even size)")
# shared
parser.add_argument("--batch-size", type=at_least(1), default=32, help="examples per step")
parser.add_argument("--lr", type=at_least(0.0, float), default=2e-3,
                    help="peak AdamW learning rate; 100 warm-up steps, then cosine down to 0.1x")
parser.add_argument("--eval-every", type=at_least(1), default=250,
                    help="steps between held-out evaluations (judge: also between saves of --out)")
parser.add_argument("--eval-images", type=at_least(0), default=300,
                    help="held-out images for evaluation (0: none during training)")
parser.add_argument("--captioner", default=SFT_CAPTIONER, help="eval: the captioner to evaluate")
parser.add_argument("--judge", default=JUDGE, help="eval: the judge to evaluate")
parser.add_argument("--save-every", type=at_least(0), default=250,
                    help="steps between checkpoints in OUT/run (0: only at the end of each stage)")
parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/run, exactly")
parser.add_argument("--seed", type=int, default=0, help="seed for model init and data order")
parser.add_argument("--threads", type=at_least(0), default=0, help="torch threads (0 = torch's default)")
args = parser.parse_args()
if args.stage == "eval" and args.eval_images < 1:
    parser.error("eval needs --eval-images of at least 1")

if args.threads:
    torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)
rng = random.Random(args.seed)
RUN = os.path.join(args.out, "run")  # the run's config.json and checkpoints/ (--out is the model folder)


def lr_at(step, total, peak):
    warm = 100
    if step < warm:
        return peak * (step + 1) / warm
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm))))


def start_run():
    """The newest checkpoint of this run (OUT/run) and its state, or (None, None); then OUT/run/config.json.
    Refuses a fresh run over checkpoints and a resume with other training flags. May change: --threads (the
    rounding of the sums, so not the weights' last bits), evaluation, saving, and the paths of models (not read on
    resume) and images; not --captions or --data, which decide the data."""
    try:
        ckpt = resume_checkpoint(RUN, args.resume, vars(args), default=parser.get_default, may_change=(
            "out", "resume", "threads", "eval_every", "eval_images", "save_every", "judge_stop_at", "init",
            "judge_init", "perception_out", "image_root", "skip_bad", "captioner", "judge"))
    except ValueError as e:
        parser.error(str(e))
    write_config(RUN, vars(args))
    if ckpt:
        print(f"resuming from {ckpt}", flush=True)
    return ckpt, load_trainer_state(ckpt) if ckpt else None


def maybe_checkpoint(step, last, model, proc, opt, rng, meta=None, **extra):
    """OUT/run/checkpoints/step_NNNNNN, every --save-every steps and at `last` (a stage's end)."""
    if (args.save_every and step % args.save_every == 0) or step == last:
        save_checkpoint(RUN, step, model, proc, opt, meta=meta, extra={"rng": rng.getstate(), **extra})


def restore(state, opt, rng):
    """A checkpoint's optimizer and data generator, in place. (torch's generator only draws initial weights: these
    models have no dropout.)"""
    opt.load_state_dict(state["optimizer"])
    rng.setstate(state["rng"])


def update(model, opt, loss, lr):
    """One optimiser step at this learning rate, the model's gradient norm clipped to 1."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


# ---------------------------------------------------------------- captioner
# B images per batch, P prompt tokens, L caption tokens (right-padded), D hidden
def cell_targets(scenes):
    """Per image token (one per grid cell, row-major): occupied, shape, color, size class ids; -100 if empty."""
    t = torch.full((len(scenes) * 9, 4), -100, dtype=torch.long)
    for i, scene in enumerate(scenes):
        t[i * 9:(i + 1) * 9, 0] = 0
        for o in scene:
            c = i * 9 + shapes.POSITIONS.index(o["pos"])
            t[c] = torch.tensor([1, shapes.SHAPES.index(o["shape"]), list(shapes.COLORS).index(o["color"]),
                                 shapes.SIZES.index(o["size"])])
    return t


def caption_eval(model, proc, n_images):
    """Greedy captions of held-out images -> per-attribute fact precision, recall (true facts stated / all true
    facts, pooled over images, as evaluate.py), caption length."""
    items = [shapes.world_item(i, "eval") for i in range(n_images)]
    model.eval()
    caps = [c[0] for c in caption_items(model, proc, items)]  # (caption, tokens) per image: greedy, 64 tokens
    model.train()
    f = fact_totals((cap, it["scene"]) for it, (cap, _) in zip(items, caps))
    precision = {a: c / n if n else None for a, (c, n) in f["stated"].items()}  # None: never stated
    return {"precision_by_attribute": precision, "recall": f["n_recalled"] / f["n_true"],
            "mean_caption_tokens": sum(n for _, n in caps) / len(caps)}


def world_batch(human):
    """A fresh batch of the built-in world: images, full or human captions, scenes."""
    def draw(rng):
        scenes = [shapes.make_scene(rng.randrange(10**9), "train") for _ in range(args.batch_size)]
        images = [shapes.render(sc, seed=rng.randrange(10**9)) for sc in scenes]
        caps = [shapes.human_caption(sc, rng) if human else shapes.full_caption(sc, rng) for sc in scenes]
        return images, caps, scenes
    return draw


def caption_file_batch():
    """Batches drawn with replacement from a caption JSONL (+ its images, and scenes when --data has them)."""
    skipped = [] if args.skip_bad else None  # --skip-bad: bad lines and images are listed here instead of stopping
    with user_errors():
        records = caption_records(args.captions, skipped)
        if args.data:
            qa = QAFile(args.data, args.image_root, skipped)
            index = {r["id"]: k for k, r in enumerate(qa.rows)}
        root = args.image_root or os.path.dirname(os.path.abspath(args.captions))
        pairs = []
        for rec in tqdm(records, desc="reading images", unit="img"):  # all read up front: a bad one stops us here
            with skip_bad(skipped):
                if args.data and rec["id"] not in index:
                    raise DataError(f"{rec['where']}: id {rec['id']!r} is not in {args.data}")
                if not args.data and "image" not in rec:
                    raise DataError(f"{rec['where']}: no 'image' (give each record one, or --data with the images)")
                item = qa[index[rec["id"]]] if args.data else {"image": load_image(rec["image"], root, rec["where"])}
                pairs.append((item, rec["caption"]))
        if not pairs:
            raise DataError(f"{args.captions}: no (image, caption) pair left to train on")
    print_skipped(skipped)
    print(f"{len(pairs)} (image, caption) pairs from {args.captions}")

    def draw(rng):
        batch = [rng.choice(pairs) for _ in range(args.batch_size)]
        scenes = [it.get("scene") for it, _ in batch]
        return [it["image"] for it, _ in batch], [c for _, c in batch], None if None in scenes else scenes
    return draw


def captioner_stage(model, proc, steps, human, seed, draw, offset=0, state=None):
    """One stage: fresh AdamW, warm-up + cosine over the stage, its own data stream (draw(rng) -> images, captions,
    scenes or None) and aux head, so a stage is a function of (initial weights, seed) alone and `--init` can
    restart from any saved stage. Its steps are offset + 1 ... offset + steps of the run (checkpoint names);
    `state`: a checkpoint of this stage to go on from."""
    tok = proc.tokenizer
    name = "human" if human else "full"
    rng = random.Random(f"{seed}:{name}")
    torch.manual_seed(seed + human)
    D = model.config.text_config.hidden_size
    aux = torch.nn.Linear(D, 2 + len(shapes.SHAPES) + len(shapes.COLORS) + len(shapes.SIZES))
    opt = torch.optim.AdamW(list(model.parameters()) + list(aux.parameters()), lr=args.lr, weight_decay=0.0)
    start = 0
    if state and state["stage"] == name:
        restore(state, opt, rng)
        aux.load_state_dict(state["aux"])
        start = state["step"] - offset
    W = model.get_output_embeddings().weight
    eos, pad = tok.convert_tokens_to_ids(tok.eos_token), tok.pad_token_id
    splits = [2, len(shapes.SHAPES), len(shapes.COLORS), len(shapes.SIZES)]
    model.train()
    t0 = time.time()
    for step in range(start, steps):
        images, caps, scenes = draw(rng)
        prompt = encode_prompts(proc, images)
        pos, nxt = rope_positions(model, prompt["input_ids"], prompt["attention_mask"], prompt["image_grid_thw"])
        comp, cmask = pad_right([tok.encode(c, add_special_tokens=False) + [eos] for c in caps], pad)
        ids, am, ps = with_completions(prompt, pos, nxt, comp, cmask)
        P = prompt["input_ids"].shape[1]
        h, feats = policy_hidden(model, ids, am, ps, prompt["pixel_values"], prompt["image_grid_thw"], prompt_len=P)
        hc = h[:, P - 1:P - 1 + comp.shape[1]].reshape(-1, D)  # (B*L, D): states that predict the caption
        m = cmask.reshape(-1).bool()
        lm_loss = -token_logprobs(hc[m], W, comp.reshape(-1)[m]).mean()
        aux_loss = torch.zeros(())
        if scenes is not None:  # per image token: occupied / shape / color / size
            logits, tgt = aux(feats).split(splits, -1), cell_targets(scenes)
            aux_loss = sum(F.cross_entropy(lg, tgt[:, k], ignore_index=-100) for k, lg in enumerate(logits))
        update(model, opt, lm_loss + args.aux_weight * aux_loss, lr_at(step, steps, args.lr))
        if step % 50 == 0:
            print(f"step {step} {'human' if human else 'full'} lm {lm_loss.item():.3f} aux {aux_loss.item():.3f} "
                  f"{time.time() - t0:.0f}s", flush=True)
        if args.eval_images and ((step + 1) % args.eval_every == 0 or step + 1 == steps):
            print(json.dumps(caption_eval(model, proc, args.eval_images)), flush=True)
        maybe_checkpoint(offset + step + 1, offset + steps, model, proc, opt, rng, stage=name, aux=aux.state_dict())


def train_captioner():
    draw = caption_file_batch() if args.captions else None  # the data is read and checked before the model is built
    ckpt, state = start_run()
    if ckpt or args.init:
        with user_errors():  # a mistyped --init: one line
            model, proc = load_policy(ckpt or args.init)
    else:
        model, proc = build_tiny_policy(build_tokenizer(shapes.world_text()), seed=args.seed)
    t0 = time.time()
    if args.captions:
        captioner_stage(model, proc, args.caption_steps, human=True, seed=args.seed, draw=draw, state=state)
    else:
        if args.full_steps and not (state and state["stage"] == "human"):  # else resumed in stage 2
            captioner_stage(model, proc, args.full_steps, human=False, seed=args.seed, draw=world_batch(False),
                            state=state)
            save_model(model, proc, args.perception_out)  # the stage-1 model: stage 2 can restart from it (--init)
        captioner_stage(model, proc, args.human_steps, human=True, seed=args.seed, draw=world_batch(True),
                        offset=args.full_steps, state=state)
    save_model(model, proc, args.out)
    print(f"saved {args.out} after {time.time() - t0:.0f}s")


# ---------------------------------------------------------------- judge
def mixed_caption(scene, rng):
    """Captions from the whole range the judge will meet: full, human, and anything between, some of it wrong
    (attributes swapped, cells moved), and sometimes empty (the leak filter asks with an empty caption)."""
    r, f = rng.random(), args.full_frac
    if r < f:
        return shapes.full_caption(scene, rng)
    if r < f + 0.25:
        return shapes.human_caption(scene, rng)
    if r < f + 0.28:
        return ""
    keep_obj, keep_attr, wrong = rng.uniform(0.3, 1), rng.uniform(0.3, 1), rng.choice([0, 0, 0.1, 0.3])
    objs = [dict(o) for o in scene if rng.random() < keep_obj] or [dict(rng.choice(scene))]
    for o in objs:
        for a, values in (("shape", shapes.SHAPES), ("color", list(shapes.COLORS)), ("size", shapes.SIZES),
                          ("pos", shapes.POSITIONS)):
            if rng.random() < wrong:
                o[a] = rng.choice(values)
    if rng.random() < 0.5:
        rng.shuffle(objs)
    parts = []
    if rng.random() < 0.5:
        n = len(scene) if rng.random() > wrong else rng.randint(1, shapes.MAX_OBJECTS)
        parts.append(shapes.count_sentence(n, rng.choice(shapes.COUNTS)))
    for o in objs:
        keep = [a for a in ("size", "color", "shape") if rng.random() < keep_attr]
        parts.append(rng.choice(shapes.CLAUSES).format(d=shapes.describe(o, keep), pos=o["pos"]))
    return ". ".join(parts) + "."


def train_judge():
    ckpt, state = start_run()
    if ckpt or args.judge_init and os.path.isfile(os.path.join(args.judge_init, "judge.json")):  # go on training
        with user_errors():
            model, tok, _ = load_judge(ckpt or args.judge_init)
        model.requires_grad_(True)  # load_judge loads for inference: frozen
    elif args.judge_init:  # start from a captioner's language model: a judge that already reads the world's language
        if not os.path.isdir(args.judge_init):
            parser.error(f"--judge-init {args.judge_init} not found: run `python sft.py captioner` first")
        with user_errors():
            cap, proc = load_policy(args.judge_init)
        tok = proc.tokenizer
        tc = cap.config.text_config
        model, _ = build_tiny_judge(tok, seed=args.seed, heads=tc.num_attention_heads, rms_norm_eps=tc.rms_norm_eps)
        prefix = "model.language_model."  # Qwen2.5-VL's text model has Qwen2's layout; text-only mrope == rope
        sd = {"model." + k[len(prefix):]: v for k, v in cap.state_dict().items() if k.startswith(prefix)}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head is tied
    else:
        tok = build_tokenizer(shapes.world_text())
        model, _ = build_tiny_judge(tok, seed=args.seed, heads=args.judge_heads)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    if state:
        restore(state, opt, rng)
    W = model.get_output_embeddings().weight
    D = model.config.hidden_size
    model.train()
    t0 = time.time()
    stop = min(args.judge_steps, args.judge_stop_at or args.judge_steps)
    for step in range(state["step"] if state else 0, stop):
        loss = judge_loss(model, tok, W, D)
        update(model, opt, loss, lr_at(step, args.judge_steps, args.lr))
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0:
            if args.eval_images:
                print(json.dumps(judge_eval(model.eval(), tok, {"format": "cloze"}, args.eval_images)), flush=True)
                model.train()
            save_model(model, tok, args.out, meta={"format": "cloze"})  # usable while training goes on
        maybe_checkpoint(step + 1, stop, model, tok, opt, rng, meta={"format": "cloze"})
    save_model(model, tok, args.out, meta={"format": "cloze"})
    print(f"saved {args.out} after {time.time() - t0:.0f}s")


def judge_example():
    """One training caption and its questions, each with the oracle's answer text as the target."""
    scene = shapes.make_scene(rng.randrange(10**9), "train")
    while args.many_objects and rng.random() > len(scene) / shapes.MAX_OBJECTS:
        scene = shapes.make_scene(rng.randrange(10**9), "train")
    cap = mixed_caption(scene, rng)
    qa = [(q["question"], shapes.oracle_answer(cap, q)) for q in shapes.make_questions(scene, rng)]
    if args.restate:  # training only: one answer binds every attribute the caption gives the cell
        qa += shapes.restate_questions(cap, scene)
    return cap, qa


def judge_loss(model, tok, W, D):
    """Batch of (caption, one random question) rows; loss on the answer tokens only."""
    seqs, starts = [], []
    for _ in range(args.batch_size):
        cap, qa = judge_example()
        q, a = rng.choice(qa)
        pre, suf = prompt_ids(tok, cap, q, None, "cloze")
        ans = answer_ids(tok, a)
        starts.append(len(pre) + len(suf))
        seqs.append(pre + suf + ans)
    ids, am = pad_right(seqs, tok.pad_token_id)
    tgt = torch.zeros_like(am)
    for i, s in enumerate(starts):
        tgt[i, s:len(seqs[i])] = 1
    h = model.model(input_ids=ids, attention_mask=am).last_hidden_state
    sel = tgt[:, 1:].reshape(-1).bool()  # hidden at column j predicts token j + 1
    return -token_logprobs(h[:, :-1].reshape(-1, D)[sel], W, ids[:, 1:].reshape(-1)[sel]).mean()


def judge_eval(model, tok, meta, n_images):
    """On held-out images: accuracy from the full true caption, and abstention when the caption (a human
    caption) does not state the answer; overall and per question type. Argmax reading."""
    rng = random.Random("judge-eval:eval")
    acc, abst = {}, {}
    for i in range(n_images):
        it = shapes.world_item(i, "eval")
        full, human = shapes.full_caption(it["scene"], rng), shapes.human_caption(it["scene"], rng)
        qs = it["questions"]
        right = score_questions(model, tok, [full] * len(qs), qs, meta["format"], "argmax", rng)
        missing = [q for q in qs if shapes.oracle_answer(human, q) == shapes.ABSTAIN]
        chose = score_questions(model, tok, [human] * len(missing), missing, meta["format"],
                                "argmax", rng, return_choice=True)
        for q, r in zip(qs, right):
            acc.setdefault(q["type"], []).append(float(r))
        for q, c in zip(missing, chose):
            abst.setdefault(q["type"], []).append(float(c == shapes.ABSTAIN))
    mean = lambda v: sum(v) / len(v) if v else None  # None: no such question (no caption lacked that answer)
    flat = lambda d: [x for v in d.values() for x in v]
    return {"full_caption_accuracy": mean(flat(acc)), "abstain_when_missing": mean(flat(abst)),
            "by_type": {t: {"full_caption_accuracy": mean(acc[t]), "abstain_when_missing": mean(abst.get(t, []))}
                        for t in acc}}


# ---------------------------------------------------------------- eval of the shipped pair
def evaluate_pair():
    os.makedirs(args.out, exist_ok=True)
    with user_errors():
        judge, jtok, meta = load_judge(args.judge)
        cap_model, proc = load_policy(args.captioner)
    res = {"judge": judge_eval(judge, jtok, meta, args.eval_images),
           "captioner": caption_eval(cap_model, proc, args.eval_images)}
    json.dump(res, open(os.path.join(args.out, "warmstart.json"), "w"), indent=1)
    j, c = res["judge"], res["captioner"]
    print(f"judge ({args.eval_images} held-out images)      full-caption acc   abstain when missing")
    num = lambda v, w: f"{v:{w}.3f}" if v is not None else f"{'-':>{w}s}"
    for t, v in [*j["by_type"].items(), ("all", j)]:
        print(f"  {t:28s}  {num(v['full_caption_accuracy'], 16)}   {num(v['abstain_when_missing'], 18)}")
    print("captioner fact precision: " + "  ".join(f"{a} {v:.3f}" if v is not None else f"{a} (never stated)"
                                                   for a, v in c["precision_by_attribute"].items()))
    print(f"captioner recall {c['recall']:.3f}, mean caption tokens {c['mean_caption_tokens']:.1f}")
    print(f"wrote {os.path.join(args.out, 'warmstart.json')}")


if __name__ == "__main__":
    {"captioner": train_captioner, "judge": train_judge, "eval": evaluate_pair}[args.stage]()
