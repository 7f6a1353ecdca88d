"""Token checks against the classic JWT attacks, and the same for the compact Basic credential."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest

from node import auth, errors

SECRET = "a-test-secret-that-is-long-enough-0123456789"
NOW = 1_800_000_000.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict, claims: dict, key: bytes | None = SECRET.encode(), alg: str = "sha256") -> str:
    """A JWT built without pyjwt, so tokens pyjwt refuses to make can be tested."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    if key is None:
        return signing_input + "."
    signature = hmac.new(key, signing_input.encode(), getattr(hashlib, alg)).digest()
    return f"{signing_input}.{b64url(signature)}"


def claims(**overrides):
    base = {"sub": "t", "role": "write", "iat": int(NOW), "exp": int(NOW) + 60}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def verify(token: str, now: float = NOW) -> auth.Principal:
    return auth.verify_jwt(token, SECRET, now=now)


def test_minted_token_round_trips():
    token = auth.mint_jwt(SECRET, auth.Role.ADMIN, now=NOW, ttl_s=60)
    principal = verify(token)
    assert principal.role is auth.Role.ADMIN
    assert principal.expires_at == NOW + 60


def test_hand_made_hs256_token_is_accepted():
    assert verify(hand_made({"alg": "HS256", "typ": "JWT"}, claims())).role is auth.Role.WRITE


@pytest.mark.parametrize(
    ("token_factory", "why"),
    [
        (lambda: hand_made({"alg": "none", "typ": "JWT"}, claims(), key=None), "alg none"),
        (lambda: hand_made({"alg": "None"}, claims(), key=None), "alg None"),
        (lambda: hand_made({"alg": "HS256"}, claims(), key=None), "HS256 without signature"),
        (lambda: hand_made({"alg": "HS512"}, claims(), alg="sha512"), "other HMAC"),
        (lambda: hand_made({"alg": "RS256"}, claims()), "RS256 header, HMAC with the secret (confusion)"),
        (
            lambda: hand_made({"alg": "RS256"}, claims(), key=b"-----BEGIN PUBLIC KEY-----"),
            "RS256 with a key",
        ),
        (
            lambda: jwt.encode(claims(), "wrong-secret-wrong-secret-wrong-secret!!", algorithm="HS256"),
            "wrong secret",
        ),
        (lambda: jwt.encode(claims(exp=int(NOW) - 3600), SECRET, algorithm="HS256"), "expired"),
        (lambda: jwt.encode(claims(iat=int(NOW) + 3600), SECRET, algorithm="HS256"), "issued in the future"),
        (lambda: jwt.encode(claims(nbf=int(NOW) + 3600), SECRET, algorithm="HS256"), "not yet valid"),
        (lambda: jwt.encode(claims(exp=None), SECRET, algorithm="HS256"), "missing exp"),
        (lambda: jwt.encode(claims(iat=None), SECRET, algorithm="HS256"), "missing iat"),
        (lambda: jwt.encode(claims(exp="tomorrow"), SECRET, algorithm="HS256"), "exp not a number"),
        (lambda: jwt.encode(claims(exp=True), SECRET, algorithm="HS256"), "exp a boolean"),
        (lambda: jwt.encode(claims(role="root"), SECRET, algorithm="HS256"), "unknown role"),
        (lambda: jwt.encode(claims(role=None), SECRET, algorithm="HS256"), "no role"),
        (lambda: jwt.encode(claims(role=["admin"]), SECRET, algorithm="HS256"), "role not a string"),
        (lambda: "not.a.jwt", "garbage"),
        (lambda: "", "empty"),
        (lambda: "a.b", "two parts"),
        (lambda: "\x00\xff", "binary"),
    ],
)
def test_attacks_are_refused(token_factory, why):
    with pytest.raises(errors.Unauthorized):
        verify(token_factory())


def test_tampered_payload_is_refused():
    token = auth.mint_jwt(SECRET, auth.Role.READ, now=NOW, ttl_s=60)
    header, _payload, signature = token.split(".")
    forged = b64url(json.dumps(claims(role="admin")).encode())
    with pytest.raises(errors.Unauthorized, match="signature"):
        verify(f"{header}.{forged}.{signature}")


