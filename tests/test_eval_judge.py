"""Judge parsing, unparsed counting, bounded retries and resume, through the real `openai` client with an HTTP
test double (httpx.MockTransport) standing in for the endpoint."""
from __future__ import annotations

import json
import re
import threading

import httpx
import pytest

from definemed.data.schemas import PromptItem
from definemed.eval.client import Endpoint, RequestFailed, RetryConfig
from definemed.eval.generate import GenerationConfig, generate_answers
from definemed.eval.judge import (JudgeConfig, answer_flags, flag_counts, judge_pairs, pair_tasks,
                                  parse_judgment)
from definemed.eval.win_rate import combine_orders

GOOD = {"korrektheit": "A", "vollstaendigkeit": "A", "sicherheit": "gleich", "sprache": "A", "urteil": "A",
        "antwort_a": {"halluzination": False, "ueberkonfidenz": False, "widerspruch": False},
        "antwort_b": {"halluzination": True, "ueberkonfidenz": True, "widerspruch": False},
        "begruendung": "A ist korrekt."}


def test_parse_judgment_json_fenced_text_and_garbage():
    assert parse_judgment(json.dumps(GOOD))["verdict"] == "A"
    p = parse_judgment("Hier mein Urteil:\n```json\n" + json.dumps({**GOOD, "urteil": "unentschieden"}) + "\n```")
    assert p["verdict"] == "tie" and p["flags_b"] == {"hallucination": True, "overconfidence": True,
                                                       "contradiction": False}
    # a response cut off mid-JSON still states its verdict explicitly
    assert parse_judgment('{"korrektheit": "B", "urteil": "B", "antwort_a": {"halluz')["verdict"] == "B"
    cut = parse_judgment('{"urteil":"A","antwort_a":{"halluzination":true,"ueberkonfidenz":false,'
                         '"widerspruch":false},"antwort_b":{"halluzination":false,"ueberkonfidenz":true,'
                         '"widerspruch":false},"begruendung":"abgeschnitt')
    assert cut["verdict"] == "A" and cut["parsed_from"] == "text"
    assert cut["flags_a"] == {"hallucination": True, "overconfidence": False, "contradiction": False}
    assert cut["flags_b"]["overconfidence"] is True
    for bad in ["", "Antwort A ist besser.", "A", "{\"urteil\": \"vielleicht\"}", "Urteil: A ... Urteil: B",
                "\x00\x01 ## !!", "null", "[1, 2]"]:
        assert parse_judgment(bad)["verdict"] == "unparsed", bad


def _completion(content: str, model: str = "m") -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class FakeJudge:
    """HTTP double of an OpenAI endpoint. Verdict: the answer containing "gut" wins; prompts whose text contains
    "KAPUTT" get a malformed reply. Counts every request per (prompt, order)."""

    def __init__(self, kill_after: int | None = None, fail_first: int = 0):
        self.calls: dict[tuple[str, str, str], int] = {}
        self.total = 0
        self.kill_after = kill_after
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        user = body["messages"][-1]["content"]
        with self.lock:
            self.total += 1
            n = self.total
        if self.fail_first and n <= self.fail_first:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        if self.kill_after is not None and n > self.kill_after:
            raise KeyboardInterrupt("killed")  # a kill: not an Exception, nothing may swallow it
        prompt = re.search(r"## Anfrage\n(.*?)\n\n## Antwort A", user, re.S).group(1)
        a = re.search(r"## Antwort A\n(.*?)\n\n## Antwort B", user, re.S).group(1)
        b = re.search(r"## Antwort B\n(.*?)\n\nVergleiche", user, re.S).group(1)
        with self.lock:
            k = (prompt, a, b)
            self.calls[k] = self.calls.get(k, 0) + 1
        if "KAPUTT" in prompt:
            return httpx.Response(200, json=_completion("Ich kann das nicht beurteilen {{{"))
        verdict = "A" if "gut" in a else "B" if "gut" in b else "unentschieden"

        def flags(ans):  # the weaker answer is labelled, whatever its position
            weak = "mäßig" in ans
            return {"halluzination": weak, "ueberkonfidenz": weak, "widerspruch": False}

        reply = {**GOOD, "urteil": verdict, "antwort_a": flags(a), "antwort_b": flags(b)}
        return httpx.Response(200, json=_completion(json.dumps(reply)))


def _endpoint(handler) -> Endpoint:
    return Endpoint(base_url="http://judge.test/v1", model="judge", api_key="k",
                    http_client=httpx.Client(transport=httpx.MockTransport(handler)))


