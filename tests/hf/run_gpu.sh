#!/usr/bin/env bash
# GPU checks of tritonbits.hf, one call: from the repository root on the GPU machine,
#     bash tests/hf/run_gpu.sh 2>&1 | tee hf_gpu.log
# Optional: MODEL=<local folder or hub id of a Llama-architecture model> adds a realistic-size run.
set -euo pipefail
export PYTHONUNBUFFERED=1
python -c "import transformers, peft, accelerate; print('transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"

# all hf tests, including the two GPU cases (4-bit and int8 load + generate on cuda)
python -m pytest -q tests/hf -rs

# the examples on the GPU with the tiny built-in model (nothing downloaded)
python examples/generate_4bit.py --device cuda --dtype bfloat16
python examples/generate_4bit.py --device cuda --dtype bfloat16 --8bit
python examples/qlora_finetune.py --device cuda --dtype bfloat16 --steps 30
python examples/qlora_finetune.py --device cuda --dtype bfloat16 --steps 30 --gradient-checkpointing --paged-adamw-8bit

if [ -n "${MODEL:-}" ]; then
    python examples/generate_4bit.py --model "$MODEL" --device cuda --compute-dtype bfloat16 --max-new-tokens 64
    python examples/qlora_finetune.py --model "$MODEL" --device cuda --steps 50 --batch-size 4 --seq-len 512 \
        --gradient-checkpointing
fi
