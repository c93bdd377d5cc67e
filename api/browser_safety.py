"""Browser safety: which Host names this server answers to, which web origins may change it,
and what CORS grants. A hostile page reaches a local server in two ways — DNS rebinding (a name
of its own made to resolve to 127.0.0.1) and cross-site requests a browser sends without a
preflight (form, text/plain or multipart POSTs) — and these rules stop both before any work.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable
from urllib.parse import urlsplit

from flask import Flask, Request, request
from flask_cors import CORS
from werkzeug.wsgi import host_is_trusted

from services.errors import HostNotAllowed, OriginNotAllowed

# Served whatever the Host: a Kubernetes liveness probe sends the pod's IP, which no default
# list can name, and a probe that fails restarts the pod. /health tells a rebinding page only
# "ok" or "shutting_down".
_ANY_HOST_ENDPOINTS = {"monitoring.health"}
# Methods that change nothing; every other method is a write and must not come from a foreign page.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# What a browser may expose to a page of another origin.
_EXPOSED_HEADERS = ["X-Request-ID", "Retry-After", "X-Cache", "X-RateLimit-Limit",
                    "X-RateLimit-Remaining", "X-RateLimit-Reset", "X-RateLimit-Limit-Tokens",
                    "X-RateLimit-Remaining-Tokens", "X-RateLimit-Reset-Tokens"]


def _host_name(host: str) -> str | None:
    """The name or address in a `host[:port]` value, lower-cased, IPv6 brackets and one
    trailing dot removed; None when there is none or it does not parse."""
    try:
        name = urlsplit("//" + host).hostname
    except ValueError:                  # "[evil]", "[::1": brackets around a non-address
        return None
    return name.removesuffix(".") if name else None


def _address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None


class HostRule:
    """ALLOWED_HOSTS: the Host names this server answers to, against DNS rebinding (a page on
    attacker.example whose name is made to resolve to 127.0.0.1 sends `Host: attacker.example`).

    Ports are ignored; "*" allows any Host; ".example.com" allows example.com and its
    subdomains. Flask's TRUSTED_HOSTS is not used: its check lets the before_request hooks run
    first, loses the route (so no dialect's error shape), answers a generic bad_request, and
    never matches an IPv6 Host such as `[::1]:5000`.
    """

    def __init__(self, entries: Iterable[str]):
        entries = tuple(entries)
        self.any = "*" in entries
        self.addresses, self.names = set(), []
        for entry in entries:
            # A bare IPv6 address ("fd00::3") is no host[:port]: try it as an address first.
            name = entry.lower() if _address(entry) else _host_name(entry) or entry.lower()
            address = _address(name)
            if address is not None:
                self.addresses.add(address)
            elif entry != "*":
                self.names.append(name)

    def allows(self, host: str) -> bool:
        """`host` is Werkzeug's `request.host`: already "" when its characters are invalid."""
        if self.any:
            return True
        name = _host_name(host)
        if name is None:
            return False
        address = _address(name)
        if address is not None:
            return address in self.addresses
        # host_is_trusted matches names (IDNA, leading-dot suffixes), but trusts every name
        # when its list is empty.
        return bool(self.names) and host_is_trusted(name, self.names)


class OriginRule:
    """Which web pages may send a write (any method but GET, HEAD, OPTIONS): the server's own
    origin and the origins CORS_ORIGINS names. A "*" there opens reads to every page, never
    writes. Browsers send Origin with every cross-origin write, and a form, text/plain or
    multipart POST needs no preflight, so this check, not CORS, is what stops them; clients
    that send no Origin (curl, SDKs) are not browsers and pass.
    """

    def __init__(self, cors_origins: Iterable[str]):
        # "null" is the origin of sandboxed frames and local files: any page can make one.
        self.named = {origin.rstrip("/").lower() for origin in cors_origins} - {"*", "null"}

    def check(self, req: Request) -> None:
        """:raise OriginNotAllowed: a write from a page of a foreign origin."""
        if req.method in _SAFE_METHODS:
            return
        origin = req.headers.get("Origin")
        if origin is None:
            # An old browser may omit Origin, but says where the request comes from; "same-site"
            # is another port or subdomain, so another origin.
            if req.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site"):
                raise OriginNotAllowed("this server refuses writes from pages of other sites")
            return
        origin = origin.strip().lower()
        if origin == f"{req.scheme}://{req.host}".lower() or origin in self.named:
            return
        raise OriginNotAllowed(f"the web origin {origin[:200]!r} may not change this server; "
                               "list it in CORS_ORIGINS to allow it")


def register_cors(app: Flask, origins: Iterable[str]) -> None:
    """CORS headers for the CORS_ORIGINS setting: origins it names may use every method; a "*"
    lets any page read (GET, HEAD) but its preflight for a write is not granted.

    flask-cors takes one method list for all its origins, so a "*" and the named origins get
    one instance each. Flask runs after_request hooks newest first and flask-cors leaves a
    response that already has Access-Control-Allow-Origin alone, so the named origins, added
    last, are looked up first. Exceptions are not intercepted: error responses pass through
    the same after_request hooks.
    """
    origins = tuple(origins)
    named = [origin for origin in origins if origin != "*"]
    if "*" in origins:
        CORS(app, origins="*", methods=["GET", "HEAD"], expose_headers=_EXPOSED_HEADERS,
             intercept_exceptions=False)
    if named:
        CORS(app, origins=named, expose_headers=_EXPOSED_HEADERS, intercept_exceptions=False)


def check_host(hosts: HostRule) -> None:
    """:raise HostNotAllowed: the Host header names no host in ALLOWED_HOSTS."""
    if request.endpoint in _ANY_HOST_ENDPOINTS or hosts.allows(request.host):
        return
    raise HostNotAllowed(f"this server does not answer to the host "
                         f"{request.headers.get('Host', '')[:200]!r}; add it to ALLOWED_HOSTS")
