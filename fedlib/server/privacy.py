"""Differential privacy of federated rounds: config, accounting, noise, adaptive clipping.

Two per-deployment modes (``ServerSettings.dp_mode``), both at the level of a whole
device (client-level DP: the protected unit is everything one device contributes):

* **central** (the server is trusted with single updates, not the published model):
  each device clips its delta to L2 norm ``C`` (the package's ``training.clip_norm``);
  the server takes at most one update per device per round, enforces ``C`` again
  (the hard ``norm_bound`` refuses garbage, then every accepted delta is projected
  onto the ``C`` ball, so a stale update clipped at an older, larger ``C`` still fits),
  gives every update the same weight 1, sums them exactly and adds
  ``N(0, (z_sum * C)**2)`` per coordinate to the sum **once**, when the candidate is
  built (never per shard), then divides by the number of updates. Optional adaptive
  clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
  Clipping"): each device reports one bit, "my norm was <= C before clipping"; the
  server adds ``N(0, sigma_b**2)`` to the centered bit sum and moves ``C`` geometrically,
  ``C <- C * exp(-eta * (b_noisy - target_quantile))``, toward the target quantile of
  the norms; the next ``C`` travels to the devices in the signed package.
* **local** (devices do not trust the server): each device clips to ``C`` and adds
  ``N(0, (z * C)**2)`` per coordinate to its own delta before compressing and sealing;
  the server only averages already-private updates (post-processing).

Sensitivity and adjacency. Central mode: two fleets are neighbors when one device's
data is replaced by a "null" device that contributes a zero delta and a centered bit of
0 ("zero-out" adjacency, Kairouz et al. 2021, "Practical and Private (Deep) Learning
without Sampling or Shuffling"). The participant count is then the same in both, so
dividing the noised sum by the exact count is post-processing, and the L2 sensitivity
of the sum is ``C`` (one clipped delta), of the centered bit sum 1/2. Participation
itself (which devices uploaded, and how many) is not hidden: the server's ledger and
the round report record it. Local mode: a device's input may change arbitrarily
(replace-one), so the sensitivity of its clipped delta is ``2C`` and each upload is a
Gaussian mechanism with multiplier ``z / 2``.

Accounting (:class:`Accountant`, over Google's ``dp-accounting``): RDP by default
(PLD on request). Each round is one Gaussian mechanism (central with adaptive
clipping: two, the sum's ``z_sum`` and the bit query's ``2 * sigma_b``, which together
equal a single Gaussian of multiplier ``z`` with ``z**-2 = z_sum**-2 + (2*sigma_b)**-2``:
Andrew et al.'s noise-multiplier adjustment), composed over rounds. No amplification
by sampling is claimed: devices choose when to participate, so the server cannot
vouch for a random sample. Every round whose noised aggregate is computed is charged,
published or not (the gate may refuse it, a dry run may evaluate it): conservative.
Local mode: the server's figure charges every device one Gaussian(z / 2) per counted
round (it uses one update per device per round, and the agent sends at most one per
model version); since an untrusted server sees every upload, the binding guarantee is
the device's own: it stops after ``max_updates`` noised uploads, the most the budget
allows, whatever the server counts.

Noise. The server's noise must be reproducible by the server (backfills recompute a
round and compare digests) and unpredictable to anyone else: its seed is
HMAC-SHA256(secret, round id), with a 32-byte secret kept next to the server's other
private keys (:data:`NOISE_SECRET_FILE` in ``keys_dir``), and seeds numpy's PCG64. That
generator is not a CSPRNG and the sampler draws floating-point Gaussians, so the known
floating-point attacks on Gaussian/Laplace samplers (Mironov 2012) are not addressed;
an attacker sees only noised aggregates, never raw draws. Devices draw their local
noise from OS entropy.

No Airflow import here; ``dp_accounting`` is imported where accounting happens, so a
deployment with DP off never needs it.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import os
import secrets
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dp_accounting import DpEvent, PrivacyAccountant

MODES = ("off", "central", "local")
ACCOUNTANTS = ("rdp", "pld")
NOISE_SECRET_FILE = "dp-noise-secret.bin"  # noqa: S105 (a file name in keys_dir)
NOISE_SECRET_BYTES = 32
_SEED_DOMAIN = b"dadm-fl/dp-noise/v1\x00"
#: Local mode: the server's hard norm bound must admit clipped delta + noise. The noise
#: norm is chi-distributed, ``||N(0, s^2 I_d)|| <= s * (sqrt(d) + t)`` except with
#: probability ``exp(-t**2 / 2)``: with t = 10 an honest update is refused ~never.
_LOCAL_NORM_TAIL = 10.0
MIN_CLIP_NORM = 1e-6


@dataclass(frozen=True)
class PrivacyConfig:
    """One deployment's DP choice (built by ``ServerSettings.privacy()``).

    Exactly one of ``noise_multiplier`` (z, the total per-round multiplier) and
    ``target_epsilon`` (calibrate z so that ``rounds`` rounds spend it at ``delta``)
    sets the noise when the mode is not "off".
    """

    mode: str = "off"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    rounds: int = 100
    delta: float = 1e-5
    clip_norm: float = 1.0
    adaptive_clipping: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    #: sigma_b, the noise on the clipped-count sum; None: see :attr:`count_stddev`.
    clipped_count_stddev: float | None = None
    expected_clients: int = 100
    accountant: str = "rdp"
    budget_epsilon: float | None = None
    #: Upper limit on the adaptive C (the server's hard norm bound refuses anything above).
    max_clip_norm: float = math.inf

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"dp mode must be one of {MODES}, not {self.mode!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"dp accountant must be one of {ACCOUNTANTS}")
        if not (0 < self.delta < 1):
            raise ValueError("dp delta must be in (0, 1)")
        if not (0 < self.clip_norm < math.inf):
            raise ValueError("dp clip norm must be a positive number")
        if self.rounds < 1:
            raise ValueError("dp rounds must be >= 1")
        if not (0 < self.target_quantile < 1):
            raise ValueError("dp target quantile must be in (0, 1)")
        if not (0 <= self.clip_learning_rate <= 10):
            raise ValueError("dp clip learning rate must be in [0, 10]")
        if self.expected_clients < 1:
            raise ValueError("dp expected clients must be >= 1")
        if self.budget_epsilon is not None and not self.budget_epsilon > 0:
            raise ValueError("dp budget epsilon must be > 0")
        if self.clipped_count_stddev is not None and not self.clipped_count_stddev > 0:
            raise ValueError("dp clipped-count stddev must be > 0")
        if not self.enabled:
            return
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("dp needs exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None and not (0 < self.noise_multiplier < 1e6):
            raise ValueError("dp noise multiplier must be in (0, 1e6)")
        if self.target_epsilon is not None and not (0 < self.target_epsilon < 1e4):
            raise ValueError("dp target epsilon must be in (0, 1e4)")
        if self.adaptive_clipping and self.mode == "central":
            z, sb = self.total_noise_multiplier, 2 * self.count_stddev
            if sb <= z:
                raise ValueError(
                    f"adaptive clipping: 2 * clipped-count stddev ({sb:.4g}) must exceed the "
                    f"noise multiplier ({z:.4g}); raise dp_clipped_count_stddev or "
                    "dp_expected_clients"
                )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def adaptive(self) -> bool:
        """Adaptive clipping in effect (central mode only: local has no trusted counter)."""
        return self.enabled and self.mode == "central" and self.adaptive_clipping

    @property
    def total_noise_multiplier(self) -> float:
        """z: central, the per-round Gaussian-equivalent multiplier of everything the round
        releases; local, the device's noise std over C (its event is Gaussian(z / 2))."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        if self.target_epsilon is None:
            raise ValueError("dp is off")
        z = calibrate_noise(self.target_epsilon, self.delta, self.rounds, self.accountant)
        return 2 * z if self.mode == "local" else z

    @property
    def count_stddev(self) -> float:
        """sigma_b, the std of the noise on the centered clipped-count sum.

        Default: Andrew et al.'s ``m / 20`` (a ~5% standard error on the fraction), but
        never below ``z * sqrt(10) / 2``, where the bit query takes 10% of the round's
        RDP (the sum's noise grows by 1/sqrt(0.9), 5%). With few devices and much noise
        the fraction is then too noisy to steer C: use a fixed C there.
        """
        if self.clipped_count_stddev is not None:
            return self.clipped_count_stddev
        return max(self.expected_clients / 20.0, self.total_noise_multiplier * math.sqrt(10) / 2)

    @property
    def sum_noise_multiplier(self) -> float:
        """z_sum: the multiplier on the delta sum once the bit query took its share."""
        z = self.total_noise_multiplier
        if not self.adaptive:
            return z
        return (z**-2 - (2 * self.count_stddev) ** -2) ** -0.5

    def round_multipliers(self) -> tuple[float, ...]:
        """The Gaussian mechanisms one round runs, as noise multipliers over sensitivity."""
        if self.mode == "local":
            return (self.total_noise_multiplier / 2,)
        if self.adaptive:
            return (self.sum_noise_multiplier, 2 * self.count_stddev)
        return (self.total_noise_multiplier,)

    def local_norm_bound(self, clip_norm: float, dim: int) -> float:
        """The norm a local-mode update (clipped delta + the device's noise) stays under."""
        return clip_norm * (1 + self.total_noise_multiplier * (math.sqrt(dim) + _LOCAL_NORM_TAIL))

    def max_device_updates(self) -> int | None:
        """Local mode: how many DP updates one device may send within the budget."""
        if self.mode != "local" or self.budget_epsilon is None:
            return None
        return max_rounds_within(
            self.round_multipliers(), self.budget_epsilon, self.delta, self.accountant
        )


