"""Tokens: minting and verifying bearer JWTs and compact Basic-auth credentials, both keyed by JWT_SECRET.

Verification is a function of the token, the secret and ``now`` (seconds since the epoch, passed in), so
the tests can check expiry without waiting and nothing here reads a clock.

**JWT** (``Authorization: Bearer <jwt>``): HS256 only — the algorithm list is pinned, so ``alg: none`` and
RS256/HS256 key confusion are refused before any signature check. Required claims: ``exp`` and ``iat``
(numbers); ``iat`` may not lie in the future and ``nbf``, if present, must have passed, each with
:data:`LEEWAY_S` of clock skew. ``role`` is exactly ``read``, ``write`` or ``admin`` (no case folding).

**Malformed input**: an ``Authorization`` header (or token) that is not ASCII or longer than
:data:`MAX_AUTHORIZATION_CHARS` is refused before any parser sees it, and every parser failure is
Unauthorized: whatever a client sends, verifying it gives a principal or a 401, never an exception.

**Compact credential** (for clients that only speak Basic auth, as the password; the user name is
ignored): ``tn1.`` + base64url(role byte, 5-byte big-endian ``exp``, first 24 bytes of an HMAC-SHA256 over
a domain-separation label and those 6 bytes). 44 characters: short enough for pyrqlite 2.2.3, which breaks
Basic headers whose base64 runs past 76 characters. A full JWT is accepted as a Basic password too.
"""

from __future__ import annotations

import base64
import binascii
import collections
import enum
import hashlib
import hmac
import math
import warnings
from dataclasses import dataclass

import jwt
import jwt.warnings

from node import errors

ALGORITHM = "HS256"
# Clock skew tolerated between the node that minted a token and the node that checks it.
LEEWAY_S = 30
COMPACT_PREFIX = "tn1."
COMPACT_MAX_CHARS = 48
# Longest Authorization header (and token) looked at. A JWT this node mints is ~200 characters; anything
# longer is refused before parsing, so no parser ever sees a huge input.
MAX_AUTHORIZATION_CHARS = 4096
_COMPACT_LABEL = b"talentnest compact credential v1\x00"
_COMPACT_MAC_BYTES = 24
_COMPACT_EXP_BYTES = 5


class Role(enum.IntEnum):
    """What a holder may do. Each role includes the ones below it."""

    READ = 1
    WRITE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: object) -> Role:
        """Exactly ``read``, ``write`` or ``admin``. Case-folding is refused on purpose: ``"admın"`` (dotless
        i) upper-cases to ``"ADMIN"``, so any folding lets look-alike labels through."""
        role = _ROLE_BY_LABEL.get(text) if isinstance(text, str) else None
        if role is None:
            raise ValueError(f"unknown role {text!r}; expected read, write or admin")
        return role


_ROLE_BY_LABEL = {role.label: role for role in Role}


_ROLE_BYTE = {Role.READ: b"r", Role.WRITE: b"w", Role.ADMIN: b"a"}
_BYTE_ROLE = {v[0]: k for k, v in _ROLE_BYTE.items()}

# A short JWT_SECRET is reported once per start (``weak_jwt_secret``), not on every token checked.
warnings.filterwarnings("ignore", category=jwt.warnings.InsecureKeyLengthWarning)


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    subject: str
    expires_at: float

    def require(self, role: Role) -> None:
        if self.role < role:
            raise errors.Forbidden(
                f"this token has the {self.role.label} role; this needs {role.label}", required=role.label
            )


def _unauthorized(why: str) -> errors.Unauthorized:
    return errors.Unauthorized(f"authentication required: {why}")


# --- minting -------------------------------------------------------------------------------------------------


