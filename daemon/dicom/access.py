"""Association access control: which calling AE titles may connect from where.

Decisions map to A-ASSOCIATE-RJ parameters (PS3.8 Table 9-21): result 1
(rejected-permanent), source 1 (DICOM UL service-user), and reason 3
(calling AE title not recognized), 7 (called AE title not recognized) or
1 (no reason given: the address is not allowed for that AE).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from daemon.config import PeerConfig


class RejectReason(enum.Enum):
    CALLING_AE_NOT_RECOGNIZED = ("calling_ae_not_recognized", 0x03)
    CALLED_AE_NOT_RECOGNIZED = ("called_ae_not_recognized", 0x07)
    ADDRESS_NOT_ALLOWED = ("address_not_allowed", 0x01)

    @property
    def label(self) -> str:
        return self.value[0]

    @property
    def diagnostic(self) -> int:
        return self.value[1]


REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01


@dataclass(frozen=True)
class _Rule:
    ae_title: str
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


class AccessPolicy:
    def __init__(self, our_ae_title: str, peers: tuple[PeerConfig, ...]) -> None:
        self.our_ae_title = our_ae_title.strip()
        self.rules = tuple(
            _Rule(p.ae_title.strip(),
                  tuple(ipaddress.ip_network(a, strict=False) for a in p.addresses))
            for p in peers
        )

    def decide(self, calling_ae: str, called_ae: str, address: str) -> RejectReason | None:
        """Return why the association must be rejected, or None to accept it."""
        if called_ae.strip() != self.our_ae_title:
            return RejectReason.CALLED_AE_NOT_RECOGNIZED
        calling = calling_ae.strip()
        matching = [r for r in self.rules if r.ae_title in ("*", calling)]
        if not matching:
            return RejectReason.CALLING_AE_NOT_RECOGNIZED
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return RejectReason.ADDRESS_NOT_ALLOWED
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for rule in matching:
            if not rule.networks or any(ip.version == n.version and ip in n for n in rule.networks):
                return None
        return RejectReason.ADDRESS_NOT_ALLOWED