# -- accounting ----------------------------------------------------------------------------


def _event(multipliers: Sequence[float]) -> DpEvent:
    import dp_accounting

    events = [dp_accounting.GaussianDpEvent(float(m)) for m in multipliers]
    return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


def _make_accountant(kind: str) -> PrivacyAccountant:
    import dp_accounting

    if kind == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    if kind == "pld":
        return dp_accounting.pld.PLDAccountant()
    raise ValueError(f"unknown accountant {kind!r}")


class Accountant:
    """Composition of per-round Gaussian mechanisms over ``dp_accounting``.

    ``add(multipliers, count)`` charges ``count`` rounds, each running the Gaussian
    mechanisms ``multipliers`` (noise std over L2 sensitivity); identical rounds are
    composed as one self-composed event, so the cost does not grow with history.
    """

    def __init__(self, kind: str = "rdp") -> None:
        if kind not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {kind!r}")
        self.kind = kind
        self._rounds: Counter[tuple[float, ...]] = Counter()

    def add(self, multipliers: Sequence[float], count: int = 1) -> Accountant:
        if count < 0:
            raise ValueError("count must be >= 0")
        if not multipliers or any(not (m > 0 and math.isfinite(m)) for m in multipliers):
            raise ValueError(f"noise multipliers must be positive and finite: {multipliers}")
        if count:
            self._rounds[tuple(float(m) for m in multipliers)] += count
        return self

    @property
    def rounds(self) -> int:
        return sum(self._rounds.values())

    def copy(self) -> Accountant:
        other = Accountant(self.kind)
        other._rounds = self._rounds.copy()
        return other

    def epsilon(self, delta: float) -> float:
        """The (epsilon, delta)-DP epsilon of everything charged so far (0 with nothing)."""
        if not self._rounds:
            return 0.0
        import dp_accounting

        accountant = _make_accountant(self.kind)
        for multipliers, count in sorted(self._rounds.items()):
            accountant.compose(dp_accounting.SelfComposedDpEvent(_event(multipliers), count))
        return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def calibrate_noise(
    target_epsilon: float, delta: float, rounds: int, accountant: str = "rdp"
) -> float:
    """The smallest Gaussian noise multiplier (std over L2 sensitivity) such that
    ``rounds`` rounds cost at most ``target_epsilon`` at ``delta`` (dp_accounting's
    calibration: the result is on the private side of the tolerance)."""
    import dp_accounting

    if not (target_epsilon > 0 and 0 < delta < 1 and rounds >= 1):
        raise ValueError("calibrate_noise needs epsilon > 0, delta in (0, 1), rounds >= 1")
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _make_accountant(accountant),
            lambda z: dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), rounds),
            target_epsilon,
            delta,
            dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
            tol=1e-4,
        )
    )


