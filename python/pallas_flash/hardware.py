"""The hardware the kernels are judged against: ceilings and prices, in one table.

Every ceiling here is the vendor's figure for one chip; every price is an on-demand list price per
chip-hour with its source and the date it was read, overridable on the command line
(`pallas-flash-bench --price-per-chip-hour`), since cloud prices change and differ by region.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: what a kernel's time, FLOP/s and bytes/s are measured against."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    hbm_capacity: int  # bytes a program may use
    clock_hz: float | None  # the clock the compiler's cycle estimate counts (TPU only)
    price_per_chip_hour: float  # USD, on-demand list price
    price_source: str

    def as_json(self) -> dict:
        fields = dataclasses.asdict(self)
        return {"chip": fields.pop("name"), **fields}


# TPU v5e: 197 TFLOP/s bf16 from 4 MXUs of 128x128 (2 FLOP per MAC), hence the clock the compiler's
# cycle counts are in: 197e12 / (4 * 128 * 128 * 2) = 1.503 GHz. 16 GiB of HBM at 819 GB/s, of which
# the compiler lets a program use 15.75 GiB (its "exceeds available HBM" bound).
TPU_V5E = Chip(
    name="TPU v5e",
    peak_flops=197e12,
    hbm_bytes_per_s=819e9,
    hbm_capacity=int(15.75 * 2**30),
    clock_hz=197e12 / (4 * 128 * 128 * 2),
    price_per_chip_hour=1.20,
    price_source="Google Cloud TPU pricing, v5e on-demand, us-central1, $1.20 per chip-hour (list price "
                 "published at v5e's launch, 2023; read 2026-11-25, not re-checked against the live page)",
)

V5E_VMEM_BYTES = 128 * 2**20
# The interconnect bandwidth context parallelism's cost model charges per chip: Google's v5e page gives
# 400 GB/s of bidirectional ICI bandwidth per chip over 4 ports (docs.cloud.google.com/tpu/docs/v5e,
# read 2026-12-06). An optimistic figure for a ring, whose steps each use one link in and one out;
# the model takes it as the plan states it (XLA's cost model does not price collectives), and
# strategy_costs takes another as ici_bytes_per_s.
V5E_ICI_BYTES_PER_S = 400e9
# A collective's fixed cost (launch and synchronisation), charged once per ppermute, all-gather or
# reduce-scatter: an assumption of the order measured for small ICI transfers, not a v5e figure.
V5E_ICI_LATENCY_S = 10e-6
V5E_TOPOLOGY = "v5e:2x2"  # the user's v5e-4: four chips on one host

# GPUs for the tokens-per-dollar comparison, measured when the benchmark runs on one.
GPUS = {
    "H100": Chip(
        name="NVIDIA H100 SXM",
        peak_flops=989e12,
        hbm_bytes_per_s=3.35e12,
        hbm_capacity=80 * 2**30,
        clock_hz=None,
        price_per_chip_hour=2.99,
        price_source="Lambda on-demand H100 SXM, $2.99 per GPU-hour (list price, read 2026-11-25 from a "
                     "stored copy; clouds range from ~$2 to ~$11)",
    ),
    "H200": Chip(
        name="NVIDIA H200",
        peak_flops=989e12,
        hbm_bytes_per_s=4.8e12,
        hbm_capacity=141 * 10**9,
        clock_hz=None,
        price_per_chip_hour=3.79,
        price_source="Lambda on-demand H200, $3.79 per GPU-hour (list price, read 2026-11-25 from a stored "
                     "copy; not re-checked)",
    ),
    "A100": Chip(
        name="NVIDIA A100 80GB SXM",
        peak_flops=312e12,
        hbm_bytes_per_s=2.04e12,
        hbm_capacity=80 * 2**30,
        clock_hz=None,
        price_per_chip_hour=1.79,
        price_source="Lambda on-demand A100 80GB SXM, $1.79 per GPU-hour (list price, read 2026-11-25 from a "
                     "stored copy; not re-checked)",
    ),
}


def gpu_chip(device_kind: str) -> Chip | None:
    """The table's entry for a JAX device_kind such as 'NVIDIA H100 80GB HBM3', or None."""
    kind = device_kind.upper()
    return next((chip for key, chip in GPUS.items() if key in kind), None)


def with_price(chip: Chip, price_per_chip_hour: float | None) -> Chip:
    if price_per_chip_hour is None:
        return chip
    if not price_per_chip_hour > 0:
        raise ValueError(f"price_per_chip_hour: expected a positive price in USD, got {price_per_chip_hour}")
    return dataclasses.replace(chip, price_per_chip_hour=float(price_per_chip_hour),
                               price_source="given on the command line (--price-per-chip-hour)")


# A cloud CPU for the measured CPU rows' tokens per dollar, priced per vCPU: Google Cloud's
# n2d-standard-2 (2 vCPUs of an AMD EPYC, 8 GB), $0.0845 an hour on demand in us-central1, so
# $0.0423 a vCPU-hour (Compute Engine's price list as of 2025; not re-checked against the live page).
CPU_PRICE_PER_VCPU_HOUR = 0.0845 / 2


def cpu_chip(vcpus: int) -> Chip:
    """This host's CPUs as one priced 'chip' (no FLOP or bandwidth ceiling in this table: a CPU's
    peak depends on its instruction set, which `pflash bench` measures)."""
    return Chip(name=f"CPU ({vcpus} vCPUs)", peak_flops=0.0, hbm_bytes_per_s=0.0, hbm_capacity=0, clock_hz=None,
                price_per_chip_hour=CPU_PRICE_PER_VCPU_HOUR * vcpus,
                price_source=f"{vcpus} x ${CPU_PRICE_PER_VCPU_HOUR:.4f} a vCPU-hour: Google Cloud n2d-standard-2 "
                             "on demand, us-central1, $0.0845 an hour for 2 vCPUs (not re-checked)")
