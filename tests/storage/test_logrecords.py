"""storage.logrecords: the stream's message format, written by the sink
and read back by the loader both ways (records, and COPY rows)."""

from __future__ import annotations

import msgspec
import pytest

from gateway.model import Event, Rejection
from storage.logrecords import BadMessage, decode, decode_rows, encode


def _event(name: str, properties: dict[str, object]) -> Event:
    return Event(project="shop", source="cohorly", name=name, distinct_id="u", time=1, received_at=2,
                 insert_id="i-" + name, properties=properties, context={"ip": "10.0.0.1"})


def test_u0000_is_sent_as_ufffd_and_the_rest_as_it_was() -> None:
    events = [_event("a\x00", {"k": "x\x00y", "é": [1, 2.5, None]}), _event("b", {"n": {"deep": True}})]
    batch = decode(encode(events))
    assert [e.name for e in batch.events] == ["a\ufffd", "b"]
    assert batch.events[0].properties == {"k": "x\ufffdy", "é": [1, 2.5, None]}
    assert batch.events[1] == events[1]


def test_copy_rows_hold_what_the_records_hold() -> None:
    rejection = Rejection(project="shop", source="cohorly", reason="invalid", detail="d", excerpt="{}",
                          received_at=3)
    events = [_event("a\x00", {"k": "x\x00y"}), _event("b", {"n": {"deep": [1, "é"]}})]
    rows, rejections = decode_rows(encode([events[0], rejection, events[1]]))
    assert rejections == [rejection]
    assert [(r[2], msgspec.json.decode(r[10]), msgspec.json.decode(r[11])) for r in rows] == [
        ("a\ufffd", {"k": "x\ufffdy"}, {"ip": "10.0.0.1"}), ("b", {"n": {"deep": [1, "é"]}}, {"ip": "10.0.0.1"})]


def test_copy_rows_of_a_message_with_escapes_are_cleaned() -> None:
    # Not as the sink writes it (it sends U+0000 as U+FFFD): a message with
    # JSON escapes takes the careful path, each string checked.
    payload = (b'["e",[{"project":"shop","source":"s","name":"a\\u0000b","distinct_id":"u\\u0000",'
               b'"time":1,"received_at":2,"insert_id":"i\\u0000","properties":{"k":"x\\u0000y","e":"\\u00e9"},'
               b'"context":{}}]]')
    rows, _ = decode_rows(payload)
    assert (rows[0][2], rows[0][3], rows[0][8]) == ("a\ufffdb", "u\ufffd", "i\ufffd")
    assert msgspec.json.decode(rows[0][10]) == {"k": "x\ufffdy", "e": "\u00e9"}
    assert "\x00" not in rows[0][10]


@pytest.mark.parametrize("payload", [
    b"not json",
    b'["ee",[]]',  # the order names an event that is not there
    b'["e",[{"project":"p","source":"s","name":"n","distinct_id":null,"time":1,"received_at":2,"properties":[]}]]',
    b'["p",[],[{"project":"p"}]]',  # identity records are not the events lane's
])
def test_a_message_that_is_not_a_batch_of_events_is_refused(payload: bytes) -> None:
    with pytest.raises(BadMessage):
        decode_rows(payload)
