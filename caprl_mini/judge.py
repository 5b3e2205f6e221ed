"""The CapRL reward: a text-only judge answers multiple-choice questions from a caption alone.

For each caption: draw N questions with replacement from its image's MCQs; for every draw shuffle the options,
relabel them A, B, C, ..., append the abstain option ("can not answer based on the caption", scores 0);
ask the judge with a prompt that shows only the caption and the question, the assistant turn pre-filled with
"The answer is"; 1 if it picks the gold option. Reward = mean over the N draws.

Ways to pose an MCQ (lm-evaluation-harness has both letter and cloze):
  caprl   the paper's reward-server prompt: an instruction to answer strictly from the caption, two worked
          examples, the caption between <Caption Start> / <Caption End>, the question with lettered options
          ("- A) ..."), the judge names a letter. The default for real instruct judges (no judge.json);
  letter  the same letter scoring with the built-in world's short prompt ("caption: ...\nquestion: ...");
  cloze   the judge's log-likelihood of each option's text as the answer (no letter binding; the built-in
          tiny judge is trained this way, see README).
Three ways to read the judge (DESIGN section 5): sample (temperature 0.6 over the options, as the paper),
argmax, prob (probability mass on the gold option: expected accuracy, lowest variance).

Cost: the caption is the shared prefix of all its questions. Each distinct caption becomes one packed row: the
caption once, then every question (and, for cloze, every option) as a branch under a tree-shaped attention mask
(pack_tree), so the caption is computed once and no KV cache is copied per question or option.
Legend: C captions, Q questions (rows after expansion), O options, T tokens.
"""

import torch

from .logprobs import token_logprobs
from .shapes import ABSTAIN, oracle_choice

LETTERS = "ABCDEFGHIJ"
ANSWER_PREFIX = "The answer is"
_SPLIT = "\x00SPLIT\x00"  # marks where the caption ends in the rendered chat, so the prefix can be shared


# ---------------------------------------------------------------- prompts: one place for what the judge sees
# The paper's judge prompt (CapRL's reward server, image branch), up to where the caption goes. The server wrote the
# chat turns by hand; here they come from the judge's own chat template (Qwen2.5-Instruct adds its default system
# prompt, the server had none). Trailing double spaces of the server's lines are dropped; the words are the same.
CAPRL_PROMPT = """You will be given an image caption describing the visual content.
Your task is to answer the multiple-choice question **strictly based on the caption**, even if the answer may seem \
obvious from prior knowledge or question wording.

Ignore any external knowledge. Do not make assumptions beyond what the caption explicitly or implicitly states.

Example 1:
Caption: <Caption Start> A woman in a red coat is walking a black dog across a snowy park. <Caption End>
Question: What color is the dog?
- A) Brown
- B) White
- C) Black
- D) Gray
- E) Can not answer based on the caption

The answer is C.

Example 2:
Caption: <Caption Start> A child is waving a British flag during a parade. <Caption End>
Question: What color is the flag?
- A) Red
- B) Blue
- C) Red, white, and blue
- D) White
- E) Can not answer based on the caption

The answer is E.

Now, answer the question based on the following caption:

Caption: <Caption Start> """


def user_message(caption, question, options, fmt):
    """The judge's user turn. `options` already includes the abstain option (letter formats list them).
    _SPLIT marks the end of the part shared by every question of a caption."""
    if fmt == "caprl":
        lines = [f"- {LETTERS[i]}) {'Can not answer based on the caption' if o == ABSTAIN else o}"
                 for i, o in enumerate(options)]
        return CAPRL_PROMPT + caption + " <Caption End>\n" + _SPLIT + f"Question: {question}\n" + "\n".join(lines)
    text = f"caption: {caption}\n{_SPLIT}question: {question}"
    if fmt == "letter":
        text += "\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return text


