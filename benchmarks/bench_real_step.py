"""One GRPO step of train_grpo.py at the paper's sizes (Qwen2.5-VL-3B policy, Qwen2.5-3B judge), and the memory
arithmetic of the one-GPU plan.

    python benchmarks/bench_real_step.py --plan-only      # any machine: exact parameter counts (meta device) + plan
    python benchmarks/bench_real_step.py                  # one GPU: random weights in the real shapes, a full step
    python benchmarks/bench_real_step.py --scale tiny     # CPU smoke test of the same path at toy width
    python benchmarks/bench_real_step.py --write-only DIR # only write DIR/policy, DIR/judge, DIR/qa.jsonl (bench_trl)

Random weights, written out from the published configs (no download): the step's cost does not depend on what the
weights say, as long as no caption stops early (a random model emits a given EOS token about once in 150k tokens).
The tokenizer is the built-in world's (the real one cannot be downloaded here); the vocabulary is Qwen's 151,936.
The step is train_grpo.py itself, run as a subprocess with the README's memory flags: 4 images x G = 8 captions of
256 new tokens, images of --image-side pixels squared; the second step is reported (the first warms up).
The last line is one JSON object with the figures.
"""
import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2Config

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from caprl_mini import models, shapes  # noqa: E402
from caprl_mini.sampling import linears  # noqa: E402

ROOT = __file__.rsplit("/benchmarks/", 1)[0]
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--plan-only", action="store_true", help="print parameter counts and the memory plan, run nothing")
parser.add_argument("--scale", default="real", choices=["real", "tiny"], help="tiny: toy widths, for a CPU smoke test")
parser.add_argument("--images", type=int, default=4, help="images per step")
parser.add_argument("--group-size", type=int, default=8, help="G")
parser.add_argument("--new-tokens", type=int, default=256, help="caption tokens per rollout")
parser.add_argument("--image-side", type=int, default=896, help="images are S x S pixels: (S / 28)^2 image tokens")
parser.add_argument("--write-only", default="", help="write the models and the QA file into this folder, run nothing")
parser.add_argument("--extra", default="--gradient-checkpointing 1 --micro-batch-images 1",
                    help="memory flags passed to train_grpo.py")
args = parser.parse_args()
tok = models.letter_tokenizer()
ids = {t: tok.convert_tokens_to_ids(t) for t in models.SPECIAL}
special = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
            tie_word_embeddings=True, **special)  # Qwen2.5-3B(-Instruct) and Qwen2.5-VL-3B's language model
vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
if args.scale == "tiny":
    text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    vision.update(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[1])
policy_cfg = Qwen2_5_VLConfig(
    text_config={**text, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                             "mrope_section": [16, 24, 24] if args.scale == "real" else [4, 2, 2]}},
    vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
    vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
judge_cfg = Qwen2Config(**text, rope_theta=1e6)

# ---------------------------------------------------------------- the plan: exact parameter counts, bytes per part
with torch.device("meta"):
    policy, judge = AutoModelForImageTextToText.from_config(policy_cfg), AutoModelForCausalLM.from_config(judge_cfg)
