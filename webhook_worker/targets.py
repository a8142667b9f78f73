"""Which webhook destinations genseg may call: the SSRF rules.

A ``callback_url`` comes from whoever submitted the request, so a dispatcher that
POSTs to it blindly could be steered at the deployment's own network: the cloud
metadata service (169.254.169.254), a database on loopback, an admin API on a
private address. Rules:

- only ``http`` and ``https``, with a host, no user info;
- refused: loopback, private (RFC 1918, unique-local), link-local (the metadata
  services), multicast, unspecified, reserved and shared (CGNAT) addresses, and the
  names that always mean them (``localhost``, ``*.localhost``,
  ``metadata.google.internal``);
- ``GENSEG_WEBHOOK_ALLOW`` (hosts or CIDRs, comma-separated) allows destinations
  anyway, e.g. a receiver on loopback in a test or a private service on purpose.

:meth:`WebhookPolicy.refusal` checks a URL without any network traffic (the gateway at
submit time: a literal address or a known name); :meth:`WebhookPolicy.resolve` checks
every address a host name resolves to (the dispatcher, right before it connects, and
it then connects to the address it checked, so a DNS answer cannot change between
the check and the connection).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Names that always mean an internal address, refused without resolving them.
INTERNAL_NAMES = ("localhost", "metadata.google.internal", "metadata")
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)


class WebhookRefused(ValueError):
    """A callback URL the webhook policy refuses; the message says why."""


@dataclass(frozen=True)
class Destination:
    """Where one delivery goes: the URL's parts and the checked address to connect to."""

    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line
    address: str  # the IP address connected to (checked against the policy)


def internal_reason(address: IPAddress) -> str | None:
    """Why ``address`` is internal (``"loopback"``, ``"private"``...), or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return internal_reason(address.ipv4_mapped)
    checks = (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("unspecified", address.is_unspecified),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("shared", isinstance(address, ipaddress.IPv4Address) and address in _SHARED),
    )
    return next((name for name, hit in checks if hit), None)


def _parse(url: str) -> SplitResult:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise WebhookRefused(
            f"callback_url must be http or https, not {parts.scheme or '(none)'!r}"
        )
    if not parts.hostname:
        raise WebhookRefused("callback_url has no host")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("callback_url may not carry user info (user:password@)")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise WebhookRefused("callback_url has an invalid port") from None
    return parts


class WebhookPolicy:
    """The SSRF rules above, with the deployment's allow list (hosts or CIDRs)."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.allowed_hosts: set[str] = set()
        self.allowed_networks: list[IPNetwork] = []
        for entry in (e.strip() for e in allow):
            if not entry:
                continue
            try:
                self.allowed_networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.allowed_hosts.add(entry.lower().rstrip("."))

    @classmethod
    def from_setting(cls, value: str | None) -> WebhookPolicy:
        """From ``GENSEG_WEBHOOK_ALLOW``: comma-separated hosts or CIDRs."""
        return cls((value or "").split(","))

    def _allowed_address(self, address: IPAddress) -> bool:
        return any(
            address in net for net in self.allowed_networks if net.version == address.version
        )

    def _check_address(self, host: str, address: IPAddress) -> None:
        reason = internal_reason(address)
        if reason and not self._allowed_address(address) and host not in self.allowed_hosts:
            shown = host if host == str(address) else f"{host} ({address})"
            raise WebhookRefused(
                f"callback_url host {shown} is a {reason} address; "
                "allow it with GENSEG_WEBHOOK_ALLOW if that is intended"
            )

    def refusal(self, url: str) -> str | None:
        """Why ``url`` is refused, without any network traffic (None: not refused yet;
        a host name is checked again, resolved, at delivery)."""
        try:
            parts = _parse(url)
            host = (parts.hostname or "").lower().rstrip(".")
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                if host in self.allowed_hosts:
                    return None
                if host in INTERNAL_NAMES or host.endswith(".localhost"):
                    raise WebhookRefused(
                        f"callback_url host {host} is an internal name; "
                        "allow it with GENSEG_WEBHOOK_ALLOW if that is intended"
                    ) from None
                return None
            self._check_address(host, address)
        except WebhookRefused as exc:
            return str(exc)
        return None

    def resolve(self, url: str) -> Destination:
        """Resolve ``url``'s host and check every address it has; the first one to
        connect to. Raises :class:`WebhookRefused` (a refused or unresolvable host)."""
        reason = self.refusal(url)
        if reason is not None:
            raise WebhookRefused(reason)
        parts = _parse(url)
        host = (parts.hostname or "").lower().rstrip(".")
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise WebhookRefused(f"callback_url host {host} does not resolve: {exc}") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        for address in addresses:  # every answer: a rebinding name may mix good and bad
            self._check_address(host, address)
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        return Destination(scheme, host, port, path, str(addresses[0]))
