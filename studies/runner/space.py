"""Search spaces as plain dicts: merge with the base config and validate every candidate before Ray starts.

Tune's grid is the dict ``{"grid_search": [...]}``; its sampling domains are recognised by their
``categories`` or ``lower``/``upper``, so this file needs no Ray import.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import numpy as np

from trainables import ConfigError, OptimConfig, TrainConfig
from trainables.checkpoints import model_bytes

MAX_CHECKED = 512  # candidate configs built in the check; larger products are checked on a stride


def is_grid(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"grid_search"}


def is_domain(value: Any) -> bool:
    return hasattr(value, "sample") and (hasattr(value, "categories") or hasattr(value, "lower"))


def merge_space(base: dict, space: dict) -> dict:
    """The base config's dict with the space laid over it; nested dicts (optim) merge key by key."""
    merged = dict(base)
    for key, value in space.items():
        if isinstance(value, dict) and not is_grid(value) and isinstance(merged.get(key), dict):
            merged[key] = merge_space(merged[key], value)
        else:
            merged[key] = value
    return merged


def sample_seed(base_seed: int, index: int) -> int:
    """The training seed of sample ``index``: sample 0 keeps the base seed (a one-sample study trains as
    configured); later ones hash (base, index) with numpy's SeedSequence, so that the samples of base seeds
    0 and 1 do not overlap as ``base + index`` would. 31 bits: valid for torch, numpy and Python alike."""
    if index == 0:
        return base_seed
    return int(np.random.SeedSequence([base_seed, index]).generate_state(1)[0] >> 1)


def seed_samples(param_space: dict, base_seed: int, samples: int) -> tuple[dict, int]:
    """Repeated samples of a grid point with distinct seeds: Tune's ``num_samples`` would repeat each point
    with the same config, so the same seed (identical runs on a CPU). The samples become a grid dimension
    over derived seeds instead, which keeps the trial count; returns (param space, Tune's num_samples).
    A space that varies ``seed`` itself is left as it is."""
    searched = param_space.get("seed")
    if samples <= 1 or is_grid(searched) or is_domain(searched):
        return param_space, samples
    seeds = [sample_seed(base_seed, index) for index in range(samples)]
    return {**param_space, "seed": {"grid_search": seeds}}, 1


def _check_keys(base: TrainConfig, space: dict) -> None:
    valid = {f.name for f in dataclasses.fields(base)}
    optim_valid = {f.name for f in dataclasses.fields(OptimConfig)}
    for key, value in space.items():
        if key not in valid:
            raise ConfigError(f"search space: {key!r} is not a field of {type(base).__name__}; "
                              f"valid keys are {sorted(valid)}")
        nested = [value] if isinstance(value, dict) and not is_grid(value) else (
            value["grid_search"] if is_grid(value) and key == "optim" else [])
        for sub in nested:
            unknown = sorted(set(sub) - optim_valid) if isinstance(sub, dict) else []
            if unknown:
                raise ConfigError(f"search space: optim key(s) {unknown} unknown; valid are {sorted(optim_valid)}")


def _candidates(value: Any) -> list:
    """Values a dimension can take, for checking: every grid/choice value, a range's two ends."""
    if is_grid(value):
        return list(value["grid_search"])
    if is_domain(value):
        if hasattr(value, "categories"):
            return list(value.categories)
        return [value.lower, value.upper]
    if isinstance(value, dict):
        names, options = zip(*((k, _candidates(v)) for k, v in value.items())) if value else ((), ())
        return [dict(zip(names, combo)) for combo in itertools.product(*options)]
    return [value]


def grid_size(space: dict) -> int:
    """Number of grid points, nested grids included (``{"optim": {"lr": grid}}``); sampled dimensions count once."""
    return math.prod(len(v["grid_search"]) if is_grid(v) else grid_size(v) if isinstance(v, dict) else 1
                     for v in space.values())


def describe(value: Any) -> Any:
    """The space as plain JSON data, the same for the same space in every process (Tune's domains print
    their memory address): what study.json records and resume compares."""
    if is_grid(value):
        return {"grid_search": [describe(v) for v in value["grid_search"]]}
    if is_domain(value):
        kind = type(value).__name__
        if hasattr(value, "categories"):
            return {kind: [describe(v) for v in value.categories]}
        sampler = type(getattr(value, "sampler", None)).__name__
        return {kind: [value.lower, value.upper], "sampler": sampler}
    if isinstance(value, dict):
        return {key: describe(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    return value


def variants(base: TrainConfig, space: dict) -> list[dict]:
    """The configs a grid space expands to (sampled dimensions at their candidate values), as dicts."""
    names = list(space)
    result = []
    for combo in itertools.product(*(_candidates(space[name]) for name in names)):
        values = base.to_dict()
        for name, value in zip(names, combo):
            # as in Tune: a plain nested dict merges into the base's, a grid value replaces it whole
            nested = isinstance(space[name], dict) and not is_grid(space[name])
            values[name] = {**values[name], **value} if nested else value
        result.append(values)
    return result


def check_space(base: TrainConfig, space: dict) -> None:
    """Every key a config field, and every candidate a valid config: errors name the field and values."""
    _check_keys(base, space)
    candidates = variants(base, space)
    for values in candidates[:: max(1, len(candidates) // MAX_CHECKED)]:
        try:
            type(base).from_dict(values)
        except ConfigError as err:
            varied = {key: values[key] for key in space}
            raise ConfigError(f"search space {varied}: {err}") from None


def largest_state(base: TrainConfig, space: dict) -> tuple[int, int]:
    """Bytes of the largest checkpoint any candidate config would write mid-trial, and of the largest weights
    (each distinct model and optimizer kind measured once, on the meta device)."""
    sizes: dict[tuple, tuple[int, int]] = {}
    for values in variants(base, space):
        config = type(base).from_dict(values)
        key = (config.model, repr(sorted(config.model_kwargs().items())), config.optim.name,
               config.optim.momentum > 0)
        if key not in sizes:
            weights, slots = model_bytes(config)
            sizes[key] = (weights + slots, weights)
    return max(state for state, _ in sizes.values()), max(weights for _, weights in sizes.values())


def continuous_grids(space: dict) -> dict:
    """The space's dimensions PBT can perturb: grids of real numbers (a learning rate, a weight), nested as the
    config is, each as its sorted values (PBT moves a trial to a neighbouring value or resamples one)."""
    found = {}
    for key, value in space.items():
        if is_grid(value) and all(isinstance(v, float) for v in value["grid_search"]):
            found[key] = sorted(value["grid_search"])
        elif isinstance(value, dict) and not is_grid(value):
            nested = continuous_grids(value)
            if nested:
                found[key] = nested
    return found