def test_leeway_is_small():
    token = auth.mint_jwt(SECRET, auth.Role.READ, now=NOW, ttl_s=60)
    verify(token, now=NOW + 60 + auth.LEEWAY_S - 1)
    with pytest.raises(errors.Unauthorized, match="expired"):
        verify(token, now=NOW + 60 + auth.LEEWAY_S)
    verify(token, now=NOW - auth.LEEWAY_S + 1)  # minted by a node whose clock runs slightly ahead
    with pytest.raises(errors.Unauthorized, match="not valid yet"):
        verify(token, now=NOW - auth.LEEWAY_S - 1)


def test_roles_imply_lower_roles():
    principal = auth.Principal(auth.Role.WRITE, "t", NOW)
    principal.require(auth.Role.READ)
    principal.require(auth.Role.WRITE)
    with pytest.raises(errors.Forbidden):
        principal.require(auth.Role.ADMIN)


# --- compact credential ----------------------------------------------------------------------------------------


def compact(role=auth.Role.WRITE, ttl=60, secret=SECRET):
    return auth.mint_compact(secret, role, now=NOW, ttl_s=ttl)


def test_compact_credential_round_trips_and_is_short():
    for role in auth.Role:
        token = compact(role)
        assert len(token) <= auth.COMPACT_MAX_CHARS
        assert auth.verify_compact(token, SECRET, now=NOW).role is role


def test_compact_credential_fits_pyrqlite_basic_header():
    # pyrqlite 2.2.3 uses base64.encodestring-like output with a line break every 76 characters.
    header = base64.encodebytes(f"app:{compact()}".encode())
    assert header.count(b"\n") == 1 and header.endswith(b"\n")


@pytest.mark.parametrize(
    ("token_factory", "why"),
    [
        (lambda: compact(secret="another-secret-another-secret-another"), "forged with another secret"),
        (lambda: compact()[:-4], "truncated"),
        (lambda: compact()[:10], "truncated hard"),
        (lambda: compact(ttl=-3600), "expired"),
        (lambda: compact() + "AAAA", "extended"),
        (lambda: "tn1." + "A" * 40, "all zeros"),
        (lambda: "tn1.!!!!", "not base64"),
        (lambda: "tn1.", "empty"),
        (lambda: "tn2." + compact()[4:], "other version"),
    ],
)
def test_compact_attacks_are_refused(token_factory, why):
    with pytest.raises(errors.Unauthorized):
        auth.verify_compact(token_factory(), SECRET, now=NOW)


def test_compact_role_change_is_refused():
    token = compact(auth.Role.READ)
    raw = bytearray(base64.urlsafe_b64decode(token[4:]))
    raw[0] = ord("a")
    with pytest.raises(errors.Unauthorized, match="signature"):
        auth.verify_compact("tn1." + base64.urlsafe_b64encode(bytes(raw)).decode(), SECRET, now=NOW)


def test_compact_expiry_change_is_refused():
    token = compact(auth.Role.READ)
    raw = bytearray(base64.urlsafe_b64decode(token[4:]))
    raw[5] ^= 0xFF
    with pytest.raises(errors.Unauthorized, match="signature"):
        auth.verify_compact("tn1." + base64.urlsafe_b64encode(bytes(raw)).decode(), SECRET, now=NOW)


# --- Authorization header ---------------------------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_header_schemes():
    token = auth.mint_jwt(SECRET, auth.Role.READ, now=NOW, ttl_s=60)
    assert auth.authenticate(f"Bearer {token}", SECRET, now=NOW).role is auth.Role.READ
    assert auth.authenticate(f"bearer  {token} ", SECRET, now=NOW).role is auth.Role.READ
    assert auth.authenticate(basic("anyone", token), SECRET, now=NOW).role is auth.Role.READ
    assert auth.authenticate(basic("", compact(auth.Role.ADMIN)), SECRET, now=NOW).role is auth.Role.ADMIN


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Token abc",
        "Basic",
        "Basic !!!",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + base64.b64encode(b"user:").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:\x00").decode(),
        "Basic " + base64.b64encode(b"user:tn1.garbage").decode(),
    ],
)
def test_bad_headers_are_401(header):
    with pytest.raises(errors.Unauthorized) as info:
        auth.authenticate(header, SECRET, now=NOW)
    assert "WWW-Authenticate" in info.value.headers()
