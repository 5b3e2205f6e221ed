"""Hand-written, batched, KV-cached sampling of G captions per image.

    prefill   each image's prompt once (not G times): vision tower + language model over the prompt, filling a cache;
    expand    the prompt's last state G times (rows grouped by image: row b*G + g is caption g of image b); its
              cache stays once per image;
    decode    all rows together, one token per step, until every row has emitted EOS or hit the length cap. The
              step is written out layer by layer (KVDecoder) over preallocated key/value buffers, the prompt's kept
              once per image (shared-prefix attention). CPU (dynamic): rows that finished leave the batch, so they
              stop costing compute. GPU (static=True): a fixed batch and fixed shapes (finished rows ride
              along, masked), the step compiled into one CUDA-graph replay per token.

Returns the tokens, their mask (1 up to and including EOS) and the sampled tokens' log-probs under
softmax(logits / temperature), the exact distribution sampled from: no top-k / top-p, so that the trainer's
teacher-forced log-probs of the same tokens match (ratio 1 on-policy). Greedy decoding (temperature 0) takes
the argmax and equals `model.generate(do_sample=False, repetition_penalty=1.0)`: generate applies a generation
config's repetition penalty even when greedy (a real checkpoint's config may set one), the sampler never.
Positions: Qwen-VL uses multimodal rotary positions; the prompt's come from the model's get_rope_index, and
new token t of a row sits at that row's max prompt position + 1 + t (what generate does via rope_deltas).
Legend: B images, G captions per image, R = B*G rows, P prompt length, L new tokens, D hidden, V vocabulary.
"""
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import DynamicCache

from .models import policy_hidden, rope_positions


