"""The result as an HL7 v2 ORU^R01, and the reading of the RIS's acknowledgement, with hl7apy.

The message is built element by element against hl7apy's tables of the configured version
(strict validation), never by joining strings: every value goes through hl7apy's ST escaping
(``|^~\\&`` become escape sequences). What it carries (docs/conformance.md, section 6):

- MSH: the configured applications and facilities, the message control ID of the delivery
  (MSH-10, kept on every retransmission), processing ID ``P``, the version.
- ORC / OBR: the accession number as placer and filler order number (ORC-2/3, OBR-2/3);
  OBR-4 the procedure (SNOMED CT 399208008 Plain chest X-ray, as the SR's Procedure
  Reported); OBR-25 result status ``F``, or ``C`` when the result supersedes an earlier one.
- NTE: "NOT FOR CLINICAL USE" while the model bundle is not validated.
- OBX, each with status (OBX-11) as OBR-25: the Study Instance UID (ST, DCM 110180), the
  probability (NM, with unit), the decision (CWE: the SR's Opacity = Present/Absent), the
  decision threshold (NM), the priority level (CWE, the SR's priority codes), the algorithm
  name and version (ST, DCM 111001 and 111003 as in the SR's TID 4019). A study the model
  could not score has no probability, decision or threshold, and the priority
  ``Not analysable``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message, Segment
from hl7apy.exceptions import HL7apyException
from hl7apy.factories import datatype_factory
from hl7apy.parser import parse_message
from pydicom.sr.coding import Code

from daemon.config import HL7DestinationConfig
from daemon.results.exceptions import AckUnreadable, MessageNotBuilt
from daemon.results.report import (
    ABSENT,
    NO_UNITS,
    OPACITY,
    PLAIN_CHEST_XRAY,
    PRESENT,
    PRIORITY,
    PROBABILITY,
    PROBABILITY_DIGITS,
    THRESHOLD,
    Priority,
)
from db.deliveries import ResultMessage
from model.manifest import NOT_FOR_CLINICAL_USE

STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
FINAL, CORRECTED = "F", "C"
"""Result status (HL7 table 0123 in OBR-25, table 0085 in OBX-11)."""


def _timestamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


@dataclass
class _Writer:
    """Sets hl7apy elements from plain values, each escaped as an ST of the message's version."""

    version: str

    def text(self, value: str) -> str:
        # hl7apy 1.3 leaves a backslash unescaped when the two characters before it look like
        # an escape sequence's start (a value ending "~E" + backslash + "F" was read back as "~E"
        # and a field separator). So each backslash is first written as the escape sequence E;
        # hl7apy then escapes the delimiters and keeps those sequences as they are.
        return str(datatype_factory("ST", value.replace("\\", "\\E\\"),
                                    version=self.version).to_er7())

    def coded(self, code: Code) -> str:
        """A CE/CWE value: identifier ^ text ^ coding system (SCT, DCM, UCUM, 99OPACITYD)."""
        return "^".join(self.text(part) for part in (code.value, code.meaning, code.scheme_designator))


def build_oru(result: ResultMessage, dest: HL7DestinationConfig, now: datetime) -> Message:
    """The ORU^R01 for ``result`` to ``dest``, validated against the version's structure.

    Raises :class:`MessageNotBuilt` when the study has no accession number (the RIS could not
    match the result to an order) or hl7apy refuses a value (the message names the element,
    never the value)."""
    if not (result.accession_number or "").strip():
        raise MessageNotBuilt("the study has no accession number")
    status = CORRECTED if result.correction else FINAL
    w = _Writer(dest.version)
    try:
        message = Message("ORU_R01", version=dest.version,
                          validation_level=VALIDATION_LEVEL.STRICT)
        _header(message.msh, w, dest, result.message_control_id, now)
        order = message.add_group("ORU_R01_PATIENT_RESULT").add_group("ORU_R01_ORDER_OBSERVATION")
        _order(order, w, result, status, now)
        for number, (value_type, concept, value, unit) in enumerate(_observations(result, w), 1):
            obx = order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
            obx.obx_1 = str(number)
            obx.obx_2 = value_type
            obx.obx_3 = w.coded(concept)
            obx.obx_4 = "1"  # one value per concept; v2.7 makes the sub-ID required
            obx.obx_5 = value
            if unit is not None:
                obx.obx_6 = w.coded(unit)
            obx.obx_11 = status
            obx.obx_14 = _timestamp(result.scored_at)
        message.validate()
    except HL7apyException as e:
        raise MessageNotBuilt(f"hl7apy refused the message ({type(e).__name__})") from e
    return message


def _header(msh: Segment, w: _Writer, dest: HL7DestinationConfig, control_id: str,
            now: datetime) -> None:
    msh.msh_3 = w.text(dest.sending_application)
    if dest.sending_facility:
        msh.msh_4 = w.text(dest.sending_facility)
    if dest.receiving_application:
        msh.msh_5 = w.text(dest.receiving_application)
    if dest.receiving_facility:
        msh.msh_6 = w.text(dest.receiving_facility)
    msh.msh_7 = _timestamp(now)
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = w.text(control_id)
    msh.msh_11 = "P"


