#!/usr/bin/env bash
# Every GPU figure of the closing notes in one run (one H100, about 9 minutes, no Ray needed):
#     bash benchmarks/gpu.sh OUT_DIR
# Each benchmark's docstring holds its anchor. Python packages the machine lacks (pydantic,
# pycocotools, faiss) must be importable first.
set -u
out=${1:-/tmp/maskdistill-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi -L | tee "$out/gpu.txt"
bench() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" python3 "$@" >"$out/$name.txt" 2>&1
    tail -8 "$out/$name.txt"
}
seg="benchmarks/train_segmenter.py --device cuda --backbone resnet50 --size 512 --batch 16"
det="benchmarks/train_detector.py --device cuda --size 800 --batch 8 --iters 40"
bench segmenter_fp32 120 $seg --iters 40 --threads 12
bench segmenter_bf16 120 $seg --iters 40 --threads 12 --bf16
bench detector_fp32 120 $det
bench detector_bf16 120 $det --bf16
bench mine_bf16 150 benchmarks/mine.py --device cuda --bf16 --images 1024 --batch-size 64 \
    --size 480 640 --short-side 640 --decode-threads 16
# DINO on the GPU (issue 7): s/iteration of ViT-S/8 at batch 256 and where the seed lands
bench pretrain_vits8 300 benchmarks/pretrain_curve.py --device cuda --threads 4 --iters 256 \
    --every 128 --set data.synthetic.train_images=8192 --set data.synthetic.val_images=256 \
    --set backbone.arch=vit_small_patch8_224 --set pretrain.batch_size=256 \
    --set pretrain.epochs=32 --set pretrain.warmup_epochs=4 --set pretrain.lr=0.0005 \
    --set pretrain.out_dim=65536 --set pretrain.hidden_dim=2048 --set pretrain.bottleneck_dim=256 \
    --set pretrain.precision=bf16
