import random

import pytest
import torch
import transformers

from caprl_mini import judge, models, shapes
from caprl_mini.data import DataError
from caprl_mini.shapes import ABSTAIN
from caprl_mini.judge import (LETTERS, answer_ids, caption_rewards, option_logits, prompt_ids, score_questions,
                              shuffle_options)


def test_abstain_scores_zero_and_gold_scores_one():
    item = shapes.world_item(3, "test")
    qs = item["questions"]
    rng = random.Random(0)
    # the oracle abstains on an empty caption: every row scores 0 in every reading mode
    for mode in ("argmax", "sample", "prob"):
        assert score_questions("oracle", None, [""] * len(qs), qs, "cloze", mode, rng) == [0.0] * len(qs)
    chosen = score_questions("oracle", None, [""] * len(qs), qs, "cloze", "argmax", rng, return_choice=True)
    assert chosen == [shapes.ABSTAIN] * len(qs)
    with pytest.raises(ValueError, match="return_choice needs a chosen option"):  # prob chooses nothing
        score_questions("oracle", None, [""] * len(qs), qs, "cloze", "prob", rng, return_choice=True)
    full = shapes.full_caption(item["scene"])
    r = caption_rewards("oracle", None, [full, ""], [item, item], 8, "cloze", "prob", rng, shapes.REWARD_TYPES)
    assert r.tolist() == [1.0, 0.0]


def test_reading_modes_follow_their_formulas_on_fixed_option_scores(monkeypatch):
    """With fixed option scores z in place of a judge's: prob is softmax(z)[gold], sample draws from
    softmax(z / 0.6) with the row's own generator, argmax picks the top option, each read through the shuffle."""
    score = {"red": 2.0, "blue": 0.0, "green": -1.0, ABSTAIN: 0.5}
    monkeypatch.setattr(judge, "option_logits", lambda model, tok, caps, posed, fmt: [
        torch.tensor([score[o] for o in q["options"]]) for q in posed])
    q = {"question": "color?", "options": ["blue", "red", "green"], "answer": "B"}  # gold: red
    for seed in range(20):
        got = {m: score_questions("judge", None, ["c"], [q], "letter", m, [random.Random(seed)],
                                  return_choice=m != "prob")[0] for m in ("prob", "argmax", "sample")}
        rng = random.Random(seed)
        opts, gold = shuffle_options(q, rng)
        z = torch.tensor([score[o] for o in opts])
        assert got["prob"] == pytest.approx(torch.softmax(z, 0)[gold].item(), abs=1e-7)
        assert got["argmax"] == "red"
        assert got["sample"] == opts[rng.choices(range(4), weights=torch.softmax(z / 0.6, 0).tolist())[0]]


def _reference_scores(model, tok, caption, q, fmt):
    """Unshared full forward of each prompt (the thing prefix sharing must reproduce)."""
    pre, suf = prompt_ids(tok, caption, q["question"], q["options"], fmt)
    W = model.get_output_embeddings().weight
    if fmt != "cloze":
        logits = model(input_ids=torch.tensor([pre + suf])).logits[0, -1]
        return torch.stack([logits[tok.encode(" " + LETTERS[j], add_special_tokens=False)[0]]
                            for j in range(len(q["options"]))])
    out = []
    for o in q["options"]:
        a = answer_ids(tok, o)
        lp = torch.log_softmax(model(input_ids=torch.tensor([pre + suf + a])).logits[0].double(), -1)
        out.append(sum(lp[len(pre + suf) - 1 + j, t] for j, t in enumerate(a)))
    return torch.stack(out).float()


@pytest.mark.parametrize("fmt", ["cloze", "letter", "caprl"])
def test_shared_prefix_scoring_equals_unshared_forward(fmt, tiny_judge_dir):
    model, tok, _ = models.load_judge(tiny_judge_dir)
    item = shapes.world_item(5, "test")
    rng = random.Random(1)
    caps = [shapes.full_caption(item["scene"], rng), shapes.human_caption(item["scene"], rng), "",
            "a red circle" + judge._SPLIT + "."]  # model output may hold the prompt's internal marker
    rows_q = [{**q, "options": shuffle_options(q, rng)[0]} for q in item["questions"][:7]]
    # mixed captions; then one caption for every row (the leak filter's empty one: no prefix beyond the shared start)
    for rows_c in ([caps[i % 4] for i in range(7)], [""] * 7, [caps[1]] * 7):
        with torch.no_grad():
            got = option_logits(model, tok, rows_c, rows_q, fmt)
            for c, q, z in zip(rows_c, rows_q, got):
                assert torch.allclose(z, _reference_scores(model, tok, c, q, fmt), atol=1e-4)


