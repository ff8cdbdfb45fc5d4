"""Where energy numbers come from: hardware counters when readable, estimates otherwise.

Every source reports *cumulative joules since it was started* through ``read_j()``, which
also samples the underlying counter (so it must be called often enough to catch a counter
wrap; the meter's poller does that for sources with ``needs_polling``). Each source carries
a ``method`` label that starts with ``"measured:"`` or ``"estimated:"``; nothing estimated
is ever labelled measured.

Sources:
  RaplSource       Linux powercap (intel-rapl:*; also AMD on recent kernels): package and
                   DRAM energy counters, whole socket / all processes, with wraparound.
  NvmlSource       NVIDIA's per-GPU total-energy counter (Volta and newer) via pynvml,
                   imported only if installed (package ``nvidia-ml-py``); whole GPU.
  CpuTimeEstimate  this process's CPU seconds (all threads, plus reaped children) x a
                   per-core power figure.
  DramRssEstimate  this process's resident memory, integrated over time, x watts per GB.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from tierec.errors import ConfigError

resource: ModuleType | None
try:  # Unix only; on other platforms the estimate counts this process only.
    import resource
except ImportError:  # pragma: no cover
    resource = None

DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"

# Per-core power for the CPU-time estimate: a TDP/cores figure for a common server part,
# Intel Xeon Gold 6248 (150 W TDP, 20 cores) = 7.5 W per busy core. Other parts: AMD EPYC
# 7763 280 W / 64 cores = 4.4 W; Intel Xeon Platinum 8480+ 350 W / 56 cores = 6.25 W.
# TDP is sustained full-load power, so this over- rather than under-states a busy core.
DEFAULT_CPU_WATTS_PER_CORE = 7.5
# Memory power per GB of resident memory: 0.3725 W/GB (Green Algorithms, Lannelongue et al.,
# Adv. Sci. 2021); CodeCarbon uses 3 W per 8 GB = 0.375 W/GB.
DEFAULT_DRAM_WATTS_PER_GB = 0.3725

ENV_CPU_WATTS = "TIEREC_CPU_WATTS_PER_CORE"
ENV_DRAM_WATTS = "TIEREC_DRAM_WATTS_PER_GB"

SOURCE_NAMES = ("auto", "estimate", "rapl", "nvml")


# --------------------------------------------------------------------------- process stats


def process_cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and of its reaped children.

    Children count once they have exited and been waited for (DataLoader workers do, at
    the end of an epoch); live children are not seen.
    """
    t = time.process_time()
    if resource is not None:
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        t += ch.ru_utime + ch.ru_stime
    return t


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_rss_bytes() -> int:
    """Current resident set size; peak RSS where /proc is missing (an over-estimate)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        pass
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    return 0  # pragma: no cover


# --------------------------------------------------------------------------- base class


class EnergySource:
    """One component of the energy total: ``name`` (cpu, dram, gpu) and how it is known."""

    name: str = "?"
    method: str = "?"
    needs_polling: bool = False  # counters that can wrap or need integrating over time

    @property
    def measured(self) -> bool:
        return self.method.startswith("measured:")

    @property
    def detail(self) -> str:
        return ""

    def start(self) -> None:
        raise NotImplementedError

    def read_j(self) -> float:
        """Joules since start(); samples now. Never decreases."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, method={self.method!r})"


# --------------------------------------------------------------------------- RAPL


@dataclass
class _RaplCounter:
    zone: str  # e.g. intel-rapl:0
    label: str  # e.g. package-0
    energy_path: Path
    max_uj: int  # counter range; 0 if unknown (a wrap then cannot be corrected)
    last: int = 0
    acc_uj: int = 0
    wraps: int = 0

    def read_raw(self) -> int:
        with open(self.energy_path, "rb") as f:
            return int(f.read().strip())

    def reset(self) -> None:
        self.last = self.read_raw()
        self.acc_uj = 0
        self.wraps = 0

    def sample(self) -> None:
        cur = self.read_raw()
        if cur >= self.last:
            self.acc_uj += cur - self.last
        elif self.max_uj > 0:  # wrapped past max_energy_range_uj
            self.acc_uj += cur + self.max_uj - self.last
            self.wraps += 1
        self.last = cur


