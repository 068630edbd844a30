"""What a Ray cluster's autoscaler can still add, learnt from what Ray itself publishes, as plain data.

Who runs the autoscaler decides what Ray tells (the runner fetches the raw values; nothing here imports Ray):

- the v1 monitor (``ray up``, ``ray start --head --autoscaling-config``, KubeRay's default autoscaler) writes
  its status as JSON into the GCS key-value store after every update: proof that it runs, its launches,
  failures and the demands it sees, but not the resources of the node types it may add;
- autoscaler v2 (KubeRay with ``autoscalerOptions.version: v2``, hosted Ray) reports its node groups with
  their resources and max counts to GCS (``analysis.ray_internals.cluster_config``);
- ``ray up`` also leaves the whole config on the head, ``~/ray_bootstrap_config.yaml``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# `ray up` leaves the cluster's config here on the head, where studies run; Tune looks for the same file
AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"
PENDING_TIMEOUT_S = 900.0  # --pending-timeout's default: cloud GPU nodes take minutes to boot and set up
# the v1 monitor rewrites its status every few seconds: one this old belongs to a monitor that is gone
STALE_S = 300.0
# how Ray's read-only monitor names the nodes it only watches (ray.autoscaler._private.util.format_readonly_node_type)
READ_ONLY_NODE_TYPE = re.compile(r"node_[0-9a-f]+")


@dataclass(frozen=True)
class Autoscaler:
    """A running autoscaler as far as Ray tells: ``node_types`` None when it does not publish them."""

    sources: tuple[str, ...]
    node_types: dict[str, dict] | None
    launching: dict[str, int] = field(default_factory=dict)
    failed: tuple[str, ...] = ()
    demands: tuple[tuple[dict, int], ...] = ()  # resource bundles waiting for a node, with their counts

    def describe(self) -> str:
        """One line for an error or a log: what it can add, what it is doing."""
        if self.node_types is None:
            types = "does not publish which node types it can add"
        else:
            kinds = ", ".join(f"{name} ({shape(res)})" for name, res in sorted(self.node_types.items()))
            types = f"can add {kinds or 'no node type'}"
        parts = [f"the autoscaler ({', '.join(self.sources)}) {types}"]
        if self.launching:
            parts.append("launching " + ", ".join(f"{n} x {name}" for name, n in sorted(self.launching.items())))
        if self.failed:
            parts.append("failed nodes: " + "; ".join(self.failed[:5]))
        if self.demands:
            parts.append("pending demands: " + ", ".join(f"{count} x {{{shape(bundle)}}}" for bundle, count in
                                                          self.demands[:5]))
        return "; ".join(parts)


def shape(resources: dict) -> str:
    """CPU and GPU first, then custom resources; Ray's own bookkeeping keys (memory, node:IP, ...) left out."""
    keys = [key for key in ("CPU", "GPU") if key in resources]
    keys += sorted(key for key in resources if key not in ("CPU", "GPU", "memory", "object_store_memory")
                   and not key.startswith("node:") and not key.startswith("accelerator_type:"))
    return ", ".join(f"{key} {resources[key]:g}" for key in keys) or "no CPU or GPU"


def from_bootstrap(config: str = AUTOSCALER_CONFIG) -> dict[str, dict] | None:
    """Node types (name -> resources) that ``ray up``'s config lets the autoscaler still start; None without it."""
    path = Path(config).expanduser()
    if not path.is_file():
        return None
    types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types", {})
    return {name: kind.get("resources", {}) for name, kind in types.items() if kind.get("max_workers", 0) > 0}


def from_cluster_config(config: dict | None) -> dict[str, dict] | None:
    """Node types of autoscaler v2's report (``{"node_group_configs": [{name, resources, max_count}]}``, as the
    runner copies it out of Ray's protobuf); a max count of -1 means unlimited, 0 means none may be added."""
    if not config or not config.get("node_group_configs"):
        return None
    return {group["name"]: dict(group["resources"]) for group in config["node_group_configs"]
            if group.get("max_count", 0) != 0 and group.get("resources")}


def from_monitor_status(raw: str | bytes | None, now: float) -> dict | None:
    """The v1 monitor's status (``__autoscaling_status``), or None when there is none, it is stale, or it is
    Ray's read-only monitor, which every head started without an autoscaling config runs (``ray.init()``, a
    hand-made ``ray start`` cluster): it names each node ``node_<id>`` and never adds one."""
    if not raw:
        return None
    status = json.loads(raw)
    report = status.get("autoscaler_report")
    if not report or now - status.get("time", 0) > STALE_S:
        return None
    kinds = [*(report.get("active_nodes") or {}), *(report.get("pending_launches") or {}),
             *(kind for _, kind, *_ in report.get("failed_nodes") or [])]
    if all(READ_ONLY_NODE_TYPE.fullmatch(kind) for kind in kinds):
        return None
    load = status.get("load_metrics_report") or {}
    failed = tuple(f"{kind} ({ip})" for ip, kind, *_ in report.get("failed_nodes") or [])
    demands = tuple((bundle, count) for bundle, count in load.get("resource_demand") or [])
    return {"launching": dict(report.get("pending_launches") or {}), "failed": failed, "demands": demands}


def learn(monitor_status: str | bytes | None = None, cluster_config: dict | None = None, *, now: float = 0.0,
          bootstrap: str = AUTOSCALER_CONFIG) -> Autoscaler | None:
    """The autoscaler of this cluster from everything Ray publishes about it; None when nothing says one runs."""
    monitor = from_monitor_status(monitor_status, now)
    v2_types, file_types = from_cluster_config(cluster_config), from_bootstrap(bootstrap)
    found = (("its status in Ray's GCS", monitor), ("its node groups in Ray's GCS", v2_types), (bootstrap, file_types))
    sources = [name for name, value in found if value is not None]
    if not sources:
        return None
    types = v2_types if v2_types is not None else file_types
    monitor = monitor or {}
    return Autoscaler(tuple(sources), types, monitor.get("launching", {}), monitor.get("failed", ()),
                      monitor.get("demands", ()))