def _other_judge(tok, path, arch, **kw):
    """A tiny random judge of another architecture, its sizes and special tokens the tests' Qwen2 judge's, saved."""
    c = models.tiny_judge_config(tok, kv_heads=2).to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "bos_token_id", "eos_token_id", "pad_token_id")
    config = getattr(transformers, arch)(**{k: c[k] for k in keep}, **kw)
    torch.manual_seed(0)
    models.save_model(transformers.AutoModelForCausalLM.from_config(config), tok, str(path))
    return str(path)


@pytest.mark.parametrize("arch, kw", [("LlamaConfig", {}), ("Qwen3Config", {}),
                                      ("Gemma2Config", dict(sliding_window=16, final_logit_softcapping=0.5)),
                                      ("MistralConfig", dict(sliding_window=16)),
                                      ("Cohere2Config", dict(sliding_window=16, logit_scale=0.25))])
def test_shared_prefix_scoring_equals_unshared_forward_on_other_judge_architectures(arch, kw, tok, tmp_path):
    """Any chat LM may judge (Llama 3, Qwen3, Gemma, Mistral, Command R instruct models): the cached prefixes and
    question rows go through each architecture's own attention, masks and logits. A sliding window shorter than the
    prompts: Gemma 2's and Command R7B's layers of one type (a mask per layer type), all of Mistral v0.1's. Logits
    finished after the LM head: Gemma 2's soft-capping (cloze refused: the fused log-softmax has no cap), Cohere's
    logit scale."""
    path = _other_judge(tok, tmp_path, arch, head_dim=32, **kw)
    model, tok, _ = models.load_judge(path)
    item, rng = shapes.world_item(5, "test"), random.Random(1)
    caps = [shapes.full_caption(item["scene"], rng), shapes.human_caption(item["scene"], rng), ""]
    rows_q = [{**q, "options": shuffle_options(q, rng)[0]} for q in item["questions"][:6]]
    rows_c = [caps[i % 3] for i in range(6)]
    for fmt in ("caprl", "cloze"):
        if fmt == "cloze" and "final_logit_softcapping" in kw:
            with pytest.raises(DataError, match="its logits are soft-capped"):
                models.load_judge(path, fmt="cloze")
            continue
        with torch.no_grad():
            for c, q, z in zip(rows_c, rows_q, option_logits(model, tok, rows_c, rows_q, fmt)):
                assert torch.allclose(z, _reference_scores(model, tok, c, q, fmt), atol=1e-4)


@pytest.mark.parametrize("arch", ["Qwen3_5TextConfig", "JambaConfig"])
def test_a_judge_with_layers_that_are_not_attention_is_refused_before_its_weights_load(arch, tmp_path):
    """Linear-attention and state-space layers (Qwen3.5, Jamba) keep a state, not keys and values: the shared-prefix
    scoring used to end in an IndexError or a ValueError deep in transformers."""
    getattr(transformers, arch)(num_hidden_layers=4).save_pretrained(tmp_path)  # the config alone is enough
    with pytest.raises(DataError, match="layers that are not attention"):
        models.judge_meta(str(tmp_path))


def test_a_judge_whose_logits_judge_py_cannot_reproduce_is_refused_at_load(tok, tmp_path):
    """Granite divides its LM head's logits by logits_scaling (HyperCLOVA X multiplies by a field of that name):
    judge.py would read them unscaled, so the judge is refused when loaded, not scored wrongly."""
    path = _other_judge(tok, tmp_path, "GraniteConfig", logits_scaling=8.0)
    with pytest.raises(DataError, match="transforms the LM head's logits in a way judge.py does not reproduce"):
        models.load_judge(path)


def test_prob_mode_is_a_probability_and_a_pure_function_of_its_seed(tiny_judge_dir):
    model, tok, _ = models.load_judge(tiny_judge_dir)
    item = shapes.world_item(6, "test")
    qs = item["questions"]
    caps = [shapes.full_caption(item["scene"])] * len(qs)
    p = score_questions(model, tok, caps, qs, "cloze", "prob", random.Random(0))
    assert all(0.0 < x < 1.0 for x in p)
    # the same shuffles (same rng seed) give the same probabilities: the reward is a pure function of its seed
    assert p == score_questions(model, tok, caps, qs, "cloze", "prob", random.Random(0))


