"""WooCommerce authentication: OAuth 1.0a signing checked against independent computations."""

from __future__ import annotations

import base64
import hashlib
import hmac
from types import SimpleNamespace
from urllib.parse import parse_qsl, unquote

import httpx
import pytest
from oauthlib.oauth1.rfc5849 import signature as oauthlib_signature

from syncd.sources.woocommerce.auth import (
    OAuth1Auth,
    QueryStringAuth,
    basic_auth,
    make_auth,
    oauth1_base_string,
    verify_oauth1,
)

KEY = "ck_0123456789abcdef"
SECRET = "cs_fedcba9876543210"
NOW = 1_700_000_000
BASE = "http://127.0.0.1:8080/wp-json/wc/v3/orders"


def sign(
    url: str,
    *,
    method: str = "GET",
    signature_method: str = "HMAC-SHA256",
    clock: float = NOW,
    nonce: str = "n0nce",
    secret: str = SECRET,
    **request_kwargs: object,
) -> httpx.Request:
    auth = OAuth1Auth(KEY, secret, signature_method, clock=lambda: clock, nonce=lambda: nonce)
    request = httpx.Request(method, url, **request_kwargs)  # type: ignore[arg-type]
    return next(auth.auth_flow(request))


def query_pairs(request: httpx.Request) -> list[tuple[str, str]]:
    # What PHP puts in $_GET: the query decoded with "+" as a space.
    return parse_qsl(request.url.query.decode(), keep_blank_values=True)


def signature_of(request: httpx.Request) -> str:
    return dict(query_pairs(request))["oauth_signature"]


def oauthlib_reference(request: httpx.Request, signature_method: str) -> str:
    """The RFC 5849 signature computed by oauthlib from the URL actually sent."""
    params = oauthlib_signature.collect_parameters(
        uri_query=request.url.query.decode(), exclude_oauth_signature=True
    )
    normalized = oauthlib_signature.normalize_parameters(params)
    base_uri = oauthlib_signature.base_string_uri(str(request.url).split("?")[0])
    base = oauthlib_signature.signature_base_string(request.method, base_uri, normalized)
    # oauthlib signs with a client's secrets; one-legged OAuth has no token secret.
    client = SimpleNamespace(client_secret=SECRET, resource_owner_secret="")
    if signature_method == "HMAC-SHA256":
        return str(oauthlib_signature.sign_hmac_sha256_with_client(base, client))
    return str(oauthlib_signature.sign_hmac_sha1_with_client(base, client))


@pytest.mark.parametrize("signature_method", ["HMAC-SHA256", "HMAC-SHA1"])
def test_signature_matches_oauthlib_for_params_that_need_encoding(signature_method: str) -> None:
    params = {
        "modified_after": "2024-01-01T00:00:00",
        "search": "blue shirt",
        "sku": "a+b/c",
        "per_page": "100",
    }
    request = sign(BASE, params=params, signature_method=signature_method)

    sent = dict(query_pairs(request))
    assert {k: sent[k] for k in params} == params
    assert sent["oauth_consumer_key"] == KEY
    assert sent["oauth_timestamp"] == str(NOW)
    assert sent["oauth_nonce"] == "n0nce"
    assert sent["oauth_signature_method"] == signature_method
    assert "oauth_version" not in sent  # WooCommerce's docs: leave it out
    assert signature_of(request) == oauthlib_reference(request, signature_method)


def test_unescaped_plus_in_url_is_signed_as_the_space_php_decodes() -> None:
    # PHP turns "+" in a query into a space before WooCommerce signs $_GET.
    request = sign(BASE + "?search=red+wine&after=2024-01-01T00:00:00")
    assert dict(query_pairs(request))["search"] == "red wine"
    assert signature_of(request) == oauthlib_reference(request, "HMAC-SHA256")


