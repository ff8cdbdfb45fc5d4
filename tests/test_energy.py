"""tierec.energy: carbon arithmetic, labelling of estimates, fake RAPL/NVML counters."""

from __future__ import annotations

import json
import sys
import time
import types

import pytest

import tierec.energy as energy
from tierec.energy import EmbodiedConfig, EnergySource, amortised_gco2e, operational_gco2e
from tierec.energy.carbon import HOURS_PER_YEAR, resolve_intensity, resolve_pue
from tierec.energy.sources import CpuTimeEstimate, DramRssEstimate, _RaplCounter, discover_rapl
from tierec.errors import ConfigError, TierecError

NO_EMBODIED = EmbodiedConfig.none()


class FixedSource(EnergySource):
    """A source whose reading the test sets directly."""

    def __init__(self, name: str, method: str, joules: float = 0.0):
        self.name, self.method, self.joules = name, method, joules

    def start(self):
        pass

    def read_j(self):
        return self.joules


def burn_cpu(seconds: float) -> int:
    t0, x = time.process_time(), 0
    while time.process_time() - t0 < seconds:
        x += sum(range(2000))
    return x


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in (
        "TIEREC_CARBON_INTENSITY",
        "TIEREC_REGION",
        "TIEREC_PUE",
        "TIEREC_CPU_WATTS_PER_CORE",
        "TIEREC_DRAM_WATTS_PER_GB",
        "TIEREC_EMBODIED_NODE_KG",
        "TIEREC_EMBODIED_GPU_KG",
        "TIEREC_EMBODIED_LIFETIME_YEARS",
        "TIEREC_EMBODIED_NODE_SHARE",
        "CUDA_VISIBLE_DEVICES",
    ):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def no_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError


def make_zone(root, zone, name, energy_uj, max_uj=2**32):
    d = root / zone
    d.mkdir(parents=True, exist_ok=True)
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


def set_energy(zone_dir, energy_uj):
    (zone_dir / "energy_uj").write_text(f"{energy_uj}\n")


# --------------------------------------------------------------------------- arithmetic


def test_operational_arithmetic():
    assert operational_gco2e(3.6e6, 400.0) == pytest.approx(400.0)  # 1 kWh at 400 g/kWh
    assert operational_gco2e(1.8e6, 100.0, pue=1.5) == pytest.approx(75.0)
    assert energy.carbon.kwh(7.2e6) == pytest.approx(2.0)


def test_report_energy_times_intensity():
    src = FixedSource("cpu", "measured:test", 0.0)
    m = energy.meter(sources=[src], intensity_g_per_kwh=250.0, embodied=NO_EMBODIED, poll_s=None)
    with m:
        src.joules = 7.2e6  # 2 kWh
    r = m.report()
    assert r.total_j == pytest.approx(7.2e6)
    assert r.kwh == pytest.approx(2.0)
    assert r.operational_gco2e == pytest.approx(500.0)
    assert r.embodied_gco2e == 0.0
    assert r.total_gco2e == pytest.approx(500.0)
    assert r.intensity_g_per_kwh == 250.0 and r.region == "custom"


def test_pue_multiplies_operational_only():
    src = FixedSource("cpu", "measured:test", 3.6e6)
    with energy.meter(sources=[src], intensity_g_per_kwh=100.0, pue=1.2, embodied=NO_EMBODIED, poll_s=None) as m:
        pass
    assert m.report().operational_gco2e == pytest.approx(120.0)
    with pytest.raises(ConfigError):
        resolve_pue(0.9)


