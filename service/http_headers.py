"""Values of HTTP headers that say when: delay-seconds and HTTP-dates (RFC 9110).

Read by the JWKS cache (``Cache-Control: max-age``, ``Age``, ``Expires``, ``Date``) and by the
legacy clients (``Retry-After``).
"""

from __future__ import annotations

import datetime
import email.utils


def delta_seconds(value: str | None) -> float | None:
    """A delay-seconds value (ASCII digits only); None when ``value`` is not one."""
    if value is None:
        return None
    value = value.strip()
    # str.isdigit() also accepts "²" and other digits float() refuses.
    return float(value) if value.isascii() and value.isdigit() else None


def http_date(value: str) -> float | None:
    """The Unix time of an HTTP-date; None when ``value`` is not one.

    A date parsed without a zone (the obsolete asctime form) is GMT, as every HTTP-date is.
    """
    try:
        parsed = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()
