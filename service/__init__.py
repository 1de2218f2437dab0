"""courier: an asyncio orchestration daemon between new and legacy systems on AWS."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("courier")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+source"
