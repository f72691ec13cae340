"""The simulated cloud's market: a fixed, realistic set of offers, their pricing, and a few templates.

The catalogue is generated from a seeded random source, so every run (and every test) sees the same offers with
the same ids. Every field the `vastai` CLI formats as a number is a number: its table crashes on strings.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

HOURS_PER_MONTH = 30 * 24
DEFAULT_SEED = 20261128
FIRST_OFFER_ID = 4_210_000


@dataclass(frozen=True)
class GpuModel:
    """One GPU model as sold on the market; prices are per GPU per hour."""

    name: str
    vram_gb: int
    compute_cap: int  # x100, as Vast reports it
    price_low: float
    price_high: float
    dlperf: float  # per GPU, Vast's deep-learning performance score
    tflops: float  # per GPU, FP32
    mem_bw: float  # GB/s
    max_power: int  # W
    counts: tuple[int, ...]  # GPU counts machines of this model come in, one offer each


# Names and memory sizes as Vast lists them; prices in the range the market shows for verified hosts.
GPU_MODELS: tuple[GpuModel, ...] = (
    GpuModel("RTX 3060", 12, 860, 0.05, 0.09, 8.5, 12.7, 360.0, 170, (1, 1, 1, 2, 4)),
    GpuModel("RTX 3080", 10, 860, 0.09, 0.14, 16.0, 29.8, 760.0, 320, (1, 2, 4)),
    GpuModel("RTX 3090", 24, 860, 0.16, 0.26, 21.5, 35.6, 936.0, 350, (1, 1, 1, 2, 2, 4, 8)),
    GpuModel("RTX 4080", 16, 890, 0.18, 0.27, 30.0, 48.7, 717.0, 320, (1, 1, 2)),
    GpuModel("RTX 4090", 24, 890, 0.29, 0.48, 44.0, 82.6, 1008.0, 450, (1, 1, 1, 1, 2, 2, 4, 8)),
    GpuModel("RTX 5090", 32, 1200, 0.55, 0.85, 68.0, 104.8, 1792.0, 575, (1, 2)),
    GpuModel("RTX A5000", 24, 860, 0.17, 0.25, 19.5, 27.8, 768.0, 230, (1, 2, 4)),
    GpuModel("RTX A6000", 48, 860, 0.38, 0.58, 29.0, 38.7, 768.0, 300, (1, 1, 2, 4, 8)),
    GpuModel("L40S", 48, 890, 0.68, 0.92, 49.0, 91.6, 864.0, 350, (1, 1, 2, 4, 8)),
    GpuModel("A100 PCIE", 40, 800, 0.62, 0.85, 55.0, 19.5, 1555.0, 250, (1, 2)),
    GpuModel("A100 SXM4", 40, 800, 0.70, 0.98, 58.0, 19.5, 1555.0, 400, (1, 8)),
    GpuModel("A100 SXM4", 80, 800, 0.98, 1.38, 62.0, 19.5, 2039.0, 400, (1, 2, 4, 8)),
    GpuModel("H100 PCIE", 80, 900, 1.55, 2.05, 95.0, 51.2, 2000.0, 350, (1, 2)),
    GpuModel("H100 SXM", 80, 900, 1.85, 2.60, 118.0, 66.9, 3350.0, 700, (1, 1, 2, 4, 8)),
    GpuModel("H200", 141, 900, 2.80, 3.60, 128.0, 66.9, 4800.0, 700, (1, 8)),
)

# (driver, highest CUDA version it runs well): the pairs NVIDIA ships.
DRIVERS: tuple[tuple[str, float], ...] = (
    ("535.183.01", 12.2),
    ("550.54.15", 12.4),
    ("550.127.05", 12.4),
    ("560.35.03", 12.6),
    ("565.57.01", 12.7),
    ("570.124.06", 12.8),
    ("575.57.08", 12.9),
)

LOCATIONS: tuple[str, ...] = (
    "Texas, US",
    "California, US",
    "Virginia, US",
    "Oregon, US",
    "Nevada, US",
    "Quebec, CA",
    "Ontario, CA",
    "Frankfurt, DE",
    "Amsterdam, NL",
    "Stockholm, SE",
    "Helsinki, FI",
    "Warsaw, PL",
    "Bucharest, RO",
    "London, GB",
    "Paris, FR",
    "Tokyo, JP",
    "Seoul, KR",
    "Taipei, TW",
    "Singapore, SG",
    "Sydney, AU",
    "Sao Paulo, BR",
    "Hanoi, VN",
    "Shenzhen, CN",
    "Mumbai, IN",
)

CPUS: tuple[tuple[str, float], ...] = (
    ("AMD EPYC 7543 32-Core Processor", 2.8),
    ("AMD EPYC 7763 64-Core Processor", 2.45),
    ("AMD Ryzen 9 7950X 16-Core Processor", 4.5),
    ("AMD Ryzen Threadripper PRO 5975WX 32-Cores", 3.6),
    ("Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", 2.0),
    ("Intel(R) Xeon(R) Platinum 8480+", 2.0),
    ("Intel(R) Core(TM) i9-13900K", 3.0),
)

DISKS: tuple[str, ...] = (
    "Samsung SSD 990 PRO 2TB",
    "WD_BLACK SN850X 4000GB",
    "Micron 7450 3.84TB",
    "KIOXIA CD6 7.68TB",
)


def numeric_driver_version(version: str) -> int:
    """`535.86.05` → 535086005, the integer form the CLI sends for driver_version filters."""
    parts = [*version.split("."), "0", "0"][:3]
    return int("".join(p.zfill(3) for p in parts))


def _offer(rng: random.Random, offer_id: int, model: GpuModel, num_gpus: int) -> dict[str, Any]:
    per_gpu = round(rng.uniform(model.price_low, model.price_high), 3)
    dph_base = round(per_gpu * num_gpus, 4)
    # Interruptible floor: hosts accept roughly half the on-demand price.
    min_bid = round(dph_base * rng.uniform(0.42, 0.6), 4)
    storage_cost = round(rng.choice((0.08, 0.1, 0.12, 0.15, 0.2)), 2)
    driver, cuda = rng.choice(DRIVERS[2:] if model.compute_cap >= 900 else DRIVERS)
    cpu_name, cpu_ghz = rng.choice(CPUS)
    cpu_cores = rng.choice((8, 16, 24, 32, 48, 64, 128)) * max(1, num_gpus // 2)
    cpu_cores_effective = float(min(cpu_cores, rng.choice((6, 8, 12, 16, 32)) * num_gpus))
    cpu_ram = int(num_gpus * rng.choice((32, 48, 64, 128)) * 1024)
    disk_space = float(rng.choice((64, 128, 200, 400, 800, 1500)) * max(1, num_gpus // 2))
    inet_down = round(rng.uniform(150, 9500), 1)
    inet_up = round(inet_down * rng.uniform(0.3, 1.0), 1)
    reliability = round(rng.uniform(0.85, 0.999), 4)
    geolocation = rng.choice(LOCATIONS)
    datacenter = rng.random() < 0.35 or model.compute_cap >= 900
    verification = "verified" if rng.random() < 0.9 else "unverified"
    machine_id = 10_000 + rng.randrange(0, 40_000)
    host_id = 1_000 + rng.randrange(0, 300_000)
    pci_gen = 5.0 if model.compute_cap >= 890 and rng.random() < 0.5 else 4.0
    pcie_bw = round((25.0 if pci_gen >= 5 else 12.5) * rng.uniform(0.8, 1.0), 1)
    dlperf = round(model.dlperf * num_gpus * rng.uniform(0.9, 1.05), 2)
    total_flops = round(model.tflops * num_gpus, 2)
    vram_mb = model.vram_gb * 1024
    now_duration = round(rng.uniform(3, 120) * 86400.0, 1)
    return {
        "id": offer_id,
        "ask_contract_id": offer_id,
        "bundle_id": offer_id + 1_000_000,
        "machine_id": machine_id,
        "host_id": host_id,
        "num_gpus": num_gpus,
        "gpu_name": model.name,
        "gpu_ram": vram_mb,
        "gpu_total_ram": vram_mb * num_gpus,
        "gpu_frac": 1.0,
        "gpu_arch": "nvidia",
        "gpu_mem_bw": model.mem_bw,
        "gpu_max_power": float(model.max_power),
        "gpu_max_temp": 83.0,
        "gpu_lanes": 16,
        "gpu_display_active": False,
        "bw_nvlink": 600.0 if "SXM" in model.name and num_gpus > 1 else 0.0,
        "compute_cap": model.compute_cap,
        "cuda_max_good": cuda,
        "driver_version": driver,
        "driver_vers": numeric_driver_version(driver),
        "cpu_name": cpu_name,
        "cpu_arch": "amd64",
        "cpu_cores": cpu_cores,
        "cpu_cores_effective": cpu_cores_effective,
        "cpu_ghz": cpu_ghz,
        "cpu_ram": cpu_ram,
        "has_avx": 1,
        "disk_space": disk_space,
        "disk_bw": round(rng.uniform(1500, 7000), 1),
        "disk_name": rng.choice(DISKS),
        "inet_up": inet_up,
        "inet_down": inet_down,
        "inet_up_cost": round(rng.choice((0.0, 0.002, 0.005, 0.01)), 4),
        "inet_down_cost": round(rng.choice((0.0, 0.002, 0.005, 0.01)), 4),
        "direct_port_count": rng.choice((16, 32, 64, 100, 500, 1000)),
        "pci_gen": pci_gen,
        "pcie_bw": pcie_bw,
        "mobo_name": rng.choice(("ROMED8-2T", "H12SSL-i", "X13DEG-OAD", "ProArt X670E-CREATOR", "MZ73-LM0")),
        "os_version": rng.choice(("22.04", "24.04")),
        "ubuntu_version": rng.choice(("22.04", "24.04")),
        "public_ipaddr": ".".join(str(rng.randrange(lo, hi)) for lo, hi in ((23, 220), (0, 255), (0, 255), (2, 250))),
        "static_ip": datacenter,
        "dph_base": dph_base,
        "min_bid": min_bid,
        "storage_cost": storage_cost,
        "credit_discount_max": 0.4,
        "vram_costperhour": round(dph_base / (model.vram_gb * num_gpus), 6),
        "dlperf": dlperf,
        "total_flops": total_flops,
        "reliability": reliability,
        "reliability2": reliability,
        "reliability_mult": round(reliability**2, 4),
        "expected_reliability": reliability,
        "rentable": True,
        "rented": False,
        "external": False,
        "verified": verification == "verified",
        "verification": verification,
        "vericode": 1 if verification == "verified" else 0,
        "hosting_type": 1 if datacenter else 0,
        "datacenter": datacenter,
        "vms_enabled": False,
        "resource_type": "gpu",
        "geolocation": geolocation,
        "geolocode": sum(ord(c) for c in geolocation[-2:]) * 1000,
        "cluster_id": None,
        "duration": now_duration,
        "avail_vol_ask_id": None,
        "avail_vol_dph": None,
        "avail_vol_size": None,
    }


def build_catalog(seed: int = DEFAULT_SEED) -> list[dict[str, Any]]:
    """Every offer of the simulated market, unpriced (no `dph_total` yet); the same list for the same seed."""
    rng = random.Random(seed)
    offers: list[dict[str, Any]] = []
    offer_id = FIRST_OFFER_ID
    for model in GPU_MODELS:
        for num_gpus in model.counts:
            offer_id += rng.randrange(7, 400)
            offers.append(_offer(rng, offer_id, model, num_gpus))
    _assign_clusters(offers)
    return offers


FIRST_CLUSTER_ID = 7_100


def _assign_clusters(offers: list[dict[str, Any]]) -> None:
    """Machines sold as the same model and GPU count form one physical cluster (`cluster_id`), in one place, so
    several offers share a cluster as on Vast; the rest stand alone (`cluster_id` null). Done after the draw, so
    every offer keeps the id, price and fields it had before clusters existed."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for offer in offers:
        groups.setdefault((str(offer["gpu_name"]), int(offer["num_gpus"])), []).append(offer)
    cluster_id = FIRST_CLUSTER_ID
    for members in groups.values():
        if len(members) < 2:
            continue
        for offer in members:
            offer["cluster_id"] = cluster_id
        cluster_id += 1


