import functools
import gc
import weakref

import pytest
import torch

from caprl_mini import models, shapes
from caprl_mini.logprobs import token_logprobs
from caprl_mini.sampling import KVDecoder, decode, inverse_cdf, sample, unembed
from conftest import shipped


def teacher_forced_logprobs(model, prompt, out, G):
    pos, nxt = models.rope_positions(model, prompt["input_ids"], prompt["attention_mask"], prompt["image_grid_thw"])
    pr = {k: prompt[k].repeat_interleave(G, 0) for k in ("input_ids", "attention_mask")}
    ids, am, ps = models.with_completions(pr, pos.repeat_interleave(G, 1), nxt.repeat_interleave(G),
                                          out["tokens"], out["mask"])
    P, L = prompt["input_ids"].shape[1], out["tokens"].shape[1]
    h, _ = models.policy_hidden(model, ids, am, ps, prompt["pixel_values"], prompt["image_grid_thw"], repeat=G,
                                prompt_len=P)
    h = h[:, P - 1:P - 1 + L]
    return token_logprobs(h.reshape(-1, h.shape[-1]), model.get_output_embeddings().weight,
                          out["tokens"].reshape(-1)).view(-1, L)


def compiled_as_on_cuda(monkeypatch, backend):
    """Static decoders run their step functions compiled, as on CUDA (one torch.compile of each for the process, as
    sampling.compiled), with `backend` and no CUDA graph."""
    wrap = functools.cache(lambda f: torch.compile(f, fullgraph=True, dynamic=False, backend=backend))
    init = KVDecoder.__init__

    def compiled_init(self, *a, **k):
        init(self, *a, **k)
        if self.static:
            self.first, self.layer = wrap(KVDecoder.first_step), wrap(KVDecoder.layer_step)
    monkeypatch.setattr(KVDecoder, "__init__", compiled_init)


def mixed_images():
    """Different sizes -> different numbers of image tokens -> left-padded prompts of different lengths."""
    a = shapes.world_item(0, "test")["image"]
    return [a, a.resize((112, 84)), shapes.world_item(1, "test")["image"].resize((84, 140))]


@pytest.mark.parametrize("G", [1, 4])
def test_sampled_logprobs_equal_teacher_forced(tiny_policy_dir, G):
    model, proc = models.load_policy(tiny_policy_dir)
    prompt = models.encode_prompts(proc, mixed_images())
    assert prompt["attention_mask"].min() == 0  # really padded
    out = sample(model, prompt, G, 16, 1.0, seeds=[0, 1, 2])
    with torch.no_grad():
        tf = teacher_forced_logprobs(model, prompt, out, G)
    diff = ((tf - out["logprobs"]) * out["mask"]).abs().max()
    assert diff < 1e-5, diff


def test_sampled_logprobs_equal_teacher_forced_shipped_captioner():
    """Rows finish at different lengths (EOS), so finished rows are dropped from the cache mid-decode."""
    model, proc = models.load_policy(shipped("captioner"))
    prompt = models.encode_prompts(proc, [shapes.world_item(i, "test")["image"] for i in range(3)])
    out = sample(model, prompt, 8, 64, 1.0, seeds=[0, 1, 2])
    lengths = out["mask"].sum(1)
    assert lengths.min() < lengths.max() and not out["truncated"].all()
    with torch.no_grad():
        tf = teacher_forced_logprobs(model, prompt, out, 8)
    assert ((tf - out["logprobs"]) * out["mask"]).abs().max() < 1e-5


def test_sampling_is_deterministic_under_a_seed(tiny_policy_dir):
    model, proc = models.load_policy(tiny_policy_dir)
    prompt = models.encode_prompts(proc, mixed_images())
    a = sample(model, prompt, 3, 12, 1.0, seeds=[5, 6, 7])
    b = sample(model, prompt, 3, 12, 1.0, seeds=[5, 6, 7])
    assert torch.equal(a["tokens"], b["tokens"])
    for i in range(3):  # an image's G captions are G draws, not one draw repeated (a group needs its spread)
        assert len({tuple(row.tolist()) for row in a["tokens"][3 * i:3 * i + 3]}) == 3


