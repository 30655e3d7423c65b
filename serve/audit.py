"""The endpoint's audit trail: one JSON line per request (refused ones included), hash-chained, append-only,
rotated by size without breaking the chain. No prompt or answer text is ever written, only their SHA-256.

Three parts:

- `Observation` / `Recorder` (in each ingress replica): the security middleware fills an Observation per request
  (references to the request body and the answer chunks, status, key id, times) and hands it over in O(1). A
  background task turns Observations into records every `FLUSH_S` (hashes, token counts, the model), counts them
  in the metrics, and sends them in batches to the app's writer. A batch the writer does not take is kept and sent
  again (bounded); what is dropped is counted (`definemed_serve_audit_write_failures_total`).
- `AuditLog` (in one writer actor per app, `AuditWriter`): the chain. One writer per chain is what makes a chain
  possible across several ingress replicas; it is a detached actor with restarts, and a restarted writer continues
  from the last line on disk. Records carry an id, so a batch that reached the disk before a crash and is sent
  again is not written twice.
- `verify` (`definemed serve audit verify FILE|DIR...`): recomputes every line's hash and checks each line names its
  predecessor, across the rotated files; names the first bad line.

Each line: `{"seq", "time", "request_id", "record_id", "key_id", "route", "method", "status", "refusal", "model",
"weights_sha256", "stream", "prompt_tokens", "completion_tokens", "usage", "latency_ms", "completed",
"prompt_sha256", "answer_sha256", "prev", "hash"}`; `hash` is the SHA-256 of the line's canonical JSON without
`hash`, `prev` the previous line's `hash` (the first line of a rotated file: the last of the file before; the very
first line: 64 zeros).
"""
from __future__ import annotations

import asyncio
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Optional

log = logging.getLogger("definemed.serve.audit")

GENESIS = "0" * 64
FILE_RE = re.compile(r"^audit-(\d{6,})\.jsonl$")
HEAD_NAME = "audit.head.json"
LOCK_NAME = ".writer.lock"
FLUSH_S = 0.2  # a replica hands its records to the writer at least this often
MAX_BATCH = 512
MAX_UNSENT = 50_000  # records a replica holds while the writer is away; beyond this the oldest are dropped
SEND_TIMEOUT_S = 10.0
RECENT_IDS = 200_000  # record ids the writer remembers to drop a batch sent twice
FSYNC_S = 1.0  # group commit: the writer fsyncs at most this often (a line is on disk within ~1 s)

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready")
COMPLETIONS = ("/v1/chat/completions", "/v1/completions")


class AuditError(RuntimeError):
    pass


def log_to_stderr() -> None:
    """In an actor of ours: INFO and above to the worker's stderr (Ray keeps it as logs/worker-*.err)."""
    lg = logging.getLogger("definemed.serve")
    if not lg.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False


def canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def line_hash(body: dict) -> str:
    """The hash of a line: SHA-256 of its canonical JSON without the `hash` field."""
    return hashlib.sha256(canonical({k: v for k, v in body.items() if k != "hash"})).hexdigest()


def audit_files(directory: str | os.PathLike) -> list[Path]:
    d = Path(directory)
    found = [(int(m[1]), p) for p in d.iterdir() if (m := FILE_RE.match(p.name))] if d.is_dir() else []
    return [p for _, p in sorted(found)]


