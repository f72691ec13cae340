"""The simulated cloud's state: one account, its SSH keys, the market, instances, billing and faults.

`SimCloud` is the only mutable object of the simulator. It is used from one event loop: enter it
(`async with SimCloud(...) as cloud`) to get the task group that boots instances; leaving it destroys every
instance, so backends end their processes. HTTP lives in `api.py`; this module knows nothing about requests.

Every instance of a host backend with SSH has two addresses, as on Vast: the proxy (`ssh_host`/`ssh_port`), a
relay this module opens at create and closes at destroy, which resets connections until the host's SSH is up;
and the direct path (`public_ipaddr` + `ports["22/tcp"]`), the host's own port, published only while it runs.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from ..vast.create import parse_docker_env
from ..vast.limits import RateLimiter, RouteLimit
from .catalog import DEFAULT_SEED, TEMPLATES, build_catalog, gpu_names, price_offer, storage_per_hour
from .faults import FaultBook, InstanceFaults
from .hosts import Host, HostBackend, HostSpec, StateOnlyBackend
from .images import profile_for
from .overlays import OverlayBook
from .pulls import STEPS, pull_message, pull_seconds
from .relay import Relay
from .search import number

FIRST_INSTANCE_ID = 27_400_000
FIRST_SSH_KEY_ID = 90_100
USER_ID = 318_204
MAX_LABEL = 1024
# A port check or a host start that takes longer than this is a broken host, not a slow one.
DEFAULT_PORT_WAIT = 30.0
DEFAULT_START_TIMEOUT = 60.0
DESTROY_TIMEOUT = 30.0
REQUEST_LOG_MAX = 10_000
LOG_REQUESTS_MAX = 1_000


_SIM_TOOL_PREFIXES = ("unshare:", "setpriv:", "nsenter:")


class SimError(Exception):
    """A refusal the API turns into Vast's error envelope `{"success": false, "error", "msg"}`."""

    def __init__(self, status: int, error: str, msg: str, **extra: Any) -> None:
        super().__init__(msg)
        self.status = status
        self.error = error
        self.msg = msg
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"success": False, "error": self.error, "msg": self.msg, **self.extra}


@dataclass(frozen=True)
class Principal:
    """Who a key belongs to: the account owner, or one instance's restricted key."""

    instance_id: int | None = None

    @property
    def restricted(self) -> bool:
        return self.instance_id is not None


@dataclass
class SshKeyRecord:
    id: int
    key: str
    created_at: float

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": USER_ID,
            "key": self.key,
            "public_key": self.key,
            "created_at": _iso(self.created_at),
            "deleted_at": None,
        }


@dataclass
class SimInstance:
    id: int
    offer: dict[str, Any]  # the unpriced catalogue row it was made from
    disk: float
    image: str | None
    env: dict[str, str]
    onstart: str | None
    runtype: str
    label: str | None
    api_key: str
    args: list[str]
    bid_price: float | None
    template_hash_id: str | None
    created_at: float
    spec: HostSpec
    host: Host
    faults: InstanceFaults
    log_path: Path
    jupyter_token: str | None
    proxy: Relay | None = None  # the proxy SSH port, for the instance's whole life; None on state-only hosts
    published: dict[str, Relay] = field(default_factory=dict)  # "22/tcp" → the direct SSH port, and -p mappings
    price_multiplier: float = 1.0  # the price-change fault: what the host charges over the offer's price
    actual_status: str | None = "created"
    intended_status: str = "running"
    cur_state: str = "running"
    status_msg: str | None = "Created, waiting for a host slot"
    destroyed: bool = False
    destroyed_at: float | None = None
    running_since: float | None = None
    outbid_by: float | None = None  # a competitor's bid for the machine, while it is there (interruptible only)
    cost: float = 0.0
    bill_mark: float = 0.0
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    lifecycle_done: anyio.Event | None = None

    @property
    def is_bid(self) -> bool:
        return self.bid_price is not None

    @property
    def dph_base(self) -> float:
        base = float(self.bid_price) if self.bid_price is not None else float(self.offer["dph_base"])
        return base * self.price_multiplier

    @property
    def storage_per_hour(self) -> float:
        return storage_per_hour(self.offer, self.disk) * self.price_multiplier

    @property
    def proxy_port(self) -> int | None:
        return None if self.proxy is None or self.destroyed else self.proxy.port

    @property
    def dph_total(self) -> float:
        return round(self.dph_base + self.storage_per_hour, 6)

    def hourly_rate(self) -> float:
        """What the instance costs right now: the full price while running, its disk otherwise."""
        if self.destroyed:
            return 0.0
        return self.dph_total if self.actual_status == "running" else self.storage_per_hour


@dataclass
class LogRequest:
    instance_id: int
    ready_at: float  # monotonic: the upload to "S3" lands then
    tail: int | None
    filter: str | None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


