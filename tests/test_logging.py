"""Logging: context bound per event, PHI keys redacted, JSON when not on a terminal."""

from __future__ import annotations

import io
import json

import structlog
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation
from structlog.testing import capture_logs

from daemon.logs import REDACTED, configure_logging
from tests.conftest import Harness
from tests.factories import make_dx


def test_store_event_carries_association_and_study_context(harness: Harness) -> None:
    ds = make_dx()
    ae = AE(ae_title="CTXTEST")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        assoc = ae.associate("127.0.0.1", harness.port, ae_title="OPACITYD")
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
    (stored,) = [e for e in logs if e["event"] == "instance_stored"]
    assert stored["study_uid"] == ds.StudyInstanceUID
    assert stored["calling_ae"] == "CTXTEST"
    assert len(stored["assoc_id"]) == 12
    assert stored["sop_instance_uid"] == ds.SOPInstanceUID


def test_json_output_off_a_terminal_and_phi_keys_redacted() -> None:
    stream = io.StringIO()
    configure_logging("info", "auto", stream)
    try:
        structlog.get_logger().info("probe", patient_name="X^Y", AccessionNumber="A1", study_uid="1.2")
    finally:
        structlog.reset_defaults()
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["event"] == "probe" and line["study_uid"] == "1.2"
    assert line["patient_name"] == REDACTED and line["AccessionNumber"] == REDACTED
