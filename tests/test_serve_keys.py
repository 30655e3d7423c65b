"""Key rotation without a restart (no Ray, no vLLM): the key file of digests, `definemed serve keys`, the watcher
that follows a Kubernetes Secret's symlink swap, and the middleware swapping keys under in-flight requests."""
from __future__ import annotations

import asyncio
import json
import os

import pytest

from serve.keys import KeyFileError, KeyWatcher, add_key, key_digest, key_id, parse_key_file, read_key_file, revoke_key
from serve.security import SecurityMiddleware, SecuritySettings

ENV_KEY = "e" * 24 + "-env-key"


def test_key_file_holds_digests_with_ids_and_still_reads_plain_keys(tmp_path):
    f = tmp_path / "keys.jsonl"
    key, entry = add_key(f, name="kis")
    text = f.read_text()
    assert key not in text and key_digest(key) in text  # only the digest is stored
    assert entry.id == key_id(key_digest(key)) and len(entry.id) == 12 and entry.id not in key
    assert oct(f.stat().st_mode & 0o777) == "0o600"
    f.write_text(text + "p" * 20 + "-a-plain-key\n", encoding="utf-8")  # the older one-key-per-line format
    kf = read_key_file(f)
    assert kf.active == [key_digest(key), key_digest("p" * 20 + "-a-plain-key")]
    with pytest.raises(KeyFileError, match="line 2") as e:
        parse_key_file('# c\n{"id": "x", "sha256": "nothex"}\n')
    assert "nothex" not in str(e.value)  # errors name the line, never its content
    with pytest.raises(KeyFileError, match="16 characters"):
        parse_key_file("short\n")


def test_revoke_marks_the_entry_and_a_name_or_id_selects_it(tmp_path):
    f = tmp_path / "keys.jsonl"
    a, ea = add_key(f, name="a")
    b, eb = add_key(f, name="b")
    with pytest.raises(KeyError):
        add_key(f, name="a")
    revoke_key(f, "b")
    kf = read_key_file(f)
    assert kf.active == [key_digest(a)] and kf.revoked == [key_digest(b)]
    assert kf.find(eb.id).revoked
    with pytest.raises(KeyError):
        revoke_key(f, "nobody")


def test_cli_keys_add_prints_the_key_once_and_list_and_revoke_change_the_file(tmp_path):
    from typer.testing import CliRunner

    from definemed.cli import app

    f = tmp_path / "keys.jsonl"
    runner = CliRunner()
    res = runner.invoke(app, ["serve", "keys", "add", "--file", str(f), "--name", "kis"])
    assert res.exit_code == 0, res.output
    key = res.output.strip().splitlines()[0]
    assert len(key) >= 32 and key not in f.read_text() and key_digest(key) in f.read_text()
    listed = runner.invoke(app, ["serve", "keys", "list", "--file", str(f)])
    assert listed.exit_code == 0 and key_id(key_digest(key)) in listed.output and "kis" in listed.output
    assert key not in listed.output and "active" in listed.output
    res = runner.invoke(app, ["serve", "keys", "revoke", "kis", "--file", str(f)])
    assert res.exit_code == 0 and read_key_file(f).active == []
    assert "revoked" in runner.invoke(app, ["serve", "keys", "list", "--file", str(f)]).output
    res = runner.invoke(app, ["serve", "keys", "revoke", "nobody", "--file", str(f)])
    assert res.exit_code == 2 and "nobody" in res.output


def _secret_mount(root, content: str, version: str) -> None:
    """Lay out a directory the way the kubelet mounts a Secret: api_keys -> ..data/api_keys, ..data -> ..<ts>,
    and an update swaps the ..data symlink atomically (the path api_keys itself never changes)."""
    d = root / f"..{version}"
    d.mkdir()
    (d / "api_keys").write_text(content, encoding="utf-8")
    tmp = root / "..data_tmp"
    os.symlink(d.name, tmp)
    os.replace(tmp, root / "..data")
    if not (root / "api_keys").is_symlink():
        os.symlink("..data/api_keys", root / "api_keys")


