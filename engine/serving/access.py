"""Who may reach the service: loopback by default; any other address only with a bearer token
(or an explicit choice to serve without one)."""

from __future__ import annotations

import ipaddress
import os
import socket
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


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in the LISTEN state that process `pid` or any of its
    descendants holds (Linux: from /proc).

    Raises:
        OSError: no /proc (another system), or the process is gone.
    """
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            todo += [int(c) for c in task.read_text().split()]
    inodes = set()
    for p in pids:
        for fd in Path(f"/proc/{p}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            raw, port = address.split(":")
            packed = bytes.fromhex(raw)
            # /proc prints the address as 32-bit words, each in host (little-endian) order
            words = b"".join(packed[i:i + 4][::-1] for i in range(0, len(packed), 4))
            found.append((socket.inet_ntop(family, words), int(port, 16)))
    return sorted(set(found))
