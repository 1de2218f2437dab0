"""aiohttp stand-ins for the customer's systems (IdM, legacy targets) for tests and ``courier local``."""

from .base import Behaviour, StubServer
from .idm import IdmStub
from .legacy import LegacyStub

__all__ = ["Behaviour", "IdmStub", "LegacyStub", "StubServer"]
