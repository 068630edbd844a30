"""Every benchmark's --smoke runs its real code path end to end (a process each, its JSON in a temporary folder),
and no benchmark imports a study script or reaches into a private name of the project, Ray or MLflow."""
from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
PACKAGES = {"vision_models", "trainables", "studies", "analysis", "ray", "mlflow"}  # no private names of these


def smoke(name: str, out: Path, *flags: str, timeout: float) -> tuple[dict, str]:
    """``python benchmarks/<name>.py --smoke`` from the repository root; (its JSON, its last line of output)."""
    done = subprocess.run([sys.executable, f"benchmarks/{name}.py", "--smoke", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "VISION_TUNE_BENCH_OUT": str(out)})
    assert done.returncode == 0, f"{name} --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    # the smoke's JSON only, under its own name: a measurement in benchmarks/out is never overwritten
    assert sorted(p.name for p in out.iterdir()) == [f"{name}_smoke.json"]
    result = json.loads((out / f"{name}_smoke.json").read_text())
    assert result["benchmark"] == name and result["smoke"] is True
    return result, done.stdout.strip().splitlines()[-1]


def positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def last_number(line: str) -> float:
    return float(re.findall(r"[-+]?\d+\.\d+", line)[-1])


def test_model_throughput_smoke(tmp_path):
    result, last = smoke("model_throughput", tmp_path, timeout=180)
    rows = {row["model"]: row for row in result["rows"]}
    assert set(rows) == {"vgg16", "resnet18", "conv_vae", "unet_resnet50 encoder", "unet_resnet50",
                         "segnet_vgg16 encoder", "segnet_vgg16"}
    assert all(positive(row["ours_img_s"], row["ours_mem_mib"]) for row in rows.values())
    paired = [row for row in rows.values() if row["reference"] != "-"]
    assert len(paired) == 4 and all(positive(row["ref_img_s"], row["ratio"]) for row in paired)
    assert last.startswith("lowest ratio ours/reference:")
    assert last_number(last) == pytest.approx(min(row["ratio"] for row in paired), abs=1e-3)


def test_data_throughput_smoke(tmp_path):
    result, last = smoke("data_throughput", tmp_path, timeout=120)
    rows = {row["data"]: row for row in result["rows"]}
    assert set(rows) == {"cifar10", "mnist", "voc"}
    for row in rows.values():
        assert positive(row["per_sample_img_s"], row["batched_img_s"], row["model_img_s"])
        assert row["speedup"] == pytest.approx(row["batched_img_s"] / row["per_sample_img_s"])
    assert last.startswith("data path speedup, slowest data set:")
    assert last_number(last) == pytest.approx(result["slowest_speedup"], abs=0.01)


def test_gpu_packing_smoke(tmp_path):
    result, last = smoke("gpu_packing", tmp_path, timeout=300)
    rows = {row["model"]: row for row in result["rows"]}
    assert set(rows) == {"resnet18", "unet_resnet50"}  # no cap check: that one needs CUDA
    for row in rows.values():
        assert row["packed"] == 2
        assert positive(row["alone_img_s"], row["packed_img_s"], row["fp32_img_s"])
        assert 0 <= row["wait_alone"] <= 1 and 0 <= row["wait_packed"] <= 1
    labels = [label for label, _ in result["checks"]]
    assert labels == ["(a) resnet18 packed >= 1.5x alone", "(b) resnet18 data wait <= 10% (alone, packed)",
                      "(b) unet_resnet50 data wait <= 10% (alone, packed)"]
    met = sum(ok for _, ok in result["checks"])
    assert last == f"goals met: {met} of 3 (smoke: not enforced)"


@pytest.mark.slow
def test_fidelity_smoke(tmp_path):
    from analysis.finding import CONTRADICTED, NOT_SIGNIFICANT, SUPPORTED, UNTESTABLE

    # one study (the code path is the same for the three): the script in its own process, its finding.json read back
    result, last = smoke("fidelity", tmp_path, "--only", "vae_lr", timeout=300)
    (row,) = result["rows"]
    assert row["study"] == "vae_lr" and row["data"] == "mnist5k"
    assert row["trials"] == row["ok"] == 10 and row["n"] == 2  # 5 learning rates x 2 seeds, all finished
    assert row["verdict"] in (SUPPORTED, CONTRADICTED, NOT_SIGNIFICANT, UNTESTABLE)
    assert row["claim"].startswith("the optimal learning rate is 0.0005") and row["measured"]
    # every trial's curve was read (2 epochs each) and judged: 2 epochs are too few to tell a plateau
    assert [c["epochs"] for c in row["checks"]] == [2] * 10
    assert row["converged"] == 0 and len(row["not_converged"]) == 5 and row["reached"] == "-"
    assert row["criterion"].startswith("val/loss within 2% of its plateau")
    assert set(result["not_run"]) == {"vae_losses", "seg_optimizers, seg_concat, seg_class_weights, segnet_optimizers"}
    assert last == f"findings supported: {result['supported']} of 1 (converged: 0 of 10 trials)"


