"""The whole loop towards a RIS: storescu -> opacityd serve (+ worker) -> ORU^R01 over MLLP to a
python-hl7 listener, with the SR going to no PACS at all. Checks the worker makes the HL7
delivery, the sender sends it, the study API lists it, and the daemon's logs hold neither the
accession number nor the message."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa

from daemon.config import load_config
from db.engine import create_db_engine, make_session_factory, unit_of_work
from db.models import Delivery
from db.states import DeliveryKind, DeliveryState
from tests.conftest import free_port, storescu, wait_until
from tests.daemon_process import DaemonProcess, start_daemon
from tests.mllp_listener import MLLPListener

FUJI = "fodicom_CR-MONO1-10-chest.dcm"
ACCESSION = "E2E-ACC-77"


@pytest.fixture
def listener() -> Iterator[MLLPListener]:
    ris = MLLPListener(free_port())
    yield ris
    ris.stop()


def test_a_scored_study_reaches_the_ris_as_one_oru_and_the_logs_stay_clean(
        tmp_path: Path, shared_dicom: Path, demo_bundle: Path, listener: MLLPListener,
        daemons: list[DaemonProcess]) -> None:
    extra = (f'[[hl7_destinations]]\nname = "ris"\nhost = "127.0.0.1"\nport = {listener.port}\n'
             'receiving_application = "RIS"\n'
             '[delivery]\npoll_interval_s = 0.2\n[worker]\npoll_interval_s = 0.2\n')
    daemon, cfg = start_daemon(tmp_path, daemons, extra, bundle=demo_bundle)
    pa = tmp_path / "in" / "pa.dcm"
    pa.parent.mkdir(parents=True)
    ds = pydicom.dcmread(shared_dicom / FUJI, force=True)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.AccessionNumber = ACCESSION
    ds.save_as(pa, enforce_file_format=True)
    study_uid = str(ds.StudyInstanceUID)
    _, acks = storescu(daemon.port, [pa])
    assert acks == {pa: "Success"}

    wait_until(lambda: bool(listener.received), timeout=120, what="the ORU^R01 at the RIS")
    config = load_config(cfg, env={})
    engine = create_db_engine(config.database_url)
    sessions = make_session_factory(engine)

    def delivered() -> bool:
        with unit_of_work(sessions) as s:
            return s.scalar(sa.select(Delivery.state)) == DeliveryState.DELIVERED

    wait_until(delivered, what="the HL7 delivery recorded as delivered")
    with unit_of_work(sessions) as s:
        (d,) = s.scalars(sa.select(Delivery)).all()
        assert (d.kind, d.destination) == (DeliveryKind.HL7, "ris")
        control_id = d.message_control_id
    engine.dispose()
    (message,) = listener.received
    assert listener.problems == [] and str(message["MSH.10"]) == control_id
    assert str(message["ORC.2"]) == ACCESSION and str(message["OBR.25"]) == "F"
    observations = listener.observations()
    assert observations["110180"] == ("ST", study_uid)
    assert observations["111001"] == ("ST", "opacity-xception-UNTRAINED-DEMO")

    url = f"http://127.0.0.1:{config.http.port}/api/v1/studies/{study_uid}"
    with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - loopback test URL
        history = json.load(answer)
    (entry,) = history["deliveries"]
    assert (entry["kind"], entry["state"], entry["message_control_id"]) == (
        "hl7", "delivered", control_id)
    assert daemon.terminate() == 0
    output = daemon.output()
    assert "hl7_delivered" in output and control_id and control_id in output
    assert ACCESSION not in output and "OBX|" not in output and "MSH|" not in output
