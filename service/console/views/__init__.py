"""One module per console page: its handlers and its routes (``setup``)."""

from . import dead_letters, overview, requests, secrets, targets

PAGES = (overview, targets, dead_letters, requests, secrets)

__all__ = ["PAGES"]
