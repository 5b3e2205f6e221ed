"""Build, load and save the policy (captioner) and the judge, and pick the device.

One loading path for everything: `load_policy(path_or_hub_id)` and `load_judge(path_or_hub_id)` take the
shipped tiny checkpoints, a checkpoint folder of a run, or a real hub id such as
"Qwen/Qwen2.5-VL-3B-Instruct" / "Qwen/Qwen2.5-3B-Instruct". Per-model special cases live here and only here.

The built-in world's tokenizer is a byte-level BPE trained on the world's text, with Qwen's special tokens
and chat template, so the tiny models speak the same protocol as real Qwen checkpoints.
"""
import ctypes
import json
import os
import re

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                          AutoTokenizer, DynamicCache, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
                          Qwen2VLConfig, Qwen2_5_VLConfig, Qwen2_5_VLProcessor,
                          Qwen3VLConfig)
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from . import shapes
from .data import DataError
from .judge import LETTERS, letter_id, logits_gap

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
SFT_CAPTIONER = os.path.join(ASSETS, "captioner")
JUDGE = os.path.join(ASSETS, "judge")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
# Qwen's chat template, reduced to what the project uses (text and image content parts, no tools).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class ImageProcessorOnly(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without its video slot: the video processor needs torchvision, which a CPU-only
    machine may lack, and captioning never uses it. Same call, same outputs (incl. mm_token_type_ids)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


def keep_freed_memory():
    """On a CPU, keep freed memory for reuse, as a caching allocator does on a GPU. glibc hands freed blocks of
    128 KB and more back to the OS (unmapped, or trimmed off the heap) and maps them again at the next allocation,
    so every forward's activations page-fault anew (a third of the tiny judge's time in a training step).
    Blocks up to 32 MB now come from the heap and the heap is not trimmed (the process keeps its peak). A no-op
    where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


def pick_device():
    """cuda > mps > cpu; bf16 on a GPU that supports it, else fp32 (also on MPS). Says what it picked. Under torchrun
    each process takes the GPU of its LOCAL_RANK. On a CPU, freed memory is kept for reuse (keep_freed_memory)."""
    if torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        dev, dtype = torch.device("mps"), torch.float32
    else:
        dev, dtype = torch.device("cpu"), torch.float32
        keep_freed_memory()
    print(f"device: {dev}, dtype: {dtype}")
    return dev, dtype


# ---------------------------------------------------------------- the built-in world's tokenizer and configs
def build_tokenizer(texts, vocab_size=512):
    """Byte-level BPE on the world's text, with Qwen's special tokens (<|im_end|> is EOS) and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, extra_special_tokens={
                                       "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                       "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})


def letter_tokenizer():
    """The world's tokenizer trained on lettered options too, so that " A" ... " F" are single tokens, which the
    letter formats need (the shipped judge's tokenizer splits them). For tests and benchmarks of letter scoring."""
    letters = [" ".join(f"{c}) x" for c in "ABCDEF") + f" The answer is {c}" for c in "ABCDEF"] * 50
    return build_tokenizer(shapes.world_text(200) + letters)


def image_processor(min_pixels=84 * 84, max_pixels=84 * 84, patch_size=14):
    """Qwen2-VL's PIL image processor (no torchvision needed): patch 14, merge 2, so 84x84 -> 9 tokens."""
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                                    temporal_patch_size=2, merge_size=2)


