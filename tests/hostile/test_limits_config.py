"""The transport bounds are validated at start like every other key."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.dicom.transport import Limits
from daemon.exceptions import ConfigError


@pytest.mark.parametrize(("toml", "message"), [
    ("max_pdu_size = 0", "receiver.max_pdu_size = 0: expected an integer from 4096 to 16777216"),
    ("max_association_request_size = 100", "receiver.max_association_request_size = 100"),
    ("association_request_timeout_s = 0", "receiver.association_request_timeout_s = 0.0"),
    ("pdu_read_timeout_s = -1", "receiver.pdu_read_timeout_s = -1.0"),
    ("max_pending_connections = 0", "receiver.max_pending_connections = 0: expected an integer >= 1"),
    ("max_connections_per_address = 0", "receiver.max_connections_per_address = 0"),
    ("max_dataset_size_mb = 0", "receiver.max_dataset_size_mb = 0"),
])
def test_bad_transport_bounds_stop_start_up_naming_the_key(tmp_path: Path, toml: str,
                                                           message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[receiver]\n{toml}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert message in str(info.value)


def test_the_defaults_bound_every_pdu_and_data_set() -> None:
    limits = Limits.from_config(load_config(None, env={}).receiver)
    assert limits.max_pdu == 262_144
    assert limits.max_request == 65_536
    assert limits.max_dataset == 512 * 2**20
    assert 0 < limits.request_timeout_s <= limits.pdu_read_timeout_s
