#!/usr/bin/env bash
# The GPU check (about 8 minutes on one CUDA GPU; the timeouts cap every step). Needs torch + torchvision,
# numpy and PIL only; the study of step 5 runs only where Ray and MLflow import.
#   1 model throughput against torchvision, bf16 autocast on/off x channels_last on/off
#   2 the data path (batched vs per-sample, per CPU core) against the models' GPU training rates
#   3 trials packed on the GPU, with torch processes (benchmarks/gpu_packing.py):
#     (a) 1 alone vs 4 at 0.25, (b) data-wait share, (c) bf16+channels_last vs fp32, (e) the memory cap
#   4 (d) a 4-trial --quick study at 0.25 GPU per trial, when Ray is importable
# then a summary table of the JSON that THIS run's steps wrote (each step first deletes its JSON, so a failed step
# shows as FAIL, never with an earlier run's figures); the exit status is 1 when a step fails or a goal is missed.
#
#     bash benchmarks/gpu_check.sh            # from the repository root or anywhere; PY=... picks the Python
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${VISION_TUNE_BENCH_OUT:-benchmarks/out}  # where the benchmarks write their JSON (benchmarks/common.py)
export VISION_TUNE_BENCH_OUT="$OUT"
TMP=$(mktemp -d -t vt-gpu-XXXX)
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STATUS=0

"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False)"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
EOF

echo "== 1/4 model throughput (bf16 on/off x channels_last on/off)"
rm -f "$OUT/model_throughput.json"
timeout 240 "$PY" benchmarks/model_throughput.py --device cuda --amp both --channels-last both \
    --batch-scale 8 --steps 5 --rounds 8 > "$TMP/models.txt" 2>&1 || { tail -n 40 "$TMP/models.txt"; STATUS=1; }
tail -n 25 "$TMP/models.txt"

echo "== 2/4 data path: batched vs per-sample per CPU core, against the models on the GPU"
rm -f "$OUT/data_throughput.json"
timeout 240 "$PY" benchmarks/data_throughput.py --model-device cuda --rounds 4 > "$TMP/data.txt" 2>&1 \
    || { tail -n 40 "$TMP/data.txt"; STATUS=1; }
tail -n 8 "$TMP/data.txt"

echo "== 3/4 packed trials: alone vs 4 x 0.25, data wait, bf16+channels_last vs fp32, the memory cap"
rm -f "$OUT/gpu_packing.json"
timeout 420 "$PY" benchmarks/gpu_packing.py > "$TMP/packing.txt" 2>&1 || { STATUS=1; }
tail -n 30 "$TMP/packing.txt"

STUDY=skipped
if "$PY" -c "import ray, mlflow" 2>/dev/null; then
    echo "== 4/4 (d) seg_concat --quick, 2 variants x 2 samples = 4 trials at 0.25 GPU each"
    # which processes hold GPU memory while the study runs: the trials must be among them
    ( while true; do nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader >> "$TMP/smi.txt" \
        2>/dev/null || true; sleep 1; done ) &
    SAMPLER=$!
    trap 'kill $SAMPLER 2>/dev/null || true' EXIT
    if timeout 240 "$PY" studies/seg_concat.py --quick --num-samples 2 --gpus-per-trial 0.25 \
        --storage "$TMP/results" --mlflow-uri "sqlite:///$TMP/mlflow.db" > "$TMP/study.txt" 2>&1; then
        STUDY=ran
    else
        tail -n 60 "$TMP/study.txt"; STUDY=failed; STATUS=1
    fi
    kill $SAMPLER 2>/dev/null || true
else
    echo "== 4/4 (d) skipped: Ray/MLflow not importable here (pip install -e . for the study)"
fi

"$PY" - "$TMP" "$STUDY" "$OUT" <<'EOF' || STATUS=1
import json, sys
from pathlib import Path

tmp, study, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
rows = []  # (check, figure, ok)

def load(name):
    """This run's figures: each step deleted its JSON before it ran, so a missing one is a failed step."""
    path = out / f"{name}.json"
    if not path.exists():
        rows.append((f"{name}.py", "no JSON from this run: the step failed (its output is above)", False))
        return None
    return json.loads(path.read_text())

models = load("model_throughput")
if models:
    for amp in (False, True):
        for last in (False, True):
            subset = [r for r in models["rows"] if r["amp"] == amp and r["channels_last"] == last and "ratio" in r]
            if subset:
                worst = min(subset, key=lambda r: r["ratio"])
                rows.append((f"models amp={'on' if amp else 'off'} channels_last={'on' if last else 'off'}",
                             f"lowest ours/torchvision {worst['ratio']:.2f} ({worst['model']})", worst["ratio"] >= 0.95))
data = load("data_throughput")
if data:
    for r in data["rows"]:
        rows.append((f"data path {r['data']} vs per-sample", f"{r['speedup']:.2f}x; one core feeds {r['batched_over_model']:.2f}x "
                     f"{r['model']}'s {r['model_img_s']:.3g} img/s", r["speedup"] >= 5))
packing = load("gpu_packing")
if packing:
    for r in packing["rows"]:
        if "alone_img_s" in r:
            rows.append((f"(a) {r['model']} alone / {r['packed']} packed", f"{r['alone_img_s']:.0f} / {r['packed_img_s']:.0f} img/s "
                         f"({r['packed_over_alone']:.2f}x)", None))
            rows.append((f"(b) {r['model']} data wait alone / packed", f"{r['wait_alone']:.1%} / {r['wait_packed']:.1%}", None))
            rows.append((f"(c) {r['model']} bf16+channels_last / fp32", f"{r['bf16_cl_over_fp32']:.2f}x", None))
        else:
            rows.append(("(e) memory cap", f"hog peak {r['hog_peak_gib']:.1f} of {r['cap_gib']:.1f} GiB; {r['hog_error']}", None))
    rows += [(label, "", ok) for label, ok in packing["checks"]]
if study == "ran":
    import csv
    with open(tmp / "results" / "seg_concat" / "trials.csv") as f:
        trials = list(csv.DictReader(f))
    ok_count = sum(t["status"] == "OK" for t in trials)
    rows.append(("(d) study, 4 trials at 0.25 GPU", f"{ok_count}/{len(trials)} OK", len(trials) == 4 and ok_count == 4))
    smi = tmp / "smi.txt"
    gpu_pids = {line.split(",")[0].strip() for line in smi.read_text().splitlines()} if smi.exists() else set()
    trial_pids = {str(json.loads(r.read_text().splitlines()[0])["pid"])
                  for r in (tmp / "results" / "seg_concat").glob("*/result.json")}
    # (in a container nvidia-smi may print host pids: then at least as many GPU processes as trials must show)
    rows.append(("(d) trial processes seen on the GPU", f"{len(trial_pids & gpu_pids)}/{len(trial_pids)} matched, "
                 f"{len(gpu_pids)} GPU process(es)", bool(trial_pids) and (trial_pids <= gpu_pids or len(gpu_pids) >= len(trial_pids))))
else:
    rows.append(("(d) study, 4 trials at 0.25 GPU", study, None if study == "skipped" else False))
width = max(len(r[0]) for r in rows)
print()
for check, figure, ok in rows:
    print(f"{'-' if ok is None else 'ok' if ok else 'FAIL':4} {check.ljust(width)}  {figure}")
sys.exit(0 if all(ok is not False for _, _, ok in rows) else 1)
EOF
rm -rf "$TMP"
exit $STATUS
