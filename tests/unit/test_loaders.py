"""Loaders map each public format to canonical events and count, never crash on, bad rows."""

from __future__ import annotations

import io
import json

import pytest

from models.events import event_to_dict
from models.loaders import load_events, parse_events
from models.synthetic import funnel_events

TAOBAO = """\
1,100,7,pv,1511550516
1,101,7,fav,1511550600
1,102,8,cart,1511550700
1,102,8,buy,1511550800
2,200,9,pv,not-a-number
2,200,9,click,1511550900
2,200,9,pv
2,200,9,pv,12
,200,9,pv,1511550900
2,201,9,pv,1511551000
"""


def test_taobao_maps_types_and_counts_malformed_rows() -> None:
    result = parse_events(io.StringIO(TAOBAO), "taobao")
    assert [e.type for e in result.events] == ["view", "favorite", "cart", "purchase", "view"]
    first = result.events[0]
    assert (first.user_id, first.item_id, first.category_id, first.timestamp_ms, first.price) == (
        "1", "100", "7", 1511550516000, None)
    assert [e.event_id for e in result.events] == ["taobao:1", "taobao:2", "taobao:3", "taobao:4", "taobao:10"]
    assert result.malformed == {"unparsable": 1, "unknown_type": 1, "bad_row": 1, "bad_timestamp": 1,
                                "missing_field": 1}
    assert result.malformed_total == 5


RETAILROCKET = """\
timestamp,visitorid,event,itemid,transactionid
1433221332117,257597,view,355908,
1433224214164,992329,addtocart,248676,
1433224214999,992329,transaction,248676,4000
1433224215000,992329,remove,248676,
oops,992329,view,248676,
1433224216000,,view,248676,
"""


def test_retailrocket_maps_types_and_uses_item_as_category() -> None:
    result = parse_events(io.StringIO(RETAILROCKET), "retailrocket")
    assert [e.type for e in result.events] == ["view", "cart", "purchase"]
    assert result.events[1].category_id == result.events[1].item_id == "248676"
    assert result.events[0].event_id == "retailrocket:2"
    assert result.events[0].timestamp_ms == 1433221332117
    assert result.malformed_total == 3


REES46 = """\
event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session
2019-10-01 00:00:00 UTC,view,44600062,2103807459595387724,,shiseido,35.79,541312140,72d76fde
2019-10-01 00:00:05 UTC,cart,44600062,2103807459595387724,,shiseido,35.79,541312140,72d76fde
2019-10-01 00:00:09 UTC,remove_from_cart,44600062,2103807459595387724,,shiseido,35.79,541312140,72d76fde
2019-10-01 00:01:00 UTC,purchase,44600062,2103807459595387724,,shiseido,,541312140,72d76fde
2019-13-01 00:01:00 UTC,view,44600062,2103807459595387724,,shiseido,1.0,541312140,72d76fde
2019-10-01 00:01:00 UTC,view,44600062,2103807459595387724,,shiseido,-3,541312140,72d76fde
"""


def test_rees46_skips_remove_from_cart_separately_from_malformed() -> None:
    result = parse_events(io.StringIO(REES46), "rees46")
    assert [e.type for e in result.events] == ["view", "cart", "purchase"]
    assert result.events[0].price == pytest.approx(35.79)
    assert result.events[2].price is None
    assert result.events[0].session_id == "72d76fde"
    assert result.events[0].timestamp_ms == 1569888000000
    assert result.skipped == {"remove_from_cart": 1}
    assert result.malformed == {"unparsable": 1, "bad_price": 1}


def test_jsonl_uses_the_event_contract() -> None:
    events = funnel_events(n_users=2, events_per_user=(2, 3))
    lines = [json.dumps(event_to_dict(e)) for e in events]
    lines += ["{not json", json.dumps({"type": "view"}), "[]", json.dumps({**event_to_dict(events[0]), "type": "zap"})]
    result = parse_events(io.StringIO("\n".join(lines) + "\n\n"), "jsonl")
    assert result.events == events
    assert result.malformed == {"unparsable": 1, "missing_field": 1, "wrong_type": 1, "unknown_type": 1}


def test_load_events_reads_a_file_and_rejects_unknown_formats(tmp_path) -> None:
    path = tmp_path / "ub.csv"
    path.write_text(TAOBAO)
    assert len(load_events(path, "taobao").events) == 5
    with pytest.raises(ValueError, match="unknown format"):
        load_events(path, "parquet")
