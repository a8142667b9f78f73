"""The generator's request policy: what it refuses to generate, and how fast per tenant.

A deployment writes a TOML file (``GENSEG_POLICY``; the format is in docs/policy.md)
with blocked terms and regular expressions, an allow-list, a maximum prompt length,
the mode of the image check and per-tenant rate limits. :class:`PolicyStore` loads
it and reloads it when it changes; :class:`RateLimiter` keeps one token bucket per
tenant in this process. Nothing here knows about Kafka or events: the handler
passes strings in and turns refusals into dead letters.

Matching happens on :func:`normalize` d text, so that case, full-width forms,
accents, zero-width characters and Cyrillic/Greek look-alikes of Latin letters do
not slip a blocked term through.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
import tomllib
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

log = logging.getLogger(__name__)

SafetyMode = Literal["off", "mark", "refuse"]

# --- normalisation ----------------------------------------------------------------------

#: Non-ASCII letters that look like Latin ones, mapped to the Latin letter they pass for.
#: Applied case-sensitively before case folding, because a letter's look-alike can depend
#: on its case (Greek capital eta looks like H, small eta like n). ASCII is never mapped:
#: Unicode's full confusables skeleton (UTS #39) also rewrites ASCII ("m" -> "rn",
#: "1" -> "l"), which would make ordinary words match blocked terms.
_CONFUSABLE_PAIRS = (
    # Cyrillic capitals and small letters
    ("АВЕЅІЈКМНОРСТУХҮҺԀԚԜӀѴ", "ABESIJKMHOPCTYXYHDQWIV"),
    ("авеѕіјкмнорстухүһԁԛԝӏѵь", "abesijkmhopctyxyhdqwlvb"),
    # Greek capitals and small letters
    ("ΑΒΕΖΗΙΚΜΝΟΡΤΥΧϹϿ", "ABEZHIKMNOPTYXCJ"),
    ("αβγεηικνορτυχωϲϳ", "abyeniknoptuxwcj"),
    # Latin small capitals, IPA and other Latin letters NFKC leaves alone
    ("ᴀʙᴄᴅᴇɢʜɪᴊᴋʟᴍɴᴏᴘʀꜱᴛᴜᴠᴡʏᴢ", "abcdeghijklmnoprstuvwyz"),
    ("ıȷɑɡɩłŁøØđĐħĦ", "ijagilLoOdDhH"),
    # Armenian and Cherokee letters shaped like Latin ones
    ("օսոհզցՕՍ", "ounhqgOU"),
    ("ᎪᏴᏟᎬᎻᎫᏦᎷᏢᏚᎢᏔ", "ABCEHJKMPSTW"),
)
CONFUSABLES: dict[int, str] = {
    ord(src): dst
    for sources, targets in _CONFUSABLE_PAIRS
    for src, dst in zip(sources, targets, strict=True)
}
#: Invisible characters that are letters (Lo) to Unicode, so the format-character rule
#: below does not remove them: Hangul fillers.
_INVISIBLE_LETTERS = frozenset("\u3164\u115f\u1160")


def normalize(text: str) -> str:
    """``text`` as the policy matches it: compatibility forms folded (NFKC: full-width,
    ligatures, mathematical letters), invisible format characters removed (zero-width
    space, joiners, soft hyphen, bidi controls), accents stripped, look-alike letters
    mapped to Latin (:data:`CONFUSABLES`), case folded."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(
        c for c in text if unicodedata.category(c) != "Cf" and c not in _INVISIBLE_LETTERS
    )
    decomposed = unicodedata.normalize("NFD", text)
    text = "".join(c for c in decomposed if unicodedata.category(c) not in ("Mn", "Me"))
    return unicodedata.normalize("NFC", text.translate(CONFUSABLES)).casefold()


# Word characters are letters and digits; "_" separates words like spaces do, so that
# "acme_logo" still holds the word "acme".
_SEPARATORS = r"[\W_]+"
_WORD_START = r"(?<![^\W_])"
_WORD_END = r"(?![^\W_])"


def _words(term: str) -> list[str]:
    return [w for w in re.split(_SEPARATORS, normalize(term)) if w]


def term_regex(term: str, *, whole_word: bool = True) -> re.Pattern[str]:
    """A regex finding ``term`` in normalised text: its words in order, any separators
    between them; with ``whole_word`` not as part of a longer word ("acme" is not
    found in "acmeville")."""
    words = _words(term)
    if not words:
        raise PolicyError(f"term {term!r} has no letters or digits")
    body = _SEPARATORS.join(re.escape(w) for w in words)
    return re.compile(f"{_WORD_START}{body}{_WORD_END}" if whole_word else body)


def _slug(term: str) -> str:
    return "-".join(_words(term))


# --- the policy ---------------------------------------------------------------------------


class PolicyError(ValueError):
    """A policy file that cannot be used (syntax, unknown keys, bad pattern...)."""


