"""Typed keys of the console's own application state, and of its requests."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from ..api.auth import Principal, TokenVerifier

if TYPE_CHECKING:  # the modules below import this one
    from .actions import Jobs
    from .auth import Sessions
    from .deadletters import DeadLetterReader
    from .queues import QueueStats
    from .sampler import CounterSampler
    from .secretinfo import SecretInfo

# The courier application whose state (AWS clients, poller, targets, caches) the pages read.
COURIER = web.AppKey("courier", web.Application)
VERIFIER = web.AppKey("console_verifier", TokenVerifier)
SAMPLER: web.AppKey[CounterSampler] = web.AppKey("console_sampler")
DEAD_LETTERS: web.AppKey[DeadLetterReader] = web.AppKey("console_dead_letters")
QUEUES: web.AppKey[QueueStats] = web.AppKey("console_queues")
SECRET_INFO: web.AppKey[SecretInfo] = web.AppKey("console_secret_info")
JOBS: web.AppKey[Jobs] = web.AppKey("console_jobs")
CSRF_KEY = web.AppKey("console_csrf_key", bytes)  # per process: forms die with a restart
# Signed-in sessions (id -> token): per process, so a restart signs everyone out.
SESSIONS: web.AppKey[Sessions] = web.AppKey("console_sessions")

# Who is signed in: set by the auth middleware on every page but the login page.
PRINCIPAL = web.RequestKey("console_principal", Principal)
# The session id of the request (its cookie's value).
SESSION = web.RequestKey("console_session", str)
# The CSRF token the page's forms carry.
CSRF = web.RequestKey("console_csrf", str)
