"""Energy and carbon of a run: measured where counters exist, estimated and labelled where not.

    import tierec.energy
    with tierec.energy.meter(region="FR", work_unit="samples") as m:
        ...; m.add_work(batch_size)
    report = m.report()
    print(report.summary_line())      # end-of-run summary
    log.write(report.to_dict())       # flat JSONL record
    table_row.update(report.columns())

Modules: `meter` (EnergyMeter, EnergyReport), `sources` (RAPL, NVML, CPU-time estimate),
`carbon` (grid intensity table, embodied amortisation). Figures and sources: docs/energy.md.
"""

from tierec.energy.carbon import (
    REGIONS,
    EmbodiedConfig,
    Intensity,
    RegionIntensity,
    amortised_gco2e,
    known_regions,
    operational_gco2e,
    resolve_intensity,
)
from tierec.energy.meter import Component, EnergyMeter, EnergyReport, meter
from tierec.energy.sources import (
    DEFAULT_CPU_WATTS_PER_CORE,
    DEFAULT_DRAM_WATTS_PER_GB,
    CpuTimeEstimate,
    DramRssEstimate,
    EnergySource,
    NvmlSource,
    RaplSource,
    process_cpu_seconds,
)

__all__ = [
    "meter",
    "EnergyMeter",
    "EnergyReport",
    "Component",
    "EmbodiedConfig",
    "Intensity",
    "RegionIntensity",
    "REGIONS",
    "known_regions",
    "resolve_intensity",
    "operational_gco2e",
    "amortised_gco2e",
    "EnergySource",
    "RaplSource",
    "NvmlSource",
    "CpuTimeEstimate",
    "DramRssEstimate",
    "DEFAULT_CPU_WATTS_PER_CORE",
    "DEFAULT_DRAM_WATTS_PER_GB",
    "process_cpu_seconds",
]