def test_embodied_amortisation():
    # footprint_kg * 1000 * hours_used / lifetime_hours
    assert amortised_gco2e(2500.0, 2.0, 6 * 8760) == pytest.approx(2500 * 1000 * 2 / 52560)
    cfg = EmbodiedConfig(node_kgco2e=1000.0, gpu_kgco2e=100.0, lifetime_years=4.0, node_share=0.5)
    assert cfg.lifetime_hours == 4 * HOURS_PER_YEAR
    # node share 0.5 -> 500 kg, plus 2 GPUs seen -> 700 kg, for 3 hours of a 4-year life
    assert cfg.gco2e(3.0, n_gpus_seen=2) == pytest.approx(700 * 1000 * 3 / (4 * 8760))
    # an explicit GPU count wins over the GPUs the meter saw
    cfg1 = EmbodiedConfig(node_kgco2e=1000.0, gpu_kgco2e=100.0, n_gpus=1, lifetime_years=4.0)
    assert cfg1.gco2e(3.0, n_gpus_seen=8) == pytest.approx(1100 * 1000 * 3 / (4 * 8760))
    assert EmbodiedConfig.none().gco2e(100.0, 8) == 0.0


def test_embodied_charged_per_wall_hour(monkeypatch):
    src = FixedSource("cpu", "measured:test", 0.0)
    cfg = EmbodiedConfig(node_kgco2e=8760.0, gpu_kgco2e=0.0, lifetime_years=1.0)  # 1 kg per hour
    m = energy.meter(sources=[src], intensity_g_per_kwh=0.0, embodied=cfg, poll_s=None)
    with m:
        time.sleep(0.05)
    r = m.report()
    assert r.embodied_gco2e == pytest.approx(1000.0 * r.wall_s / 3600.0)
    assert r.total_gco2e == pytest.approx(r.embodied_gco2e)


def test_embodied_from_env(monkeypatch):
    monkeypatch.setenv("TIEREC_EMBODIED_NODE_KG", "1200")
    monkeypatch.setenv("TIEREC_EMBODIED_LIFETIME_YEARS", "4")
    cfg = EmbodiedConfig.from_env()
    assert cfg.node_kgco2e == 1200.0 and cfg.lifetime_years == 4.0 and cfg.gpu_kgco2e == 150.0
    monkeypatch.setenv("TIEREC_EMBODIED_NODE_SHARE", "2")
    with pytest.raises(ConfigError):
        EmbodiedConfig.from_env()


# --------------------------------------------------------------------------- labelling


def test_forced_estimate_is_labelled_estimated():
    with energy.meter(sources="estimate", intensity_g_per_kwh=300.0, poll_s=None) as m:
        burn_cpu(0.1)
    r = m.report()
    assert r.measured is False
    assert r.components and all(c.method.startswith("estimated") for c in r.components)
    assert "estimated" in r.summary_line()
    assert "measured" not in r.summary_line().replace("estimated", "")
    assert r.to_dict()["energy_measured"] is False
    assert r.to_dict()["energy_method"] == "estimated"
    assert r.columns()["method"] == "estimated"


def test_mixed_measured_and_estimated_is_not_measured():
    meas = FixedSource("gpu", "measured:test", 10.0)
    est = FixedSource("cpu", "estimated:test", 5.0)
    with energy.meter(sources=[meas, est], intensity_g_per_kwh=100.0, poll_s=None) as m:
        pass
    r = m.report()
    assert r.measured is False
    assert r.status == "partly estimated"
    assert "estimated" in r.summary_line()
    assert "estimated" in r.columns()["method"]
    assert r.energy_j == {"gpu": 10.0, "cpu": 5.0} and r.total_j == 15.0


def test_run_without_counters_still_reports(tmp_path, no_nvml):
    m = energy.meter(powercap_root=str(tmp_path / "no-powercap"), poll_s=None)  # sources="auto"
    with m:
        burn_cpu(0.2)
        m.add_work(1000)
    r = m.report()
    assert r.final
    assert r.cpu_s >= 0.15
    assert r.energy_j["cpu"] >= 0.15 * energy.DEFAULT_CPU_WATTS_PER_CORE
    assert r.total_j > 0 and r.total_gco2e > 0
    assert r.measured is False and r.methods["cpu"] == "estimated:cpu-time"
    assert any("powercap" in n for n in r.notes) and any("pynvml" in n for n in r.notes)
    assert "estimated" in r.summary_line()


