#!/usr/bin/env bash
# Every GPU row of issue 15 in one run (one H100-class GPU, 16 cores, about 15 minutes, Ray
# installed for the `stage` rows), on VOC-size JPEGs made once under OUT_DIR/cache:
#     bash benchmarks/gpu.sh OUT_DIR
#     python benchmarks/pipeline_time.py --rates OUT_DIR/rates.json     # the projected recipe
# Each benchmark's docstring holds its rows and anchor; OUT_DIR/<name>.txt its output,
# OUT_DIR/rates.json every row and the per-stage rates (benchmarks/gpu_rates.py).
# PYTHON picks the interpreter (default python3); the packages of `pip install -e .[cluster]`
# must be importable.
set -u
out=${1:-/tmp/maskdistill-gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}" MASKDISTILL_CACHE="$out/cache"
nvidia-smi -L | tee "$out/gpu.txt"
bench() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$py" "$@" >"$out/$name.txt" 2>&1
    tail -6 "$out/$name.txt"
}
count=512  # JPEGs: 256 of each VOC shape
"$py" benchmarks/jpeg_folder.py --count $count
seg="benchmarks/train_segmenter.py --device cuda --backbone resnet50 --size 512 --batch 16"
seg="$seg --iters 40 --workers 8 --count $count --stage"
det="benchmarks/train_detector.py --device cuda --size 800 --batch 8 --iters 40 --workers 8"
det="$det --count $count --stage"
bench segmenter_fp32 240 $seg
bench segmenter_bf16 240 $seg --bf16
bench detector_fp32 240 $det
bench detector_bf16 240 $det --bf16
bench mine_bf16 240 benchmarks/mine.py --device cuda --bf16 --count 1024 --batch-size 64 \
    --arch vit_small_patch16_224 --short-side 640 --decode-threads 16 --ray
# the loaders alone on this machine's cores (no GPU): what each stage's data can deliver
bench loaders 240 benchmarks/loaders.py --workers 0 1 2 4 8 --count $count --batch 16
"$py" benchmarks/gpu_rates.py "$out" >/dev/null && echo "rates: $out/rates.json"
# DINO on the GPU (issue 7): s/iteration of ViT-S/8 at batch 256 and where the seed lands
bench pretrain_vits8 300 benchmarks/pretrain_curve.py --device cuda --threads 4 --iters 256 \
    --every 128 --set data.synthetic.train_images=8192 --set data.synthetic.val_images=256 \
    --set backbone.arch=vit_small_patch8_224 --set pretrain.batch_size=256 \
    --set pretrain.epochs=32 --set pretrain.warmup_epochs=4 --set pretrain.lr=0.0005 \
    --set pretrain.out_dim=65536 --set pretrain.hidden_dim=2048 --set pretrain.bottleneck_dim=256 \
    --set pretrain.precision=bf16
