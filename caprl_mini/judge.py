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
Three ways to read the judge: sample (temperature 0.6 over the options, as the paper), argmax, prob (probability
mass on the gold option: expected accuracy, lowest variance).

Cost: the caption is the shared prefix of all its questions. Each distinct caption's prefix (chat start + caption;
its common start with the other captions of a forward once) is computed once into a KV cache, then every question is a
short row over its caption's cached prefix (and, for cloze, every option a branch of that row under a tree mask):
a caption is computed once for all its questions, and no question attends to another's tokens.
Legend: C captions, n question rows of a forward (one per (caption, question) pair), O options, K tokens all the
prefixes share, P a prefix's tokens after them, T tokens of a question row, S key positions, D hidden.
"""

import copy

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .logprobs import token_logprobs
from .shapes import ABSTAIN, oracle_choice

LETTERS = "ABCDEFGHIJ"
ANSWER_PREFIX = "The answer is"
_SPLIT = "\x00SPLIT\x00"  # marks where the caption ends in the rendered chat, so the prefix can be shared


# ---------------------------------------------------------------- prompts: one place for what the judge sees
# The paper's judge prompt (CapRL's reward server, image branch), up to where the caption goes. The server wrote the
# chat turns by hand; here they come from the judge's own chat template (Qwen2.5-Instruct adds its default system
# prompt, the server had none). Trailing double spaces of the server's lines are dropped; the words are the same.
# Options are listed as in the worked examples, "- A) ...", abstain the next letter (the server indents them "   - "
# and letters abstain F whatever the count: A-D, then F).
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
    prefix, suffix = text.rsplit(_SPLIT, 1)  # the last marker: a caption is model output and may hold anything
    return prefix_ids or tok.encode(prefix, add_special_tokens=False), tok.encode(suffix, add_special_tokens=False)


def answer_ids(tok, option_text):
    """The continuation scored in cloze format (and trained on by sft.py): " red<|im_end|>"."""
    return tok.encode(" " + option_text, add_special_tokens=False) + [tok.convert_tokens_to_ids(tok.eos_token)]


def shuffle_options(question, rng):
    """Shuffle the options, relabel them A, B, ...; append the abstain option last.
    Returns (options, gold index in the new list)."""
    opts = list(question["options"])
    rng.shuffle(opts)
    return opts + [ABSTAIN], opts.index(gold_option(question))


def gold_option(question):
    """The text of a question's right option (its "answer" is a letter)."""
    return question["options"][LETTERS.index(question["answer"])]


# ---------------------------------------------------------------- scoring with shared prefixes
def finish_logits(config, z):
    """What a judge's own forward does to its raw logits z = h @ W.T after the LM head: Cohere's logit_scale,
    Gemma 2's soft-capping (identity for Qwen, Llama, ...; models.load_judge refuses a judge whose logits are still
    not its forward's)."""
    z = z * (getattr(config, "logit_scale", None) or 1.0)
    cap = getattr(config, "final_logit_softcapping", None)
    return cap * torch.tanh(z / cap) if cap else z


@torch.no_grad()
def logits_gap(model, tok):
    """None if judge.py's logits (h @ W.T, then finish_logits) are the judge's own forward's on a few tokens, else
    their largest difference (other transforms exist: Granite divides by logits_scaling, HyperCLOVA X multiplies by
    it). Tolerance 2% of the largest logit: above bf16 rounding, below any scale or cap that matters; NaN equals NaN
    (a judge with NaN weights loads: its rewards skip the updates)."""
    ids = torch.tensor([tok.encode(ANSWER_PREFIX + " A.", add_special_tokens=False)], device=model.device)
    theirs = model(input_ids=ids).logits.float()
    ours = finish_logits(model.config, model.base_model(input_ids=ids).last_hidden_state.float()
                         @ model.get_output_embeddings().weight.float().T)
    big = theirs.nan_to_num(0, 0, 0).abs().max().item()
    ok = torch.allclose(ours, theirs, rtol=0.02, atol=0.02 * big, equal_nan=True)
    return None if ok else (ours - theirs).abs().max().item()


def letter_id(tok, letter):
    ids = tok.encode(" " + letter, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"letter format needs ' {letter}' to be one token; this tokenizer splits it into {ids}")
    return ids[0]


class _ReadPrefix(DynamicLayer):
    """One layer of the captions' cached prefixes, read by question rows: row j attends to prefix row idx[j], then to
    its own tokens. update() writes both into `buf` (keys, values), buffers every layer reuses (each layer's
    attention is done before the next layer's update), and stores nothing: the question rows need no cache after
    their forward (gather-then-cat into fresh tensors page-faulted fresh memory every layer, many times slower)."""

    def __init__(self, layer, idx, buf):
        super().__init__()
        self.keys, self.values, self.idx, self.buf, self.is_initialized = layer.keys, layer.values, idx, buf, True

    def update(self, key_states, value_states, *args, **kwargs):
        n = self.keys.shape[-2]
        for src, new, out in zip((self.keys, self.values), (key_states, value_states), self.buf):
            torch.index_select(src, 0, self.idx, out=out[:, :, :n])
            out[:, :, n:] = new
        return self.buf


