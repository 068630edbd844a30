"""The study's console, fed the events Tune's callback passes on: plain lines within 100 columns off a terminal,
a redrawn block with a progress bar and an ETA on one."""
from __future__ import annotations

import io
import re

from analysis.naming import VariantNames
from studies.runner.console import WIDTH, Console, duration

CONFIGS = [{"optim": {"name": "sgd", "lr": 1e-4}, "seed": 0}, {"optim": {"name": "adam", "lr": 1e-3}, "seed": 0},
           {"optim": {"name": "adam", "lr": 1e-3}, "seed": 7}]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def feed(console: Console) -> None:
    for index, config in enumerate(CONFIGS):
        console.started_trial(f"t{index}", config)
        for epoch in (1, 2):
            console.result(f"t{index}", config, {"epoch": epoch, "val/precision": 0.5 + 0.1 * index + 0.01 * epoch})
        console.ended(f"t{index}", config, "DONE" if index < 2 else "ERROR")
    console.close()


def names() -> VariantNames:
    return VariantNames([{"optim/name": "sgd", "optim/lr": 1e-4}, {"optim/name": "adam", "optim/lr": 1e-3}])


def test_plain_lines_off_a_terminal_name_each_trial_as_mlflow_does():
    out = io.StringIO()
    feed(Console(names(), "val/precision", "max", trials=3, epochs=2, stream=out))
    text = out.getvalue()
    assert "\x1b" not in text and all(len(line) <= WIDTH for line in text.splitlines())
    assert "start  A sgd lr=0.0001" in text and "start  B adam lr=0.001 #2" in text  # a variant's second seed
    assert re.search(r"done   A sgd lr=0\.0001 +DONE +2/2 +val/precision +0\.52 +best +0\.52", text), text
    assert re.search(r"error  B adam lr=0\.001 #2 +ERROR", text), text
    assert text.splitlines()[-1].startswith("[####################]  6/6 epochs  3/3 trials ended  best val/precision "
                                            "0.72")


def test_a_terminal_gets_a_redrawn_block_with_an_eta():
    out = Terminal()
    console = Console(names(), "val/precision", "max", trials=3, epochs=2, stream=out)
    console.started_trial("t0", CONFIGS[0])
    console.result("t0", CONFIGS[0], {"epoch": 1, "val/precision": 0.4})
    console.tick(force=True)
    console.result("t0", CONFIGS[0], {"epoch": 2, "val/precision": 0.3})
    console.tick(force=True)
    text = out.getvalue()
    assert "\x1b[K" in text and re.search(r"\x1b\[\d+F", text)  # cursor up over the last block, lines cleared
    block = text.split("\x1b[2F")[-1]
    assert "[#######.............]  2/6 epochs" in block and "ETA " in block and "ETA -" not in block
    assert re.search(r"val/precision +0\.3 +best +0\.4", block)  # the best so far, not the last


def test_durations_read_as_people_write_them():
    assert [duration(s) for s in (5, 75, 3725)] == ["5s", "1m15s", "1h02m"]
