"""The quiet console: library INFO lines and Ray worker output go to the stage log, not the terminal."""
from __future__ import annotations

import io
import logging
import sys

import pytest

from definemed import console


@pytest.mark.parametrize("line", [
    "INFO 12-01 14:17:27 [__init__.py:235] Automatically detected platform cpu.",
    "2026-12-01 14:30:15,774\tINFO streaming_executor.py:215 -- Starting execution of Dataset dataset_0",
    "\x1b[36m(RayTrainWorker pid=4242)\x1b[0m INFO 12-01 14:17:27 [model_runner.py:1] Loading weights",
    "(MapWorker(MapBatches(Scorer)) pid=77, ip=10.0.0.2) some library chatter",
    '{"asctime": "2026-12-01 14:00:00,000", "levelname": "INFO", "message": "HTTP Request: POST /v1/chat"}',
    "INFO:     127.0.0.1:51234 - \"POST /v1/chat/completions HTTP/1.1\" 200 OK",
    "\x1b[2m\x1b[36m(pid=27796) \x1b[0m- split(2, equal=True): Tasks: 0; Actors: 0; Queued blocks: 0",
    "                \x1b[2m\x1b[36m(pid=27795) \x1b[0m\u2714\ufe0f  Dataset train finished",
    "   ",
    "\x1b[A",
    "\x1b[A\x1b[36m(SplitCoordinator pid=17949)\x1b[0m Starting execution of Dataset train",
    "INFO 2026-12-01 20:28:18,234 serve 10399 -- Started Serve in namespace \"serve\".",
])
def test_library_chatter_is_noise(line):
    assert console.is_noise(line)


@pytest.mark.parametrize("line", [
    "=== stage pack -> outputs/demo/pack ===",
    "[pack] padding 0.096% of 511 packed sequences vs 26.4% for naive one-document-per-row",
    "WARNING definemed.stages: [pack] already complete in outputs/demo/pack",
    "2026-12-01 14:30:11,799\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled",
    "\x1b[36m(RayTrainWorker pid=4242)\x1b[0m Traceback (most recent call last):",
    "(pid=77) ERROR 12-01 14:17:27 [engine.py:1] EngineCore failed",
    '{"levelname": "WARNING", "message": "slow replica"}',
    "  merged: outputs/demo/merge/model",
])
def test_what_a_user_must_see_is_not_noise(line):
    assert not console.is_noise(line)


