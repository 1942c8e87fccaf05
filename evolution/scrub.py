"""Scrub chat transcripts of secrets and personal data before they are stored or trained on.

``scrub(text)`` returns the text with every finding replaced by ``[REDACTED:<kind>]`` and the
findings themselves (offsets into the *original* text, sorted, non-overlapping). Kinds, in
order of precedence when two findings overlap:

``private_key``
    PEM blocks ``-----BEGIN ... PRIVATE KEY-----`` .. ``-----END ... PRIVATE KEY-----``
    (RSA, EC, DSA, OpenSSH, PKCS#8, encrypted, PGP key blocks), also when the END line is
    missing (the base64 body that follows is taken) or the newlines arrive as ``\\n``
    escapes; values labelled ``private_key: ...``.
``api_key``
    Provider keys recognised by their prefix: OpenAI ``sk-``/``sk-proj-``, Anthropic
    ``sk-ant-``, AWS ``AKIA``/``ASIA``.. ids and labelled AWS secret keys, GitHub ``ghp_``
    ``gho_`` ``ghu_`` ``ghs_`` ``ghr_`` ``github_pat_``, GitLab ``glpat-``, Slack ``xox?-``,
    Stripe ``sk_/rk_/pk_live_`` (and ``_test_``), Google ``AIza``, Hugging Face ``hf_``, npm,
    PyPI, SendGrid; and values labelled ``api_key=``, ``"apiKey": "..."``, ``X-API-Key:``,
    ``client_secret``, ``access_key`` ...
``token``
    ``Authorization:`` / ``Cookie:`` header values, ``Bearer <token>``, JWTs, Slack/Discord
    webhook paths, values labelled ``token``/``secret``/``access_token``/``session_id`` ...,
    and unlabelled long high-entropy strings (32+ chars mixing upper, lower and digits).
``password``
    Values after ``password``/``passwd``/``passphrase``/``pwd``/``pw``/``pass`` labels
    (``password: X``, ``DB_PASSWORD=X``, ``"password": "X"``, ``--password X``,
    ``curl -u user:X``, ``mysql -pX``) and in
    natural language (``my password is hunter2``, ``the wifi password is 'x y'``,
    ``the password for the router is X``, ``use X as the password``); PINs and door/gate/
    alarm codes given as digits. Only the value is redacted; the label words stay.
``url_credentials``
    The ``user:pass`` userinfo of ``scheme://user:pass@host`` (and a token-like userinfo
    without a colon); scheme and host stay.
``iban``
    Country code, check digits and BBAN, compact or with single spaces (``DE89 3704 0044 0532
    0130 00``), any letter case, valid for ``schwifty``: a known country, its length and BBAN
    format, and the ISO 7064 mod-97-10 check. One that fails the check stays.
``payment_card``
    13-19 digits in one block or grouped as cards print them (4-4-4-4, 4-6-5, 4-6-4,
    4-4-4-4-3; one space or one dash throughout) that pass the Luhn check, unless the issuer
    range holds no cards (see ``_card_iin_ok``: no table of networks, which would go stale).
    Not inside a word, a decimal fraction or after ``+``; runs that fail Luhn stay.
``email``
    RFC 5322 dot-atom addresses (any atext in the local part, plus-addressing, subdomains,
    punycode TLDs).
``phone``
    Numbers found by Google's libphonenumber (``phonenumbers.PhoneNumberMatcher``) at
    leniency ``VALID``: the number must be valid in its region's metadata (not just of a
    possible length) and carry the trunk prefix where the region requires it, and it must not
    touch a Latin letter, ``%`` or a currency sign. Numbers written with ``+`` (or the
    international prefix of a configured region, ``00``/``011``) are found from any country;
    national ones (``030 1234567``, ``(650) 253-0000``) only for the regions in
    ``phone_regions`` (default ``PHONE_REGIONS``: US, GB, DE, FR, IN; configure the user's
    own: each region costs time and admits its own national numbers). Stricter leniencies
    (``STRICT_GROUPING``, ``EXACT_GROUPING``) are not used: they drop real numbers written in
    an unusual grouping (``0171 234 56 78``), and a missed number is the worse mistake. Not
    taken for phone numbers: years, prices, counts, versions, dates (``2026-11-21``,
    ``21.11.2026``, ``11/21/2026``), times and timestamps, IP addresses, quantities in thousands
    (``8 045 311 447``), card layouts that fail Luhn, numbers of fewer than 7 digits, and
    digits inside another finding (a key, an IBAN, an address: that finding covers them).
    Bare digit runs that are valid numbers (``6502530000``) are redacted.
``ip``
    IPv4 and IPv6 (compressed, zoned ``fe80::1%eth0``, embedded IPv4), validated with the
    stdlib ``ipaddress``.

Design. Every detector is a compiled stdlib ``re`` pattern plus, where a pattern alone
cannot tell a secret from prose, a small check on the captured value (is it a plain word?
how many character classes? is it a placeholder like ``${API_KEY}``?). All candidates are
collected, parts that fall on an existing ``[REDACTED:...]`` placeholder are dropped (so
scrubbing is idempotent), and overlapping candidates are merged into one redaction that
takes the highest-precedence kind -- merging rather than dropping, so no fragment of a
secret is ever left behind. Patterns start at boundaries and have no nested unbounded
repetition, so run time is linear in the text: on a 2 KB message about 0.3 ms for prose,
~1 ms with a few secrets, ~2 ms when dense with them; 100 KB adversarial inputs < 0.3 s.
Phone numbers run last, in the text between the other findings, and cost the most: about
0.1 ms (0.3 ms on a busy machine) for each stretch of 7+ digits that is not a date, an
address or a card, per region tried (a stretch starting with ``+`` or longer than one number
is tried once). On 100 KB, 2 cores: curriculum prose 84 ms (80 ms without the number
detectors), a chat dense with secrets, cards, IBANs and phone numbers 177 ms (97 ms), a log
of dates and 8-10 digit ids 434 ms (41 ms); 32 KB of comma-separated 7-digit ids 1.5 s.
Beside the stdlib, ``phonenumbers`` and ``schwifty`` hold the numbering metadata; no global
state of scrub's own: deterministic and thread-safe. Offsets are ``str`` indices (code points).

Yelp's ``detect-secrets`` was evaluated and is not used: its ad-hoc ``scan_line`` reports
every word of ordinary English as a "High Entropy String" (the limit is only applied to
quoted strings in source files), it returns values rather than offsets (and some plugins
return only a capture group, e.g. ``ghp`` for a GitHub token or a JWT without its
signature), its keyword plugin does not fire on ``password: X`` outside YAML-like files nor
on prose, it has no Anthropic/Google/Hugging Face/OpenAI-project rules, it keeps its
configuration in process-global state, and a 2 KB scan takes 3-20 ms.

Bias: a redaction of harmless text costs a few tokens of training data; a missed secret is
a leak into model weights. Where a value is explicitly labelled the checks are lenient;
where a pattern would fire on prose (``the password is wrong``, ``Bearer bonds``,
``the secret is patience``) the value must look like a secret. Not covered: personal names,
postal addresses, national phone numbers of regions not configured, passwords that are a
single lower-case dictionary word in prose (``my password is fluffy``), and secrets split
across messages.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import phonenumbers
from phonenumbers import Leniency, PhoneNumberMatcher
from schwifty import IBAN
from schwifty.exceptions import InvalidCountryCode, SchwiftyException

__all__ = ["KINDS", "PHONE_REGIONS", "Redaction", "scrub"]

KINDS = (
    "private_key", "api_key", "token", "password", "url_credentials", "iban", "payment_card", "email", "phone", "ip",
)
# Where phone numbers written without "+" (national format) are looked for; see the docstring.
PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN")
_RANK = {kind: rank for rank, kind in enumerate(KINDS)}


@dataclass(frozen=True)
class Redaction:
    """One finding: ``text[start:end]`` of the original text is a secret of ``kind``."""

    kind: str  # one of KINDS
    start: int  # offsets in the ORIGINAL text
    end: int


def _placeholder(kind: str) -> str:
    """The text that replaces a finding of ``kind``."""
    return f"[REDACTED:{kind}]"


Detector = Callable[[str], Iterator[Redaction]]

# ---------------------------------------------------------------------------------------------
# value checks shared by the labelled detectors
# ---------------------------------------------------------------------------------------------

# A plain word or a hyphen/apostrophe compound of words ("Fluffy", "case-sensitive", "don't").
_WORDISH = re.compile(r"[A-Za-z][a-z]*(?:['’-][A-Za-z][a-z]*)*")
# References to a secret rather than the secret: ${API_KEY}, $TOKEN, %PASSWORD%, <your key>,
# os.environ[...], process.env.X, settings.SECRET_KEY, {{ token }}, ****, xxxx, ...
_PLACEHOLDER = re.compile(
    r"""(?ix)
    \$\{?[A-Za-z_][A-Za-z0-9_]*\}?
    | %[A-Za-z_][A-Za-z0-9_]*%
    | %\(?[A-Za-z_]*\)?s
    | <[^>]*>?
    | \{\{?[^}]*\}?\}?
    | (?:os\.)?(?:environ|getenv)\b.*
    | process\.env\b.*
    | [*•·x.…_-]+
    | (?:your|insert|enter|replace)[-_ ]?(?:[a-z0-9]+[-_ ]?){0,4}?(?:key|token|secret|password|passwd|pwd|here|value|id)
    | (?:change[-_ ]?me|placeholder|redacted|example|sample|dummy|none|null|nil|undefined|true|false)
    """
)
# Code that names a secret instead of holding it: an identifier without digits
# (SECRET_KEY, settings.API_TOKEN) or a call (get_token(), vault.read("x")).
_CODE_REFERENCE = re.compile(r"[A-Za-z_][A-Za-z_.]*|[A-Za-z_][\w.]*\(.*")
# The same, narrowed for passwords (hunter_two is a password): a dotted name or a call.
_PASSWORD_REFERENCE = re.compile(r"[A-Za-z_]+(?:\.[A-Za-z_]+)+|[A-Za-z_][\w.]*\(.*")
# Words that follow "password is"/"password:" in prose without being a password.
_STOPWORDS = frozenset(
    {
        "a", "an", "the", "this", "that", "these", "those", "it", "its", "is", "was", "be", "been", "being",
        "not", "no", "none", "nothing", "never", "yes", "ok", "okay", "my", "your", "his", "her", "their",
        "our", "what", "which", "who", "whatever", "something", "anything", "required", "optional", "needed",
        "necessary", "mandatory", "missing", "empty", "blank", "unknown", "same", "different", "wrong",
        "incorrect", "correct", "right", "invalid", "valid", "expired", "old", "new", "temporary", "temp",
        "weak", "strong", "secure", "insecure", "safe", "unsafe", "long", "short", "simple", "easy", "hard",
        "complex", "complicated", "good", "bad", "fine", "great", "terrible", "hidden", "visible", "encrypted",
        "hashed", "stored", "saved", "set", "changed", "reset", "sent", "shown", "displayed", "case", "too",
        "very", "still", "now", "just", "also", "only", "even", "already", "always", "usually", "in", "on",
        "at", "for", "to", "of", "from", "with", "by", "as", "about", "into", "onto", "via", "and", "or",
        "but", "so", "then", "if", "when", "where", "here", "there", "below", "above", "following", "attached",
        "protected", "leaked", "compromised", "forgotten", "lost", "e.g.", "i.e.", "etc", "n/a", "na", "tbd",
        "todo",
    }
)


def _classes(value: str) -> int:
    """How many of lower-case, upper-case, digit and other characters ``value`` mixes."""
    return (
        any(c.islower() for c in value)
        + any(c.isupper() for c in value)
        + any(c.isdigit() for c in value)
        + any(not c.isalnum() for c in value)
    )


def _alnum_classes(value: str) -> int:
    return any(c.islower() for c in value) + any(c.isupper() for c in value) + any(c.isdigit() for c in value)


def _is_placeholder(value: str) -> bool:
    return bool(_PLACEHOLDER.fullmatch(value)) or value.lower() in _STOPWORDS


@dataclass(frozen=True)
class _Seen:
    """A value found after a label, and how it was written."""

    value: str
    quoted: bool = False  # "x", 'x', `x`, “x”
    prose: bool = False  # after "is"/"was" rather than ":"/"="
    line_final: bool = False  # only punctuation follows it on its line
    literal: bool = False  # the label is config, not prose: JWT_SECRET=x, "password": x


def _token_ok(seen: _Seen) -> bool:
    """Does a value labelled token/secret/api key look like one?"""
    value = seen.value
    if len(value) < 8 or _is_placeholder(value):
        return False
    if seen.prose:  # "the secret is ..." -- only something no sentence would contain
        return not _WORDISH.fullmatch(value) and _alnum_classes(value) >= 2
    if seen.quoted or seen.literal:
        return True
    if _WORDISH.fullmatch(value) or _CODE_REFERENCE.fullmatch(value):
        return False
    return _classes(value) >= 2 or len(value) >= 20


def _password_ok(seen: _Seen) -> bool:
    """Does a value labelled password look like one (and not like the rest of a sentence)?"""
    value = seen.value
    if not value or _is_placeholder(value):
        return False
    if seen.quoted:
        return True
    if len(value) < 4 or _PASSWORD_REFERENCE.fullmatch(value):
        return False
    if not _WORDISH.fullmatch(value) or seen.literal:
        return True  # has a digit, a symbol or inner capitals: hunter2, P@ss, tr0ub4dor&3
    if "-" not in value and "'" not in value and (value[0].isupper() or len(value) >= 16):
        return True  # Fluffy, correcthorsebatterystaple
    return seen.line_final and not seen.prose  # "pw: hunter" as the last thing on its line


def _digits_ok(seen: _Seen) -> bool:
    """PINs and door codes: 3-12 of digits, '#' and '*', at least three of them digits."""
    return bool(re.fullmatch(r"[0-9#*]{3,12}", seen.value)) and sum(c.isdigit() for c in seen.value) >= 3


# ---------------------------------------------------------------------------------------------
# generic helpers
# ---------------------------------------------------------------------------------------------


def _simple(pattern: str, kind: str, group: int | str = 0, flags: int = 0, guard: str = "") -> Detector:
    """A detector that reports ``group`` of every match of ``pattern``."""
    regex = re.compile(pattern, flags)

    def detect(text: str) -> Iterator[Redaction]:
        if guard and guard not in text:
            return
        for m in regex.finditer(text):
            if m.start(group) < m.end(group):
                yield Redaction(kind, m.start(group), m.end(group))

    return detect


_TRAILING_PUNCT = ".,:;)]}'’"
# Text just before an offset that puts it inside the authority of a URL (scheme://...).
_IN_URL_AUTHORITY = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#]*\Z")


# Where an unquoted value ends before its last character: a separator followed by the next
# key=value pair (query strings, DSNs: "password=x&user=y", "Password=x;Database=y") or a
# comma/semicolon that ends a clause ("password: hunter2, then log in").
_BARE_CUT = re.compile(r"[;,&](?=[ \t]*[A-Za-z_][\w.-]{0,40}=)|[;,](?=\s|\Z)")


def _bare_span(text: str, start: int, end: int) -> tuple[int, int]:
    """Cut an unquoted value at the next key=value pair and trim trailing sentence punctuation."""
    cut = _BARE_CUT.search(text, start, end)
    if cut is not None and cut.start() > start:
        end = cut.start()
    return _trim_trailing(text, start, end)


def _trim_trailing(text: str, start: int, end: int) -> tuple[int, int]:
    while end > start + 1 and text[end - 1] in _TRAILING_PUNCT:
        end -= 1
    return start, end


_PLACEHOLDER_BEFORE = re.compile(r"\[REDACTED:[a-z_]{1,20}\]\Z")


def _touches_placeholder(text: str, start: int, end: int) -> bool:
    """Is ``text[start:end]`` glued to an earlier ``[REDACTED:...]`` marker?

    The number and address detectors judge a candidate by its neighbours (``abc4111...`` is
    no card, ``tel+44...`` no phone number, ``64:ff9b::sk-...`` no address). Scrubbing turns
    a neighbour into ``]`` or ``[``, so a candidate glued to a marker was judged on its
    original neighbour already: skipping it keeps scrubbing idempotent.
    """
    if text.startswith("[REDACTED:", end):
        return True
    return text.endswith("]", 0, start) and _PLACEHOLDER_BEFORE.search(text, max(0, start - 32), start) is not None


_REST_OF_LINE_IS_PUNCTUATION = re.compile(r"[ \t\r.,;:!?'\"`)\]}>]*(?:\n|\Z)")


def _line_final(text: str, end: int) -> bool:
    """Is only punctuation/quotes/brackets left on the line after ``end``?"""
    return _REST_OF_LINE_IS_PUNCTUATION.match(text, end) is not None


# ---------------------------------------------------------------------------------------------
# labelled values: LABEL SEP VALUE
# ---------------------------------------------------------------------------------------------

# A label core starts a word or an identifier part (DB_PASSWORD, x-api-key, userPassword:
# after a non-alphanumeric, or at a lower-to-upper camelCase step) and may carry a suffix
# (passwordHash, api_key_2). The core itself is case-insensitive.
_PREFIX = r"(?:(?<![A-Za-z0-9])|(?<=[a-z0-9])(?=[A-Z]))"
_SUFFIX = r"(?:[_-]?(?i:hash|digest|confirm(?:ation)?|value|str|string)|[_-][0-9]|(?<=[a-z])(?:Id|ID|Value))?"
_SEP_ASSIGN = r"""["'`]?[ \t]*(?::=|=>|==|[:=])[ \t]*"""
_SEP_PROSE = (
    r"""(?:[ \t]+(?:is|was)[ \t]*:?|['’]s)[ \t]+"""
    r"""(?:(?:now|still|just|currently|actually|set[ \t]+to|changed[ \t]+to)[ \t]+)?"""
)
_QUALIFIER = r"""(?:[ \t]+(?:for|to|of|on|at|in)[ \t]+(?:[^\s:="']+[ \t]+){0,3}?[^\s:="']+)?"""
_VALUE = (
    r"""(?:"(?P<v1>[^"\n]{1,256})"|'(?P<v2>[^'\n]{1,256})'|`(?P<v3>[^`\n]{1,256})`"""
    r"""|“(?P<v4>[^”\n]{1,256})”|‘(?P<v5>[^’\n]{1,256})’"""
    r"""|(?P<bare>[^\s"'`;,&<>()\[\]{}][^\s"`<>]{0,1023}))"""
)
_QUOTED_GROUPS = ("v1", "v2", "v3", "v4", "v5")

ValueCheck = Callable[[_Seen], bool]


@dataclass(frozen=True)
class _Labelled:
    kind: str
    regex: re.Pattern[str]
    check: ValueCheck
    words: tuple[str, ...]  # cheap pre-check: one of these occurs (lower-cased) in the label

    def __call__(self, text: str) -> Iterator[Redaction]:
        lowered = text.lower()
        if not any(w in lowered for w in self.words):
            return
        has_url = "://" in text
        for m in self.regex.finditer(text):
            if has_url and _IN_URL_AUTHORITY.search(text, max(0, m.start() - 300), m.start()):
                continue  # https://x-access-token:...@host is a URL's userinfo
            prose = m.groupdict().get("prose") is not None
            quoted = next((g for g in _QUOTED_GROUPS if m.group(g) is not None), None)
            if quoted is not None:
                start, end = m.span(quoted)
            else:
                start, end = _bare_span(text, *m.span("bare"))
            seen = _Seen(
                text[start:end],
                quoted=quoted is not None,
                prose=prose,
                line_final=_line_final(text, m.end()),
                literal=_literal_label(text, m.start("label"), m.end("label")),
            )
            if self.check(seen):
                yield Redaction(self.kind, start, end)


_IDENTIFIER_TAIL = re.compile(r"[A-Za-z0-9_-]{0,80}\Z")


def _literal_label(text: str, start: int, end: int) -> bool:
    """Is the label written as config (JWT_SECRET=, DB_PASSWORD:, "password":) rather than prose?"""
    tail = _IDENTIFIER_TAIL.search(text, max(0, start - 80), start)
    begin = tail.start() if tail else start
    identifier = text[begin:end]
    quoted_label = begin > 0 and text[begin - 1] in "\"'`"
    return quoted_label or (identifier.isupper() and any(c.isalpha() for c in identifier))


def _labelled(
    kind: str, core: str, words: tuple[str, ...], check: ValueCheck, *, prose: bool, qualifier: bool = False
) -> _Labelled:
    """LABEL [qualifier] SEP VALUE; SEP is ``:``/``=``/``=>`` or, with ``prose``, also ``is``/``was``."""
    label = rf"{_PREFIX}(?P<label>(?i:{core}){_SUFFIX})"
    qual = _QUALIFIER if qualifier else ""
    sep = rf"(?:{_SEP_ASSIGN}|(?P<prose>{_SEP_PROSE}))" if prose else _SEP_ASSIGN
    return _Labelled(kind, re.compile(rf"{label}{qual}{sep}{_VALUE}"), check, words)


_PASSWORD_CORE = r"pass(?:word|wd|phrase|code)|pwd|pw"
_API_KEY_CORE = (
    r"api[ _-]?(?:key|secret|token)|apikey|app[ _-]?(?:key|secret)|client[ _-]?secret"
    r"|consumer[ _-]?(?:key|secret)|secret[ _-]?(?:access[ _-]?)?key|access[ _-]?key(?:[ _-]?id)?"
    r"|subscription[ _-]?key|license[ _-]?key|master[ _-]?key|encryption[ _-]?key|signing[ _-]?key"
)
_TOKEN_CORE = r"(?:access|refresh|auth|id|session|bearer|bot|csrf|xsrf|oauth)?[ _-]?token|secret|session[ _-]?id"


_LABELLED: tuple[_Labelled, ...] = (
    _labelled("password", _PASSWORD_CORE, ("pass", "pw"), _password_ok, prose=True, qualifier=True),
    _labelled("password", r"pass", ("pass",), _password_ok, prose=False, qualifier=True),
    _labelled(
        "password",
        r"(?:wi-?fi|wlan|wpa2?|network|router)[ _-]?(?:key|code)",
        ("key", "code"),
        _password_ok,
        prose=True,
    ),
    _labelled("password", r"pin(?:[ _-]?(?:code|number))?", ("pin",), _digits_ok, prose=True, qualifier=True),
    _labelled(
        "password",
        r"(?:door|gate|alarm|lock|garage|safe|entry|keypad|lockbox|building|access)[ _-]?code",
        ("code",),
        _digits_ok,
        prose=True,
        qualifier=True,
    ),
    _labelled("api_key", _API_KEY_CORE, ("key", "secret", "api"), _token_ok, prose=True),
    _labelled("token", _TOKEN_CORE, ("token", "secret", "session"), _token_ok, prose=True),
    _labelled("private_key", r"private[ _-]?key", ("private",), _token_ok, prose=True),
)

# --password X, --token=X, --api-key X (command lines)
_CLI_FLAG = re.compile(
    r"(?<![\w-])--(?P<flag>password|passwd|pass|pwd|token|api-key|apikey|secret|client-secret)"
    r"(?:=|[ \t]+)['\"]?(?P<v>[^\s'\"-][^\s'\"]{0,1023})"
)


# curl -u user:pass / --user user:pass (not docker's -u 1000:1000), mysql -pSECRET
_CLI_USER = re.compile(r"(?<![\w-])(?:-u|--user)[ \t=]+['\"]?[^\s:'\"]{1,256}:(?P<v>[^\s'\"]{1,1024})")
_MYSQL_P = re.compile(r"\b(?:mysql|mysqldump|mysqladmin|mariadb)\b[^\n]{0,512}?[ \t]-p(?P<v>[^\s'\"-][^\s'\"]{0,1023})")


def _cli_flags(text: str) -> Iterator[Redaction]:
    if "-" not in text:
        return
    lowered = text.lower()
    regexes = [_CLI_USER] if "-u" in text or "--user" in text else []
    regexes += [_MYSQL_P] if "mysql" in lowered or "mariadb" in lowered else []
    for regex in regexes:
        for m in regex.finditer(text):
            if not m.group("v").isdigit() and not _is_placeholder(m.group("v")):
                yield Redaction("password", *m.span("v"))
    for m in _CLI_FLAG.finditer(text):
        flag = m.group("flag")
        kind = "password" if flag.startswith("pass") or flag == "pwd" else "token"
        if flag in ("api-key", "apikey"):
            kind = "api_key"
        value = m.group("v")
        if not _is_placeholder(value) and (kind == "password" or len(value) >= 8):
            yield Redaction(kind, m.start("v"), m.end("v"))


# "use hunter2 as the password", "try 'x y' as your password"
_REVERSED_PASSWORD = re.compile(
    r"(?i:\b(?:use|try|using|set|with|enter|type)[ \t]+)"
    r"""(?:"(?P<v1>[^"\n]{1,256})"|'(?P<v2>[^'\n]{1,256})'|“(?P<v4>[^”\n]{1,256})”|(?P<bare>[^\s"'`]{4,256}))"""
    r"(?i:[ \t]+as[ \t]+(?:the|my|your|a|our|its|their)?[ \t]*(?:new[ \t]+)?(?:wi-?fi[ \t]+)?pass(?:word|phrase|code))"
)


def _reversed_password(text: str) -> Iterator[Redaction]:
    if "as" not in text:
        return
    for m in _REVERSED_PASSWORD.finditer(text):
        group = next((g for g in ("v1", "v2", "v4") if m.group(g) is not None), None)
        if group is not None:
            yield Redaction("password", *m.span(group))
        elif _password_ok(_Seen(m.group("bare"), prose=True)):
            yield Redaction("password", *m.span("bare"))


# ---------------------------------------------------------------------------------------------
# private keys
# ---------------------------------------------------------------------------------------------

_PEM_BEGIN = re.compile(r"-----BEGIN[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----")
_PEM_END = re.compile(r"-----END[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----")
# Without an END line: the body lines that follow (base64, or Proc-Type/DEK-Info headers),
# separated by newlines, "\n" escapes or spaces.
_PEM_BODY = re.compile(
    r"(?:(?:\r?\n|\\r|\\n|[ \t])+"
    r"(?:[A-Za-z0-9+/]{16,}={0,2}|[A-Za-z0-9+/]{2,}={1,2}|(?:Proc-Type|DEK-Info|Comment):[^\n\\]{0,200})"
    r"(?![^\s\\]))*"
)


def _private_keys(text: str) -> Iterator[Redaction]:
    if "PRIVATE KEY" not in text:
        return
    pos = 0
    end = _PEM_END.search(text)
    while (begin := _PEM_BEGIN.search(text, pos)) is not None:
        if end is not None and end.start() < begin.end():
            end = _PEM_END.search(text, begin.end())
        nxt = _PEM_BEGIN.search(text, begin.end(), end.start() if end is not None else len(text))
        if end is not None and nxt is None:
            stop = end.end()
        else:
            body = _PEM_BODY.match(text, begin.end())
            stop = body.end() if body and body.end() > begin.end() else begin.end()
            if stop == begin.end():  # a header on its own gives nothing away
                pos = begin.end()
                continue
        yield Redaction("private_key", begin.start(), stop)
        pos = stop


# ---------------------------------------------------------------------------------------------
# provider keys and tokens with a recognisable shape
# ---------------------------------------------------------------------------------------------

_B = r"(?<![A-Za-z0-9])"  # left boundary
_PROVIDER_KEYS = (
    r"sk-[A-Za-z0-9_-]{20,}",  # OpenAI (sk-, sk-proj-, sk-svcacct-) and Anthropic (sk-ant-)
    r"(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}(?![A-Za-z0-9])",  # AWS access key id
    r"(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}",  # GitHub
    r"github_pat_[A-Za-z0-9_]{22,}",
    r"glpat-[A-Za-z0-9_-]{20,}",  # GitLab
    r"xox[abeoprs]-[A-Za-z0-9-]{10,}",  # Slack
    r"(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{10,}",  # Stripe
    r"AIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])",  # Google
    r"hf_[A-Za-z0-9]{30,}",  # Hugging Face
    r"npm_[A-Za-z0-9]{36}(?![A-Za-z0-9])",  # npm
    r"pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}",  # PyPI
    r"SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])",  # SendGrid
)
_provider_keys = _simple(_B + "(?:" + "|".join(_PROVIDER_KEYS) + ")", "api_key")

# AWS secret access keys are 40 base64 characters with no prefix: only when labelled.
_aws_secret = _simple(
    r"(?i:(?<![A-Za-z0-9])(?:aws[ _-]?)?secret[ _-]?(?:access[ _-]?)?key)[\"']?[ \t]*(?::=|=>|[:=]|[ \t]is)[ \t]*[\"']?"
    r"(?P<v>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])",
    "api_key",
    "v",
)

_jwt = _simple(
    r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*",
    "token",
    guard="eyJ",
)
_webhooks = _simple(
    r"(?:hooks\.slack\.com/(?:services|workflows|triggers)/|discord(?:app)?\.com/api/webhooks/)"
    r"(?P<v>[A-Za-z0-9/_-]{8,256})",
    "token",
    "v",
)

_AUTH_SCHEMES = r"bearer|basic|token|bot|digest|negotiate|ntlm|apikey|sso-key|key|jwt|hmac|aws4-hmac-sha256"
_AUTHORIZATION = re.compile(
    r"(?i:(?<![A-Za-z0-9-])(?:proxy-)?authori[sz]ation)[\"']?[ \t]*[:=][ \t]*[\"']?"
    rf"(?:(?P<scheme>(?i:{_AUTH_SCHEMES}))[ \t]+)?(?P<v>[A-Za-z0-9._~+/=:,-]{{8,4096}})"
)
_BEARER = re.compile(r"(?<![A-Za-z0-9])(?i:bearer)[ \t]+(?P<v>[A-Za-z0-9._~+/=-]{12,4096})")
_COOKIE = re.compile(r"(?i:(?<![A-Za-z0-9-])(?:set-)?cookie)[ \t]*:[ \t]*(?P<v>[^\n]{0,4096}=[^\n]{0,4096})")


def _auth_headers(text: str) -> Iterator[Redaction]:
    lowered = text.lower()
    if "authori" in lowered:
        for m in _AUTHORIZATION.finditer(text):
            start, end = _bare_span(text, *m.span("v"))
            value = text[start:end]
            bare_word = _WORDISH.fullmatch(value) or re.fullmatch(_AUTH_SCHEMES, value, re.IGNORECASE)
            if m.group("scheme") is None and bare_word:
                continue  # "Authorization: approved", "Authorization: Negotiate"
            if not _is_placeholder(value):
                yield Redaction("token", start, end)
    if "bearer" in lowered:
        for m in _BEARER.finditer(text):
            start, end = _bare_span(text, *m.span("v"))
            value = text[start:end]
            strong = not _WORDISH.fullmatch(value) and (_alnum_classes(value) >= 2 or len(value) >= 24)
            if strong and not _is_placeholder(value) and not _CODE_REFERENCE.fullmatch(value):
                yield Redaction("token", start, end)
    if "cookie" in lowered:
        for m in _COOKIE.finditer(text):
            yield Redaction("token", *_trim_trailing(text, *m.span("v")))  # all of the pairs


# Unlabelled long random strings (unknown providers, pasted session ids).
_HIGH_ENTROPY = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{32,}={0,2}(?![A-Za-z0-9+/=_-])")
_ENTROPY_LIMIT = 4.2  # bits/char; random base62 of 32+ chars is ~4.6+, camelCase English ~3.9


def _shannon(value: str) -> float:
    counts: dict[str, int] = {}
    for c in value:
        counts[c] = counts.get(c, 0) + 1
    n = len(value)
    return -sum(k / n * math.log2(k / n) for k in counts.values())


_CHUNKS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])")


