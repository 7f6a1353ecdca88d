"""Token checks against the classic JWT attacks, and the same for the compact Basic credential."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# --- malformed input of any kind is a 401, never anything else --------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "Bearer \udcff",  # what aiohttp makes of the raw byte 0xff in a header (surrogateescape)
        "Bearer \xff",
        "Bearer ÿÿÿÿ.ÿÿÿÿ.ÿÿÿÿ",
        "Bearer eyJ\u0430bc.def.ghi",  # a Cyrillic letter inside an otherwise JWT-shaped token
        "Basic \udcff\udcfe",
        "Basic " + base64.b64encode("user:tn1.ÿ".encode()).decode(),
        "Basic " + base64.b64encode("user:eyJ\u2603.x.y".encode()).decode(),
        "B\u0435arer token",  # Cyrillic e in the scheme
        "Bearer " + "A" * 100_000,  # huge
        "Bearer " + "eyJ" + "A" * 5000 + ".a.b",
        "Bearer \x00\x01\x02",
    ],
)
def test_malformed_headers_are_401(header):
    with pytest.raises(errors.Unauthorized):
        auth.authenticate(header, SECRET, now=NOW)


def test_deeply_nested_json_in_a_token_is_401():
    """The JSON parser raises RecursionError (not ValueError) on deep nesting: still only a 401."""
    deep = b"[" * 3000 + b"]" * 3000
    token = f"{b64url(deep)}.{b64url(deep)}.x"
    with pytest.raises(errors.Unauthorized):
        verify(token)
    with pytest.raises(errors.Unauthorized):
        verify(hand_made({"alg": "HS256"}, {"exp": [[[[[]]]]]}) + "")


def test_huge_integer_time_claims_are_401_not_overflow():
    """A correctly signed token whose exp does not fit a float must not raise OverflowError."""
    for field in ("exp", "iat", "nbf"):
        token = hand_made({"alg": "HS256"}, claims(**{field: 10**400}))
        with pytest.raises(errors.Unauthorized):
            verify(token)


def test_verifiers_refuse_non_text():
    for bad in (None, b"eyJ.a.b", 12, ["x"]):
        with pytest.raises(errors.Unauthorized):
            auth.verify_jwt(bad, SECRET, now=NOW)  # type: ignore[arg-type]
        with pytest.raises(errors.Unauthorized):
            auth.verify_compact(bad, SECRET, now=NOW)  # type: ignore[arg-type]
        with pytest.raises(errors.Unauthorized):
            auth.authenticate(bad or b"x", SECRET, now=NOW)  # type: ignore[arg-type]


_header_text = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.characters(codec="ascii"), max_size=300),
    st.builds(
        lambda s, t: f"{s} {t}",
        st.sampled_from(["Bearer", "Basic", "bearer", "BASIC", "Token"]),
        st.text(max_size=300),
    ),
    st.builds(lambda b: "Basic " + base64.b64encode(b).decode(), st.binary(max_size=200)),
    st.builds(lambda b: "Bearer " + b.decode("utf-8", "surrogateescape"), st.binary(max_size=200)),
    # Mutations of real credentials: one character replaced by anything.
    st.builds(
        lambda token, i, ch: "Bearer " + token[: i % len(token)] + ch + token[i % len(token) + 1 :],
        st.sampled_from([auth.mint_jwt(SECRET, r, now=NOW, ttl_s=60) for r in auth.Role]),
        st.integers(min_value=0),
        st.characters(),
    ),
    st.builds(
        lambda token, i, ch: basic("u", token[: i % len(token)] + ch + token[i % len(token) + 1 :]),
        st.sampled_from([auth.mint_compact(SECRET, r, now=NOW, ttl_s=60) for r in auth.Role]),
        st.integers(min_value=0),
        st.characters(codec="utf-8"),
    ),
)


@settings(max_examples=400, deadline=None)
@given(header=_header_text, now=st.floats(allow_nan=True, allow_infinity=True))
def test_authenticate_is_total(header, now):
    """Any text and any clock reading: a Principal or Unauthorized, nothing else."""
    try:
        principal = auth.authenticate(header, SECRET, now=now)
    except errors.Unauthorized:
        return
    assert isinstance(principal, auth.Principal)


@settings(max_examples=200, deadline=None)
@given(
    payload=st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
            ),
            max_leaves=20,
        ),
        max_size=6,
    )
)
def test_signed_tokens_with_any_claims_are_principal_or_401(payload):
    """The claims are only checked after the signature: a holder of the secret can sign anything."""
    token = hand_made({"alg": "HS256", "typ": "JWT"}, payload)
    try:
        principal = verify(token)
    except errors.Unauthorized:
        return
    assert principal.role.label == payload["role"]


# --- roles are matched exactly ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "label",
    [
        "ADMIN",
        "Admin",
        "admın",
        "ADMİN",
        "ＡＤＭＩＮ",
        "ａｄｍｉｎ",
        "admin ",
        " admin",
        "admin\x00",
        "WRITE",
        "Read",
        "ſead",
    ],
)
def test_look_alike_role_labels_are_refused(label):
    with pytest.raises(ValueError):
        auth.Role.parse(label)
    token = jwt.encode(claims(role=label), SECRET, algorithm="HS256")
    with pytest.raises(errors.Unauthorized, match="unknown role"):
        verify(token)


def test_exact_role_labels_are_accepted():
    for role in auth.Role:
        assert auth.Role.parse(role.label) is role
        assert verify(jwt.encode(claims(role=role.label), SECRET, algorithm="HS256")).role is role


@settings(max_examples=500, deadline=None)
@given(
    label=st.one_of(
        st.text(max_size=8),
        # Near misses: the real labels with case changes, look-alikes and padding.
        st.builds(
            lambda base, fold, pad: pad[0] + fold(base) + pad[1],
            st.sampled_from(["read", "write", "admin"]),
            st.sampled_from([str.upper, str.title, str.lower, str.casefold, lambda s: s.replace("i", "ı")]),
            st.tuples(st.sampled_from(["", " ", "\t", "\u200b"]), st.sampled_from(["", " ", "\n", "\u00a0"])),
        ),
    )
)
def test_only_the_three_exact_labels_are_roles(label):
    try:
        role = auth.Role.parse(label)
    except ValueError:
        assert label not in ("read", "write", "admin")
    else:
        assert label == role.label and label in ("read", "write", "admin")


def test_a_cached_signature_still_has_its_time_claims_checked_on_every_use():
    token = auth.mint_jwt(SECRET, auth.Role.WRITE, now=1000, ttl_s=60)
    assert auth.verify_jwt(token, SECRET, now=1000).role is auth.Role.WRITE  # verified and cached
    assert (SECRET, token) in auth._verified
    with pytest.raises(errors.Unauthorized, match="expired"):
        auth.verify_jwt(token, SECRET, now=1000 + 60 + auth.LEEWAY_S)
    with pytest.raises(errors.Unauthorized, match="not valid yet"):
        auth.verify_jwt(token, SECRET, now=1000 - auth.LEEWAY_S - 1)


def test_a_token_cached_under_one_secret_is_refused_under_another():
    token = auth.mint_jwt(SECRET, auth.Role.ADMIN, now=1000, ttl_s=60)
    auth.verify_jwt(token, SECRET, now=1000)
    with pytest.raises(errors.Unauthorized, match="signature"):
        auth.verify_jwt(token, SECRET + "x", now=1000)


def test_refused_tokens_are_never_cached_and_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(auth, "VERIFIED_CACHE_ENTRIES", 8)
    auth._verified.clear()
    good = auth.mint_jwt(SECRET, auth.Role.READ, now=1000, ttl_s=60)
    forged = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    for _ in range(3):
        with pytest.raises(errors.Unauthorized):
            auth.verify_jwt(forged, SECRET, now=1000)
    assert not auth._verified
    tokens = [auth.mint_jwt(SECRET, auth.Role.READ, now=1000, ttl_s=60, subject=f"s{i}") for i in range(20)]
    for t in tokens:
        auth.verify_jwt(t, SECRET, now=1000)
    assert len(auth._verified) == 8
    assert list(auth._verified) == [(SECRET, t) for t in tokens[-8:]]  # least recently used went first


# --- the cache of authenticated Authorization headers -------------------------------------------------------


def _answer(header: str, secret: str, now: float):
    try:
        principal = auth.authenticate(header, secret, now=now)
    except errors.Unauthorized as exc:
        return ("401", str(exc))
    return principal


def _fresh_answer(header: str, secret: str, now: float):
    saved = dict(auth._authenticated)
    auth._authenticated.clear()
    try:
        return _answer(header, secret, now)
    finally:
        auth._authenticated.clear()
        auth._authenticated.update(saved)


_times = st.integers(900, 1100) | st.floats(900, 1100, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    iat=_times,
    exp=_times,
    nbf=st.none() | _times,
    basic=st.booleans(),
    compact=st.booleans(),
    nows=st.lists(st.integers(800, 1200) | st.floats(800, 1200, allow_nan=False), min_size=1, max_size=8),
)
def test_a_cached_header_answers_exactly_as_a_fresh_check_at_every_time(iat, exp, nbf, basic, compact, nows):
    """Whatever the claims and the order of the clock readings, the cached answer is the uncached one: a
    header cached while valid is refused once expired (or before iat/nbf), with the same 401."""
    if compact:
        token = auth.mint_compact(SECRET, auth.Role.WRITE, now=int(exp) - 10, ttl_s=10)
        header = "Basic " + base64.b64encode(f"u:{token}".encode()).decode()
    else:
        claims = {"sub": "s", "role": "write", "iat": iat, "exp": exp}
        if nbf is not None:
            claims["nbf"] = nbf
        token = jwt.encode(claims, SECRET, algorithm="HS256")
        header = ("Basic " + base64.b64encode(f"u:{token}".encode()).decode()) if basic else f"Bearer {token}"
    auth._authenticated.clear()
    for now in nows:
        assert _answer(header, SECRET, now) == _fresh_answer(header, SECRET, now)
        assert _answer(header, SECRET + "-other", now) == _fresh_answer(header, SECRET + "-other", now)


def test_an_expired_header_is_refused_even_though_it_is_cached():
    header = "Bearer " + auth.mint_jwt(SECRET, auth.Role.WRITE, now=1000, ttl_s=60)
    auth._authenticated.clear()
    assert auth.authenticate(header, SECRET, now=1000).role is auth.Role.WRITE
    assert (SECRET, header) in auth._authenticated
    with pytest.raises(errors.Unauthorized, match="expired"):
        auth.authenticate(header, SECRET, now=1000 + 60 + auth.LEEWAY_S)
    with pytest.raises(errors.Unauthorized, match="not valid yet"):
        auth.authenticate(header, SECRET, now=1000 - auth.LEEWAY_S - 1)
    with pytest.raises(errors.Unauthorized, match="signature"):
        auth.authenticate(header, SECRET + "x", now=1000)  # the same header under a rotated secret


def test_refused_headers_are_never_cached_and_the_header_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(auth, "AUTHENTICATED_CACHE_ENTRIES", 8)
    auth._authenticated.clear()
    for bad in ("Bearer x.y.z", "Basic !!!", "Token abc", "Bearer " + "a" * 5000):
        with pytest.raises(errors.Unauthorized):
            auth.authenticate(bad, SECRET, now=1000)
    assert not auth._authenticated
    headers = [
        "Bearer " + auth.mint_jwt(SECRET, auth.Role.READ, now=1000, ttl_s=60, subject=f"s{i}")
        for i in range(20)
    ]
    for h in headers:
        auth.authenticate(h, SECRET, now=1000)
    assert list(auth._authenticated) == [(SECRET, h) for h in headers[-8:]]  # least recently used went first
    long_header = "Bearer " + auth.mint_jwt(SECRET, auth.Role.READ, now=1000, ttl_s=60, subject="x" * 1200)
    assert auth.authenticate(long_header, SECRET, now=1000).role is auth.Role.READ
    assert (SECRET, long_header) not in auth._authenticated