def tiny_policy_config(tok, hidden=128, layers=4, heads=4, vision_hidden=64, vision_depth=2, arch="qwen2_5_vl",
                       kv_heads=None):
    """A Qwen2.5-VL (or Qwen2-VL, Qwen3-VL) config at toy scale. mrope_section sums to head_dim / 2; special ids
    set explicitly; kv_heads < heads: grouped-query attention, as the real models. Qwen2 and 2.5 differ only in the
    vision tower (2.5: window attention, SwiGLU, RMSNorm); Qwen3-VL has patch 16 (96x96 -> 9 tokens), QK-norm and
    DeepStack (inner vision features added to early decoder layers)."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    head_dim = hidden // heads
    sec = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]  # (t, h, w), sums to head_dim/2
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sec},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=True)
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=True)
    patches = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if arch == "qwen2_vl":
        return Qwen2VLConfig(text_config=text, vision_config=dict(depth=vision_depth, embed_dim=vision_hidden,
                             hidden_size=hidden, num_heads=2, mlp_ratio=2, **patches), **common)
    if arch == "qwen3_vl":
        text["rope_parameters"]["mrope_interleaved"] = True
        return Qwen3VLConfig(text_config={**text, "head_dim": head_dim}, vision_config=dict(
            depth=vision_depth + 1, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_heads=2,
            out_hidden_size=hidden, num_position_embeddings=64, deepstack_visual_indexes=list(range(vision_depth)),
            **{**patches, "patch_size": 16}), **common)
    assert arch == "qwen2_5_vl", f"unknown tiny policy architecture {arch!r}"
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(
        depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_heads=2,
        out_hidden_size=hidden, window_size=56, fullatt_block_indexes=[vision_depth - 1], **patches), **common)


def tiny_judge_config(tok, hidden=128, layers=4, heads=4, rms_norm_eps=1e-6, kv_heads=None):
    """A Qwen2 config at toy scale. With heads=4 and the captioner's norm eps (1e-5) its weights can start from
    the tiny captioner's language model (same shapes; text-only multimodal rope is plain rope). kv_heads < heads:
    grouped-query attention, as the real Qwen judges."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    return Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                       max_position_embeddings=512, rms_norm_eps=rms_norm_eps, bos_token_id=ids["<|endoftext|>"],
                       eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True)


def build_tiny_policy(tok, seed=0, **kw):
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_policy_config(tok, **kw))
    side = 96 if kw.get("arch") == "qwen3_vl" else 84  # 3x3 merged patches
    proc = ImageProcessorOnly(image_processor=image_processor(side * side, side * side, model.config.vision_config
                                                              .patch_size), tokenizer=tok, chat_template=CHAT_TEMPLATE)
    return model, proc


def build_tiny_judge(tok, seed=0, **kw):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(tiny_judge_config(tok, **kw)), tok


# ---------------------------------------------------------------- one loading path
def check_model_path(path):
    """A folder must hold a config.json; anything else must look like a hub id ("Qwen/Qwen2.5-VL-3B-Instruct").
    Otherwise FileNotFoundError with what was given, rather than the hub client's error about repo ids."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: a model folder needs a config.json (save_pretrained writes one)")
    elif not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
        raise FileNotFoundError(f"{path}: no such model folder, and not a hub id like Qwen/Qwen2.5-VL-3B-Instruct")
    return path


def model_config(path):
    """The config of a model folder or hub id (check_model_path first). One transformers cannot read (a hub id it
    cannot fetch: no network, no such or a gated repo, not cached when offline; a config.json that is not JSON) raises
    DataError with transformers' reason, on one line."""
    check_model_path(path)
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as e:
        raise DataError(f"{path}: {' '.join(str(e).split())}") from None


def load_policy(path, device="cpu", dtype=torch.float32, min_pixels=None, max_pixels=None):
    """A vision-language captioner and its processor, from a folder or a hub id. Refused before the weights load: a
    text-only model (the judge given as the captioner), and pixel bounds that contradict each other or, one given
    alone, the processor's other bound (the resize would then keep one or the other depending on the image)."""
    check_policy(path)
    try:
        proc = AutoProcessor.from_pretrained(path)
    except (AttributeError, ImportError, ValueError):  # the video slot needs torchvision
        proc = AutoTokenizer.from_pretrained(path)
    if not hasattr(proc, "image_processor"):  # without torchvision AutoProcessor may return only the tokenizer
        tok = getattr(proc, "tokenizer", proc)  # the chat template AutoProcessor would take (chat_template.jinja, or
        # a hub folder's legacy chat_template.json, which the tokenizer does not read), else the tokenizer's
        template = ImageProcessorOnly.get_processor_dict(path)[0].get("chat_template") or tok.chat_template
        proc = ImageProcessorOnly(image_processor=Qwen2VLImageProcessorPil.from_pretrained(path), tokenizer=tok,
                                  chat_template=template)
    if min_pixels or max_pixels:  # in `size` only: set as attributes they reach each call as the min_pixels /
        # max_pixels arguments transformers 5.23 deprecates (the PIL processor has no such attributes of its own)
        ip = proc.image_processor
        lo, hi = min_pixels or ip.size["shortest_edge"], max_pixels or ip.size["longest_edge"]
        if lo > hi:
            raise DataError(f"--min-pixels {lo} is above --max-pixels {hi}" if min_pixels and max_pixels else
                            f"--min-pixels {lo} is above {path}'s max_pixels {hi}: give --max-pixels too" if min_pixels
                            else f"--max-pixels {hi} is below {path}'s min_pixels {lo}: give --min-pixels too")
        ip.size = {"shortest_edge": lo, "longest_edge": hi}
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device), proc