def _identifier_like(value: str) -> bool:
    """camelCase/PascalCase/SNAKE names split into word-length chunks; random strings do not."""
    chunks = _CHUNKS.findall(value)
    return bool(chunks) and sum(map(len, chunks)) / len(chunks) >= 3.5


def _high_entropy(text: str) -> Iterator[Redaction]:
    for m in _HIGH_ENTROPY.finditer(text):
        value = m.group()
        if _alnum_classes(value) < 3 or _shannon(value) < _ENTROPY_LIMIT or _identifier_like(value):
            continue
        if "/" in value and any(_WORDISH.fullmatch(p) and len(p) >= 3 for p in value.split("/")):
            continue  # a path such as /Users/Me/Projects/app2/...
        yield Redaction("token", m.start(), m.end())


# ---------------------------------------------------------------------------------------------
# URL credentials
# ---------------------------------------------------------------------------------------------

_URL_USERINFO = re.compile(
    r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,30}://"
    r"(?P<ui>[^\s:/?#@\"'<>]{0,256}:[^\s/?#\"'<>]{1,256}|[^\s:/?#@\"'<>]{8,256})"
    r"@(?=[^\s/?#@\"'<>]{1,256})"
)


def _url_credentials(text: str) -> Iterator[Redaction]:
    if "://" not in text:
        return
    for m in _URL_USERINFO.finditer(text):
        userinfo = m.group("ui")
        if ":" in userinfo or _token_ok(_Seen(userinfo)):
            yield Redaction("url_credentials", *m.span("ui"))


