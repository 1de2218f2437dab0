"""Typed keys of the application state: what ``create_app`` opens and handlers read."""

from __future__ import annotations

from aiohttp import web

from .aws import AwsClients
from .health import Readiness
from .secrets import SecretCache
from .settings import Settings

SETTINGS = web.AppKey("settings", Settings)
AWS = web.AppKey("aws", AwsClients)
SECRETS = web.AppKey("secrets", SecretCache)
READINESS = web.AppKey("readiness", Readiness)