def test_array_params_are_signed_with_indices_like_woocommerce() -> None:
    # Hand-computed from WooCommerce's check_oauth_signature(): names sorted with strcmp,
    # status[] folded by PHP into status[0], status[1], each "name=value" encoded twice.
    params = [
        ("status[]", "processing"),
        ("status[]", "completed"),
        ("oauth_consumer_key", "ck"),
        ("oauth_nonce", "n1"),
        ("oauth_signature_method", "HMAC-SHA1"),
        ("oauth_timestamp", "1700000000"),
    ]
    expected = (
        "GET&http%3A%2F%2F127.0.0.1%3A8080%2Fwp-json%2Fwc%2Fv3%2Forders&"
        "oauth_consumer_key%3Dck%26oauth_nonce%3Dn1%26oauth_signature_method%3DHMAC-SHA1"
        "%26oauth_timestamp%3D1700000000"
        "%26status%255B0%255D%3Dprocessing%26status%255B1%255D%3Dcompleted"
    )
    assert oauth1_base_string("GET", BASE, params) == expected

    auth = OAuth1Auth("ck", "cs", "HMAC-SHA1", clock=lambda: 1_700_000_000, nonce=lambda: "n1")
    request = httpx.Request("GET", BASE, params={"status[]": ["processing", "completed"]})
    signed = next(auth.auth_flow(request))
    digest = hmac.new(b"cs&", expected.encode(), hashlib.sha1).digest()
    assert signature_of(signed) == base64.b64encode(digest).decode()


def test_verify_accepts_what_the_client_signed() -> None:
    request = sign(BASE, params={"modified_after": "2024-01-01T00:00:00", "q": "a b+c"})
    seen: set[tuple[str, str]] = set()
    assert verify_oauth1("GET", BASE, query_pairs(request), KEY, SECRET, NOW, seen) is None
    assert seen == {(KEY, "n0nce")}
    # A mapping works as well as ordered pairs.
    assert verify_oauth1("GET", BASE, dict(query_pairs(request)), KEY, SECRET, NOW) is None


def test_verify_rejects_a_tampered_parameter() -> None:
    request = sign(BASE, params={"per_page": "10"})
    tampered = [(k, "100" if k == "per_page" else v) for k, v in query_pairs(request)]
    assert (
        verify_oauth1("GET", BASE, tampered, KEY, SECRET, NOW)
        == "Invalid signature - provided signature does not match."
    )


def test_verify_rejects_another_method_path_or_host() -> None:
    pairs = query_pairs(sign(BASE))
    mismatch = "Invalid signature - provided signature does not match."
    assert verify_oauth1("POST", BASE, pairs, KEY, SECRET, NOW) == mismatch
    assert verify_oauth1("GET", BASE + "/1", pairs, KEY, SECRET, NOW) == mismatch
    # WooCommerce rebuilds the URL from its home URL: a client using another host name fails.
    localhost = BASE.replace("127.0.0.1", "localhost")
    assert verify_oauth1("GET", localhost, pairs, KEY, SECRET, NOW) == mismatch


def test_verify_rejects_a_wrong_secret() -> None:
    pairs = query_pairs(sign(BASE, secret="cs_wrong"))
    assert (
        verify_oauth1("GET", BASE, pairs, KEY, SECRET, NOW)
        == "Invalid signature - provided signature does not match."
    )


def test_verify_rejects_an_unknown_consumer_key() -> None:
    pairs = query_pairs(sign(BASE))
    assert verify_oauth1("GET", BASE, pairs, "ck_other", SECRET, NOW) == "Consumer key is invalid."


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (15 * 60, None),
        (15 * 60 + 1, "Invalid timestamp."),
        (-15 * 60, None),
        (-15 * 60 - 1, "Invalid timestamp."),
        (3600, "Invalid timestamp."),
    ],
)
def test_verify_allows_fifteen_minutes_of_clock_skew(age: int, expected: str | None) -> None:
    pairs = query_pairs(sign(BASE, clock=NOW - age))
    assert verify_oauth1("GET", BASE, pairs, KEY, SECRET, NOW) == expected


def test_verify_rejects_a_replayed_nonce() -> None:
    pairs = query_pairs(sign(BASE))
    seen: set[tuple[str, str]] = set()
    assert verify_oauth1("GET", BASE, pairs, KEY, SECRET, NOW, seen) is None
    assert (
        verify_oauth1("GET", BASE, pairs, KEY, SECRET, NOW, seen)
        == "Invalid nonce - nonce has already been used."
    )
    fresh = query_pairs(sign(BASE, nonce="another"))
    assert verify_oauth1("GET", BASE, fresh, KEY, SECRET, NOW, seen) is None


def test_verify_reports_missing_parameters_and_bad_methods() -> None:
    pairs = [(k, v) for k, v in query_pairs(sign(BASE)) if k != "oauth_nonce"]
    assert (
        verify_oauth1("GET", BASE, pairs, KEY, SECRET, NOW) == "Missing OAuth parameter oauth_nonce"
    )
    pairs = [(k, "0" if k in ("oauth_nonce", "oauth_timestamp") else v) for k, v in pairs]
    # PHP's empty() treats "0" as missing.
    assert (
        verify_oauth1("GET", BASE, pairs, KEY, SECRET, NOW)
        == "Missing OAuth parameters oauth_timestamp, oauth_nonce"
    )
    plaintext = [
        (k, "PLAINTEXT" if k == "oauth_signature_method" else v) for k, v in query_pairs(sign(BASE))
    ]
    assert (
        verify_oauth1("GET", BASE, plaintext, KEY, SECRET, NOW)
        == "Invalid signature - signature method is invalid."
    )