def test_watcher_follows_a_kubernetes_secret_symlink_swap_and_keeps_keys_on_a_bad_file(tmp_path):
    a, b = "a" * 32, "b" * 32
    _secret_mount(tmp_path, f"{a}\n{b}\n", "2026_12_01")
    seen, errors = [], []
    w = KeyWatcher(tmp_path / "api_keys", seen.append, errors.append, interval=0.05)
    assert w.check() and seen[-1].active == [key_digest(a), key_digest(b)]
    assert not w.check()  # same content: nothing to do
    link_stat = os.lstat(tmp_path / "api_keys")
    _secret_mount(tmp_path, f"{a}\n", "2026_12_02")  # b revoked by rewriting the Secret
    assert os.lstat(tmp_path / "api_keys").st_mtime == link_stat.st_mtime  # the path's own mtime says nothing
    assert w.check() and seen[-1].active == [key_digest(a)]
    _secret_mount(tmp_path, '{"id": broken\n', "2026_12_03")
    assert not w.check() and len(seen) == 2 and "line 1" in errors[-1]
    os.unlink(tmp_path / "api_keys")
    assert not w.check() and "cannot read" in errors[-1]

    async def polls():  # the same through the replica's poll loop
        got = []
        w2 = KeyWatcher(tmp_path / "keys2", got.append, interval=0.05)
        (tmp_path / "keys2").write_text(f"{a}\n")
        w2.start()
        await asyncio.sleep(0.2)
        (tmp_path / "keys2").write_text(f"{b}\n")
        await asyncio.sleep(0.3)
        w2.stop()
        return got

    got = asyncio.run(polls())
    assert [kf.active for kf in got] == [[key_digest(a)], [key_digest(b)]]


class Held:
    """A downstream app (test double) whose answers wait for `release`."""

    def __init__(self):
        self.release = asyncio.Event()

    async def __call__(self, scope, receive, send):
        await receive()
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def _call(mw, key: str) -> int:
    out = {}

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(msg):
        out.setdefault("status", msg.get("status"))

    await mw({"type": "http", "method": "POST", "path": "/v1/completions",
              "headers": [(b"authorization", f"Bearer {key}".encode())]}, receive, send)
    return out["status"]


def test_revoking_a_key_refuses_it_at_once_and_leaves_other_keys_in_flight_requests_alone(tmp_path):
    from serve.audit import Recorder

    class Metrics:  # counts what the recorder reports (test double)
        def __init__(self):
            self.requests = []

        def request(self, key_id, route, status):
            self.requests.append((key_id, status))

        def limited(self, *a):
            pass

    f = tmp_path / "keys.jsonl"
    a, _ = add_key(f, name="a")
    b, eb = add_key(f, name="b")

    async def scenario():
        app = Held()
        metrics = Metrics()
        rec = Recorder(metrics, "m", {"m": None}, "r1")
        mw = SecurityMiddleware(app, SecuritySettings([key_digest(ENV_KEY)], key_file=str(f)), recorder=rec)
        w = KeyWatcher(f, mw.set_file_keys)
        assert await _call(mw, b) == 401  # before the file is read only the environment's key counts
        w.check()
        in_flight_a = asyncio.create_task(_call(mw, a))
        in_flight_b = asyncio.create_task(_call(mw, b))
        await asyncio.sleep(0.05)
        revoke_key(f, "b")
        assert w.check()
        assert await _call(mw, b) == 401  # the revoked key is refused from the next request on
        app.release.set()
        assert await in_flight_a == 200 and await in_flight_b == 200  # admitted requests finish
        assert await _call(mw, a) == 200 and await _call(mw, ENV_KEY) == 200  # the environment's key stays
        rec.drain()
        return metrics.requests

    requests = asyncio.run(scenario())
    assert (key_id(key_digest(b)), 401) in requests  # a revoked key's refusal names the key
    assert requests.count((None, 401)) == 1  # the unknown key before the first read
