#!/usr/bin/env bash
# Re-measure every GPU figure with one command, on any machine with a CUDA GPU and the project
# importable (installed, or on PYTHONPATH):
#
#     bench/gpu.sh OUT_DIR
#
# Writes to OUT_DIR: gpu.log (everything printed), pytest_gpu.txt (`pytest -m gpu`), pipelines.json +
# pipelines.png (every pipeline beside its decode-only limit and its PIL baseline, 4 and all DALI
# threads), hw_decoder.json (hardware-decoder share sweep), threads.json (DALI threads sweep: 2-16 per
# GPU, i.e. an 8-GPU node with 16-128 cores), train.json (each method's ResNet-50 seed recipe: the
# trainer's step on real batches vs synthetic, i.e. the data stall, with 4 DALI threads = one GPU's share
# of a 32-core 8-GPU node). The corpus is built from the embedded photos (no download): CORPUS=DIR
# reuses one. SMOKE=1 DEVICE=cpu runs the same plumbing on a CPU with 1 thread and no sweeps (tests use it).
set -uo pipefail
out=${1:?usage: bench/gpu.sh OUT_DIR}
py=${PYTHON:-python3}
device=${DEVICE:-gpu}
cd "$(dirname "$0")/.."
mkdir -p "$out"
exec > >(tee -a "$out/gpu.log") 2>&1
cores=$(nproc)
echo "== bench/gpu.sh $(date -u +%FT%TZ) on $(hostname): $cores cores, device $device, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if [ "$device" = gpu ]; then
  $py -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" || exit 1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
$py -c "import nvidia.dali as d, webdataset; print('DALI', d.__version__)" || { echo "DALI/webdataset missing (see README: GPU machines)"; exit 1; }

smoke=${SMOKE:-0}
if [ "$smoke" = 1 ]; then   # the plumbing only: 1 thread, no sweeps, tiny model
  images=64; per_shard=32; bench=(--smoke); threads=1; train_threads=1; batch=8; train_preset=tiny; arch=()
else
  images=6000; per_shard=1000; bench=(--rounds 5 --batches 12 --warmup 3); threads=4,$cores; train_threads=4
  batch=256; train_preset=800ep_2x224+6x96; arch=(--arch resnet50)
fi
corpus=${CORPUS:-$out/shards}
fail=0
step() { echo; echo "== $*"; }
run() { "$@" || { echo "!! failed ($?): $*"; fail=1; }; }

step "corpus: $images ImageNet-like JPEGs from the embedded photos -> $corpus"
[ -f "$corpus/manifest.json" ] || run $py -m sslkit.shard build "sample:$images" --out "$corpus" --shuffle --seed 0 \
  --max-count $per_shard --workers "$cores" --no-progress

step "pytest -m gpu"
if [ "$device" = gpu ]; then
  run $py -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$out/pytest_gpu.txt"
else
  echo "no GPU: skipped (SMOKE run)" | tee "$out/pytest_gpu.txt"
fi

step "every pipeline vs decode-only and PIL, DALI threads $threads, batch $batch"
run $py bench/throughput.py --data "$corpus" --device "$device" --threads "$threads" --batch-size $batch \
  --pipelines multicrop,jigsaw,colorization,jigclu,eval --mode decode,loader,baseline "${bench[@]}" \
  --json "$out/pipelines.json" --plot "$out/pipelines.png"

if [ "$device" = gpu ]; then
  step "hardware-decoder share sweep (multicrop, jigsaw), 4 threads"
  run $py bench/throughput.py --data "$corpus" --device gpu --threads 4 --batch-size $batch --hw-decoder-load 0,0.65,1.0 \
    --pipelines multicrop,jigsaw --mode decode,loader "${bench[@]}" --json "$out/hw_decoder.json"
fi

if [ "$smoke" != 1 ]; then
  step "DALI threads sweep 2,4,8,16 (one GPU's share of an 8-GPU node with 16-128 cores)"
  run $py bench/throughput.py --data "$corpus" --device "$device" --threads 2,4,8,16 --batch-size $batch \
    --pipelines multicrop,eval --mode decode,loader "${bench[@]}" --json "$out/threads.json"
fi

# The trainer's step on real batches vs one batch on the device (data stall), every method's seed recipe
# on ResNet-50 (the CPU smoke: DeepClusterV2 tiny only).
if [ "$smoke" = 1 ]; then
  recipes=("deepclusterv2 tiny")
else
  recipes=("deepclusterv2 800ep_2x224+6x96" "swav 800ep" "jigsaw rn50_perm2000" "jigclu 200ep"
           "colorization rn50_k10 --train-set method_options.rebalance=false" "supervised student_resnet50")
fi
for r in "${recipes[@]}"; do
  set -- $r
  method=$1; preset=$2; shift 2
  step "trainer step, $method $preset: real loader vs synthetic batch (data stall), $train_threads DALI threads"
  run $py bench/throughput.py --data "$corpus" --device "$device" --threads $train_threads --batch-size $((batch / 2)) \
    --mode train --method $method --train-preset $preset "${arch[@]}" "$@" "${bench[@]}" --json "$out/train-$method.json"
done
# one train.json with every method's record (and few files to carry back)
$py - "$out" <<'EOF'
import glob, json, os, sys
parts = sorted(glob.glob(os.path.join(sys.argv[1], "train-*.json")))
docs = [json.load(open(p)) for p in parts]
if docs:
    merged = dict(docs[0], results=[r for d in docs for r in d["results"]], command=[d["command"] for d in docs])
    json.dump(merged, open(os.path.join(sys.argv[1], "train.json"), "w"), indent=1)
    for p in parts:
        os.remove(p)
EOF

echo
echo "== done (failures: $fail); results in $out: $(ls "$out" | tr '\n' ' ')"
exit $fail