def test_logits_are_fp32_under_bf16_autocast():
    """The sampler's logits stay fp32 under the trainer's bf16 autocast, so the sampled log-probs are the ones the
    trainer's fp32 teacher forcing computes (a bf16 product errs by ~1e-2 here)."""
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(16, 64, generator=g), torch.randn(200, 64, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = unembed(h, W)
    assert z.dtype == torch.float32 and (z.double() - h.double() @ W.double().T).abs().max() < 1e-4


def test_an_images_captions_depend_on_its_seed_not_on_its_batch(tiny_policy_dir):
    """Image b's captions come from seeds[b] alone: sampled with other images (a longer, left-padded batch) or on
    its own, the same tokens; so torchrun ranks can split a step's images any way."""
    model, proc = models.load_policy(tiny_policy_dir)
    images = mixed_images()
    together = sample(model, models.encode_prompts(proc, images), 3, 16, 1.0, seeds=[10, 11, 12])
    for b in range(3):
        alone = sample(model, models.encode_prompts(proc, images[b:b + 1]), 3, 16, 1.0, seeds=[10 + b])
        rows = slice(3 * b, 3 * b + 3)
        n = alone["tokens"].shape[1]
        assert torch.equal(alone["tokens"], together["tokens"][rows, :n]), b
        assert (together["mask"][rows, n:] == 0).all()
    other = sample(model, models.encode_prompts(proc, images), 3, 16, 1.0, seeds=[10, 11, 99])
    assert torch.equal(other["tokens"][:6], together["tokens"][:6]) and not torch.equal(other["tokens"], together["tokens"])


@pytest.mark.parametrize("static", [False, True])
def test_sampled_tokens_are_inverse_cdf_draws_at_the_temperature(tiny_policy_dir, static):
    """At a temperature T != 1 each token is the inverse-CDF draw from softmax(logits / T) at the rollout's uniform
    (image b's from seeds[b] alone: torch.rand(L, G), one draw per step for each of its G rows) and its log-prob is
    log softmax(logits / T) of it: what teacher-forced fp32 logits give, token for token."""
    model, proc = models.load_policy(tiny_policy_dir)
    prompt = models.encode_prompts(proc, mixed_images())
    G, L, T, seeds = 3, 10, 0.6, [4, 5, 6]
    out = sample(model, prompt, G, L, T, seeds, static=static)
    n = out["tokens"].shape[1]
    u = torch.cat([torch.rand(L, G, generator=torch.Generator().manual_seed(s)).T for s in seeds])[:, :n]
    pos, nxt = models.rope_positions(model, prompt["input_ids"], prompt["attention_mask"], prompt["image_grid_thw"])
    pr = {k: prompt[k].repeat_interleave(G, 0) for k in ("input_ids", "attention_mask")}
    ids, am, ps = models.with_completions(pr, pos.repeat_interleave(G, 1), nxt.repeat_interleave(G),
                                          out["tokens"], out["mask"])
    P = prompt["input_ids"].shape[1]
    with torch.no_grad():
        h, _ = models.policy_hidden(model, ids, am, ps, prompt["pixel_values"], prompt["image_grid_thw"], repeat=G,
                                    prompt_len=P)
        lp = torch.log_softmax(h[:, P - 1:P - 1 + n] @ model.get_output_embeddings().weight.T / T, -1)
    m = out["mask"].bool()
    cdf = lp[m].exp().cumsum(-1)
    drawn = torch.searchsorted(cdf, (u[m] * cdf[:, -1])[:, None], right=True)[:, 0]
    assert torch.equal(out["tokens"][m], drawn)
    assert (lp[m].gather(1, drawn[:, None])[:, 0] - out["logprobs"][m]).abs().max() < 1e-5
    assert len(set(map(tuple, out["tokens"].tolist()))) == 3 * G  # not a degenerate rollout


@pytest.mark.parametrize("static", [False, True])
def test_a_caption_ending_at_the_length_cap_is_not_truncated(static):
    """truncated means no EOS within max_new_tokens: with the cap at a caption's length, the caption whose EOS is
    the cap-th token ended (not truncated), the longer ones are cut there (truncated)."""
    model, proc = models.load_policy(shipped("captioner"))
    prompt = models.encode_prompts(proc, [shapes.world_item(i, "test")["image"] for i in range(6)])
    n = sample(model, prompt, 1, 64, 0)["mask"].sum(1)
    cap = int(n.unique()[-2])  # some captions end exactly there, some are longer
    out = sample(model, prompt, 1, cap, 0, static=static)
    assert out["mask"].sum(1).tolist() == n.clamp(max=cap).tolist()
    assert out["truncated"].tolist() == (n > cap).tolist() and (n == cap).any()


def test_inverse_cdf_never_draws_a_zero_probability_token():
    """inverse_cdf draws token k with cdf(k - 1) <= u * total < cdf(k): a token of probability 0 (an empty step of
    the cdf, as softmax entries underflowed at a low temperature) is never drawn, also at u = 0 and at a cdf step's
    edge; u = 1 (outside [0, 1), reachable by rounding) still gives a token index, the last."""
    probs = torch.tensor([[0.0, 0.0, 0.5, 0.0, 0.5, 0.0, 1e-30]]).expand(6, -1)
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 1 - 2 ** -24, 1.0])
    assert inverse_cdf(probs, u).tolist() == [2, 2, 4, 4, 4, 6]


