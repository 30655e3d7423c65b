"""Unit tests for the serving guard rails (no Ray, no vLLM): API keys, limits, config validation."""
from __future__ import annotations

import asyncio
import hashlib
import json
import time

import pytest

from definemed.config import ConfigError, parse_config
from serve.config import ServeConfig
from serve.security import (
    KeyStore,
    NoApiKeyError,
    SecurityMiddleware,
    SecuritySettings,
    key_digest,
    load_api_keys,
)

KEY_A = "a" * 24 + "-key-one"
KEY_B = "b" * 24 + "-key-two"


class Downstream:
    """A stand-in for the FastAPI app (test double): records bodies, can block until released."""

    def __init__(self):
        self.bodies: list[bytes] = []
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.bodies.append(body)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("downstream failed")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def scope(key: str | None = KEY_A, headers: list | None = None, scheme: str = "Bearer") -> dict:
    hdrs = list(headers or [])
    if key is not None:
        hdrs.append((b"authorization", f"{scheme} {key}".encode()))
    return {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": hdrs}


def chunks(*parts: bytes):
    msgs = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]

    async def receive():
        return msgs.pop(0) if msgs else {"type": "http.disconnect"}

    return receive


async def call(mw, sc, receive=None) -> tuple[int, dict, dict]:
    out: dict = {"body": b""}

    async def send(msg):
        if msg["type"] == "http.response.start":
            out["status"], out["headers"] = msg["status"], dict(msg["headers"])
        else:
            out["body"] += msg.get("body", b"")

    await mw(sc, receive or chunks(b'{"model": "m"}'), send)
    body = json.loads(out["body"]) if out["body"].startswith(b"{") else {}
    return out["status"], body, out["headers"]


def make(clock=time.monotonic, **kw) -> tuple[SecurityMiddleware, Downstream]:
    app = Downstream()
    settings = SecuritySettings(key_digests=[key_digest(KEY_A), key_digest(KEY_B)], **kw)
    return SecurityMiddleware(app, settings, clock=clock), app


def assert_openai_error(body: dict, code: str):
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"] and body["error"]["type"]


@pytest.mark.parametrize("sc", [scope(None), scope("wrong-" + KEY_A), scope(KEY_A, scheme="Basic"), scope("")],
                         ids=["missing", "wrong", "basic-scheme", "empty"])
def test_missing_or_wrong_key_is_401_and_never_reaches_the_app(sc):
    mw, app = make()
    status, body, headers = asyncio.run(call(mw, sc))
    assert status == 401
    assert_openai_error(body, "invalid_api_key")
    assert headers[b"www-authenticate"] == b"Bearer"
    assert app.bodies == []


def test_any_configured_key_passes_and_the_body_reaches_the_app_unchanged():
    mw, app = make()
    for key in (KEY_A, KEY_B):
        status, _, _ = asyncio.run(call(mw, scope(key), chunks(b'{"model": ', b'"m"}')))
        assert status == 200
    assert app.bodies == [b'{"model": "m"}'] * 2


