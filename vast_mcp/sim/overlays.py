"""Overlay networks of the simulated cloud: Vast's `/overlay/` routes (create, join, show, delete).

An overlay lives on one physical cluster (`cluster_id` on offers); only instances rented from that cluster's
machines may join it. Members get private addresses in the overlay's subnet and reach each other there; nothing
else does. With the sshd host backend the network is real (`netns.py`); with state-only hosts it is bookkeeping
only; the in-process backend (no root) refuses, saying why.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .hosts import SimHostError
from .netns import Fabric, Member, network_unavailable_reason

if TYPE_CHECKING:
    from .state import SimCloud, SimInstance

FIRST_OVERLAY_ID = 5_300
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Overlay:
    id: int
    name: str
    cluster_id: int
    subnet: ipaddress.IPv4Network
    members: dict[int, ipaddress.IPv4Interface] = field(default_factory=dict)  # instance id → its address
    nets: dict[int, Member] = field(default_factory=dict)  # instance id → its namespace (sshd backend)
    # Every address ever given out: a machine that joins later never gets a departed member's address, which the
    # other members' neighbour tables would still send to the departed machine's link for half a minute or more.
    used: set[ipaddress.IPv4Address] = field(default_factory=set)

    def row(self) -> dict[str, Any]:
        return {
            "overlay_id": self.id,
            "name": self.name,
            "internal_subnet": str(self.subnet),
            "cluster_id": self.cluster_id,
            "instances": sorted(self.members),
        }


class OverlayBook:
    """Every overlay of the account."""

    def __init__(self, cloud: SimCloud) -> None:
        self._cloud = cloud
        self._overlays: dict[int, Overlay] = {}
        self._next_id = FIRST_OVERLAY_ID
        self._fabric = Fabric()

    def rows(self) -> list[dict[str, Any]]:
        return [o.row() for o in self._overlays.values()]

    def address_of(self, instance_id: int) -> str | None:
        for overlay in self._overlays.values():
            if instance_id in overlay.members:
                return str(overlay.members[instance_id].ip)
        return None

    async def create(self, cluster_id: Any, name: Any) -> Overlay:
        from .state import SimError

        if not isinstance(cluster_id, int) or isinstance(cluster_id, bool):
            raise SimError(400, "invalid_args", "error 400/1782: Invalid args: cluster_id must be an integer")
        if not isinstance(name, str) or not _NAME.match(name):
            raise SimError(
                400, "invalid_args", "error 400/1782: Invalid args: name must be 1-64 letters, digits, '_', '.' or '-'"
            )
        if not any(o.get("cluster_id") == cluster_id for o in self._cloud.catalog):
            raise SimError(404, "no_such_cluster", f"Cluster {cluster_id} not found.")
        if any(o.name == name for o in self._overlays.values()):
            raise SimError(400, "overlay_exists", f"An overlay named {name!r} already exists.")
        self._check_backend()
        overlay_id = self._next_id
        self._next_id += 1
        n = overlay_id - FIRST_OVERLAY_ID
        subnet = ipaddress.IPv4Network(f"10.{100 + (n // 256) % 150}.{n % 256}.0/24")
        overlay = Overlay(overlay_id, name, cluster_id, subnet)
        if self._real():
            await self._bounded_call(self._fabric.add_bridge(overlay_id))
        self._overlays[overlay_id] = overlay
        return overlay

    async def join(self, name: Any, instance_id: Any) -> Overlay:
        from .state import SimError

        overlay = next((o for o in self._overlays.values() if o.name == name), None)
        if overlay is None:
            raise SimError(404, "no_such_overlay", f"Overlay {name!r} not found.")
        if not isinstance(instance_id, int) or isinstance(instance_id, bool):
            raise SimError(400, "invalid_args", "error 400/1782: Invalid args: instance_id must be an integer")
        inst = self._cloud.require(instance_id)
        if inst.offer.get("cluster_id") != overlay.cluster_id:
            raise SimError(
                400,
                "invalid_args",
                f"Instance {instance_id} is not on cluster {overlay.cluster_id} (its machine is on "
                f"{inst.offer.get('cluster_id') or 'no cluster'}); only instances of that cluster can join.",
            )
        if instance_id in overlay.members:
            return overlay
        if any(instance_id in o.members for o in self._overlays.values()):
            raise SimError(400, "invalid_args", f"Instance {instance_id} is already on another overlay.")
        free = (h for h in overlay.subnet.hosts() if h not in overlay.used and h != overlay.subnet[1])  # .1: gateway
        host_ip = next(free, None)
        if host_ip is None:
            raise SimError(400, "overlay_full", f"Overlay {overlay.name!r} has no free address left.")
        address = ipaddress.IPv4Interface(f"{host_ip}/{overlay.subnet.prefixlen}")
        if self._real():
            overlay.nets[instance_id] = await self._plug(overlay, inst, address)
        overlay.members[instance_id] = address
        overlay.used.add(host_ip)
        return overlay

    async def delete(self, ident: Mapping[str, Any]) -> Overlay:
        from .state import SimError

        if "overlay_id" in ident:
            overlay = self._overlays.get(ident["overlay_id"]) if isinstance(ident["overlay_id"], int) else None
        else:
            overlay = next((o for o in self._overlays.values() if o.name == ident.get("overlay_name")), None)
        if overlay is None:
            raise SimError(404, "no_such_overlay", "Overlay not found.")
        # Gone from the list first: a second delete while this one unplugs finds nothing (404), as on Vast.
        del self._overlays[overlay.id]
        for instance_id in list(overlay.members):
            await self._unplug(overlay, instance_id)
        if self._real():
            await self._fabric.remove_bridge(overlay.id)
        return overlay

    async def forget(self, inst: SimInstance) -> None:
        """The instance is going away: off every overlay it was on."""
        for overlay in self._overlays.values():
            if inst.id in overlay.members:
                await self._unplug(overlay, inst.id)

    async def aclose(self) -> None:
        for overlay in list(self._overlays.values()):
            for instance_id in list(overlay.members):
                await self._unplug(overlay, instance_id)
        self._overlays.clear()
        await self._fabric.aclose()

    # --- internals --------------------------------------------------------------------------------------------

    def _real(self) -> bool:
        return self._cloud.backend.name == "sshd"

    def _check_backend(self) -> None:
        from .state import SimError

        name = self._cloud.backend.name
        if name == "asyncssh":
            raise SimError(
                501,
                "not_supported",
                "Overlay networks are not simulated with the in-process (asyncssh) host backend: they need network "
                "namespaces. Run the simulator as root with the sshd backend (VAST_MCP_SIM_BACKEND=sshd).",
            )
        if self._real():
            why = network_unavailable_reason()
            if why is not None:
                raise SimError(501, "not_supported", f"Overlay networks cannot be simulated here: {why}.")

    async def _plug(self, overlay: Overlay, inst: SimInstance, address: ipaddress.IPv4Interface) -> Member:
        from .state import SimError

        host: Any = inst.host
        try:
            member: Member = await self._bounded_call(host.new_network())
        except SimHostError as exc:
            raise SimError(400, "invalid_args", f"Instance {inst.id} cannot join now: {exc}") from None
        try:
            await self._bounded_call(self._fabric.plug(overlay.id, member, address))
            await self._bounded_call(host.use_network(member))
        except BaseException:
            await member.end()
            raise
        return member

    async def _unplug(self, overlay: Overlay, instance_id: int) -> None:
        overlay.members.pop(instance_id, None)
        member = overlay.nets.pop(instance_id, None)
        if member is None:
            return
        inst = self._cloud.instances.get(instance_id)
        if inst is not None and not inst.destroyed:
            host: Any = inst.host
            # If this fails the instance is stopping anyway; its next boot writes its own shell back.
            with contextlib.suppress(SimHostError, OSError, TimeoutError):
                await self._bounded_call(host.use_network(None))
        await member.end()

    async def _bounded_call(self, awaitable: Any) -> Any:
        import anyio

        with anyio.fail_after(30):
            return await awaitable
