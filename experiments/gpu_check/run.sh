#!/usr/bin/env bash
# The GPU check of issue 10, one call of the device tool (about 8 minutes, under its 10):
#   1. pytest -m gpu: CUDA scores pick what the CPU picks (TF32 off), a prune run with short
#      fine-tunes that stays on the GPU;
#   2. stage=eval trainer=gpu of the zoo ResNet-20 (accuracy on the GPU, CPU and CUDA latency),
#      and `python -m hbgs.bench.rounds` on the CPU and CUDA (seconds per HBGTS round, ResNet-20,
#      ResNet-56, VGG-16: suffix cache and fast path, the fine-tune step; 150 s at most);
#   3. the default prune run (`python -m hbgs.run trainer=gpu logger=csv`: HBGTS-B at the paper's
#      settings, 5 channels a round and a 20-step fine-tune after every round, to -50 % params)
#      for GPU_MINUTES, stopped by SIGTERM at a round boundary, with an nvidia-smi trace; beside
#      it, on the CPU, the same run's first CPU_ROUNDS rounds, for rounds per minute and the
#      layer choices side by side (round 1 is scored before any fine-tune and must agree; later
#      rounds follow fine-tunes whose batches and precision differ, bf16 autocast on the GPU).
#
# Run from the repository root. It needs, carried there (both ignored by git):
#   .whl/                 wheels the GPU host lacks: hydra-core, omegaconf, antlr4-python3-runtime, torch-pruning
#   .carry/cifar10.tar.xz the CIFAR-10 ImageFolder (tar cf - cifar10 | xz)
# Results go to $OUT (8 files): gpu_check.json (the figures), machine.txt, pytest_gpu.log, bench_rounds.txt,
# gpu_history.csv, cpu_history.csv, nvidia_smi.csv, logs.tgz (both prune runs' logs, the eval summary).
#
# `run.sh --cpu`: the dry run on a machine without a GPU: the same steps with trainer=cpu and small
# settings (pytest -m gpu then skips its tests), to check that nothing fails before the GPU parts.
# Env: GPU_MINUTES (default 4), CPU_ROUNDS (5), PRUNE_ARGS (extra overrides for both prune runs).
set -uo pipefail
CPU_ONLY=0; [ "${1:-}" = --cpu ] && CPU_ONLY=1
OUT=${OUT:-/tmp/gpu_check_out}
WORK=/tmp/gpu_check
rm -rf "$WORK"; mkdir -p "$OUT" "$WORK" /tmp/data
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
if ! python3 -c "import hydra, omegaconf, torch_pruning" 2>/dev/null; then  # the GPU host lacks them
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/*.whl failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -f .carry/cifar10.tar.xz ]; then
  [ -d /tmp/data/cifar10/train ] || tar xJf .carry/cifar10.tar.xz -C /tmp/data || exit 1
  export HBGS_CIFAR10_ROOT=/tmp/data/cifar10
fi
{ date -u; command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())"
  echo "cores $(nproc)"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ $CPU_ONLY = 1 ]; then  # small settings: minutes on a 2-core CPU
  TRAINER=trainer=cpu; MINUTES=${GPU_MINUTES:-1}; ROUNDS=${CPU_ROUNDS:-2}; GPU_THREADS=1; CPU_THREADS=1
  SMALL="dataset.limit_train=2000 dataset.limit_test=500 finetune.steps=5 criterion.calib_batch=64 latency.repeats=2"
else
  TRAINER=trainer=gpu; MINUTES=${GPU_MINUTES:-4}; ROUNDS=${CPU_ROUNDS:-5}; GPU_THREADS=4; CPU_THREADS=10; SMALL=""
fi
PRUNE="logger=csv trainer.enable_progress_bar=false $SMALL ${PRUNE_ARGS:-}"

# 1. the GPU tests (2 minutes at most; pytest's wheels, pytest pluggy iniconfig, in .whl/ where the host lacks it)
if python3 -c "import pytest" 2>/dev/null; then
  timeout 180 python3 -m pytest -m gpu tests/test_devices.py -q -rs -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1
  echo "pytest -m gpu: exit $?" >> "$OUT/pytest_gpu.log"
else
  echo "pytest is missing on this host: put its wheels (pytest, pluggy, iniconfig) in .whl/" > "$OUT/pytest_gpu.log"
fi
tail -3 "$OUT/pytest_gpu.log"

# 2. eval on the run's device
timeout 120 python3 -m hbgs.run stage=eval $TRAINER logger=none latency.repeats=5 hydra.run.dir=$WORK/eval \
  > $WORK/eval.log 2>&1; echo "eval: exit $?" | tee -a $WORK/eval.log
if [ $CPU_ONLY = 1 ]; then BENCH="--models resnet20 --calib 64 --devices cpu"; else BENCH="--devices cpu cuda"; fi
timeout 150 python3 -m hbgs.bench.rounds $BENCH --skip full --rounds 2 --threads $CPU_THREADS > "$OUT/bench_rounds.txt" 2>&1
echo "bench.rounds: exit $? (124: cut at 150 s; what it printed is kept)" | tee -a "$OUT/bench_rounds.txt"

# 3. the default prune run on the GPU for MINUTES, its first rounds on the CPU beside it
SMI=""
if [ $CPU_ONLY = 0 ]; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,utilization.memory,memory.used --format=csv -l 1 \
    > "$OUT/nvidia_smi.csv" 2>&1 & SMI=$!
fi
START=$(date +%s)
timeout -s TERM -k 60 $(( MINUTES * 60 )) python3 -m hbgs.run $TRAINER threads=$GPU_THREADS $PRUNE \
  hydra.run.dir=$WORK/prune_gpu > $WORK/prune_gpu.log 2>&1 &
GPU_RUN=$!
timeout -s TERM -k 60 $(( MINUTES * 60 )) python3 -m hbgs.run trainer=cpu threads=$CPU_THREADS $PRUNE \
  stop_after_rounds=$ROUNDS hydra.run.dir=$WORK/prune_cpu > $WORK/prune_cpu.log 2>&1
echo "cpu prune: exit $? (3: stopped after $ROUNDS rounds as asked; 124: at the time limit)" | tee -a $WORK/prune_cpu.log
wait $GPU_RUN
echo "gpu prune: exit $? (124: stopped at the time limit by SIGTERM, at a round boundary; 0: finished)" \
  | tee -a $WORK/prune_gpu.log
echo "both prune runs: $(( $(date +%s) - START )) s"
[ -n "$SMI" ] && kill $SMI

cp $WORK/prune_gpu/history.csv "$OUT/gpu_history.csv" 2>/dev/null
cp $WORK/prune_cpu/history.csv "$OUT/cpu_history.csv" 2>/dev/null
python3 - "$WORK" "$OUT" <<'PY' | tee "$OUT/gpu_check.json"
import csv, json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
def history(name):
    path = work / name / "history.csv"
    return list(csv.DictReader(path.open())) if path.is_file() else []
def rate(rows):
    if not rows:
        return {"rounds": 0}
    seconds = float(rows[-1]["wall_seconds"])  # from the loop's start: scoring, fine-tunes, reports
    return {"rounds": len(rows), "loop_seconds": seconds, "rounds_per_minute": 60 * len(rows) / seconds,
            "score_seconds_per_round": sum(float(r["score_seconds"]) for r in rows) / len(rows),
            "params_reduction": float(rows[-1]["params_reduction"]), "calib_acc": float(rows[-1]["calib_acc"])}
gpu, cpu = history("prune_gpu"), history("prune_cpu")
pairs = list(zip(gpu, cpu))
result = {"gpu": rate(gpu), "cpu": rate(cpu),
          "choices": [{"round": i + 1, "gpu": f"{g['layer']}:{g['side']}", "cpu": f"{c['layer']}:{c['side']}",
                       "same": (g["layer"], g["side"]) == (c["layer"], c["side"]),
                       "score_gpu": float(g["score"]), "score_cpu": float(c["score"])} for i, (g, c) in enumerate(pairs)],
          "first_round_same": bool(pairs) and (pairs[0][0]["layer"], pairs[0][0]["side"]) == (pairs[0][1]["layer"], pairs[0][1]["side"])}
if result["gpu"].get("rounds") and result["cpu"].get("rounds"):
    result["speedup_rounds_per_minute"] = result["gpu"]["rounds_per_minute"] / result["cpu"]["rounds_per_minute"]
summary = work / "eval" / "summary.json"
if summary.is_file():
    data = json.loads(summary.read_text())
    result["eval"] = {k: data.get(k) for k in ("device", "test_acc", "latency")}
print(json.dumps(result, indent=1))
PY
tar czf "$OUT/logs.tgz" -C $WORK --exclude='*.pt' --exclude='resume' . 2>/dev/null
ls -la "$OUT"