def discover_rapl(root: str | os.PathLike | None = None) -> tuple[dict[str, list[_RaplCounter]], str | None]:
    """Readable RAPL zones under a powercap root, grouped as {"cpu": packages, "dram": dram}.

    Counted: top-level ``package-*`` zones and ``dram`` sub-zones. Skipped: ``core`` and
    ``uncore`` (inside the package), ``psys`` (the whole platform, overlaps the package).
    Returns ({}, reason) when nothing usable is readable.
    """
    base = Path(root if root is not None else DEFAULT_POWERCAP_ROOT)
    if not base.is_dir():
        return {}, f"no powercap directory at {base}"
    seen: set[str] = set()
    groups: dict[str, list[_RaplCounter]] = {}
    denied: list[str] = []
    dirs = sorted(set(base.glob("intel-rapl:*")) | set(base.glob("intel-rapl:*/intel-rapl:*")))
    for d in dirs:
        energy = d / "energy_uj"
        if not energy.exists():
            continue
        real = os.path.realpath(d)
        if real in seen:
            continue
        seen.add(real)
        try:
            label = (d / "name").read_text().strip()
        except OSError:
            continue
        top_level = d.name.count(":") == 1
        if top_level and label.startswith("package"):
            group = "cpu"
        elif label == "dram":
            group = "dram"
        else:
            continue
        try:
            max_uj = int((d / "max_energy_range_uj").read_text().strip())
        except (OSError, ValueError):
            max_uj = 0
        c = _RaplCounter(d.name, label, energy, max_uj)
        try:
            c.reset()
        except PermissionError:
            denied.append(str(energy))
            continue
        except (OSError, ValueError):
            continue
        groups.setdefault(group, []).append(c)
    if "cpu" not in groups:
        groups.pop("dram", None)  # DRAM without the package would be a misleading total
        if denied:
            return {}, (
                f"RAPL counters not readable ({denied[0]}: permission denied; energy_uj is root-only "
                "on most kernels since the CVE-2020-8694 fix, see docs/energy.md)"
            )
        return {}, f"no readable RAPL package zone under {base}"
    return groups, None


class RaplSource(EnergySource):
    """Summed RAPL counters of one kind: CPU packages ("cpu") or DRAM domains ("dram").

    The counters cover the whole socket / memory domain, i.e. every process on the machine,
    hence the label. ``needs_polling``: a 32-bit-ish counter range (often ~262 kJ) wraps
    within tens of minutes under load, and only one wrap per interval can be corrected.
    """

    needs_polling = True

    def __init__(self, name: str, counters: list[_RaplCounter]):
        if name not in ("cpu", "dram"):
            raise ValueError(name)
        self.name = name
        self.method = "measured:rapl (whole package)" if name == "cpu" else "measured:rapl (whole DRAM domain)"
        self.counters = counters

    @property
    def detail(self) -> str:
        return ",".join(c.label for c in self.counters)

    @property
    def wraps(self) -> int:
        return sum(c.wraps for c in self.counters)

    def start(self) -> None:
        for c in self.counters:
            c.reset()

    def read_j(self) -> float:
        for c in self.counters:
            c.sample()
        return sum(c.acc_uj for c in self.counters) / 1e6


def rapl_sources(root: str | os.PathLike | None = None) -> tuple[list[RaplSource], str | None]:
    groups, reason = discover_rapl(root)
    return [RaplSource(k, groups[k]) for k in ("cpu", "dram") if k in groups], reason


# --------------------------------------------------------------------------- NVML


def _import_pynvml():
    try:
        import pynvml  # provided by the `nvidia-ml-py` package (optional)
    except Exception as e:  # ImportError, or a broken install
        return None, f"pynvml not importable ({type(e).__name__}); `pip install nvidia-ml-py` to measure GPUs"
    return pynvml, None


def _visible_gpu_selectors(env: str | None) -> list[str] | None:
    if env is None:
        return None  # all devices
    return [s.strip() for s in env.split(",") if s.strip() and s.strip() != "-1"]


class NvmlSource(EnergySource):
    """Sum of NVML total-energy counters (millijoules since driver load) over visible GPUs.

    The counter belongs to the whole GPU, so other processes on the same GPU are included.
    A counter that goes backwards (driver reload) is re-based, never subtracted.
    """

    name = "gpu"
    method = "measured:nvml (whole GPU)"
    needs_polling = False  # 64-bit millijoule counter, no wrap in practice

    def __init__(self, nvml, handles: list, labels: list[str]):
        self.nvml = nvml
        self.handles = handles
        self.labels = labels
        self._last = [0] * len(handles)
        self._acc_mj = [0] * len(handles)

    @property
    def n_gpus(self) -> int:
        return len(self.handles)

    @property
    def detail(self) -> str:
        return ",".join(self.labels)

    def start(self) -> None:
        for i, h in enumerate(self.handles):
            self._last[i] = int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h))
            self._acc_mj[i] = 0

    def read_j(self) -> float:
        for i, h in enumerate(self.handles):
            cur = int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h))
            if cur >= self._last[i]:
                self._acc_mj[i] += cur - self._last[i]
            self._last[i] = cur
        return sum(self._acc_mj) / 1e3

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass


