"""Old module paths of the runner's parts, kept importable for the pickles in studies written before the runner
became a package: Tune stores the callbacks (with their tracker and pending clock), the trial-folder namer and
the search algorithm by module path in every snapshot, and ``--resume`` unpickles them. ``studies.runner`` itself
re-exports the classes that lived in the old ``studies/runner.py``."""
from __future__ import annotations

import importlib
import sys

# old path -> where it lives now
MOVED = {f"studies.{name}": f"studies.runner.{name}" for name in
         ("autoscaling", "cli", "errors", "interrupts", "preflight", "record", "space", "tracking", "validate")}
MOVED["studies.study_run"] = "studies.runner.mlflow_runs"
MOVED["trainables.naming"] = "analysis.naming"  # VariantNames, pickled with the tracker


def install() -> None:
    """Make each old path name the module it moved to (only where nothing else took the name)."""
    package = sys.modules["studies"]
    for old, new in MOVED.items():
        module = sys.modules.setdefault(old, importlib.import_module(new))
        if not hasattr(package, old.rpartition(".")[2]):
            setattr(package, old.rpartition(".")[2], module)
