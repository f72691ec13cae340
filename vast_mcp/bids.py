"""Interruptible (bid) rentals: what to bid on an offer, and how that reads in the price question.

On Vast an interruptible instance runs at the price its renter bids, which must be at least the offer's `min_bid`;
it is stopped whenever someone bids more for the machine and starts again when its bid is the highest again. We bid
the offer's minimum plus a margin the user approves (`VAST_MCP_BID_MARGIN`, default 20%): a bid at the minimum is
outbid by the first competitor, and a higher margin buys fewer interruptions for more money. The bid is the whole
machine's $/hr (as the create request's `price`, the `vastai --bid_price` flag); the disk is billed on top, as on
demand.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ConfigError
from .vast.models import Offer

DEFAULT_BID_MARGIN = 0.20
MAX_BID_MARGIN = 10.0  # 1000%: beyond this a "bid" is no saving on any market Vast has had
_HOURS_PER_MONTH = 30 * 24  # Vast prices disk per GB per 30-day month


def bid_margin_from_env(environ: Mapping[str, str] | None = None) -> float:
    """`VAST_MCP_BID_MARGIN`: how far above an offer's minimum bid to bid, as a fraction (0.2) or percent (20%)."""
    env = os.environ if environ is None else environ
    raw = env.get("VAST_MCP_BID_MARGIN", "").strip()
    if not raw:
        return DEFAULT_BID_MARGIN
    text = raw.removesuffix("%")
    try:
        value = float(text) / (100.0 if raw.endswith("%") else 1.0)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= MAX_BID_MARGIN):
        raise ConfigError(
            f"VAST_MCP_BID_MARGIN={raw!r} is not valid: set it to a fraction such as 0.2 or a percentage such as "
            f"20% (0 to {MAX_BID_MARGIN * 100:g}%), or unset it for the default 20%, then restart the server."
        )
    return value


@dataclass(frozen=True)
class BidTerms:
    """One offer's bid: what we bid, what it is based on, and what the same machine costs on demand."""

    price: float  # $/hr bid for the machine (GPU part), sent as the create's `price`
    min_bid: float  # the offer's minimum bid, $/hr
    margin: float  # fraction above the minimum
    storage_dph: float  # the disk's $/hr, billed on top of the bid
    on_demand_dph: float  # the offer's on-demand $/hr, disk included

    @property
    def dph_total(self) -> float:
        """What the instance costs per hour while it runs: the bid plus the disk."""
        return round(self.price + self.storage_dph, 6)

    def words(self) -> str:
        """The sentence of the price question that says it is a bid, and what that means."""
        return (
            f"INTERRUPTIBLE: bid ${self.price:.4f}/hr (min bid ${self.min_bid:.4f}/hr + {self.margin * 100:g}%), "
            f"${self.dph_total:.3f}/hr with the disk; on-demand would be ${self.on_demand_dph:.3f}/hr. It may be "
            "stopped whenever someone outbids it."
        )


def storage_dph(offer: Offer, disk_gb: float) -> float:
    """The disk's $/hr for `disk_gb` on this offer (Vast's `storage_total_cost` when the search priced it)."""
    extra = offer.model_extra or {}
    total = extra.get("storage_total_cost")
    if isinstance(total, int | float) and math.isfinite(total) and total >= 0:
        return float(total)
    if offer.storage_cost is not None:
        return offer.storage_cost * disk_gb / _HOURS_PER_MONTH
    return 0.0


def bid_terms(offer: Offer, margin: float, disk_gb: float) -> BidTerms | None:
    """What to bid on `offer` (None when Vast gives it no minimum bid: it cannot be rented interruptible)."""
    extra = offer.model_extra or {}
    raw = extra.get("min_bid")
    if not isinstance(raw, int | float) or not math.isfinite(raw) or raw <= 0:
        return None
    min_bid = float(raw)
    disk = storage_dph(offer, disk_gb)
    base = offer.dph_base if offer.dph_base is not None else max(0.0, offer.dph_total - disk)
    # Rounded up (to $0.0001): a bid a hair under the minimum is refused.
    price = math.ceil(min_bid * (1.0 + margin) * 10000) / 10000
    return BidTerms(
        price=price,
        min_bid=min_bid,
        margin=margin,
        storage_dph=round(disk, 6),
        on_demand_dph=round(base + disk, 6),
    )