# ---------------------------------------------------------------------------------------------
# e-mail addresses
# ---------------------------------------------------------------------------------------------

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_EMAIL = re.compile(
    rf"(?<![{_ATEXT}.])(?P<local>[{_ATEXT}]{{1,64}}(?:\.[{_ATEXT}]{{1,64}}){{0,8}})@"
    r"(?P<domain>(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,126}"
    r"(?:[A-Za-z]{2,63}|[Xx][Nn]--[A-Za-z0-9-]{1,59}))(?![A-Za-z0-9-]|\.[A-Za-z0-9-])"
)
_RETINA_ASSET = re.compile(r"\d+(?:\.\d+)?x\.[A-Za-z]{2,5}")  # icon@2x.png


def _emails(text: str) -> Iterator[Redaction]:
    if "@" not in text:
        return
    for m in _EMAIL.finditer(text):
        start, end = _trim_local_part(text, m.start(), m.end("local")), m.end()
        if _IN_URL_AUTHORITY.search(text, max(0, start - 300), start):
            continue  # scheme://user@host: a URL, handled by _url_credentials
        if _RETINA_ASSET.fullmatch(m.group("domain")):
            continue
        if text.startswith(":", end) and end + 1 < len(text) and not text[end + 1].isspace():
            continue  # git@github.com:owner/repo.git
        if _touches_placeholder(text, start, end) or text.startswith(".[REDACTED:", end):
            continue  # judged on the first pass by what the marker replaced (a@b.co.COMsk-...)
        yield Redaction("email", start, end)


