"""The energy meter and its report.

    with tierec.energy.meter(work_unit="samples") as m:
        for batch in loader:
            step(batch)
            m.add_work(len(batch))
    print(m.report().summary_line())

``snapshot()`` gives a live reading of a running meter (cheap: a few sysfs reads / NVML
calls and getrusage); its energies and counts never decrease, so a server can export them
as counters.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from tierec.energy.carbon import (
    EmbodiedConfig,
    Intensity,
    kwh,
    operational_gco2e,
    resolve_intensity,
    resolve_pue,
)
from tierec.energy.sources import EnergySource, Selection, process_cpu_seconds, select_sources

log = logging.getLogger("tierec.energy")

DEFAULT_POLL_S = 30.0


@dataclass(frozen=True)
class Component:
    """One part of the energy total, e.g. ("cpu", "measured:rapl (whole package)", 812.4)."""

    name: str  # cpu | dram | gpu | a custom source's name
    method: str  # "measured:<how> ..." or "estimated:<how>"
    joules: float
    detail: str = ""  # zones, devices or the power figure used

    @property
    def measured(self) -> bool:
        return self.method.startswith("measured:")


def _per_1k(x: float, units: float) -> float | None:
    return x / units * 1000.0 if units > 0 else None


@dataclass(frozen=True)
class EnergyReport:
    """Energy and CO2e of one run (or of a running meter so far, when ``final`` is False).

    ``measured`` is True only if every component was measured by a hardware counter;
    an estimate anywhere makes it False and puts "estimated" in ``summary_line()``.
    """

    wall_s: float
    cpu_s: float  # this process's CPU seconds (all threads + reaped children)
    components: tuple[Component, ...]
    total_j: float
    measured: bool
    kwh: float
    intensity_g_per_kwh: float
    region: str  # region key, or "custom" for a number given directly
    pue: float
    operational_gco2e: float
    embodied_gco2e: float
    total_gco2e: float
    work_units: float
    work_unit: str  # "samples", "requests", ...
    j_per_1k: float | None  # None when no work was counted
    gco2e_per_1k: float | None
    final: bool  # True once the meter has stopped
    notes: tuple[str, ...] = ()  # why something was estimated or left out

    @classmethod
    def build(
        cls,
        *,
        wall_s: float,
        cpu_s: float,
        components: tuple[Component, ...],
        intensity: Intensity,
        pue: float,
        embodied_gco2e: float,
        work_units: float,
        work_unit: str,
        final: bool,
        notes: tuple[str, ...] = (),
    ) -> EnergyReport:
        total_j = float(sum(c.joules for c in components))
        op = operational_gco2e(total_j, intensity.g_per_kwh, pue)
        total_g = op + embodied_gco2e
        return cls(
            wall_s=wall_s,
            cpu_s=cpu_s,
            components=components,
            total_j=total_j,
            measured=bool(components) and all(c.measured for c in components),
            kwh=kwh(total_j),
            intensity_g_per_kwh=intensity.g_per_kwh,
            region=intensity.label,
            pue=pue,
            operational_gco2e=op,
            embodied_gco2e=embodied_gco2e,
            total_gco2e=total_g,
            work_units=work_units,
            work_unit=work_unit,
            j_per_1k=_per_1k(total_j, work_units),
            gco2e_per_1k=_per_1k(total_g, work_units),
            final=final,
            notes=notes,
        )

    # ------------------------------------------------------------------ views

    @property
    def energy_j(self) -> dict[str, float]:
        return {c.name: c.joules for c in self.components}

    @property
    def methods(self) -> dict[str, str]:
        return {c.name: c.method for c in self.components}

    @property
    def status(self) -> str:
        """'measured', 'estimated', or 'partly estimated'."""
        if self.measured:
            return "measured"
        if any(c.measured for c in self.components):
            return "partly estimated"
        return "estimated"

    def to_dict(self) -> dict:
        """Flat, JSON-able record for the JSONL log (keys start with energy_, co2e_, carbon_, work_)."""
        d: dict = {
            "energy_wall_s": self.wall_s,
            "energy_cpu_s": self.cpu_s,
            "energy_j": self.total_j,
            "energy_kwh": self.kwh,
            "energy_measured": self.measured,
            "energy_method": self.status,
        }
        for c in self.components:
            d[f"energy_{c.name}_j"] = c.joules
            d[f"energy_{c.name}_method"] = c.method
        d.update(
            {
                "energy_j_per_1k": self.j_per_1k,
                "co2e_g": self.total_gco2e,
                "co2e_operational_g": self.operational_gco2e,
                "co2e_embodied_g": self.embodied_gco2e,
                "co2e_g_per_1k": self.gco2e_per_1k,
                "carbon_intensity_g_per_kwh": self.intensity_g_per_kwh,
                "carbon_region": self.region,
                "carbon_pue": self.pue,
                "work_units": self.work_units,
                "work_unit": self.work_unit,
                "energy_final": self.final,
            }
        )
        if self.notes:
            d["energy_notes"] = "; ".join(self.notes)
        return d

    def columns(self) -> dict:
        """The few columns a benchmark table shows."""
        return {
            "energy_j": self.total_j,
            "gco2e": self.total_gco2e,
            "j_per_1k": self.j_per_1k,
            "gco2e_per_1k": self.gco2e_per_1k,
            "method": self.status,
        }

    def summary_line(self) -> str:
        """One line for the end-of-run summary; says "estimated" whenever anything is."""
        parts = ", ".join(f"{c.name} {_fmt_j(c.joules)} {c.method}" for c in self.components)
        line = (
            f"energy {_fmt_j(self.total_j)} {self.status} ({parts}) over {self.wall_s:.1f} s; "
            f"CO2e {_fmt_g(self.total_gco2e)} = {_fmt_g(self.operational_gco2e)} operational "
            f"({self.intensity_g_per_kwh:g} g/kWh {self.region}"
            + (f", PUE {self.pue:g}" if self.pue != 1.0 else "")
            + f") + {_fmt_g(self.embodied_gco2e)} embodied"
        )
        if self.j_per_1k is not None:
            line += f"; per 1k {self.work_unit}: {_fmt_j(self.j_per_1k)}, {_fmt_g(self.gco2e_per_1k)}"
        return line


def _fmt_j(j: float) -> str:
    for unit, scale in (("GJ", 1e9), ("MJ", 1e6), ("kJ", 1e3)):
        if abs(j) >= scale:
            return f"{j / scale:.3g} {unit}"
    return f"{j:.3g} J"


def _fmt_g(g: float | None) -> str:
    if g is None:
        return "n/a"
    if abs(g) >= 1e3:
        return f"{g / 1e3:.3g} kg"
    if abs(g) >= 1 or g == 0:
        return f"{g:.3g} g"
    return f"{g * 1e3:.3g} mg"


class EnergyMeter:
    """Accumulates energy from its sources between start() and stop(); see `meter()`."""

    def __init__(
        self,
        selection: Selection,
        *,
        intensity: Intensity,
        pue: float = 1.0,
        embodied: EmbodiedConfig | None = None,
        work_unit: str = "samples",
        poll_s: float | None = DEFAULT_POLL_S,
    ):
        self.sources: list[EnergySource] = list(selection.sources)
        self.notes: list[str] = list(selection.notes)
        self.intensity = intensity
        self.pue = pue
        self.embodied = embodied if embodied is not None else EmbodiedConfig()
        self.work_unit = work_unit
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._joules = [0.0] * len(self.sources)
        self._failed: set[int] = set()
        self._work = 0.0
        self._t0 = self._cpu0 = 0.0
        self._started = self._stopped = False
        self._final: EnergyReport | None = None
        self._stop_evt = threading.Event()
        self._poller: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._started and not self._stopped

    @property
    def measured(self) -> bool:
        return bool(self.sources) and all(s.measured for s in self.sources)

    def start(self) -> EnergyMeter:
        if self._started:
            raise RuntimeError("an EnergyMeter can only be started once")
        self._started = True
        for s in self.sources:
            s.start()
        self._t0 = time.perf_counter()
        self._cpu0 = process_cpu_seconds()
        log.debug("energy meter started: %s", ", ".join(f"{s.name}={s.method}" for s in self.sources))
        if self.poll_s and any(s.needs_polling for s in self.sources):
            self._poller = threading.Thread(target=self._poll, name="tierec-energy-poll", daemon=True)
            self._poller.start()
        return self

    def stop(self) -> EnergyReport:
        """Take the final reading, release the counters and return the final report (idempotent)."""
        if self._final is not None:
            return self._final
        if not self._started:
            raise RuntimeError("EnergyMeter.stop() before start()")
        self._stop_evt.set()
        if self._poller is not None:
            self._poller.join()
        with self._lock:
            self._sample()
            self._final = self._build(final=True)
            self._stopped = True
        for s in self.sources:
            s.close()
        return self._final

    def __enter__(self) -> EnergyMeter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ work and readings

    def add_work(self, n: float = 1) -> None:
        """Count `n` samples / requests done (for the per-1,000 figures)."""
        if n < 0:
            raise ValueError(f"add_work({n}): work cannot be negative")
        with self._lock:
            self._work += n

    @property
    def work_units(self) -> float:
        return self._work

    def snapshot(self) -> EnergyReport:
        """A live report (``final=False``); after stop() the final one. Values never decrease."""
        if not self._started:
            raise RuntimeError("EnergyMeter.snapshot() before start()")
        with self._lock:
            if self._final is not None:
                return self._final
            self._sample()
            return self._build(final=False)

    def report(self) -> EnergyReport:
        """The final report once stopped, else a live snapshot."""
        return self._final if self._final is not None else self.snapshot()

    # ------------------------------------------------------------------ internals

    def _poll(self) -> None:
        while not self._stop_evt.wait(self.poll_s):
            with self._lock:
                if self._final is None:
                    self._sample()

    def _sample(self) -> None:
        for i, s in enumerate(self.sources):
            if i in self._failed:
                continue
            try:
                j = float(s.read_j())
            except Exception as e:  # a counter that vanished mid-run: keep what it had
                self._failed.add(i)
                self.notes.append(f"{s.name} ({s.method}) stopped reading: {type(e).__name__}: {e}")
                log.warning("energy source %s failed: %s", s.name, e)
                continue
            if j > self._joules[i]:
                self._joules[i] = j

    def _build(self, *, final: bool) -> EnergyReport:
        wall = time.perf_counter() - self._t0
        cpu = max(0.0, process_cpu_seconds() - self._cpu0)
        n_gpus = sum(int(getattr(s, "n_gpus", 0)) for s in self.sources)
        comps = tuple(Component(s.name, s.method, self._joules[i], s.detail) for i, s in enumerate(self.sources))
        return EnergyReport.build(
            wall_s=wall,
            cpu_s=cpu,
            components=comps,
            intensity=self.intensity,
            pue=self.pue,
            embodied_gco2e=self.embodied.gco2e(wall / 3600.0, n_gpus),
            work_units=self._work,
            work_unit=self.work_unit,
            final=final,
            notes=tuple(self.notes),
        )

    def __repr__(self) -> str:
        state = "running" if self.running else ("stopped" if self._stopped else "new")
        return f"EnergyMeter({state}, sources={[s.method for s in self.sources]})"


def meter(
    *,
    region: str | None = None,
    intensity_g_per_kwh: float | None = None,
    embodied: EmbodiedConfig | None = None,
    sources="auto",
    work_unit: str = "samples",
    pue: float | None = None,
    cpu_watts_per_core: float | None = None,
    dram_watts_per_gb: float | None = None,
    powercap_root: str | None = None,
    poll_s: float | None = DEFAULT_POLL_S,
) -> EnergyMeter:
    """An energy meter; use as a context manager or call start()/stop().

    region / intensity_g_per_kwh: grid intensity (else $TIEREC_CARBON_INTENSITY, $TIEREC_REGION,
        else the world average); an unknown region is a ConfigError listing the known ones.
    embodied: manufacturing footprint to amortise (default `EmbodiedConfig.from_env()`).
    sources: "auto" (counters where readable, estimate otherwise), "estimate", "rapl",
        "nvml", a list of these or of EnergySource objects.
    work_unit: what add_work() counts, e.g. "samples" or "requests".
    pue: data-centre PUE multiplying operational CO2e (else $TIEREC_PUE, else 1.0).
    cpu_watts_per_core / dram_watts_per_gb: the estimate's power figures
        (else $TIEREC_CPU_WATTS_PER_CORE / $TIEREC_DRAM_WATTS_PER_GB, else the defaults).
    powercap_root: where the RAPL zones live (default /sys/class/powercap; for tests).
    poll_s: how often counters that can wrap are sampled in the background (None: never).
    """
    intensity = resolve_intensity(region, intensity_g_per_kwh)
    pue_v = resolve_pue(pue)
    emb = embodied if embodied is not None else EmbodiedConfig.from_env()
    sel = select_sources(
        sources,
        powercap_root=powercap_root,
        cpu_watts_per_core=cpu_watts_per_core,
        dram_watts_per_gb=dram_watts_per_gb,
    )
    return EnergyMeter(sel, intensity=intensity, pue=pue_v, embodied=emb, work_unit=work_unit, poll_s=poll_s)