def test_cpu_estimate_uses_configured_watts(monkeypatch):
    monkeypatch.setenv("TIEREC_CPU_WATTS_PER_CORE", "20")
    with energy.meter(sources="estimate", intensity_g_per_kwh=1.0, poll_s=None) as m:
        burn_cpu(0.1)
    r = m.report()
    # cpu_s is read just after the cpu component, so they agree to within a few ms
    assert r.energy_j["cpu"] == pytest.approx(20.0 * r.cpu_s, rel=0.1, abs=0.1)
    monkeypatch.setenv("TIEREC_CPU_WATTS_PER_CORE", "lots")
    with pytest.raises(ConfigError):
        energy.meter(sources="estimate")


def test_dram_estimate_integrates_rss_over_time():
    clock = iter([0.0, 10.0, 30.0])
    rss = iter([1e9, 3e9, 3e9])  # GB: 1 -> 3 over 10 s, then 3 for 20 s
    d = DramRssEstimate(0.5, rss=lambda: next(rss), clock=lambda: next(clock))
    d.start()
    assert d.read_j() == pytest.approx(0.5 * (10 * 2.0))
    assert d.read_j() == pytest.approx(0.5 * (10 * 2.0 + 20 * 3.0))


# --------------------------------------------------------------------------- RAPL


def test_fake_rapl_is_measured_with_wraparound(tmp_path, no_nvml):
    max_uj = 2**32
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", max_uj - 1_000_000, max_uj)
    core = make_zone(tmp_path, "intel-rapl:0:0", "core", 0, max_uj)  # inside the package: ignored
    dram = make_zone(tmp_path, "intel-rapl:0:1", "dram", 500, max_uj)
    make_zone(tmp_path, "intel-rapl:1", "psys", 0, max_uj)  # whole platform: ignored
    m = energy.meter(powercap_root=str(tmp_path), intensity_g_per_kwh=100.0, embodied=NO_EMBODIED, poll_s=None)
    assert [s.method for s in m.sources] == ["measured:rapl (whole package)", "measured:rapl (whole DRAM domain)"]
    with m:
        set_energy(pkg, max_uj - 400_000)  # +0.6 J
        s1 = m.snapshot()
        set_energy(pkg, 2_000_000)  # wraps: +0.4 J to the top, +2 J after
        set_energy(dram, 1_000_500)  # +1 J
        set_energy(core, 99_000_000)
    r = m.report()
    assert s1.energy_j["cpu"] == pytest.approx(0.6) and not s1.final
    assert r.energy_j["cpu"] == pytest.approx(3.0)
    assert r.energy_j["dram"] == pytest.approx(1.0)
    assert r.total_j == pytest.approx(4.0)
    assert r.measured is True and r.status == "measured"
    assert r.methods["cpu"] == "measured:rapl (whole package)"
    assert "estimated" not in r.summary_line()
    assert r.operational_gco2e == pytest.approx(4.0 / 3.6e6 * 100.0)
    assert m.sources[0].wraps == 1


def test_rapl_counter_wrap_arithmetic(tmp_path):
    d = make_zone(tmp_path, "intel-rapl:0", "package-0", 900, 1000)
    c = _RaplCounter("intel-rapl:0", "package-0", d / "energy_uj", 1000)
    c.reset()
    set_energy(d, 950)
    c.sample()
    set_energy(d, 50)  # 950 -> 1000 -> 50: +100
    c.sample()
    assert c.acc_uj == 50 + 100 and c.wraps == 1


def test_rapl_poller_catches_wraps_between_reads(tmp_path, no_nvml):
    max_uj = 10_000_000
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", 9_000_000, max_uj)
    m = energy.meter(sources="rapl", powercap_root=str(tmp_path), embodied=NO_EMBODIED, poll_s=0.01)
    with m:
        src = m.sources[0]
        for target in (1_000_000, 8_000_000, 500_000):  # two wraps; the poller must see each step
            set_energy(pkg, target)
            deadline = time.monotonic() + 5.0
            while src.counters[0].last != target and time.monotonic() < deadline:
                time.sleep(0.005)
    # 9e6 -> 1e6 (+2e6, wrap) -> 8e6 (+7e6) -> 5e5 (+2.5e6, wrap)  = 11.5e6 uJ
    assert m.report().energy_j["cpu"] == pytest.approx(11.5)
    assert src.wraps == 2