def test_cloze_dedupe_of_repeated_draws_keeps_each_rows_option_order(tiny_judge_dir):
    model, tok, _ = models.load_judge(tiny_judge_dir)
    item = shapes.world_item(8, "test")
    cap = shapes.full_caption(item["scene"])
    rng = random.Random(3)
    q = item["questions"][0]
    rows = [{**q, "options": shuffle_options(q, rng)[0]} for _ in range(4)]  # same question, 4 shuffles
    with torch.no_grad():
        together = option_logits(model, tok, [cap] * 4, rows, "cloze")
        for r, z in zip(rows, together):
            alone = option_logits(model, tok, [cap], [r], "cloze")[0]
            assert torch.allclose(z, alone, atol=1e-5)


def test_letter_prompt_lists_the_shuffled_options_and_abstain_last(tok):
    opts = ["blue", "red", ABSTAIN]
    pre, suf = prompt_ids(tok, "a blue circle.", "What color is the circle?", opts, "letter")
    assert tok.decode(pre + suf).endswith("caption: a blue circle.\nquestion: What color is the circle?\nA. blue\n"
                                          f"B. red\nC. {ABSTAIN}<|im_end|>\n<|im_start|>assistant\nThe answer is")
    assert tok.decode(pre).endswith("caption: a blue circle.\n")  # the part every question of the caption shares


def test_caprl_prompt_is_the_papers_through_the_chat_template(tok, chat_judge_dir):
    """Instruction, both worked examples, the caption between markers, lettered options with abstain last, the
    assistant turn pre-filled; everything up to the caption is shared by all questions of that caption."""
    _, jtok, meta = models.load_judge(chat_judge_dir)
    assert meta == {"format": "caprl"}  # a judge folder without judge.json is asked the paper's way
    q = {"question": "What color is the circle?", "options": ["red", "blue", "green", "gray"], "answer": "B"}
    opts, gold = shuffle_options(q, random.Random(0))
    pre, suf = prompt_ids(jtok, "a blue circle.", q["question"], opts, "caprl")
    text = jtok.decode(pre + suf)
    assert text.startswith("<|im_start|>user\nYou will be given an image caption")
    assert "**strictly based on the caption**" in text and "Example 1:" in text and "The answer is E.\n\nNow" in text
    assert "Caption: <Caption Start> a blue circle. <Caption End>\nQuestion: What color is the circle?\n" in text
    assert text.endswith("- E) Can not answer based on the caption<|im_end|>\n<|im_start|>assistant\nThe answer is")
    assert f"- {LETTERS[gold]}) blue\n" in text
    pre2, _ = prompt_ids(jtok, "a blue circle.", "How many?", ["1", "2", ABSTAIN], "caprl")
    assert pre2 == pre and jtok.decode(pre).endswith("<Caption End>\n")


@pytest.mark.parametrize("fmt", ["cloze", "caprl"])
def test_many_questions_of_one_caption_split_over_forwards_score_the_same(fmt, tiny_judge_dir):
    """The leak filter asks thousands of questions of one (empty) caption: they are split over several forwards
    over the one cached prefix, which must not change any score."""
    model, tok, _ = models.load_judge(tiny_judge_dir)
    rng = random.Random(4)
    qs = [{**q, "options": shuffle_options(q, rng)[0]} for i in range(3)
          for q in shapes.world_item(i, "test")["questions"]]
    with torch.no_grad():
        one = option_logits(model, tok, [""] * len(qs), qs, fmt, questions_per_forward=len(qs))
        split = option_logits(model, tok, [""] * len(qs), qs, fmt, questions_per_forward=3)
    assert len(qs) > 6 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(one, split))


def test_rewards_draw_n_questions_with_replacement_from_the_reward_types_with_each_captions_generator(monkeypatch):
    """Caption i's N draws are rng[i].choice over its image's reward-type questions, N times (with replacement);
    its shuffles and sampled answers use rng[i] too, so a caption scores the same alone as among others."""
    item = shapes.world_item(9, "test")
    asked, gold = [], {q["question"]: judge.gold_option(q) for q in item["questions"]}
    monkeypatch.setattr(judge, "option_logits", lambda model, tok, caps, posed, fmt: asked.extend(posed) or [
        torch.tensor([1.0 if o == gold[q["question"]] else 0.0 for o in q["options"]]) for q in posed])
    r = caption_rewards("judge", None, ["c0", "c1"], [item, item], 30, "letter", "sample",
                        [random.Random(0), random.Random(1)], shapes.REWARD_TYPES)
    pool = [q for q in item["questions"] if q["type"] in shapes.REWARD_TYPES]
    assert len(pool) < len(item["questions"])  # the image has held-out questions, never asked
    for i in range(2):
        replay = random.Random(i)
        drawn = [q["question"] for q in asked[30 * i:30 * i + 30]]
        assert drawn == [replay.choice(pool)["question"] for _ in range(30)]
    alone = caption_rewards("judge", None, ["c1"], [item], 30, "letter", "sample", [random.Random(1)],
                            shapes.REWARD_TYPES)
    assert alone.item() == r[1].item() and 0 < r[1] < 1  # sampled: neither all right nor all wrong


