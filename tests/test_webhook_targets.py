"""The SSRF rules of webhook destinations (webhook_worker.targets).

``refusal`` must decide without any network traffic: every check of it runs under
:class:`NoNetwork` (an audit-hook guard that fails any DNS lookup, connect or send).
``resolve`` resolves only ``localhost`` (through /etc/hosts) and names answered by a
stand-in for ``socket.getaddrinfo`` that knows a few test names and refuses all others,
so no test resolves a real name or sends anything beyond loopback.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.webhook_receiver import NoNetwork
from webhook_worker.targets import (
    Destination,
    Unresolvable,
    WebhookPolicy,
    WebhookRefused,
    numeric_address,
)

DEFAULT = WebhookPolicy.from_setting(None)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/hook", "127.0.0.1 is a loopback address"),
        ("http://127.0.0.2:8080/", "127.0.0.2 is a loopback address"),
        ("http://[::1]/hook", "::1 is a loopback address"),
        ("http://[::ffff:127.0.0.1]/", "is a loopback address"),
        ("http://10.1.2.3/", "10.1.2.3 is a private address"),
        ("http://172.16.0.1/", "172.16.0.1 is a private address"),
        ("http://192.168.1.10/", "192.168.1.10 is a private address"),
        ("http://[fd00:ec2::254]/", "is a private address"),  # AWS IMDS over IPv6
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://[fe80::1]/", "fe80::1 is a link-local address"),
        ("http://100.100.100.200/", "100.100.100.200 is a shared address"),  # Alibaba IMDS
        ("http://224.0.0.1/", "is a multicast address"),
        ("http://0.0.0.0/", "0.0.0.0 is an unspecified address"),
        ("http://240.0.0.1/", "240.0.0.1 is a"),  # reserved (Python calls it private)
        # Numeric forms the C resolver reads as 127.0.0.1 and 169.254.169.254:
        ("http://2130706433/", "2130706433 (127.0.0.1) is a loopback address"),
        ("http://0x7f.1/", "(127.0.0.1) is a loopback address"),
        ("http://0177.0.0.1/", "(127.0.0.1) is a loopback address"),
        ("http://0xa9fea9fe/", "(169.254.169.254) is a link-local address"),
        ("http://127.0.0.1./", "is a loopback address"),
        # Names that always mean an internal address:
        ("http://localhost:8080/", "localhost is an internal name"),
        ("http://LOCALHOST./", "localhost is an internal name"),
        ("http://api.localhost/", "api.localhost is an internal name"),
        ("http://metadata.google.internal/computeMetadata/v1/", "is an internal name"),
        ("http://metadata/", "metadata is an internal name"),
        # Not http(s), or not a usable URL:
        ("file:///etc/passwd", "must be http or https, not 'file'"),
        ("gopher://example.com/", "must be http or https, not 'gopher'"),
        ("ftp://example.com/", "must be http or https"),
        ("example.com/hook", "must be http or https, not '(none)'"),
        ("http:///hook", "has no host"),
        ("http://user:pw@example.com/", "may not carry user info"),
        ("http://example.com:99999/", "invalid port"),
        ("http://example.com:port/", "invalid port"),
    ],
)
def test_refusal_says_why_without_any_network_traffic(url: str, reason: str) -> None:
    with NoNetwork() as guard:
        said = DEFAULT.refusal(url)
    assert said is not None and reason in said, said
    assert guard.attempts == []
    if "address" in reason or "internal name" in reason:
        assert "GENSEG_WEBHOOK_ALLOW" in said  # says how to allow it on purpose


@pytest.mark.parametrize(
    "url",
    ["https://example.com/hook?token=abc", "http://hooks.example.org:8443/x", "http://8.8.8.8/"],
)
def test_public_destinations_pass_the_validator_without_network_traffic(url: str) -> None:
    with NoNetwork() as guard:
        assert DEFAULT.refusal(url) is None
    assert guard.attempts == []


def test_the_guard_catches_traffic() -> None:
    """NoNetwork is able to fail: a lookup inside it is stopped and recorded."""
    with NoNetwork() as guard, pytest.raises(PermissionError):
        socket.getaddrinfo("localhost", 80)
    assert guard.attempts and guard.attempts[0][0] == "socket.getaddrinfo"


def test_allow_list_allows_hosts_and_networks_and_nothing_else() -> None:
    policy = WebhookPolicy.from_setting(" 127.0.0.1 , 10.0.0.0/8,hooks.internal. ,[bad")
    with NoNetwork():
        assert policy.refusal("http://127.0.0.1:9000/") is None
        assert policy.refusal("http://10.200.0.7/") is None
        assert policy.refusal("http://HOOKS.internal/x") is None
        assert "127.0.0.2 is a loopback address" in (policy.refusal("http://127.0.0.2/") or "")
        assert "::1 is a loopback" in (policy.refusal("http://[::1]/") or "")
        assert "localhost is an internal name" in (policy.refusal("http://localhost/") or "")
        assert "private" in (policy.refusal("http://192.168.0.1/") or "")
        link_local = policy.refusal("http://169.254.169.254/")
    assert link_local is not None and "link-local" in link_local


def test_numeric_address_reads_legacy_forms_and_leaves_names_alone() -> None:
    with NoNetwork():
        assert str(numeric_address("2130706433")) == "127.0.0.1"
        assert str(numeric_address("0x7f000001")) == "127.0.0.1"
        assert str(numeric_address("10.1")) == "10.0.0.1"
        assert str(numeric_address("::1")) == "::1"
        for name in ("example.com", "cafe.de", "abc", "face", "1e100.net", ""):
            assert numeric_address(name) is None, name


# --- resolve: the check after DNS -----------------------------------------------------------

#: Test names and what they "resolve" to (no DNS involved).
NAMES: dict[str, list[str]] = {
    "rebind.test": ["127.0.0.2"],
    "v6.test": ["::1"],
    "mixed.test": ["8.8.8.8", "169.254.169.254"],  # one good answer does not excuse a bad one
    "public.test": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
}


@pytest.fixture
def test_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """socket.getaddrinfo answers NAMES, passes numeric hosts and ``localhost`` to the
    real one (no DNS for those), and fails the test on any other name."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        asked.append(host)
        if host in NAMES:
            return [
                (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port, 0, 0) if ":" in a else (a, port))
                for a in NAMES[host]
            ]  # fmt: skip
        if host == "localhost" or numeric_address(str(host)) is not None:
            return real(host, port, *args, **kwargs)
        raise AssertionError(f"a test tried to resolve {host!r}")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield asked