def _order(order: Group, w: _Writer, result: ResultMessage, status: str, now: datetime) -> None:
    accession = w.text((result.accession_number or "").strip())
    orc = order.add_segment("ORC")
    orc.orc_1 = "RE"  # observations to follow
    orc.orc_2 = accession
    orc.orc_3 = accession
    obr = order.add_segment("OBR")
    obr.obr_1 = "1"
    obr.obr_2 = accession
    obr.obr_3 = accession
    obr.obr_4 = w.coded(PLAIN_CHEST_XRAY)
    obr.obr_7 = _timestamp(result.scored_at)
    obr.obr_22 = _timestamp(now)
    obr.obr_25 = status
    if not result.model_validated:
        nte = order.add_segment("NTE")
        nte.nte_1 = "1"
        nte.nte_3 = w.text(f"{NOT_FOR_CLINICAL_USE}: produced by a model bundle that has not "
                           "been validated for clinical use")


def _number(value: float) -> str:
    return f"{round(value, PROBABILITY_DIGITS):.{PROBABILITY_DIGITS}f}".rstrip("0").rstrip(".") or "0"


def _observations(result: ResultMessage, w: _Writer
                  ) -> list[tuple[str, Code, str, Code | None]]:
    """(value type, OBX-3 concept, OBX-5 value as ER7, OBX-6 unit) in message order."""
    rows: list[tuple[str, Code, str, Code | None]] = [
        ("ST", STUDY_INSTANCE_UID, w.text(result.study_uid), None)]
    if result.probability is not None:
        rows.append(("NM", PROBABILITY, _number(result.probability), NO_UNITS))
    if result.decision is not None:
        rows.append(("CWE", OPACITY, w.coded(PRESENT if result.decision else ABSENT), None))
    if result.probability is not None:
        rows.append(("NM", THRESHOLD, _number(result.threshold), NO_UNITS))
    rows.append(("CWE", PRIORITY, w.coded(Priority(result.priority).code), None))
    rows.append(("ST", ALGORITHM_NAME, w.text(result.model_name), None))
    rows.append(("ST", ALGORITHM_VERSION, w.text(result.model_version), None))
    return rows


def encode(message: Message) -> bytes:
    """The message as sent: ER7 with segments ended by CR, in UTF-8 (MSH-18 says so when a
    value is not ASCII; otherwise it is plain ASCII, HL7's default)."""
    text = str(message.to_er7())
    if not text.isascii():
        message.msh.msh_18 = "UNICODE UTF-8"
        text = str(message.to_er7())
    return (text + "\r").encode("utf-8")


@dataclass(frozen=True)
class Acknowledgement:
    """What the RIS answered: MSA-1 (AA, AE, AR, or the enhanced-mode CA, CE, CR), the
    control ID it acknowledges (MSA-2) and its error text (MSA-3 and each ERR's texts)."""

    code: str
    control_id: str
    text: str

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")

    @property
    def rejected(self) -> bool:
        """AR/CR: the message was refused (e.g. type or version); AE/CE is an error."""
        return self.code in ("AR", "CR")


_ESCAPES = {"\\F\\": "|", "\\S\\": "^", "\\T\\": "&", "\\R\\": "~", "\\E\\": "\\"}


def _unescape(value: str) -> str:
    """An error text as the RIS wrote it: the delimiter escapes back to their characters
    (hl7apy keeps parsed values escaped); other escapes (highlighting, hex) stay as they are."""
    for sequence, char in _ESCAPES.items():
        value = value.replace(sequence, char)
    return value


def parse_ack(body: bytes) -> Acknowledgement:
    """Read an acknowledgement message with hl7apy. Raises :class:`AckUnreadable` when it
    is not an HL7 message with an MSA segment (the message says what was missing)."""
    text = body.decode("utf-8", errors="replace").replace("\r\n", "\r").replace("\n", "\r")
    try:
        ack = parse_message(text.strip("\r"), find_groups=False,
                            validation_level=VALIDATION_LEVEL.TOLERANT)
        msa = ack.msa
        code = str(msa.msa_1.value or "").strip()
        control_id = str(msa.msa_2.value or "").strip()
        texts = [_unescape(str(msa.msa_3.value))] if msa.msa_3.value else []
        for err in ack.children.get("ERR") or []:
            texts.extend(_unescape(str(f.value)) for f in (err.err_8, err.err_7) if f.value)
    except HL7apyException as e:
        raise AckUnreadable(f"the acknowledgement is not a readable HL7 message "
                              f"({type(e).__name__})") from e
    if not code:
        raise AckUnreadable("the acknowledgement has no MSA-1 acknowledgement code")
    return Acknowledgement(code, control_id, "; ".join(t for t in texts if t))
