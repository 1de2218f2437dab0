"""courier behind an egress proxy and a private CA, as botocore is: every AWS call, hot or cold.

An instance in a private subnet often reaches AWS through ``HTTPS_PROXY`` (``NO_PROXY`` for
what is local), and a TLS-inspecting proxy or a company CA needs ``AWS_CA_BUNDLE``. botocore
honours both; courier's own SQS and DynamoDB clients must too (``service/egress.py``), or the
hot path times out while the cold one works.

The stand-ins are real: tinyproxy (Debian's) with Basic authentication, and a TLS endpoint with
a certificate from a CA made for the test (``courier_testkit.tls``) in front of moto. The TLS
front counts the connections it accepts and tinyproxy logs each CONNECT, so "every connection
came through the proxy" is a count that any client going direct would break.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from aiobotocore.session import get_session
from botocore.exceptions import HTTPClientError, SSLError
from yarl import URL

from courier_testkit.tcpproxy import TcpProxy, tcp_proxy
from courier_testkit.tinyproxy import PASSWORD, TinyProxy, tinyproxy, tinyproxy_binary
from courier_testkit.tls import LocalTls, local_tls
from service import daemon
from service.aws import AwsClients, open_client
from service.bootstrap import Resources
from service.egress import Route, route
from service.errors import SettingsError
from service.settings import AwsSettings, Settings
from service.sqs import open_lean_sqs
from tests.chain import mailbox, running_chain

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(tinyproxy_binary() is None, reason="needs tinyproxy (apt-get install)"),
]

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")


@dataclass
class Egress:
    """AWS (moto) behind TLS with a private CA, and a proxy in between."""

    front: TcpProxy
    proxy: TinyProxy
    tls: LocalTls

    def connects(self) -> int:
        """CONNECTs tinyproxy forwarded to the TLS front."""
        port = self.front.url.rsplit(":", 1)[1]
        return self.proxy.requests().count(f"CONNECT localhost:{port}")


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy or CA bundle from the machine running the tests."""
    for name in (*PROXY_VARIABLES, "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
async def egress(
    moto_endpoint: str, tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> AsyncIterator[Egress]:
    tls = local_tls(tmp_path / "tls")
    async with tcp_proxy(moto_endpoint, "aws-tls", tls.server) as front, tinyproxy() as proxy:
        yield Egress(front, proxy, tls)


def _through(settings: Settings, egress: Egress) -> Settings:
    return settings.replace(aws=replace(settings.aws, endpoint_url=egress.front.url))


async def _deliver(chain_settings: Settings, resources: Resources, aws: AwsClients) -> None:
    async with running_chain(chain_settings, resources, aws) as chain:
        for index in range(3):
            await chain.wait_status(await chain.create(mailbox(index)), "completed")


async def test_every_aws_connection_goes_through_the_proxy_and_trusts_the_ca_bundle(
    settings: Settings,
    fresh: Resources,
    aws: AwsClients,
    egress: Egress,
    clean_environment: pytest.MonkeyPatch,
) -> None:
    """API and worker in one process: secrets, sends, receives, status writes, KMS."""
    clean_environment.setenv("HTTPS_PROXY", egress.proxy.url)
    clean_environment.setenv("NO_PROXY", "127.0.0.1")  # the IdM and the legacy stubs are local
    clean_environment.setenv("AWS_CA_BUNDLE", str(egress.tls.ca_path))
    await _deliver(_through(settings, egress), fresh, aws)
    # Each client opened its own connections, so a client going direct would show as an
    # accepted connection without a CONNECT.
    assert egress.front.accepted >= 3
    assert egress.connects() == egress.front.accepted


async def test_no_proxy_naming_the_endpoint_goes_direct(
    settings: Settings,
    fresh: Resources,
    aws: AwsClients,
    egress: Egress,
    clean_environment: pytest.MonkeyPatch,
) -> None:
    clean_environment.setenv("HTTPS_PROXY", egress.proxy.url)
    clean_environment.setenv("NO_PROXY", "127.0.0.1,localhost")
    clean_environment.setenv("AWS_CA_BUNDLE", str(egress.tls.ca_path))
    await _deliver(_through(settings, egress), fresh, aws)
    assert egress.front.accepted >= 3
    assert egress.connects() == 0
    assert "GET /" in egress.proxy.requests()  # its log is read: the start-up probe is in it


async def test_without_the_ca_bundle_the_hot_client_refuses_the_certificate(
    aws_settings: AwsSettings, resources: Resources, egress: Egress
) -> None:
    """As botocore would: the endpoint's certificate is from a CA the system does not know."""
    through = replace(aws_settings, endpoint_url=egress.front.url)
    async with open_lean_sqs(through, egress.front.url, get_session()) as sqs:
        with pytest.raises(HTTPClientError, match="certificate verify failed"):
            await sqs.send_message(QueueUrl=resources.queue_url, MessageBody="x")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "No such file or directory"),
        (b"not a certificate\n", "NO_CERTIFICATE_OR_CRL_FOUND"),
    ],
    ids=["missing", "not-pem"],
)
async def test_an_unusable_ca_bundle_is_one_line_before_the_daemon_serves(
    settings: Settings,
    tmp_path: Path,
    clean_environment: pytest.MonkeyPatch,
    content: bytes | None,
    reason: str,
) -> None:
    bundle = tmp_path / "bundle.pem"
    if content is not None:
        bundle.write_bytes(content)
    clean_environment.setenv("AWS_CA_BUNDLE", str(bundle))
    with pytest.raises(SettingsError) as refused:
        async with daemon.serving(settings.replace(role="api")):
            pass
    message = str(refused.value)
    assert message.startswith(
        f"AWS_CA_BUNDLE (ca_bundle) {bundle}: cannot load it as PEM certificates: "
    ), message
    assert reason in message
    assert "\n" not in message


