"""requirements.lock is the whole tested dependency set, with hashes; everything that installs the project
installs from it, and it still satisfies pyproject.toml (CI fails here when one changed without ``make lock``)."""
from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT

LOCK = ROOT / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", re.M)


def pins() -> dict[str, str]:
    return {canonicalize_name(name): version for name, version in PIN.findall(LOCK.read_text())}


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(text) for text in [*project["dependencies"], *(r for group in extras.values() for r in group)]]


@pytest.mark.parametrize("requirement", declared(), ids=str)
def test_every_declared_dependency_is_locked_at_a_version_it_allows(requirement):
    locked = pins()
    name = canonicalize_name(requirement.name)
    assert name in locked, f"{requirement} is in pyproject.toml but not in requirements.lock: run make lock"
    assert requirement.specifier.contains(locked[name], prereleases=True), \
        f"requirements.lock pins {name}=={locked[name]}, which pyproject.toml's {requirement} excludes: run make lock"


def test_every_pin_has_hashes_and_constraints_agree():
    text = LOCK.read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    assert len(blocks) == len(pins()) > 100
    for block in blocks:
        assert "--hash=sha256:" in block, block.splitlines()[0]
    for name, version in re.findall(r"^([\w-]+)==([\w.]+)", (ROOT / "constraints.txt").read_text(), re.M):
        assert pins()[canonicalize_name(name)] == version, name


def test_every_install_goes_through_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet --require-hashes -r $(LOCK)" in makefile and "--no-deps -e ." in makefile
    assert "--require-hashes -r /home/ray/vision-tune/requirements.lock" in (ROOT / "k8s" / "Dockerfile").read_text()
    assert "--require-hashes -r ~/vision-tune/requirements.lock" in (ROOT / "cluster.yaml").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()
