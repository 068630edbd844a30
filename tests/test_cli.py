"""The command line's contract: every bad flag refused before Ray starts, in one line that names the flag,
with exit code 2 and no folder left behind; resume that refuses what it cannot honour; exact trial counts."""
from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import ray
from mlflow.exceptions import MlflowException

from conftest import ROOT, run_in_process, study_command
from studies import vae_lr
from studies.runner.cli import apply_args, build_parser
from studies.runner.errors import DEBUG_ENV, MAX_LINES, exception_message, translate
from studies.runner.interrupts import TUNE_STOP, Stopped, stop_signals
from studies.runner.preflight import trial_count
from studies.runner.record import definition, invocation, updated, write_file
from studies.runner import run_study
from studies.runner.space import grid_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(monkeypatch, capsys, tmp_path, *flags: str, study=vae_lr) -> tuple[int, str]:
    """A study's run_study as its script calls it (argv from sys.argv): (exit code, stderr)."""
    name = study.__name__.rpartition(".")[2]
    argv = [f"studies/{name}.py", "--quick", "--storage", str(tmp_path / "results"),
            "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *flags]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        run_study(name, study.BASE, study.SPACE, metric=study.FINDING.metric, mode=study.FINDING.mode,
                  doc=study.__doc__)
    return done.value.code, capsys.readouterr().err


