"""Shared by the benchmarks: where JSON goes, a plain-text table, and the machine they ran on."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

# VISION_TUNE_BENCH_OUT sends the JSON elsewhere (the tests' smoke runs write to a temporary folder)
OUT_DIR = Path(os.environ.get("VISION_TUNE_BENCH_OUT") or Path(__file__).resolve().parent / "out")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere without installing
    sys.path.insert(0, str(ROOT))


def machine() -> dict:
    """What the figures were measured on: cores, load when the run started, library versions."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0], "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else None, "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(name: str, payload: dict, smoke: bool = False) -> Path:
    """benchmarks/out/<name>.json, with the machine description added; a --smoke run writes <name>_smoke.json,
    so that checking the code path never overwrites a measurement."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}{'_smoke' if smoke else ''}.json"
    path.write_text(json.dumps({"benchmark": name, "smoke": smoke, "machine": machine(), **payload}, indent=2,
                               default=str))
    return path


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as a fixed-width text table (floats to 3 significant digits)."""
    columns = columns or list(rows[0])
    cells = [[_fmt(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(row[i]) for row in cells)) for i, col in enumerate(columns)]
    lines = ["  ".join(col.rjust(w) for col, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