def _additive(allowed, dtype):
    """(n, T, S) bool -> the (n, 1, T, S) additive mask Hugging Face attention takes."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _masks(model, allowed, q_pos, k_pos):
    """The attention mask(s) for queries at positions q_pos (n, T) over keys at k_pos (n, S), allowed (n, T, S). A
    judge with sliding-window layers (Gemma 2 and 3, Mistral v0.1, Phi-3) also gets theirs, keys a window or more
    back hidden, as its own forward hides them: per layer type where only some layers slide. (The caches here are
    plain, every key kept: a sliding layer's own cache would drop the keys it no longer needs.)"""
    window, types = _window(model.config), getattr(model.config, "layer_types", None)
    full = _additive(allowed, model.dtype)
    if not window:
        return full
    near = _additive(allowed & (q_pos[:, :, None] - k_pos[:, None, :] < window), model.dtype)
    return {"full_attention": full, "sliding_attention": near} if types else near


def _window(config):
    """The sliding window of a judge's sliding-window layers; None without any."""
    types = getattr(config, "layer_types", None)
    return None if types is not None and "sliding_attention" not in types else getattr(config, "sliding_window", None)


def common_start(seqs, leave=0):
    """Length of the longest common start of token lists seqs, leaving at least `leave` tokens of each."""
    n = min(map(len, seqs)) - leave
    return next((k for k in range(n) if any(s[k] != seqs[0][k] for s in seqs)), max(n, 0))


@torch.no_grad()
def caption_cache(model, prefixes, pad_id):
    """The captions' prefixes (chat start + caption) run into a KV cache. Returns (cache, each prefix's row in it,
    each prefix's length). Their common first K tokens (the chat template; in the caprl format also the ~300-token
    instruction every caption is shown after) run once, as one row whose cache the C rows extend."""
    dev = model.device
    K = common_start(prefixes)
    past = DynamicCache()  # every layer keeps every key (no config: no sliding-window layers)
    if K:
        at = torch.arange(K, device=dev)[None]
        model.base_model(input_ids=torch.tensor([prefixes[0][:K]], device=dev), past_key_values=past, use_cache=True,
                         attention_mask=_masks(model, (at <= at.T)[None], at, at) if _window(model.config) else None)
    P = max(map(len, prefixes)) - K
    if P == 0:  # every prefix is the common part (one distinct caption): its single row serves every question
        return past, torch.zeros(len(prefixes), dtype=torch.long), [K] * len(prefixes)
    past.batch_repeat_interleave(len(prefixes))
    ids = torch.tensor([p[K:] + [pad_id] * (K + P - len(p)) for p in prefixes], device=dev)
    real = torch.tensor([len(p) - K for p in prefixes], device=dev)[:, None, None]  # (C, 1, 1): after the common part
    col = torch.arange(P, device=dev)  # the masks are built where they are used: (C, P, K + P) is large on a GPU
    own = (col <= col[:, None]) & (col < real) | torch.eye(P, dtype=torch.bool, device=dev)  # padding sees itself
    allowed = torch.cat([torch.ones(len(prefixes), P, K, dtype=torch.bool, device=dev), own], -1)
    pos = (K + col).expand(len(prefixes), -1)
    model.base_model(input_ids=ids, position_ids=pos, past_key_values=past, use_cache=True,
                     attention_mask=_masks(model, allowed, pos, torch.arange(K + P, device=dev)[None]))
    return past, torch.arange(len(prefixes)), [len(p) for p in prefixes]


@torch.no_grad()
def question_states(model, past, idx, lengths, rows, pad_id):
    """Final hidden states (n, T, D) of question rows, each after its caption's cached prefix: past's row idx[j], of
    lengths[j] tokens. rows: (ids, offsets after the prefix, segment ids): segment 0 is the question (causal), segment
    k > 0 option k's tokens, which see the question and themselves, not the other options (cloze)."""
    dev = model.device
    T, Kp = max(len(r[0]) for r in rows), past.get_seq_length()
    ids = torch.tensor([r[0] + [pad_id] * (T - len(r[0])) for r in rows], device=dev)
    pos = torch.tensor([[lengths[j] + o for o in r[1]] + [0] * (T - len(r[1])) for j, r in enumerate(rows)], device=dev)
    seg = torch.tensor([r[2] + [-1] * (T - len(r[2])) for r in rows], device=dev)  # -1: padding
    col = torch.arange(T, device=dev)
    sj, si = seg[:, None, :], seg[:, :, None]  # the key's and the query's segment
    own = (col <= col[:, None]) & (sj >= 0) & ((sj == 0) | (sj == si))
    pre = torch.arange(Kp, device=dev) < torch.tensor(lengths, device=dev)[:, None]  # the prefix's real part
    allowed = torch.cat([pre[:, None, :].expand(-1, T, -1), own | torch.eye(T, dtype=torch.bool, device=dev)], -1)
    k = past.layers[0].keys  # every format's prefix starts with the chat template: Kp > 0
    buf = [k.new_empty((len(rows), k.shape[1], Kp + T, k.shape[3])) for _ in range(2)]
    cache = copy.copy(past)
    cache.layers = [_ReadPrefix(layer, idx.to(dev), buf) for layer in past.layers]
    k_pos = torch.cat([torch.arange(Kp, device=dev).expand(len(rows), -1), pos], 1)
    return model.base_model(input_ids=ids, position_ids=pos, past_key_values=cache,
                            attention_mask=_masks(model, allowed, pos, k_pos)).last_hidden_state


def question_row(suffix, options):
    """A question's tokens as one row: its suffix, then for cloze each option's tokens but the last (each predicts
    the next one), every option placed right after the question. Returns (ids, offsets, segment ids)."""
    ids, off, seg = list(suffix), list(range(len(suffix))), [0] * len(suffix)
    for k, opt in enumerate(options, 1):
        ids += opt[:-1]
        off += range(len(suffix), len(suffix) + len(opt) - 1)
        seg += [k] * (len(opt) - 1)
    return ids, off, seg


@torch.no_grad()
def option_logits(model, tok, captions, questions, fmt, captions_per_forward=32, questions_per_forward=256):
    """Judge scores of every option of every row (row i = captions[i] asked questions[i], whose "options" are
    already shuffled and end with the abstain option): a list of (O_i,) tensors, higher = preferred.
    letter, caprl: the logit of each option's letter after "The answer is"; cloze: the option text's log-likelihood.
    Shared prefixes as in the module docstring (caption_cache, question_states). Captions go `captions_per_forward`
    at a time, questions `questions_per_forward` (thousands of one caption, as the leak filter asks, are split)."""
    if not captions:
        return []
    if fmt == "cloze":  # option order does not matter to cloze: score each (caption, question) once
        keys = [(c, q["question"], tuple(sorted(q["options"]))) for c, q in zip(captions, questions)]
        uniq = list(dict.fromkeys(keys))
        if len(uniq) < len(keys):
            z = option_logits(model, tok, [k[0] for k in uniq], [{"question": k[1], "options": list(k[2])}
                                                                   for k in uniq], fmt, captions_per_forward,
                              questions_per_forward)
            table = {k: dict(zip(k[2], zk.tolist())) for k, zk in zip(uniq, z)}
            return [torch.tensor([table[k][o] for o in q["options"]]) for k, q in zip(keys, questions)]
    pad = tok.pad_token_id or 0
    W = model.get_output_embeddings().weight
    rows_of = {}
    for i, c in enumerate(captions):
        rows_of.setdefault(c, []).append(i)
    answers = {o: answer_ids(tok, o) for o in {o for q in questions for o in q["options"]}} if fmt == "cloze" else {}
    letter_ids = W.new_tensor([letter_id(tok, L) for L in LETTERS[:max(len(q["options"]) for q in questions)]]
                              if fmt != "cloze" else [], dtype=torch.long)
    # a question's suffix does not depend on the caption (user_message puts the caption before _SPLIT): tokenized once.
    # A fork that moves the caption after the question must key this by caption too, and loses the shared prefix
    suffixes, out = {}, [None] * len(captions)
    distinct = list(rows_of)
    window = 8 * captions_per_forward  # captions tokenized and sorted at a time: bounded memory for big jobs
    for w0 in range(0, len(distinct), window):
        prefix = {}
        for c in distinct[w0:w0 + window]:
            q = questions[rows_of[c][0]]
            prefix[c] = prompt_ids(tok, c, q["question"], q["options"], fmt)[0]
        caps = sorted(prefix, key=lambda c: len(prefix[c]))  # similar lengths share a forward: less padding
        for c0 in range(0, len(caps), captions_per_forward):
            chunk = caps[c0:c0 + captions_per_forward]
            asked = [[] for _ in chunk]  # per caption: (row i, suffix ids, options' ids)
            for j, c in enumerate(chunk):
                for i in rows_of[c]:
                    q = questions[i]
                    key = (q["question"], tuple(q["options"]))
                    if key not in suffixes:
                        suffixes[key] = prompt_ids(tok, c, q["question"], q["options"], fmt, prefix[c])[1]
                    asked[j].append((i, suffixes[key], [answers[o] for o in q["options"]] if fmt == "cloze" else []))
            # what every question of a caption starts with ("question: ") joins the caption's prefix: computed once
            shared = [common_start([suf for _, suf, _ in a], leave=1) for a in asked]
            past, idx, lengths = caption_cache(model, [prefix[c] + a[0][1][:n] for c, a, n in
                                                       zip(chunk, asked, shared)], pad)
            work = sorted(((i, j, question_row(suf[shared[j]:], opts)) for j, a in enumerate(asked)
                           for i, suf, opts in a), key=lambda w: len(w[2][0]))  # (row i, caption in chunk, row)
            for q0 in range(0, len(work), questions_per_forward):
                part = work[q0:q0 + questions_per_forward]
                js = [w[1] for w in part]
                h = question_states(model, past, idx[js], [lengths[j] for j in js], [w[2] for w in part], pad)
                _read_scores(h, W, part, questions, answers, letter_ids, out, fmt, model.config)
    return out


def _read_scores(h, W, part, questions, answers, letter_ids, out, fmt, config):
    """Fill out[i] for the question rows of `part` from their hidden states h (n, T, D)."""
    n_suffix = [w[2][2].count(0) for w in part]
    if fmt != "cloze":  # letter, caprl: each option's letter logit at the question's last token
        z = h[torch.arange(len(part)), torch.tensor(n_suffix) - 1].float() @ W[letter_ids].float().T
        z = finish_logits(config, z).cpu()
        for (i, _, _), zi in zip(part, z):
            out[i] = zi[:len(questions[i]["options"])]
        return
    sel_b, sel_t, targets, owner, n_opt = [], [], [], [], 0  # every option token of the part, scored at once
    for b, ((i, _, _), S) in enumerate(zip(part, n_suffix)):
        start = S
        for o in questions[i]["options"]:
            a = answers[o]  # the question's last state predicts the option's first token, then each the next
            sel_t += [S - 1] + list(range(start, start + len(a) - 1))
            sel_b += [b] * len(a)
            targets += a
            owner += [n_opt] * len(a)
            start += len(a) - 1
            n_opt += 1
    # a logit scale s is a temperature 1 / s (soft-capped judges are refused cloze: models.judge_meta)
    lp = token_logprobs(h[sel_b, sel_t], W, torch.tensor(targets, device=h.device),
                        1 / (getattr(config, "logit_scale", None) or 1.0)).float().cpu()
    scores = torch.zeros(n_opt).index_add_(0, torch.tensor(owner), lp)
    k = 0
    for i, _, _ in part:
        out[i] = scores[k:k + len(questions[i]["options"])]
        k += len(questions[i]["options"])


def score_questions(model, tok, captions, questions, fmt, mode, rng, temperature=0.6, return_choice=False):
    """Ask the judge each (caption, question) row with shuffled options + abstain. Returns per row the score
    (argmax / sample: 1.0 if the gold option is chosen else 0.0; prob: the probability of the gold option),
    or with return_choice the option text chosen (argmax / sample). rng: a random.Random, or one per row (then a
    row's option shuffle and sampled answer depend on its own generator only)."""
    if return_choice and mode == "prob":
        raise ValueError("return_choice needs a chosen option: judge mode argmax or sample, not prob")
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
                    length_bounds=None, length_weight=0.2):
    """The CapRL reward of each caption: mean judge score over `n_draws` questions drawn with replacement from
    its image's MCQs (restricted to `types` when given: held-out types never enter the reward).
    Optional CapRL++ length term (length_bounds=(L1, L2), each caption's token count in `tokens`, end token not
    counted): length_weight x (1 up to L1 tokens, falling linearly to 0 at L2) is added to the accuracy, as CapRL++'s
    reward function adds it (weight 0.2 in its training script). rng: a random.Random, or one per caption (then a
    caption's reward does not depend on the other captions scored with it: torchrun ranks score their share)."""
    rngs = rng if isinstance(rng, list) else [rng] * len(captions)
    rows_c, rows_q, rows_rng = [], [], []
    for cap, item, r in zip(captions, items, rngs):
        pool = [q for q in item["questions"] if types is None or q.get("type") in types]  # never a held-out type
        for _ in range(n_draws):
            rows_c.append(cap)
            rows_q.append(r.choice(pool))
            rows_rng.append(r)
    scores = torch.tensor(score_questions(judge, tok, rows_c, rows_q, fmt, mode, rows_rng)).view(len(captions), n_draws)
    reward = scores.mean(1)
    if length_bounds:
        l1, l2 = length_bounds
        n = torch.as_tensor(tokens, dtype=torch.float32)
        reward = reward + length_weight * (1 - ((n - l1) / (l2 - l1)).clamp(0, 1))
    return reward