def test_fidelity_convergence_criteria():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from fidelity import Convergence
    finally:
        sys.path.remove(str(BENCHMARKS))
    # the VAE pilot at lr 5e-4 (val/loss per epoch): epochs 26-30 gain 0.8% on the best before, epochs 21-25 3.2%
    curve = [273.0, 248.9, 230.2, 197.1, 170.1, 155.7, 146.3, 138.8, 133.3, 130.3, 128.3, 124.4, 122.7, 119.9, 118.8,
             116.8, 116.1, 113.9, 114.1, 113.2, 112.9, 112.2, 111.3, 111.3, 109.7, 108.9, 109.0, 109.8, 108.8, 109.7]
    plateau = Convergence("val/loss", plateau=0.02)
    assert plateau.met(curve) and plateau.reached(curve) == pytest.approx((109.7 - 108.8) / 108.8)
    assert not plateau.met(curve[:25]) and plateau.reached(curve[:25]) == pytest.approx((113.2 - 109.7) / 109.7)
    assert plateau.first_epoch(curve) == 30  # the first budget whose last 5 epochs gained <= 2%
    assert not plateau.met(curve[:5]) and math.isnan(plateau.reached(curve[:5]))  # too short to tell
    assert plateau.met([100.0] * 6)  # flat from the start: converged
    floor = Convergence("val/accuracy", floor=0.95)
    assert floor.met([0.3, 0.96]) and not floor.met([0.97, 0.94]) and floor.first_epoch([0.5, 0.95, 0.9]) == 2
    assert floor.first_epoch([0.5]) is None


@pytest.mark.slow
def test_asha_savings_smoke(tmp_path):
    result, last = smoke("asha_savings", tmp_path, timeout=300)
    studies = result["studies"]
    assert {row["scheduler"] for row in result["rows"]} == {"asha", "fifo"}
    assert all(len(studies[s]["trials"]) == 2 for s in ("asha", "fifo"))
    assert studies["fifo"]["trial_epochs"] == 4  # FIFO runs both trials for both epochs
    assert 2 <= studies["asha"]["trial_epochs"] <= 4
    assert result["same_configs"] is True  # the same Optuna seed proposes the same two configs
    assert last.startswith(f"ASHA spent {studies['asha']['trial_epochs']}/4 trial-epochs")


@pytest.mark.slow
def test_tune_overhead_smoke(tmp_path):
    result, last = smoke("tune_overhead", tmp_path, timeout=420)
    rows = {row["way"]: row for row in result["rows"]}
    assert list(rows) == ["pool", "ours", "optuna", "reuse"]
    assert all(positive(row["wall_s"], row["ratio"]) for row in rows.values())
    runs = {run["way"]: run for run in result["runs"]}
    assert runs["ours"]["trials_ok"] == runs["reuse"]["trials_ok"] == 2
    assert len(runs["pool"]["trial_s"]) == len(runs["optuna"]["trial_s"]) == 2
    assert result["mlflow_runs"]["FINISHED"] == 2 and result["mlflow_runs"]["parent_runs"] == 1
    snapshots = runs["reuse"]["snapshots"]  # counted through Tune's public Callback and Stopper hooks
    assert snapshots["steps"] > 0 and snapshots["forced"] + snapshots["periodic"] >= 1
    assert last.startswith("ratio at 1 s:") and last_number(last) == pytest.approx(rows["ours"]["ratio"], abs=1e-3)


def test_storage_cost_smoke(tmp_path):
    result, last = smoke("storage_cost", tmp_path, timeout=180)
    families = {row["family"]: row for row in result["families"]}
    assert set(families) == {"resnet18", "conv_vae"}
    for row in families.values():  # the last checkpoint is the weights only: a third of Adam's, half of SGD's
        assert 0 < row["last_mb"] < row["mid_mb"] and row["estimate_error"] < 0.05 and 0 <= row["s3_share"] < 1
    assert last == f"worst projected checkpoint share: {result['worst_share']:.4f} (goal <= 0.05)"


@pytest.mark.slow
def test_scale_smoke(tmp_path):
    result, last = smoke("scale", tmp_path, timeout=600)
    rows = {row["way"]: row for row in result["rows"]}
    assert rows["runner"]["ok"] == rows["bare Tuner"]["ok"] == 10
    assert result["mlflow_runs"] == 11 and result["page_kib"] > 0  # ten trials and the study's parent run
    assert last.startswith("runner / bare Tuner wall time at 10 trials:")
    assert last_number(last.split("(")[0]) == pytest.approx(result["ratio"], abs=1e-3)


def test_trial_footprint_smoke(tmp_path):
    result, last = smoke("trial_footprint", tmp_path, timeout=300)
    rows = {row["way"]: row for row in result["rows"]}
    assert rows["today"]["driver_modules"] == "-"  # a trial imports no pandas, scipy, MLflow or driver code
    assert set(rows["before"]["driver_modules"].split(",")) >= {"pandas", "mlflow"}
    assert last.startswith("trial imports today / before: time ")