def max_rounds_within(
    multipliers: Sequence[float], budget_epsilon: float, delta: float, accountant: str = "rdp"
) -> int:
    """The most rounds of ``multipliers`` whose composition stays within the budget."""

    def fits(k: int) -> bool:
        return k == 0 or Accountant(accountant).add(multipliers, k).epsilon(delta) <= budget_epsilon

    hi = 1
    while fits(hi):
        if hi >= 1 << 24:
            return hi
        hi *= 2
    lo = hi // 2  # fits(lo) holds (or lo == 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# -- noise ---------------------------------------------------------------------------------


def load_noise_secret(keys_dir: Path | str, *, create: bool = True) -> bytes:
    """The server's noise secret, created (32 random bytes, mode 0600) on first use.

    Kept in ``keys_dir`` next to the HPKE and signing keys: whoever holds it can
    predict, and so subtract, the server's noise. A read-only secrets mount must hold
    it already: create it once with ``fl-admin privacy init-secret KEYS_DIR``.
    """
    path = Path(keys_dir) / NOISE_SECRET_FILE
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        if not create:
            raise
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another task created it first: use theirs
            secret = path.read_bytes()
        except OSError as exc:
            raise FileNotFoundError(
                f"{path} is missing and {path.parent} is not writable ({exc}); create it "
                f"once with: fl-admin privacy init-secret {path.parent}"
            ) from None
        else:
            secret = secrets.token_bytes(NOISE_SECRET_BYTES)
            with os.fdopen(fd, "wb") as handle:
                handle.write(secret)
                handle.flush()
                os.fsync(handle.fileno())
    if len(secret) < NOISE_SECRET_BYTES:
        raise ValueError(f"{path} holds {len(secret)} bytes, expected {NOISE_SECRET_BYTES}")
    return secret


