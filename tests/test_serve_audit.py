"""The audit trail without Ray or vLLM: the hash chain on disk (rotation, a restarted writer, a torn line), what
`definemed serve audit verify` catches, and the records the middleware and the recorder make of each request."""
from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from serve.audit import GENESIS, AuditError, AuditLog, Recorder, audit_files, line_hash, verify
from serve.keys import key_digest, key_id
from serve.security import SecurityMiddleware, SecuritySettings

MARKER = "Zebrafinkenquarantäne-AUDIT"
KEY = "k" * 32


def records(n: int, start: int = 0) -> list[dict]:
    return [{"record_id": f"r-{i}", "request_id": f"req-{i}", "status": 200, "route": "/v1/completions"}
            for i in range(start, start + n)]


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_chain_rotates_by_size_and_verifies_across_files(tmp_path):
    log = AuditLog(tmp_path, max_file_bytes=2000)
    assert log.append(records(30)) == 30
    files = audit_files(tmp_path)
    assert len(files) >= 3 and all(f.stat().st_size <= 2000 for f in files)
    assert oct(files[0].stat().st_mode & 0o777) == "0o640"
    first, second = lines(files[0]), lines(files[1])
    assert first[0]["prev"] == GENESIS and first[0]["seq"] == 1
    assert second[0]["prev"] == first[-1]["hash"]  # a rotated file opens with the last hash of the one before
    assert all(line_hash(r) == r["hash"] for r in first + second)
    v = verify([tmp_path])
    assert v.ok and v.lines == 30 and v.files == len(files) and v.head == log.prev
    assert verify(files).ok  # the same files named one by one (e.g. a glob)
    log.close()


def test_a_restarted_writer_continues_the_chain_and_skips_a_batch_sent_twice(tmp_path):
    log = AuditLog(tmp_path)
    log.append(records(5))
    with pytest.raises(AuditError, match="another audit writer"):
        AuditLog(tmp_path)  # one writer per chain
    log.close()
    log = AuditLog(tmp_path)  # e.g. the writer actor restarted
    assert log.seq == 5
    assert log.append(records(8)) == 3  # r-0..r-4 reached the disk before the crash: not written again
    log.close()
    v = verify([tmp_path])
    assert v.ok and v.lines == 8


def test_a_torn_last_line_is_a_warning_and_the_chain_goes_on_in_a_new_file(tmp_path):
    log = AuditLog(tmp_path)
    log.append(records(3))
    log.close()
    f = audit_files(tmp_path)[0]
    with open(f, "ab") as fh:
        fh.write(b'{"seq": 4, "prev": "ab')  # the process died mid-write
    log = AuditLog(tmp_path)
    log.append(records(2, start=10))
    log.close()
    assert len(audit_files(tmp_path)) == 2
    v = verify([tmp_path])
    assert v.ok and v.lines == 5 and "torn line" in v.warnings[0]


def _tamper(tmp_path, how: str):
    log = AuditLog(tmp_path, max_file_bytes=1500)
    log.append(records(20))
    log.close()
    files = audit_files(tmp_path)
    f = files[0]
    raw = f.read_text().splitlines()
    if how == "edit":
        raw[2] = raw[2].replace('"status":200', '"status":500')
    elif how == "edit_and_rehash":  # a careful forger recomputes the edited line's own hash
        body = json.loads(raw[2])
        body["status"] = 500
        body["hash"] = line_hash(body)
        raw[2] = json.dumps(body, sort_keys=True, separators=(",", ":"))
    elif how == "remove":
        del raw[2]
    elif how == "reorder":
        raw[2], raw[3] = raw[3], raw[2]
    elif how == "remove_last_file_tail":
        f = files[-1]
        raw = f.read_text().splitlines()[:-1]
    f.write_text("\n".join(raw) + "\n")
    return f


@pytest.mark.parametrize("how, line, says", [("edit", 3, "edited"), ("edit_and_rehash", 4, "does not follow"),
                                             ("remove", 3, "does not follow"), ("reorder", 3, "does not follow"),
                                             ("remove_last_file_tail", None, "audit.head.json")])