def test_stage_log_routes_lines_and_restores_streams(tmp_path, monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(console, "_STATE", {"enabled": True, "verbose": False})
    lib = logging.getLogger("some.library")
    lib_handler = logging.StreamHandler(err)  # a library that printed to the terminal on its own
    lib.addHandler(lib_handler)
    lib.propagate = False
    lib.setLevel(logging.INFO)
    try:
        with console.stage_log("demo", str(tmp_path)) as path:
            print("[demo] visible result")
            print("INFO 12-01 14:17:27 [x.py:1] engine chatter")
            print("(Worker pid=1) worker chatter", file=sys.stderr)
            sys.stderr.write("\rprogress 50%")
            lib.info("library info")
            lib.warning("library warning")
        assert sys.stdout is out and sys.stderr is err
        assert lib_handler.level == logging.NOTSET  # restored
    finally:
        lib.removeHandler(lib_handler)
        lib.propagate = True
        lib.setLevel(logging.NOTSET)
    shown = out.getvalue() + err.getvalue()
    assert "[demo] visible result" in shown and "library warning" in shown and "progress 50%" in shown
    assert "engine chatter" not in shown and "worker chatter" not in shown and "library info" not in shown
    assert f"[demo] log: {path}" in err.getvalue()
    logged = path.read_text()
    for text in ("visible result", "engine chatter", "worker chatter", "library info", "library warning"):
        assert text in logged


def test_failure_prints_the_log_path_and_reraises(tmp_path, monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(console, "_STATE", {"enabled": True, "verbose": False})
    with pytest.raises(RuntimeError):
        with console.stage_log("demo", str(tmp_path)):
            raise RuntimeError("boom")
    assert f"[demo] failed; full log: {tmp_path / 'logs' / 'demo.log'}" in err.getvalue()


def test_verbose_shows_everything(tmp_path, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(console, "_STATE", {"enabled": True, "verbose": True})
    with console.stage_log("demo", str(tmp_path)):
        print("INFO 12-01 14:17:27 [x.py:1] engine chatter")
    assert "engine chatter" in out.getvalue()


def test_a_handler_left_on_a_finished_stage_does_not_raise(tmp_path, quiet_console):
    """Ray or vLLM may keep a logging handler whose stream was the stage's stdout/stderr router; after the stage
    its log file is closed, and the handler must not print "--- Logging error ---" tracebacks."""
    import logging

    from definemed import console

    err = quiet_console("stderr")
    with console.stage_log("pack", str(tmp_path)):
        import sys

        stale = logging.StreamHandler(sys.stderr)  # what a library does while the stage runs
    lg = logging.getLogger("stale-library")
    lg.addHandler(stale)
    try:
        lg.warning("after the stage: still shown")
    finally:
        lg.removeHandler(stale)
    assert "after the stage: still shown" in err.getvalue() and "Logging error" not in err.getvalue()


def test_worker_progress_bars_stay_off_the_console_and_ours_do_not(tmp_path, quiet_console):
    import sys

    from definemed import console

    out = quiet_console("stdout")
    with console.stage_log("classify-train", str(tmp_path)):
        sys.stdout.write("\r\x1b[2m\x1b[36m(pid=17949) \x1b[0m- split(2, equal=True):   0%|   | 0.00/1.00")
        sys.stdout.write("\r[classify-train] epochs:  50%|#####     | 5/10")
    assert "split(2" not in out.getvalue() and "[classify-train] epochs:  50%" in out.getvalue()


def test_a_multi_line_info_record_is_noise_to_its_end_and_a_traceback_is_not(tmp_path, quiet_console):
    from definemed import console

    out = quiet_console("stdout")
    with console.stage_log("serve-demo", str(tmp_path)):
        print("INFO 2026-12-01 20:28:20,777 serve 10399 -- {'autoscaling_config': {'max_replicas': 1,")
        print("                        'min_replicas': 1},")
        print(" 'name': 'model:merged'}")
        print("[serve-demo] answer: ...")
        print("Traceback (most recent call last):")
        print('  File "x.py", line 1, in <module>')
    shown = out.getvalue()
    assert "min_replicas" not in shown and "model:merged" not in shown
    assert "[serve-demo] answer" in shown and 'File "x.py"' in shown


@pytest.fixture()
def quiet_console(monkeypatch):
    """The CLI's quiet console, with one real stream replaced by a buffer the test reads."""
    import io

    from definemed import console

    monkeypatch.setitem(console._STATE, "enabled", True)
    monkeypatch.setitem(console._STATE, "verbose", False)

    def capture(stream: str) -> io.StringIO:
        buf = io.StringIO()
        monkeypatch.setattr(f"sys.{stream}", buf)
        return buf

    return capture


def test_worker_tracebacks_are_shown_whole_or_explained_and_repeated_cleaner_lines_logged_once(tmp_path,
                                                                                               quiet_console):
    """A worker's traceback used to reach the console as a bare first line (its body is worker chatter). The
    harmless resource-tracker KeyErrors of vLLM's Ray Data workers become one note; any other traceback is shown
    whole. Ray Train's PlacementGroupCleaner poll failure is logged once, with a count."""
    from definemed import console

    w = "\x1b[36m(MapWorker(MapBatches(vLLMEngineStageUDF)) pid=4164)\x1b[0m "
    other = "\x1b[36m(MapWorker(MapBatches(Other)) pid=99)\x1b[0m "
    cleaner = ("\x1b[36m(PlacementGroupCleaner pid=5235)\x1b[0m Failed to query Ray Train Controller actor state. "
               "State API may be temporarily unavailable. Continuing to monitor.")
    out = quiet_console("stdout")
    with console.stage_log("annotate", str(tmp_path)) as log:
        for seg in ("/psm_0b6feccf", "/mp-ndo9upfn"):
            print(w + "Traceback (most recent call last):")
            print(w + '  File "/usr/lib/python3.11/multiprocessing/resource_tracker.py", line 239, in main')
            print(w + "    cache[rtype].remove(name)")
            print(w + f"KeyError: '{seg}'")
        print(other + "Traceback (most recent call last):")
        print(other + '  File "udf.py", line 3, in __call__')
        print(w + "INFO 12-02 17:53:00 [core.py:1] engine stopped")  # another worker's chatter in between
        print(other + "ValueError: prompt longer than max_model_len")
        for _ in range(5):
            print(cleaner)
        print("[annotate] labels: {'medical': 3}")
    shown = out.getvalue()
    assert shown.count(console.HARMLESS_TRACEBACK_NOTE) == 1 and "psm_" not in shown
    assert 'File "udf.py"' in shown and "ValueError: prompt longer" in shown  # the real one whole
    assert "engine stopped" not in shown and "[annotate] labels" in shown
    logged = log.read_text()
    assert logged.count("KeyError") == 2 and logged.count("Failed to query") == 1 and "4 more times" in logged


def test_vllm_output_handler_error_after_an_engine_shutdown_is_one_note(tmp_path, quiet_console):
    """annotate's Ray Data vLLM worker shuts its engine down at the end; vLLM 0.32's output handler then logs an
    EngineDeadError traceback that reached the console as a run of ERROR lines in a run that succeeded. Before the
    shutdown, the same lines are a real failure and must be shown."""
    from definemed import console

    w = "\x1b[36m(MapWorker(MapBatches(vLLMEngineStageUDF)) pid=3043)\x1b[0m "
    err = "(MainProcess pid=3043) ERROR 12-07 11:01:37 [async_llm.py:906] "
    handler = [err + "AsyncLLM output_handler failed.", err + "Traceback (most recent call last):",
               err + '  File "vllm/v1/engine/async_llm.py", line 849, in output_handler',
               err + "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue."]
    out = quiet_console("stdout")
    with console.stage_log("annotate", str(tmp_path)) as log:
        print(w + handler[0])  # before any shutdown: a real engine failure
        print(w + "Shutting down vLLM engine")
        print(w + "(MainProcess pid=3043) INFO 12-07 11:01:37 [core_client.py:777] [shutdown] MPClient: complete")
        for line in handler:
            print(w + line)
        print("[annotate] labels: {'medical': 3}")
    shown = out.getvalue()
    assert shown.count("AsyncLLM output_handler failed") == 1  # the one before the shutdown
    assert shown.count(console.SHUTDOWN_NOTE) == 1 and "EngineDeadError: EngineCore" not in shown
    assert "[annotate] labels" in shown
    assert log.read_text().count("AsyncLLM output_handler failed") == 2
