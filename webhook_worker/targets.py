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
it then connects to an address it checked, so a DNS answer cannot change between
the check and the connection). A name that does not resolve raises :class:`Unresolvable`
(a kind of refusal that may pass later: the dispatcher retries it).

Numeric hosts are read as the C resolver reads them, without asking it: ``2130706433``,
``0x7f.1`` and ``0177.0.0.1`` are all 127.0.0.1 and refused as such at submit time.
"""

from __future__ import annotations

import ipaddress
import socket
import string
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, quote, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Names that always mean an internal address, refused without resolving them.
INTERNAL_NAMES = ("localhost", "metadata.google.internal", "metadata")
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)


class WebhookRefused(ValueError):
    """A callback URL the webhook policy refuses; the message says why."""


class Unresolvable(WebhookRefused):
    """The callback URL's host does not resolve (now: DNS may answer later)."""


@dataclass(frozen=True)
class Destination:
    """Where one delivery goes: the URL's parts and the checked address to connect to."""

    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line (ASCII, percent-encoded)
    address: str  # the first IP address to connect to (checked against the policy)
    #: Every address the host resolved to, all checked, in the resolver's order.
    addresses: tuple[str, ...] = ()

    @property
    def server_name(self) -> str:
        """The host as sent on the wire (IDNA): the TLS server name (SNI) checked against
        the certificate."""
        return _ascii_host(self.host)

    @property
    def host_header(self) -> str:
        """The ``Host`` header: the URL's host (IDNA, IPv6 in brackets), and its port
        when it is not the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.server_name
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


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


def _ascii_host(host: str) -> str:
    """``host`` as sent on the wire (IDNA for a non-ASCII name)."""
    try:
        return host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise WebhookRefused(f"callback_url host {host!r} is not a valid name") from None


def numeric_address(host: str) -> IPAddress | None:
    """The address a numeric ``host`` means, as the C resolver reads it (``2130706433``,
    ``0x7f.1``, ``0177.0.0.1`` included), or None for a name. No network traffic."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not host or not all(c in string.hexdigits + ".xX" for c in host):
        return None
    try:  # inet_aton accepts the legacy forms that getaddrinfo would too
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


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
            article = "an" if reason[0] in "aeiou" else "a"
            raise WebhookRefused(
                f"callback_url host {shown} is {article} {reason} address; "
                "allow it with GENSEG_WEBHOOK_ALLOW if that is intended"
            )

    def refusal(self, url: str) -> str | None:
        """Why ``url`` is refused, without any network traffic (None: not refused yet;
        a host name is checked again, resolved, at delivery)."""
        try:
            parts = _parse(url)
            host = (parts.hostname or "").lower().rstrip(".")
            address = numeric_address(host)
            if address is None:
                if host in self.allowed_hosts:
                    return None
                if host in INTERNAL_NAMES or host.endswith(".localhost"):
                    raise WebhookRefused(
                        f"callback_url host {host} is an internal name; "
                        "allow it with GENSEG_WEBHOOK_ALLOW if that is intended"
                    )
                return None
            self._check_address(host, address)
        except WebhookRefused as exc:
            return str(exc)
        return None

    def resolve(self, url: str) -> Destination:
        """Resolve ``url``'s host and check every address it has. Raises
        :class:`WebhookRefused` (a refused host) or :class:`Unresolvable`."""
        reason = self.refusal(url)
        if reason is not None:
            raise WebhookRefused(reason)
        parts = _parse(url)
        host = (parts.hostname or "").lower().rstrip(".")
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        numeric = numeric_address(host)
        lookup = str(numeric) if numeric is not None else _ascii_host(host)
        try:
            infos = socket.getaddrinfo(lookup, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise Unresolvable(f"callback_url host {host} does not resolve: {exc}") from None
        addresses = list(
            dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos)
        )
        if not addresses:
            raise Unresolvable(f"callback_url host {host} has no address")
        for address in addresses:  # every answer: a rebinding name may mix good and bad
            self._check_address(host, address)
        # Non-ASCII and spaces percent-encoded; ASCII punctuation (and existing escapes) kept.
        path = quote(parts.path or "/", safe=string.punctuation)
        if parts.query:
            path = f"{path}?{quote(parts.query, safe=string.punctuation)}"
        shown = [str(a) for a in addresses]
        return Destination(scheme, host, port, path, shown[0], tuple(shown))
