"""`run_job`'s grouped arguments: which machine (`offer`) and the rarely needed knobs (`options`).

Grouping keeps the top level of `run_job` to what most jobs set, so its definition stays small; a new machine
filter belongs in `RunOffer`, a new knob of the run in `RunOptions`. Calls that still send these arguments at
the top level (the form before grouping) are folded into the groups before validation.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from ..workflow import MAX_TRIES
from .common import Countries, DiskGb, Excludes, GpuName, MinGpuRamGb, MinReliability, NumGpus, OfferQuery, TemplateHash


class RunOffer(BaseModel):
    """Which machines the run may rent (the cheapest match first)."""

    model_config = ConfigDict(extra="forbid")

    gpu_name: GpuName = None
    num_gpus: NumGpus = 1
    min_gpu_ram_gb: MinGpuRamGb = None
    min_reliability: MinReliability = 0.95
    countries: Countries = None
    query: OfferQuery = ""
    disk_gb: DiskGb = 32.0
    interruptible: Annotated[
        bool, Field(description="Bid instead (cheaper; stopped when outbid, then resumed on another machine).")
    ] = False


class RunOptions(BaseModel):
    """Knobs most runs leave alone."""

    model_config = ConfigDict(extra="forbid")

    template_hash: TemplateHash = None
    remote_dir: Annotated[
        str, Field(min_length=1, max_length=1000, description="Instance folder for uploads; the job runs in it.")
    ] = "~"
    exclude: Excludes = None
    local_results_dir: Annotated[
        str | None, Field(max_length=1000, description="Local folder for results; default vast-results/<run_id>.")
    ] = None
    keep_on_failure: Annotated[
        bool, Field(description="Keep the instance (still billing) for debugging if the job fails.")
    ] = False
    ready_timeout_s: Annotated[
        float,
        Field(ge=5, le=1800, description="Seconds a machine may boot without progress before failover."),
    ] = 300.0
    max_tries: Annotated[int, Field(ge=1, le=MAX_TRIES, description="Machines to try if one fails to start.")] = (
        MAX_TRIES
    )
    checkpoint_dir: Annotated[
        str | None,
        Field(
            max_length=1000,
            description="Job's checkpoint folder (relative to remote_dir), copied home while it runs; a lost machine "
            "is replaced and the job restarted with VAST_MCP_RESUME=1.",
        ),
    ] = None


OFFER_KEYS = frozenset(RunOffer.model_fields)
OPTION_KEYS = frozenset(RunOptions.model_fields)


def fold_flat_run_args(arguments: dict[str, Any]) -> dict[str, Any]:
    """`arguments` with top-level offer filters and options moved into `offer` and `options` (a grouped value
    given explicitly wins). Anything unexpected is left for validation to refuse with its own words."""
    flat_offer = {k: v for k, v in arguments.items() if k in OFFER_KEYS}
    flat_options = {k: v for k, v in arguments.items() if k in OPTION_KEYS}
    if not flat_offer and not flat_options:
        return arguments
    folded = {k: v for k, v in arguments.items() if k not in OFFER_KEYS and k not in OPTION_KEYS}
    for group, flat in (("offer", flat_offer), ("options", flat_options)):
        given = _as_object(arguments.get(group))
        if given is None:
            return arguments  # not an object: validation says so
        if flat or given:
            folded[group] = {**flat, **given}
    return folded


def _as_object(value: Any) -> dict[str, Any] | None:
    if value is None:
        return {}
    if isinstance(value, str):  # some clients send objects as JSON text; the SDK parses those too
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None