def noise_seed(secret: bytes, round_id: str) -> bytes:
    """HMAC-SHA256(secret, domain || round id): the round's noise seed (32 bytes)."""
    if len(secret) < NOISE_SECRET_BYTES:
        raise ValueError("noise secret is too short")
    return hmac.new(secret, _SEED_DOMAIN + round_id.encode(), hashlib.sha256).digest()


def noise_rng(secret: bytes, round_id: str) -> np.random.Generator:
    """The round's noise generator: PCG64 seeded with all 256 bits of :func:`noise_seed`."""
    entropy = int.from_bytes(noise_seed(secret, round_id), "big")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def clip_to(values: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """``values`` scaled onto the L2 ball of radius ``clip_norm``; returns (values, norm)."""
    norm = float(np.linalg.norm(values))
    if norm > clip_norm:
        return values * (clip_norm / norm), norm
    return values, norm


# -- adaptive clipping ---------------------------------------------------------------------


def noisy_unclipped_fraction(
    unclipped: int, reported: int, stddev: float, rng: np.random.Generator
) -> float | None:
    """Andrew et al.'s private estimate of the share of updates that needed no clipping:
    ``(sum(b_i - 1/2) + N(0, stddev**2)) / n + 1/2`` over the ``reported`` bits, of which
    ``unclipped`` are 1. Always one draw from ``rng``, so the generator's state after it
    does not depend on the data. None when no device reported a bit."""
    if not 0 <= unclipped <= reported:
        raise ValueError("unclipped must be in [0, reported]")
    draw = float(rng.normal(0.0, stddev))
    if reported == 0:
        return None
    return (unclipped - reported / 2 + draw) / reported + 0.5


def next_clip_norm(
    clip_norm: float,
    unclipped_fraction: float | None,
    *,
    target_quantile: float,
    learning_rate: float,
    max_clip_norm: float = math.inf,
) -> float:
    """Geometric update toward the target quantile: ``C * exp(-eta * (b - gamma))``.

    Too many unclipped updates (b > gamma) shrink C; too few grow it. Kept within
    [MIN_CLIP_NORM, max_clip_norm]; unchanged when no device reported.
    """
    if unclipped_fraction is None:
        return clip_norm
    new = clip_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile))
    return float(min(max(new, MIN_CLIP_NORM), max_clip_norm))


# -- one round -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundRelease:
    """What one central-DP round adds to its exact aggregate, and what it reports."""

    noisy_mean: np.ndarray
    next_clip_norm: float
    unclipped_fraction: float | None


def release_round(
    config: PrivacyConfig,
    mean_delta: np.ndarray,
    count: int,
    clip_norm: float,
    unclipped: tuple[int, int],
    rng: np.random.Generator,
) -> RoundRelease:
    """Central mode: the noised mean ``(sum + N(0, (z_sum*C)^2 I)) / count`` and, with
    adaptive clipping, the next C. Local mode: the mean as it is (already private).

    ``mean_delta`` is the exact mean of ``count`` updates of weight 1, each within
    ``clip_norm``; ``unclipped`` is (bits that are 1, bits reported). Draws happen in a
    fixed order (delta noise, then the count noise), so a round's release is a function
    of (inputs, rng seed) only.
    """
    if count < 1:
        raise ValueError("a DP release needs at least one update")
    if config.mode != "central":
        return RoundRelease(np.asarray(mean_delta, dtype=np.float64), clip_norm, None)
    std = config.sum_noise_multiplier * clip_norm
    noise = rng.normal(0.0, std, size=mean_delta.shape)
    noisy = np.asarray(mean_delta, dtype=np.float64) + noise / count
    fraction = None
    new_clip = clip_norm
    if config.adaptive:
        fraction = noisy_unclipped_fraction(*unclipped, config.count_stddev, rng)
        new_clip = next_clip_norm(
            clip_norm,
            fraction,
            target_quantile=config.target_quantile,
            learning_rate=config.clip_learning_rate,
            max_clip_norm=config.max_clip_norm,
        )
    return RoundRelease(noisy, new_clip, fraction)


def spend_summary(
    config: PrivacyConfig, accountant: Accountant, clip_norm: float
) -> dict[str, Any]:
    """The ``PrivacySpent`` fields for packages and reports, from what was charged (an
    unbounded epsilon, from a negligible noise multiplier, is written as the largest
    float: JSON has no infinity)."""
    epsilon = accountant.epsilon(config.delta)
    return {
        "mode": config.mode,
        "epsilon": epsilon if math.isfinite(epsilon) else sys.float_info.max,
        "delta": config.delta,
        "rounds": accountant.rounds,
        "accountant": config.accountant,
        "noise_multiplier": config.total_noise_multiplier,
        "clip_norm": clip_norm,
        "budget_epsilon": config.budget_epsilon,
    }
