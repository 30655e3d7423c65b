"""API keys that rotate without a restart: a key file of digests with ids, read again whenever its content changes.

The file (`api_key_file`) holds one entry per line; `#` comments and blank lines are ignored:

    {"id": "3f9c1a2b7d04", "sha256": "<sha256 of the key>", "created": "2026-12-07T10:00:00Z", "name": "kis"}
    {"id": "...", "sha256": "...", "created": "...", "revoked": "2026-12-08T09:00:00Z"}
    a-plain-key-of-at-least-16-characters          (the older format: still accepted)

`definemed serve keys add|revoke|list --file FILE` edits it (atomically: a reader sees the old or the new file);
`add` prints the new key once and stores only its digest. Ingress replicas poll the file's *content* hash every
`POLL_S`: a Kubernetes Secret mount updates by swapping a symlink (`..data`), so the path's mtime says nothing.
A file that cannot be read or parsed keeps the previous keys (and is counted and logged), never opens the door.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger("definemed.serve.keys")

POLL_S = 1.0  # how often a replica re-reads the key file (revocation takes effect within ~POLL_S)
MIN_KEY_LEN = 16


class KeyFileError(ValueError):
    """The key file is malformed; the message names the line, never its content."""


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(digest: str) -> str:
    """What logs, metrics, audit lines and `keys list` call a key: a short hash of its digest (never the key)."""
    return hashlib.sha256(bytes.fromhex(digest)).hexdigest()[:12]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class KeyEntry:
    sha256: str
    id: str
    created: Optional[str] = None
    name: Optional[str] = None
    revoked: Optional[str] = None
    plaintext: bool = False  # a line of the older one-key-per-line format

    def to_line(self) -> str:
        d = {"id": self.id, "sha256": self.sha256, "created": self.created}
        if self.name:
            d["name"] = self.name
        if self.revoked:
            d["revoked"] = self.revoked
        return json.dumps(d, separators=(", ", ": "))


@dataclass
class KeyFile:
    entries: list[KeyEntry] = field(default_factory=list)

    @property
    def active(self) -> list[str]:
        return [e.sha256 for e in self.entries if not e.revoked]

    @property
    def revoked(self) -> list[str]:
        return [e.sha256 for e in self.entries if e.revoked]

    def find(self, ident: str) -> KeyEntry:
        hits = [e for e in self.entries if e.id == ident or (e.name and e.name == ident)]
        if len(hits) != 1:
            raise KeyError(f"no key with id or name {ident!r}" if not hits else f"{ident!r} names {len(hits)} keys")
        return hits[0]


def parse_key_file(text: str) -> KeyFile:
    out = KeyFile()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                d = json.loads(line)
                digest = str(d["sha256"]).lower()
                bytes.fromhex(digest)
                if len(digest) != 64:
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                raise KeyFileError(f"key file line {n}: not a key entry "
                                   '({"id", "sha256": <64 hex>, "created"[, "name", "revoked"]})') from None
            out.entries.append(KeyEntry(sha256=digest, id=str(d.get("id") or key_id(digest)),
                                        created=d.get("created"), name=d.get("name"), revoked=d.get("revoked")))
        else:
            if len(line) < MIN_KEY_LEN:
                raise KeyFileError(f"key file line {n}: API keys must be at least {MIN_KEY_LEN} characters "
                                   "(use `definemed serve keys add`)")
            digest = key_digest(line)
            out.entries.append(KeyEntry(sha256=digest, id=key_id(digest), plaintext=True))
    return out


def read_key_file(path: str | os.PathLike) -> KeyFile:
    return parse_key_file(Path(path).expanduser().read_text(encoding="utf-8"))


def plaintext_keys(path: str | os.PathLike) -> list[str]:
    """The keys written in clear in the file (the older format), for a caller that needs one to talk to the app."""
    text = Path(path).expanduser().read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines()
            if ln.strip() and not ln.strip().startswith(("#", "{"))]


def _write(path: Path, kf: KeyFile, header: str) -> None:
    from definemed.io import atomic_write_text

    lines = [header] + [e.to_line() for e in kf.entries]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    os.chmod(path, 0o600)


def _header(path: Path) -> str:
    if path.is_file():
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        if first and first[0].startswith("#"):
            return first[0]
    return "# definemed API keys: digests only (definemed serve keys add|revoke|list)"


def add_key(path: str | os.PathLike, name: Optional[str] = None) -> tuple[str, KeyEntry]:
    """A new random key: its digest goes to the file, the key itself only to the caller (shown once)."""
    p = Path(path).expanduser()
    kf = read_key_file(p) if p.is_file() else KeyFile()
    if name and any(e.name == name and not e.revoked for e in kf.entries):
        raise KeyError(f"an active key is already named {name!r}")
    key = secrets.token_urlsafe(32)
    digest = key_digest(key)
    entry = KeyEntry(sha256=digest, id=key_id(digest), created=utc_now(), name=name)
    header = _header(p)
    # A plaintext line stays as it is only until the file is rewritten: then it becomes its digest.
    kf.entries.append(entry)
    _write(p, kf, header)
    return key, entry


def revoke_key(path: str | os.PathLike, ident: str) -> KeyEntry:
    p = Path(path).expanduser()
    kf = read_key_file(p)
    entry = kf.find(ident)
    if not entry.revoked:
        entry.revoked = utc_now()
    _write(p, kf, _header(p))
    return entry


class KeyWatcher:
    """Polls a key file's content hash; calls `on_change(KeyFile)` when it changes and parses."""

    def __init__(self, path: str | os.PathLike, on_change: Callable[[KeyFile], None],
                 on_error: Optional[Callable[[str], None]] = None, interval: float = POLL_S):
        self.path = Path(path).expanduser()
        self.on_change, self.on_error, self.interval = on_change, on_error, interval
        self._seen: Optional[str] = None
        self._task: Optional[asyncio.Task] = None

    def check(self) -> bool:
        """Read once; True if new keys were applied. A read or parse error keeps the current keys."""
        return self._apply(self._read())

    def _read(self) -> Optional[bytes]:
        try:
            return self.path.read_bytes()
        except OSError as e:
            self._error(f"cannot read the key file ({type(e).__name__}); keeping the current keys")
            return None

    def _apply(self, data: Optional[bytes]) -> bool:
        if data is None:
            return False
        h = hashlib.sha256(data).hexdigest()
        if h == self._seen:
            return False
        self._seen = h  # a bad version is reported once, not every second
        try:
            kf = parse_key_file(data.decode("utf-8"))
        except (KeyFileError, UnicodeDecodeError) as e:
            self._error(f"{e}; keeping the current keys")
            return False
        self.on_change(kf)
        return True

    def _error(self, msg: str) -> None:
        log.error("api_key_file %s: %s", self.path, msg)
        if self.on_error is not None:
            self.on_error(msg)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._apply(await asyncio.to_thread(self._read))  # the file read off the loop, the swap on it

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