@dataclass(frozen=True)
class BlockRule:
    """One blocked term or pattern; ``rule`` names it in refusals (``brands.acme``)."""

    rule: str
    kind: Literal["term", "pattern"]
    source: str  # as written in the policy file
    regex: re.Pattern[str]


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: ``rate_per_minute`` requests on average, ``burst`` at once."""

    rate_per_minute: float
    burst: int

    def describe(self) -> str:
        return f"rate_per_minute = {self.rate_per_minute:g}, burst = {self.burst}"


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused; ``message`` goes into its dead-letter event."""

    rule: str
    message: str


@dataclass(frozen=True)
class Policy:
    """A loaded policy file. :data:`ALLOW_ALL` is the policy of no file."""

    rules: tuple[BlockRule, ...] = ()
    allow: tuple[re.Pattern[str], ...] = ()
    max_prompt_chars: int | None = None
    safety: SafetyMode = "off"
    default_limit: RateLimit | None = None
    tenant_limits: Mapping[str, RateLimit] = field(default_factory=dict)

    def check(
        self, prompt: str, negative: str | None = None, targets: Iterable[str] = ()
    ) -> Refusal | None:
        """The first rule the request breaks: the built prompt, then the negative
        prompt, then each target; None when it may be generated."""
        # (where, text, whether max_prompt_chars applies)
        fields = [("prompt", prompt, True)]
        if negative:
            fields.append(("negative prompt", negative, True))
        fields += [(f'target "{t}"', t, False) for t in targets]
        for where, text, limited in fields:
            if limited and self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
                return Refusal(
                    "max_prompt_chars",
                    f"{where} is {len(text)} characters, over the policy's limit of "
                    f"{self.max_prompt_chars} (rule max_prompt_chars)",
                )
            if (refusal := self._blocked(text, where)) is not None:
                return refusal
        return None

    def _blocked(self, text: str, where: str) -> Refusal | None:
        normal = normalize(text)
        allowed = [m.span() for a in self.allow for m in a.finditer(normal)]
        for rule in self.rules:
            for match in rule.regex.finditer(normal):
                start, end = match.span()
                if any(a <= start and end <= b for a, b in allowed):
                    continue  # inside an allowed phrase
                return Refusal(
                    rule.rule, f'blocked {rule.kind} "{rule.source}" (rule {rule.rule}) in {where}'
                )
        return None

    def limit_for(self, tenant: str | None) -> RateLimit | None:
        """The rate limit of ``tenant``: its own, else the default (also for no tenant)."""
        if tenant is not None and tenant in self.tenant_limits:
            return self.tenant_limits[tenant]
        return self.default_limit

    @classmethod
    def from_toml(cls, text: str) -> Policy:
        """Parse a policy file's text; raise :class:`PolicyError` on any problem."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"not valid TOML: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Policy:
        try:
            spec = _PolicyFile.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(file)'}: {e['msg']}"
                for e in exc.errors(include_url=False)[:10]
            )
            raise PolicyError(problems) from None
        rules: list[BlockRule] = []
        for group, rule in spec.rules.items():
            for term in rule.terms:
                regex = term_regex(term, whole_word=rule.whole_word)
                rules.append(BlockRule(f"{group}.{_slug(term)}", "term", term, regex))
            named = (
                rule.patterns.items()
                if isinstance(rule.patterns, dict)
                else ((f"pattern-{i}", p) for i, p in enumerate(rule.patterns, 1))
            )
            for name, pattern in named:
                try:
                    regex = re.compile(pattern, re.IGNORECASE)
                except re.error as exc:
                    raise PolicyError(f"rules.{group}: pattern {pattern!r}: {exc}") from None
                rules.append(BlockRule(f"{group}.{name}", "pattern", pattern, regex))
        return cls(
            rules=tuple(rules),
            allow=tuple(term_regex(t) for t in spec.allow.terms),
            max_prompt_chars=spec.max_prompt_chars,
            safety=spec.safety,
            default_limit=spec.rate_limit.limit() if spec.rate_limit else None,
            tenant_limits={t: spec_limit.limit() for t, spec_limit in spec.tenants.items()},
        )


ALLOW_ALL = Policy()


# The file's layout. extra="forbid": a misspelt key in a compliance file must be an
# error, not a rule that silently does nothing.
_Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
_Tenant = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
_Term = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _RuleSpec(_Spec):
    terms: list[_Term] = Field(default_factory=list)
    patterns: list[_Term] | dict[_Name, _Term] = Field(default_factory=list)
    whole_word: bool = True


class _AllowSpec(_Spec):
    terms: list[_Term] = Field(default_factory=list)


class _LimitSpec(_Spec):
    rate_per_minute: float = Field(gt=0)
    burst: int | None = Field(default=None, ge=1)

    def limit(self) -> RateLimit:
        # Default burst: one minute's worth (at least 1).
        burst = self.burst if self.burst is not None else max(1, math.ceil(self.rate_per_minute))
        return RateLimit(self.rate_per_minute, burst)


class _PolicyFile(_Spec):
    version: Literal[1] = 1
    max_prompt_chars: int | None = Field(default=None, ge=1)
    safety: SafetyMode = "off"
    allow: _AllowSpec = Field(default_factory=_AllowSpec)
    rules: dict[_Name, _RuleSpec] = Field(default_factory=dict)
    rate_limit: _LimitSpec | None = None
    tenants: dict[_Tenant, _LimitSpec] = Field(default_factory=dict)


# --- rate limits ---------------------------------------------------------------------------


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """One token bucket per tenant, in this process (N workers admit N times the rate).

    A bucket starts full (``burst`` tokens) and refills at ``rate_per_minute / 60``
    tokens a second; a request takes one token or is refused. Limits come from the
    policy on every call, so a reloaded policy applies at once and a bucket keeps its
    tokens (capped at the new burst). At most ``max_buckets`` are kept: the least
    recently used goes first, and comes back full, which only favours an idle tenant.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_buckets: int = 10_000
    ) -> None:
        self.clock = clock
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[str | None, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, tenant: str | None, policy: Policy) -> Refusal | None:
        """Take a token of ``tenant`` (None: requests without a tenant); the refusal
        when its bucket is empty, None when admitted or not limited."""
        limit = policy.limit_for(tenant)
        if limit is None:
            return None
        with self._lock:
            now = self.clock()
            bucket = self._buckets.pop(tenant, None) or _Bucket(float(limit.burst), now)
            refill = (now - bucket.updated) * limit.rate_per_minute / 60.0
            bucket.tokens = min(float(limit.burst), bucket.tokens + max(refill, 0.0))
            bucket.updated = now
            self._buckets[tenant] = bucket  # most recently used last
            while len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
        own = tenant is not None and tenant in policy.tenant_limits
        who = f'tenant "{tenant}"' if tenant is not None else "a request without a tenant"
        rule = f"tenants.{tenant}" if own else "rate_limit"
        which = "its rate limit" if own else "the default rate limit"
        return Refusal(
            rule, f"{who} is over {which} ({limit.describe()} per generator process; rule {rule})"
        )


