#!/usr/bin/env bash
# Every GPU row of BENCHMARKS.md, logs under ${OUT:-runs/gpu}. On one H100: check 64 s, sampling 187 s, real_step
# 181 s (2026-11-27 21:48-22:01 UTC; sampling_amp ran past its then 240 s), logprobs 28 s, judge 44 s at --repeats 1
# (18:53-19:04 UTC); teacher never run. Each compile of the decode step took ~95 s of those until 22:14 UTC (36 layers
# unrolled; now one layer function, ~7x faster to compile on the CPU).
# Usage (on the lent machines, whose image has another transformers: first install the pinned one's wheel, carried
# as .whl, benchmarks/README.md says how to fetch it):
#   python -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   bash benchmarks/run_gpu.sh
#   PARTS="real_step judge" bash benchmarks/run_gpu.sh     # only these parts
# Each part has its own time limit, so one that fails or hangs does not cost the others.
# The limits of the default parts add up to ~25 minutes, more than a session's GPU time: run the parts in two calls
# on the same warm machine, most telling first. Next (changed since the 21:48 run: the decode step compiled per
# layer, the teacher-forced pass under checkpointing packed, flex attention and fused projections for the static step
# as options): PARTS="check real_step teacher" (limits 570 s: run it with the call's 600 s), then PARTS=sampling
# (logprobs and judge are unchanged since their H100 rows; sampling_amp if time is left).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  date -u; } | tee "$OUT/machine.txt"
part() {  # name, seconds, command...
  local name=$1 limit=$2 t0=$SECONDS; shift 2
  [[ " ${PARTS:-check sampling sampling_amp real_step teacher logprobs judge} " == *" $name "* ]] || return 0
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit $? after $((SECONDS - t0))s" >> "$OUT/$name.log"
  grep -v -E "Loading weights|it/s\]|^\s*$" "$OUT/$name.log" | tail -n 14 | cut -c1-400
}
# the GPU paths against the CPU ones (static decode, packed teacher forcing, the judge's cached prefixes): run first
# check: ~9 compiled graphs of the static step (fp32, bf16 autocast, a new length; flex, flex + fused, each in both);
# each result printed as found
part check 180 python benchmarks/check_gpu.py
# generate, the sampler, and the sampler with flex attention (KVDecoder.flex) and with flex + fused projections
# (KVDecoder.fuse): bench_sampling.py's GPU default; recompiles: any recompile of the step
# (a flex or fused variant that breaks the CUDA context, which no Python exception handler survives, ends the run:
# then generate and the default sampler alone, within the same limit)
part sampling 300 bash -c "TORCH_LOGS=recompiles python benchmarks/bench_sampling.py --device cuda --repeats 2 ||
  python benchmarks/bench_sampling.py --device cuda --repeats 2 --methods generate,sampler"
part real_step 240 python benchmarks/bench_real_step.py
# the update's teacher-forced pass at 3B widths (36 layers x 2048; MLP 3x wide, not 3B's 5.4x), one image x G = 8
part teacher 150 python benchmarks/bench_teacher.py --device cuda --hidden 2048 --layers 36 --image-side 896 \
  --new-tokens 256 --images 1 --repeats 2
part logprobs 80 python benchmarks/bench_logprobs.py --device cuda
part judge 150 python benchmarks/bench_judge.py --device cuda --repeats 2 --captions 32
# the sampler with fp32 weights under bf16 autocast (the trainer's setting): the step reading bf16 copies made once a
# rollout ("sampler") against the step reading the fp32 parameters, cast by autocast inside the step every token
# ("sampler-cast", the code before 2026-11-27 21:00 UTC); never measured
part sampling_amp 420 python benchmarks/bench_sampling.py --device cuda --repeats 2 --amp 1 \
  --methods generate,sampler,sampler-cast
# not in the default PARTS: the kernels of 16 decode steps (the compiled step launched without its graph) against the
# step's time (the timed rounds first; an older profile of whole graphed rollouts ran over 2 minutes unfinished)
part profile 300 python benchmarks/bench_sampling.py --device cuda --repeats 1 --methods generate,sampler --profile "$OUT"
# not in the default PARTS: needs TRL (benchmarks/README.md, "bench_trl.py on a GPU machine"); PARTS=trl runs it
T=/tmp/trl_models
part trl 540 bash -c "python -c 'import trl' && python benchmarks/bench_real_step.py --write-only $T &&
  python benchmarks/bench_trl.py --policy $T/policy --judge $T/judge --data $T/qa.jsonl --images-per-step 4 \
  --max-new-tokens 256 --micro-batch-images 1 --gradient-checkpointing 1 --zero-truncated 0 --rounds 1 --steps 3"
