"""Hand-written, batched, KV-cached sampling of G captions per image.

    prefill   each unique (image, prompt) once: vision tower + language model over the prompt, filling a cache;
    expand    the cache G times (rows grouped by image: row b*G + g is caption g of image b);
    decode    all rows together, one token per step, until every row has emitted EOS or hit the length cap;
              rows that finished are dropped from the batch (and the cache), so they stop costing compute.

Returns the tokens, their mask (1 up to and including EOS) and the sampled tokens' log-probs under
softmax(logits / temperature), the exact distribution sampled from: no top-k / top-p, so that the trainer's
teacher-forced log-probs of the same tokens match (ratio 1 on-policy). Greedy decoding (temperature 0) takes
the argmax and equals `model.generate(do_sample=False)`.
Positions: Qwen-VL uses multimodal rotary positions; the prompt's come from the model's get_rope_index, and
new token t of a row sits at that row's max prompt position + 1 + t (what generate does via rope_deltas).
Legend: B images, G captions per image, R = B*G rows, P prompt length, L new tokens, D hidden, V vocabulary.
"""
import torch
from transformers import DynamicCache

from .models import policy_hidden, rope_positions


@torch.no_grad()
def sample(model, prompt, group_size=1, max_new_tokens=64, temperature=1.0, generator=None, stop_at_eos=True):
    """prompt: encode_prompts() output for B images. Returns dict of tokens (R, L), mask (R, L),
    logprobs (R, L) (0 where masked), truncated (R,) bool (no EOS within max_new_tokens).
    stop_at_eos=False decodes exactly max_new_tokens per row, EOS included as ordinary text (benchmarks: fixed work)."""
    ids, am = prompt["input_ids"], prompt["attention_mask"]
    dev, G = ids.device, group_size
    eos = model.config.text_config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, list) else [eos], device=dev)
    eos = eos if stop_at_eos else eos[:0]  # no stop token: no row ever finishes early
    # (V, D) in fp32 once: with bf16 weights a per-step .float() writes and re-reads an fp32 copy every token
    W = model.get_output_embeddings().weight.float()
    pos, next_pos = rope_positions(model, ids, am, prompt["image_grid_thw"])
    cache = DynamicCache(config=model.config.get_text_config())
    h, _ = policy_hidden(model, ids, am, pos, prompt["pixel_values"], prompt["image_grid_thw"], cache=cache)
    cache.batch_repeat_interleave(G)  # (B, ...) -> (R, ...), rows grouped by image
    h = h[:, -1].repeat_interleave(G, 0)  # (R, D): the state that predicts each row's first token
    am, next_pos = am.repeat_interleave(G, 0), next_pos.repeat_interleave(G, 0)
    R = h.shape[0]
    tokens = torch.full((R, max_new_tokens), model.config.text_config.pad_token_id or 0, dtype=torch.long, device=dev)
    logps = torch.zeros((R, max_new_tokens), device=dev)
    lengths = torch.full((R,), max_new_tokens, dtype=torch.long, device=dev)
    alive = torch.arange(R, device=dev)  # original row index of each row still decoding
    for t in range(max_new_tokens):
        with torch.autocast(dev.type, enabled=False):  # fp32 logits, as the trainer's log-probs, under bf16 autocast
            logits = h.float() @ W.T  # (r, V)
        if temperature > 0:
            lp = torch.log_softmax(logits / temperature, -1)
            tok = torch.multinomial(lp.exp(), 1, generator=generator)[:, 0]
        else:
            lp = torch.log_softmax(logits, -1)
            tok = logits.argmax(-1)
        tokens[alive, t], logps[alive, t] = tok, lp.gather(1, tok[:, None])[:, 0]
        done = torch.isin(tok, eos)
        lengths[alive[done]] = t + 1
        if t == max_new_tokens - 1 or done.all():
            break
        if done.any():  # drop finished rows from the batch and the cache
            keep = (~done).nonzero()[:, 0]
            cache.batch_select_indices(keep)
            alive, tok, am, next_pos = alive[keep], tok[keep], am[keep], next_pos[keep]
        am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
        step_pos = (next_pos + t)[None, :, None].expand(3, -1, 1)  # (3, r, 1)
        h, _ = policy_hidden(model, tok[:, None], am, step_pos, cache=cache)
        h = h[:, -1]
    mask = (torch.arange(max_new_tokens, device=dev)[None] < lengths[:, None]).long()
    truncated = ~torch.isin(tokens.gather(1, (lengths - 1)[:, None])[:, 0], eos)
    L = int(lengths.max())
    return {"tokens": tokens[:, :L], "mask": mask[:, :L], "logprobs": logps[:, :L] * mask[:, :L],
            "truncated": truncated}


def decode(proc, out):
    """Sampled tokens -> caption strings (special tokens and padding removed)."""
    tok = getattr(proc, "tokenizer", proc)
    return [tok.decode(t[m.bool()], skip_special_tokens=True).strip() for t, m in zip(out["tokens"], out["mask"])]