def storage_per_hour(offer: Mapping[str, Any], disk_gb: float) -> float:
    """What `disk_gb` of the offer's disk costs per hour (Vast prices disk per GB per 30-day month)."""
    return float(offer["storage_cost"]) * float(disk_gb) / HOURS_PER_MONTH


def price_offer(offer: Mapping[str, Any], allocated_storage: float = 5.0, kind: str = "on-demand") -> dict[str, Any]:
    """A copy of `offer` with `dph_total` and the per-dollar scores for `allocated_storage` GB of disk.

    `kind` is the query's `type`: `bid` (interruptible) starts from `min_bid`, every other type from `dph_base`.
    Bandwidth is billed per GB moved, so it never enters the hourly price.
    """
    priced = dict(offer)
    base = float(offer["min_bid"]) if kind in ("bid", "interruptible") else float(offer["dph_base"])
    storage = storage_per_hour(offer, allocated_storage)
    total = round(base + storage, 6)
    priced["dph_total"] = total
    priced["storage_total_cost"] = round(storage, 6)
    priced["is_bid"] = kind in ("bid", "interruptible")
    # Reserved prices show a discount on the same machine; the CLI shows this column for `--type reserved`.
    priced["discounted_dph_total"] = round(total * (1 - 0.5 * float(offer["credit_discount_max"])), 6)
    priced["dlperf_per_dphtotal"] = round(float(offer["dlperf"]) / total, 4) if total > 0 else 0.0
    priced["flops_per_dphtotal"] = round(float(offer["total_flops"]) / total, 4) if total > 0 else 0.0
    # Score favours performance per dollar, weighted by how reliable the host is.
    priced["score"] = round(priced["dlperf_per_dphtotal"] * float(offer["reliability"]) ** 2, 4)
    priced["search"] = {"gpuCostPerHour": base, "diskHour": round(storage, 6), "totalHour": total}
    priced["instance"] = {"gpuCostPerHour": base, "diskHour": round(storage, 6), "totalHour": total}
    return priced


