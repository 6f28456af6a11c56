"""A RIS for tests: a real MLLP listener on loopback, built on python-hl7 (``hl7.mllp``), not on
hl7apy that builds the messages, so the two read the standard independently.

It parses every message with ``hl7.parse``, checks the segments an ORU^R01 result must have,
and answers AA, AE (with a text) or nothing, as the test chooses; ``hold`` keeps the answer
back until the test sets it (a slow RIS).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import hl7
from hl7.mllp import HL7StreamReader, HL7StreamWriter, start_hl7_server

REQUIRED_SEGMENTS = ("MSH", "ORC", "OBR", "OBX")


@dataclass
class MLLPListener:
    port: int
    answer: str | None = "AA"
    """MSA-1 of the acknowledgement; None: read the message and answer nothing."""
    error_text: str = ""
    """MSA-3 of an AE or AR."""
    hold: threading.Event | None = None
    """Set: each acknowledgement waits for this event (a slow RIS)."""
    received: list[hl7.Message] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """What a message lacked of a result (checked on each one received)."""

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._run, name="mllp-listener", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._server is None:
            raise RuntimeError(f"the MLLP listener did not start on port {self.port}")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._server = await start_hl7_server(self._client, "127.0.0.1", self.port,
                                              encoding="utf-8", reuse_address=True)

    async def _client(self, reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        try:
            while not reader.at_eof():
                message = await reader.readmessage()
                self._check(message)
                self.raw.append(str(message))
                self.received.append(message)
                if self.hold is not None:
                    await asyncio.get_running_loop().run_in_executor(None, self.hold.wait, 30)
                if self.answer is None:
                    continue
                ack = message.create_ack(self.answer)
                if self.error_text:
                    ack.segment("MSA").assign_field(self.error_text, 3)
                writer.writemessage(ack)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the sender hung up (after its ACK, or when it gave up waiting)
        finally:
            writer.close()

    def _check(self, message: hl7.Message) -> None:
        present = {str(segment[0]) for segment in message}
        for name in REQUIRED_SEGMENTS:
            if name not in present:
                self.problems.append(f"no {name} segment")
        if str(message["MSH.9.1.1"]) != "ORU" or str(message["MSH.9.1.2"]) != "R01":
            self.problems.append(f"MSH-9 is {message['MSH.9']}, not ORU^R01")
        if not str(message["MSH.10"]):
            self.problems.append("no message control ID (MSH-10)")
        for where in ("ORC.2", "ORC.3", "OBR.2", "OBR.3"):
            if not str(message[where]):
                self.problems.append(f"{where} (the accession number) is empty")
        if str(message["OBR.25"]) not in ("F", "C"):
            self.problems.append(f"OBR-25 is {message['OBR.25']!r}, not F or C")
        for obx in message.segments("OBX"):
            if str(obx[11]) != str(message["OBR.25"]):
                self.problems.append(f"OBX-11 {obx[11]} differs from OBR-25")

    def control_ids(self) -> list[str]:
        return [str(m["MSH.10"]) for m in self.received]

    def observations(self, index: int = -1) -> dict[str, tuple[str, str]]:
        """OBX-3 identifier -> (value type, value as sent) of one received message."""
        return {str(obx[3][0][0]): (str(obx[2]), str(obx[5])) for obx in
                self.received[index].segments("OBX")}

    def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()

        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