def test_unreadable_rapl_falls_back_to_estimate(tmp_path, monkeypatch, no_nvml):
    make_zone(tmp_path, "intel-rapl:0", "package-0", 123)

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_RaplCounter, "read_raw", denied)
    groups, why = discover_rapl(tmp_path)
    assert groups == {} and "permission denied" in why
    m = energy.meter(powercap_root=str(tmp_path), poll_s=None)
    assert isinstance(m.sources[0], CpuTimeEstimate)
    with pytest.raises(ConfigError, match="permission denied"):
        energy.meter(sources="rapl", powercap_root=str(tmp_path))


def test_overlapping_sources_rejected(tmp_path, no_nvml):
    make_zone(tmp_path, "intel-rapl:0", "package-0", 1)
    with pytest.raises(ConfigError, match="twice"):
        energy.meter(sources=["rapl", "estimate"], powercap_root=str(tmp_path))
    with pytest.raises(ConfigError, match="unknown energy source"):
        energy.meter(sources="codecarbon")


# --------------------------------------------------------------------------- NVML (faked)


def fake_pynvml(energies_mj: dict[int, list[int]], unsupported=(), count=None):
    """A stand-in for pynvml: device i returns successive values from energies_mj[i]."""
    mod = types.ModuleType("pynvml")
    state = {"shutdown": 0}

    class NVMLError(Exception):
        pass

    def energy_of(h):
        if h in unsupported:
            raise NVMLError("Not Supported")
        seq = energies_mj[h]
        return seq.pop(0) if len(seq) > 1 else seq[0]

    mod.NVMLError = NVMLError
    mod.nvmlInit = lambda: None
    mod.nvmlShutdown = lambda: state.__setitem__("shutdown", state["shutdown"] + 1)
    mod.nvmlDeviceGetCount = lambda: count if count is not None else len(energies_mj)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetTotalEnergyConsumption = energy_of
    mod.state = state
    return mod


def test_fake_nvml_measured_and_counts_gpus(tmp_path, monkeypatch):
    # device 0: probe 1000, start 1000, then 6000 mJ -> +5 J; device 1: no energy counter
    mod = fake_pynvml({0: [1000, 1000, 6000], 1: [0]}, unsupported={1})
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    make_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    cfg = EmbodiedConfig(node_kgco2e=0.0, gpu_kgco2e=8760.0, lifetime_years=1.0)  # 1 kg/h per GPU
    m = energy.meter(powercap_root=str(tmp_path), intensity_g_per_kwh=100.0, embodied=cfg, poll_s=None)
    assert [s.name for s in m.sources] == ["cpu", "gpu"]
    with m:
        pass
    r = m.report()
    assert r.energy_j["gpu"] == pytest.approx(5.0)
    assert r.methods["gpu"] == "measured:nvml (whole GPU)"
    assert r.measured is True
    assert r.embodied_gco2e == pytest.approx(1000.0 * r.wall_s / 3600.0)  # one GPU seen
    assert mod.state["shutdown"] == 1


def test_nvml_respects_cuda_visible_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({0: [0], 1: [0]}))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    gpu, why = energy.sources.open_nvml()
    assert gpu is not None and gpu.labels == ["gpu1"] and gpu.n_gpus == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    gpu, why = energy.sources.open_nvml()
    assert gpu is None and "hides all 2 GPU(s)" in why


def test_nvml_counter_reset_never_subtracts(monkeypatch):
    mod = fake_pynvml({0: [5000, 5000, 9000, 100, 2100]})
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    gpu, _ = energy.sources.open_nvml()
    gpu.start()
    assert gpu.read_j() == pytest.approx(4.0)
    assert gpu.read_j() == pytest.approx(4.0)  # went backwards: re-based
    assert gpu.read_j() == pytest.approx(6.0)