class SimCloud:
    """One simulated Vast account and market. Pass the host backend; enter it before use."""

    def __init__(
        self,
        *,
        backend: HostBackend | None = None,
        boot_delay: float = 0.0,
        api_key: str | None = None,
        credit: float = 100.0,
        root_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
        seed: int = DEFAULT_SEED,
        port_wait: float = DEFAULT_PORT_WAIT,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        limits: tuple[RouteLimit, ...] = (),
        pull_scale: float = 0.0,
        show_gap_s: float = 0.0,
        team_key: bool = False,
    ) -> None:
        """`limits`: Vast's per-route rate limits to enforce (`vast.limits.VAST_LIMITS`, or `scaled_limits(f)`);
        none by default, so tests that do not study them stay fast. `pull_scale`: image pulls take their real
        time (about a minute per GB) times this factor; 0 means no pull time beyond `boot_delay`. `show_gap_s`:
        for this long after create, show instance answers `{"instances": null}`, as Vast sometimes does.
        `team_key`: the account key is a team key, which Vast does not let register SSH keys."""
        self.backend: HostBackend = backend or StateOnlyBackend()
        self.limiter = RateLimiter(limits)
        self.pull_scale = pull_scale
        self.show_gap_s = show_gap_s
        self.team_key = team_key
        self.boot_delay = boot_delay
        self.api_key = api_key or secrets.token_hex(32)
        self.initial_credit = credit
        self.clock = clock
        self.port_wait = port_wait
        self.start_timeout = start_timeout
        self.faults = FaultBook()
        self.catalog: list[dict[str, Any]] = build_catalog(seed)
        self.templates: list[dict[str, Any]] = [dict(t) for t in TEMPLATES]
        self.request_log: list[dict[str, Any]] = []
        self.log_requests: dict[str, LogRequest] = {}
        self.ssh_keys: list[SshKeyRecord] = []
        self.instances: dict[int, SimInstance] = {}  # every instance ever, destroyed ones included
        self._offers = {int(o["id"]): o for o in self.catalog}
        self._rented: dict[int, int] = {}  # offer id → instance id
        self._next_instance_id = FIRST_INSTANCE_ID
        self._next_key_id = FIRST_SSH_KEY_ID
        self._request_seq = 0
        self._own_root = root_dir is None
        self.root_dir = root_dir or Path(tempfile.mkdtemp(prefix="vast-sim-"))
        self._tg: anyio.abc.TaskGroup | None = None
        self.overlays = OverlayBook(self)

    # --- lifetime ---------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._tg is not None

    async def __aenter__(self) -> SimCloud:
        if self._tg is not None:
            raise RuntimeError("SimCloud is already running")
        self.root_dir.mkdir(parents=True, exist_ok=True)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        tg, self._tg = self._tg, None
        try:
            with anyio.CancelScope(shield=True):
                await self.destroy_all()
                await self.overlays.aclose()
        finally:
            if tg is not None:
                tg.cancel_scope.cancel()
                await tg.__aexit__(exc_type, exc, tb)
            if self._own_root:
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(self.root_dir, ignore_errors=True))
        return None

    async def destroy_all(self) -> None:
        for inst in list(self.instances.values()):
            if not inst.destroyed:
                await self._destroy(inst)

    async def reset(self) -> None:
        """Back to a fresh account: no instances (all destroyed), keys, faults, logs; full credit.

        Instance ids keep counting up, because the `vastai` CLI caches SSH addresses per instance id.
        """
        await self.destroy_all()
        await self.overlays.aclose()
        self.overlays = OverlayBook(self)
        self.instances.clear()
        self._rented.clear()
        self.ssh_keys.clear()
        self.faults.clear()
        self.limiter.reset()
        self.request_log.clear()
        self.log_requests.clear()

    # --- account ----------------------------------------------------------------------------------------------

    def authenticate(self, key: str | None) -> Principal | None:
        if not key:
            return None
        if secrets.compare_digest(key, self.api_key):
            return Principal()
        for inst in self.instances.values():
            if not inst.destroyed and secrets.compare_digest(key, inst.api_key):
                return Principal(instance_id=inst.id)
        return None

    def spent(self) -> float:
        now = self.clock()
        for inst in self.instances.values():
            self._accrue(inst, now)
        return sum(inst.cost for inst in self.instances.values())

    def balance(self) -> float:
        return self.initial_credit - self.spent()

    def user(self) -> dict[str, Any]:
        balance = round(self.balance(), 6)
        return {
            "id": USER_ID,
            "username": "sim-user",
            "email": "sim-user@example.com",
            "fullname": "Simulated User",
            "credit": balance,
            "balance": balance,
            "total_spend": round(self.initial_credit - balance, 6),
            "can_pay": balance > 0,
            "has_billing": True,
            "billed_verification": True,
            "host_agreement_accepted": False,
            "ssh_key": self.ssh_keys[-1].key if self.ssh_keys else None,
            "sid": f"sim-{USER_ID}",
        }

    # --- SSH keys ---------------------------------------------------------------------------------------------

    def add_ssh_key(self, text: str) -> SshKeyRecord:
        if self.team_key:
            raise SimError(400, "invalid_request", "team SSH keys are not supported")
        key = text.strip()
        if not key.startswith(("ssh-", "ecdsa-")):
            raise SimError(400, "no_ssh_key", "Invalid SSH key: expected an OpenSSH public key (ssh-... or ecdsa-...)")
        record = SshKeyRecord(id=self._next_key_id, key=key, created_at=self.clock())
        self._next_key_id += 1
        self.ssh_keys.append(record)
        return record

    def delete_ssh_key(self, key_id: int) -> None:
        for record in self.ssh_keys:
            if record.id == key_id:
                self.ssh_keys.remove(record)
                return
        raise SimError(404, "no_such_key", f"SSH key {key_id} not found.")

    # --- market -----------------------------------------------------------------------------------------------

    def available_offers(self, allocated_storage: float = 5.0, kind: str = "on-demand") -> list[dict[str, Any]]:
        """Priced offers nobody rents right now: what search sees."""
        return [price_offer(o, allocated_storage, kind) for o in self.catalog if int(o["id"]) not in self._rented]

    def gpu_names(self) -> list[str]:
        return gpu_names(self.catalog)

    # --- instances --------------------------------------------------------------------------------------------

    def visible(self, instance_id: int) -> SimInstance | None:
        inst = self.instances.get(instance_id)
        return None if inst is None or inst.destroyed else inst

    def shown(self, instance_id: int) -> SimInstance | None:
        """What show instance sees: like `visible`, but nothing yet in the moment after create."""
        inst = self.visible(instance_id)
        if inst is not None and self.clock() - inst.created_at < self.show_gap_s:
            return None
        return inst

    def require(self, instance_id: int) -> SimInstance:
        inst = self.visible(instance_id)
        if inst is None:
            raise SimError(404, "no_such_instance", f"Instance {instance_id} not found.")
        return inst

    def visible_instances(self) -> list[SimInstance]:
        return [i for i in self.instances.values() if not i.destroyed]

    async def create_instance(self, offer_id: int, body: Mapping[str, Any]) -> SimInstance:
        if self._tg is None:
            raise RuntimeError("enter the SimCloud (async with) before creating instances")
        offer = self._offers.get(offer_id)
        if offer is None:
            raise SimError(
                404,
                "no_such_ask",
                f"error 404/3603: no_such_ask Instance type by id {offer_id} is not available.",
                ask_id=offer_id,
            )
        if offer_id in self._rented and body.get("cancel_unavail"):
            raise SimError(
                410,
                "no_such_ask",
                f"error 410/3603: no_such_ask Instance type by id {offer_id} is no longer available.",
                ask_id=offer_id,
            )
        if offer_id in self._rented:
            # Vast's documented answer for an offer that went away: 404 with `invalid_args`, "no_such_ask" in msg.
            raise SimError(
                404,
                "invalid_args",
                f"error 404/3603: no_such_ask Instance type by id {offer_id} is not available.",
                ask_id=offer_id,
            )
        disk = _float_arg(body.get("disk"), "disk", 10.0)
        if disk <= 0 or disk > float(offer["disk_space"]):
            raise SimError(
                400,
                "invalid_args",
                f"error 400/1782: Invalid args: disk {disk:g} GB outside 1..{float(offer['disk_space']):g} GB",
                ask_id=offer_id,
            )
        price = body.get("price")
        bid_price = None if price is None else _float_arg(price, "price", 0.0)
        if bid_price is not None and bid_price < float(offer["min_bid"]):
            raise SimError(
                400,
                "invalid_price",
                f"error 400/1785: bid price {bid_price:g} is below the minimum {float(offer['min_bid']):g}",
                ask_id=offer_id,
            )
        label = body.get("label")
        if label is not None and len(str(label)) > MAX_LABEL:
            raise SimError(400, "label_too_long", f"label is longer than {MAX_LABEL} characters", ask_id=offer_id)
        if self.balance() <= 0:
            raise SimError(402, "insufficient_credit", "Your account has no credit left.", ask_id=offer_id)
        body = self._with_template(body)
        env = _env_arg(body.get("env"))
        runtype = str(body.get("runtype") or "ssh")
        args = [str(a) for a in body.get("args") or []]

        instance_id = self._next_instance_id
        self._next_instance_id += 1
        self._rented[offer_id] = instance_id  # before any await: two creates must not rent one offer
        proxy: Relay | None = None
        published: dict[str, Relay] = {}
        # State-only hosts have no SSH at all, so they get no address either.
        if not isinstance(self.backend, StateOnlyBackend):
            proxy = Relay(None)
            # The machine's published ports, fixed for the instance's life (a restart does not move them, so the
            # `vastai` CLI's cached ssh-url stays good): SSH, and each `-p HOST:CONTAINER` the env asked for.
            published = {"22/tcp": Relay(None)}
            for container_port in _port_mappings(env):
                published[f"{container_port}/tcp"] = Relay(("127.0.0.1", container_port))
            try:
                for relay in (proxy, *published.values()):
                    await relay.open()
                if self._tg is None:  # the cloud shut down meanwhile: nothing would ever close this port
                    raise SimError(503, "server_error", "The simulated cloud is shutting down.")
            except BaseException:
                self._rented.pop(offer_id, None)
                with anyio.CancelScope(shield=True):
                    for relay in (proxy, *published.values()):
                        await relay.close()
                raise
        api_key = secrets.token_hex(32)
        inst_dir = self.root_dir / str(instance_id)
        log_path = inst_dir / "instance.log"
        faults = self.faults.for_new_instance() or InstanceFaults()
        self.faults.instances[instance_id] = faults
        spec = HostSpec(
            instance_id=instance_id,
            disk_dir=inst_dir / "disk",
            authorized_keys=[k.key for k in self.ssh_keys],
            env={
                **env,
                "CONTAINER_API_KEY": api_key,
                "CONTAINER_ID": str(instance_id),
                "VAST_CONTAINERLABEL": f"C.{instance_id}",
            },
            onstart=body.get("onstart") or None if runtype != "args" else None,
            log_path=log_path,
            bandwidth_limit=faults.bandwidth_limit,
            extra=faults.to_extra(),
            image=body.get("image"),
        )
        now = self.clock()
        inst = SimInstance(
            id=instance_id,
            offer=offer,
            disk=disk,
            image=body.get("image"),
            env=env,
            onstart=spec.onstart,
            runtype=runtype,
            label=None if label is None else str(label),
            api_key=api_key,
            args=args,
            bid_price=bid_price,
            template_hash_id=body.get("template_hash_id"),
            created_at=now,
            spec=spec,
            host=self.backend.create(spec),
            faults=faults,
            log_path=log_path,
            jupyter_token=secrets.token_hex(16) if "jupyter" in runtype else None,
            proxy=proxy,
            published=published,
            price_multiplier=faults.price_multiplier or 1.0,
            bill_mark=now,
        )
        self.instances[instance_id] = inst
        await anyio.to_thread.run_sync(lambda: inst_dir.mkdir(parents=True, exist_ok=True))
        await self._log(inst, f"instance {instance_id} created from offer {offer_id} ({offer['gpu_name']})")
        self._start_lifecycle(inst, first_boot=True)
        return inst

    def _with_template(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The create body with its template's fields filled in: request fields that are set win (Vast's rule),
        so a request's `onstart` replaces the template's own."""
        out = dict(body)
        hash_id = body.get("template_hash_id")
        if not hash_id:
            return out
        template = next((t for t in self.templates if t.get("hash_id") == hash_id), None)
        if template is None:
            raise SimError(404, "invalid_args", f"error 404/1782: Invalid args: no template with hash {hash_id}")
        image = template.get("image")
        if image and template.get("tag"):
            image = f"{image}:{template['tag']}"
        defaults = {
            "image": image,
            "runtype": template.get("runtype"),
            "onstart": template.get("onstart") or None,
            "env": template.get("env") or None,
            "args": template.get("args") or None,
        }
        for key, value in defaults.items():
            if out.get(key) in (None, "", {}, []) and value is not None:
                out[key] = value
        if isinstance(body.get("env"), Mapping) and isinstance(template.get("env"), str):
            out["env"] = {**_env_arg(template["env"]), **_env_arg(body["env"])}
        return out

    def set_faults(self, instance_id: int, faults: InstanceFaults) -> SimInstance:
        """Arm faults on an existing instance; they act from its next boot (and SSH/bandwidth ones at once).

        `price_multiplier` is fixed when an instance is created, so it has no effect here.
        """
        inst = self.instances.get(instance_id)
        if inst is None:
            raise SimError(404, "no_such_instance", f"Instance {instance_id} not found.")
        inst.faults = faults
        self.faults.instances[instance_id] = faults
        inst.spec.bandwidth_limit = faults.bandwidth_limit
        for key in [k for k in inst.spec.extra if k.startswith("fault.")]:
            del inst.spec.extra[key]
        inst.spec.extra.update(faults.to_extra())
        return inst

    def set_label(self, instance_id: int, label: Any) -> None:
        inst = self.require(instance_id)
        if label is not None and len(str(label)) > MAX_LABEL:
            raise SimError(400, "label_too_long", f"label is longer than {MAX_LABEL} characters")
        inst.label = None if label is None else str(label)

    async def set_state(self, instance_id: int, state: str) -> None:
        inst = self.require(instance_id)
        if state == "stopped":
            await self._stop(inst)
        elif state == "running":
            if inst.actual_status in ("running", "loading", "created") and inst.intended_status == "running":
                return
            await self._stop_lifecycle(inst)
            inst.intended_status = inst.cur_state = "running"
            self._start_lifecycle(inst, first_boot=False)
        else:
            raise SimError(400, "invalid_args", f"Invalid args: state must be running or stopped, not {state!r}")

    async def reboot(self, instance_id: int) -> None:
        inst = self.require(instance_id)
        await self._stop_lifecycle(inst)
        await self._stop_host(inst)
        await self._set_status(inst, "rebooting", "Rebooting")
        inst.intended_status = inst.cur_state = "running"
        self._start_lifecycle(inst, first_boot=False)

    async def destroy(self, instance_id: int) -> None:
        await self._destroy(self.require(instance_id))

    def change_bid(self, instance_id: int, price: Any) -> None:
        """`PUT /instances/bid_price/{id}/`: a new bid for an interruptible instance; null means "the winning bid",
        which the simulated market sets at the offer's minimum bid."""
        inst = self.require(instance_id)
        if not inst.is_bid:
            raise SimError(400, "invalid_args", f"Instance {instance_id} is on-demand; only interruptible ones bid.")
        self._accrue(inst, self.clock())
        bid = float(inst.offer["min_bid"]) if price is None else _float_arg(price, "price", 0.0)
        if bid < float(inst.offer["min_bid"]):
            raise SimError(
                400,
                "invalid_price",
                f"error 400/1785: bid price {bid:g} is below the minimum {float(inst.offer['min_bid']):g}",
            )
        inst.bid_price = bid
        if inst.outbid_by is not None and bid > inst.outbid_by:
            self._bid_wins(inst)

    # --- the bid market ---------------------------------------------------------------------------------------

    async def outbid(self, instance_id: int, price: float | None = None, seconds: float | None = None) -> None:
        """Another renter bids `price` $/hr for an interruptible instance's machine (default: 10% over its bid).
        A higher bid stops the instance, as on Vast: actual status `stopped` while the intended status stays
        `running`, the disk kept and billed. It starts again when its bid is the highest again: the competitor
        leaves after `seconds` (None: stays until the instance is destroyed), or the bid is raised above theirs."""
        inst = self.require(instance_id)
        if inst.bid_price is None:
            raise SimError(400, "invalid_args", f"Instance {instance_id} is on-demand; only bids can be outbid.")
        competitor = round(inst.bid_price * 1.1 + 0.0001, 4) if price is None else float(price)
        if competitor <= inst.bid_price:
            return
        inst.outbid_by = competitor
        if inst.actual_status != "stopped":
            await self._stop_lifecycle(inst)
            await self._stop_host(inst)
            inst.cur_state = "stopped"
            await self._set_status(inst, "stopped", f"outbid: another renter bids ${competitor:.4f}/hr")
        if seconds is not None and self._tg is not None:
            self._tg.start_soon(self._competitor_leaves, inst, competitor, seconds)

    async def _competitor_leaves(self, inst: SimInstance, competitor: float, seconds: float) -> None:
        await anyio.sleep(seconds)
        if inst.outbid_by == competitor:
            self._bid_wins(inst)

    def _bid_wins(self, inst: SimInstance) -> None:
        """Our bid is the highest again: a stopped interruptible instance starts again (its disk was kept)."""
        inst.outbid_by = None
        if not inst.destroyed and inst.actual_status == "stopped" and inst.intended_status == "running":
            inst.cur_state = "running"
            self._start_lifecycle(inst, first_boot=False)

    async def fail_host(self, instance_id: int) -> None:
        """The host dies under the instance: its processes end and Vast shows it `offline` until destroyed."""
        inst = self.require(instance_id)
        await self._stop_lifecycle(inst)
        await self._stop_host(inst)
        await self._set_status(inst, "offline", "host is offline: lost contact with the machine")

    async def attach_key(self, instance_id: int, key: str) -> None:
        inst = self.require(instance_id)
        text = key.strip()
        if not text.startswith(("ssh-", "ecdsa-")):
            raise SimError(400, "no_ssh_key", "Invalid SSH key: expected an OpenSSH public key (ssh-... or ecdsa-...)")
        if text in inst.spec.authorized_keys:
            return
        await self._bounded(inst.host.add_authorized_key(text))
        if text not in inst.spec.authorized_keys:
            inst.spec.authorized_keys.append(text)
        await self._log(inst, "ssh key attached")

    def detach_key(self, instance_id: int, key_id: int) -> None:
        inst = self.require(instance_id)
        record = next((k for k in self.ssh_keys if k.id == key_id), None)
        if record is None or record.key not in inst.spec.authorized_keys:
            raise SimError(404, "no_such_key", f"SSH key {key_id} is not attached to instance {instance_id}.")
        inst.spec.authorized_keys.remove(record.key)

    def instance_keys(self, instance_id: int) -> list[dict[str, Any]]:
        inst = self.require(instance_id)
        by_text = {k.key: k for k in self.ssh_keys}
        out: list[dict[str, Any]] = []
        for n, text in enumerate(inst.spec.authorized_keys):
            record = by_text.get(text)
            out.append({"id": record.id if record else -(n + 1), "key": text})
        return out

    # --- logs -------------------------------------------------------------------------------------------------

    def request_logs(self, instance_id: int, tail: int | None, filter_text: str | None, ready_in: float) -> str:
        self.require(instance_id)
        token = secrets.token_urlsafe(18)
        if len(self.log_requests) >= LOG_REQUESTS_MAX:
            del self.log_requests[next(iter(self.log_requests))]
        self.log_requests[token] = LogRequest(instance_id, time.monotonic() + ready_in, tail, filter_text)
        return token

    async def log_text(self, token: str) -> str | None:
        """The log a `result_url` names, or None while it is "not uploaded yet" (or never was)."""
        req = self.log_requests.get(token)
        if req is None or time.monotonic() < req.ready_at:
            return None
        inst = self.instances.get(req.instance_id)
        if inst is None:
            return None
        path = anyio.Path(inst.log_path)
        text = await path.read_text(encoding="utf-8", errors="replace") if await path.exists() else ""
        # The namespace tools' own complaints (`unshare: ...`) are the simulator's, not the instance's.
        lines = [line for line in text.splitlines() if not line.startswith(_SIM_TOOL_PREFIXES)]
        if req.filter:
            lines = [line for line in lines if req.filter in line]
        if req.tail is not None:
            lines = lines[-req.tail :] if req.tail > 0 else []
        return "\n".join(lines) + ("\n" if lines else "")

    # --- requests ---------------------------------------------------------------------------------------------

    def record_request(self, entry: dict[str, Any]) -> dict[str, Any]:
        self._request_seq += 1
        entry = {"seq": self._request_seq, **entry}
        self.request_log.append(entry)
        # A long-running demo sim must not grow without bound; tests read far fewer than this.
        if len(self.request_log) > REQUEST_LOG_MAX:
            del self.request_log[: len(self.request_log) - REQUEST_LOG_MAX]
        return entry

    # --- views ------------------------------------------------------------------------------------------------

    def row(self, inst: SimInstance) -> dict[str, Any]:
        """The instance as Vast's v0 show and v1 list return it (every field the CLI indexes is present)."""
        now = self.clock()
        self._accrue(inst, now)
        offer = inst.offer
        # The direct path exists only while the host runs; the proxy from create to destroy.
        port = inst.host.ssh_port if not inst.destroyed else None
        direct = "_direc" in inst.runtype
        ports: dict[str, list[dict[str, str]]] = {}
        if port is not None and direct:
            for name, relay in inst.published.items():
                if relay.port is not None:
                    ports[name] = [{"HostIp": "0.0.0.0", "HostPort": str(relay.port)}]
            if "22/tcp" in ports:
                port = int(ports["22/tcp"][0]["HostPort"])
        proxy_port = inst.proxy_port if inst.runtype != "args" else None
        ssh_host = None if proxy_port is None else "127.0.0.1"
        ssh_port = proxy_port
        # The CLI adds 1 to the proxy port for jupyter runtypes (Vast puts jupyter first), so report one less.
        if proxy_port is not None and "jupyter" in inst.runtype:
            ssh_port = proxy_port - 1
        uptime = 0.0 if inst.running_since is None or inst.actual_status != "running" else now - inst.running_since
        running = inst.actual_status == "running"
        return {
            "id": inst.id,
            "machine_id": offer["machine_id"],
            "host_id": offer["host_id"],
            "bundle_id": offer["bundle_id"],
            "ask_contract_id": offer["id"],
            "actual_status": inst.actual_status,
            "intended_status": inst.intended_status,
            "cur_state": inst.cur_state,
            "next_state": inst.intended_status,
            "status_msg": inst.status_msg,
            "label": inst.label,
            "template_id": None,
            "template_hash_id": inst.template_hash_id,
            "template_name": None,
            "image_uuid": inst.image,
            "image_args": list(inst.args),
            "image_runtype": inst.runtype,
            "extra_env": [[k, v] for k, v in inst.env.items()],
            "onstart": inst.onstart,
            "jupyter_token": inst.jupyter_token,
            "ssh_host": ssh_host,
            "ssh_port": ssh_port,
            "ssh_idx": "1",
            "machine_dir_ssh_port": port,
            "public_ipaddr": "127.0.0.1",
            "local_ipaddrs": " ".join(["127.0.0.1", *filter(None, [self.overlays.address_of(inst.id)])]),
            "direct_port_start": port if port is not None and direct else -1,
            "direct_port_end": port if port is not None and direct else -1,
            "direct_port_count": offer["direct_port_count"],
            "ports": ports,
            "static_ip": offer["static_ip"],
            "start_date": inst.created_at,
            "end_date": inst.created_at + float(offer["duration"]),
            "duration": now - inst.created_at,
            "uptime_mins": round(uptime / 60.0, 3),
            "num_gpus": offer["num_gpus"],
            "gpu_name": offer["gpu_name"],
            "gpu_ram": offer["gpu_ram"],
            "gpu_totalram": offer["gpu_total_ram"],
            "gpu_util": 0.0 if running else None,
            "gpu_temp": 38.0 if running else None,
            "gpu_arch": offer["gpu_arch"],
            "gpu_frac": offer["gpu_frac"],
            "cpu_name": offer["cpu_name"],
            "cpu_arch": offer["cpu_arch"],
            "cpu_cores": offer["cpu_cores"],
            "cpu_cores_effective": offer["cpu_cores_effective"],
            "cpu_ram": offer["cpu_ram"],
            "cpu_util": 0.0 if running else None,
            "mem_usage": 0.0 if running else None,
            "mem_limit": float(offer["cpu_ram"]) / 1024.0,
            "vmem_usage": 0.0 if running else None,
            "disk_space": inst.disk,
            "disk_usage": 0.0,
            "disk_util": 0.0,
            "disk_name": offer["disk_name"],
            "disk_bw": offer["disk_bw"],
            "inet_up": offer["inet_up"],
            "inet_down": offer["inet_down"],
            "inet_up_cost": offer["inet_up_cost"],
            "inet_down_cost": offer["inet_down_cost"],
            "cuda_max_good": offer["cuda_max_good"],
            "driver_version": offer["driver_version"],
            "compute_cap": offer["compute_cap"],
            "dph_base": inst.dph_base,
            "dph_total": inst.dph_total,
            "min_bid": offer["min_bid"],
            "is_bid": inst.is_bid,
            "storage_cost": offer["storage_cost"],
            "storage_total_cost": round(inst.storage_per_hour, 6),
            "credit_balance": None,
            "credit_discount": None,
            "credit_discount_max": offer["credit_discount_max"],
            "time_remaining": "",
            "reliability2": offer["reliability2"],
            "geolocation": offer["geolocation"],
            "verification": offer["verification"],
            "hosting_type": offer["hosting_type"],
            "volume_info": None,
            "logo": "/static/logos/nvidia.png",
        }

    def admin_row(self, inst: SimInstance) -> dict[str, Any]:
        """What `/_sim/instances` shows: every instance ever, with what the host really runs."""
        now = self.clock()
        self._accrue(inst, now)
        return {
            "id": inst.id,
            "offer_id": inst.offer["id"],
            "cluster_id": inst.offer.get("cluster_id"),
            "status": "destroyed" if inst.destroyed else inst.actual_status,
            "actual_status": inst.actual_status,
            "intended_status": inst.intended_status,
            "status_msg": inst.status_msg,
            "destroyed": inst.destroyed,
            "destroyed_at": inst.destroyed_at,
            "label": inst.label,
            "image": inst.image,
            "image_profile": profile_for(inst.image).name,
            "runtype": inst.runtype,
            "created_at": inst.created_at,
            "dph_total": inst.dph_total,
            "cost": round(inst.cost, 9),
            "ssh_port": None if inst.destroyed else inst.host.ssh_port,
            "proxy_port": inst.proxy_port,
            "published_ports": {k: r.port for k, r in inst.published.items()},
            "price_multiplier": inst.price_multiplier,
            "alive_pids": inst.host.alive_pids(),
            "authorized_keys": len(inst.spec.authorized_keys),
            "faults": self.faults.describe()["instances"].get(str(inst.id)),
            "disk_dir": str(inst.spec.disk_dir),
        }

    # --- internals --------------------------------------------------------------------------------------------

    def _accrue(self, inst: SimInstance, now: float) -> None:
        if now > inst.bill_mark:
            inst.cost += inst.hourly_rate() * (now - inst.bill_mark) / 3600.0
        inst.bill_mark = max(inst.bill_mark, now)

    async def _set_status(self, inst: SimInstance, status: str | None, msg: str | None) -> None:
        # Bill the time spent in the old status at the old rate before the rate changes.
        self._accrue(inst, self.clock())
        inst.actual_status = status
        inst.status_msg = msg
        if status == "running":
            inst.running_since = self.clock()
        await self._log(inst, f"status: {status}" + (f" ({msg})" if msg else ""))

    async def _log(self, inst: SimInstance, text: str) -> None:
        line = f"{_iso(self.clock())} [vast-sim] {text}\n"
        path = inst.log_path

        def append() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as fh:
                fh.write(line)

        await anyio.to_thread.run_sync(append)

    def _boot_delay(self, inst: SimInstance) -> float:
        if inst.faults.boot_delay is not None:
            return inst.faults.boot_delay
        # Hosts differ: image pulls and container starts take 0.75x..1.25x the base delay, fixed per offer.
        return self.boot_delay * (0.75 + (int(inst.offer["id"]) % 5) * 0.125)

    def _start_lifecycle(self, inst: SimInstance, *, first_boot: bool) -> None:
        assert self._tg is not None
        if inst.destroyed:  # a destroy can land while create is still writing the instance's first log line
            return
        inst.scope = anyio.CancelScope()
        inst.lifecycle_done = anyio.Event()
        self._tg.start_soon(self._lifecycle, inst, first_boot)

    async def _lifecycle(self, inst: SimInstance, first_boot: bool) -> None:
        done = inst.lifecycle_done
        try:
            with inst.scope:
                await self._boot(inst, first_boot)
        finally:
            if done is not None:
                done.set()

    async def _stop_lifecycle(self, inst: SimInstance) -> None:
        inst.scope.cancel()
        if inst.lifecycle_done is not None:
            with anyio.move_on_after(DESTROY_TIMEOUT):
                await inst.lifecycle_done.wait()

    async def _boot(self, inst: SimInstance, first_boot: bool) -> None:
        delay = self._boot_delay(inst)
        faults = inst.faults
        if first_boot:
            await anyio.sleep(delay * 0.2)
        await self._set_status(inst, "loading", f"Pulling image {inst.image or '(none)'}")
        if first_boot:
            await self._pull(inst)
        if faults.status_error is not None:
            # A bad tag or a refused container: Vast keeps the instance `loading` with the error as its message.
            await self._set_status(inst, "loading", faults.status_error)
            return
        if faults.never_boots:
            await anyio.sleep(faults.stuck_for)
            await self._set_status(
                inst,
                "exited",
                "Error response from daemon: failed to create task for container: OCI runtime create failed: "
                "unable to start container process",
            )
            return
        started = anyio.current_time()
        try:
            with anyio.fail_after(self.start_timeout):
                await inst.host.start()
        except Exception as exc:
            await self._set_status(inst, "exited", f"host failed to start: {exc}")
            return
        if inst.runtype == "args":
            # The entrypoint runtype has no SSH on Vast: the container runs, nothing carries a connection to it.
            await self._set_status(inst, "running", f"success, running {inst.image or 'image'}")
            await self._after_boot(inst)
            return
        # The proxy carries connections from the moment the host's SSH is up, while the status may still say
        # loading: clients probing the proxy see readiness before their next poll of the API would.
        self._route_proxy(inst)
        remaining = delay * 0.8 - (anyio.current_time() - started)
        if remaining > 0:
            await anyio.sleep(remaining)
        port = inst.host.ssh_port
        # The "SSH refuses" fault means exactly that the status says running before SSH accepts.
        if port is not None and faults.ssh_refuse_for is None and not await _port_accepts(port, self.port_wait):
            await self._stop_host(inst)
            await self._set_status(inst, "exited", f"ssh did not accept connections within {self.port_wait:g}s")
            return
        await self._set_status(inst, "running", f"success, running {inst.image or 'image'}")
        await self._after_boot(inst)

    async def _pull(self, inst: SimInstance) -> None:
        """The image download, with the `loading` message moving as it goes; only the first boot pulls."""
        total = pull_seconds(inst.image, self.pull_scale)
        if total <= 0:
            return
        for step in range(1, STEPS + 1):
            await anyio.sleep(total / STEPS)
            await self._set_status(inst, "loading", pull_message(inst.image, step / STEPS))

    async def _after_boot(self, inst: SimInstance) -> None:
        events: list[tuple[float, str]] = []
        if inst.faults.intended_stop_after is not None:
            events.append((inst.faults.intended_stop_after, "intended_stop"))
        if inst.faults.host_key_change_after is not None:
            events.append((inst.faults.host_key_change_after, "rotate"))
        if inst.faults.exit_after is not None:
            events.append((inst.faults.exit_after, "exit"))
        if inst.faults.outbid_after is not None and inst.is_bid and inst.outbid_by is None:
            events.append((inst.faults.outbid_after, "outbid"))
        elapsed = 0.0
        for at, what in sorted(events):
            await anyio.sleep(max(0.0, at - elapsed))
            elapsed = max(elapsed, at)
            if what == "intended_stop":
                # The host (or an outbid interruptible contract) stops it: Vast flips the intended status first.
                inst.intended_status = "stopped"
                await self._log(inst, "intended status: stopped")
                continue
            if what == "outbid":
                # Not awaited here: stopping the instance cancels this very task.
                assert self._tg is not None
                self._tg.start_soon(self.outbid, inst.id, None, inst.faults.outbid_for)
                return
            if what == "rotate":
                await self._bounded(inst.host.rotate_host_key())
                await self._log(inst, "host key changed")
            else:
                await self._stop_host(inst)
                await self._set_status(inst, "exited", "container exited with code 1")
                return

    async def _stop(self, inst: SimInstance) -> None:
        await self._stop_lifecycle(inst)
        inst.intended_status = inst.cur_state = "stopped"
        await self._stop_host(inst)
        await self._set_status(inst, "stopped", "Stopped by user")

    async def _destroy(self, inst: SimInstance) -> None:
        if inst.destroyed:
            return
        await self._stop_lifecycle(inst)
        self._accrue(inst, self.clock())
        inst.destroyed = True
        inst.destroyed_at = self.clock()
        inst.cur_state = "unloaded"
        inst.intended_status = "stopped"
        self._rented.pop(int(inst.offer["id"]), None)
        try:
            await self.overlays.forget(inst)
            if inst.proxy is not None:
                inst.proxy.target = None
                await self._bounded(inst.proxy.close())
            for relay in inst.published.values():
                relay.target = None
                await self._bounded(relay.close())
        finally:
            try:
                await self._bounded(inst.host.destroy())
            finally:
                await self._log(inst, "destroyed")

    def _route_proxy(self, inst: SimInstance) -> None:
        """Point the proxy at the host's SSH port, or unset it (connections reset) while the host has none."""
        port = inst.host.ssh_port
        target = None if port is None else ("127.0.0.1", port)
        if inst.proxy is not None:
            inst.proxy.target = target
        if "22/tcp" in inst.published:
            inst.published["22/tcp"].target = target

    async def _stop_host(self, inst: SimInstance) -> None:
        # Unroute first, so no new connection is carried to a host that is going away.
        if inst.proxy is not None:
            inst.proxy.target = None
        if "22/tcp" in inst.published:
            inst.published["22/tcp"].target = None
        await self._bounded(inst.host.stop())

    async def _bounded(self, awaitable: Any) -> None:
        with anyio.fail_after(DESTROY_TIMEOUT):
            await awaitable


