#!/usr/bin/env bash
# GPU correctness and speed for issue #7, made to run as one or two calls of the device tool
# (its machine has torch, Triton, typer, rich, safetensors, pillow, pyyaml and pytest, but no
# diffusers and no internet). Prepare once, here, in the repo root (.whl/ and data/ are git-ignored):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
#   mkdir -p data/MNIST/raw && cp ../shared/datasets/MNIST/raw/*.gz data/MNIST/raw/
#   mkdir -p data/CIFAR-10-images && cp ../shared/datasets/CIFAR-10-images/cifar10-jpeg.tar.gz data/CIFAR-10-images/
#
# then run with carry [".whl", "data"] and timeout_s 600:
#
#   bash benchmarks/gpu_check.sh correctness   # ~5 min on an H200: train (bf16 + compile), eval, sample, CUDA tests
#   bash benchmarks/gpu_check.sh speed         # ~8 min on an H200: train_throughput and sample_throughput
#   bash benchmarks/gpu_check.sh cifar         # ~8 min (not yet run): the headline CIFAR-10 command on the GPU's
#                                              # default preset: images/s, 100 epochs projected, a grid, classifier scores
#
# Everything it prints also lands in $OUT (the device tool brings that folder back).
set -uo pipefail
part=${1:-all}
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
rm -rf /tmp/runs  # a rerun on a warm machine starts over instead of finding the last run
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=src:/tmp/site
fi
diffcli="python3 -m diffcli"  # a variable, not a function: `timeout` runs programs
step() { echo "== $* ($(date +%T))" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'bf16', torch.cuda.is_bf16_supported())" | tee -a "$OUT/gpu.txt"

if [[ $part == correctness || $part == all ]]; then
    step "train MNIST on CUDA: bf16 autocast, torch.compile on by default, batch 256"
    timeout 200 $diffcli train --data mnist --data-root data --max-steps 1500 --batch-size 256 --sample-every 1500 \
        --out /tmp/runs/mnist 2>&1 | tee "$OUT/train.log" | tail -5
    cp /tmp/runs/mnist/samples/latest.png "$OUT/mnist_grid.png" 2>/dev/null
    step "resume on CUDA for 100 more steps"
    timeout 120 $diffcli train --out /tmp/runs/mnist --resume --max-steps 1600 2>&1 | tail -3
    step "reference classifier, then scores of the CUDA-trained model"
    timeout 120 $diffcli classifier train --data mnist --data-root data --epochs 1 --out /tmp/runs/clf.safetensors 2>&1 | tail -2
    timeout 180 $diffcli eval --ckpt /tmp/runs/mnist/model.safetensors --classifier /tmp/runs/clf.safetensors --n 50 \
        --no-memorisation --json > "$OUT/eval.json"; head -c 600 "$OUT/eval.json"; echo
    step "sample eager and compiled: the same seeds must give (nearly) the same pictures"
    timeout 60 $diffcli sample --ckpt /tmp/runs/mnist/model.safetensors --n 16 --out "$OUT/mnist_sample.png" 2>&1 | tail -2
    timeout 180 $diffcli sample --ckpt /tmp/runs/mnist/model.safetensors --n 16 --compile --out "$OUT/mnist_sample_compiled.png" 2>&1 | tail -2
    # (not test_compile.py: it compares compiled and eager weights at CPU tolerances)
    step "the suite's CUDA-relevant tests with the GPU visible"
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_training.py tests/test_samplers.py tests/test_cli.py \
        2>&1 | tail -5 | tee -a "$OUT/summary.txt"
fi

if [[ $part == speed || $part == all ]]; then
    step "training throughput, batch 256, compile as diffcli train does (on CUDA)"
    timeout 380 python3 benchmarks/train_throughput.py --presets small,base --rounds 1 --steps 30 2>&1 | tee "$OUT/train_throughput.txt"
    step "sampling throughput, DDIM 50, batch 256, with a compiled row"
    timeout 180 python3 benchmarks/sample_throughput.py --rounds 1 --compile 2>&1 | tee "$OUT/sample_throughput.txt"
fi
if [[ $part == cifar ]]; then
    archive=data/CIFAR-10-images/cifar10-jpeg.tar.gz
    export DIFFCLI_DATA_ROOT=/tmp/diffcli-data  # the decoded-image cache
    step "CIFAR-10 reference classifier (the ResNet, 16 epochs by default)"
    timeout 200 $diffcli classifier train --data $archive --out /tmp/runs/cifar-clf.safetensors 2>&1 | grep -A12 "test accuracy"
    step "the headline command, on the default preset (auto: base on CUDA), 3 epochs"
    timeout 330 $diffcli train --data $archive --epochs 3 --sample-every 100000 --out /tmp/runs/cifar 2>&1 \
        | tee "$OUT/cifar_train.log" | grep -E "device:|loaded|done"
    grep -o '"images_per_s": [0-9.]*' /tmp/runs/cifar/metrics.jsonl | tail -5 | awk '{s += $2; n++} END {
        if (n) printf "images/s %.0f (last %d logs); 100 epochs of 50,000 projected: %.1f min\n", s / n, n, 5e6 / (s / n) / 60 }' \
        | tee -a "$OUT/summary.txt"
    cp /tmp/runs/cifar/samples/latest.png "$OUT/cifar_grid.png" 2>/dev/null
    timeout 60 $diffcli sample --ckpt /tmp/runs/cifar/model.safetensors --label all --n 8 --out "$OUT/cifar_sample.png" 2>&1 | tail -1
    timeout 120 $diffcli eval --ckpt /tmp/runs/cifar/model.safetensors --classifier /tmp/runs/cifar-clf.safetensors --n 50 \
        --no-memorisation --json > "$OUT/cifar_eval.json"; head -c 800 "$OUT/cifar_eval.json"; echo
fi
step "done"