def check_policy(path):
    """A captioner's path checked without its weights (evaluate.py checks every --captioner before captioning with
    the first): a folder with a config.json or a hub id, of a vision-language model (not the judge) of the Qwen-VL
    families the sampler's decoder and the multimodal rotary positions are written for."""
    config = model_config(path)
    if not hasattr(config, "vision_config"):
        raise DataError(f"{path}: a text-only language model, not a vision-language captioner")
    if config.model_type not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        raise DataError(f"{path}: a {config.model_type} model; the captioner must be a Qwen2-VL, Qwen2.5-VL or "
                        "Qwen3-VL (dense) model")


def prepare_for_training(model, gradient_checkpointing=False, freeze_vision=False):
    """Training mode, no KV cache; optionally recompute each layer in the backward (activation memory of one
    layer instead of all) and freeze the vision tower (no gradient or optimizer state for it, and its forward
    keeps no activations). Returns the parameters to optimise.
    Turns cuDNN's attention off for the process: with an explicit mask (the packed teacher forcing always passes one)
    its backward returns NaN query gradients at sequence lengths of 64 mod 128 on H100/H200 since torch 2.11
    (pytorch/pytorch#196678, hit by TRL through Qwen2.5); SDPA's memory-efficient kernel takes the same masks."""
    torch.backends.cuda.enable_cudnn_sdp(False)
    model.train()
    model.config.use_cache = False
    if gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def load_judge(path, device="cpu", dtype=torch.float32, fmt=None):
    """A text-only chat LM and its tokenizer, from a folder or a hub id. Returns (model, tokenizer, meta), meta from
    judge_meta. "oracle" is the built-in world's exact reader (judge.py scores it by rule). The judge only runs
    inference: eval mode, no gradients, in the device's dtype (bf16 on a GPU). Refused once loaded (DataError): a judge
    whose logits judge.py would read otherwise than its own forward computes them."""
    tok, meta = judge_meta(path, fmt)
    if path == "oracle":
        return "oracle", None, meta
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
    gap = logits_gap(model, tok)
    if gap is not None:
        raise DataError(f"{path}: its forward transforms the LM head's logits in a way judge.py does not reproduce "
                        f"(max difference {gap:.3g}); not supported as a judge")
    return model, tok, meta


def judge_meta(path, fmt=None):
    """(tokenizer, meta) of a judge, without its weights (a script checks its judge before long work). meta is the
    folder's judge.json (how the judge was trained to be asked: {"format": "cloze"} for the built-in world's);
    without one (real chat judges) the paper's prompt and letter scoring, {"format": "caprl"}; fmt (--judge-format)
    overrides it. Refused (DataError): a vision-language model (the captioner given as the judge), layers that are
    not attention, and a letter format the tokenizer cannot read (a letter that is not one token)."""
    if path == "oracle":
        return None, {"format": fmt or "cloze"}
    config = model_config(path)
    if hasattr(config, "vision_config"):
        raise DataError(f"{path}: a vision-language model; the judge is a text-only chat language model")
    if not {type(x) for x in DynamicCache(config=config).layers} <= {DynamicLayer, DynamicSlidingWindowLayer}:
        raise DataError(f"{path}: layers that are not attention (linear attention, state space, convolution: "
                        "Qwen3.5, Jamba, Falcon-H1, ...); the judge's shared prefixes are attention keys only")
    tok = AutoTokenizer.from_pretrained(path)
    meta_path = os.path.join(path, "judge.json")
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {"format": "caprl"}
    meta["format"] = fmt or meta["format"]
    if meta["format"] == "cloze" and getattr(config, "final_logit_softcapping", None):  # token_logprobs has no cap
        raise DataError(f"--judge-format cloze with {path}: its logits are soft-capped (Gemma 2); use caprl or letter")
    if meta["format"] != "cloze":  # letter scoring reads one token a letter: refused now, not after a rollout (the
        try:  # letters any MCQ asks: two options and abstain; a question with more checks its own when scored)
            for letter in LETTERS[:3]:
                letter_id(tok, letter)
        except ValueError as e:
            raise DataError(f"--judge-format {meta['format']} with {path}: {e}") from None
    return tok, meta