def _trim_local_part(text: str, start: int, at: int) -> int:
    """Leave a ``key=`` or an opening quote before the address outside the redaction."""
    local = text[start:at]
    cut = local.rfind("=") + 1
    if 0 < cut < len(local):
        start += cut
        local = local[cut:]
    stripped = len(local) - len(local.lstrip("'`{|/"))
    return start + stripped if stripped < len(local) else start


# ---------------------------------------------------------------------------------------------
# IP addresses
# ---------------------------------------------------------------------------------------------

_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:.%])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{0,4})"
    r"(?:%[A-Za-z0-9_.-]{1,32})?(?![\w:%]|\.\d)"
)
# A dotted quad after these words is a version or a section number, not an address.
_NOT_AN_ADDRESS_BEFORE = re.compile(
    r"(?i:\b(?:version|ver|release|rel|build|v|section|chapter|clause|step|figure|fig|table|item|rule)\.?[ \t]*"
    r"|\b(?:no|nr)\.[ \t]*|[=<>~!]=[ \t]*|[§#][ \t]*)\Z"
)


def _ipv4(text: str) -> Iterator[Redaction]:
    if "." not in text:
        return
    for m in _IPV4.finditer(text):
        if _NOT_AN_ADDRESS_BEFORE.search(text, max(0, m.start() - 16), m.start()):
            continue
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        if not _touches_placeholder(text, m.start(), m.end()):
            yield Redaction("ip", m.start(), m.end())