def prompt_ids(tok, caption, question, options, fmt, prefix_ids=None):
    """Token ids of (prefix, suffix): prefix = chat start + caption, shared by every question of a caption;
    suffix = question (+ lettered options) + end of turn + assistant turn pre-filled with "The answer is".
    prefix_ids: the caption's prefix ids from an earlier call, so that a long caption is tokenized once."""
    msgs = [{"role": "user", "content": user_message(caption, question, options, fmt)}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + ANSWER_PREFIX
    prefix, suffix = text.split(_SPLIT)
    return prefix_ids or tok.encode(prefix, add_special_tokens=False), tok.encode(suffix, add_special_tokens=False)


def answer_ids(tok, option_text):
    """The continuation scored in cloze format (and trained on by sft.py): " red<|im_end|>"."""
    return tok.encode(" " + option_text, add_special_tokens=False) + [tok.convert_tokens_to_ids(tok.eos_token)]


def shuffle_options(question, rng):
    """Shuffle the options, relabel them A, B, ...; append the abstain option last.
    Returns (options, gold index in the new list)."""
    gold = question["options"][LETTERS.index(question["answer"])]
    opts = list(question["options"])
    rng.shuffle(opts)
    return opts + [ABSTAIN], opts.index(gold)


# ---------------------------------------------------------------- scoring with shared prefixes
def _letter_id(tok, letter):
    ids = tok.encode(" " + letter, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"letter format needs ' {letter}' to be one token; this tokenizer splits it into {ids}")
    return ids[0]


def pack_tree(prefix, branches):
    """One row holding a caption prefix and all its questions (and, for cloze, their options) as a tree.
    branches: [(suffix ids, [option ids, ...])]. Returns token ids, positions, segment ids and each segment's
    parent (0 = the prefix), and per branch the index of its last suffix token and of its options' tokens.
    A token attends to its own segment (causally) and to its ancestors' segments: exactly what it would see in
    the unshared prompt, so the scores equal separate forwards while the caption is computed once."""
    ids, pos, seg, parent = list(prefix), list(range(len(prefix))), [0] * len(prefix), [0]
    lasts, opt_idx = [], []
    for suffix, options in branches:
        q = len(parent)
        parent.append(0)
        ids += suffix
        pos += range(len(prefix), len(prefix) + len(suffix))
        seg += [q] * len(suffix)
        lasts.append(len(ids) - 1)
        depth, idx = len(prefix) + len(suffix), []
        for opt in options:  # the option's tokens but its last: each predicts the next one
            parent.append(q)
            idx.append(list(range(len(ids), len(ids) + len(opt) - 1)))
            ids += opt[:-1]
            pos += range(depth, depth + len(opt) - 1)
            seg += [len(parent) - 1] * (len(opt) - 1)
        opt_idx.append(idx)
    return ids, pos, seg, parent, lasts, opt_idx


def packed_forward(model, packs, pad_id):
    """Final hidden states (C, L, D) of packed rows (pack_tree outputs), under their tree attention masks.
    The rows' common first tokens (the chat template and, in the caprl format, the ~300-token instruction that every
    caption is shown after) are computed once for the batch, as a KV cache the rows attend to, not once per row:
    that is most of a caprl prompt's tokens before the caption. Their states come back as zeros (nothing is scored
    there)."""
    dev, dtype = model.device, model.dtype
    first = packs[0][0]
    K = next(k for k in range(len(first)) if any(p[2][k] != 0 or p[0][k] != first[k] for p in packs))
    # K: the length of the rows' common prefix, within their captions' prefix (segment 0: plain causal)
    past = None
    if K > 0:  # one row of K tokens, its cache repeated for the C rows (a copy of K x C keys: cheap)
        past = model.base_model(input_ids=torch.tensor([first[:K]], device=dev), use_cache=True).past_key_values
        past.batch_repeat_interleave(len(packs))
    L = max(len(p[0]) for p in packs) - K
    ids = torch.full((len(packs), L), pad_id, dtype=torch.long)
    pos = torch.zeros((len(packs), L), dtype=torch.long)
    allowed = torch.zeros((len(packs), L, K + L), dtype=torch.bool)  # columns: the K shared tokens, then the row
    allowed[:, :, :K] = True  # every token sees the shared part
    for b, (tids, tpos, tseg, parent, _, _) in enumerate(packs):
        n = len(tids) - K
        ids[b, :n], pos[b, :n] = torch.tensor(tids[K:]), torch.tensor(tpos[K:])
        anc = torch.eye(len(parent), dtype=torch.bool)  # anc[s, a]: segment a is s or an ancestor of s
        for sg, pa in enumerate(parent):
            if sg:
                anc[sg, pa] = True
                anc[sg] |= anc[pa]
        sg = torch.tensor(tseg[K:])
        allowed[b, :n, K:K + n] = anc[sg][:, sg] & torch.ones(n, n, dtype=torch.bool).tril()
        allowed[b, n:, K + n:] = torch.eye(L - n, dtype=torch.bool)  # padding attends to itself (no NaN)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    h = model.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                         past_key_values=past).last_hidden_state
    return torch.nn.functional.pad(h, (0, 0, K, 0))  # (C, K + L, D): indexed like the packs


@torch.no_grad()
def option_logits(model, tok, captions, questions, fmt, captions_per_forward=32, questions_per_row=16):
    """Judge scores of every option of every row (row i = captions[i] asked questions[i], whose "options" are
    already shuffled and end with the abstain option): a list of (O_i,) tensors, higher = preferred.
    letter, caprl: the logit of each option's letter after "The answer is"; cloze: the option text's log-likelihood.
    Each distinct caption is one packed row (see pack_tree): its prefix is computed once for all its questions,
    with no KV-cache copies (expanding a cache to every question x option row costs more than the forward).
    A caption asked more than `questions_per_row` questions gets several rows (the row's attention mask is
    quadratic in its length: thousands of questions of one caption, as the leak filter asks, must not share one)."""
    if not captions:
        return []
    if fmt == "cloze":  # option order does not matter to cloze: score each (caption, question) once
        keys = [(c, q["question"], tuple(sorted(q["options"]))) for c, q in zip(captions, questions)]
        uniq = list(dict.fromkeys(keys))
        if len(uniq) < len(keys):
            z = option_logits(model, tok, [k[0] for k in uniq], [{"question": k[1], "options": list(k[2])}
                                                                   for k in uniq], fmt, captions_per_forward,
                              questions_per_row)
            table = {k: dict(zip(k[2], zk)) for k, zk in zip(uniq, z)}
            return [torch.stack([table[k][o] for o in q["options"]]) for k, q in zip(keys, questions)]
    dev = model.device
    W = model.get_output_embeddings().weight
    rows_of = {}
    for i, c in enumerate(captions):
        rows_of.setdefault(c, []).append(i)
    out = [None] * len(captions)
    groups = [(c, rows[k:k + questions_per_row]) for c, rows in rows_of.items()
              for k in range(0, len(rows), questions_per_row)]
    answers = {o: answer_ids(tok, o) for o in {o for q in questions for o in q["options"]}} if fmt == "cloze" else {}
    letter_ids = torch.tensor([_letter_id(tok, L) for L in LETTERS[:max(len(q["options"]) for q in questions)]]
                              if fmt != "cloze" else [], dtype=torch.long, device=dev)
    window = 8 * captions_per_forward  # groups tokenized and sorted at a time: bounded memory for big jobs
    for w0 in range(0, len(groups), window):
        packs = []
        for cap, rows in groups[w0:w0 + window]:
            branches, pre = [], None
            for i in rows:
                pre, suf = prompt_ids(tok, cap, questions[i]["question"], questions[i]["options"], fmt, pre)
                branches.append((suf, [answers[o] for o in questions[i]["options"]] if fmt == "cloze" else []))
            packs.append((rows, pack_tree(pre, branches)))
        packs.sort(key=lambda p: len(p[1][0]))  # similar lengths share a forward: less padding (a third less here)
        for g0 in range(0, len(packs), captions_per_forward):
            chunk = packs[g0:g0 + captions_per_forward]
            h = packed_forward(model, [p for _, p in chunk], tok.pad_token_id or 0)  # (C, L, D)
            sel_b, sel_t, targets, owner = [], [], [], []  # cloze: every option token of the chunk, scored at once
            for b, (rows, (_, _, _, _, lasts, opt_idx)) in enumerate(chunk):
                for i, last, idx in zip(rows, lasts, opt_idx):
                    if fmt != "cloze":  # letter, caprl: the logit of each option's letter
                        out[i] = h[b, last].float() @ W[letter_ids[:len(questions[i]["options"])]].float().T
                        continue
                    out[i] = torch.zeros(len(idx))
                    for k, (o, ix) in enumerate(zip(questions[i]["options"], idx)):
                        sel_t += [last] + ix  # the state at `last` predicts the option's first token
                        sel_b += [b] * (len(ix) + 1)
                        targets += answers[o]
                        owner += [(i, k)] * len(answers[o])
            if targets:
                lp = token_logprobs(h[sel_b, sel_t], W, torch.tensor(targets, device=dev)).float().cpu()
                for (i, k), v in zip(owner, lp.tolist()):
                    out[i][k] += v
    return out


def score_questions(model, tok, captions, questions, fmt, mode, rng, temperature=0.6, return_choice=False):
    """Ask the judge each (caption, question) row with shuffled options + abstain. Returns per row the score
    (argmax / sample: 1.0 if the gold option is chosen else 0.0; prob: the probability of the gold option),
    or with return_choice the option text chosen (argmax / sample). rng: a random.Random, or one per row (then a
    row's option shuffle and sampled answer depend on its own generator only)."""
    rngs = rng if isinstance(rng, list) else [rng] * len(questions)
    shuffled = [shuffle_options(q, r) for q, r in zip(questions, rngs)]
    posed = [{**q, "options": o} for q, (o, _) in zip(questions, shuffled)]
    logits = option_logits(model, tok, captions, posed, fmt) if model != "oracle" else _oracle_logits(captions, posed)
    out = []
    for (opts, gold), z, r in zip(shuffled, logits, rngs):
        if mode == "prob":
            out.append(torch.softmax(z, 0)[gold].item())
            continue
        if mode == "argmax":
            k = int(z.argmax())
        elif mode == "sample":
            p = torch.softmax(z / temperature, 0).tolist()
            k = r.choices(range(len(p)), weights=p)[0]
        else:
            raise ValueError(f"unknown judge reading mode {mode!r} (argmax, sample, prob)")
        out.append(opts[k] if return_choice else float(k == gold))  # abstain is never gold: it scores 0
    return out


def _oracle_logits(captions, posed):
    """The exact reader as a judge: all mass on the option the caption states (or abstain)."""
    return [torch.tensor([0.0 if o == oracle_choice(c, q) else -1e4 for o in q["options"]])
            for c, q in zip(captions, posed)]


def caption_rewards(judge, tok, captions, items, n_draws, fmt, mode, rng, types=None, tokens=None,
                    length_bounds=None):
    """The CapRL reward of each caption: mean judge score over `n_draws` questions drawn with replacement from
    its image's MCQs (restricted to `types` when given: held-out types never enter the reward).
    Optional CapRL++ length term (length_bounds=(L1, L2), caption token counts in `tokens`): the reward is
    multiplied by 1 up to L1 tokens, falling linearly to 0 at L2. rng: a random.Random, or one per caption (then
    a caption's reward does not depend on the other captions scored with it: torchrun ranks score their share)."""
    rngs = rng if isinstance(rng, list) else [rng] * len(captions)
    rows_c, rows_q, rows_rng = [], [], []
    for cap, item, r in zip(captions, items, rngs):
        pool = [q for q in item["questions"] if types is None or q.get("type") in types] or item["questions"]
        for _ in range(n_draws):
            rows_c.append(cap)
            rows_q.append(r.choice(pool))
            rows_rng.append(r)
    scores = torch.tensor(score_questions(judge, tok, rows_c, rows_q, fmt, mode, rows_rng)).view(len(captions), n_draws)
    reward = scores.mean(1)
    if length_bounds:
        l1, l2 = length_bounds
        n = torch.as_tensor(tokens, dtype=torch.float32)
        reward = reward * (1 - ((n - l1) / max(1, l2 - l1)).clamp(0, 1))
    return reward
