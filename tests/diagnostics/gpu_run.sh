#!/usr/bin/env bash
# Issue 3 on a GPU machine: run from the repository root with `bash tests/diagnostics/gpu_run.sh [OUTDIR]`.
# Writes the text and JSON reports and the test log to OUTDIR (default ./out/diagnostics) and prints a summary.
set -u
out="${1:-out/diagnostics}"
mkdir -p "$out"
py="${PYTHON:-python}"

echo "== 1. python -m tritonbits (expect exit 0, a cuda:N line per GPU, Triton PASS per GPU)"
$py -m tritonbits | tee "$out/report.txt"; echo "exit code: ${PIPESTATUS[0]}" | tee -a "$out/report.txt"

echo "== 2. python -m tritonbits --json (expect one JSON object)"
$py -m tritonbits --json > "$out/report.json"; echo "exit code: $?"
$py -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['verdict']); [print(c['status'], c['device'], c['name'], c['seconds'], c['error'] or '') for c in r['triton']['compile'] + r['checks']]" "$out/report.json"

echo "== 3. GPUs hidden: CUDA_VISIBLE_DEVICES='' (expect a warning naming CUDA_VISIBLE_DEVICES, exit 0)"
CUDA_VISIBLE_DEVICES= $py -m tritonbits --no-checks > "$out/hidden.txt"; echo "exit code: $?"
grep -n "CUDA_VISIBLE_DEVICES\|Verdict" "$out/hidden.txt"

echo "== 4. second run, warm Triton cache (the times of the cuda:N lines without compilation)"
$py -m tritonbits | grep -E "^  (PASS|FAIL|SKIP)" | tee "$out/warm.txt"

echo "== 5. tests (GPU-only ones run here; expect no failures)"
$py -m pytest -q tests/test_device.py tests/diagnostics 2>&1 | tee "$out/pytest.txt" | tail -15