@pytest.mark.slow
def test_tracking_outage_smoke(tmp_path):
    result, last = smoke("tracking_outage", tmp_path, timeout=600)
    assert len(result["rows"]) == 2 and all(row["every_epoch_once"] for row in result["rows"])
    assert last.startswith("wall time with a 5 s MLflow outage / without:")


@pytest.mark.slow
def test_cluster_demo_smoke(tmp_path):
    """S3, PostgreSQL, MLflow and a two-node Ray started, a study on them, its costs measured, all stopped."""
    result, last = smoke("cluster_demo", tmp_path, timeout=600)
    figures = result["figures"]
    assert figures["trials"] == 5 and figures["trial_epochs"] == 5
    assert figures["bytes_per_trial_epoch"] > 10**6  # each trial's final weights went to the bucket
    assert figures["s3_requests_per_trial_epoch"] > 1
    assert Path(result["report"]).is_file()
    assert last.startswith("checkpoint share of epoch time:")


def test_gpu_check_sh_parses_and_summarises_only_this_runs_json():
    script = BENCHMARKS / "gpu_check.sh"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    loaded = set(re.findall(r'load\("(\w+)"\)', text))
    assert loaded == {"model_throughput", "data_throughput", "gpu_packing"}
    for name in loaded:  # each step deletes an earlier run's JSON before it runs, so a failed step shows no figures
        removed, run = text.find(f'rm -f "$OUT/{name}.json"'), text.find(f'"$PY" benchmarks/{name}.py')
        assert 0 <= removed < run, f"gpu_check.sh runs {name}.py without first deleting $OUT/{name}.json"


def test_every_benchmark_script_has_a_smoke_flag():
    scripts = [path for path in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__":' in path.read_text()]
    assert len(scripts) >= 6
    assert [path.name for path in scripts if '"--smoke"' not in path.read_text()] == []


def study_scripts() -> set[str]:
    """The modules of studies/ that are scripts (they run a study when executed), not the runner library."""
    return {path.stem for path in (ROOT / "studies").glob("*.py")
            if "__main__" in (text := path.read_text()) and "run_study(" in text}


def violations(source: str, scripts: set[str]) -> list[str]:
    """Imports of study scripts and private names (``_x``, ``x._y``) of the project's packages, Ray or MLflow."""
    found, bound = [], set()  # bound: local names that hold one of those packages' modules or objects

    def private(dotted: str) -> bool:
        return any(part.startswith("_") and not part.startswith("__") for part in dotted.split("."))

    def check_module(module: str, line: int) -> None:
        parts = module.split(".")
        if parts[0] == "studies" and len(parts) > 1 and parts[1] in scripts:
            found.append(f"line {line}: imports the study script {module}")
        if private(module):
            found.append(f"line {line}: imports the private module {module}")

    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    check_module(alias.name, node.lineno)
                    bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            check_module(node.module, node.lineno)
            for alias in node.names:
                check_module(f"{node.module}.{alias.name}", node.lineno)
                bound.add(alias.asname or alias.name)
        elif isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in ("import_module", "__import__") \
                and "studies" in ast.unparse(node):
            found.append(f"line {node.lineno}: imports a studies module by name: {ast.unparse(node)}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                found.append(f"line {node.lineno}: private attribute {ast.unparse(node)}")
    return sorted(set(found))


def test_benchmarks_use_no_study_script_and_no_private_name():
    scripts = study_scripts()
    assert {"vae_lr", "seg_search", "cls_architectures"} <= scripts and "runner" not in scripts
    found = {path.name: violations(path.read_text(), scripts) for path in sorted(BENCHMARKS.glob("*.py"))}
    assert len(found) >= 8 and not any(found.values()), {name: v for name, v in found.items() if v}


@pytest.mark.parametrize("source", [
    "import importlib\nstudy = importlib.import_module(f'studies.{name}')",
    "from studies import vae_lr",
    "from studies.seg_search import SPACE",
    "import studies.vae_latent as study",
    "from trainables.data import classification\nclassification._mnist5k_arrays.cache_clear()",
    "from trainables.data.classification import _digits_arrays",
    "from studies import runner\nrunner._start_ray(None)",
    "from ray.tune.execution.experiment_state import _ExperimentCheckpointManager",
    "import ray\nray._private.worker.global_worker",
    "from mlflow.utils import _capture_modules",
])
def test_the_check_finds_what_it_forbids(source):
    assert violations(source, {"vae_lr", "vae_latent", "seg_search"})


def test_the_check_allows_public_names():
    source = ("from studies.runner import run_study\nfrom studies.runner.preflight import KEEP_CHECKPOINTS\n"
              "import ray\nray.init, ray.shutdown = 1, 2\nfrom common import _fmt\n_fmt(1)\nself._x = 1\n")
    assert violations(source, {"vae_lr"}) == []