P = sum(p.numel() for p in policy.parameters())
Pv = sum(p.numel() for p in policy.model.visual.parameters())
J = sum(p.numel() for p in judge.parameters())
rows, img_tok = args.images * args.group_size, (args.image_side // 28) ** 2
head_dim = text["hidden_size"] // text["num_attention_heads"]
kv_per_token = text["num_hidden_layers"] * 2 * text["num_key_value_heads"] * head_dim * 2  # K and V, bf16
seq = img_tok + 30 + args.new_tokens
up = lambda n: -(-n // 128) * 128  # noqa: E731
GiB = 2**30
plan = [("policy weights, fp32", 4 * P), ("gradients, fp32 (update only)", 4 * P), ("AdamW m and v, fp32", 8 * P),
        ("bf16 copies of the weights under autocast", 2 * P), ("judge weights, bf16", 2 * J),
        (f"static decode buffers, bf16, rollout only ({args.images} prompts x {up(seq - args.new_tokens)} + {rows} rows x "
         f"{up(args.new_tokens)} positions)", (args.images * up(seq - args.new_tokens) + rows * up(args.new_tokens))
         * kv_per_token),  # the prompt once per image, each row's new tokens; lengths rounded up to 128
        ("static decode: bf16 copies of the language model's layer matrices, rollout only",
         2 * sum(x.numel() for layer in policy.model.language_model.layers for _, m in linears(layer)
                 for x in (m.weight, m.bias) if x is not None)),
        (f"naive logits of one micro-batch, fp32 ({args.group_size} x {args.new_tokens} x 151,936): avoided",
         args.group_size * args.new_tokens * 151936 * 4)]
print(f"parameters: policy {P / 1e9:.3f} B (vision {Pv / 1e9:.3f} B), judge {J / 1e9:.3f} B")
for name, b in plan:
    print(f"  {name:72s} {b / GiB:7.1f} GiB")
fixed = sum(b for name, b in plan[:5])
print(f"  {'sum of the fixed parts (weights, gradients, AdamW, bf16 copies, judge)':72s} {fixed / GiB:7.1f} GiB")
print(f"  {'same with --freeze-vision 1 (no gradients or AdamW for the vision tower)':72s} "
      f"{(fixed - 12 * Pv) / GiB:7.1f} GiB")
result = {"bench": "real_step", "scale": args.scale, "policy_params": P, "vision_params": Pv, "judge_params": J,
          "plan_fixed_gib": fixed / GiB}
if args.plan_only:
    print(json.dumps(result))
    sys.exit(0)

# ---------------------------------------------------------------- one real step: random weights, train_grpo.py
device, dtype = models.pick_device()
work = args.write_only or tempfile.mkdtemp(prefix="real_step_")
with torch.device(device):
    torch.manual_seed(0)
    policy = AutoModelForImageTextToText.from_config(policy_cfg, dtype=dtype)
    judge = AutoModelForCausalLM.from_config(judge_cfg, dtype=dtype)
pixels = args.image_side ** 2
proc = models.ImageProcessorOnly(image_processor=models.image_processor(pixels, pixels), tokenizer=tok,
                                 chat_template=models.CHAT_TEMPLATE)
models.save_model(policy, proc, os.path.join(work, "policy"))
models.save_model(judge, tok, os.path.join(work, "judge"))  # no judge.json: asked with the paper's prompt
del policy, judge
if device.type == "cuda":  # hand the cached blocks back to the driver: this process idles while train_grpo.py
    gc.collect()
    torch.cuda.empty_cache()  # runs, and its 14.5 GiB of freed-but-cached weights made the H100 run out of memory
with open(os.path.join(work, "qa.jsonl"), "w") as f:
    for i in range(args.images):
        item = shapes.world_item(i, "test")
        item["image"].resize((args.image_side, args.image_side)).save(os.path.join(work, f"{i}.png"))
        qs = [{k: q[k] for k in ("question", "options", "answer")} for q in item["questions"]]
        f.write(json.dumps({"id": str(i), "image": f"{i}.png", "questions": qs}) + "\n")
if args.write_only:
    print(f"wrote {work}/policy, {work}/judge, {work}/qa.jsonl")
    sys.exit(0)
cmd = [sys.executable, os.path.join(ROOT, "train_grpo.py"), "--policy", os.path.join(work, "policy"),
       "--judge", os.path.join(work, "judge"), "--data", os.path.join(work, "qa.jsonl"), "--steps", "2",
       "--images-per-step", str(args.images), "--group-size", str(args.group_size), "--max-new-tokens",
       str(args.new_tokens), "--lr", "1e-6", "--zero-truncated", "0", "--eval-images", "0", "--save-every", "0",
       "--save-final", "0", "--out", os.path.join(work, "run"), *args.extra.split()]
print(" ".join(cmd), flush=True)
try:
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    m = [json.loads(line) for line in open(os.path.join(work, "run", "metrics.jsonl"))][-1]
finally:  # the random weights: tens of GB at 3B
    shutil.rmtree(work)
update = m["step_seconds"] - m["gen_seconds"] - m["reward_seconds"]
print(f"\nstep ({args.images} images x G={args.group_size}, {m['caption_tokens_mean']:.0f} new tokens, "
      f"{img_tok} image tokens), {device}:")
for name, v in (("generation", m["gen_seconds"]), ("reward (judge)", m["reward_seconds"]), ("update", update),
                ("whole step", m["step_seconds"])):
    print(f"  {name:16s} {v:8.2f} s")
if m.get("peak_memory_gib") is not None:
    print(f"  peak memory      {m['peak_memory_gib']:8.1f} GiB")
print(json.dumps({**result, "device": torch.cuda.get_device_name() if device.type == "cuda" else str(device),
                  "gen_seconds": m["gen_seconds"], "reward_seconds": m["reward_seconds"], "update_seconds": update,
                  "step_seconds": m["step_seconds"], "peak_memory_gib": m.get("peak_memory_gib"),
                  "caption_tokens_mean": m["caption_tokens_mean"]}))