# --- the file, reloaded -----------------------------------------------------------------


def _signature(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)  # follows symlinks: a Kubernetes ConfigMap swaps a link
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class PolicyStore:
    """The policy of a file, reloaded without a restart.

    :meth:`current` looks at the file's modification time (and size and inode) at
    most every ``reload_interval_s``; when it changed, the file is parsed and, if
    ``validate`` accepts it, replaces the policy. A broken or missing file keeps the
    last good policy and logs an error once per version of the file. The first load
    raises :class:`PolicyError` instead: there is no good policy to keep yet, and a
    worker must not start without the policy it was given.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        reload_interval_s: float = 1.0,
        validate: Callable[[Policy], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.reload_interval_s = reload_interval_s
        self.validate = validate
        self.clock = clock
        #: Successful loads so far (1 after construction).
        self.loads = 0
        #: Changed versions of the file that were refused (kept the last good policy).
        self.errors = 0
        self._lock = threading.Lock()
        try:
            signature = _signature(self.path)
            self._policy = self._read()
        except OSError as exc:
            raise PolicyError(f"policy file {self.path}: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, PolicyError) as exc:
            raise PolicyError(f"policy file {self.path}: {exc}") from None
        self._signature = signature
        self._refused: tuple[int, int, int] | None = None  # a broken version, said so
        self._missing = False  # the file is gone, said so
        self._checked = clock()
        self.loads = 1
        log.info("policy %s loaded: %s", self.path, self.summary(self._policy))

    def current(self) -> Policy:
        """The policy in force, reloaded first if the file changed (checked at most
        every ``reload_interval_s``)."""
        with self._lock:
            now = self.clock()
            if now - self._checked >= self.reload_interval_s:
                self._checked = now
                self._maybe_reload()
            return self._policy

    def _read(self) -> Policy:
        policy = Policy.from_toml(self.path.read_text(encoding="utf-8"))
        if self.validate is not None:
            self.validate(policy)
        return policy

    def _maybe_reload(self) -> None:
        try:
            signature = _signature(self.path)
        except OSError as exc:
            self._keep(None, f"cannot be read: {exc.strerror or exc}")
            return
        self._missing = False
        if signature in (self._signature, self._refused):
            return
        try:
            policy = self._read()
        except (OSError, UnicodeDecodeError, PolicyError) as exc:
            self._keep(signature, str(exc))
            return
        self._policy, self._signature, self._refused = policy, signature, None
        self.loads += 1
        log.info("policy %s reloaded: %s", self.path, self.summary(policy))

    def _keep(self, signature: tuple[int, int, int] | None, problem: str) -> None:
        """Keep the last good policy; log the problem once per version of the file."""
        if signature is None:
            if self._missing:
                return
            self._missing = True
        else:
            self._refused = signature
        self.errors += 1
        log.error("policy %s not reloaded, keeping the last good policy: %s", self.path, problem)

    @staticmethod
    def summary(policy: Policy) -> str:
        return (
            f"{len(policy.rules)} blocking rules, {len(policy.allow)} allowed terms, "
            f"max_prompt_chars {policy.max_prompt_chars}, safety {policy.safety}, "
            f"{len(policy.tenant_limits)} tenant limits"
        )