def _ipv6(text: str) -> Iterator[Redaction]:
    if "::" not in text and text.count(":") < 7:
        return
    for m in _IPV6.finditer(text):
        candidate = m.group()
        if candidate == "::" or not _plausible_ipv6(candidate):
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        if not _touches_placeholder(text, m.start(), m.end()):
            yield Redaction("ip", m.start(), m.end())


def _plausible_ipv6(candidate: str) -> bool:
    """Reject short compressed forms that are more likely code or scores than hosts.

    ``a::b``, ``::add``, ``3::1``, ``10::20`` parse as IPv6 but nobody's host is written so;
    ``::1``, ``fe80::1``, ``2001:db8::1`` and ``ffff::`` are kept.
    """
    address = candidate.split("%", 1)[0]
    if address == "::1":
        return True
    groups = [g for g in address.split(":") if g]
    if len(groups) >= 3:
        return True
    if not any(c.isdigit() for c in address):
        return all(len(g) == 4 for g in groups)
    return any(len(g) >= 3 for g in groups)


# ---------------------------------------------------------------------------------------------
# numbers: payment cards, IBANs, phone numbers
# ---------------------------------------------------------------------------------------------

_DIGITS = re.compile(r"\d+")
_GLUED_AFTER = re.compile(r"\w|[.,]\d")  # a number that runs on into a word or a fraction