@pytest.mark.parametrize("static", [False, True])
def test_rows_keep_their_images_positions_as_rows_leave(tiny_policy_dir, static):
    """Images whose grids span different rotary extents (square, 1 x 9, 9 x 1 merged patches) start their captions at
    different positions (the square's earlier); as rows end at different steps (and leave the dynamic batch), each
    row's new tokens keep its own image's positions: the sampled log-probs equal teacher forcing."""
    model, proc = models.load_policy(tiny_policy_dir)
    model.generation_config.eos_token_id = list(range(100, 140))  # any of 40 tokens ends a caption
    a = shapes.world_item(0, "test")["image"]
    side = proc.image_processor.patch_size * 2 * 9  # 9 merged patches in a row
    prompt = models.encode_prompts(proc, [a, a.resize((side, side // 9)), a.resize((side // 9, side))])
    nxt = models.rope_positions(model, prompt["input_ids"], prompt["attention_mask"], prompt["image_grid_thw"])[1]
    assert nxt.unique().numel() > 1
    out = sample(model, prompt, 4, 16, 1.0, [7, 8, 9], static=static)
    assert out["mask"].sum(1).unique().numel() > 2  # rows really end at different steps
    with torch.no_grad():
        tf = teacher_forced_logprobs(model, prompt, out, 4)
    assert ((tf - out["logprobs"]) * out["mask"]).abs().max() < 1e-5


def _generate(model, prompt, n):
    mm = (prompt["input_ids"] == model.config.image_token_id).int()
    g = model.generate(**prompt, mm_token_type_ids=mm, max_new_tokens=n, do_sample=False)
    return g[:, prompt["input_ids"].shape[1]:]


def test_greedy_equals_generate_random_model(tiny_policy_dir):
    model, proc = models.load_policy(tiny_policy_dir)
    prompt = models.encode_prompts(proc, mixed_images())
    out = sample(model, prompt, 1, 12, temperature=0)
    ref = _generate(model, prompt, 12)
    assert len(set(map(tuple, ref.tolist()))) > 1  # not a degenerate all-same output
    eos = model.config.text_config.eos_token_id
    for row, m, r in zip(out["tokens"], out["mask"], ref):
        n = int(m.sum())
        assert row[:n].tolist() == r[:n].tolist()
        assert n == len(r) or r[n - 1] == eos


def test_greedy_equals_generate_shipped_captioner():
    model, proc = models.load_policy(shipped("captioner"))
    images = [shapes.world_item(i, "test")["image"] for i in range(6)]
    prompt = models.encode_prompts(proc, images)
    out = sample(model, prompt, 1, 64, temperature=0)
    ref = _generate(model, prompt, 64)
    pad = proc.tokenizer.pad_token_id
    for row, m, r in zip(out["tokens"], out["mask"], ref):
        n = int(m.sum())
        assert row[:n].tolist() == r[:n].tolist() and set(r[n:].tolist()) <= {pad}
    caps = decode(proc, out)
    assert all(shapes.parse_caption(c)["objects"] for c in caps)  # it captions, in the world's language


def _assert_same_rollout(a, b, tokens=True):
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["truncated"], b["truncated"])
    assert not tokens or torch.equal(a["tokens"], b["tokens"])
    assert (a["logprobs"] - b["logprobs"]).abs().max() < 1e-5


@pytest.mark.parametrize("flex, fuse", [(False, False), (True, True)])  # flex alone: the Inductor test below
def test_static_decode_equals_dynamic(tiny_policy_dir, flex, fuse, monkeypatch):
    """The GPU path (preallocated cache, fixed batch; eager here) samples what the CPU path samples: greedy with
    EOS, sampled with and without EOS (the same random draws), also for calls after longer ones, whose buffers keep
    the longer calls' lengths (prompt positions and steps past its own, masked); with either attention, and with
    q/k/v and gate/up fused."""
    monkeypatch.setattr(KVDecoder, "flex", flex)
    monkeypatch.setattr(KVDecoder, "fuse", fuse)
    model, proc = models.load_policy(tiny_policy_dir)
    long_prompt = models.encode_prompts(proc, mixed_images())
    short_prompt = models.encode_prompts(proc, [shapes.world_item(i, "test")["image"].resize((168, 112))
                                                for i in range(3)])
    assert short_prompt["input_ids"].shape[1] < long_prompt["input_ids"].shape[1]
    for prompt in (long_prompt, short_prompt):
        _assert_same_rollout(sample(model, prompt, 2, 12, 0, static=False), sample(model, prompt, 2, 12, 0, static=True))
        for stop in (False, True):  # every row draws every step on both paths, finished or not: same draws
            a, b = (sample(model, prompt, 2, 12, 1.0, [3, 4, 5], stop_at_eos=stop, static=s) for s in (False, True))
            _assert_same_rollout(a, b)
    # the buffers' lengths grow only (shapes repeat, each compiled once): after a 130-token call a 12-token one
    # decodes in 256-position buffers, all past its own steps masked
    sample(model, short_prompt, 2, 130, 0, static=True)
    _assert_same_rollout(sample(model, short_prompt, 2, 12, 0, static=False),
                         sample(model, short_prompt, 2, 12, 0, static=True))
    assert model.__dict__["_decode_room"] == [128, 256]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_decode_follows_weight_updates(dtype):
    """Between rollouts the optimizer updates the weights in place; the fp32 unembedding the step reads is the
    parameter itself (fp32 weights) or a copy made by each call (bf16): after an update the static decode samples
    what the dynamic one samples from the new weights."""
    model, proc = models.load_policy(shipped("captioner"), dtype=dtype)
    prompt = models.encode_prompts(proc, [shapes.world_item(i, "test")["image"] for i in range(2)])
    prompt["pixel_values"] = prompt["pixel_values"].to(dtype)
    before = sample(model, prompt, 2, 24, 0, static=True)
    with torch.no_grad():
        model.get_output_embeddings().weight.add_(torch.randn_like(model.get_output_embeddings().weight))
    after, ref = (sample(model, prompt, 2, 24, 0, static=s) for s in (True, False))
    assert not torch.equal(before["tokens"][:, :ref["tokens"].shape[1]], ref["tokens"])  # the update changed it
    _assert_same_rollout(after, ref)


def test_static_step_under_autocast_reads_bf16_copies(tok, monkeypatch):
    """The trainer's GPU setting, fp32 weights under bf16 autocast: compiled, the static step would cast every weight
    matrix to bf16 again each token (autocast's cache does not survive tracing), 3x the weights' bytes a step. The
    decoder makes bf16 copies once a call instead: its traced step casts no weight matrix, and it samples bitwise
    what the step reading the parameters samples (autocast rounds them the same way), also after an update of the
    weights between calls."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from caprl_mini import sampling
    model, proc = models.build_tiny_policy(tok, seed=2, arch="qwen2_5_vl", heads=4, kv_heads=2)
    model.eval()
    prompt = models.encode_prompts(proc, mixed_images())
    decoders, init = [], KVDecoder.__init__
    monkeypatch.setattr(KVDecoder, "__init__", lambda self, *a, **k: init(self, *a, **k) or decoders.append(self))

    def rollout(copies=True):  # one autocast context per rollout, as the trainer (autocast's cache of casts ends with it)
        with monkeypatch.context() as m, torch.autocast("cpu", dtype=torch.bfloat16):
            m.setattr(sampling, "needs_copies", sampling.needs_copies if copies else lambda *a: False)
            return sample(model, prompt, 4, 16, 1.0, [7, 8, 9], static=True)

    def same(a, b):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["logprobs"], b["logprobs"])
        return a

    before = same(rollout(), rollout(copies=False))
    assert decoders[0].copied and not decoders[1].copied
    copies = [x for layer in decoders[0].mats for w in layer.values() for x in w if x is not None]
    assert {c.dtype for c in copies} == {torch.bfloat16} and len(copies) == 10 * len(model.model.language_model.layers)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.mlp.down_proj.weight.mul_(-3.0)
    after = same(rollout(), rollout(copies=False))
    assert not torch.equal(before["tokens"], after["tokens"])
    graphs = []
    torch._dynamo.reset()
    compiled_as_on_cuda(monkeypatch, lambda gm, ex: aot_module_simplified(
        gm, ex, fw_compiler=lambda g, _: graphs.append(g) or g.forward))
    _assert_same_rollout(after, rollout())
    torch._dynamo.reset()
    assert len(graphs) == 2  # the first step and one layer step for all layers
    casts = [n for g in graphs for n in g.graph.nodes if n.target == torch.ops.aten._to_copy.default]
    cast = {tuple(n.args[0].meta["val"].shape) for n in casts if n.args[0].op == "placeholder"}  # inputs cast
    weights = {tuple(m.weight.shape) for n, m in sampling.linears(model.model.language_model.layers[0])}
    assert len(casts) > 5 and cast and not cast & weights  # activations are cast, no weight matrix


def test_graphed_step_replays_on_the_tensors_it_was_recorded_with(tiny_policy_dir, monkeypatch):
    """The CUDA path's host side, CUDA faked: a replay runs the step again on the tensors it was recorded with (as a
    CUDA graph does), so each step must copy its token and positions into them and take the logits out before the
    next replay. The rollout equals the eager fixed one."""
    import contextlib
    import types
    from caprl_mini import sampling
    model, proc = models.load_policy(tiny_policy_dir)
    prompt = models.encode_prompts(proc, mixed_images())
    ref = sample(model, prompt, 2, 12, 1.0, [3, 4, 5], static=True)
    decoders, init, replays = [], KVDecoder.__init__, []

    class Graph:  # replay: the recorded step again, its logits written into the recorded output
        def replay(self):
            d = decoders[-1]
            d.logits.copy_(KVDecoder.forward(d, d.tok, d.positions))
            replays.append(int(d.t))

    def graphed_init(self, *a, **k):
        init(self, *a, **k)
        self.graphed = True
        decoders.append(self)

    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(KVDecoder, "__init__", graphed_init)
    for name, fake in (("CUDAGraph", Graph), ("graph", lambda g, stream: contextlib.nullcontext()),
                       ("Stream", lambda device: stream), ("stream", lambda s: contextlib.nullcontext()),
                       ("current_stream", lambda: stream)):
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None, raising=False)
    _assert_same_rollout(ref, sample(model, prompt, 2, 12, 1.0, [3, 4, 5], static=True))
    assert replays == list(range(11))  # one replay per decode step, each at its own step index
    sampling.side_stream.cache_clear()  # the fake stream


def test_a_decoder_is_freed_when_its_call_returns(tiny_policy_dir, monkeypatch):
    """A rollout's decoder holds its buffers (GBs at 3B) and, on a GPU, its CUDA graph: they must be freed when
    sample() returns, before the update allocates the gradients, not when the cycle collector next runs: no
    reference to the decoder outlives the call, and no reference cycle runs through it."""
    model, proc = models.load_policy(tiny_policy_dir)
    decoders, init = [], KVDecoder.__init__
    monkeypatch.setattr(KVDecoder, "__init__", lambda self, *a, **k: init(self, *a, **k) or
                        decoders.append(weakref.ref(self)))
    gc.disable()
    try:
        for static in (True, False):
            sample(model, models.encode_prompts(proc, mixed_images()), 2, 8, 0, static=static)
        assert len(decoders) == 2 and [d() for d in decoders] == [None, None]
    finally:
        gc.enable()


def test_static_decode_with_eos_matches_teacher_forced():
    """Rows end at different steps and keep riding in the fixed batch: their log-probs still equal the teacher-forced
    ones, nothing after EOS is kept (padding), and greedy still equals generate."""
    model, proc = models.load_policy(shipped("captioner"))
    prompt = models.encode_prompts(proc, [shapes.world_item(i, "test")["image"] for i in range(3)])
    out = sample(model, prompt, 8, 64, 1.0, seeds=[0, 1, 2], static=True)
    lengths = out["mask"].sum(1)
    assert lengths.min() < lengths.max() and not out["truncated"].all()
    assert (out["tokens"][out["mask"] == 0] == proc.tokenizer.pad_token_id).all()
    with torch.no_grad():
        tf = teacher_forced_logprobs(model, prompt, out, 8)
    assert ((tf - out["logprobs"]) * out["mask"]).abs().max() < 1e-5
    greedy, ref = sample(model, prompt, 1, 64, 0, static=True), _generate(model, prompt, 64)
    for row, m, r in zip(greedy["tokens"], greedy["mask"], ref):
        assert row[:int(m.sum())].tolist() == r[:int(m.sum())].tolist()


@pytest.mark.parametrize("flex", [False, True])  # with it, q/k/v and gate/up fused
def test_static_decode_step_traces_as_one_graph_per_function(tiny_policy_dir, flex, monkeypatch):
    """On CUDA the step's two functions (first step, layer step) are torch.compile(fullgraph=True): any graph break
    is an error there. Traced here with the eager backend (no code generation, no GPU), on a model prepared for
    training with gradient checkpointing (the embedding's requires_grad_ hook broke the GPU run under torch 2.11;
    2.13 traces it either way); the traced step must sample what the plain step samples, with one graph each for
    all layers, all steps and both calls (each call builds a new decoder: the graph must not depend on which, nor on
    which block mask its flex attention reads)."""
    monkeypatch.setattr(KVDecoder, "flex", flex)
    monkeypatch.setattr(KVDecoder, "fuse", flex)
    model, proc = models.load_policy(tiny_policy_dir)
    models.prepare_for_training(model, gradient_checkpointing=True)
    model.eval()
    prompt = models.encode_prompts(proc, mixed_images())
    ref = sample(model, prompt, 2, 12, 0, static=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled_as_on_cuda(monkeypatch, "eager")
    for _ in range(2):
        _assert_same_rollout(ref, sample(model, prompt, 2, 12, 0, static=True))
    # two graphs for every layer and step of both calls: a Python value that changes per layer (its index) would
    # compile each layer (a 3B model: 36 times as long), one that changes per step (a counter) every token
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


@pytest.mark.parametrize("flex, fuse", [(False, False), (True, False), (True, True)])
def test_static_step_compiled_by_inductor_samples_what_the_eager_step_samples(tok, flex, fuse, monkeypatch):
    """The static step as CUDA runs it, code-generated by Inductor (its CPU backend here; flex_attention becomes one
    fused kernel, on CUDA a Triton one): the same rollout as the eager step (for flex, flex_attention's reference
    implementation) and as the dynamic decoder, on a grouped-query model, at a caption length past one 128-token
    block of a row's buffer (the mask's rows and steps cross block edges) and with one caption per image; also with
    q/k/v and gate/up fused."""
    monkeypatch.setattr(KVDecoder, "flex", flex)
    monkeypatch.setattr(KVDecoder, "fuse", fuse)
    model, proc = models.build_tiny_policy(tok, seed=2, arch="qwen2_5_vl", heads=4, kv_heads=2)
    model.eval()
    prompt = models.encode_prompts(proc, mixed_images())
    for G, L in ((3, 140), (1, 12)):
        ref = sample(model, prompt, G, L, 1.0, [7, 8, 9], stop_at_eos=False, static=True)
        _assert_same_rollout(ref, sample(model, prompt, G, L, 1.0, [7, 8, 9], stop_at_eos=False, static=False))
        with monkeypatch.context() as m:
            torch._dynamo.reset()
            compiled_as_on_cuda(m, "inductor")
            _assert_same_rollout(ref, sample(model, prompt, G, L, 1.0, [7, 8, 9], stop_at_eos=False, static=True))
    torch._dynamo.reset()


def test_compiled_steps_recompile_past_dynamos_default_limit():
    """Each new buffer shape compiles the step functions again; past dynamo's recompile limit (8 by default) they
    would run uncompiled without a word, so sampling.compiled raises it."""
    from caprl_mini import sampling
    with torch._dynamo.config.patch(recompile_limit=8):
        sampling.compiled(lambda x: x)
        assert torch._dynamo.config.recompile_limit == 64


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_written_out_step_with_grouped_query_attention_and_bf16(tok, arch):
    """The real models share each key/value head among several query heads (3B: 16 query heads, 2 key/value heads);
    the other tests' tiny models do not. KVDecoder, dynamic (rows leaving at EOS) and fixed, on a model with 2 query
    heads per key/value head: the same rollout, and log-probs equal to Hugging Face's forward in fp32; under bf16
    autocast (the trainer's mixed precision: fp32 weights) both decoders' sampled tokens'
    log-probs stay within bf16 rounding of the teacher-forced ones."""
    model, proc = models.build_tiny_policy(tok, seed=2, arch=arch, heads=4, kv_heads=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 and "visual" not in n:
                p.mul_(4.0)
    model.eval()
    model.generation_config.eos_token_id = list(range(100, 140))  # any of 40 tokens ends a caption (as generate)
    prompt = models.encode_prompts(proc, mixed_images())
    a, b = (sample(model, prompt, 4, 16, 1.0, [7, 8, 9], static=s) for s in (False, True))
    assert a["mask"].sum(1).unique().numel() > 1  # rows really left at different steps
    _assert_same_rollout(a, b)
    with torch.no_grad():  # Hugging Face's forward over the whole sequences gives the same log-probs
        assert ((teacher_forced_logprobs(model, prompt, a, 4) - a["logprobs"]) * a["mask"]).abs().max() < 1e-5
    for static in (False, True):  # the static cache keeps bf16 keys and values (the step makes fp32 keys)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sample(model, prompt, 4, 16, 1.0, [7, 8, 9], static=static)
            with torch.no_grad():
                tf = teacher_forced_logprobs(model, prompt, out, 4)
        assert ((tf - out["logprobs"]) * out["mask"]).abs().max() < 0.1


class _DeviceLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the devices of every op's tensors (arguments and results)."""

    def __init__(self):
        super().__init__()
        self.devices = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
        self.devices.append((str(func), {t.device.type for t in leaves if isinstance(t, torch.Tensor)}))
        return out


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("flex", [False, True])  # with it, q/k/v and gate/up fused
def test_decode_steps_run_on_the_models_device_without_reading_data(tok, arch, flex, monkeypatch):
    """What a GPU needs from a decode step, checked without one: the model on the meta device (shapes, no data),
    each decoder's step and the token draw run through. A tensor created on the CPU inside the step (a missing
    device=) shows up as an op touching the CPU: on CUDA a device error, or a CUDA-graph skip in the compiled step;
    an op that reads data (.item(), nonzero, a Python if on a tensor) fails on meta: on CUDA a host sync per token."""
    from transformers import AutoModelForImageTextToText, DynamicCache
    from caprl_mini import sampling
    monkeypatch.setattr(sampling, "unembed", lambda h, W: h.float() @ W.T)  # autocast has no meta device
    # nor flex_attention (the static step's attention kernel, whose masking the CPU tests above check): a stand-in of
    # its output's shape, so the step around it (image-major writes and layouts) runs on meta
    monkeypatch.setattr(sampling, "flex_attention", lambda q, k, v, **kw: torch.empty_like(q))
    monkeypatch.setattr(KVDecoder, "flex", flex)
    monkeypatch.setattr(KVDecoder, "fuse", flex)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *device: False)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(models.tiny_policy_config(tok, arch=arch, kv_heads=2))
    model.eval()
    cfg, (B, G, P) = model.config.get_text_config(), (2, 3, 11)
    prefix, d = DynamicCache(config=cfg), cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        prefix.update(*(torch.empty(B, 2, P, d, device="meta") for _ in "kv"), i)
    prompt_mask = torch.ones(B * G, P, dtype=torch.long, device="meta")
    tokens, positions = torch.zeros(B * G, dtype=torch.long, device="meta"), torch.full((B * G,), P, device="meta")
    with torch.no_grad():
        for dec in (sampling.KVDecoder(model, prefix, G, prompt_mask, 8, static=True),
                    sampling.KVDecoder(model, prefix, G, prompt_mask, 8)):
            dec(tokens, positions)
            with _DeviceLog() as log:
                logits = dec(tokens, positions + 1)
                sampling.inverse_cdf(torch.log_softmax(logits, -1).exp(), torch.rand(B * G, device="meta"))
            assert logits.device.type == "meta" and logits.shape == (B * G, cfg.vocab_size)
            assert len(log.devices) > 100 and [op for op, d in log.devices if d != {"meta"}] == []
    # inside bf16 autocast (fp32 weights, so an fp32 prompt cache) both keep their keys and values in bf16: half the
    # memory, and no per-step cast of the prompt's cache (the steps themselves run under autocast in the test above)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *device: True)
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda *device: torch.bfloat16)
    kv, static = (sampling.KVDecoder(model, prefix, G, prompt_mask, 8, static=s) for s in (False, True))
    assert {t.dtype for dec in (kv, static) for ts in (dec.kp, dec.vp, dec.k, dec.v) for t in ts} == {torch.bfloat16}


