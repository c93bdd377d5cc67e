"""Secrets out of what is shown: a URI's password, for the startup log, docs page and errors."""

from __future__ import annotations

import re

_PASSWORD_PARAM = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def mask_uri(uri: str) -> str:
    """`uri` with its password hidden (`redis://user:***@host`; a bare userinfo may be one too,
    and so may a `password=` query parameter)."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        userinfo, _, hosts = authority.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        authority = f"{user}:***@{hosts}" if colon else f"***@{hosts}"
    return f"{scheme}{sep}{authority}" + _PASSWORD_PARAM.sub(r"\1***", tail)
