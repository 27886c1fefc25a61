"""Synthetic, non-IID device-log-feature dataset for federated anomaly-detection benchmarks.

Real device logs cannot be shipped with the project, so benchmarks run on a generated
fleet that has the properties that make federated anomaly detection hard: devices play
different roles (web server, database, ...), have different activity levels, daily
cycles and data volumes, log counts are overdispersed, most error templates are rare,
and some anomalies are only anomalous *for a given device* ("foreign behaviour").

A row is one time window of one device: the counts of ``T`` log templates in that
window. The file is an ``.npz`` that loads with ``allow_pickle=False``:

``X_<client_id>``
    float32 (n_i, T) unlabeled training windows of one client (benign, optionally
    contaminated with a small fraction of anomalies, as real unlabeled data is).
``holdout_X``, ``holdout_y``, ``anomaly_type``
    pooled labeled holdout (float32, int8 with 1 = anomaly, int8 code per row).
``holdout_owner``
    the client id of the device each pooled row comes from (optional when loading:
    on-device personalization scores a pooled row with its owner's calibration).
``holdout_X_<id>``, ``holdout_y_<id>``, ``holdout_anomaly_type_<id>``
    per-client holdouts: that client's benign windows plus anomalies specific to it.
``feature_names``, ``client_ids``, ``client_roles``, ``anomaly_type_names``
    fixed-width unicode arrays (no pickle needed).

Anomaly codes (``anomaly_type``; ``anomaly_type_names[code]`` is the name):

0 ``benign``
1 ``rare_template_burst``: a few templates that are rare on this device fire in bulk.
2 ``error_spike``: the error/warn templates of the device's own components x10-50.
3 ``silent_component``: the device's busiest component stops logging, heartbeat included.
4 ``foreign_profile``: behaviour of a role the device never has. In the pooled holdout
  the device's own heartbeats stay and only the activity is foreign (detectable by a
  fleet model as an inconsistency); in per-client holdouts the window is a plain normal
  window of another device with different roles: normal for the fleet, abnormal here.
5 ``volume_surge``: the device's busiest normal templates flood (x8-30).

Bytes are deterministic for a seed: arrays are written into a zip with fixed
timestamps (``np.savez`` stamps the current time into every member).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ANOMALY_TYPE_NAMES: tuple[str, ...] = (
    "benign",
    "rare_template_burst",
    "error_spike",
    "silent_component",
    "foreign_profile",
    "volume_surge",
)
BENIGN, RARE_BURST, ERROR_SPIKE, SILENT_COMPONENT, FOREIGN_PROFILE, VOLUME_SURGE = range(6)
ANOMALY_CODES: tuple[int, ...] = tuple(range(1, len(ANOMALY_TYPE_NAMES)))

MIN_TEMPLATES = 15

# Components in the order they are taken when fewer templates are requested; each has
# readable names for its first template of each kind (heartbeat, info, info, warn, error).
_COMPONENT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "http": ("health_ping", "get_200", "post_201", "slow_request", "500_internal"),
    "db": ("checkpoint", "query_ok", "commit", "lock_wait", "deadlock"),
    "auth": ("keepalive", "login_ok", "token_refresh", "login_failed", "pam_error"),
    "batch": ("scheduler_tick", "job_start", "job_done", "job_retry", "job_failed"),
    "desktop": ("session_alive", "app_launch", "file_open", "app_not_responding", "app_crash"),
    "net": ("link_up", "dhcp_renew", "dns_query", "packet_drop", "link_down"),
    "storage": ("smart_check", "write_ok", "read_ok", "disk_nearly_full", "io_error"),
    "kernel": ("watchdog", "cron_run", "usb_event", "soft_lockup", "oom_kill"),
}
_ROUND_KINDS = ("heartbeat", "info", "info", "warn", "error")
_EXTRA_KINDS = ("info", "warn", "error", "info")

# Device roles: components they run and their daily cycle (amplitude, peak hour).
_ROLES: tuple[tuple[str, tuple[str, ...], float, float], ...] = (
    ("web_server", ("http", "auth", "net"), 0.5, 14.0),
    ("database", ("db", "storage"), 0.3, 11.0),
    ("auth_host", ("auth", "net"), 0.5, 9.0),
    ("batch_worker", ("batch", "storage", "kernel"), 0.6, 2.0),
    ("workstation", ("desktop", "net", "auth"), 0.9, 13.0),
)

_WINDOW_GAMMA_SHAPE = 8.0  # per-window burstiness of overall activity
_NB_SHAPE = 4.0  # negative-binomial dispersion of template counts
_HEARTBEAT_KEEP = 0.98  # heartbeats are regular; a few are missed


@dataclass(frozen=True)
class _Fleet:
    """Template catalogue and role distributions shared by all devices."""

    names: list[str]
    kinds: np.ndarray  # str per template
    component_of: np.ndarray  # component index per template
    n_components: int
    role_names: list[str]
    role_components: list[np.ndarray]
    role_probs: np.ndarray  # (R, T), zero on heartbeat templates
    role_day: np.ndarray  # (R, 2): amplitude, peak hour


@dataclass(frozen=True)
class _Client:
    """Generative parameters of one device."""

    roles: tuple[int, ...]
    probs: np.ndarray  # (T,) template distribution of activity
    rate: float  # mean events per window
    amplitude: float
    peak: float
    heartbeats: np.ndarray  # (T,) heartbeats per window, zero if not running


def _catalogue(n_templates: int) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    """Name templates and assign each a component and kind (interleaved by component)."""
    n_comp = int(np.clip(n_templates // 5, 3, len(_COMPONENT_TEMPLATES)))
    components = list(_COMPONENT_TEMPLATES)[:n_comp]
    width = max(2, len(str(n_templates - 1)))
    names, kinds, comps = [], [], []
    for i in range(n_templates):
        c, r = i % n_comp, i // n_comp
        comp = components[c]
        if r < len(_ROUND_KINDS):
            kind, label = _ROUND_KINDS[r], _COMPONENT_TEMPLATES[comp][r]
        else:
            kind = _EXTRA_KINDS[(r - len(_ROUND_KINDS)) % len(_EXTRA_KINDS)]
            label = f"{kind}_{r}"
        names.append(f"tmpl_{i:0{width}d}_{comp}_{label}")
        kinds.append(kind)
        comps.append(c)
    return names, np.array(kinds), np.array(comps), n_comp


def _make_fleet(rng: np.random.Generator, n_templates: int) -> _Fleet:
    names, kinds, comp_of, n_comp = _catalogue(n_templates)
    comp_index = {name: i for i, name in enumerate(list(_COMPONENT_TEMPLATES)[:n_comp])}
    info = kinds == "info"
    role_components, role_probs, role_day = [], [], []
    for r, (_, comps, amp, peak) in enumerate(_ROLES):
        present = [comp_index[c] for c in comps if c in comp_index] or [r % n_comp]
        own = np.isin(comp_of, present)
        # Heavy templates: the role's own info templates, Dirichlet-sparse so a few dominate.
        heavy = np.zeros(n_templates)
        heavy[info & own] = rng.dirichlet(np.full(int((info & own).sum()), 0.8))
        background = np.where(info & ~own, 0.004 * rng.lognormal(0.0, 1.0, n_templates), 0.0)
        rare = np.zeros(n_templates)
        rare[kinds == "warn"] = np.where(own, 2e-3, 3e-4)[kinds == "warn"]
        rare[kinds == "error"] = np.where(own, 6e-4, 1e-4)[kinds == "error"]
        rare *= rng.lognormal(0.0, 0.5, n_templates)
        p = 0.93 * heavy + background + rare
        role_probs.append(p / p.sum())
        role_components.append(np.array(present))
        role_day.append((amp, peak))
    return _Fleet(
        names=names,
        kinds=kinds,
        component_of=comp_of,
        n_components=n_comp,
        role_names=[r[0] for r in _ROLES],
        role_components=role_components,
        role_probs=np.array(role_probs),
        role_day=np.array(role_day),
    )


def _make_client(
    rng: np.random.Generator, fleet: _Fleet, roles: tuple[int, ...], rate: float | None = None
) -> _Client:
    """Mix the client's roles and add its own quirks (template tweaks, rate, cycle)."""
    weights = rng.dirichlet(np.full(len(roles), 2.0)) if len(roles) > 1 else np.ones(1)
    probs = weights @ fleet.role_probs[list(roles)]
    probs = probs * rng.lognormal(0.0, 0.35, probs.size)
    probs /= probs.sum()
    if rate is None:
        rate = float(rng.lognormal(np.log(200.0), 0.8))
    amp = float(np.clip(weights @ fleet.role_day[list(roles), 0] + rng.normal(0, 0.05), 0, 0.95))
    peak = float(fleet.role_day[roles[int(np.argmax(weights))], 1] + rng.normal(0, 1.5))
    running = np.unique(np.concatenate([fleet.role_components[r] for r in roles]))
    heartbeats = np.zeros(probs.size)
    is_hb = (fleet.kinds == "heartbeat") & np.isin(fleet.component_of, running)
    heartbeats[is_hb] = rng.integers(6, 15, int(is_hb.sum()))
    return _Client(tuple(roles), probs, rate, amp, peak, heartbeats)


