"""The CapRL reward: a text-only judge answers multiple-choice questions from a caption alone.

For each caption: draw N questions with replacement from its image's MCQs; for every draw shuffle the options,
relabel them A, B, C, ..., append the abstain option ("can not answer based on the caption", scores 0);
ask the judge with a prompt that shows only the caption and the question, the assistant turn pre-filled with
"The answer is"; 1 if it picks the gold option. Reward = mean over the N draws.

Two ways to pose an MCQ (lm-evaluation-harness has both):
  letter  the options are listed with letters, the judge names a letter (the paper's way, for instruct judges);
  cloze   the judge's log-likelihood of each option's text as the answer (no letter binding; the built-in
          tiny judge is trained this way, see README).
Three ways to read the judge (DESIGN section 5): sample (temperature 0.6 over the options, as the paper),
argmax, prob (probability mass on the gold option: expected accuracy, lowest variance).

Cost: the caption is the shared prefix of all its questions: it is run through the judge once and its KV cache
is expanded to the questions (and, for cloze, once more to the options), so no prompt is prefilled twice.
Legend: C captions, Q questions (rows after expansion), O options, T tokens.
"""
import random

import torch
from transformers import DynamicCache

from .logprobs import token_logprobs
from .shapes import ABSTAIN, oracle_choice

LETTERS = "ABCDEFGHIJ"
ANSWER_PREFIX = "The answer is"
_SPLIT = "\x00SPLIT\x00"  # marks where the caption ends in the rendered chat, so the prefix can be shared


# ---------------------------------------------------------------- prompts: one place for what the judge sees
def user_message(caption, question, options, fmt):
    """The judge's user turn. `options` already includes the abstain option (letter format lists them)."""
    text = f"caption: {caption}\n{_SPLIT}question: {question}"
    if fmt == "letter":
        text += "\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return text