PROMPTS = [PromptItem(id=f"p{i}", category="patient_question", prompt=f"Frage {i}?") for i in range(6)]
PROMPTS.append(PromptItem(id="bad", category="patient_question", prompt="KAPUTT: Frage?"))
ANSWERS = {"cand": {p.id: f"gut: Antwort {p.id}" for p in PROMPTS},
           "opp": {p.id: f"mäßig: Antwort {p.id}" for p in PROMPTS}}
CFG = JudgeConfig(concurrency=1, retry=RetryConfig(max_retries=2, backoff_s=0.0))


def test_malformed_answer_is_counted_and_does_not_crash(tmp_path):
    fake = FakeJudge()
    tasks = pair_tasks(PROMPTS, ANSWERS, [("cand", "opp")])
    assert len(tasks) == 2 * len(PROMPTS)
    recs = judge_pairs(_endpoint(fake), tasks, tmp_path / "j.jsonl", CFG)
    by = {(r["prompt_id"], r["model_a"]): r["verdict"] for r in recs}
    outcomes = [combine_orders(by[(p.id, "cand")], by[(p.id, "opp")])[0] for p in PROMPTS]
    assert outcomes.count("unparsed") == 1 and outcomes.count("win") == 6
    assert by[("bad", "cand")] == "unparsed" and by[("bad", "opp")] == "unparsed"
    # flags: "opp" was flagged in both orders for every parsed prompt, "cand" never
    flags = answer_flags(recs)
    assert flag_counts(flags, "opp") == {"hallucination": 6, "overconfidence": 6, "contradiction": 0}
    assert flag_counts(flags, "cand") == {"hallucination": 0, "overconfidence": 0, "contradiction": 0}


def test_resumed_run_never_judges_a_pair_twice(tmp_path):
    tasks = pair_tasks(PROMPTS, ANSWERS, [("cand", "opp"), ("opp", "cand")])  # reversed pair shares judgments
    assert len(tasks) == 2 * len(PROMPTS)
    cache = tmp_path / "j.jsonl"
    first = FakeJudge(kill_after=5)
    with pytest.raises(KeyboardInterrupt):
        judge_pairs(_endpoint(first), tasks, cache, CFG)
    assert sum(1 for line in cache.read_text().splitlines() if line.strip()) == 5
    with cache.open("a") as f:
        f.write('{"key": "torn')  # a kill in the middle of a write
    second = FakeJudge()
    recs = judge_pairs(_endpoint(second), tasks, cache, CFG)
    assert len(recs) == len(tasks) and all(r is not None for r in recs)
    assert second.total == len(tasks) - 5
    merged = dict(first.calls)
    for k, v in second.calls.items():
        merged[k] = merged.get(k, 0) + v
    assert len(merged) == len(tasks) and set(merged.values()) == {1}  # every (prompt, order) judged exactly once
    third = FakeJudge()
    judge_pairs(_endpoint(third), tasks, cache, CFG)
    assert third.total == 0


def test_bounded_retries(tmp_path):
    tasks = pair_tasks(PROMPTS[:1], ANSWERS, [("cand", "opp")])
    flaky = FakeJudge(fail_first=2)  # two 503s, then fine: within the bound of 2 retries
    recs = judge_pairs(_endpoint(flaky), tasks, tmp_path / "a.jsonl", CFG)
    assert [r["verdict"] for r in recs] == ["A", "B"]
    down = FakeJudge(fail_first=10**6)
    with pytest.raises(RequestFailed, match="2 of 2"):
        judge_pairs(_endpoint(down), tasks, tmp_path / "b.jsonl", CFG)
    assert down.total == 2 * 3  # each request: 1 try + 2 retries, then given up


def test_generate_is_resumable(tmp_path):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body["messages"][-1]["content"])
        assert body["messages"][0]["role"] == "system" and body["temperature"] == 0.0
        return httpx.Response(200, json=_completion("Antwort auf " + body["messages"][-1]["content"]))

    ep = _endpoint(handler)
    cfg = GenerationConfig(concurrency=2, retry=RetryConfig(max_retries=0))
    out = generate_answers("cand", ep, PROMPTS[:3], tmp_path / "g.jsonl", cfg)
    assert {k: v["answer"] for k, v in out.items()} == {p.id: f"Antwort auf {p.prompt}" for p in PROMPTS[:3]}
    out = generate_answers("cand", ep, PROMPTS[:5], tmp_path / "g.jsonl", cfg)
    assert len(seen) == 5 and len(out) == 5
