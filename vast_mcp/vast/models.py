"""Typed views of Vast's wire objects.

Vast rows carry about a hundred fields and add new ones without notice, so every model keeps unknown fields
(`extra="allow"`) and names only the ones the product reads. Units are Vast's: MB for RAM, GB for disk, $/hour.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
    cluster_id: int | None = None  # the physical cluster the machine is in; multi-node jobs need one


class PortBinding(VastModel):
    """One published port. Vast documents `HostPort` as a string of digits; some answers carry an int or null."""

    HostIp: str | None = "0.0.0.0"
    HostPort: str | int | None = None

    @property
    def port(self) -> int | None:
        try:
            value = int(str(self.HostPort).strip())
        except ValueError:
            return None
        return value if 0 < value < 65536 else None


DEAD_STATUSES = frozenset({"exited", "offline", "unknown"})
"""`actual_status` values of an instance that will not come back by itself: destroy it, or start it again."""


BOOT_FAILURE_WORDS = ("error", "failed", "oci runtime", "permission denied")
"""Words in a booting instance's `status_msg` that the `vastai` CLI takes as a failed start."""


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
    storage_total_cost: float | None = None  # $/hour of its disk alone: what it bills while stopped
    disk_space: float | None = None
    start_date: float | None = None
    public_ipaddr: str | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    ports: dict[str, list[PortBinding] | None] | None = None
    extra_env: Any = None  # a list of [key, value] pairs, or (as some answers have it) a dict; never validated
    template_hash_id: str | None = None
    geolocation: str | None = None
    reliability2: float | None = None

    @field_validator("ssh_port", mode="before")
    @classmethod
    def _port_or_none(cls, value: Any) -> Any:
        """A port Vast sends as a string, an empty string or garbage reads as a number or as no port."""
        if value in (None, ""):
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            return None

    @property
    def is_dead(self) -> bool:
        """It cannot run anything now (failed, or stopped): the one test every caller uses."""
        return self.actual_status in DEAD_STATUSES or self.actual_status == "stopped"

    def boot_problem(self) -> str | None:
        """Why this instance will not finish starting, in plain words, or None while it still may.

        The `vastai` CLI's own rules (`wait_for_instance`): a dead status, an intended status of stopped or exited
        (the host or the market is stopping it), or a status message that names a failure while it is not
        running (a bad image tag, a refused container).
        """
        msg = (self.status_msg or "").strip()
        if self.actual_status in DEAD_STATUSES or self.actual_status == "stopped":
            return f"it is {self.actual_status} ({msg or 'Vast gave no message'})"
        if self.intended_status in ("stopped", "exited"):
            return f"Vast is stopping it (its intended status is {self.intended_status}; {msg or 'no message'})"
        if self.actual_status != "running" and any(word in msg.lower() for word in BOOT_FAILURE_WORDS):
            return f"it failed to start: {msg}"
        return None

    def direct_ssh(self) -> tuple[str, int] | None:
        """`(host, port)` of the direct SSH path, when the instance has one."""
        bindings = (self.ports or {}).get("22/tcp")
        if not bindings or not self.public_ipaddr:
            return None
        port = bindings[0].port
        return None if port is None else (self.public_ipaddr.strip(), port)

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
    runtype: str | None = None
    onstart: str | None = None

    @property
    def has_ssh(self) -> bool:
        """Whether instances from it get SSH: the `args` (entrypoint) runtype has none on Vast."""
        return "args" not in (self.runtype or "").split()
