"""WooCommerce REST API authentication as httpx auth objects.

Three ways in, as WooCommerce's ``WC_REST_Authentication`` accepts them: HTTP Basic (HTTPS),
``consumer_key``/``consumer_secret`` in the query string (hosts that strip ``Authorization``),
and one-legged OAuth 1.0a (plain HTTP). ``verify_oauth1`` is the server side of the last one,
for the sandbox store.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from typing import Literal, NamedTuple, TypeAlias
from urllib.parse import quote_from_bytes, unquote_to_bytes

import httpx

__all__ = [
    "API_ROOT",
    "OAUTH1_SIGNATURE_METHODS",
    "OAUTH_TIMESTAMP_WINDOW",
    "AuthError",
    "OAuth1Auth",
    "PhpValue",
    "QueryStringAuth",
    "basic_auth",
    "check_oauth1",
    "make_auth",
    "oauth1_base_string",
    "oauth1_sign",
    "parse_php_query",
    "verify_oauth1",
]

# The REST API's root under the site URL (https://woocommerce.github.io/woocommerce-rest-api-docs/#requestresponse-format).
# Here, beside the auth, so the WooCommerce write-back can address the store without the
# source's client.
API_ROOT = "/wp-json/wc/v3"

# WooCommerce rejects a timestamp more than 15 minutes away from the server clock and remembers
# nonces for the same window (check_oauth_timestamp_and_nonce).
OAUTH_TIMESTAMP_WINDOW = 15 * 60
OAUTH1_SIGNATURE_METHODS = ("HMAC-SHA1", "HMAC-SHA256")
_REQUIRED_OAUTH_PARAMS = (
    "oauth_consumer_key",
    "oauth_timestamp",
    "oauth_nonce",
    "oauth_signature",
    "oauth_signature_method",
)
_AUTH_ERROR = "woocommerce_rest_authentication_error"
_FORM_TYPE = "application/x-www-form-urlencoded"

# A request parameter the way PHP's $_GET holds it: a string, or for ``a[]=x`` / ``a[k]=x`` names,
# an ordered array (PHP arrays are ordered maps; list-style keys become "0", "1", ...).
PhpValue: TypeAlias = "str | dict[str, PhpValue]"


class AuthError(NamedTuple):
    """A failed WooCommerce authentication: the REST error ``code`` and its ``message``."""

    code: str
    message: str


def basic_auth(key: str, secret: str) -> httpx.Auth:
    """HTTP Basic auth with the consumer key as user name and the consumer secret as password."""
    return httpx.BasicAuth(key, secret)


class QueryStringAuth(httpx.Auth):
    """Sends ``consumer_key`` and ``consumer_secret`` as query parameters.

    For hosts whose web server drops the Authorization header before PHP sees it; WooCommerce
    reads these two parameters before the Basic header.
    """

    def __init__(self, key: str, secret: str) -> None:
        self._key = key
        self._secret = secret

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.url = _replace_query_params(
            request.url,
            drop=lambda name: name in ("consumer_key", "consumer_secret"),
            add=[("consumer_key", self._key), ("consumer_secret", self._secret)],
        )
        yield request


class OAuth1Auth(httpx.Auth):
    """One-legged OAuth 1.0a signed exactly the way WooCommerce verifies it.

    The oauth parameters and the signature go in the query string: WooCommerce reads the
    Authorization header only when PHP exposes it, while ``$_GET`` always works. Any ``oauth_*``
    parameters already in the URL are replaced, so the ``Link`` URLs WooCommerce returns (which
    repeat the previous request's query, signature included) can be followed directly.
    """

    # A form-encoded body is part of what WooCommerce signs, so httpx must load it first.
    requires_request_body = True

    def __init__(
        self,
        consumer_key: str,
        consumer_secret: str,
        signature_method: str = "HMAC-SHA256",
        *,
        clock: Callable[[], float] = time.time,
        nonce: Callable[[], str] = lambda: secrets.token_hex(16),
    ) -> None:
        if signature_method not in OAUTH1_SIGNATURE_METHODS:
            raise ValueError(
                f"signature_method must be one of {', '.join(OAUTH1_SIGNATURE_METHODS)}, "
                f"not {signature_method!r}"
            )
        self._key = consumer_key
        self._secret = consumer_secret
        self._method = signature_method
        self._clock = clock
        self._nonce = nonce

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        oauth = [
            ("oauth_consumer_key", self._key),
            ("oauth_timestamp", str(int(self._clock()))),
            ("oauth_nonce", self._nonce()),
            ("oauth_signature_method", self._method),
        ]
        unsigned = _replace_query_params(request.url, drop=_is_oauth_param, add=oauth)
        pairs = _decode_query(unsigned.query)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() == _FORM_TYPE:
            # WooCommerce signs array_merge($_GET, $_POST); a JSON body is not in $_POST.
            pairs += _decode_query(request.read())
        base_url = f"{unsigned.scheme}://{unsigned.netloc.decode('ascii')}{_raw_path(unsigned)}"
        base_string = oauth1_base_string(request.method, base_url, pairs)
        signature = oauth1_sign(base_string, self._secret, self._method)
        request.url = _replace_query_params(
            unsigned, drop=lambda _: False, add=[("oauth_signature", signature)]
        )
        yield request


def make_auth(
    mode: Literal["basic", "oauth1", "query"],
    key: str,
    secret: str,
    signature_method: str = "HMAC-SHA256",
) -> httpx.Auth:
    """The auth object for a configured mode (``signature_method`` applies to ``oauth1`` only)."""
    if mode == "basic":
        return basic_auth(key, secret)
    if mode == "query":
        return QueryStringAuth(key, secret)
    if mode == "oauth1":
        return OAuth1Auth(key, secret, signature_method)
    raise ValueError(f"unknown WooCommerce auth mode {mode!r}; expected basic, oauth1 or query")


def parse_php_query(pairs: Iterable[tuple[str, str]]) -> dict[str, PhpValue]:
    """Decoded name/value pairs folded the way PHP builds ``$_GET`` from a query string.

    Later duplicates win; ``name[]`` appends and ``name[key]`` sets inside an array; in the part
    before the first ``[``, spaces and dots become ``_`` (PHP's register_globals legacy), and an
    unclosed ``[`` does too.
    """
    result: dict[str, PhpValue] = {}
    for raw_name, value in pairs:
        name = raw_name.lstrip(" ")
        bracket = name.find("[")
        subkeys: list[str] = []
        if bracket > 0 and "]" in name[bracket:]:
            base, rest = name[:bracket], name[bracket:]
            while rest.startswith("["):
                close = rest.find("]")
                if close < 0:
                    break
                subkeys.append(rest[1:close])
                rest = rest[close + 1 :]
        else:
            base = name
            if bracket >= 0:
                base = base[:bracket] + "_" + base[bracket + 1 :]
        base = base.replace(" ", "_").replace(".", "_")
        if not base:
            continue
        if not subkeys:
            result[base] = value
            continue
        container = result
        key = base
        for sub in subkeys:
            child = container.get(key)
            if not isinstance(child, dict):
                child = {}
                container[key] = child
            container = child
            key = sub if sub != "" else _next_php_index(container)
        container[key] = value
    return result


def oauth1_base_string(
    method: str, url: str, params: Mapping[str, str] | Iterable[tuple[str, str]]
) -> str:
    """The string WooCommerce signs (``check_oauth_signature``).

    ``url`` is the scheme, host and path (a query or fragment is ignored: its parameters belong
    in ``params``). ``params`` are decoded request parameters; ``oauth_signature`` is left out.
    WooCommerce sorts parameter names with ``strcmp`` before encoding them, percent-encodes
    names and values (RFC 3986), then percent-encodes each ``name=value`` again and joins them
    with ``%26``. Array parameters are signed as ``name[0]=...``, not as sent (``name[]=...``).
    """
    base_url = url.split("#", 1)[0].split("?", 1)[0]
    folded = parse_php_query(params.items() if isinstance(params, Mapping) else params)
    folded.pop("oauth_signature", None)
    encoded: list[str] = []
    for name in sorted(folded, key=_php_bytes):
        _join_with_equals_sign(_rawurlencode(name), folded[name], encoded, nested=False)
    return f"{method.upper()}&{_rawurlencode(base_url)}&{'%26'.join(encoded)}"


def oauth1_sign(base_string: str, consumer_secret: str, signature_method: str) -> str:
    """Base64 HMAC of the base string keyed with ``consumer_secret + "&"`` (no token secret)."""
    digest = hashlib.sha256 if signature_method == "HMAC-SHA256" else hashlib.sha1
    mac = hmac.new(f"{consumer_secret}&".encode(), base_string.encode(), digest)
    return base64.b64encode(mac.digest()).decode("ascii")


def check_oauth1(
    method: str,
    url: str,
    params: Mapping[str, str] | Iterable[tuple[str, str]],
    consumer_key: str,
    consumer_secret: str,
    now: float,
    seen_nonces: set[tuple[str, str]] | None = None,
) -> AuthError | None:
    """``verify_oauth1`` with the WooCommerce error code as well as the message."""
    folded = parse_php_query(params.items() if isinstance(params, Mapping) else params)
    # PHP's empty(): "" and "0" count as missing, as they do in get_oauth_parameters().
    missing = [name for name in _REQUIRED_OAUTH_PARAMS if folded.get(name) in (None, "", "0", {})]
    if missing:
        noun = "parameter" if len(missing) == 1 else "parameters"
        return AuthError(
            "woocommerce_rest_authentication_missing_parameter",
            f"Missing OAuth {noun} {', '.join(missing)}",
        )
    given_key = folded["oauth_consumer_key"]
    if not isinstance(given_key, str) or not hmac.compare_digest(
        _php_bytes(given_key.strip()), _php_bytes(consumer_key)
    ):
        return AuthError(_AUTH_ERROR, "Consumer key is invalid.")

    # WooCommerce checks the signature before the timestamp and nonce, so a stale but correctly
    # signed request reports the timestamp, and a wrong secret always reports the signature.
    signature_method = folded["oauth_signature_method"]
    if not isinstance(signature_method, str) or signature_method not in OAUTH1_SIGNATURE_METHODS:
        return AuthError(_AUTH_ERROR, "Invalid signature - signature method is invalid.")
    expected = oauth1_sign(
        oauth1_base_string(method, url, params), consumer_secret, signature_method
    )
    given = folded["oauth_signature"]
    # PHP already decoded the query once (turning an unescaped "+" into a space); WooCommerce
    # puts the "+" back and URL-decodes a second time.
    provided = _rawurldecode(given.replace(" ", "+")) if isinstance(given, str) else ""
    if not hmac.compare_digest(_php_bytes(expected), _php_bytes(provided)):
        return AuthError(_AUTH_ERROR, "Invalid signature - provided signature does not match.")

    timestamp = folded["oauth_timestamp"]
    try:
        stamp = float(timestamp) if isinstance(timestamp, str) else float("nan")
    except ValueError:
        stamp = float("nan")
    if not (now - OAUTH_TIMESTAMP_WINDOW <= stamp <= now + OAUTH_TIMESTAMP_WINDOW):
        return AuthError(_AUTH_ERROR, "Invalid timestamp.")

    if seen_nonces is not None:
        entry = (consumer_key, str(folded["oauth_nonce"]))
        if entry in seen_nonces:
            return AuthError(_AUTH_ERROR, "Invalid nonce - nonce has already been used.")
        seen_nonces.add(entry)
    return None


def verify_oauth1(
    method: str,
    url: str,
    params: Mapping[str, str] | Iterable[tuple[str, str]],
    consumer_key: str,
    consumer_secret: str,
    now: float,
    seen_nonces: set[tuple[str, str]] | None = None,
) -> str | None:
    """Check a one-legged OAuth 1.0a request as WooCommerce does; None when it is valid.

    ``url`` is the store's home URL joined with the request path (WooCommerce rebuilds it from
    its configured home URL, not from the Host header); ``params`` are the decoded query and
    form parameters, as a mapping or as ordered pairs (pairs keep repeated ``name[]`` entries).
    On failure returns WooCommerce's message, e.g. ``"Invalid timestamp."``. ``seen_nonces``
    holds ``(consumer_key, nonce)`` pairs already accepted; a valid request's pair is added.
    """
    error = check_oauth1(method, url, params, consumer_key, consumer_secret, now, seen_nonces)
    return None if error is None else error.message


def _join_with_equals_sign(key: str, value: PhpValue, out: list[str], *, nested: bool) -> None:
    # Mirrors WooCommerce's join_with_equals_sign(): top-level names and all values were
    # already encoded by normalize_parameters(); keys inside arrays were not.
    if isinstance(value, dict):
        for sub_key, sub_value in value.items():
            _join_with_equals_sign(f"{key}%5B{sub_key}%5D", sub_value, out, nested=True)
        return
    out.append(_rawurlencode(f"{key}={_rawurlencode(value)}"))


def _next_php_index(container: Mapping[str, PhpValue]) -> str:
    indices = [int(k) for k in container if k.isdigit() or (k.startswith("-") and k[1:].isdigit())]
    return str(max(indices) + 1) if indices and max(indices) >= 0 else "0"


def _php_bytes(text: str) -> bytes:
    # PHP strings are bytes; decoded parameters keep undecodable bytes as surrogates.
    return text.encode("utf-8", "surrogateescape")


def _rawurlencode(text: str) -> str:
    """PHP's rawurlencode(): everything but ``A-Z a-z 0-9 - _ . ~`` is percent-encoded."""
    return quote_from_bytes(_php_bytes(text), safe="")


def _rawurldecode(text: str) -> str:
    return unquote_to_bytes(_php_bytes(text)).decode("utf-8", "surrogateescape")


def _decode_query(raw: bytes) -> list[tuple[str, str]]:
    """Name/value pairs as PHP decodes a query string or form body (``+`` is a space)."""
    pairs: list[tuple[str, str]] = []
    for part in raw.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        pairs.append((_form_decode(name), _form_decode(value)))
    return pairs


def _form_decode(raw: bytes) -> str:
    return unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8", "surrogateescape")


def _is_oauth_param(name: str) -> bool:
    return name.startswith("oauth_")


def _raw_path(url: httpx.URL) -> str:
    return url.raw_path.split(b"?", 1)[0].decode("ascii")


def _replace_query_params(
    url: httpx.URL, *, drop: Callable[[str], bool], add: list[tuple[str, str]]
) -> httpx.URL:
    # Edit the raw query rather than re-encoding it through httpx.QueryParams, so the bytes the
    # server receives (and signs over) are the ones the caller built, plus our parameters.
    kept = [
        part
        for part in url.query.split(b"&")
        if part and not drop(_form_decode(part.partition(b"=")[0]))
    ]
    kept += [f"{_rawurlencode(name)}={_rawurlencode(value)}".encode() for name, value in add]
    return url.copy_with(query=b"&".join(kept))