def open_nvml(visible: str | None = None, *, use_env: bool = True) -> tuple[NvmlSource | None, str | None]:
    """An NvmlSource over the GPUs this process may use, or (None, reason).

    GPUs are those in $CUDA_VISIBLE_DEVICES (indices are NVML's PCI-bus order, which CUDA
    also uses under CUDA_DEVICE_ORDER=PCI_BUS_ID; ``GPU-<uuid>`` entries are exact), or all.
    """
    nvml, reason = _import_pynvml()
    if nvml is None:
        return None, reason
    try:
        nvml.nvmlInit()
    except Exception as e:
        return None, f"NVML init failed ({e}); no NVIDIA driver?"
    try:
        count = int(nvml.nvmlDeviceGetCount())
        if visible is None and use_env:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        selectors = _visible_gpu_selectors(visible)
        if selectors is None:
            selectors = [str(i) for i in range(count)]
        elif not selectors:
            nvml.nvmlShutdown()
            return None, f"CUDA_VISIBLE_DEVICES={visible!r} hides all {count} GPU(s)"
        handles, labels, skipped = [], [], []
        for sel in selectors:
            try:
                if sel.isdigit():
                    if int(sel) >= count:
                        skipped.append(f"{sel} (no such device)")
                        continue
                    h = nvml.nvmlDeviceGetHandleByIndex(int(sel))
                elif sel.startswith("GPU-"):
                    h = nvml.nvmlDeviceGetHandleByUUID(sel)
                else:  # MIG-... instances: the counter is per physical GPU, cannot attribute
                    skipped.append(f"{sel} (MIG instance or unknown selector)")
                    continue
                nvml.nvmlDeviceGetTotalEnergyConsumption(h)  # NotSupported before Volta
            except Exception as e:
                skipped.append(f"{sel} ({type(e).__name__})")
                continue
            handles.append(h)
            labels.append(f"gpu{sel}" if sel.isdigit() else sel[:12])
        if not handles:
            nvml.nvmlShutdown()
            why = f"; skipped {', '.join(skipped)}" if skipped else ""
            return None, f"no GPU with an NVML energy counter ({count} device(s) seen{why})"
        return NvmlSource(nvml, handles, labels), None
    except Exception as e:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
        return None, f"NVML query failed ({type(e).__name__}: {e})"


# --------------------------------------------------------------------------- estimates


