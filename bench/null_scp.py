"""A bare pynetdicom Storage SCP that acknowledges and discards: the library's floor.

    python -m bench.null_scp PORT

Used by bench.ingest as a reference: the rate pynetdicom itself reaches on
this machine with a handler that does nothing, with the same presentation
contexts and unlimited PDU size as opacityd.
"""

from __future__ import annotations

import sys

from pynetdicom import AE, evt
from pynetdicom.events import Event

from daemon.dicom.receiver import CHEST_STORAGE_CLASSES, TRANSFER_SYNTAXES


def _discard(_event: Event) -> int:
    return 0x0000


def main() -> None:
    ae = AE(ae_title="NULLSCP")
    ae.maximum_pdu_size = 0
    ae.maximum_associations = 16
    ae.add_supported_context("1.2.840.10008.1.1")
    for sop_class in CHEST_STORAGE_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, _discard)])


if __name__ == "__main__":
    main()
