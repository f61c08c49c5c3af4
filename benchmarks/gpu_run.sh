#!/usr/bin/env bash
# One GPU session: environment, diagnostics, kernel checks at real sizes, GPU tests, benchmarks.
# Run on the GPU machine from the repository root, with bitsandbytes' wheel in .whl/ (see
# benchmarks/README.md). Everything is written under ${OUT:-out/gpu}; a short summary prints last.
set -u
out="${OUT:-out/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
stage="${STAGES:-env,diag,kernels,tests,bench}"
has() { [[ ",$stage," == *",$1,"* ]]; }

if has env; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/env.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$out/env.txt"
  python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1 | tee -a "$out/env.txt"
fi
if has diag; then
  timeout 120 python3 -m tritonbits > "$out/diagnostics.txt" 2>&1; echo "diagnostics exit $?" >> "$out/diagnostics.txt"
  timeout 120 python3 -m tritonbits --json > "$out/diagnostics.json" 2>"$out/diagnostics.err"
fi
if has kernels; then
  timeout 300 python3 tests/gpu/check_quant_kernels.py ${KERNEL_ARGS:-} > "$out/check_quant_kernels.jsonl" 2>&1; echo "check_quant_kernels exit $?" >> "$out/check_quant_kernels.jsonl"
  for script in tests/gpu/check_int8_matmul.py tests/gpu/check_optim_kernels.py tests/optim/gpu_check.py; do
    [ -f "$script" ] || continue
    name=$(basename "$script" .py)
    timeout 240 python3 "$script" > "$out/$name.txt" 2>&1; echo "$name exit $?" >> "$out/$name.txt"
  done
fi
if has tests; then
  timeout ${TEST_TIMEOUT:-600} python3 -m pytest -q -p no:cacheprovider ${TEST_PATHS:-tests} > "$out/pytest.txt" 2>&1; echo "pytest exit $?" >> "$out/pytest.txt"
fi
if has bench; then
  timeout ${BENCH_TIMEOUT:-600} python3 benchmarks/run.py ${BENCH_ARGS:-} --out "$out" > "$out/bench.txt" 2>&1; echo "bench exit $?" >> "$out/bench.txt"
fi

echo "===== summary"
cat "$out/env.txt" 2>/dev/null
tail -n 25 "$out/diagnostics.txt" 2>/dev/null
grep -h '"identical": false\|exit' "$out"/check_*.jsonl 2>/dev/null | head -20
grep -h 'fraction_of_copy' "$out"/check_quant_kernels.jsonl 2>/dev/null | head -30
for f in "$out"/check_int8_matmul.txt "$out"/check_optim_kernels.txt "$out"/gpu_check.txt; do [ -f "$f" ] && tail -n 25 "$f"; done
tail -n 30 "$out/pytest.txt" 2>/dev/null
tail -n 60 "$out/bench.txt" 2>/dev/null
