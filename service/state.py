"""Typed keys of the application state: what ``create_app`` opens and handlers read."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from .api.auth import TokenVerifier
from .aws import AwsClients
from .dynamo import DynamoDB
from .envelope import EnvelopeCipher
from .health import Readiness
from .idm import IdmClient
from .queue import Producer
from .secrets.cache import SecretCache
from .settings import Settings
from .sqs import LeanSqs
from .status import StatusStore
from .worker.poller import Poller
from .worker.targets import TargetClient

SETTINGS = web.AppKey("settings", Settings)
READINESS = web.AppKey("readiness", Readiness)
AWS = web.AppKey("aws", AwsClients)
HOT_DYNAMODB = web.AppKey("hot_dynamodb", DynamoDB)  # the status table's calls
HOT_SQS = web.AppKey("hot_sqs", LeanSqs)  # the worker's receives and acks, the API's sends
HTTP = web.AppKey("http", aiohttp.ClientSession)
SECRETS = web.AppKey("secrets", SecretCache)
STATUS = web.AppKey("status", StatusStore)
ENVELOPE = web.AppKey("envelope", EnvelopeCipher)
PRODUCER = web.AppKey("producer", Producer)
VERIFIER = web.AppKey("verifier", TokenVerifier)
IDM = web.AppKey("idm", IdmClient)
POLLER = web.AppKey("poller", Poller)
# The worker's legacy clients (their limiter and breaker): what the console's Targets page reads.
TARGETS: web.AppKey[tuple[TargetClient, ...]] = web.AppKey("targets")