def test_verify_names_the_first_bad_line(tmp_path, how, line, says):
    f = _tamper(tmp_path, how)
    v = verify([tmp_path])
    assert not v.ok and says in v.error
    if line is not None:
        assert v.error.startswith(f"{f}:{line}:")


def test_cli_audit_verify_exit_codes(tmp_path):
    from typer.testing import CliRunner

    from definemed.cli import app

    log = AuditLog(tmp_path)
    log.append(records(4))
    log.close()
    runner = CliRunner()
    res = runner.invoke(app, ["serve", "audit", "verify", str(tmp_path)])
    assert res.exit_code == 0 and "intact: 4 lines" in res.output
    f = audit_files(tmp_path)[0]
    text = f.read_text().splitlines()
    f.write_text("\n".join([text[0], text[2], text[1], text[3]]) + "\n")
    res = runner.invoke(app, ["serve", "audit", "verify", str(f)])
    assert res.exit_code == 1 and f"{f}:2:" in res.output
    assert runner.invoke(app, ["serve", "audit", "verify", str(tmp_path / "nothing")]).exit_code == 1


# ---------------------------------------------------------------- what a request becomes
class Metrics:
    def __init__(self):
        self.calls = []

    def request(self, key_id, route, status):
        self.calls.append(("request", key_id, route, status))

    def limited(self, key_id, reason):
        self.calls.append(("limited", key_id, reason))

    def audit_failure(self, reason, n=1):
        self.calls.append(("audit_failure", reason, n))


