"""Transfer protocols as plugins (linear probe, kNN, fine-tuning, zero-shot, segmentation): one module each.

Adding a protocol = one module with a :class:`~radssl.transfer.protocols.base.Protocol` subclass + one line in
:data:`~radssl.transfer.protocols.base.PROTOCOLS` (or :func:`register_protocol`). See ``base.py`` for the interface.
"""

from radssl.transfer.protocols.base import (
    PROTOCOLS,
    CaseOutputs,
    EncoderInfo,
    Protocol,
    ProtocolContext,
    ProtocolOutcome,
    ProtocolParams,
    StudySetup,
    build_protocol,
    protocol_class,
    protocol_names,
    register_protocol,
    validate_protocols,
)

__all__ = [
    "PROTOCOLS",
    "CaseOutputs",
    "EncoderInfo",
    "Protocol",
    "ProtocolContext",
    "ProtocolOutcome",
    "ProtocolParams",
    "StudySetup",
    "build_protocol",
    "protocol_class",
    "protocol_names",
    "register_protocol",
    "validate_protocols",
]
