"""Variant letters and run names, one definition for the runner's MLflow runs and the analysis tables.

A *variant* is one distinct setting of the hyperparameters that vary between a study's configs (seeds
aside, so repeated samples of a setting share its letter). Letters follow the order the configs are given
in: Tune's trial order for both the runner (its grid, known before any trial starts) and the analysis
(trials sorted by their index), so ``C adam lr=0.001`` in MLflow is row C of the report's table.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

NOT_A_VARIANT = frozenset({"seed", "data_root"})  # flat config keys that never tell variants apart
MISSING = "-"


def fmt(value: Any) -> str:
    """A config value for a name, legend or table cell (missing: '-', floats without noise)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def letters(index: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA: variant names as the report's."""
    name = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        name = chr(ord("A") + rest) + name
    return name


def flatten(config: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"optim/lr": 0.001, ...}: the keys MLflow params and trials.csv use."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def varied_keys(configs: Iterable[Mapping]) -> list[str]:
    """Flat keys whose formatted value differs between the (flat) configs, a missing value counting as one;
    seeds excluded. Keys keep their first-seen order."""
    configs = list(configs)
    keys = list(dict.fromkeys(key for config in configs for key in config))
    return [key for key in keys if key not in NOT_A_VARIANT and len({fmt(c.get(key)) for c in configs}) > 1]


def describe(config: Mapping, varied: Iterable[str]) -> str:
    """What a variant sets, for a run name: ``adam lr=0.001`` (a name field by its value alone, each other
    field by its last path part; a value the variant does not set, such as Adam's momentum, left out)."""
    parts = []
    for key in varied:
        value = fmt(config.get(key))
        if value == MISSING:
            continue
        field = key.rsplit("/", 1)[-1]
        parts.append(value if field == "name" else f"{field}={value}")
    return " ".join(parts)


class VariantNames:
    """Letters for a study's variants: those of ``configs`` (flat) in their order, and any setting first seen
    later (a sampled search) gets the next letter when it is first asked for. ``varied`` names the keys that
    tell variants apart when the configs cannot (a sampled space, known by its keys only)."""

    def __init__(self, configs: Iterable[Mapping], varied: Iterable[str] | None = None) -> None:
        configs = list(configs)
        self.varied = [key for key in varied if key not in NOT_A_VARIANT] if varied is not None \
            else varied_keys(configs)
        self._letters: dict[str, str] = {}
        for config in configs:
            self.letter(config)

    def key(self, config: Mapping) -> str:
        return "|".join(fmt(config.get(key)) for key in self.varied)

    def letter(self, config: Mapping) -> str:
        return self._letters.setdefault(self.key(config), letters(len(self._letters)))

    def run_name(self, config: Mapping) -> str:
        """``C adam lr=0.001``; a study with one variant names its runs ``A base config``."""
        return f"{self.letter(config)} {describe(config, self.varied) or 'base config'}"