def _luhn(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_iin_ok(digits: str) -> bool:
    """Rule out only the major-industry ranges that hold no payment cards at all.

    MII 0 has none; MII 1 only UATP (15 digits), which keeps out millisecond timestamps and
    snowflake ids; MII 2 only Mir 2200-2204 and Mastercard 2221-2720, which keeps out runs of
    years (2019 2020 2021 2022). 3-9 stay whole: national networks there (RuPay 81/82, Troy
    9792, Humo 9860, ...) keep appearing, and a stale table of issuer prefixes leaks silently.
    """
    if digits[0] == "0":
        return False
    if digits[0] == "1":
        return len(digits) == 15
    if digits[0] == "2":
        prefix = int(digits[:4])
        return 2200 <= prefix <= 2204 or 2221 <= prefix <= 2720
    return True


def _card_ok(digits: str) -> bool:
    return 13 <= len(digits) <= 19 and _card_iin_ok(digits) and _luhn(digits)


# Digit groups joined by single spaces or dashes, not inside a word, a "+" phone number or a
# decimal fraction (0.41111111111111116). The pattern opens with a digit so that the engine
# skips ahead to one (5x faster on prose); what follows the run is checked in code, as a
# lookahead here would make the engine retry from every group.
_CARD_RUN = re.compile(r"\d(?<![\w+]\d)(?<!\d[.,]\d)\d*(?:[ -]\d+)*")


def _cards(text: str) -> Iterator[Redaction]:
    for run in _CARD_RUN.finditer(text):
        if run.end() - run.start() < 13:
            continue
        groups = [m.span() for m in _DIGITS.finditer(text, run.start(), run.end())]
        if _GLUED_AFTER.match(text, run.end()):
            groups.pop()  # 4111111111111111abc is part of a longer token
        i = 0
        while i < len(groups):
            last = _card_end(text, groups, i)
            if last is None or _in_iban(text, groups[i][0]):
                i += 1
                continue
            start, end = groups[i][0], groups[last][1]
            if not _touches_placeholder(text, start, end):
                yield Redaction("payment_card", start, end)
            i = last + 1


def _card_end(text: str, groups: list[tuple[int, int]], i: int) -> int | None:
    """The last group of the longest card number that starts at group ``i``, if any.

    A card is one block of 13-19 digits, or groups written as cards print them: a first group
    of four, inner groups of 3-6, a last group of 1-6 (4-4-4-4, 4-6-5, 4-6-4, 4-4-4-4-3), all
    joined by the same separator. The longest that passes Luhn wins, so a card followed by its
    CVV (4111 1111 1111 1111 123) is found; the price is that a 19-digit 4-4-4-4-3 run that
    fails Luhn loses its first 16 digits when those pass (1 in 10).
    """
    start, end = groups[i]
    if end - start >= 13:
        return i if _card_ok(text[start:end]) else None
    if end - start != 4 or i + 1 == len(groups):
        return None
    separator = text[end]
    digits = text[start:end]
    best = None
    for j in range(i + 1, len(groups)):
        g_start, g_end = groups[j]
        if text[groups[j - 1][1]] != separator or g_end - g_start > 6:
            break
        digits += text[g_start:g_end]
        if len(digits) > 19:
            break
        if _card_ok(digits):
            best = j
        if g_end - g_start < 3:
            break  # a short group can only end a card
    return best


# The start of an IBAN written in groups of four, up to a digit group: GB02 AAAA |3000 ...
_IBAN_HEAD = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?: [A-Za-z0-9]{4}){0,7} \Z")


