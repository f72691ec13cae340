"""Interruptible rentals: the bid made on an offer, the setting that sets its margin, and the price question."""

from __future__ import annotations

import pytest

from vast_mcp.bids import DEFAULT_BID_MARGIN, bid_margin_from_env, bid_terms
from vast_mcp.checkpoints import check_folder, checkpoint_every_from_env, script_lines
from vast_mcp.consent import QuoteBook
from vast_mcp.errors import ConfigError, VastMCPError
from vast_mcp.vast.models import Offer


def offer(**changes: object) -> Offer:
    fields: dict[str, object] = {
        "id": 77,
        "num_gpus": 1,
        "gpu_name": "RTX 4090",
        "gpu_ram": 24000.0,
        "dph_base": 0.40,
        "dph_total": 0.21,  # a bid search prices from the minimum bid: 0.20 + 0.01 of disk
        "min_bid": 0.20,
        "storage_total_cost": 0.01,
    }
    fields.update(changes)
    return Offer.model_validate(fields)


def test_the_bid_is_the_minimum_plus_the_margin_and_the_disk_is_billed_on_top() -> None:
    terms = bid_terms(offer(), 0.25, disk_gb=20)
    assert terms is not None
    assert terms.price == pytest.approx(0.25)
    assert terms.dph_total == pytest.approx(0.26)
    assert terms.on_demand_dph == pytest.approx(0.41)


def test_a_bid_never_lands_a_hair_under_the_minimum() -> None:
    terms = bid_terms(offer(min_bid=0.123456), 0.0, disk_gb=20)
    assert terms is not None and terms.price >= 0.123456


def test_an_offer_without_a_minimum_bid_takes_no_bid() -> None:
    assert bid_terms(offer(min_bid=None), 0.2, disk_gb=20) is None


def test_without_storage_total_the_disk_is_priced_from_its_monthly_rate() -> None:
    terms = bid_terms(offer(storage_total_cost=None, storage_cost=0.144), 0.2, disk_gb=100)
    assert terms is not None and terms.storage_dph == pytest.approx(0.02)


@pytest.mark.parametrize(("raw", "margin"), [("", DEFAULT_BID_MARGIN), ("0.5", 0.5), ("35%", 0.35), ("0", 0.0)])
def test_margin_setting(raw: str, margin: float) -> None:
    assert bid_margin_from_env({"VAST_MCP_BID_MARGIN": raw}) == pytest.approx(margin)


@pytest.mark.parametrize("raw", ["-0.1", "lots", "nan", "5000%"])
def test_a_bad_margin_setting_says_what_to_set(raw: str) -> None:
    with pytest.raises(ConfigError, match="VAST_MCP_BID_MARGIN"):
        bid_margin_from_env({"VAST_MCP_BID_MARGIN": raw})


def test_the_quote_of_a_bid_is_priced_at_the_bid_and_says_so() -> None:
    terms = bid_terms(offer(), 0.2, disk_gb=20)
    quote = QuoteBook().issue(offer(), disk_gb=20, max_runtime_h=2, params={"image": "x", "price": 0.24}, bid=terms)
    assert quote.dph == pytest.approx(0.25)
    text = quote.describe()
    assert "bid $0.2400/hr (min bid $0.2000/hr + 20%)" in text
    assert "on-demand would be $0.410/hr" in text and "outbid" in text


def test_an_on_demand_quote_says_nothing_of_bids() -> None:
    quote = QuoteBook().issue(offer(dph_total=0.41), disk_gb=20, max_runtime_h=2, params={"image": "x"})
    assert quote.dph == pytest.approx(0.41) and "bid" not in quote.describe()


@pytest.mark.parametrize("folder", ["", "~", ".", "/", "~/", "a/..", "a\nb"])
def test_a_checkpoint_folder_must_be_a_folder_of_its_own(folder: str) -> None:
    with pytest.raises(VastMCPError, match="checkpoint_dir"):
        check_folder(folder)


def test_the_job_is_told_where_its_checkpoints_are_and_whether_it_resumes() -> None:
    first, again = script_lines("~/run 1/ckpt", resume=False), script_lines("~/run 1/ckpt", resume=True)
    assert first[0] == again[0] and "VAST_MCP_CHECKPOINT_DIR=" in first[0] and "'run 1/ckpt'" in first[0]
    assert first[1] == "export VAST_MCP_RESUME=0" and again[1] == "export VAST_MCP_RESUME=1"


def test_checkpoint_interval_setting() -> None:
    assert checkpoint_every_from_env({}) == 60.0
    assert checkpoint_every_from_env({"VAST_MCP_CHECKPOINT_EVERY_S": "5"}) == 5.0
    with pytest.raises(ConfigError, match="VAST_MCP_CHECKPOINT_EVERY_S"):
        checkpoint_every_from_env({"VAST_MCP_CHECKPOINT_EVERY_S": "0"})