def test_verify_accepts_a_signature_whose_plus_arrived_as_a_space() -> None:
    # A client that forgets to escape "+" in the signature gets a space in $_GET; WooCommerce
    # turns it back into "+". Find a nonce whose signature contains a "+".
    for n in range(200):
        pairs = query_pairs(sign(BASE, nonce=f"nonce{n}"))
        signature = dict(pairs)["oauth_signature"]
        if "+" in signature:
            break
    else:
        pytest.fail("no signature with '+' in 200 nonces")
    mangled = [(k, v.replace("+", " ") if k == "oauth_signature" else v) for k, v in pairs]
    assert verify_oauth1("GET", BASE, mangled, KEY, SECRET, NOW) is None


def test_resigning_replaces_oauth_params_already_in_the_url() -> None:
    # WooCommerce's Link header repeats the previous request's query, signature included.
    first = sign(BASE, params={"page": "1"})
    next_url = str(first.url).replace("page=1", "page=2")
    second = sign(next_url, clock=NOW + 5, nonce="second")
    names = [name for name, _ in query_pairs(second)]
    assert sorted(n for n in names if n.startswith("oauth_")) == [
        "oauth_consumer_key",
        "oauth_nonce",
        "oauth_signature",
        "oauth_signature_method",
        "oauth_timestamp",
    ]
    assert dict(query_pairs(second))["page"] == "2"
    assert verify_oauth1("GET", BASE, query_pairs(second), KEY, SECRET, NOW + 5) is None


def test_form_body_parameters_are_signed_but_json_is_not() -> None:
    form = sign(BASE, method="POST", data={"status": "completed"})
    body_pairs = parse_qsl(form.content.decode())
    assert verify_oauth1("POST", BASE, query_pairs(form) + body_pairs, KEY, SECRET, NOW) is None
    assert verify_oauth1("POST", BASE, query_pairs(form), KEY, SECRET, NOW) is not None

    as_json = sign(BASE, method="POST", json={"status": "completed"})
    assert verify_oauth1("POST", BASE, query_pairs(as_json), KEY, SECRET, NOW) is None


def test_query_string_auth_adds_credentials_and_keeps_the_query() -> None:
    auth = QueryStringAuth(KEY, SECRET)
    request = httpx.Request("GET", BASE + "?consumer_key=stale&after=2024-01-01T00%3A00%3A00")
    sent = next(auth.auth_flow(request))
    assert query_pairs(sent) == [
        ("after", "2024-01-01T00:00:00"),
        ("consumer_key", KEY),
        ("consumer_secret", SECRET),
    ]
    assert "authorization" not in sent.headers


def test_basic_auth_uses_key_as_user_name() -> None:
    request = next(basic_auth(KEY, SECRET).auth_flow(httpx.Request("GET", BASE)))
    scheme, _, token = request.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(token).decode() == f"{KEY}:{SECRET}"


def test_make_auth_builds_each_mode() -> None:
    assert isinstance(make_auth("basic", KEY, SECRET), httpx.BasicAuth)
    assert isinstance(make_auth("query", KEY, SECRET), QueryStringAuth)
    oauth = make_auth("oauth1", KEY, SECRET, "HMAC-SHA1")
    assert isinstance(oauth, OAuth1Auth)
    signed = next(oauth.auth_flow(httpx.Request("GET", BASE)))
    assert dict(query_pairs(signed))["oauth_signature_method"] == "HMAC-SHA1"
    with pytest.raises(ValueError, match="unknown WooCommerce auth mode"):
        make_auth("bearer", KEY, SECRET)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="signature_method"):
        OAuth1Auth(KEY, SECRET, "RSA-SHA1")


def test_each_request_gets_a_fresh_nonce_by_default() -> None:
    auth = OAuth1Auth(KEY, SECRET)
    nonces = {
        dict(query_pairs(next(auth.auth_flow(httpx.Request("GET", BASE)))))["oauth_nonce"]
        for _ in range(20)
    }
    assert len(nonces) == 20
    assert all(unquote(n).isalnum() for n in nonces)
