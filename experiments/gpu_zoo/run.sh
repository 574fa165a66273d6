#!/usr/bin/env bash
# The zoo trained on one GPU in one call of the device tool (10 minutes at most): ResNet-20,
# ResNet-56 and VGG-16 in three processes sharing the GPU (python -m hbgs.zoo_train), then the
# CUDA latency of each saved file; beside them, the default prune run with trainer=gpu as
# the code stands (only the fine-tunes use the GPU), to measure what that costs there.
#
# It needs, carried into the repository root (both ignored by git):
#   .whl/   wheels the GPU machine lacks: hydra-core, omegaconf, antlr4-python3-runtime, torch-pruning
#   .carry/cifar10.tar.xz   the CIFAR-10 ImageFolder (tar cf - cifar10 | xz: 18.6 MB; the JPEGs are 55 MB)
# Results land in $OUT (at most 8 files of 16 MiB come back, so files over 15 MiB are split into
# parts: join them with `cat name.pt.part-* > name.pt`).
# Env: MINUTES (training budget, default 8), ZOO_ARGS (extra hbgs.zoo_train flags), PRUNE=0 skips the prune run.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_zoo_out}
mkdir -p "$OUT" /tmp/data
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HBGS_CIFAR10_ROOT=/tmp/data/cifar10
tar xJf .carry/cifar10.tar.xz -C /tmp/data || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())"
  nproc; } > /tmp/machine.txt 2>&1
cat /tmp/machine.txt

if [ "${PRUNE:-1}" = 1 ]; then
  (timeout $(( ${MINUTES:-8} * 60 )) nice -n 5 python3 -m hbgs.run trainer=gpu logger=csv threads=6 \
     hydra.run.dir=/tmp/prune_gpu > /tmp/prune_gpu.log 2>&1; echo "exit code $?" >> /tmp/prune_gpu.log) &
fi
python3 -m hbgs.zoo_train --models resnet20 resnet56 vgg16 --minutes "${MINUTES:-8}" --out "$OUT" --threads 2 \
  ${ZOO_ARGS:-} 2>&1 | tee /tmp/zoo_train.log
wait
python3 - "$OUT" > /tmp/latency.json 2>> /tmp/zoo_train.log <<'PY'  # GPU latency of the saved files
import glob, json, sys
from hbgs.accounting import measure_latencies
from hbgs.checkpoint import load_model
models = {p.split("/")[-1][:-3]: load_model(p) for p in sorted(glob.glob(sys.argv[1] + "/*.pt"))}
print(json.dumps(measure_latencies(models, [1, 64, 256], (3, 32, 32), repeats=20, device="cuda"), indent=1))
PY
for f in "$OUT"/*.pt; do  # the device tool returns files of at most 16 MiB
  [ "$(stat -c %s "$f")" -gt $(( 15 * 1024 * 1024 )) ] && split -b 15M "$f" "$f.part-" && rm "$f"
done
tar czf "$OUT/logs.tgz" -C /tmp machine.txt zoo_train.log latency.json prune_gpu.log prune_gpu 2>/dev/null
ls -la "$OUT"
