"""Who may reach the service: loopback by default; any other address only with a bearer token
(or an explicit choice to serve without one)."""

from __future__ import annotations

import ipaddress
from pathlib import Path


def is_loopback(host: str) -> bool:
    """True for "localhost" and the loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str | Path) -> str:
    """The bearer token in a file (surrounding whitespace dropped).

    Raises:
        ValueError: the file is unreadable or holds no token, or a token of characters an
            HTTP header cannot carry.
    """
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--token-file {path}: unreadable ({err})") from None
    if not token:
        raise ValueError(f"--token-file {path}: the file holds no token")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError(f"--token-file {path}: a token is printable ASCII without spaces")
    return token


def check_exposure(host: str, token_file: str | None, insecure: bool) -> None:
    """Refuse to listen beyond loopback without a token, unless `insecure` says so.

    Raises:
        ValueError: `host` is not a loopback address and neither a token file nor `insecure`
            is given (the message names the flags to add).
    """
    if is_loopback(host) or token_file is not None or insecure:
        return
    raise ValueError(f"--host {host} accepts connections from other machines: add --token-file "
                     "FILE (clients then send 'Authorization: Bearer <the file's token>'), or "
                     "--insecure to serve without authentication")