@torch.no_grad()
def sample(model, prompt, group_size=1, max_new_tokens=64, temperature=1.0, seeds=None, stop_at_eos=True,
           static=None):
    """prompt: encode_prompts() output for B images. Returns dict of tokens (R, L), mask (R, L),
    logprobs (R, L) (0 where masked), truncated (R,) bool (no EOS within max_new_tokens).
    seeds: one int per image; the G captions of image b are drawn from a generator seeded with seeds[b] alone, so
    they do not depend on which other images share the batch (or the rank). None: seeds from torch's global RNG.
    stop_at_eos=False decodes exactly max_new_tokens per row, EOS included as ordinary text (benchmarks: fixed work).
    static: the fixed-batch decode of the module docstring; default: on CUDA."""
    ids, am = prompt["input_ids"], prompt["attention_mask"]
    dev, G = ids.device, group_size
    static = dev.type == "cuda" if static is None else static
    lm = model.model.language_model  # both decoders keep every position of a row (the released Qwen-VL models do)
    if set(getattr(lm.config, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        raise NotImplementedError("sample(): sliding-window attention layers are not supported (use_sliding_window)")
    if not all(hasattr(layer.mlp, "gate_proj") for layer in lm.layers):  # KVDecoder reads one SwiGLU MLP a layer
        raise NotImplementedError("sample(): mixture-of-experts layers are not supported (Qwen3-VL-MoE)")
    eos = model.generation_config.eos_token_id or model.config.text_config.eos_token_id  # generate's stop tokens
    eos = torch.tensor(eos if isinstance(eos, list) else [eos], device=dev)
    eos = eos if stop_at_eos else eos[:0]  # no stop token: no row ever finishes early
    pos, next_pos = rope_positions(model, ids, am, prompt["image_grid_thw"])
    cache = DynamicCache(config=model.config.get_text_config())
    h, _ = policy_hidden(model, ids, am, pos, prompt["pixel_values"], prompt["image_grid_thw"], cache=cache)
    h = h[:, -1].repeat_interleave(G, 0)  # (R, D): the state that predicts each row's first token
    am, next_pos = am.repeat_interleave(G, 0), next_pos.repeat_interleave(G, 0)
    R = h.shape[0]
    tokens = torch.full((R, max_new_tokens), model.config.text_config.pad_token_id or 0, dtype=torch.long, device=dev)
    logps = torch.zeros((R, max_new_tokens), device=dev)
    lengths = torch.full((R,), max_new_tokens, dtype=torch.long, device=dev)
    step = KVDecoder(model, cache, G, am, max_new_tokens, static)
    del cache  # the decoder holds the prompt's keys and values now (copied, or cast to its compute dtype)
    if temperature > 0:  # the rollout's uniforms drawn up front, (R, L): image b's rows from seeds[b] alone, in the
        # order of one draw per row and step
        seeds = torch.randint(2**62, (ids.shape[0],)).tolist() if seeds is None else seeds
        u = torch.cat([torch.rand(max_new_tokens, G, generator=torch.Generator(dev).manual_seed(int(sd)),
                                  device=dev).T for sd in seeds])
    alive = torch.arange(R, device=dev)  # original row index of each row still decoding (dynamic decode)
    finished = torch.zeros(R, dtype=torch.bool, device=dev)  # rows past their EOS (static decode)
    logits = unembed(h, step.W)
    for t in range(max_new_tokens):
        if temperature > 0:
            lp = torch.log_softmax(logits / temperature, -1)
            tok = inverse_cdf(lp.exp(), u[alive, t])
        else:
            lp = torch.log_softmax(logits, -1)
            tok = logits.argmax(-1)
        tokens[alive, t], logps[alive, t] = tok, lp.gather(1, tok[:, None])[:, 0]
        done = torch.isin(tok, eos)
        if static:  # fixed batch: a row's length is set by its first EOS; ask the GPU whether all ended every 16 steps
            lengths.masked_fill_(done & ~finished, t + 1)
            finished |= done
            if t == max_new_tokens - 1 or (t % 16 == 15 and finished.all()):
                break
            logits = step(tok, next_pos + t)
            continue
        lengths[alive[done]] = t + 1
        if t == max_new_tokens - 1 or done.all():
            break
        if done.any():  # drop finished rows from the batch and the cache
            keep = (~done).nonzero()[:, 0]
            step.select(keep)
            alive, tok, next_pos = alive[keep], tok[keep], next_pos[keep]
        logits = step(tok, next_pos + t)
    mask = (torch.arange(max_new_tokens, device=dev)[None] < lengths[:, None]).long()
    tokens.masked_fill_(mask == 0, model.config.text_config.pad_token_id or 0)  # static decode wrote past EOS
    truncated = ~torch.isin(tokens.gather(1, (lengths - 1)[:, None])[:, 0], eos)
    L = int(lengths.max())
    return {"tokens": tokens[:, :L], "mask": mask[:, :L], "logprobs": logps[:, :L] * mask[:, :L],
            "truncated": truncated}


def inverse_cdf(probs, u):
    """Token k of each row with cdf(k - 1) <= u * total < cdf(k): an exact draw from probs (r, V) given uniform u (r,);
    what torch.multinomial does, with the uniforms supplied by the caller (right=True: a zero-probability token, an
    empty step of the cdf, is not drawn)."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=probs.shape[1] - 1)


def unembed(h, W):
    """(r, D) hidden states -> (r, V) fp32 logits, also under bf16 autocast (the trainer's log-probs are fp32)."""
    with torch.autocast(h.device.type, enabled=False):
        return h.float() @ W.T


class KVDecoder:
    """The language model's decode step written out (the Qwen2 decoder layer of Qwen2-VL / Qwen2.5-VL: RMSNorm,
    q/k/v projections with bias, rotary, grouped-query attention, o projection, RMSNorm, SwiGLU MLP; Qwen3-VL's
    per-head q/k norms), one new token per row, where Hugging Face's forward runs a stack of modules that rebuild
    the attention mask every step and concatenate the whole cache every token. Its two savings:
      - the prompt's keys and values are kept once per image (B, Hkv, P, d), not G times, and the G rows of an
        image ask their queries together against them (shared-prefix attention, as Hydragen / cascade inference);
      - the new tokens' keys and values go into preallocated buffers (r, Hkv, L, d), a column written per step
        (compacted when rows leave the batch).
    The softmax runs over [prompt scores, new-token scores] together: the same attention, not an approximation
    (tests/test_sampling.py checks it against teacher forcing and `generate`).
    static=True (the GPU path): every step has the same shapes (all L new-token positions read, the ones not yet
    written masked; the step's index a device tensor). On CUDA its two functions are compiled, the layer step
    once for all layers, and the whole step is recorded as one CUDA graph per call, replayed every token. Nothing
    but two lengths is kept between calls: the buffers exist during the rollout only.
    At decode the three M-RoPE sections of a token share one position: the model's own rotary embedding there.
    Legend: R rows (B images x G), r rows still decoding, Hkv key/value heads, n_rep = query heads per key/value
    head, n new tokens so far."""

    # static: True computes attention with one flex_attention kernel over image-major buffers (attention_flex);
    # False (the default, measured on an H100) with the dynamic path's matmuls. Flex is checked on the CPU only;
    # `bench_sampling.py --methods generate,sampler,sampler-flex` compares the two on a GPU
    flex = False
    # static: True reads q/k/v and gate/up as one matrix each (concatenated copies made per rollout: one product
    # instead of three and two; 3B: +3.6 GiB during the rollout unless the weights are copied anyway). Not the
    # default either, for the same reason: `--methods ...,sampler-fused` (flex and fused) measures it
    fuse = False

    def __init__(self, model, prefix, G, prompt_mask, L, static=False):
        """Started on the prompt's cache prefix (B images) and its padding prompt_mask (R, P), for L new tokens.
        static: buffers of the model's largest prompt and caption lengths so far, rounded up to 128 (a few shapes,
        each compiled once), the prompt copied into the first P positions, the rest zero (masked: weight 0, and
        0 x garbage such as NaN would still be NaN)."""
        B, Hkv, P, d = prefix.layers[0].keys.shape
        self.lm, self.G, self.R, self.static, dev = model.model.language_model, G, B * G, static, prompt_mask.device
        # keys and values stored in autocast's dtype inside autocast (with fp32 weights the prompt's cache is fp32: the
        # rotary tables follow the fp32 residual stream), rounded as autocast's attention matmuls would round them
        autocast = torch.is_autocast_enabled(dev.type)
        self.dtype = dtype = torch.get_autocast_dtype(dev.type) if autocast else prefix.layers[0].keys.dtype
        keys, values = [x.keys for x in prefix.layers], [x.values for x in prefix.layers]
        if static:  # the largest lengths so far: a shorter call after a longer one reuses its compiled shapes
            room = model.__dict__.setdefault("_decode_room", [0, 0])
            room[:] = max(room[0], -(-P // 128) * 128), max(room[1], -(-L // 128) * 128)
            Pb, L = room
            n = Pb + G * L if self.flex else Pb  # flex: an image's buffer holds its prompt, then its G rows' tokens
            self.kp, self.vp = ([torch.zeros(B, Hkv, n, d, dtype=dtype, device=dev) for _ in keys] for _ in "kv")
            for buf, x in zip(self.kp + self.vp, keys + values):
                buf[:, :, :P] = x
        else:  # (B, Hkv, P, d): the prompt, once per image, in the compute dtype
            self.kp, self.vp, Pb = [x.to(dtype) for x in keys], [x.to(dtype) for x in values], P
        if static and self.flex:  # row b*G + g's new tokens at Pb + g*L + t of image b's buffer (written there, not
            # through a (B, Hkv, G, L, d) view: Inductor copies a view's whole region out and back to write one column)
            self.k, self.v, self.slots = self.kp, self.vp, Pb + torch.arange(G, device=dev) * L
            # key blocks of 128 positions, every one read (the default mask is one block of the whole length, which
            # flex's decoding kernel then walks in one split of its parallel key splits)
            nb = (Pb + G * L) // 128
            self.blocks = BlockMask.from_kv_blocks(
                torch.full((1, 1, 1), nb, dtype=torch.int32, device=dev),
                torch.arange(nb, dtype=torch.int32, device=dev).view(1, 1, 1, nb), BLOCK_SIZE=(1 << 30, 128),
                seq_lengths=(G, Pb + G * L), compute_q_blocks=False)
        else:  # (R, Hkv, L, d): new tokens, per row
            self.k = [torch.zeros(self.R, Hkv, L, d, dtype=dtype, device=dev) for _ in keys]
            self.v = [torch.zeros_like(x) for x in self.k]
        self.pad = torch.ones((self.R, 1, 1, Pb), dtype=torch.bool, device=dev)  # prompt positions not attended
        self.pad[:, 0, 0, :P] = ~prompt_mask.bool()
        self.t = torch.zeros(1, dtype=torch.long, device=dev)  # the step: where the new key and value go
        self.n, self.rows = 0, torch.arange(self.R, device=dev)  # original index of each row
        W = model.get_output_embeddings().weight
        self.W = W if W.dtype == torch.float32 else W.detach().float()  # fp32: the parameter itself, or a copy
        # each layer's matrices (weight, bias) as the step reads them: the parameters, or, static with fp32 weights
        # under bf16 autocast (the trainer on a GPU), copies in the compute dtype, as autocast rounds them: the
        # compiled step would otherwise cast every matrix again each token, reading the fp32 weights and writing and
        # reading the bf16 ones, 3x the bytes of reading bf16 weights (3B: 5.2 GiB of copies during the rollout)
        self.copied = static and needs_copies(model, dtype)
        cast = lambda x: x if x is None or not self.copied else x.detach().to(dtype)  # noqa: E731
        mats = ({n: [cast(m.weight), cast(m.bias)] for n, m in linears(layer)} for layer in self.lm.layers)
        self.mats = [fused(w) if static and self.fuse else w for w in mats]  # one layer's unfused copies at a time
        # layer i's RMSNorm weights: after attention, and the norm its output goes through next (the next layer's
        # input norm; the last layer's: the final norm); Qwen3-VL's per-head query and key norms
        afters = [layer.input_layernorm for layer in self.lm.layers[1:]] + [self.lm.norm]
        self.norms = [{"post": layer.post_attention_layernorm.weight, "after": after.weight} | (
            {"q": layer.self_attn.q_norm.weight, "k": layer.self_attn.k_norm.weight}
            if hasattr(layer.self_attn, "q_norm") else {}) for layer, after in zip(self.lm.layers, afters)]
        a = self.lm.layers[0].self_attn
        self.head_dim, self.scaling, self.act = a.head_dim, a.scaling, self.lm.layers[0].mlp.act_fn
        self.eps = self.lm.norm.variance_epsilon  # every RMSNorm of the model has the config's
        self.graphed, self.graph = static and dev.type == "cuda", None
        steps = (KVDecoder.first_step, KVDecoder.layer_step)  # plain functions of (self, ...), or compiled
        self.first, self.layer = (compiled(f) for f in steps) if self.graphed else steps

    def select(self, keep):
        """Keep only rows `keep` (finished rows leave): copies the new tokens' part of the cache, not the reserve."""
        for buf in (self.k, self.v):
            for i, x in enumerate(buf):
                buf[i] = x.new_empty((len(keep),) + x.shape[1:])
                buf[i][:, :, :self.n] = x[keep, :, :self.n]
        self.rows, self.pad = self.rows[keep], self.pad[keep]

    def by_image(self, x):
        """(r, Hkv, n_rep, k) per row -> (B, Hkv, G * n_rep, k): an image's rows side by side (finished: zeros)."""
        if x.shape[0] < self.R:
            x = x.new_zeros((self.R,) + x.shape[1:]).index_copy_(0, self.rows, x)
        _, Hkv, n_rep, k = x.shape
        return x.view(-1, self.G, Hkv, n_rep, k).transpose(1, 2).reshape(-1, Hkv, self.G * n_rep, k)

    def by_row(self, x):
        """by_image's inverse: (B, Hkv, G * n_rep, k) -> (r, Hkv, n_rep, k) of the rows still decoding."""
        B, Hkv, _, k = x.shape
        x = x.view(B, Hkv, self.G, -1, k).transpose(1, 2).reshape(self.R, Hkv, -1, k)
        return x if len(self.rows) == self.R else x[self.rows]

    def attention(self, q, Kp, Vp, K, V):
        """q (r, H, 1, d) of the new tokens over a layer's prompt Kp, Vp (once per image) and new tokens K, V (per
        row)."""
        r = q.shape[0]
        if self.static and self.flex:
            return self.attention_flex(q, Kp, Vp)
        if not self.static:  # only the new tokens so far (static: all L positions, the later ones masked below; a
            K, V = K[:, :, :self.n + 1], V[:, :, :self.n + 1]  # Python int read there would recompile every step)
        q = q.view(r, K.shape[1], -1, q.shape[-1])  # (r, Hkv, n_rep, d): query head j * n_rep + e uses kv head j
        sp = self.by_row(self.by_image(q) @ Kp.transpose(-1, -2)).masked_fill_(self.pad, -float("inf"))
        sn = q @ K.transpose(-1, -2)
        if self.static:
            sn = sn.masked_fill_(torch.arange(K.shape[2], device=q.device) > self.t, -float("inf"))
        s = torch.cat([sp, sn], -1) * self.scaling  # (r, Hkv, n_rep, P + new positions read)
        pp, pn = s.softmax(-1).split([Kp.shape[2], K.shape[2]], -1)
        o = self.by_row(self.by_image(pp) @ Vp) + pn @ V  # (r, Hkv, n_rep, d)
        return o.reshape(r, -1)

    def attention_flex(self, q, K, V):
        """Fixed, flex: q (R, H, 1, d) over each image's whole buffer K, V (B, Hkv, Pb + G*L, d) in one fused kernel
        (on CUDA, flex_attention's split-KV decoding kernel): an image's prompt read once for its G rows, each row's
        new tokens once, where the matmul path above runs ~8 kernels. Query g of image b (row b*G + g) sees the
        prompt's real tokens and its own new tokens up to this step; a masked score is -inf, so the buffer's unwritten
        zeros weigh nothing."""
        R, H, _, d = q.shape
        G, Pb, pad, t = self.G, self.pad.shape[-1], self.pad[:, 0, 0], self.t
        L = (K.shape[2] - Pb) // G

        def visible(score, b, h, g, j):
            n = j - Pb  # position among the image's new tokens: row n // L, its token n % L
            seen = torch.where(j < Pb, ~pad[b * G + g, j.clamp(max=Pb - 1)], (n // L == g) & (n % L <= t[0]))
            return torch.where(seen, score, -float("inf"))
        q = q.view(-1, G, H, d).transpose(1, 2).to(K.dtype)  # (B, H, G, d): an image's rows as its queries
        o = flex_attention(q, K, V, score_mod=visible, block_mask=self.blocks, enable_gqa=True, scale=self.scaling)
        return o.transpose(1, 2).reshape(R, H * d)

    def __call__(self, tok, positions):
        """Next-token logits (r, V) after feeding tok (r,) at rotary positions (r,)."""
        if not self.graphed:
            logits = self.forward(tok, positions)
        else:  # the graph reads its inputs from, and writes its logits to, the tensors it was recorded with
            if self.graph is None:
                self.record(tok, positions)
            self.tok.copy_(tok)
            self.positions.copy_(positions)
            self.graph.replay()
            logits = self.logits.clone()  # the next replay overwrites them
        self.t += 1
        self.n += 1
        return logits

    def record(self, tok, positions):
        """Record the compiled step as a CUDA graph: warm-up runs first (the first one in a process compiles), as
        torch.cuda.graph asks, on the process's one side stream. They write this step's key and value, which the
        first replay rewrites. cuBLAS's workspaces are dropped before and after, as Inductor does for its graphs: the
        recorded matmuls get theirs from the graph's own memory, freed with it."""
        self.tok, self.positions = tok.clone(), positions.clone()
        side = side_stream(tok.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(self.tok, self.positions)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        torch._C._cuda_clearCublasWorkspaces()
        with torch.cuda.graph(self.graph, stream=side):
            self.logits = self.forward(self.tok, self.positions)
        torch._C._cuda_clearCublasWorkspaces()

    def forward(self, tok, positions):
        """The step: the embedding, rotary and first norm, then each layer (on CUDA one compiled function for all
        layers), then the unembedding."""
        x, h, cos, sin = self.first(self, tok, positions)
        for i, (w, norms) in enumerate(zip(self.mats, self.norms)):
            x, h = self.layer(self, x, h, cos, sin, w, norms, self.kp[i], self.vp[i], self.k[i], self.v[i])
        return unembed(h, self.W)

    def first_step(self, tok, positions):
        """The embedding of tok (r,), its norm for the first layer and the rotary's cos, sin (r, 1, 1, d)."""
        x = F.embedding(tok, self.lm.embed_tokens.weight)  # (r, D)
        cos, sin = (c[:, None] for c in self.lm.rotary_emb(x, positions[None, :, None].expand(3, -1, 1)))
        return x, rms_norm(x, self.lm.layers[0].input_layernorm.weight, self.eps), cos, sin

    def layer_step(self, x, h, cos, sin, w, norms, kp, vp, k_buf, v_buf):
        """One decoder layer on the residual stream x (r, D) and its normed input h: writes this token's key and
        value into k_buf, v_buf and returns the new residual stream and its norm under norms["after"]. Every input is
        a tensor or a dict of tensors (no module, no layer index), so one compiled function serves all layers.
        Linear layers as F.linear on their (weight, bias): an nn.Linear call costs hooks and dispatch, a few
        microseconds each on the eager path, 7 a layer."""
        r, d = x.shape[0], self.head_dim
        if "qkv" in w:  # fused: one product, split (H*d, Hkv*d, Hkv*d)
            Dq = w["o_proj"][0].shape[1]
            q, k, v = F.linear(h, *w["qkv"]).split([Dq] + [(w["qkv"][0].shape[0] - Dq) // 2] * 2, -1)
        else:
            q, k, v = (F.linear(h, *w[n]) for n in ("q_proj", "k_proj", "v_proj"))
        q, k, v = (z.reshape(r, -1, 1, d) for z in (q, k, v))  # (r, H or Hkv, 1, d)
        if "q" in norms:
            q, k = rms_norm(q, norms["q"], self.eps), rms_norm(k, norms["k"], self.eps)
        k, v = (k * cos + rotate_half(k) * sin).to(self.dtype), v.to(self.dtype)
        at = self.t
        if self.static and self.flex:  # image-major: row b*G + g writes image b's slot g
            k, v = (z.view(-1, self.G, z.shape[1], d).transpose(1, 2) for z in (k, v))  # (B, Hkv, G, d)
            at = self.slots + self.t
        k_buf.index_copy_(2, at, k)
        v_buf.index_copy_(2, at, v)
        x = x + F.linear(self.attention(q * cos + rotate_half(q) * sin, kp, vp, k_buf, v_buf), *w["o_proj"])
        h = rms_norm(x, norms["post"], self.eps)
        if "gate_up" in w:
            g, u = F.linear(h, *w["gate_up"]).chunk(2, -1)
        else:
            g, u = F.linear(h, *w["gate_proj"]), F.linear(h, *w["up_proj"])
        x = x + F.linear(self.act(g) * u, *w["down_proj"])
        return x, rms_norm(x, norms["after"], self.eps)


def fused(w):
    """A layer's matrices (weight, bias) with q/k/v and gate/up each concatenated along their outputs."""
    def cat(*names):
        return [None if w[names[0]][i] is None else torch.cat([w[n][i].detach() for n in names]) for i in (0, 1)]
    return {"qkv": cat("q_proj", "k_proj", "v_proj"), "gate_up": cat("gate_proj", "up_proj"), "o_proj": w["o_proj"],
            "down_proj": w["down_proj"]}


def linears(layer):
    """A decoder layer's seven nn.Linear modules by name."""
    a, m = layer.self_attn, layer.mlp
    return [(n, getattr(a, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
        [(n, getattr(m, n)) for n in ("gate_proj", "up_proj", "down_proj")]


@functools.cache
def compiled(step):
    """A KVDecoder step function compiled (fused kernels, no CUDA graphs of its own: KVDecoder records one per call),
    once per process and shape; static shapes: a new one compiles again (few: lengths are rounded up to 128 and grow
    only) rather than turning every later call into a graph with symbolic sizes. Past dynamo's recompile limit a
    function would run uncompiled, silently: 8 shapes by default (a run's prompt room growing, an evaluation's other
    batch), raised to 64."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(step, fullgraph=True, dynamic=False)


@functools.cache
def side_stream(device):
    """The stream graphs are recorded on, one per device for the process: cuBLAS keeps a workspace per stream."""
    return torch.cuda.Stream(device)


def needs_copies(model, dtype):
    """Whether a static decoder computing in dtype reads copies of the layers' matrices: weights of another dtype
    under autocast (the trainer's fp32 weights under bf16 autocast)."""
    w = model.model.language_model.layers[0].mlp.down_proj.weight
    return w.dtype != dtype and torch.is_autocast_enabled(w.device.type)


def rotate_half(x):
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), -1)


def rms_norm(x, weight, eps):
    """Hugging Face's Qwen2 RMSNorm: statistics in fp32, the weight applied in the input's dtype."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def decode(proc, out):
    """Sampled tokens -> caption strings (special tokens and padding removed)."""
    tok, tokens, mask = getattr(proc, "tokenizer", proc), out["tokens"].cpu(), out["mask"].cpu().bool()  # one copy
    return [tok.decode(t[m], skip_special_tokens=True).strip() for t, m in zip(tokens, mask)]
