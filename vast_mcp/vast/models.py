"""Typed views of Vast's wire objects.

Vast rows carry about a hundred fields and add new ones without notice, so every model keeps unknown fields
(`extra="allow"`) and names only the ones the product reads. Units are Vast's: MB for RAM, GB for disk, $/hour.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class VastModel(BaseModel):
    """Base: keep every field Vast sends, tolerate the ones it leaves out."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Offer(VastModel):
    """One rentable machine slice from `POST /api/v0/bundles/`. `id` is what create takes."""

    id: int
    machine_id: int | None = None
    host_id: int | None = None
    num_gpus: int = 0
    gpu_name: str = ""
    gpu_ram: float = 0.0  # MB per GPU
    gpu_total_ram: float | None = None
    cpu_cores_effective: float | None = None
    cpu_ram: float | None = None  # MB
    disk_space: float = 0.0  # GB
    dph_total: float = 0.0  # $/hour with the requested disk priced in
    dph_base: float | None = None
    storage_cost: float | None = None  # $/GB/month
    reliability: float | None = None
    reliability2: float | None = None
    geolocation: str | None = None
    cuda_max_good: float | None = None
    inet_up: float | None = None
    inet_down: float | None = None
    inet_up_cost: float | None = None
    inet_down_cost: float | None = None
    direct_port_count: int | None = None
    verification: str | None = None
    dlperf: float | None = None
    score: float | None = None
    rentable: bool | None = None
    rented: bool | None = None
    duration: float | None = None  # seconds the host offers the machine for


class PortBinding(VastModel):
    HostIp: str = "0.0.0.0"
    HostPort: str


DEAD_STATUSES = frozenset({"exited", "offline", "unknown"})
"""`actual_status` values of an instance that will not come back by itself: destroy it, or start it again."""


class Instance(VastModel):
    """One instance row, as `show instance` (v0) and the v1 list return it."""

    id: int
    machine_id: int | None = None
    host_id: int | None = None
    actual_status: str | None = None
    intended_status: str | None = None
    cur_state: str | None = None
    status_msg: str | None = None
    label: str | None = None
    image_uuid: str | None = None
    image_runtype: str | None = None
    num_gpus: int | None = None
    gpu_name: str | None = None
    dph_total: float | None = None
    disk_space: float | None = None
    start_date: float | None = None
    public_ipaddr: str | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    ports: dict[str, list[PortBinding]] | None = None
    extra_env: list[list[str]] = Field(default_factory=list)
    geolocation: str | None = None
    reliability2: float | None = None

    @property
    def is_dead(self) -> bool:
        """It cannot run anything now (failed, or stopped): the one test every caller uses."""
        return self.actual_status in DEAD_STATUSES or self.actual_status == "stopped"

    def direct_ssh(self) -> tuple[str, int] | None:
        """`(host, port)` of the direct SSH path, when the instance has one."""
        bindings = (self.ports or {}).get("22/tcp")
        if not bindings or not self.public_ipaddr:
            return None
        return self.public_ipaddr.strip(), int(bindings[0].HostPort)

    def proxy_ssh(self) -> tuple[str, int] | None:
        """`(host, port)` of the proxy SSH path (Vast's `sshN.vast.ai` relays), assigned at creation.

        For jupyter runtypes SSH is one port above `ssh_port` (jupyter takes the first), as `vastai ssh-url` knows.
        """
        if not self.ssh_host or not self.ssh_port:
            return None
        return self.ssh_host, int(self.ssh_port) + (1 if "jupyter" in (self.image_runtype or "") else 0)

    def ssh_address(self) -> tuple[str, int] | None:
        """The address `vastai ssh-url` would print: direct when published, else proxy."""
        return self.direct_ssh() or self.proxy_ssh()


class InstancePage(VastModel):
    """One page of `GET /api/v1/instances/`."""

    instances: list[Instance] = Field(default_factory=list)
    instances_found: int | None = None
    total_instances: int | None = None
    next_token: str | None = None


class CreatedInstance(VastModel):
    """Answer of `PUT /api/v0/asks/{id}/`; `new_contract` is the new instance id."""

    success: bool = True
    new_contract: int
    instance_api_key: str | None = Field(default=None, repr=False)


class SshKey(VastModel):
    """An SSH public key registered on the account (`GET /api/v0/ssh/` answers `key`, POST `public_key`)."""

    id: int
    key: str = ""
    public_key: str | None = None
    created_at: Any = None

    @property
    def text(self) -> str:
        return (self.key or self.public_key or "").strip()


class User(VastModel):
    """`GET /api/v0/users/current` with the API key stripped."""

    id: int | None = None
    email: str | None = None
    username: str | None = None
    credit: float | None = None
    balance: float | None = None


class Template(VastModel):
    id: int | None = None
    hash_id: str | None = None
    name: str | None = None
    image: str | None = None
    tag: str | None = None
    recommended_disk_space: float | None = None