def gpu_names(offers: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({str(o["gpu_name"]) for o in offers})


TEMPLATES: tuple[dict[str, Any], ...] = (
    {
        "id": 302111,
        "hash_id": "4e17788f74f075dd9aab7d0d4427968f",
        "name": "PyTorch (Vast)",
        "image": "vastai/pytorch",
        "tag": "2.5.1-cuda-12.4.1-py311",
        "env": "-p 8080:8080",
        "onstart": "entrypoint.sh",
        "runtype": "ssh_direc ssh_proxy",
        "use_ssh": True,
        "ssh_direct": True,
        "jup_direct": False,
        "recommended_disk_space": 32.0,
        "extra_filters": '{"cuda_max_good": {"gte": 12.4}}',
        "private": False,
        "creator_id": 62897,
        "count_created": 182034,
        "created_at": 1_718_000_000.0,
        "recent_create_date": 1_764_000_000.0,
    },
    {
        "id": 302112,
        "hash_id": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
        "name": "NVIDIA CUDA",
        "image": "nvidia/cuda",
        "tag": "12.4.1-cudnn-devel-ubuntu22.04",
        "env": "",
        "onstart": "",
        "runtype": "ssh_direc ssh_proxy",
        "use_ssh": True,
        "ssh_direct": True,
        "jup_direct": False,
        "recommended_disk_space": 16.0,
        "extra_filters": "{}",
        "private": False,
        "creator_id": 62897,
        "count_created": 95012,
        "created_at": 1_700_000_000.0,
        "recent_create_date": 1_764_100_000.0,
    },
    {
        "id": 302113,
        "hash_id": "0f9e8d7c6b5a49382716a5b4c3d2e1f0",
        "name": "vLLM",
        "image": "vllm/vllm-openai",
        "tag": "v0.6.4",
        "env": "-p 8000:8000",
        "onstart": "",
        "runtype": "args",
        "use_ssh": False,
        "ssh_direct": False,
        "jup_direct": False,
        "recommended_disk_space": 64.0,
        "extra_filters": '{"gpu_ram": {"gte": 24000}}',
        "private": False,
        "creator_id": 62897,
        "count_created": 41877,
        "created_at": 1_722_000_000.0,
        "recent_create_date": 1_764_050_000.0,
    },
    {
        "id": 302114,
        "hash_id": "77aa88bb99cc00dd11ee22ff33aa44bb",
        "name": "Jupyter + PyTorch",
        "image": "pytorch/pytorch",
        "tag": "2.4.0-cuda12.4-cudnn9-runtime",
        "env": "-p 8888:8888",
        "onstart": "",
        "runtype": "jupyter_direc ssh_direc ssh_proxy",
        "use_ssh": True,
        "ssh_direct": True,
        "jup_direct": True,
        "recommended_disk_space": 20.0,
        "extra_filters": "{}",
        "private": False,
        "creator_id": 1001,
        "count_created": 87,
        "created_at": 1_730_000_000.0,
        "recent_create_date": 1_763_000_000.0,
    },
)