def save_model(model, proc_or_tok, path, meta=None):
    """save_pretrained (safetensors) of the model and its processor / tokenizer, plus optional judge.json."""
    model.save_pretrained(path, safe_serialization=True)
    proc_or_tok.save_pretrained(path)
    if meta is not None:
        json.dump(meta, open(os.path.join(path, "judge.json"), "w"), indent=1)


# ---------------------------------------------------------------- the policy's forward, shared by sampler, trainer, sft
# B rows (prompts), T tokens, D hidden; P prompt tokens, L completion tokens, G completions per prompt, S packed
# completion tokens of one prompt. Prompts are left-padded so that every row's next token sits at column T.
CAPTION_INSTRUCTION = "Please describe this image in detail."


def encode_prompts(proc, images, instruction=CAPTION_INSTRUCTION):
    """One chat prompt per image (image, then instruction), left-padded: input_ids, attention_mask,
    pixel_values, image_grid_thw."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    proc.tokenizer.padding_side = "left"
    enc = proc(text=[text] * len(images), images=images, return_tensors="pt", padding=True)
    return {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}


def rope_positions(model, input_ids, attention_mask, image_grid_thw):
    """Multimodal rotary positions (3, B, T) of a left-padded prompt batch, and each row's next position (B,).
    Image tokens get (t, h, w) grid positions, so a row's next position is not its token count."""
    mm = (input_ids == model.config.image_token_id).int()
    pos, _ = model.model.get_rope_index(input_ids=input_ids, mm_token_type_ids=mm, image_grid_thw=image_grid_thw,
                                        attention_mask=attention_mask)
    return pos, pos.amax(dim=(0, 2)) + 1


def policy_hidden(model, input_ids, attention_mask, position_ids, pixel_values=None, image_grid_thw=None,
                  cache=None, repeat=1, prompt_len=None):
    """Final hidden states (B*repeat, T, D) of the policy's language model, and the image features
    (n_image_tokens, D) of the B images when pixels are given. The vision tower runs once per image; with
    repeat=G its features fill the image slots of the G rows of that image (rows grouped by image). Only the first
    `prompt_len` columns hold image slots when given (teacher-forced batches of prompt + completion)."""
    lm = model.model.language_model
    emb = lm.embed_tokens(input_ids)
    feats, extra = None, {}
    if pixel_values is not None:
        out = model.model.get_image_features(pixel_values.to(emb.dtype), image_grid_thw, return_dict=True)
        feats = torch.cat(out.pooler_output)
        per_row = [f for f in out.pooler_output for _ in range(repeat)]
        slots = input_ids == model.config.image_token_id
        if prompt_len is not None:  # a sampled caption may contain the image-pad id: that is text, not a slot
            slots[:, prompt_len:] = False
        emb = emb.masked_scatter(slots[..., None], torch.cat(per_row).to(emb.dtype))
        if getattr(out, "deepstack_features", None):  # Qwen3-VL's DeepStack: inner vision layers' features are
            # added to the image slots of the first decoder layers, one list entry per layer, rows as above
            extra = {"visual_pos_masks": slots, "deepstack_visual_embeds": [
                torch.cat([f for f in level for _ in range(repeat)]).to(emb.dtype) for level in out.deepstack_features]}
    out = lm(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
             use_cache=cache is not None, **extra)
    return out.last_hidden_state, feats


def with_completions(prompt, positions, next_pos, completion, completion_mask):
    """Prompts (B, P) + right-padded completions (B, L) -> the teacher-forced batch: input_ids (B, P+L),
    attention_mask, position_ids (3, B, P+L). The hidden state at column P-1+j predicts completion token j."""
    L = completion.shape[1]
    ids = torch.cat([prompt["input_ids"], completion], 1)
    mask = torch.cat([prompt["attention_mask"], completion_mask.to(prompt["attention_mask"].dtype)], 1)
    comp_pos = (next_pos[:, None] + torch.arange(L, device=ids.device))[None].expand(3, -1, -1)  # (3, B, L)
    return ids, mask, torch.cat([positions, comp_pos], 2)