async def _port_accepts(port: int, within: float) -> bool:
    """Whether 127.0.0.1:port accepts a TCP connection before `within` seconds pass."""
    with anyio.move_on_after(within):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.05)
                continue
            await stream.aclose()
            return True
    return False


def _float_arg(value: Any, name: str, default: float) -> float:
    if value is None:
        return default
    parsed = number(value)
    if parsed is None:
        raise SimError(400, "invalid_args", f"error 400/1782: Invalid args: {name} must be a number, not {value!r}")
    return parsed


def _port_mappings(env: Mapping[str, str]) -> list[int]:
    """Container ports of the TCP mappings in a create's env (`{"-p 8080:8080": "1"}`, as the CLI sends them)."""
    ports: list[int] = []
    for key in env:
        if not key.startswith("-p "):
            continue
        spec = key[3:].strip()
        if spec.endswith("/udp"):
            continue
        container = spec.removesuffix("/tcp").rsplit(":", 1)[-1]
        if container.isdigit() and 0 < int(container) < 65536 and int(container) not in ports:
            ports.append(int(container))
    return ports


def _env_arg(value: Any) -> dict[str, str]:
    """The create body's `env`: the CLI sends a dict; the docs also allow a docker-flag string like `-e K=V`."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): "" if v is None else str(v) for k, v in value.items()}
    if isinstance(value, str):
        return parse_docker_env(value)  # the docker-flag string, read as the CLI reads --env
    raise SimError(400, "invalid_args", "error 400/1782: Invalid args: env must be an object")


__all__ = [
    "LogRequest",
    "Principal",
    "SimCloud",
    "SimError",
    "SimInstance",
    "SshKeyRecord",
]