def route_of(path: str) -> str:
    """A fixed set of route names (metric labels and audit lines never carry a client-chosen path)."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


# ---------------------------------------------------------------- the chain on disk (one writer)
class AuditLog:
    """Appends records to `directory/audit-NNNNNN.jsonl`, a new file once one exceeds `max_file_bytes`.

    With `fsync`, lines reach the disk by group commit: `sync()` (called after a batch once `FSYNC_S` has passed,
    and by the writer actor's timer) fsyncs what was written since. With an fsync per batch the writer fell
    behind under load on the 2-core machine (docs/serving.md, Benchmark)."""

    def __init__(self, directory: str | os.PathLike, max_file_bytes: int = 64 << 20, fsync: bool = True):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_file_bytes, self.fsync = max_file_bytes, fsync
        self._dirty, self._synced_at = False, time.monotonic()
        self._lock = open(self.dir / LOCK_NAME, "a")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise AuditError(f"another audit writer holds {self.dir} (one writer per chain: give each app its own "
                             "audit.dir)") from None
        self.seq, self.prev = 0, GENESIS
        self.recent: OrderedDict[str, None] = OrderedDict()
        self.index, self._fd, self.size = 1, None, 0
        self._recover()

    def _recover(self) -> None:
        """Continue the chain from the last complete line on disk (a torn last line starts a new file)."""
        files = audit_files(self.dir)
        torn = False
        if files:
            data = files[-1].read_bytes()
            torn = bool(data) and not data.endswith(b"\n")
            self.index = int(FILE_RE.match(files[-1].name)[1]) + (1 if torn else 0)
        found = False
        for path in reversed(files[-2:] if len(files) > 1 else files):  # ids of the last two files: no duplicates
            for raw in path.read_bytes().split(b"\n"):
                try:
                    rec = json.loads(raw) if raw else None
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("record_id"):
                    self._remember(rec["record_id"])
        for path in reversed(files):
            for raw in reversed(path.read_bytes().split(b"\n")):
                try:
                    rec = json.loads(raw) if raw else None
                except ValueError:
                    continue
                if isinstance(rec, dict) and "hash" in rec:
                    self.seq, self.prev, found = int(rec["seq"]), str(rec["hash"]), True
                    break
            if found:
                break
        if torn:
            log.error("audit: %s ends in a torn line (a crash mid-write); continuing the chain in a new file from "
                      "seq %d", files[-1].name, self.seq)
        head = self.head_on_disk()
        if head and int(head.get("seq", 0)) > self.seq:
            log.error("audit: %s records seq %s but the files end at seq %d: lines are missing from the end",
                      HEAD_NAME, head.get("seq"), self.seq)
        if self.seq:
            log.info("audit: continuing the chain in %s at seq %d (prev %s)", self.dir, self.seq, self.prev[:16])

    def head_on_disk(self) -> Optional[dict]:
        p = self.dir / HEAD_NAME
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _remember(self, rid: str) -> None:
        self.recent[rid] = None
        if len(self.recent) > RECENT_IDS:
            self.recent.popitem(last=False)

    def _path(self) -> Path:
        return self.dir / f"audit-{self.index:06d}.jsonl"

    def _open(self) -> None:
        p = self._path()
        self._fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.size = os.fstat(self._fd).st_size

    def _write(self, chunk: list[bytes]) -> None:
        if chunk:
            os.write(self._fd, b"".join(chunk))
            self._dirty = True

    def sync(self) -> None:
        """fsync what was written since the last call (no-op when clean or without fsync)."""
        if self._dirty and self.fsync and self._fd is not None:
            os.fsync(self._fd)
        self._dirty, self._synced_at = False, time.monotonic()

    def _rotate(self) -> None:
        log.info("audit: %s closed at seq %d, last hash %s", self._path().name, self.seq, self.prev)
        self.sync()  # a closed file is complete on disk
        os.close(self._fd)
        self.index += 1
        self._open()

    def append(self, records: Iterable[dict]) -> int:
        """Chain and write the records (those already written, by record_id, are skipped); returns how many."""
        if self._fd is None:
            self._open()
        chunk: list[bytes] = []
        pending = 0
        n = 0
        for rec in records:
            rec = {k: v for k, v in rec.items() if not k.startswith("_")}  # transport flags are not audit data
            rid = rec.get("record_id")
            if rid and rid in self.recent:
                continue
            body = {**rec, "seq": self.seq + 1, "prev": self.prev}
            body["hash"] = line_hash(body)
            line = canonical(body) + b"\n"
            if self.size + pending + len(line) > self.max_file_bytes and self.size + pending > 0:
                self._write(chunk)
                self.size += pending
                chunk, pending = [], 0
                self._rotate()
            chunk.append(line)
            pending += len(line)
            self.seq, self.prev = body["seq"], body["hash"]
            if rid:
                self._remember(rid)
            n += 1
        self._write(chunk)
        self.size += pending
        if n:
            self._write_head()
        if time.monotonic() - self._synced_at >= FSYNC_S:
            self.sync()
        return n

    def _write_head(self) -> None:
        # A cross-check for verify (it may lag the files, never lead them): replaced atomically, not fsynced.
        tmp = self.dir / f".{HEAD_NAME}.tmp"
        tmp.write_text(json.dumps({"seq": self.seq, "hash": self.prev, "file": self._path().name}), encoding="utf-8")
        os.replace(tmp, self.dir / HEAD_NAME)

    def close(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None
        self._lock.close()


# ---------------------------------------------------------------- verification
@dataclass
class Verdict:
    ok: bool
    lines: int
    files: int
    head: Optional[str] = None
    error: Optional[str] = None  # "FILE:LINE: what is wrong" for the first bad line
    warnings: list[str] = field(default_factory=list)


def _expand(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], Optional[Path]]:
    files: list[Path] = []
    head = None
    for p in map(Path, paths):
        if p.is_dir():
            files += audit_files(p)
            head = p / HEAD_NAME if (p / HEAD_NAME).is_file() else head
        else:
            files.append(p)

    def order(p: Path):
        m = FILE_RE.match(p.name)
        return (0, int(m[1]), str(p)) if m else (1, 0, "")

    return sorted(dict.fromkeys(files), key=order), head


def verify(paths: Iterable[str | os.PathLike], partial: bool = False) -> Verdict:
    """Check a chain: a directory (its audit-*.jsonl in order, and its head file) or files (rotated ones in
    order). `partial` accepts a chain whose first line does not start at genesis (older files deleted by a
    retention policy). A file's last line cut short by a crash mid-write (no newline, not JSON) is a warning:
    the writer continued the chain from the line before it."""
    files, head_file = _expand(paths)
    v = Verdict(False, 0, len(files))
    if not files:
        v.error = "no audit files found"
        return v
    prev, seq = None, None
    head_seq, seen = None, {}
    if head_file is not None:
        try:
            head_seq = int(json.loads(head_file.read_text(encoding="utf-8")).get("seq"))
        except (ValueError, TypeError):
            head_seq = None
    for path in files:
        if not path.is_file():
            v.error = f"{path}: not found"
            return v
        data = path.read_bytes()
        raws = data.split(b"\n")
        tail = raws.pop()  # b"" when the file ends with a newline
        for i, raw in enumerate(raws + ([tail] if tail else []), 1):
            where = f"{path}:{i}"
            try:
                body = json.loads(raw)
                if not isinstance(body, dict):
                    raise ValueError
            except ValueError:
                if i == len(raws) + 1:
                    v.warnings.append(f"{where}: torn line (cut short by a crash mid-write); skipped")
                    continue
                v.error = f"{where}: not a JSON object (edited or damaged line)"
                return v
            if "hash" not in body or "prev" not in body or "seq" not in body:
                v.error = f"{where}: not an audit line (no seq/prev/hash)"
                return v
            if line_hash(body) != body["hash"]:
                v.error = f"{where}: edited (its hash does not match its content)"
                return v
            if prev is None:
                if body["prev"] != GENESIS and not partial:
                    v.error = (f"{where}: the chain does not start here (its prev is not genesis: earlier lines or "
                               "files are missing; --partial accepts this)")
                    return v
            elif body["prev"] != prev:
                v.error = (f"{where}: does not follow the line before it (a line was removed, inserted or moved "
                           "before this one)")
                return v
            if seq is not None and body["seq"] != seq + 1:
                v.error = f"{where}: seq {body['seq']} after {seq}"
                return v
            prev, seq = body["hash"], body["seq"]
            if seq == head_seq:
                seen[seq] = prev
            v.lines += 1
    v.head = prev
    if head_file is not None:  # written after each batch: it may lag the files by one batch, never lead them
        try:
            head = json.loads(head_file.read_text(encoding="utf-8"))
        except ValueError:
            v.error = f"{head_file}: not JSON"
            return v
        at = seen.get(head.get("seq"))
        if at is None or at != head.get("hash"):
            v.error = (f"{files[-1]}: the chain ends at seq {seq} but {HEAD_NAME} records seq {head.get('seq')} "
                       "with another hash (lines removed from the end, or the head file was edited)")
            return v
    v.ok = True
    return v


# ---------------------------------------------------------------- the writer actor (one per app)
@dataclass
class AuditSettings:
    """Where an app's audit trail goes (`ServeConfig.audit`); what replicas and the writer need."""

    dir: str
    max_file_bytes: int = 64 << 20
    fsync: bool = True


class AuditWriter:
    """The Ray actor holding an app's AuditLog. Calls run one at a time (a sync actor): one chain, one order."""

    def __init__(self, settings: AuditSettings, application: str):
        from serve.metrics import ServeMetrics

        import threading

        log_to_stderr()
        self.log = AuditLog(settings.dir, settings.max_file_bytes, settings.fsync)
        self.metrics = ServeMetrics(application)
        self._lock = threading.Lock()
        threading.Thread(target=self._group_commit, daemon=True).start()

    def _group_commit(self) -> None:
        while True:  # the lines of the last batch before a quiet spell reach the disk too
            time.sleep(FSYNC_S)
            with self._lock:
                self.log.sync()

    def append(self, records: list[dict]) -> int:
        with self._lock:
            n = self.log.append(records)
        self.metrics.audit_lines(n)
        return n

    def head(self) -> dict:
        return {"seq": self.log.seq, "hash": self.log.prev, "file": self.log._path().name}


def writer_name(app_name: str) -> str:
    return f"definemed-audit:{app_name}"


_WRITER_CLS = None


def get_writer(app_name: str, settings: AuditSettings):
    """The app's writer (created on first use; detached, restarted on failure, on the head node: the audit volume
    is mounted there and nowhere else)."""
    global _WRITER_CLS
    import ray

    from serve.control import NAMESPACE

    if _WRITER_CLS is None:
        _WRITER_CLS = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(AuditWriter)
    # DEFAULT: not in the placement group of the replica that may start it (it would die with that replica)
    return _WRITER_CLS.options(name=writer_name(app_name), namespace=NAMESPACE, lifetime="detached",
                               get_if_exists=True, resources={"node:__internal_head__": 0.001},
                               scheduling_strategy="DEFAULT").remote(settings, app_name)


def lookup_writer(app_name: str):
    from serve.control import lookup_named

    return lookup_named(writer_name(app_name))


def kill_writer(app_name: str) -> None:
    from serve.control import kill_named

    kill_named(writer_name(app_name))


# ---------------------------------------------------------------- the replica side
_COUNTER = itertools.count(1)


class Observation:
    """What the middleware saw of one request. Filled on the request path with references only (no copies,
    no hashing, no parsing); `Recorder` turns it into a record later."""

    __slots__ = ("record_id", "t_wall", "t0", "t_end", "request_id", "method", "path", "key_id", "refusal",
                 "status", "body", "answer", "weights", "done", "keep")

    def __init__(self, scope: dict, replica_tag: str, keep: bool):
        self.record_id = f"{replica_tag}-{next(_COUNTER)}"
        self.t_wall, self.t0, self.t_end = time.time(), time.perf_counter(), None
        self.request_id = None
        for k, v in scope.get("headers", ()):
            if k == b"x-request-id":  # set by Serve's proxy (or the client): the id in the access log and the reply
                self.request_id = v.decode("latin-1")
                break
        root = scope.get("root_path", "")
        path = scope.get("path", "")
        self.method, self.path = scope.get("method"), path[len(root):] if root and path.startswith(root) else path
        self.key_id = self.refusal = self.weights = None
        self.status: Optional[int] = None
        self.body: Optional[bytes] = None
        self.answer: list[bytes] = []
        self.done, self.keep = False, keep

    def wrap(self, send):
        async def send_observed(msg: dict) -> None:
            kind = msg["type"]
            if kind == "http.response.start":
                self.status = msg["status"]
                for k, v in msg.get("headers", ()):
                    if k == b"x-definemed-weights":
                        self.weights = v.decode("latin-1")
            elif kind == "http.response.body":
                if self.keep and msg.get("body"):
                    self.answer.append(msg["body"])
                if not msg.get("more_body", False):
                    self.done, self.t_end = True, time.perf_counter()
            await send(msg)

        return send_observed


def _usage(answer: bytes, stream: bool) -> tuple[Optional[int], Optional[int], Optional[str]]:
    """(prompt tokens, completion tokens, source): from the response's usage; for a stream without
    `stream_options.include_usage`, completion tokens counted as the SSE events that carry text."""
    if not stream:
        try:
            u = json.loads(answer).get("usage") or {}
            return u.get("prompt_tokens"), u.get("completion_tokens"), "usage" if u else None
        except (ValueError, AttributeError):
            return None, None, None
    events = [e[6:] for e in answer.split(b"\n\n") if e.startswith(b"data: ") and e[6:] != b"[DONE]"]
    parsed = []
    for e in events:
        try:
            parsed.append(json.loads(e))
        except ValueError:
            continue
    for ev in reversed(parsed):
        u = ev.get("usage") if isinstance(ev, dict) else None
        if u:
            return u.get("prompt_tokens"), u.get("completion_tokens"), "usage"
    n = 0
    for ev in parsed:
        for c in (ev.get("choices") or []) if isinstance(ev, dict) else []:
            if (c.get("delta") or {}).get("content") or c.get("text"):
                n += 1
    return None, n, "counted"


def _sha(b: Optional[bytes]) -> Optional[str]:
    return hashlib.sha256(b).hexdigest() if b else None


def to_record(o: Observation, models: dict[str, Optional[str]], local_model: str) -> dict[str, Any]:
    """An Observation as an audit line (without seq/prev/hash). `models`: served id -> weights hash of this
    replica's own model (others come from the answer's x-definemed-weights header)."""
    route = route_of(o.path)
    model = stream = None
    prompt_tokens = completion_tokens = usage = None
    if route in COMPLETIONS and o.body is not None:
        try:
            data = json.loads(o.body)
        except ValueError:
            data = None
        if isinstance(data, dict):
            requested = data.get("model", local_model)
            model = requested if requested in models else "unknown"  # never a client-chosen string
            stream = bool(data.get("stream"))
        if o.status == 200 and o.answer:
            prompt_tokens, completion_tokens, usage = _usage(b"".join(o.answer), bool(stream))
    weights = o.weights or (models.get(model) if model == local_model else None)
    latency = ((o.t_end or time.perf_counter()) - o.t0) * 1000
    return {"time": datetime.fromtimestamp(o.t_wall, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "request_id": o.request_id, "record_id": o.record_id, "key_id": o.key_id, "route": route,
            "method": o.method, "status": o.status, "refusal": o.refusal, "model": model,
            "weights_sha256": weights if model not in (None, "unknown") else None, "stream": stream,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "usage": usage,
            "latency_ms": round(latency, 2), "completed": o.done,
            "prompt_sha256": _sha(o.body), "answer_sha256": _sha(b"".join(o.answer)) if o.answer else None}


class Recorder:
    """A replica's side of metrics and audit: `observe` on the request path, the rest in a background task."""

    def __init__(self, metrics, local_model: str, models: dict[str, Optional[str]], replica_tag: str,
                 writer: Optional[Callable[[list[dict]], Awaitable[Any]]] = None):
        self.metrics, self.local_model, self.models, self.replica_tag = metrics, local_model, models, replica_tag
        self.writer = writer  # None: audit off (metrics only)
        self._pending: list[Observation] = []
        self._unsent: list[dict] = []
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._retry_at, self._backoff = 0.0, 0.0  # after a failed send: wait before the next try (up to 10 s)

    @property
    def auditing(self) -> bool:
        return self.writer is not None

    def begin(self, scope: dict) -> Observation:
        return Observation(scope, self.replica_tag, keep=self.auditing)

    def observe(self, o: Observation) -> None:
        if o.status is None:  # the app raised before answering: Serve answers 500
            o.status = 500
        self._pending.append(o)
        if len(self._pending) >= MAX_BATCH and self._wake is not None:
            self._wake.set()

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), FLUSH_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must survive anything a record can throw
                log.exception("audit: flush failed")

    def drain(self) -> list[dict]:
        """Turn the pending Observations into records and count them (no I/O)."""
        obs, self._pending = self._pending, []
        records = []
        for o in obs:
            route = route_of(o.path)
            self.metrics.request(o.key_id, route, o.status)
            if o.status == 429 and o.key_id:
                self.metrics.limited(o.key_id, o.refusal or "limit")
            if self.auditing:
                records.append(to_record(o, self.models, self.local_model))
        return records

    async def flush(self, force: bool = False) -> None:
        self._unsent += self.drain()
        if not force and time.monotonic() < self._retry_at:
            for r in self._unsent:  # not sent now: each counts as not written on its first try
                if not r.get("_retry"):
                    r["_retry"] = True
                    self.metrics.audit_failure("writer_unavailable")
            return
        while self._unsent and self.writer is not None:
            batch = self._unsent[:MAX_BATCH]
            try:
                await asyncio.wait_for(self.writer(batch), SEND_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - kept and sent again with the next flush
                first = [r for r in self._unsent if not r.get("_retry")]
                for r in first:
                    r["_retry"] = True
                if first:  # each record is counted once, however often it has to be sent again
                    self.metrics.audit_failure("writer_unavailable", len(first))
                self._backoff = min(10.0, max(0.5, self._backoff * 2))
                self._retry_at = time.monotonic() + self._backoff
                log.warning("audit: writer did not take %d records (%s); keeping them (%d held), next try in %.1fs",
                            len(batch), type(e).__name__, len(self._unsent), self._backoff)
                break
            del self._unsent[:len(batch)]
            self._backoff = 0.0
        over = len(self._unsent) - MAX_UNSENT
        if over > 0:
            del self._unsent[:over]
            self.metrics.audit_failure("dropped", over)
            log.error("audit: dropped the %d oldest records: the writer has been away too long", over)

    async def close(self, timeout: float = 10.0) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            await asyncio.wait_for(self.flush(force=True), timeout)
        except Exception:  # noqa: BLE001
            if self._unsent:
                self.metrics.audit_failure("dropped", len(self._unsent))
                log.error("audit: %d records not written at shutdown", len(self._unsent))
