"""Logging: context bound per event, PHI keys redacted, JSON when not on a terminal."""

from __future__ import annotations

import io
import json
import logging
import warnings

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


def test_library_lines_lose_quoted_values_and_protocol_tracebacks() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    try:
        logging.getLogger("pydicom").warning("Invalid value for VR DA: '1970-01-31'.")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("Invalid value for VR PN: 'SECRET^NAME'", UserWarning, stacklevel=1)
        value = "SECRET"
        try:
            raise ValueError(f"'{value}' cannot be decoded")
        except ValueError as e:
            logging.getLogger("pynetdicom.dul").error("Unable to decode the received PDU data")
            logging.getLogger("pynetdicom.dul").exception(e)
            structlog.get_logger("opacityd.test").error("failed", exc_info=e)
    finally:
        structlog.reset_defaults()
        logging.captureWarnings(False)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    text = stream.getvalue()
    assert "1970-01-31" not in text and "SECRET" not in text
    assert [line["level"] for line in lines if line.get("logger") == "pynetdicom.dul"] == [
        "warning", "warning"]
    assert all("exception" not in line for line in lines if line.get("logger") == "pynetdicom.dul")
    (own,) = [line for line in lines if line["event"] == "failed"]
    assert "ValueError" in own["exception"] and "Traceback" in own["exception"]