def test_keystore_compares_every_digest_in_constant_time(monkeypatch):
    import serve.security as sec

    calls = []
    real = sec.hmac.compare_digest
    monkeypatch.setattr(sec.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    store = KeyStore([key_digest(k) for k in (KEY_A, KEY_B, "c" * 32)])
    assert store.match(KEY_A) == hashlib.sha256(KEY_A.encode()).hexdigest()
    assert len(calls) == 3  # no early exit on the first match
    assert store.match("nope") is None and store.match(None) is None


def test_declared_oversized_body_is_413_without_reading_it():
    mw, app = make(max_body_bytes=1024)
    sc = scope(headers=[(b"content-length", b"5000")])

    async def receive():
        raise AssertionError("body must not be read")

    status, body, _ = asyncio.run(call(mw, sc, receive))
    assert status == 413
    assert_openai_error(body, "request_too_large")
    assert app.bodies == []


def test_chunked_oversized_body_without_content_length_is_413():
    mw, app = make(max_body_bytes=1024)
    status, body, _ = asyncio.run(call(mw, scope(), chunks(b"x" * 600, b"y" * 600)))
    assert status == 413 and app.bodies == []
    status, _, _ = asyncio.run(call(mw, scope(), chunks(b"x" * 600, b"y" * 400)))
    assert status == 200


def test_per_key_concurrency_limit_is_429_and_released_after_responses_and_errors():
    async def scenario():
        mw, app = make(max_concurrent_per_key=2)
        app.gate = asyncio.Event()
        first = [asyncio.create_task(call(mw, scope(KEY_A))) for _ in range(2)]
        await asyncio.sleep(0.05)
        status, body, headers = await call(mw, scope(KEY_A))
        assert status == 429 and headers[b"retry-after"] == b"1"
        assert_openai_error(body, "concurrency_limit_exceeded")
        # Another key has its own budget.
        other = asyncio.create_task(call(mw, scope(KEY_B)))
        await asyncio.sleep(0.05)
        assert not other.done()
        app.gate.set()
        assert [s for s, _, _ in await asyncio.gather(*first, other)] == [200, 200, 200]
        assert mw.in_flight == {}
        # A failing request releases its slot too.
        app.gate, app.fail = None, True
        for _ in range(3):
            with pytest.raises(RuntimeError):
                await call(mw, scope(KEY_A))
        assert mw.in_flight == {}

    asyncio.run(scenario())


def test_rate_limit_per_key_with_retry_after():
    now = [1000.0]
    mw, _ = make(requests_per_minute_per_key=3, clock=lambda: now[0])
    statuses = [asyncio.run(call(mw, scope(KEY_A)))[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    status, body, headers = asyncio.run(call(mw, scope(KEY_A)))
    assert status == 429 and int(headers[b"retry-after"]) >= 1
    assert_openai_error(body, "rate_limit_exceeded")
    assert asyncio.run(call(mw, scope(KEY_B)))[0] == 200  # separate bucket
    now[0] += 20.0  # 3/min refills one token every 20 s
    assert asyncio.run(call(mw, scope(KEY_A)))[0] == 200


def test_lifespan_scope_passes_through():
    mw, _ = make()
    seen = []

    async def app(sc, receive, send):
        seen.append(sc["type"])

    mw.app = app
    asyncio.run(mw({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]


def test_keys_from_env_and_secret_file(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text(f"# rotated 2026-11\n{KEY_B}\n\n{KEY_A}\n", encoding="utf-8")
    monkeypatch.setenv("DM_TEST_KEYS", f"{KEY_A}, {'c' * 20}")
    assert load_api_keys("DM_TEST_KEYS", str(f)) == [KEY_A, "c" * 20, KEY_B]
    monkeypatch.delenv("DM_TEST_KEYS")
    assert load_api_keys("DM_TEST_KEYS", None) == []
    with pytest.raises(NoApiKeyError, match="api_key_file"):
        load_api_keys(None, str(tmp_path / "missing"))
    monkeypatch.setenv("DM_TEST_KEYS", "short")
    with pytest.raises(NoApiKeyError, match="16 characters"):
        load_api_keys("DM_TEST_KEYS", None)
    with pytest.raises(NoApiKeyError):
        SecuritySettings(key_digests=[])


def test_no_configured_key_refuses_to_start(monkeypatch):
    from serve.security import resolve_key_digests

    monkeypatch.delenv("DM_TEST_NOKEY", raising=False)
    with pytest.raises(NoApiKeyError, match="api_key_env"):
        resolve_key_digests("DM_TEST_NOKEY", None)
    monkeypatch.setenv("DM_TEST_NOKEY", KEY_A)
    assert resolve_key_digests("DM_TEST_NOKEY", None) == [key_digest(KEY_A)]


BASE = {"models": [{"id": "merged", "model": "tiny://qwen2"}]}


@pytest.mark.parametrize("patch, field", [
    ({"cors_origins": ["*"]}, "cors_origins"),
    ({"cors_origins": ["https://*.klinikum.example"]}, "cors_origins"),
    ({"host": "example.org"}, "host"),
    ({"port": 70000}, "port"),
    ({"models": []}, "models"),
    ({"models": [{"id": "m", "model": "tiny://qwen2"}, {"id": "m", "model": "tiny://qwen2@1"}]}, "<root>"),
    ({"models": [{"id": "m", "model": "outputs/nowhere/merge/model"}]}, "models.0.model"),
    ({"models": [{"id": "m", "model": "tiny://qwen2", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}]},
     "models.0.autoscaling"),
    ({"limits": {"max_body_bytes": 10}}, "limits.max_body_bytes"),
    ({"api_key_env": None, "api_key_file": None}, "<root>"),
    ({"tls_certfile": "/x.crt"}, "<root>"),
    ({"api_key": "inline-secret"}, "api_key"),
    ({"models": [{"id": "m", "model": "tiny://qwen2", "autoscaling": {"min_replicas": 0}}]}, "<root>"),
    ({"limits": {"max_concurrent_per_key": 3},
      "models": [{"id": "m", "model": "tiny://qwen2", "autoscaling": {"max_replicas": 2}}]}, "<root>"),
])
def test_invalid_serve_config_names_the_field(patch, field):
    with pytest.raises(ConfigError) as e:
        parse_config(ServeConfig, {**BASE, **patch}, source="serve.yaml")
    assert f"'{field}'" in str(e.value) and "\n" not in str(e.value)


def test_shipped_configs_validate(tmp_path):
    from definemed.config import load_yaml

    # The laptop config names the demo's merge output; stand in for it so validation sees an existing path.
    data = load_yaml("configs/serve.yaml")
    for m in data["models"]:
        if not str(m["model"]).startswith("tiny://"):
            m["model"] = str(tmp_path)
    cfg = parse_config(ServeConfig, data)
    assert cfg.host == "127.0.0.1" and cfg.cors_origins == [] and not cfg.log_requests
    cluster = load_yaml("configs/cluster/serve.yaml")
    for m in cluster["models"]:
        m["model"] = str(tmp_path)  # /models/... exist only on the cluster
    ccfg = parse_config(ServeConfig, cluster)
    assert {m.id for m in ccfg.models} == {"base", "cpt", "merged", "judge"}
    assert max(m.autoscaling.max_replicas for m in ccfg.models) > 1
    serve_yaml = load_yaml("serve/config.yaml")
    assert serve_yaml["applications"][0]["import_path"] == "serve.app:app_builder"
    assert serve_yaml["http_options"]["host"] == "127.0.0.1"


def test_cli_serve_refuses_without_key_or_with_bad_config(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from definemed.cli import app

    monkeypatch.delenv("DM_TEST_CLI_KEY", raising=False)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("api_key_env: DM_TEST_CLI_KEY\nmodels: [{id: m, model: tiny://qwen2}]\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["serve", "--config", str(cfg)])
    assert res.exit_code == 2 and "api_key_env" in res.output and "no API key" in res.output
    cfg.write_text("host: 0.0.0.0\ncors_origins: ['*']\nmodels: [{id: m, model: tiny://qwen2}]\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["serve", "--config", str(cfg)])
    assert res.exit_code == 2 and "'cors_origins'" in res.output


def test_serve_run_builder_refuses_tls_it_cannot_terminate(tmp_path, monkeypatch):
    """Under `serve run`/RayService, Serve's proxy (http_options) terminates TLS; the app's tls_* alone would be
    silently ignored, so the builder refuses with one line saying where TLS belongs."""
    from serve.app import app_builder

    monkeypatch.setenv("DM_TEST_TLS_KEY", KEY_A)
    for name in ("tls.crt", "tls.key"):
        (tmp_path / name).write_text("x", encoding="utf-8")
    args = {"api_key_env": "DM_TEST_TLS_KEY", "models": [{"id": "m", "model": "tiny://qwen2"}],
            "tls_certfile": str(tmp_path / "tls.crt"), "tls_keyfile": str(tmp_path / "tls.key")}
    with pytest.raises(ValueError) as e:
        app_builder(args)
    msg = str(e.value)
    assert "'tls_certfile'" in msg and "http_options.ssl_certfile" in msg and "\n" not in msg


def test_rayservice_terminates_tls_at_serves_proxy_with_the_apps_certificate():
    import yaml

    from definemed.config import load_yaml

    rs = yaml.safe_load(open("infra/k8s/rayservice.yaml", encoding="utf-8"))
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    app = load_yaml(serve_cfg["applications"][0]["args"]["config"])
    http = serve_cfg["http_options"]
    assert (http["ssl_certfile"], http["ssl_keyfile"]) == (app["tls_certfile"], app["tls_keyfile"])
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert "https://127.0.0.1:8000/" in " ".join(head[probe]["exec"]["command"])
