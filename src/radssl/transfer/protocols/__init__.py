"""Transfer protocols as plugins (linear probe, kNN, fine-tuning, zero-shot, segmentation): one module each.

Adding a protocol = one module with a :class:`~radssl.transfer.protocols.base.Protocol` subclass + one line in
:data:`~radssl.transfer.protocols.base.PROTOCOLS` (or :func:`register_protocol`). See ``base.py`` for the interface.
The package exports exactly ``base.__all__`` (listed once, there).
"""

from radssl.transfer.protocols import base
from radssl.transfer.protocols.base import *  # noqa: F403 - the interface, as base.__all__ names it

__all__ = list(base.__all__)
