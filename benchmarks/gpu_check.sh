#!/usr/bin/env bash
# The GPU check (about 4-6 minutes on one CUDA GPU; the timeouts cap it under 10): model throughput
# against torchvision with bf16 autocast on/off and channels_last on/off, the VOC loader against the U-Net
# on the GPU, then a 4-trial --quick study with 0.25 GPU per trial (4 trials share the GPU). A table last.
#
#     bash benchmarks/gpu_check.sh            # from the repository root or anywhere; PY=... picks the Python
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/out
TMP=$(mktemp -d -t vt-gpu-XXXX)
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False)"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
EOF

echo "== 1/3 model throughput (bf16 on/off x channels_last on/off)"
timeout 240 "$PY" benchmarks/model_throughput.py --device cuda --amp both --channels-last both \
    --batch-scale 8 --steps 5 --rounds 8 > "$TMP/models.txt" 2>&1 || { tail -n 40 "$TMP/models.txt"; exit 1; }
tail -n 40 "$TMP/models.txt"

echo "== 2/3 VOC loader vs U-Net training steps on the GPU (256 px, batch 32)"
timeout 120 "$PY" benchmarks/data_throughput.py --device cuda --batch-size 32 --images 192 --batches 4 \
    --workers 0 1 2 4 > "$TMP/data.txt" 2>&1 || { tail -n 40 "$TMP/data.txt"; exit 1; }
tail -n 12 "$TMP/data.txt"

echo "== 3/3 seg_concat --quick, 2 variants x 2 samples = 4 trials at 0.25 GPU each"
# which processes hold GPU memory while the study runs: the trials must be among them
( while true; do nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader >> "$TMP/smi.txt" 2>/dev/null \
    || true; sleep 1; done ) &
SAMPLER=$!
trap 'kill $SAMPLER 2>/dev/null || true' EXIT
timeout 210 "$PY" studies/seg_concat.py --quick --num-samples 2 --gpus-per-trial 0.25 \
    --storage "$TMP/results" --mlflow-uri "sqlite:///$TMP/mlflow.db" > "$TMP/study.txt" 2>&1 \
    || { tail -n 60 "$TMP/study.txt"; exit 1; }
kill $SAMPLER 2>/dev/null || true

"$PY" - "$TMP" <<'EOF'
import json, sys
from pathlib import Path

import pandas as pd

tmp, out = Path(sys.argv[1]), Path("benchmarks/out")
rows = []
models = json.loads((out / "model_throughput.json").read_text())["rows"]
for amp in (False, True):
    for last in (False, True):
        subset = [r for r in models if r["amp"] == amp and r["channels_last"] == last and "ratio" in r]
        worst = min(subset, key=lambda r: r["ratio"])
        rows.append({"check": f"models amp={'on' if amp else 'off'} channels_last={'on' if last else 'off'}",
                     "figure": f"lowest ours/torchvision {worst['ratio']:.2f} ({worst['model']})",
                     "ok": worst["ratio"] >= 0.95})
data = json.loads((out / "data_throughput.json").read_text())
rows.append({"check": "loader workers per GPU trial", "figure": f"{data['workers_needed']} "
             f"(U-Net {data['unet_img_s']:.0f} img/s)", "ok": True})
trials = pd.read_csv(tmp / "results" / "seg_concat" / "trials.csv")
rows.append({"check": "study, 4 trials at 0.25 GPU", "figure": f"{(trials['status'] == 'OK').sum()}/{len(trials)} OK",
             "ok": len(trials) == 4 and bool((trials["status"] == "OK").all())})
# each trial's pid (Tune's result field) among the processes nvidia-smi saw holding GPU memory
smi = tmp / "smi.txt"
gpu_pids = {line.split(",")[0].strip() for line in smi.read_text().splitlines()} if smi.exists() else set()
trial_pids = {str(json.loads(r.read_text().splitlines()[0])["pid"])
              for r in (tmp / "results" / "seg_concat").glob("*/result.json")}
# (in a container nvidia-smi may print host pids: then at least as many GPU processes as trials must show)
rows.append({"check": "trial processes seen on the GPU", "figure": f"{len(trial_pids & gpu_pids)}/{len(trial_pids)} "
             f"matched, {len(gpu_pids)} GPU process(es)" + ("" if smi.exists() else " (no nvidia-smi)"),
             "ok": bool(trial_pids) and (trial_pids <= gpu_pids or len(gpu_pids) >= len(trial_pids))})
print()
print(pd.DataFrame(rows).to_string(index=False))
sys.exit(0 if all(r["ok"] for r in rows) else 1)
EOF