def _means(
    rng: np.random.Generator, client: _Client, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Expected activity counts and heartbeat counts for windows at times ``t`` (hours)."""
    phase = 2 * np.pi * ((t % 24) - client.peak) / 24
    day = (1 - client.amplitude) + client.amplitude * (0.5 + 0.5 * np.cos(phase))
    burst = rng.gamma(_WINDOW_GAMMA_SHAPE, 1 / _WINDOW_GAMMA_SHAPE, t.size)
    mu = (client.rate * day * burst)[:, None] * client.probs[None, :]
    hb = np.broadcast_to(client.heartbeats, mu.shape).copy()
    return mu, hb


def _sample(rng: np.random.Generator, mu: np.ndarray, hb: np.ndarray) -> np.ndarray:
    """Overdispersed (negative-binomial) activity plus nearly regular heartbeats."""
    counts = rng.poisson(rng.gamma(_NB_SHAPE, mu / _NB_SHAPE))
    counts += rng.binomial(hb.astype(np.int64), _HEARTBEAT_KEEP)
    return counts.astype(np.float32)


def _foreign_role(rng: np.random.Generator, fleet: _Fleet, client: _Client) -> int:
    others = [r for r in range(len(fleet.role_names)) if r not in client.roles]
    return int(rng.choice(others))


def _inject(
    rng: np.random.Generator,
    fleet: _Fleet,
    client: _Client,
    kind: int,
    mu: np.ndarray,
    hb: np.ndarray,
) -> None:
    """Turn one window's expected counts (in place) into an anomaly of type ``kind``."""
    own = np.isin(fleet.component_of, np.unique(fleet.component_of[client.heartbeats > 0]))
    if kind == RARE_BURST:
        active = fleet.kinds != "heartbeat"
        cutoff = np.quantile(client.probs[active], 0.3)
        candidates = np.flatnonzero(active & (client.probs <= cutoff))
        picked = rng.choice(
            candidates, size=min(len(candidates), rng.integers(2, 5)), replace=False
        )
        mu[picked] += rng.uniform(4.0, 25.0, picked.size)
    elif kind == ERROR_SPIKE:
        errors = np.flatnonzero((fleet.kinds == "error") & own)
        warns = np.flatnonzero((fleet.kinds == "warn") & own)
        picked = rng.choice(errors, size=min(len(errors), rng.integers(1, 3)), replace=False)
        mu[picked] = (mu[picked] + 0.2) * rng.uniform(10.0, 50.0, picked.size)
        mu[warns] = (mu[warns] + 0.1) * rng.uniform(2.0, 10.0, warns.size)
    elif kind == SILENT_COMPONENT:
        share = np.bincount(fleet.component_of, weights=mu, minlength=fleet.n_components)
        share[~np.isin(np.arange(fleet.n_components), fleet.component_of[own])] = -1
        dead = fleet.component_of == int(np.argmax(share))
        mu[dead] = 0.0
        hb[dead] = 0.0
    elif kind == FOREIGN_PROFILE:
        role = _foreign_role(rng, fleet, client)
        mu[:] = mu.sum() * fleet.role_probs[role] * rng.lognormal(0.0, 0.35, mu.size)
    elif kind == VOLUME_SURGE:
        top = np.argsort(mu)[::-1][: rng.integers(1, 3)]
        mu[top] *= rng.uniform(8.0, 30.0, top.size)
    else:
        raise ValueError(f"unknown anomaly type {kind}")


def _anomalies(
    rng: np.random.Generator,
    fleet: _Fleet,
    client: _Client,
    t: np.ndarray,
    kinds: np.ndarray,
) -> np.ndarray:
    mu, hb = _means(rng, client, t)
    for i, kind in enumerate(kinds):
        _inject(rng, fleet, client, int(kind), mu[i], hb[i])
    return _sample(rng, mu, hb)


def _balanced_types(rng: np.random.Generator, n: int) -> np.ndarray:
    """Anomaly codes in equal shares (each type gets >= 1/5 of n, rounded down)."""
    return rng.permutation(np.resize(np.array(ANOMALY_CODES, dtype=np.int8), n))


def _donor(rng: np.random.Generator, fleet: _Fleet, clients: list[_Client], k: int) -> _Client:
    """A device whose roles this device never has; synthesised if the fleet has none."""
    mine = set(clients[k].roles)
    donors = [c for j, c in enumerate(clients) if j != k and not mine & set(c.roles)]
    if donors:
        return donors[int(rng.integers(len(donors)))]
    return _make_client(rng, fleet, (_foreign_role(rng, fleet, clients[k]),), clients[k].rate)


def _check_args(**kw: float) -> None:
    if kw["clients"] < 2:
        raise ValueError("clients must be >= 2 (foreign-profile anomalies need another device)")
    if kw["templates"] < MIN_TEMPLATES:
        raise ValueError(f"templates must be >= {MIN_TEMPLATES}")
    if kw["windows_per_client"] < 8:
        raise ValueError("windows_per_client must be >= 8")
    if kw["holdout_benign"] < 1 or kw["holdout_anomalies"] < len(ANOMALY_CODES):
        raise ValueError(
            f"holdout needs >= 1 benign row and >= {len(ANOMALY_CODES)} anomalies "
            "(one per anomaly type)"
        )
    if kw["client_holdout_benign"] < 0 or kw["client_holdout_anomalies"] < 0:
        raise ValueError("per-client holdout sizes must be >= 0")
    if not 0.0 <= kw["contamination"] < 0.5:
        raise ValueError("contamination must be in [0, 0.5)")


def make_dataset(
    *,
    clients: int = 20,
    templates: int = 40,
    windows_per_client: int = 600,
    holdout_benign: int = 2000,
    holdout_anomalies: int = 400,
    client_holdout_benign: int = 100,
    client_holdout_anomalies: int = 25,
    contamination: float = 0.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Generate the arrays of the dataset (see module docstring for the format).

    Independent random streams per part keep e.g. the training data unchanged when
    only the holdout sizes change.
    """
    _check_args(
        clients=clients,
        templates=templates,
        windows_per_client=windows_per_client,
        holdout_benign=holdout_benign,
        holdout_anomalies=holdout_anomalies,
        client_holdout_benign=client_holdout_benign,
        client_holdout_anomalies=client_holdout_anomalies,
        contamination=contamination,
    )
    fleet_ss, train_ss, pooled_ss, local_ss = np.random.SeedSequence(seed).spawn(4)
    rng = np.random.default_rng(fleet_ss)
    fleet = _make_fleet(rng, templates)
    n_roles = len(fleet.role_names)
    primary = np.resize(rng.permutation(n_roles), clients)
    fleet_clients: list[_Client] = []
    for k in range(clients):
        roles = (int(primary[k]),)
        if rng.random() < 0.4:
            roles += (int(rng.choice([r for r in range(n_roles) if r != roles[0]])),)
        fleet_clients.append(_make_client(rng, fleet, roles))
    sizes = np.clip(
        np.round(windows_per_client * rng.lognormal(0.0, 0.6, clients)),
        max(2, windows_per_client // 4),
        2 * windows_per_client,
    ).astype(int)
    width = max(2, len(str(clients)))
    ids = [f"client-{k + 1:0{width}d}" for k in range(clients)]

    out: dict[str, np.ndarray] = {}
    for k, (cid, client, cl_ss) in enumerate(
        zip(ids, fleet_clients, train_ss.spawn(clients), strict=True)
    ):
        crng = np.random.default_rng(cl_ss)
        t = np.arange(sizes[k]) + crng.integers(0, 24 * 7)
        mu, hb = _means(crng, client, t)
        X = _sample(crng, mu, hb)
        bad = np.flatnonzero(crng.random(sizes[k]) < contamination)
        if bad.size:
            X[bad] = _anomalies(crng, fleet, client, t[bad], _balanced_types(crng, bad.size))
        out[f"X_{cid}"] = X

    # Pooled holdout: benign windows of random devices, anomalies of random devices.
    prng = np.random.default_rng(pooled_ss)
    rows_X, rows_type = [], []
    owner = prng.integers(0, clients, holdout_benign + holdout_anomalies)
    types = np.concatenate(
        [np.zeros(holdout_benign, np.int8), _balanced_types(prng, holdout_anomalies)]
    )
    t = prng.integers(0, 24 * 7, owner.size)
    for k in range(clients):
        sel = np.flatnonzero(owner == k)
        if not sel.size:
            continue
        mu, hb = _means(prng, fleet_clients[k], t[sel])
        for i, row in enumerate(sel):
            if types[row]:
                _inject(prng, fleet, fleet_clients[k], int(types[row]), mu[i], hb[i])
        rows_X.append(_sample(prng, mu, hb))
        rows_type.append(types[sel])
    perm = prng.permutation(owner.size)
    pooled_type = np.concatenate(rows_type)[perm]
    out["holdout_X"] = np.concatenate(rows_X)[perm]
    out["holdout_y"] = (pooled_type > 0).astype(np.int8)
    out["anomaly_type"] = pooled_type.astype(np.int8)
    out["holdout_owner"] = np.array(ids, dtype=str)[np.sort(owner, kind="stable")[perm]]

    # Per-client holdouts: future windows of the device, its own anomalies, and
    # windows of devices with other roles (normal for the fleet, not for it).
    if client_holdout_benign + client_holdout_anomalies > 0:
        for k, (cid, client, cl_ss) in enumerate(
            zip(ids, fleet_clients, local_ss.spawn(clients), strict=True)
        ):
            crng = np.random.default_rng(cl_ss)
            t0 = sizes[k] + 24 * 7
            kinds = _balanced_types(crng, client_holdout_anomalies)
            tb = t0 + np.arange(client_holdout_benign)
            ta = t0 + crng.integers(0, max(1, client_holdout_benign), kinds.size)
            parts = [_sample(crng, *_means(crng, client, tb))]
            foreign = kinds == FOREIGN_PROFILE
            parts.append(_anomalies(crng, fleet, client, ta[~foreign], kinds[~foreign]))
            donor = _donor(crng, fleet, fleet_clients, k)
            parts.append(_sample(crng, *_means(crng, donor, ta[foreign])))
            ktypes = np.concatenate(
                [np.zeros(tb.size, np.int8), kinds[~foreign], kinds[foreign]]
            ).astype(np.int8)
            perm = crng.permutation(ktypes.size)
            out[f"holdout_X_{cid}"] = np.concatenate(parts)[perm]
            out[f"holdout_y_{cid}"] = (ktypes[perm] > 0).astype(np.int8)
            out[f"holdout_anomaly_type_{cid}"] = ktypes[perm]

    out["feature_names"] = np.array(fleet.names, dtype=str)
    out["client_ids"] = np.array(ids, dtype=str)
    out["client_roles"] = np.array(
        ["+".join(fleet.role_names[r] for r in c.roles) for c in fleet_clients], dtype=str
    )
    out["anomaly_type_names"] = np.array(ANOMALY_TYPE_NAMES, dtype=str)
    return out


def save_dataset(arrays: dict[str, np.ndarray], path: str | os.PathLike[str]) -> Path:
    """Write an ``.npz`` with fixed zip timestamps so equal arrays give equal bytes.

    Written to a temporary file and renamed, so readers never see half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, value in arrays.items():
            arr = np.asarray(value)
            if arr.dtype.hasobject:
                raise ValueError(f"{key}: object arrays would need pickle to load")
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset; only clients and the pooled holdout are required in the file."""

    client_ids: list[str]
    clients: dict[str, np.ndarray]
    holdout_X: np.ndarray
    holdout_y: np.ndarray
    feature_names: list[str]
    client_holdouts: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    anomaly_type: np.ndarray | None = None
    anomaly_type_names: list[str] = field(default_factory=list)
    holdout_owner: np.ndarray | None = None  # client id (str) per pooled holdout row

    @property
    def n_features(self) -> int:
        return int(self.holdout_X.shape[1])


def _features(name: str, arr: np.ndarray, n_features: int | None) -> np.ndarray:
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D array, got shape {arr.shape}")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(f"{name}: has {arr.shape[1]} features, expected {n_features}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name}: expected real numbers, got dtype {arr.dtype}")
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return out


def _labels(name: str, y: np.ndarray, n_rows: int, *, need_both: bool) -> np.ndarray:
    if y.ndim != 1 or y.shape[0] != n_rows:
        raise ValueError(f"{name}: expected {n_rows} labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.number) or not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name}: labels must be 0 (benign) or 1 (anomaly)")
    y = y.astype(np.int8)
    if need_both and (y.min() == y.max()):
        raise ValueError(f"{name}: needs at least one benign and one anomalous row")
    return y


def load_dataset(path: str | os.PathLike[str]) -> Dataset:
    """Load and validate a dataset from this generator or any other source.

    Required arrays: ``X_<client_id>`` (one or more), ``holdout_X``, ``holdout_y``.
    Everything else is optional; no pickle is ever loaded.
    """
    arrays: dict[str, np.ndarray] = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            try:
                arrays[key] = z[key]
            except ValueError as exc:  # object arrays would need pickle
                raise ValueError(f"{path}: array {key!r} cannot be loaded safely: {exc}") from exc
    for key in ("holdout_X", "holdout_y"):
        if key not in arrays:
            raise ValueError(f"{path}: missing required array {key!r}")
    holdout_X = _features("holdout_X", arrays["holdout_X"], None)
    n_features = holdout_X.shape[1]
    holdout_y = _labels("holdout_y", arrays["holdout_y"], holdout_X.shape[0], need_both=True)

    found = sorted(key[2:] for key in arrays if key.startswith("X_"))
    if "client_ids" in arrays:
        client_ids = [str(c) for c in arrays["client_ids"]]
        missing = sorted(set(client_ids) - set(found))
        if missing:
            raise ValueError(f"{path}: client_ids lists clients without X_<id>: {missing}")
        client_ids += [c for c in found if c not in client_ids]
    else:
        client_ids = found
    if not client_ids:
        raise ValueError(f"{path}: no client arrays (X_<client_id>) found")
    clients = {c: _features(f"X_{c}", arrays[f"X_{c}"], n_features) for c in client_ids}

    if "feature_names" in arrays:
        feature_names = [str(n) for n in arrays["feature_names"]]
        if len(feature_names) != n_features:
            raise ValueError(
                f"feature_names has {len(feature_names)} entries, expected {n_features}"
            )
    else:
        feature_names = [f"f{i}" for i in range(n_features)]

    client_holdouts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for c in client_ids:
        xk, yk = f"holdout_X_{c}", f"holdout_y_{c}"
        if (xk in arrays) != (yk in arrays):
            raise ValueError(f"{path}: {xk} and {yk} must come together")
        if xk in arrays:
            X = _features(xk, arrays[xk], n_features)
            client_holdouts[c] = (X, _labels(yk, arrays[yk], X.shape[0], need_both=False))

    anomaly_type = None
    if "anomaly_type" in arrays:
        anomaly_type = arrays["anomaly_type"].astype(np.int8)
        if anomaly_type.shape != holdout_y.shape or not np.array_equal(
            anomaly_type > 0, holdout_y == 1
        ):
            raise ValueError("anomaly_type must be > 0 exactly where holdout_y == 1")
    names = [str(n) for n in arrays.get("anomaly_type_names", np.array([], dtype=str))]
    holdout_owner = None
    if "holdout_owner" in arrays:
        holdout_owner = arrays["holdout_owner"]
        if holdout_owner.shape != holdout_y.shape or holdout_owner.dtype.kind != "U":
            raise ValueError("holdout_owner must hold one client id (str) per holdout row")
        unknown = sorted(set(holdout_owner.tolist()) - set(client_ids))
        if unknown:
            raise ValueError(f"holdout_owner names clients without X_<id>: {unknown[:5]}")
    return Dataset(
        client_ids=client_ids,
        clients=clients,
        holdout_X=holdout_X,
        holdout_y=holdout_y,
        feature_names=feature_names,
        client_holdouts=client_holdouts,
        anomaly_type=anomaly_type,
        anomaly_type_names=names,
        holdout_owner=holdout_owner,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.make_dataset", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", required=True, help="output .npz file")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--templates", type=int, default=40, help="features (log templates)")
    parser.add_argument("--windows-per-client", type=int, default=600, help="mean; sizes vary")
    parser.add_argument("--holdout-benign", type=int, default=2000)
    parser.add_argument("--holdout-anomalies", type=int, default=400)
    parser.add_argument("--client-holdout-benign", type=int, default=100)
    parser.add_argument("--client-holdout-anomalies", type=int, default=25)
    parser.add_argument(
        "--contamination", type=float, default=0.0, help="anomaly share in training windows"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        arrays = make_dataset(
            clients=args.clients,
            templates=args.templates,
            windows_per_client=args.windows_per_client,
            holdout_benign=args.holdout_benign,
            holdout_anomalies=args.holdout_anomalies,
            client_holdout_benign=args.client_holdout_benign,
            client_holdout_anomalies=args.client_holdout_anomalies,
            contamination=args.contamination,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    path = save_dataset(arrays, args.out)
    ids = [str(c) for c in arrays["client_ids"]]
    summary = {
        "out": str(path),
        "clients": len(ids),
        "features": int(arrays["holdout_X"].shape[1]),
        "train_rows": int(sum(arrays[f"X_{c}"].shape[0] for c in ids)),
        "holdout_rows": int(arrays["holdout_X"].shape[0]),
        "holdout_anomalies": int(arrays["holdout_y"].sum()),
        "seed": args.seed,
    }
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