# --------------------------------------------------------------------------- work units, snapshots


def test_per_1000_units():
    src = FixedSource("cpu", "measured:test", 50.0)
    m = energy.meter(sources=[src], intensity_g_per_kwh=360.0, embodied=NO_EMBODIED, work_unit="requests", poll_s=None)
    with m:
        m.add_work(1000)
        m.add_work(1500)
    r = m.report()
    assert r.work_units == 2500 and r.work_unit == "requests"
    assert r.j_per_1k == pytest.approx(20.0)
    assert r.gco2e_per_1k == pytest.approx(r.total_gco2e / 2.5)
    assert r.columns()["j_per_1k"] == pytest.approx(20.0)
    assert "per 1k requests" in r.summary_line()
    with pytest.raises(ValueError):
        m.add_work(-1)


def test_no_work_gives_no_per_unit_figures():
    with energy.meter(sources=[FixedSource("cpu", "measured:test", 1.0)], poll_s=None) as m:
        pass
    r = m.report()
    assert r.j_per_1k is None and r.gco2e_per_1k is None and "per 1k" not in r.summary_line()


def test_snapshot_is_live_and_monotonic():
    m = energy.meter(sources="estimate", poll_s=None).start()
    s1 = m.snapshot()
    burn_cpu(0.05)
    m.add_work(10)
    s2 = m.snapshot()
    assert not s1.final and not s2.final
    assert s2.total_j >= s1.total_j and s2.cpu_s >= s1.cpu_s and s2.wall_s > s1.wall_s
    assert s2.total_gco2e >= s1.total_gco2e and s2.work_units == 10
    final = m.stop()
    assert final.final and m.snapshot() is final and m.report() is final and m.stop() is final
    assert final.total_j >= s2.total_j
    with pytest.raises(RuntimeError):
        m.start()


def test_to_dict_is_flat_json():
    with energy.meter(sources="estimate", region="FR", poll_s=None) as m:
        m.add_work(3)
    d = m.report().to_dict()
    json.dumps(d)
    assert all(not isinstance(v, (dict, list, tuple)) for v in d.values())
    assert d["carbon_region"] == "FR" and d["carbon_intensity_g_per_kwh"] == 56
    assert {"energy_j", "energy_cpu_j", "energy_cpu_method", "co2e_g", "co2e_embodied_g", "work_units"} <= set(d)


# --------------------------------------------------------------------------- regions and config


def test_unknown_region_names_it_and_lists_known():
    with pytest.raises(TierecError) as ei:
        energy.meter(region="Atlantis")
    msg = str(ei.value)
    assert "Atlantis" in msg and "FR" in msg and "WORLD" in msg


def test_region_and_env_precedence(monkeypatch):
    assert resolve_intensity().region == "WORLD" and resolve_intensity().g_per_kwh == 480
    assert resolve_intensity(region="fr").g_per_kwh == 56
    monkeypatch.setenv("TIEREC_REGION", "DE")
    assert resolve_intensity().g_per_kwh == 381
    monkeypatch.setenv("TIEREC_CARBON_INTENSITY", "123.5")
    assert resolve_intensity().g_per_kwh == 123.5  # a number beats a region in the environment
    assert resolve_intensity(region="SE").g_per_kwh == 41  # arguments beat the environment
    assert resolve_intensity(intensity_g_per_kwh=7).g_per_kwh == 7
    monkeypatch.setenv("TIEREC_CARBON_INTENSITY", "dirty")
    with pytest.raises(ConfigError, match="TIEREC_CARBON_INTENSITY"):
        resolve_intensity()
    monkeypatch.delenv("TIEREC_CARBON_INTENSITY")
    monkeypatch.setenv("TIEREC_REGION", "Mars")
    with pytest.raises(ConfigError, match="Mars"):
        resolve_intensity()


def test_region_table_is_sourced():
    for key, r in energy.REGIONS.items():
        assert 0 < r.g_per_kwh < 1200 and 2015 <= r.year <= 2030 and r.source, key