def resolve_watts(value: float | None, env: str, default: float, what: str) -> float:
    raw: float | str | None = value
    src = what
    if raw is None:
        env_raw = os.environ.get(env, "").strip()
        raw, src = (env_raw, f"${env}") if env_raw else (default, what)
    try:
        x = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{src} must be a number of watts, got {raw!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise ConfigError(f"{src} must be > 0 watts, got {raw!r}")
    return x


class CpuTimeEstimate(EnergySource):
    """Energy = this process's CPU seconds x watts per busy core (see DEFAULT_CPU_WATTS_PER_CORE)."""

    name = "cpu"
    method = "estimated:cpu-time"

    def __init__(self, watts_per_core: float = DEFAULT_CPU_WATTS_PER_CORE):
        self.watts_per_core = float(watts_per_core)
        self._cpu0 = 0.0

    @property
    def detail(self) -> str:
        return f"{self.watts_per_core:g} W/core"

    def start(self) -> None:
        self._cpu0 = process_cpu_seconds()

    def read_j(self) -> float:
        return max(0.0, process_cpu_seconds() - self._cpu0) * self.watts_per_core


class DramRssEstimate(EnergySource):
    """Energy = resident memory (GB, trapezoid-integrated over wall time) x watts per GB."""

    name = "dram"
    method = "estimated:dram-rss"
    needs_polling = True  # sampling RSS more often tracks a growing process better

    def __init__(self, watts_per_gb: float = DEFAULT_DRAM_WATTS_PER_GB, rss=process_rss_bytes, clock=time.monotonic):
        self.watts_per_gb = float(watts_per_gb)
        self._rss, self._clock = rss, clock
        self._t = 0.0
        self._gb = 0.0
        self._gb_s = 0.0

    @property
    def detail(self) -> str:
        return f"{self.watts_per_gb:g} W/GB"

    def start(self) -> None:
        self._t = self._clock()
        self._gb = self._rss() / 1e9
        self._gb_s = 0.0

    def read_j(self) -> float:
        t, gb = self._clock(), self._rss() / 1e9
        self._gb_s += max(0.0, t - self._t) * (gb + self._gb) / 2.0
        self._t, self._gb = t, gb
        return self._gb_s * self.watts_per_gb


def estimate_sources(
    cpu_watts_per_core: float | None = None, dram_watts_per_gb: float | None = None
) -> list[EnergySource]:
    """The CPU-time + RSS estimate, with power figures from arguments, environment or defaults."""
    cpu_w = resolve_watts(cpu_watts_per_core, ENV_CPU_WATTS, DEFAULT_CPU_WATTS_PER_CORE, "cpu_watts_per_core")
    dram_w = resolve_watts(dram_watts_per_gb, ENV_DRAM_WATTS, DEFAULT_DRAM_WATTS_PER_GB, "dram_watts_per_gb")
    return [CpuTimeEstimate(cpu_w), DramRssEstimate(dram_w)]


# --------------------------------------------------------------------------- selection


@dataclass
class Selection:
    sources: list[EnergySource]
    notes: list[str] = field(default_factory=list)  # why something was not measured


def _parse_spec(spec) -> list:
    if isinstance(spec, str):
        return [s.strip().lower() for s in spec.split(",") if s.strip()]
    if isinstance(spec, EnergySource):
        return [spec]
    if isinstance(spec, Iterable):
        return [s.strip().lower() if isinstance(s, str) else s for s in spec]
    raise ConfigError(f"sources must be 'auto', 'estimate', 'rapl', 'nvml' or a list of them, got {spec!r}")


def select_sources(
    spec="auto",
    *,
    powercap_root: str | os.PathLike | None = None,
    cpu_watts_per_core: float | None = None,
    dram_watts_per_gb: float | None = None,
) -> Selection:
    """Build the sources for a `sources=` spec.

    "auto": RAPL for CPU/DRAM if readable, else the CPU-time + RSS estimate; plus NVML
            for GPUs if pynvml and a GPU with an energy counter are present.
    "estimate": the CPU-time + RSS estimate only (nothing measured, no GPU).
    "rapl", "nvml": that counter, required (a ConfigError says why it is unavailable).
    A list (or comma-separated string) combines these; EnergySource objects pass through.
    """
    items = _parse_spec(spec)
    if not items:
        raise ConfigError("sources is empty; use 'auto' or 'estimate'")
    out: list[EnergySource] = []
    notes: list[str] = []
    for it in items:
        if isinstance(it, EnergySource):
            out.append(it)
        elif it == "auto":
            rapl, why = rapl_sources(powercap_root)
            if rapl:
                out.extend(rapl)
                if not any(s.name == "dram" for s in rapl):
                    notes.append("RAPL has no DRAM zone here: memory energy not included")
            else:
                notes.append(f"CPU energy estimated: {why}")
                out.extend(estimate_sources(cpu_watts_per_core, dram_watts_per_gb))
            gpu, why = open_nvml()
            if gpu is not None:
                out.append(gpu)
            else:
                notes.append(f"GPU energy not measured: {why}")
        elif it == "estimate":
            notes.append("estimate forced (sources='estimate'); GPUs, if any, are not included")
            out.extend(estimate_sources(cpu_watts_per_core, dram_watts_per_gb))
        elif it == "rapl":
            rapl, why = rapl_sources(powercap_root)
            if not rapl:
                raise ConfigError(f"sources='rapl' requested but {why}")
            out.extend(rapl)
        elif it == "nvml":
            gpu, why = open_nvml()
            if gpu is None:
                raise ConfigError(f"sources='nvml' requested but {why}")
            out.append(gpu)
        else:
            raise ConfigError(f"unknown energy source {it!r}; choose from {', '.join(SOURCE_NAMES)}")
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        for s in out:
            s.close()
        raise ConfigError(f"energy sources overlap on {', '.join(dup)} (would count it twice): {spec!r}")
    return Selection(out, notes)