def completion_hidden(model, input_ids, attention_mask, position_ids, next_pos, pixel_values, image_grid_thw,
                      completion, completion_mask, G):
    """Teacher-forced hidden states (n, D) of the n real completion tokens (completion_mask's ones, row-major), each
    the state predicting its token, of B left-padded prompts (B, P) with G right-padded completions each (B*G, L),
    rows grouped by image: what the loss needs, no padding rows.
    Each image's G completions follow its prompt back to back in one packed row (each attends to the prompt and to
    itself: a block-diagonal causal mask), so no prompt is repeated and an image's captions carry no padding:
    B*P + B*S tokens forward and backward (S: the most caption tokens of an image in the batch), where a batch of
    prompt + completion rows costs B*G*(P + L) (real images put hundreds of tokens in P; captions stop at different
    lengths, L is the longest). The prompt runs first and fills a KV cache the packed completions read; under
    gradient checkpointing (which drops caches inside the layers) prompt and completions run as one sequence, the
    prompt's rows masked causally. Flash attention takes no custom mask: there every row carries its own copy of
    the prompt."""
    attn = model.model.language_model.config._attn_implementation  # the text model's own (it may differ)
    if attn not in ("sdpa", "eager"):
        pr = {"input_ids": input_ids.repeat_interleave(G, 0), "attention_mask": attention_mask.repeat_interleave(G, 0)}
        ids, am, ps = with_completions(pr, position_ids.repeat_interleave(G, 1), next_pos.repeat_interleave(G),
                                       completion, completion_mask)
        P, L = input_ids.shape[1], completion.shape[1]
        h, _ = policy_hidden(model, ids, am, ps, pixel_values, image_grid_thw, repeat=G, prompt_len=P)
        return h[:, P - 1:P - 1 + L][completion_mask.bool()]
    B, P = input_ids.shape
    lens = completion_mask.sum(1)
    start = lens.view(-1, G).cumsum(1).view(-1) - lens  # each completion's offset in its image's packed row
    r, j = completion_mask.bool().nonzero(as_tuple=True)  # the real tokens: row r, column j
    b, col, S = r // G, start[r] + j, int(lens.view(-1, G).sum(1).max())
    ids = completion.new_zeros((B, S)).index_put_((b, col), completion[r, j])
    pos = completion.new_zeros((B, S)).index_put_((b, col), next_pos[b] + j)[None].expand(3, -1, -1)
    seg = completion.new_full((B, S), -1).index_put_((b, col), r)  # which completion (-1: padding)
    k = torch.arange(S, device=ids.device)
    own = (seg[:, :, None] == seg[:, None, :]) & (k <= k[:, None]) | (k == k[:, None])  # padding sees itself
    keys = attention_mask.bool()[:, None]  # (B, 1, P): the prompt's real tokens
    mask = torch.cat([keys.expand(-1, S, -1), own], -1)  # (B, S, P + S)
    one_sequence = model.is_activation_checkpointing
    if one_sequence:  # the prompt's rows see the prompt causally (padding sees itself), none of the completions
        i = torch.arange(P, device=ids.device)
        top = keys & (i <= i[:, None]) | (i == i[:, None])  # (B, P, P)
        mask = torch.cat([torch.cat([top, top.new_zeros((B, P, S))], -1), mask], 1)  # (B, P + S, P + S)
    if attn == "eager":  # eager adds its mask; sdpa takes it as bool
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    if one_sequence:
        h, _ = policy_hidden(model, torch.cat([input_ids, ids], 1), mask[:, None], torch.cat([position_ids, pos], 2),
                             pixel_values, image_grid_thw, prompt_len=P)
        hp, hc = h[:, :P], h[:, P:]
    else:
        cache = DynamicCache(config=model.config.get_text_config())
        hp, _ = policy_hidden(model, input_ids, attention_mask, position_ids, pixel_values, image_grid_thw,
                              cache=cache)
        hc, _ = policy_hidden(model, ids, mask[:, None], pos, cache=cache)  # (B, S, D)
    # the state before each token; index_select, not hp[b, -1]: the backward of advanced indexing with repeated
    # indices (every token of an image reads its prompt's last state) adds with atomics on a multi-threaded CPU, so
    # the gradient's rounding, and every weight after it, changed from run to run (index_select's adds are ordered)
    before = hc.flatten(0, 1).index_select(0, b * S + (col - 1).clamp(min=0))
    return torch.where((j == 0)[:, None], hp[:, -1].index_select(0, b), before)


def pad_right(seqs, pad_id):
    """List of token lists -> (B, L) tensor and its 0/1 mask."""
    ids = pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs], batch_first=True, padding_value=pad_id)
    return ids, (torch.arange(ids.shape[1]) < torch.tensor([len(s) for s in seqs])[:, None]).long()