def mint_jwt(secret: str, role: Role, *, now: float, ttl_s: float, subject: str = "cli") -> str:
    issued = int(now)
    claims = {"sub": subject, "role": role.label, "iat": issued, "exp": issued + math.ceil(ttl_s)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def mint_compact(secret: str, role: Role, *, now: float, ttl_s: float) -> str:
    exp = int(now) + math.ceil(ttl_s)
    if not 0 < exp < 1 << (8 * _COMPACT_EXP_BYTES):
        raise ValueError("expiry out of range")
    body = _ROLE_BYTE[role] + exp.to_bytes(_COMPACT_EXP_BYTES, "big")
    token = base64.urlsafe_b64encode(body + _compact_mac(secret, body)).decode("ascii")
    return COMPACT_PREFIX + token


def _compact_mac(secret: str, body: bytes) -> bytes:
    # surrogateescape: a secret read from an environment that is not valid UTF-8 still has bytes to key with.
    key = secret.encode("utf-8", "surrogateescape")
    return hmac.new(key, _COMPACT_LABEL + body, hashlib.sha256).digest()[:_COMPACT_MAC_BYTES]


# --- verifying -----------------------------------------------------------------------------------------------


def _check_text(token: object, what: str) -> str:
    """A token must be a bounded ASCII string before any parser sees it: pyjwt and base64 raise other
    exceptions than their documented ones on non-ASCII text (UnicodeEncodeError on the lone surrogates that
    aiohttp makes of undecodable header bytes)."""
    if not isinstance(token, str) or len(token) > MAX_AUTHORIZATION_CHARS or not token.isascii():
        raise _unauthorized(f"malformed {what}")
    return token


# Signature checks already passed, by (secret, token): most requests repeat a client's token, and checking an
# HS256 JWT with pyjwt (parse, base64, HMAC, JSON) was a sixth of a busy leader's CPU. Only tokens whose
# signature verified are kept (so a stream of forged tokens adds nothing), the time claims are still checked
# on every use against ``now``, and the cache is bounded (least recently used goes first).
VERIFIED_CACHE_ENTRIES = 4096
_verified: collections.OrderedDict[tuple[str, str], dict] = collections.OrderedDict()


def verify_jwt(token: str, secret: str, *, now: float) -> Principal:
    """The principal a JWT names, or Unauthorized: whatever ``token`` holds, nothing else is raised."""
    return _verify_jwt(token, secret, now=now)[0]


def _verify_jwt(token: str, secret: str, *, now: float) -> tuple[Principal, float | None, float]:
    token = _check_text(token, "token")
    key = (secret, token)
    claims = _verified.get(key)
    if claims is None:
        claims = _signed_claims(token, secret)
        _verified[key] = claims
        while len(_verified) > VERIFIED_CACHE_ENTRIES:
            _verified.popitem(last=False)
    else:
        _verified.move_to_end(key)
    return _principal(claims, now)


def _signed_claims(token: str, secret: str) -> dict:
    """The claims of a JWT whose header and signature check out (HS256 with ``secret``), or Unauthorized."""
    try:
        header = jwt.get_unverified_header(token)
    except Exception:  # noqa: BLE001 - any failure to parse hostile input is "malformed", never a 500
        raise _unauthorized("malformed token") from None
    if header.get("alg") != ALGORITHM:
        raise _unauthorized(f"token algorithm must be {ALGORITHM}")
    try:
        # Signature and algorithm only: pyjwt would read the clock for the time claims, so they are checked
        # below against the ``now`` we were given.
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "verify_aud": False,
                "verify_iss": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise _unauthorized("bad token signature") from None
    except Exception:  # noqa: BLE001 - any failure to parse hostile input is "malformed", never a 500
        raise _unauthorized("malformed token") from None
    if not isinstance(claims, dict):
        raise _unauthorized("malformed token")
    return claims


def _principal(claims: dict, now: float) -> tuple[Principal, float | None, float]:
    """The time and role claims checked against ``now``: on every use, cached signature or not. With the
    principal, the window in which these checks pass: the latest of ``iat``/``nbf`` (valid while it is not
    more than LEEWAY_S after ``now``) and ``exp`` + LEEWAY_S (valid while ``now`` is before it)."""
    exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf")
    if not _is_time(exp) or not _is_time(iat) or (nbf is not None and not _is_time(nbf)):
        raise _unauthorized("token needs numeric exp and iat claims")
    if now >= exp + LEEWAY_S:
        raise _unauthorized("token expired")
    if iat > now + LEEWAY_S or (nbf is not None and nbf > now + LEEWAY_S):
        raise _unauthorized("token not valid yet")
    role_text = claims.get("role")
    if not isinstance(role_text, str):
        raise _unauthorized("token has no role claim")
    try:
        role = Role.parse(role_text)
    except ValueError:
        raise _unauthorized("token has an unknown role") from None
    subject = claims.get("sub")
    not_before = iat if nbf is None else max(iat, nbf)
    return (
        Principal(role, subject if isinstance(subject, str) else "", float(exp)),
        not_before,
        exp + LEEWAY_S,
    )


def verify_compact(token: str, secret: str, *, now: float) -> Principal:
    """The principal a compact credential names, or Unauthorized: nothing else is raised."""
    return _verify_compact(token, secret, now=now)[0]


def _verify_compact(token: str, secret: str, *, now: float) -> tuple[Principal, float | None, float]:
    token = _check_text(token, "credential")
    if len(token) > COMPACT_MAX_CHARS or not token.startswith(COMPACT_PREFIX):
        raise _unauthorized("malformed credential")
    try:
        raw = base64.urlsafe_b64decode(token[len(COMPACT_PREFIX) :].encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise _unauthorized("malformed credential") from None
    if len(raw) != 1 + _COMPACT_EXP_BYTES + _COMPACT_MAC_BYTES:
        raise _unauthorized("malformed credential")
    body, mac = raw[: 1 + _COMPACT_EXP_BYTES], raw[1 + _COMPACT_EXP_BYTES :]
    if not hmac.compare_digest(mac, _compact_mac(secret, body)):
        raise _unauthorized("bad credential signature")
    role = _BYTE_ROLE.get(body[0])
    if role is None:
        raise _unauthorized("malformed credential")
    exp = int.from_bytes(body[1:], "big")
    if now >= exp + LEEWAY_S:
        raise _unauthorized("credential expired")
    return Principal(role, "basic", float(exp)), None, exp + LEEWAY_S


# Authorization headers that authenticated, by (secret, header): a client sends the same header with every
# request, and decoding it (base64 for Basic, the claims' checks) cost 8.7 us of each write. A hit is only
# taken while ``now`` lies inside the window its claims allow (``exp`` and ``iat``/``nbf``, with LEEWAY_S,
# the same comparisons as a full check); outside it the full check runs and gives its own 401. Refused
# headers are never kept, headers longer than AUTHENTICATED_CACHE_CHARS are not either, and the cache is
# bounded (least recently used goes first).
AUTHENTICATED_CACHE_ENTRIES = 4096
AUTHENTICATED_CACHE_CHARS = 1024
# (principal, latest iat/nbf or None, exp + LEEWAY_S)
_authenticated: collections.OrderedDict[tuple[str, str], tuple[Principal, float | None, float]] = (
    collections.OrderedDict()
)


def authenticate(authorization: str | None, secret: str, *, now: float) -> Principal:
    """The ``Authorization`` header to a principal, or Unauthorized (401) saying why not.

    Total over its input: any text (non-ASCII, undecodable bytes, huge) gives a Principal or Unauthorized.
    """
    if type(authorization) is str and len(authorization) <= AUTHENTICATED_CACHE_CHARS:
        key = (secret, authorization)
        hit = _authenticated.get(key)
        if hit is not None:
            principal, not_before, expired_at = hit
            if now < expired_at and (not_before is None or not not_before > now + LEEWAY_S):
                _authenticated.move_to_end(key)
                return principal
        principal, not_before, expired_at = _authenticate(authorization, secret, now=now)
        _authenticated[key] = (principal, not_before, expired_at)
        while len(_authenticated) > AUTHENTICATED_CACHE_ENTRIES:
            _authenticated.popitem(last=False)
        return principal
    return _authenticate(authorization, secret, now=now)[0]


def _authenticate(
    authorization: str | None, secret: str, *, now: float
) -> tuple[Principal, float | None, float]:
    """:func:`authenticate` without the cache: the principal, and the window in which it stays valid."""
    if not authorization:
        raise _unauthorized("send Authorization: Bearer <token> (mint one with `python -m node token`)")
    if not isinstance(authorization, str):
        raise _unauthorized("malformed Authorization header")
    if len(authorization) > MAX_AUTHORIZATION_CHARS:
        raise _unauthorized(f"Authorization header longer than {MAX_AUTHORIZATION_CHARS} characters")
    if not authorization.isascii():
        raise _unauthorized("Authorization header must be ASCII")
    scheme, _, credential = authorization.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() == "bearer" and credential:
        return _verify_jwt(credential, secret, now=now)
    if scheme.lower() == "basic" and credential:
        try:
            decoded = base64.b64decode(credential.encode("ascii"), validate=False).decode("utf-8")
        except (binascii.Error, ValueError, UnicodeError):
            raise _unauthorized("malformed Basic credentials") from None
        _user, sep, password = decoded.partition(":")
        if not sep or not password:
            raise _unauthorized("malformed Basic credentials")
        if password.startswith(COMPACT_PREFIX):
            return _verify_compact(password, secret, now=now)
        return _verify_jwt(password, secret, now=now)
    raise _unauthorized("unsupported Authorization scheme; use Bearer or Basic")


def _is_time(value: object) -> bool:
    """A finite number that fits a float (an integer of 400 digits does not: float() would overflow)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
