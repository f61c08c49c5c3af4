#!/usr/bin/env bash
# Issue 9 on a machine with 2 GPUs (H200 x2): run from the repository root with
#   bash tests/distributed/gpu_run.sh [OUTDIR]
# Writes the test log and the example's logs (loss, tokens/s) to OUTDIR (default ./out/distributed).
set -u
out="${1:-out/distributed}"
mkdir -p "$out"
py="${PYTHON:-python}"
torchrun="$py -m torch.distributed.run"

{ nvidia-smi -L; $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"; } | tee "$out/env.txt"

echo "== 1. tests: gloo/CPU and NCCL/2 GPUs (expect no failures, no skips of the cuda cases)"
$py -m pytest -q -rs tests/distributed 2>&1 | tee "$out/pytest.txt" | tail -15

echo "== 2. example, default size: FSDP2 and DDP on 2 GPUs, then 1 GPU for the scaling ratio"
for mode in fsdp ddp; do
  $torchrun --nproc_per_node 2 examples/qlora_distributed.py --mode $mode --steps 100 --log-every 20 \
    --save "$out/ckpt_$mode" 2>&1 | grep -v "^W" | tee "$out/example_${mode}_2gpu.txt"
done
CUDA_VISIBLE_DEVICES=0 $py examples/qlora_distributed.py --mode none --steps 100 --log-every 20 2>&1 | tee "$out/example_1gpu.txt"

echo "== 3. example, larger model (dim 2048, 8 blocks, 4096 tokens per GPU per step)"
big="--dim 2048 --layers 8 --vocab 8192 --seq-len 512 --batch-size 8 --steps 60 --log-every 10"
for mode in fsdp ddp; do
  $torchrun --nproc_per_node 2 examples/qlora_distributed.py --mode $mode $big 2>&1 | grep -v "^W" \
    | tee "$out/example_big_${mode}_2gpu.txt"
done
CUDA_VISIBLE_DEVICES=0 $py examples/qlora_distributed.py --mode none $big 2>&1 | tee "$out/example_big_1gpu.txt"
$torchrun --nproc_per_node 2 examples/qlora_distributed.py --mode fsdp --quant-storage fp32 $big 2>&1 | grep -v "^W" \
  | tee "$out/example_big_fsdp_fp32_2gpu.txt"

echo "== summary: last logged line of each run (loss and tokens/s over all GPUs)"
for f in "$out"/example_*.txt; do printf '%-40s %s\n' "$(basename "$f")" "$(grep '^step' "$f" | tail -1)"; done