@pytest.mark.parametrize("kind", ["sliding window", "mixture of experts"])
def test_sampling_refuses_layers_its_decoder_does_not_write_out(tok, kind):
    """KVDecoder writes out full-attention layers with one SwiGLU MLP each: a model with sliding-window layers or
    expert MLPs is refused by name before any work, not decoded wrongly or failing deep inside the step."""
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen3VLMoeConfig
    cfg = models.tiny_policy_config(tok, arch="qwen2_5_vl" if kind == "sliding window" else "qwen3_vl")
    text = {k: v for k, v in cfg.text_config.to_dict().items() if k != "layer_types"}
    if kind == "sliding window":  # Qwen2's layers from max_window_layers on attend within the window
        cfg = Qwen2_5_VLConfig(text_config={**text, "use_sliding_window": True, "sliding_window": 16,
                                            "max_window_layers": 2}, vision_config=cfg.vision_config.to_dict())
    else:
        cfg = Qwen3VLMoeConfig(text_config={**text, "num_experts": 2, "num_experts_per_tok": 1,
                                            "moe_intermediate_size": 32}, vision_config=cfg.vision_config.to_dict())
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    ids = torch.zeros((1, 4), dtype=torch.long)
    with pytest.raises(NotImplementedError, match="sliding-window" if kind == "sliding window" else "experts"):
        sample(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": None,
                       "image_grid_thw": None})