# each bad flag the issue names, and the class it stands for; the message must name the flag as typed
BAD_FLAGS = [
    (["--num-samples", "-1"], "--num-samples -1: must be an integer >= 1"),
    (["--num-samples", "0"], "--num-samples 0: must be an integer >= 1"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial 0: must be a number > 0"),
    (["--cpus-per-trial", "-1"], "--cpus-per-trial -1: must be a number > 0"),
    (["--gpus-per-trial", "-0.5"], "--gpus-per-trial -0.5: must be a number >= 0"),
    (["--gpus-per-trial", "1.5"], "--gpus-per-trial 1.5: a trial trains on one GPU"),
    (["--max-concurrent", "0"], "--max-concurrent 0: must be an integer >= 1"),
    (["--max-failures", "-2"], "--max-failures -2: must be an integer >= -1 (-1 = retry without limit)"),
    (["--epochs", "0"], "--epochs 0: must be an integer >= 1"),
    (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
    (["--steps-per-epoch", "-1"], "--steps-per-epoch -1: must be an integer >= 0"),
    (["--seed", "-3"], "--seed -3: must be an integer >= 0"),
    (["--image-size", "70"], "--image-size 70: conv_vae needs H and W multiples of 4"),
    (["--dataset", "coco"], "--dataset coco: got 'coco'; valid values are 'mnist', 'cifar10'"),
    (["--address", "127.0.0.1:{port}"], "--address 127.0.0.1:{port}: no Ray head answers there"),
    (["--address", "headnode"], "--address headnode: expected HOST:PORT"),
    (["--mlflow-uri", "sqlit:///x.db"], "--mlflow-uri sqlit:///x.db: unknown scheme 'sqlit'; valid: sqlite:///"),
    (["--mlflow-uri", "sqlite://x.db"], "--mlflow-uri sqlite://x.db: a sqlite URI has three slashes"),
    (["--mlflow-uri", "sqlite:///{tmp}"], "is a folder; name the database file"),
    (["--mlflow-uri", "{tmp}/mlruns"], "a folder is MLflow's file store, which MLflow 3 refuses"),
    (["--mlflow-uri", "http://127.0.0.1:{port}"], "--mlflow-uri http://127.0.0.1:{port}: no MLflow server answers"),
    (["--storage", "{tmp}/a_file"], "--storage {tmp}/a_file: {tmp}/a_file is a file"),
    (["--storage", "ftp://host/results"], "--storage ftp://host/results: unknown scheme 'ftp://'"),
    (["--storage", "s3://vt-no-such-bucket.invalid/results"], "--storage s3://vt-no-such-bucket.invalid/results: "),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["--resume"], "--resume: {tmp}/results/vae_lr holds no study (no study.json)"),
    (["--data-root", "{tmp}/a_file", "--dataset", "mnist"], "--data-root {tmp}/a_file: is a file"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_fails_before_ray_in_one_line_naming_it(flags, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    port = _free_port()
    flags = [f.format(port=port, tmp=tmp_path) for f in flags]
    code, err = _cli(monkeypatch, capsys, tmp_path, *flags)
    assert code == 2, err
    assert message.format(port=port, tmp=tmp_path) in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2 and "Traceback" not in err, err
    assert not ray.is_initialized()
    assert not (tmp_path / "results" / "vae_lr").exists()  # nothing that would block the corrected command


def test_bad_data_names_every_bad_file_up_to_a_bound(tmp_path, monkeypatch, capsys):
    """A VOC folder with masks labelled 37: the user sees the files and their labels, not just a count."""
    import numpy as np
    from PIL import Image

    from studies import seg_optimizers
    from test_data import _voc_palette, _write_year

    ids = [f"2012_{i:06d}" for i in range(1, 14)]
    _write_year(tmp_path / "voc", 2012, {"train": ids[:10], "val": ids[10:], "trainval": ids})
    for image_id in ids:
        path = tmp_path / "voc" / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{image_id}.png"
        mask = np.array(Image.open(path))
        mask[0, 0] = 37
        png = Image.fromarray(mask)
        png.putpalette(_voc_palette())
        png.save(path)
    code, err = _cli(monkeypatch, capsys, tmp_path, "--dataset", "voc", "--data-root", str(tmp_path / "voc"),
                     study=seg_optimizers)
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith("error: BadDataError: voc") and "Traceback" not in err, err
    assert f"{tmp_path}/voc/VOCdevkit/VOC2012/SegmentationClass/{ids[0]}.png: labels [37] outside 0..20" in err
    assert sum("labels [37]" in line for line in lines) == 10 and "... and 3 more" in lines[-1], err
    assert not ray.is_initialized()


def test_long_messages_keep_their_head_and_count_the_rest():
    code, message = translate(ValueError("first\n" + "\n".join(f"  line {i}" for i in range(30))))
    lines = message.splitlines()
    assert code == 1 and lines[0] == "ValueError: first" and lines[1] == "  line 0" and len(lines) == MAX_LINES + 1
    assert lines[-1] == f"  ... and {31 - MAX_LINES} more line(s) (--debug shows them all)"
    traceback = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    raise BadDataError(x)\n"
                 "trainables.data.errors.BadDataError: voc: 2 bad file(s):\n  /d/a.png: labels [37]\n  /d/b.png: mask missing")
    assert exception_message(traceback).splitlines() == [
        "trainables.data.errors.BadDataError: voc: 2 bad file(s):", "  /d/a.png: labels [37]", "  /d/b.png: mask missing"]


def test_argparse_errors_are_two_lines(tmp_path, monkeypatch, capsys):
    code, err = _cli(monkeypatch, capsys, tmp_path, "--epochs", "x")
    assert code == 2 and err.strip().splitlines() == [
        "usage: studies/vae_lr.py [flags] (see --help)", "studies/vae_lr.py: error: argument --epochs: invalid int value: 'x'"]


def test_a_study_folder_is_not_overwritten_and_the_refusal_names_the_ways_out(tmp_path, monkeypatch, capsys):
    write_file(str(tmp_path / "results" / "vae_lr" / "study.json"), json.dumps({"name": "vae_lr"}))
    code, err = _cli(monkeypatch, capsys, tmp_path)
    assert code == 2 and "already holds a study: pass --resume to continue it, --overwrite" in err
    assert (tmp_path / "results" / "vae_lr" / "study.json").is_file()


def _record(tmp_path, *flags: str) -> None:
    """The study.json that ``vae_lr --quick FLAGS`` writes when it starts."""
    args = build_parser("vae_lr").parse_args(["--quick", "--storage", str(tmp_path / "results"), *flags])
    base, space = apply_args(vae_lr.BASE, vae_lr.SPACE, args)
    study = definition("vae_lr", base, space, "val/loss", "min", args, trial_count(args, space, None))
    entry = invocation(args, f"sqlite:///{tmp_path / 'mlflow.db'}", ["studies/vae_lr.py", "--quick", *flags])
    write_file(str(tmp_path / "results" / "vae_lr" / "study.json"), json.dumps(updated(None, study, entry)))


@pytest.mark.parametrize("flags,changes", [
    (["--epochs", "3"], ["epochs: 2 -> 3"]),
    (["--seed", "7"], ["seed: 0 -> 7"]),
    (["--dataset", "digits"], ["dataset: 'mnist5k' -> 'digits'"]),
    (["--search", "optuna"], ['search: "grid" -> "optuna"']),
    (["--num-samples", "2"], ["trials: 5 -> 10"]),
])
def test_resume_that_changes_the_study_is_refused_with_the_differences(flags, changes, tmp_path, monkeypatch, capsys):
    _record(tmp_path)
    code, err = _cli(monkeypatch, capsys, tmp_path, "--resume", *flags)
    assert code == 2, err
    assert "--resume would change the study" in err and all(change in err for change in changes), err
    assert "resume with the study's own flags: python studies/vae_lr.py --quick --resume" in err
    assert not ray.is_initialized()


def test_trial_count_sees_nested_grids_and_optuna():
    def count(script: str, *flags: str, default: int | None = None) -> int:
        study = importlib.import_module(f"studies.{script}")
        args = build_parser(script).parse_args(list(flags))
        _, space = apply_args(study.BASE, study.SPACE, args)
        return trial_count(args, space, default)

    assert grid_size({"optim": {"lr": {"grid_search": [1, 2, 3]}, "name": {"grid_search": ["sgd", "adam"]}}}) == 6
    assert count("vae_lr") == 5  # a grid nested in optim: 5 learning rates, not 1
    assert count("vae_lr", "--search", "optuna") == 5
    assert count("vae_lr", "--num-samples", "3") == 15
    assert count("vae_lr", "--search", "optuna", "--num-samples", "3") == 3
    assert count("cls_architectures") == count("cls_architectures", "--search", "optuna") == 4  # top-level grids
    assert count("vae_losses", "--quick") == 3  # --quick fixes the data-set dimension
    assert count("seg_search", "--search", "optuna", default=16) == 16


def test_errors_of_ray_and_mlflow_are_translated_and_tracebacks_are_opt_in(tmp_path, study_env):
    code, message = translate(MlflowException("UNSUPPORTED: Model registry functionality is unavailable"))
    assert code == 1 and message.startswith("MLflow (MlflowException): UNSUPPORTED") and "--mlflow-uri" in message
    code, message = translate(ConnectionError("--mlflow-uri http://x: no MLflow server answers"))
    assert code == 2 and message.startswith("--mlflow-uri")
    env = {**study_env, DEBUG_ENV: "1"}
    done = run_in_process(str(ROOT / "studies" / "vae_lr.py"), ["--quick", "--num-samples", "-1", "--storage",
                                                                str(tmp_path / "r")], tmp_path, env)
    assert done.returncode == 2 and "Traceback" in done.stderr and "UsageError" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("error: --num-samples -1: must be an integer >= 1 (trials per grid "
                                                    "point with --search grid, in total with --search optuna)")


def test_the_script_itself_refuses_an_unreachable_address_in_one_line(tmp_path, study_env):
    port = _free_port()
    done = subprocess.run(study_command("vae_lr", "--quick", "--address", f"127.0.0.1:{port}",
                                        "--storage", str(tmp_path / "results")),
                          capture_output=True, text=True, env=study_env, timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: --address 127.0.0.1:{port}: no Ray head answers there (Connection refused within 3 s); start one "
        "with 'ray start --head --port PORT', pass the address 'ray status' prints, or drop --address to start a "
        "local Ray"]
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()


def test_stop_signals_hand_the_first_to_tunes_handler_and_raise_on_the_second():
    stops, outer = [], signal.getsignal(signal.SIGTERM)  # SIG_DFL, unless a runtime this process started set one
    with stop_signals() as stop:
        with pytest.raises(Stopped) as outside:  # before fit(): nothing could save state, stop at once
            os.kill(os.getpid(), signal.SIGTERM)
        assert outside.value.signum == signal.SIGTERM
        stop.signum = None
        before = signal.getsignal(TUNE_STOP)
        with stop.fitting():
            signal.signal(TUNE_STOP, lambda signum, frame: stops.append(signum))  # what fit() installs
            os.kill(os.getpid(), signal.SIGINT)
            assert stops == [TUNE_STOP] and stop.signum == signal.SIGINT  # Tune stops the trials, saves state
            with pytest.raises(Stopped):
                os.kill(os.getpid(), signal.SIGINT)  # the second one does not wait
        assert signal.getsignal(TUNE_STOP) is before  # Tune's stale handler is not left behind
    assert signal.getsignal(signal.SIGTERM) is outer and os.environ.get("TUNE_DISABLE_SIGINT_HANDLER") is None


def test_an_unreachable_ray_address_from_the_environment_is_named_as_such(tmp_path, monkeypatch, capsys):
    port = _free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # ray.init reads it when --address is absent
    code, err = _cli(monkeypatch, capsys, tmp_path)
    assert code == 2 and err.startswith(f"error: RAY_ADDRESS 127.0.0.1:{port}: no Ray head answers there")
    assert not ray.is_initialized()


def test_a_study_run_from_a_thread_leaves_signals_alone(tmp_path):
    """Notebooks and services call run_study off the main thread, where Python refuses signal handlers."""
    import threading

    outcome, outer = [], signal.getsignal(signal.SIGTERM)

    def work() -> None:
        try:
            with stop_signals() as stop:
                stop.install()
                with stop.fitting():
                    outcome.append(signal.getsignal(signal.SIGTERM))
        except ValueError as err:  # "signal only works in main thread"
            outcome.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert outcome == [outer]
