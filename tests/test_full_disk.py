"""A full spool file system answers 0xA700 with nothing half-written; the association goes on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from daemon.spool import MARKER
from db.models import Instance
from tests.conftest import mounted_tmpfs, running_receiver
from tests.factories import make_dx


def _associate(port: int) -> Association:
    """One association from a modality, on which each C-STORE gets its own answer."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", port, ae_title="OPACITYD")
    assert assoc.is_established
    return assoc


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "state" / "spool", "4m") as mount:
        yield mount


def test_full_disk_answers_0xA700_leaves_nothing_and_recovers(tmp_path: Path,
                                                              small_tmpfs: Path) -> None:
    with running_receiver(tmp_path) as h:
        assert h.spool.root == small_tmpfs
        assoc = _associate(h.port)
        try:
            too_big = assoc.send_c_store(make_dx(2500, 2048))
            fits = assoc.send_c_store(make_dx(256, 256))
        finally:
            assoc.release()
        assert too_big.Status == 0xA700 and too_big.ErrorComment == "out of disk space"
        assert fits.Status == 0x0000
        rows = h.query(lambda s: list(s.scalars(sa.select(Instance))))
        assert len(rows) == 1
        files = [p for p in small_tmpfs.rglob("*") if p.is_file() and p.name != MARKER]
        assert [p.name for p in files] == [f"{rows[0].sop_instance_uid}.dcm"]


def test_an_incoming_file_that_cannot_be_created_is_answered_0xA700_and_the_association_goes_on(
        tmp_path: Path) -> None:
    with running_receiver(tmp_path) as h:
        folder = h.receiver.incoming.folder
        folder.rmdir()
        folder.write_bytes(b"")  # a file where the receiver's incoming folder was: open() fails
        assoc = _associate(h.port)
        try:
            refused = assoc.send_c_store(make_dx(256, 256))
            folder.unlink()
            folder.mkdir()
            stored = assoc.send_c_store(make_dx(256, 256))
        finally:
            assoc.release()
        assert refused.Status == 0xA700
        assert refused.ErrorComment.startswith("cannot write spool file")
        assert stored.Status == 0x0000
        assert len(h.query(lambda s: list(s.scalars(sa.select(Instance))))) == 1
