"""Parts of the transport guard: the P-DATA meter follows PDV items however TCP splits the
bytes; refusal logs are summarised."""

from __future__ import annotations

import struct

import pytest

from daemon.dicom.transport import Abort, _PdvMeter, _Throttle


def _pdv(control: int, size: int) -> bytes:
    return struct.pack(">LBB", size + 2, 1, control) + bytes(size)


@pytest.mark.parametrize("split", [1, 5, 6, 7, 4096])
def test_data_sets_are_counted_per_message_across_any_split(split: int) -> None:
    meter = _PdvMeter(max_command=100, max_dataset=1000)
    # Two whole messages of 600 data bytes each: each within the bound.
    stream = (_pdv(0x03, 50) + _pdv(0x00, 300) + _pdv(0x02, 300)) * 2
    results = [meter.feed(stream[i:i + split]) for i in range(0, len(stream), split)]
    assert results == [None] * len(results)


@pytest.mark.parametrize("split", [1, 6, 4096])
def test_a_data_set_over_its_bound_is_reported_at_the_header_that_crosses_it(split: int) -> None:
    meter = _PdvMeter(max_command=100, max_dataset=1000)
    stream = _pdv(0x03, 50) + _pdv(0x00, 600) + _pdv(0x00, 600)
    results = {meter.feed(stream[i:i + split]) for i in range(0, len(stream), split)}
    assert Abort.DATASET_TOO_LARGE in results


def test_command_fragments_without_their_last_bit_are_bounded() -> None:
    meter = _PdvMeter(max_command=100, max_dataset=10**9)
    assert meter.feed(_pdv(0x01, 60)) is None
    assert meter.feed(_pdv(0x01, 60)) is Abort.COMMAND_TOO_LARGE


def test_refusal_logs_are_summarised_per_address_and_per_reason() -> None:
    throttle = _Throttle(interval_s=60.0, per_reason=3)
    assert throttle.allow(("oversized_pdu", "10.0.0.1")) == 0
    assert throttle.allow(("oversized_pdu", "10.0.0.1")) is None
    assert [throttle.allow(("oversized_pdu", f"10.0.1.{i}")) for i in range(4)] == [0, 0, None, None]
    assert throttle.allow(("per_address_limit", "10.0.0.1")) == 0