def _in_iban(text: str, start: int, lo: int = 0) -> bool:
    """Does the digit group at ``start`` continue an IBAN-shaped token that is no valid IBAN?

    Its digits are an account number that failed mod-97: no card and no phone number either.
    (Digits after a valid IBAN are judged on their own, as after its marker on a second pass.)
    """
    head = _IBAN_HEAD.search(text, max(lo, start - 40), start)
    return head is not None and _iban_end(text, head.start(), start - 1) is None


# Country code, check digits, then 11-30 letters/digits, single spaces allowed anywhere
# ("DE89 3704 0044 0532 0130 00", "DE89370400440532013000", "GB82 WEST 1234 5698 7654 32").
# The match may run on into the next words; _iban_end cuts it to a valid IBAN.
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]){11,30}")


def _ibans(text: str) -> Iterator[Redaction]:
    pos = 0
    while (m := _IBAN.search(text, pos)) is not None:
        end = _iban_end(text, m.start(), m.end())
        if end is None:
            pos = m.start() + 1
            continue
        if not _touches_placeholder(text, m.start(), end):
            yield Redaction("iban", m.start(), end)
        pos = end


def _iban_end(text: str, start: int, stop: int) -> int | None:
    """Where the longest valid IBAN in ``text[start:stop]`` ends (at a space or a word end), if any.

    Valid means what ``schwifty`` checks: a known country, that country's length and BBAN
    format, and the ISO 7064 mod-97-10 check digits.
    """
    ends = [i for i in range(start, stop) if text[i] == " "] + [stop]
    for end in reversed(ends):
        if end < len(text) and text[end].isalnum():
            continue  # the IBAN would end inside a word
        compact = text[start:end].replace(" ", "")
        if not 15 <= len(compact) <= 34:
            continue
        try:
            IBAN(compact)
        except InvalidCountryCode:
            return None
        except SchwiftyException:
            continue
        return end
    return None


# Phone numbers. Google's libphonenumber (the ``phonenumbers`` port) finds and validates them;
# scrub only narrows where it looks, because its matcher costs 0.1-0.5 ms per candidate and
# region. PhoneNumberMatcher judges a candidate by the candidate and the characters right next
# to it, so it is run on each stretch of the characters a phone number is written with (digits,
# separators, brackets, "+", "x") that holds at least _PHONE_MIN_DIGITS digits, with a few
# characters of context: the result is the matcher's own on the whole text.
_PHONE_RUN = re.compile(
    r"[+＋(\[（［\d][\d \u00a0\u00ad\u200b\u2060\u3000+＋()\[\]（）［］.\-x‐-―−ー－-／~⁓∼～]*"
)
_PHONE_MIN_DIGITS = 7  # the shortest numbers in use: +683 4002 (Niue), 030 1234 (a Berlin line)
_PHONE_ONE_NUMBER = 32  # characters: "+44 (0) 20 7946 0018 ext 1234" fits
# A few characters after the stretch: the matcher reads the one right after a candidate, and
# ":MM" after a "YYYY-MM-DD HH" candidate to tell a timestamp.
_PHONE_CONTEXT_AFTER = 3
# Stretches that are no phone number: dates (2026-11-21, 2026-11-21 14 of a timestamp,
# 21.11.2026, 11/21/2026), dotted quads (IPv4 addresses, versions such as 10.4.122.7),
# quantities in thousands (8 045 311 447, 12.345.678: libphonenumber takes about 1 in 50 of
# them for a US or Indian number) and card layouts (4-4-4-4, 4-6-5) that failed the Luhn check
# (4900 2010 0000 0008 is a mistyped card). The price: a national number written 3-3-3 without
# "+" or a leading 0 (Spanish 612 345 678) is taken for a quantity where its region is configured.
_NOT_A_PHONE = re.compile(
    r"(?:19|20)\d\d([-./])[01]?\d\1[0-3]?\d(?:[ T][0-2]\d)?"
    r"|[0-3]?\d([-./])[0-3]?\d\2(?:19|20)\d\d"
    r"|\d{1,3}(?:\.\d{1,3}){3}"
    r"|[1-9]\d{0,2}([ \u00a0.])\d{3}(?:\3\d{3})+"
    r"|\d{4}([ -])\d{4}\4\d{4}\4\d{1,4}(?:\4\d{1,3})?|\d{4}([ -])\d{6}\5\d{4,5}"  # card layouts
)


def _phones(text: str, regions: tuple[str, ...], taken: list[Redaction]) -> Iterator[Redaction]:
    """Phone numbers in the text between ``taken`` (the other findings, sorted).

    The matcher never reads into another finding, so it sees the same text as on a second
    pass, where that finding is a ``[REDACTED:...]`` marker.
    """
    bounds = [0, *itertools.chain.from_iterable((r.start, r.end) for r in taken), len(text)]
    for gap_start, gap_end in zip(bounds[::2], bounds[1::2]):
        for run in _PHONE_RUN.finditer(text, gap_start, gap_end):
            yield from _phones_in(text, run.start(), run.end(), regions, gap_start, gap_end)