class Vllm:
    """A stand-in for vLLM's app (test double): answers with a usage block, or streams SSE."""

    async def __call__(self, scope, receive, send):
        body = json.loads((await receive())["body"])
        hdrs = [(b"content-type", b"application/json"), (b"x-definemed-weights", b"sha256-tree:abc")]
        if not body.get("stream"):
            payload = json.dumps({"choices": [{"message": {"content": "Antwort"}}],
                                  "usage": {"prompt_tokens": 7, "completion_tokens": 3}}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": hdrs})
            await send({"type": "http.response.body", "body": payload})
            return
        await send({"type": "http.response.start", "status": 200, "headers": hdrs})
        for tok in ("Ant", "wort", "!"):
            ev = {"choices": [{"delta": {"content": tok}}]}
            await send({"type": "http.response.body", "body": f"data: {json.dumps(ev)}\n\n".encode(),
                        "more_body": True})
        if (body.get("stream_options") or {}).get("include_usage"):
            ev = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
            await send({"type": "http.response.body", "body": f"data: {json.dumps(ev)}\n\n".encode(),
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def _post(mw, body: dict, key=KEY, path="/v1/chat/completions", rid="req-1", headers=()):
    raw = json.dumps(body).encode()
    sent = []

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(msg):
        sent.append(msg)

    hdrs = [(b"x-request-id", rid.encode()), (b"content-length", str(len(raw)).encode()), *headers]
    if key:
        hdrs.append((b"authorization", f"Bearer {key}".encode()))
    await mw({"type": "http", "method": "POST", "path": path, "headers": hdrs}, receive, send)
    return raw, sent


def test_each_request_becomes_one_record_with_hashes_and_tokens_and_no_text(tmp_path):
    written: list[dict] = []

    async def writer(batch):
        written.extend(batch)

    async def scenario():
        metrics = Metrics()
        rec = Recorder(metrics, "merged", {"merged": "sha256-tree:local", "judge": None}, "rep1", writer=writer)
        mw = SecurityMiddleware(Vllm(), SecuritySettings([key_digest(KEY)], max_body_bytes=2048,
                                                         max_concurrent_per_key=4), recorder=rec)
        msgs = [{"role": "user", "content": f"{MARKER} Brustschmerz?"}]
        plain, sent = await _post(mw, {"model": "judge", "messages": msgs}, rid="r-plain")
        answer = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        await _post(mw, {"model": "merged", "messages": msgs, "stream": True,
                         "stream_options": {"include_usage": True}}, rid="r-usage")
        await _post(mw, {"model": "merged", "messages": msgs, "stream": True}, rid="r-count")
        await _post(mw, {"model": MARKER, "messages": msgs}, rid="r-unknown-model")
        await _post(mw, {"model": "merged", "messages": msgs}, key="wrong-" + KEY, rid="r-401")
        await _post(mw, {"model": "merged", "messages": [{"role": "user", "content": MARKER * 200}]}, rid="r-413")
        mw.set_shares({"max_concurrent_per_key": 0})
        await _post(mw, {"model": "merged", "messages": msgs}, rid="r-429")
        await rec.flush()
        return metrics, plain, answer

    metrics, plain, answer = asyncio.run(scenario())
    by = {r["request_id"]: r for r in written}
    assert list(by) == ["r-plain", "r-usage", "r-count", "r-unknown-model", "r-401", "r-413", "r-429"]
    p = by["r-plain"]
    assert p["prompt_sha256"] == hashlib.sha256(plain).hexdigest()
    assert p["answer_sha256"] == hashlib.sha256(answer).hexdigest()
    assert (p["status"], p["model"], p["weights_sha256"], p["key_id"]) == (200, "judge", "sha256-tree:abc",
                                                                           key_id(key_digest(KEY)))
    assert (p["prompt_tokens"], p["completion_tokens"], p["usage"], p["stream"]) == (7, 3, "usage", False)
    assert p["latency_ms"] >= 0 and p["completed"] and p["route"] == "/v1/chat/completions"
    assert (by["r-usage"]["prompt_tokens"], by["r-usage"]["completion_tokens"], by["r-usage"]["usage"]) == (7, 3,
                                                                                                         "usage")
    assert (by["r-count"]["prompt_tokens"], by["r-count"]["completion_tokens"], by["r-count"]["usage"]) == (
        None, 3, "counted")
    assert by["r-unknown-model"]["model"] == "unknown"  # a client-chosen string never reaches the log
    assert (by["r-401"]["status"], by["r-401"]["key_id"], by["r-401"]["refusal"]) == (401, None, "invalid_api_key")
    assert (by["r-413"]["status"], by["r-413"]["refusal"]) == (413, "body_too_large")
    assert (by["r-429"]["status"], by["r-429"]["refusal"]) == (429, "concurrency_limit")
    text = json.dumps(written, ensure_ascii=False)
    assert MARKER not in text and "Brustschmerz" not in text and "Antwort" not in text
    assert ("limited", key_id(key_digest(KEY)), "concurrency_limit") in metrics.calls
    assert [c[3] for c in metrics.calls if c[0] == "request"] == [200, 200, 200, 200, 401, 413, 429]


def test_records_the_writer_did_not_take_are_kept_sent_again_and_counted(tmp_path):
    log = AuditLog(tmp_path)
    up = [False]

    async def writer(batch):
        if not up[0]:
            raise ConnectionError("writer restarting")
        log.append(batch)

    async def scenario():
        metrics = Metrics()
        rec = Recorder(metrics, "m", {"m": None}, "rep", writer=writer)
        mw = SecurityMiddleware(Vllm(), SecuritySettings([key_digest(KEY)]), recorder=rec)
        for i in range(3):
            await _post(mw, {"model": "m", "messages": []}, rid=f"q{i}")
        await rec.flush()
        assert len(rec._unsent) == 3
        up[0] = True
        await _post(mw, {"model": "m", "messages": []}, rid="q3")
        await rec.flush()  # still backing off: q3 waits too, counted once
        assert len(rec._unsent) == 4
        await rec.flush(force=True)
        return metrics

    metrics = asyncio.run(scenario())
    assert sum(c[2] for c in metrics.calls if c[0] == "audit_failure") == 4  # each record once
    log.close()
    assert [r["request_id"] for r in lines(audit_files(tmp_path)[0])] == ["q0", "q1", "q2", "q3"]
    assert verify([tmp_path]).ok
