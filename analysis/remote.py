"""A study kept in object storage (``s3://bucket/prefix/NAME``), read through a local copy of what the analysis reads.

The copy holds the study's records (study.json, finding.json, trials.csv, Tune's snapshots), each trial's
params.json, result.json and error.txt, and the ``artifacts/`` of its last checkpoint (the arrays and images the
figures are drawn from); never the model weights, the MLflow model or older checkpoints, which make up nearly all
of a study's bytes. pyarrow's filesystem reads the URI, as Ray wrote it: the same AWS_* settings reach both.
"""
from __future__ import annotations

import contextlib
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterator

STUDY_SUFFIXES = (".json", ".csv")  # study.json, finding.json, trials.csv, Tune's snapshots; not tuner.pkl
TRIAL_FILES = ("params.json", "result.json", "error.txt")
CHECKPOINT = re.compile(r"checkpoint_(\d+)$")  # Tune's checkpoint folders, as analysis.load finds them


def is_uri(study_dir: str) -> bool:
    return "://" in study_dir


def _wanted(files: list[PurePosixPath]) -> list[PurePosixPath]:
    """The files (relative to the study) that the analysis reads."""
    last: dict[str, int] = {}  # trial folder -> index of its newest checkpoint
    for path in files:
        if len(path.parts) > 2 and (match := CHECKPOINT.search(path.parts[1])):
            last[path.parts[0]] = max(last.get(path.parts[0], -1), int(match.group(1)))

    def wanted(path: PurePosixPath) -> bool:
        parts = path.parts
        if len(parts) == 1:
            return path.suffix in STUDY_SUFFIXES
        if len(parts) == 2:
            return parts[1] in TRIAL_FILES
        match = CHECKPOINT.search(parts[1])
        return bool(match) and int(match.group(1)) == last.get(parts[0]) and parts[2] == "artifacts"

    return [path for path in files if wanted(path)]


def fetch_study(uri: str, dest: Path) -> Path:
    """Copy the study at ``uri`` into ``dest`` (see the module's docstring); returns ``dest``."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(uri.rstrip("/"))
    infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True))
    files = [PurePosixPath(info.path).relative_to(root) for info in infos if info.type == fs.FileType.File]
    if PurePosixPath("study.json") not in files:
        raise FileNotFoundError(f"{uri} is not a study folder: study.json is missing (expected <storage>/<study name> "
                                "as written by 'python studies/NAME.py --storage <storage>')")
    for path in _wanted(files):
        target = dest.joinpath(*path.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with filesystem.open_input_stream(f"{root}/{path}") as source:
            target.write_bytes(source.read())
    return dest


@contextlib.contextmanager
def local_study(study_dir: str) -> Iterator[Path]:
    """A local folder holding the study: ``study_dir`` itself, or a temporary copy of a URI's study."""
    if not is_uri(study_dir):
        yield Path(study_dir)
        return
    with tempfile.TemporaryDirectory(prefix="vision-tune-study-") as copy:
        yield fetch_study(study_dir, Path(copy))