def prompt_ids(tok, caption, question, options, fmt):
    """Token ids of (prefix, suffix): prefix = chat start + caption, shared by every question of a caption;
    suffix = question (+ lettered options) + end of turn + assistant turn pre-filled with "The answer is"."""
    msgs = [{"role": "user", "content": user_message(caption, question, options, fmt)}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + ANSWER_PREFIX
    prefix, suffix = text.split(_SPLIT)
    return tok.encode(prefix, add_special_tokens=False), tok.encode(suffix, add_special_tokens=False)


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
def _extend(model, ids, past_mask, new_mask, cache):
    """Run `ids` (R, T) after the rows' cached prefixes; hidden states (R, T, D). Padding anywhere is masked out
    and skipped by the positions, so each row sees exactly its unpadded sequence."""
    pos = (past_mask.sum(1, keepdim=True) + new_mask.cumsum(1) - 1).clamp(min=0)
    return model.base_model(input_ids=ids, attention_mask=torch.cat([past_mask, new_mask], 1), position_ids=pos,
                            past_key_values=cache, use_cache=True).last_hidden_state


def _pad(seqs, pad_id, left=False):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(L - len(s), L) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def _letter_id(tok, letter):
    ids = tok.encode(" " + letter, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"letter format needs ' {letter}' to be one token; this tokenizer splits it into {ids}")
    return ids[0]


@torch.no_grad()
def option_logits(model, tok, captions, questions, fmt):
    """Judge scores of every option of every row (row = caption i with question i; `questions[i]["options"]`
    already shuffled and ending with the abstain option): a list of (O_i,) tensors, higher = preferred.
    letter: the logit of each option's letter after "The answer is"; cloze: the option text's log-likelihood.
    Each distinct caption is prefilled once (C rows), its cache expanded to its questions (Q rows) and, for
    cloze, once more to their options."""
    if not captions:
        return []
    if fmt == "cloze":  # option order does not matter to cloze: score each (caption, question) once
        keys = [(c, q["question"], tuple(sorted(q["options"]))) for c, q in zip(captions, questions)]
        uniq = list(dict.fromkeys(keys))
        if len(uniq) < len(keys):
            z = option_logits(model, tok, [k[0] for k in uniq], [{"question": k[1], "options": list(k[2])}
                                                                   for k in uniq], fmt)
            table = {k: dict(zip(k[2], zk)) for k, zk in zip(uniq, z)}
            return [torch.stack([table[k][o] for o in q["options"]]) for k, q in zip(keys, questions)]
    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    W = model.get_output_embeddings().weight
    uniq = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    parts = [prompt_ids(tok, c, q["question"], q["options"], fmt) for c, q in zip(captions, questions)]
    prefix = {c: pre for c, (pre, _) in zip(captions, parts)}  # same caption, same prefix ids
    ids, pmask = _pad([prefix[c] for c in uniq], pad, left=True)
    cache = DynamicCache(config=model.config)
    _extend(model, ids.to(dev), pmask[:, :0].to(dev), pmask.to(dev), cache)  # (C, P)
    row_of = torch.tensor([uniq[c] for c in captions], device=dev)
    cache.batch_select_indices(row_of)  # (C, ...) -> (Q, ...)
    past = pmask.to(dev)[row_of]
    sids, smask = _pad([s for _, s in parts], pad)
    h = _extend(model, sids.to(dev), past, smask.to(dev), cache)  # (Q, S, D)
    last = h[torch.arange(len(parts), device=dev), smask.sum(1).to(dev) - 1]  # predicts the answer's first token
    if fmt == "letter":
        out = []
        for i, q in enumerate(questions):
            letters = torch.tensor([_letter_id(tok, LETTERS[j]) for j in range(len(q["options"]))], device=dev)
            out.append(last[i].float() @ W[letters].float().T)
        return out
    # cloze: expand each question row to its options and score each option's tokens
    opt_row = torch.tensor([i for i, q in enumerate(questions) for _ in q["options"]], device=dev)
    answers = [answer_ids(tok, o) for q in questions for o in q["options"]]
    aids, amask = _pad(answers, pad)
    aids, amask = aids.to(dev), amask.to(dev)
    cache.batch_select_indices(opt_row)
    past = torch.cat([past, smask.to(dev)], 1)[opt_row]
    ha = _extend(model, aids[:, :-1], past, amask[:, :-1], cache)  # states after answer tokens 0..n-2
    states = torch.cat([last[opt_row][:, None], ha], 1)  # (sum O, A, D): state j predicts answer token j
    m = amask.bool()
    lp = torch.zeros(amask.shape, device=dev, dtype=torch.float32)
    lp[m] = token_logprobs(states[m], W, aids[m]).float()
    return list(lp.sum(1).split([len(q["options"]) for q in questions]))


def score_questions(model, tok, captions, questions, fmt, mode, rng, temperature=0.6, return_choice=False):
    """Ask the judge each (caption, question) row with shuffled options + abstain. Returns per row the score
    (argmax / sample: 1.0 if the gold option is chosen else 0.0; prob: the probability of the gold option),
    or with return_choice the option text chosen (argmax / sample)."""
    shuffled = [shuffle_options(q, rng) for q in questions]
    posed = [{**q, "options": o} for q, (o, _) in zip(questions, shuffled)]
    logits = option_logits(model, tok, captions, posed, fmt) if model != "oracle" else _oracle_logits(captions, posed)
    out = []
    for (opts, gold), z in zip(shuffled, logits):
        if mode == "prob":
            out.append(torch.softmax(z, 0)[gold].item())
            continue
        if mode == "argmax":
            k = int(z.argmax())
        elif mode == "sample":
            p = torch.softmax(z / temperature, 0).tolist()
            k = rng.choices(range(len(p)), weights=p)[0]
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
    multiplied by 1 up to L1 tokens, falling linearly to 0 at L2."""
    rows_c, rows_q = [], []
    for cap, item in zip(captions, items):
        pool = [q for q in item["questions"] if types is None or q.get("type") in types] or item["questions"]
        for _ in range(n_draws):
            rows_c.append(cap)
            rows_q.append(rng.choice(pool))
    scores = torch.tensor(score_questions(judge, tok, rows_c, rows_q, fmt, mode, rng)).view(len(captions), n_draws)
    reward = scores.mean(1)
    if length_bounds:
        l1, l2 = length_bounds
        n = torch.as_tensor(tokens, dtype=torch.float32)
        reward = reward * (1 - ((n - l1) / max(1, l2 - l1)).clamp(0, 1))
    return reward
