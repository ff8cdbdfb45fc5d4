"""Carbon arithmetic: grid intensity (operational) and amortised manufacturing (embodied).

Operational CO2e = energy [kWh] x PUE x grid carbon intensity [gCO2e/kWh].
Embodied CO2e    = footprint [kgCO2e] x 1000 x hours used / lifetime hours.

All figures here are defaults with their sources (see docs/energy.md); every one of them
can be overridden by an argument or an environment variable. Nothing here touches the
network.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from tierec.errors import ConfigError

J_PER_KWH = 3.6e6
HOURS_PER_YEAR = 8760.0  # 365 x 24

# Environment variables (arguments take precedence over these).
ENV_INTENSITY = "TIEREC_CARBON_INTENSITY"  # gCO2e/kWh, a number
ENV_REGION = "TIEREC_REGION"  # a key of REGIONS, e.g. FR
ENV_PUE = "TIEREC_PUE"  # data-centre power usage effectiveness, >= 1
ENV_EMBODIED_NODE_KG = "TIEREC_EMBODIED_NODE_KG"
ENV_EMBODIED_GPU_KG = "TIEREC_EMBODIED_GPU_KG"
ENV_EMBODIED_LIFETIME_YEARS = "TIEREC_EMBODIED_LIFETIME_YEARS"
ENV_EMBODIED_NODE_SHARE = "TIEREC_EMBODIED_NODE_SHARE"


@dataclass(frozen=True)
class RegionIntensity:
    g_per_kwh: float
    year: int
    source: str


_EMBER_OWID = "Ember yearly electricity data, lifecycle, via Our World in Data 'carbon-intensity-electricity'"
_EMBER_EU = "Ember 2023, EU power-sector intensity by country (as charted by Statista)"

# Yearly-average carbon intensity of electricity generation, gCO2e/kWh.
# Ember figures are lifecycle (incl. upstream methane, supply chain), 100-year GWP.
REGIONS: dict[str, RegionIntensity] = {
    "WORLD": RegionIntensity(480, 2023, "Ember, Global Electricity Review 2024 (global average 2023)"),
    "AT": RegionIntensity(111, 2023, _EMBER_OWID),
    "AU": RegionIntensity(549, 2023, _EMBER_OWID),
    "BE": RegionIntensity(138, 2023, _EMBER_OWID),
    "BR": RegionIntensity(98, 2023, _EMBER_OWID),
    "CA": RegionIntensity(170, 2023, _EMBER_OWID),
    "CN": RegionIntensity(582, 2023, _EMBER_OWID),
    "CZ": RegionIntensity(450, 2023, _EMBER_OWID),
    "DE": RegionIntensity(381, 2023, _EMBER_OWID),
    "DK": RegionIntensity(152, 2023, _EMBER_OWID),
    "FI": RegionIntensity(79, 2023, _EMBER_OWID),
    "FR": RegionIntensity(56, 2023, _EMBER_OWID),
    "IE": RegionIntensity(291, 2023, _EMBER_OWID),
    "IN": RegionIntensity(713, 2023, _EMBER_OWID),
    "NO": RegionIntensity(30, 2023, "Ember 2023, as charted by Statista (943137)"),
    "PL": RegionIntensity(662, 2023, _EMBER_EU),
    "SE": RegionIntensity(41, 2023, _EMBER_EU),
    # EIA: 0.81 lb CO2/kWh for utility-scale net generation in 2023 = 367 g/kWh.
    # Direct CO2 at the plant, not lifecycle: somewhat lower than an Ember-style figure.
    "US": RegionIntensity(367, 2023, "US EIA FAQ 'How much CO2 is produced per kWh' (2023, direct CO2)"),
}
DEFAULT_REGION = "WORLD"


def known_regions() -> list[str]:
    return sorted(REGIONS)


def region_intensity(region: str) -> RegionIntensity:
    """Look a region up (case-insensitive); an unknown one is a `ConfigError` listing the known."""
    key = region.strip().upper()
    if key not in REGIONS:
        raise ConfigError(
            f"unknown carbon-intensity region {region!r}; known regions: {', '.join(known_regions())} "
            f"(or give a number with intensity_g_per_kwh= / ${ENV_INTENSITY})"
        )
    return REGIONS[key]


def _positive_number(value, what: str, *, allow_zero: bool = True) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise ConfigError(f"{what} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return x


@dataclass(frozen=True)
class Intensity:
    """The grid intensity a run is charged with, and where the number came from."""

    g_per_kwh: float
    region: str | None  # table key, or None for a number given directly
    source: str  # human-readable provenance

    @property
    def label(self) -> str:
        return self.region if self.region else "custom"


def resolve_intensity(region: str | None = None, intensity_g_per_kwh: float | None = None) -> Intensity:
    """Pick the grid intensity: arguments first, then environment, then the world default.

    Order: ``intensity_g_per_kwh`` > ``region`` > ``$TIEREC_CARBON_INTENSITY`` > ``$TIEREC_REGION``
    > ``WORLD`` (Ember 2023 global average).
    """
    if intensity_g_per_kwh is not None:
        g = _positive_number(intensity_g_per_kwh, "intensity_g_per_kwh")
        return Intensity(g, None, "given as an argument")
    if region is not None:
        r = region_intensity(region)
        return Intensity(float(r.g_per_kwh), region.strip().upper(), f"{r.source}, {r.year}")
    env_g = os.environ.get(ENV_INTENSITY, "").strip()
    if env_g:
        g = _positive_number(env_g, f"${ENV_INTENSITY}")
        return Intensity(g, None, f"${ENV_INTENSITY}")
    env_r = os.environ.get(ENV_REGION, "").strip()
    key = env_r or DEFAULT_REGION
    r = region_intensity(key)
    return Intensity(float(r.g_per_kwh), key.upper(), f"{r.source}, {r.year}")


def resolve_pue(pue: float | None = None) -> float:
    """Power usage effectiveness (facility energy / IT energy); 1.0 unless given or set in $TIEREC_PUE."""
    raw: float | str | None = pue
    if raw is None:
        env = os.environ.get(ENV_PUE, "").strip()
        raw = env if env else 1.0
        what = f"${ENV_PUE}" if env else "pue"
    else:
        what = "pue"
    x = _positive_number(raw, what, allow_zero=False)
    if x < 1.0:
        raise ConfigError(f"{what} must be >= 1 (facility energy / IT energy), got {raw!r}")
    return x


def kwh(joules: float) -> float:
    return joules / J_PER_KWH


def operational_gco2e(joules: float, g_per_kwh: float, pue: float = 1.0) -> float:
    """Grams CO2e for `joules` of IT energy on a grid of `g_per_kwh`, times the facility PUE."""
    return kwh(joules) * pue * g_per_kwh


def amortised_gco2e(footprint_kgco2e: float, hours_used: float, lifetime_hours: float) -> float:
    """Manufacturing footprint charged to `hours_used` of a `lifetime_hours` life, in grams."""
    if lifetime_hours <= 0:
        raise ConfigError(f"hardware lifetime must be > 0 hours, got {lifetime_hours!r}")
    return footprint_kgco2e * 1000.0 * hours_used / lifetime_hours


@dataclass(frozen=True)
class EmbodiedConfig:
    """Manufacturing footprint of the hardware a run occupies, amortised per hour of wall time.

    Defaults follow Luccioni, Viguier & Ligozat, "Estimating the Carbon Footprint of BLOOM"
    (JMLR 24(253), 2023): 2,500 kgCO2e for a GPU server node without its GPUs (HPE Apollo
    6500 Gen10 Plus), 150 kgCO2e per GPU, and a 6-year service life. See docs/energy.md.

    node_kgco2e:    footprint of the host (CPUs, memory, board, chassis, PSU, storage).
    gpu_kgco2e:     footprint of one GPU.
    n_gpus:         GPUs charged to the run; None = the GPUs the meter measures (0 without NVML).
    lifetime_years: service life over which the footprint is spread (8,760 h a year).
    node_share:     fraction of the host charged to this run (e.g. 0.25 when a job gets a
                    quarter of a shared node); GPUs are charged whole.
    """

    node_kgco2e: float = 2500.0
    gpu_kgco2e: float = 150.0
    n_gpus: int | None = None
    lifetime_years: float = 6.0
    node_share: float = 1.0

    def __post_init__(self):
        for name in ("node_kgco2e", "gpu_kgco2e"):
            _positive_number(getattr(self, name), f"EmbodiedConfig.{name}")
        _positive_number(self.lifetime_years, "EmbodiedConfig.lifetime_years", allow_zero=False)
        share = _positive_number(self.node_share, "EmbodiedConfig.node_share")
        if share > 1.0:
            raise ConfigError(f"EmbodiedConfig.node_share must be in [0, 1], got {self.node_share!r}")
        if self.n_gpus is not None and (int(self.n_gpus) != self.n_gpus or self.n_gpus < 0):
            raise ConfigError(f"EmbodiedConfig.n_gpus must be a whole number >= 0, got {self.n_gpus!r}")

    @classmethod
    def none(cls) -> EmbodiedConfig:
        """No embodied charge (e.g. when it is accounted for elsewhere)."""
        return cls(node_kgco2e=0.0, gpu_kgco2e=0.0)

    @classmethod
    def from_env(cls) -> EmbodiedConfig:
        """Defaults, overridden by any of $TIEREC_EMBODIED_{NODE_KG,GPU_KG,LIFETIME_YEARS,NODE_SHARE}."""
        kw: dict[str, Any] = {}
        for env, field, conv in (
            (ENV_EMBODIED_NODE_KG, "node_kgco2e", float),
            (ENV_EMBODIED_GPU_KG, "gpu_kgco2e", float),
            (ENV_EMBODIED_LIFETIME_YEARS, "lifetime_years", float),
            (ENV_EMBODIED_NODE_SHARE, "node_share", float),
        ):
            raw = os.environ.get(env, "").strip()
            if raw:
                try:
                    kw[field] = conv(raw)
                except ValueError:
                    raise ConfigError(f"${env} must be a number, got {raw!r}") from None
        return cls(**kw)

    @property
    def lifetime_hours(self) -> float:
        return self.lifetime_years * HOURS_PER_YEAR

    def footprint_kgco2e(self, n_gpus: int) -> float:
        return self.node_kgco2e * self.node_share + self.gpu_kgco2e * n_gpus

    def gco2e(self, hours_used: float, n_gpus_seen: int = 0) -> float:
        """Embodied grams CO2e charged for `hours_used` of wall time."""
        n = self.n_gpus if self.n_gpus is not None else n_gpus_seen
        return amortised_gco2e(self.footprint_kgco2e(int(n)), hours_used, self.lifetime_hours)