def _phones_in(text: str, start: int, end: int, regions: tuple[str, ...], lo: int, hi: int) -> Iterator[Redaction]:
    """Phone numbers in the stretch ``text[start:end]``; the matcher may read ``text[lo:hi]`` around it.

    Where numbers are found, the pieces between them are read again, as a second pass reads
    them with each number a marker: the matcher reads 02.01.2000 60 2000-01-01 as one
    candidate, 60 2000-01-01 alone as another.
    """
    found = _merge(_phones_once(text, start, end, regions, lo, hi))
    yield from found
    bounds = [start, *itertools.chain.from_iterable((r.start, r.end) for r in found), end]
    for piece_start, piece_end in zip(bounds[::2], bounds[1::2]) if found else ():
        for run in _PHONE_RUN.finditer(text, piece_start, piece_end):
            yield from _phones_in(text, run.start(), run.end(), regions, piece_start, piece_end)


def _phones_once(text: str, start: int, end: int, regions: tuple[str, ...], lo: int, hi: int) -> Iterator[Redaction]:
    run = text[start:end]
    if end - start < _PHONE_MIN_DIGITS or _count_digits(run) < _PHONE_MIN_DIGITS:
        return
    first, last = _digit_span(text, start, end)
    if first == start and (_NOT_A_PHONE.fullmatch(text, first, last) or _in_iban(text, start, lo)):
        return  # (+61 412 340 000 is no quantity)
    lo = max(lo, start - 1)
    window = text[lo : min(hi, end + _PHONE_CONTEXT_AFTER)]
    # "+" numbers read the same whatever the region, and a long stretch is a list or a table
    # (1.1.1.1..., 20 numbers in a row): one region each, which bounds the matcher's time.
    scope = regions[:1] if run[0] in "+＋" or end - start > _PHONE_ONE_NUMBER else regions
    seen: set[int] = set()
    left = _count_digits(run)  # digits not yet in a number: when none, stop
    for region in scope or (None,):  # without a region only "+" numbers parse
        for m in PhoneNumberMatcher(window, region, leniency=Leniency.VALID):
            m_start, m_end = lo + m.start, lo + m.end
            if not start <= m_start < end or m_start in seen:
                continue  # it starts in the context, or an earlier region found it
            seen.add(m_start)
            digits = _count_digits(m.raw_string)
            left -= digits
            if digits < _PHONE_MIN_DIGITS or _touches_placeholder(text, m_start, m_end):
                continue
            if text[m_start].isdigit() and _NOT_A_PHONE.fullmatch(text, *_digit_span(text, m_start, m_end)):
                continue  # a date inside a longer stretch: 02.01.2000 is a number in Essen
            yield Redaction("phone", m_start, m_end)
        if left <= 0:
            break


def _digit_span(text: str, start: int, end: int) -> tuple[int, int]:
    """``text[start:end]`` without its leading and trailing non-digits."""
    while not text[start].isdigit():
        start += 1
    while not text[end - 1].isdigit():
        end -= 1
    return start, end


def _count_digits(value: str) -> int:
    return sum(c.isdigit() for c in value)


# ---------------------------------------------------------------------------------------------
# assembling the findings
# ---------------------------------------------------------------------------------------------

_DETECTORS: tuple[Detector, ...] = (
    _private_keys,
    _provider_keys,
    _aws_secret,
    _jwt,
    _webhooks,
    _auth_headers,
    _high_entropy,
    *_LABELLED,
    _cli_flags,
    _reversed_password,
    _url_credentials,
    _emails,
    _ipv4,
    _ipv6,
    _cards,
    _ibans,
)

_PLACEHOLDER_RE = re.compile(r"\[REDACTED:(?:" + "|".join(KINDS) + r")\]")


def _outside_placeholders(text: str, found: Iterable[Redaction]) -> Iterator[Redaction]:
    """Cut earlier redaction markers out of the findings, so that scrubbing twice is a no-op."""
    if "[REDACTED:" not in text:
        yield from found
        return
    marks = [m.span() for m in _PLACEHOLDER_RE.finditer(text)]
    for r in found:
        start = r.start
        for m_start, m_end in marks:
            if m_end <= start or m_start >= r.end:
                continue
            if m_start > start:
                yield from _if_substantive(text, Redaction(r.kind, start, m_start))
            start = max(start, m_end)
        if start < r.end:
            yield from _if_substantive(text, Redaction(r.kind, start, r.end))


def _if_substantive(text: str, r: Redaction) -> Iterator[Redaction]:
    if any(c.isalnum() for c in text[r.start : r.end]):
        yield r


def _merge(found: Iterable[Redaction]) -> list[Redaction]:
    """Merge overlapping findings into one; the merged finding takes the highest-precedence kind."""
    merged: list[Redaction] = []
    for r in sorted(found, key=lambda r: (r.start, -r.end)):
        if merged and r.start < merged[-1].end:
            last = merged[-1]
            kind = min(last.kind, r.kind, key=_RANK.__getitem__)
            merged[-1] = Redaction(kind, last.start, max(last.end, r.end))
        else:
            merged.append(r)
    return merged


def _find(text: str, phone_regions: tuple[str, ...]) -> list[Redaction]:
    """The findings in ``text``: sorted by offset, non-overlapping."""
    found = [r for detect in _DETECTORS for r in detect(text)]
    found += _phones(text, phone_regions, _merge(found))  # after the rest: it leaves their numbers alone
    return _merge(_outside_placeholders(text, found))


def _render(text: str, findings: Iterable[Redaction]) -> str:
    """``text`` with each of ``findings`` (sorted, non-overlapping) replaced by its placeholder."""
    parts: list[str] = []
    pos = 0
    for r in findings:
        parts += [text[pos : r.start], _placeholder(r.kind)]
        pos = r.end
    parts.append(text[pos:])
    return "".join(parts)


def scrub(text: str, *, phone_regions: Iterable[str] = PHONE_REGIONS) -> tuple[str, list[Redaction]]:
    """Return the text with every finding replaced by "[REDACTED:<kind>]" and the findings (non-overlapping, sorted).

    ``phone_regions``: ISO 3166 alpha-2 codes of the countries whose national phone-number
    format is recognised (numbers with "+" are found whatever it holds).
    """
    regions = tuple(phone_regions)
    unknown = [r for r in regions if r not in phonenumbers.SUPPORTED_REGIONS]
    if unknown:
        raise ValueError(f"unknown phone region(s) {unknown}: use ISO 3166 alpha-2 codes such as 'US' or 'DE'")
    findings = _find(text, regions)
    return _render(text, findings), findings