def test_length_term_adds_its_weight_times_the_piecewise_length_reward():
    """CapRL++'s length term is added to the accuracy: weight x (1 up to L1 tokens, linear to 0 at L2, 0 beyond),
    the same question draws otherwise (a multiplied form zeroed accurate long captions)."""
    item = shapes.world_item(3, "test")
    caps, tokens = [shapes.full_caption(item["scene"])] * 4 + [""], [5, 10, 15, 40, 5]

    def rewards(**length):
        return caption_rewards("oracle", None, caps, [item] * 5, 8, "cloze", "prob",
                               [random.Random(i) for i in range(5)], shapes.REWARD_TYPES, tokens, **length)
    plain = rewards()
    assert plain.tolist() == [1.0] * 4 + [0.0]
    got = rewards(length_bounds=(10, 20), length_weight=0.5) - plain
    assert torch.allclose(got, torch.tensor([0.5, 0.5, 0.25, 0.0, 0.5]))


def test_shuffles_put_the_gold_option_at_every_position():
    """The options are really shuffled (a judge with a position bias, "always A", must not score): over 40 seeds the
    gold option lands at each of the 4 places, the list is reordered, and abstain stays last."""
    q = {"question": "color?", "options": ["red", "blue", "green", "gray"], "answer": "C"}
    shuffled = [shuffle_options(q, random.Random(seed)) for seed in range(40)]
    assert {gold for _, gold in shuffled} == {0, 1, 2, 3}
    assert {tuple(opts) for opts, _ in shuffled} > {tuple(q["options"] + [ABSTAIN])}
    assert all(opts[gold] == "green" and opts[-1] == ABSTAIN for opts, gold in shuffled)


def test_cloze_answer_is_the_option_text_then_the_end_of_turn(tok):
    """What cloze scores (and sft.py trains the judge on) ends with the end-of-turn token: without it, "red" would be
    scored as a prefix of "red circle" and a short option's likelihood would be read off an unfinished answer."""
    assert answer_ids(tok, "red circle") == tok.encode(" red circle", add_special_tokens=False) + [
        tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.decode(answer_ids(tok, "red circle")) == " red circle<|im_end|>"


@pytest.mark.parametrize("fmt", ["letter", "caprl"])
def test_one_question_reshuffled_and_asked_of_several_captions_scores_each_row_unshared(fmt, tiny_judge_dir):
    """The letter formats list the options in the prompt: the same question in three option orders, each asked of two
    captions (one holding the prompt's internal marker), is six different prompts; every row scores as its own
    unshared forward (a question's prompt tail must be keyed by its options, and never hold caption text)."""
    model, tok, _ = models.load_judge(tiny_judge_dir)
    item = shapes.world_item(5, "test")
    q, rng = item["questions"][0], random.Random(2)
    shuffles = [{**q, "options": shuffle_options(q, rng)[0]} for _ in range(3)]
    assert len({tuple(s["options"]) for s in shuffles}) == 3
    caps = [shapes.full_caption(item["scene"]), "a red circle" + judge._SPLIT + " at the center."]
    rows_c, rows_q = [c for c in caps for _ in shuffles], shuffles * 2
    with torch.no_grad():
        got = option_logits(model, tok, rows_c, rows_q, fmt)
        for c, r, z in zip(rows_c, rows_q, got):  # 1e-5: the tiny judge's letter logits differ by ~1e-4 in caprl
            assert torch.allclose(z, _reference_scores(model, tok, c, r, fmt), atol=1e-5)


def test_common_start_compares_every_token_up_to_what_it_must_leave():
    """The shared-prefix boundary: the longest common start, never reaching into the last `leave` tokens of any list;
    a difference at the last comparable token counts (else two prompts that differ only there share it)."""
    assert judge.common_start([[1, 2, 3], [1, 2, 4]]) == 2
    assert judge.common_start([[1, 2], [1, 3, 4]]) == 1 and judge.common_start([[5], [6]]) == 0
    assert judge.common_start([[1, 2], [1, 2, 3]]) == 2 and judge.common_start([[1, 2, 3]] * 3) == 3
    assert judge.common_start([[1, 2, 3]] * 2, leave=1) == 2 and judge.common_start([[1, 2, 3], [1, 2, 4]], 1) == 2
    assert judge.common_start([[1, 2, 3], [1, 9, 3]], leave=1) == 1 and judge.common_start([[1], [1, 2]], 1) == 0