def test_the_route_is_botocores(clean_environment: pytest.MonkeyPatch) -> None:
    """Scheme by scheme, NO_PROXY by host suffix, a proxy without a scheme taken as http, and
    the proxy's credentials out of its URL (into Proxy-Authorization, never a repr)."""
    clean_environment.setenv("HTTPS_PROXY", "proxy.corp:3128")
    clean_environment.setenv("HTTP_PROXY", "http://u%40corp:p%3Aw@plain.corp:8080")
    clean_environment.setenv("NO_PROXY", ".internal.corp")
    clean_environment.setenv("AWS_CA_BUNDLE", "/etc/ssl/corp.pem")
    session = get_session()
    secure = route("https://sqs.eu-west-1.amazonaws.com", session)
    assert (secure.proxy, secure.proxy_headers) == (URL("http://proxy.corp:3128"), {})
    assert secure.ca_bundle == "/etc/ssl/corp.pem"
    plain = route("http://sqs.eu-west-1.amazonaws.com", session)
    assert plain.proxy == URL("http://plain.corp:8080")
    assert plain.proxy_headers is not None
    scheme, _, encoded = plain.proxy_headers["Proxy-Authorization"].partition(" ")
    assert (scheme, base64.b64decode(encoded)) == ("Basic", b"u@corp:p:w")
    assert "p:w" not in repr(plain)
    assert "p%3Aw" not in repr(plain)
    assert route("https://vpce.internal.corp", session) == Route(None, None, "/etc/ssl/corp.pem")


async def test_a_refused_proxy_password_is_in_no_error_or_log_line(
    aws_settings: AwsSettings,
    resources: Resources,
    egress: Egress,
    clean_environment: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = "rotated-pw-9f3"
    clean_environment.setenv("HTTPS_PROXY", egress.proxy.url.replace(PASSWORD, wrong))
    clean_environment.setenv("AWS_CA_BUNDLE", str(egress.tls.ca_path))
    through = replace(aws_settings, endpoint_url=egress.front.url)
    async with open_lean_sqs(through, egress.front.url, get_session()) as sqs:
        with pytest.raises(HTTPClientError) as refused:
            await sqs.send_message(QueueUrl=resources.queue_url, MessageBody="x")
    assert "401" in str(refused.value)  # tinyproxy's answer to wrong credentials
    assert wrong not in str(refused.value)
    assert all(wrong not in record.getMessage() for record in caplog.records)
    assert egress.front.accepted == 0


async def test_the_hot_client_trusts_what_botocore_trusts_and_no_more(
    aws_settings: AwsSettings,
    resources: Resources,
    egress: Egress,
    tmp_path: Path,
    clean_environment: pytest.MonkeyPatch,
) -> None:
    """The CA is in the system's store (SSL_CERT_FILE) but AWS_CA_BUNDLE names another: botocore
    trusts the bundle alone, so both clients refuse the endpoint's certificate."""
    other = local_tls(tmp_path / "other")
    clean_environment.setenv("SSL_CERT_FILE", str(egress.tls.ca_path))
    clean_environment.setenv("AWS_CA_BUNDLE", str(other.ca_path))
    through = replace(aws_settings, endpoint_url=egress.front.url)
    session = get_session()
    async with open_lean_sqs(through, egress.front.url, session) as sqs:
        with pytest.raises(HTTPClientError, match="certificate verify failed"):
            await sqs.send_message(QueueUrl=resources.queue_url, MessageBody="x")
    async with open_client("sqs", through, session=session) as cold:
        with pytest.raises(SSLError):
            await cold.get_queue_url(QueueName="any")