def test_resolve_refuses_a_name_that_resolves_to_an_internal_address(test_dns: list[str]) -> None:
    with pytest.raises(WebhookRefused, match=r"rebind\.test \(127\.0\.0\.2\) is a loopback"):
        DEFAULT.resolve("http://rebind.test/hook")
    with pytest.raises(WebhookRefused, match=r"v6\.test \(::1\) is a loopback"):
        DEFAULT.resolve("https://v6.test/hook")
    with pytest.raises(WebhookRefused, match=r"169\.254\.169\.254\) is a link-local"):
        DEFAULT.resolve("http://mixed.test/")
    # The allow list by address does not cover 127.0.0.2; by name it covers the name.
    with pytest.raises(WebhookRefused):
        WebhookPolicy(["127.0.0.1"]).resolve("http://rebind.test/")
    assert WebhookPolicy(["rebind.test"]).resolve("http://rebind.test/").address == "127.0.0.2"
    assert test_dns == ["rebind.test", "v6.test", "mixed.test", "rebind.test", "rebind.test"]


def test_resolve_refuses_before_resolving_what_the_validator_refuses(test_dns: list[str]) -> None:
    for url in ("http://localhost/", "http://169.254.169.254/", "file:///etc/passwd"):
        with pytest.raises(WebhookRefused) as caught:
            DEFAULT.resolve(url)
        assert not isinstance(caught.value, Unresolvable)
    assert test_dns == []


def test_resolve_gives_every_checked_address_and_the_request_line(test_dns: list[str]) -> None:
    dest = DEFAULT.resolve("https://Public.TEST:8443/hooks/ä b?x=1&t=%2F")
    assert dest == Destination(
        scheme="https",
        host="public.test",
        port=8443,
        path="/hooks/%C3%A4%20b?x=1&t=%2F",
        address="93.184.215.14",
        addresses=("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"),
    )
    assert dest.host_header == "public.test:8443"
    assert dest.server_name == "public.test"
    assert DEFAULT.resolve("http://public.test").path == "/"
    assert DEFAULT.resolve("http://public.test").host_header == "public.test"


def test_localhost_resolves_through_etc_hosts_when_allowed() -> None:
    dest = WebhookPolicy(["localhost"]).resolve("http://localhost:8080/cb")
    assert dest.host_header == "localhost:8080"
    assert all(a in ("127.0.0.1", "::1") for a in dest.addresses)
    ipv6 = WebhookPolicy(["::1"]).resolve("http://[::1]:8080/")
    assert (ipv6.address, ipv6.host_header) == ("::1", "[::1]:8080")


def test_a_name_that_does_not_resolve_is_unresolvable(monkeypatch: pytest.MonkeyPatch) -> None:
    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(Unresolvable, match=r"gone\.test does not resolve"):
        DEFAULT.resolve("http://gone.test/")
