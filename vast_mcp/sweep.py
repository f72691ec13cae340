"""`run_job(sweep=[...])`: many independent runs at once (a sweep, evaluations over checkpoints), one approval.

Each entry becomes one run of the same command on its own machine, with `$SWEEP_ARG` set to the entry; the runs
go on side by side in the server, each with its own run_id, log, failover and receipt (the ordinary run engine).
The user approves the sweep as a whole: K runs × at most $X/hr × the max runtime; the caps are checked for the
whole sweep before anyone is asked (K more instances, K × the ceiling × the runtime).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .errors import OfferUnavailableError, VastMCPError
from .multinode import check_group_caps

if TYPE_CHECKING:
    from .approval import Grant
    from .service import Service
    from .workflow import Run, RunBook, RunPlan, RunSpec

MAX_SWEEP = 64
SWEEP_VAR = "SWEEP_ARG"
SPARE_OFFERS = 8  # searched beyond one per run, for offers that go while the sweep is quoted


async def plan_sweep(service: Service, spec: RunSpec) -> RunPlan:
    """Quote the cheapest machine; the ceiling covers the K cheapest matches (or the budget); caps for all K."""
    from .workflow import RunPlan

    for path in spec.uploads:
        service.local_path(path, must_exist=True)
    count = len(spec.sweep)
    found = await service.search(
        query=spec.query,
        filters=spec.filters,
        disk_gb=spec.disk_gb,
        order="dph",
        limit=count + SPARE_OFFERS,
        prefer_direct=False,
    )
    if len(found.offers) < count:
        raise VastMCPError(
            f"Only {len(found.offers)} offer(s) match, and a sweep of {count} runs needs one machine each at once. "
            "Loosen the GPU requirements, raise max_dph, or split the sweep."
        )
    quote = await service.quote(spec.request(found.offers[0].offer_id))
    if spec.budget_dph is not None:
        ceiling, why = spec.budget_dph, "the budget given, per machine"
    else:
        ceiling = max(o.dph for o in found.offers[:count])
        why = f"the dearest of the {count} cheapest matching offers"
    ceiling = max(ceiling, quote.dph)
    await check_group_caps(service, spec, ceiling, count)
    return RunPlan(spec, quote, ceiling, why)


def sweep_question(plan: RunPlan, cap_words: str = "") -> str:
    spec, q = plan.spec, plan.quote
    k = len(spec.sweep)
    command = spec.command if len(spec.command) <= 200 else spec.command[:200] + "…"
    total = k * plan.ceiling_dph * spec.max_runtime_h
    return (
        f"Run a sweep: {k} runs of `{command}`, each on its own machine at once, with ${SWEEP_VAR} set to one "
        f"entry each ({', '.join(spec.sweep[:3])}{', …' if k > 3 else ''}). {k} runs × at most "
        f"${plan.ceiling_dph:.3f}/hr ({plan.ceiling_why}; the cheapest match is {q.gpu} at ${q.dph:.3f}/hr) × "
        f"{spec.max_runtime_h:g} h = at most ${total:,.2f} in all, image {spec.image or spec.template_hash}. Each "
        f"machine is destroyed when its run ends; one that fails to start may be replaced within the same "
        f"price.{cap_words}"
    )


async def start_sweep(book: RunBook, spec: RunSpec, grant: Grant) -> list[Run]:
    """One run per entry, each with a machine of its own granted within the sweep's approval."""
    service = book.service
    count = len(spec.sweep)
    found = await service.search(
        query=spec.query,
        filters=spec.filters.model_copy(update={"max_dph": grant.ceiling_dph}),
        disk_gb=spec.disk_gb,
        order="dph",
        limit=count + SPARE_OFFERS,
        prefer_direct=False,
    )
    grants: list[Grant] = [grant]
    for row in found.offers:
        if len(grants) == count:
            break
        if row.offer_id == grant.quote.offer_id:
            continue
        try:
            quote = await service.quote(spec.request(row.offer_id))
        except OfferUnavailableError:
            continue
        more = service.approvals.failover(grant, quote)
        if more is not None:
            grants.append(more)
    if len(grants) < count:
        raise VastMCPError(
            f"Only {len(grants)} machine(s) are left within the approved ${grant.ceiling_dph:.3f}/hr for a sweep of "
            f"{count}; nothing was rented. Call run_job again with a higher max_dph or a smaller sweep."
        )
    runs = []
    for number, (arg, own) in enumerate(zip(spec.sweep, grants, strict=True)):
        results_dir = None if spec.results_dir is None else f"{spec.results_dir.rstrip('/')}/{number}"
        one = dataclasses.replace(
            spec, sweep=(), env={**spec.env, SWEEP_VAR: arg}, results_dir=results_dir, max_tries=spec.max_tries
        )
        runs.append(book.start(one, own))
    return runs
