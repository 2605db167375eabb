"""Secrets kept out of what servetune prints: passwords in URLs (`postgresql://u:PASS@host/db`), in any text."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

_URL_PASSWORD = re.compile(r"(//[^/\s:@]*:)[^/\s@]*@")


def redact_url(url: str) -> str:
    """`postgresql://user:pass@host/db` -> `postgresql://user:***@host/db`."""
    return _URL_PASSWORD.sub(r"\1***@", url)


def redact_text(text: str, *urls: str | None) -> str:
    """`text` with URL passwords masked, and the passwords of `urls` masked wherever else they appear
    (an exception may quote them outside a URL, or percent-decoded)."""
    text = redact_url(text)
    for url in urls:
        if not url:
            continue
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        for secret in {password, unquote(password)} if password else ():
            if len(secret) >= 3:  # masking "a" everywhere would mangle the text, and hides nothing
                text = text.replace(secret, "***")
    return text
