"""A quiet console: each stage prints its header, progress bars, warnings, errors and outputs; everything else
(INFO logs of vLLM, Ray, transformers, Ray worker output) goes to `<output_dir>/logs/<stage>.log`.

The CLI turns this on (`configure(verbose=False)`); `-v/--verbose` prints the full stream as well. Library use
(tests, notebooks) leaves the streams alone unless configured.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import sys
import traceback
from pathlib import Path
from typing import Iterator, TextIO

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STATE = {"enabled": False, "verbose": False}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# "(RayTrainWorker pid=123)", "(pid=123, ip=10.0.0.1)", optionally coloured: output Ray forwards from workers.
_WORKER_PREFIX = re.compile(r"^\s*(?:\x1b\[[0-9;]*[A-Za-z])*\(.{0,200}?\bpid=\d+[^)]*\)")
# A line that is itself a log record below WARNING, in the formats of vLLM, Ray, Python logging and JSON logs.
_INFO_RECORD = re.compile(
    r"^(?:\x1b\[[0-9;]*[A-Za-z])*(?:"
    r"(?:INFO|DEBUG)\s+\d\d-\d\d \d\d:\d\d:\d\d"  # vLLM: INFO 12-01 14:00:00 [file.py:1] ...
    r"|\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d+\s+(?:INFO|DEBUG)\b"  # Ray / logging: 2026-12-01 14:00:00,123 INFO
    r"|\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+\]\s+(?:INFO|DEBUG)\b"
    r"|(?:INFO|DEBUG)(?::|\s+-)\s"  # INFO: / INFO - (uvicorn, some libraries)
    r"|(?:INFO|DEBUG)\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+"  # Ray Serve: INFO 2026-12-01 20:28:18,234 serve
    r")")
_PROBLEM = re.compile(r"\b(?:ERROR|CRITICAL|Traceback|Exception|Error:|FAILED)\b")
# A vLLM engine's worker processes exit at the end of a Ray Data job; Python's multiprocessing resource tracker in
# the engine actor was relaunched meanwhile ("process died unexpectedly") with an empty registry, and then prints a
# KeyError traceback for every shared-memory segment (/psm_*, /mp-*) whose owner already freed it. Harmless.
_HARMLESS_TRACEBACK = re.compile(r"resource_tracker\.py.*\n(?:.*\n)*.*KeyError: '/(?:psm_|mp-)")
HARMLESS_TRACEBACK_NOTE = ("[note] a vLLM worker's multiprocessing resource tracker reported shared memory it no longer "
                           "tracked (KeyError tracebacks from resource_tracker.py at shutdown): harmless, the memory "
                           "was already freed; the tracebacks are in the stage log")
# vLLM 0.32's AsyncLLM, shut down on purpose at the end of a Ray Data job, races its own output handler, which then
# logs "AsyncLLM output_handler failed" with an EngineDeadError traceback after "[shutdown] MPClient: complete".
# Harmless once the worker said it is shutting the engine down: every request had finished.
_SHUTDOWN_START = re.compile(r"Shutting down vLLM engine|\[shutdown\] MPClient")
_AFTER_SHUTDOWN = re.compile(r"\[async_llm\.py:\d+\]")
SHUTDOWN_NOTE = ("[note] a vLLM engine's output handler reported EngineDeadError after the engine was shut down at the "
                 "end of the job (vLLM's own shutdown race): harmless, every request had finished; the traceback is "
                 "in the stage log")
# Ray Train's placement-group cleaner polls the controller and says so on every failed poll (251 lines in one
# real-small CPT): the stage log keeps the first and a count.
_ONCE = re.compile(r"PlacementGroupCleaner.*Failed to query Ray Train Controller actor state")


def configure(verbose: bool = False) -> None:
    """Called once by the CLI: route stage output through `stage_log`."""
    _STATE.update(enabled=True, verbose=verbose)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if not any(getattr(h, "_definemed_console", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        h.setLevel(logging.INFO if verbose else logging.WARNING)
        h._definemed_console = True  # type: ignore[attr-defined]
        root.addHandler(h)


def is_noise(line: str) -> bool:
    """True for lines the quiet console keeps out of sight (they still go to the stage log)."""
    if not _ANSI.sub("", line).strip():
        return True  # blank or cursor-movement-only lines left behind by progress bars and worker output
    if _WORKER_PREFIX.match(line):
        return not _PROBLEM.search(line)
    if _INFO_RECORD.match(line):
        return True
    s = line.lstrip()
    if s.startswith("{") and ('"levelname"' in s or '"level"' in s[:200]):
        try:
            rec = json.loads(s)
        except ValueError:
            return False
        level = str(rec.get("levelname") or rec.get("level") or "").upper()
        return level in ("INFO", "DEBUG")
    return False


class _Router(io.TextIOBase):
    """Stands in for sys.stdout / sys.stderr during a stage: every complete line goes to the log file; the console
    gets the lines that are not noise (all of them when verbose). Carriage-return updates are progress bars: they
    go to the console only."""

    def __init__(self, console: TextIO, log: TextIO, verbose: bool):
        super().__init__()
        self._console, self._log, self._verbose = console, log, verbose
        self._buf = ""
        self._in_noise = False  # indented lines after a noise line continue its record (e.g. a dumped dict)
        self._tb: tuple[str, list[str]] | None = None  # a worker's traceback (prefix, lines) held to its last line
        self._noted = False
        self._shut: set[str] = set()  # worker prefixes whose vLLM engine is shutting down
        self._shut_noted = False
        self._repeats = 0

    def write(self, s: str) -> int:
        if "\r" in s and "\n" not in s:  # a progress bar redrawing itself; workers' bars are noise too
            if self._verbose or not is_noise(s.replace("\r", "")):
                self._console.write(s)
                self._console.flush()
            return len(s)
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self._emit(line)
        return len(s)

    def _emit(self, line: str) -> None:
        # A library may keep a handler on this router after its stage ended (and closed the log): console only.
        if not self._log.closed:
            if _ONCE.search(line):
                self._repeats += 1
                if self._repeats > 1:
                    return
            self._log.write(line.rsplit("\r", 1)[-1] + "\n")
        if self._verbose:
            self._console.write(line + "\n")
            return
        prefix = _WORKER_PREFIX.match(line)
        if prefix and self._after_shutdown(prefix.group(0), line):
            return
        if self._tb is not None and prefix and prefix.group(0) == self._tb[0]:
            self._tb[1].append(line)
            rest = _ANSI.sub("", line[prefix.end():])
            body = rest[1:] if rest.startswith(" ") else rest  # Ray puts one space after the prefix
            if not body.startswith((" ", "\t", "Traceback")):
                self._end_traceback()  # the exception line: now it is known what the traceback was
            return
        if prefix and "Traceback (most recent call last)" in line:
            self._end_traceback()
            self._tb = (prefix.group(0), [line])
            return
        noise = is_noise(line) or (self._in_noise and line[:1] in (" ", "\t"))
        self._in_noise = noise
        if not noise:
            self._console.write(line + "\n")

    def _after_shutdown(self, prefix: str, line: str) -> bool:
        """True for the output handler's lines once this worker shut its engine down (one note instead)."""
        if _SHUTDOWN_START.search(line):
            self._shut.add(prefix)
            return False
        if prefix not in self._shut or not _AFTER_SHUTDOWN.search(line):
            return False
        if not self._shut_noted:
            self._console.write(SHUTDOWN_NOTE + "\n")
            self._shut_noted = True
        return True

    def _end_traceback(self) -> None:
        """A worker's traceback goes to the console whole (its body used to be dropped as worker chatter, leaving a
        bare "Traceback" line), or, for the known harmless one, as a one-line note."""
        if self._tb is None:
            return
        lines, self._tb = self._tb[1], None
        if _HARMLESS_TRACEBACK.search("\n".join(_ANSI.sub("", ln) for ln in lines)):
            if not self._noted:
                self._console.write(HARMLESS_TRACEBACK_NOTE + "\n")
                self._noted = True
            return
        self._console.write("\n".join(lines) + "\n")

    def flush(self) -> None:
        self._console.flush()
        if not self._log.closed:
            self._log.flush()

    def close_line(self) -> None:
        if self._buf:
            self._emit(self._buf)
            self._buf = ""
        self._end_traceback()
        if self._repeats > 1 and not self._log.closed:
            self._log.write(f"[definemed] the PlacementGroupCleaner line above repeated {self._repeats - 1} more "
                            "times; left out\n")
            self._repeats = 0

    def isatty(self) -> bool:
        return self._console.isatty()

    def fileno(self) -> int:
        return self._console.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._console, "encoding", "utf-8")

    def writable(self) -> bool:
        return True


def _quiet_library_handlers(consoles: tuple, file_handler: logging.Handler) -> list:
    """Library loggers that print to the terminal through handlers of their own (Ray, vLLM in the driver) are
    lowered to WARNING and also write to the stage log. Returns what to undo."""
    undo = []
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        own = False
        for h in list(lg.handlers):
            if h is file_handler or getattr(h, "_definemed_console", False):
                continue
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                    and getattr(h, "stream", None) in consoles and h.level < logging.WARNING:
                undo.append(("level", h, h.level))
                h.setLevel(max(h.level, logging.WARNING))
                own = True
        if own and not lg.propagate and file_handler not in lg.handlers:
            lg.addHandler(file_handler)
            undo.append(("handler", lg, file_handler))
    return undo


@contextlib.contextmanager
def stage_log(stage: str, output_dir: str) -> Iterator[Path | None]:
    """Route this stage's output: full log to `<output_dir>/logs/<stage>.log`, the quiet view to the console."""
    if not _STATE["enabled"]:
        yield None
        return
    path = Path(output_dir) / "logs" / f"{stage}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    verbose = _STATE["verbose"]
    real_out, real_err = sys.stdout, sys.stderr
    with path.open("a", encoding="utf-8", buffering=1) as log:
        fh = logging.StreamHandler(log)
        fh.setFormatter(logging.Formatter(LOG_FORMAT))
        fh.setLevel(logging.INFO)
        root = logging.getLogger()
        root.addHandler(fh)
        out, err = _Router(real_out, log, verbose), _Router(real_err, log, verbose)
        current = {"fh": fh, "consoles": (real_out, real_err, sys.__stdout__, sys.__stderr__, out, err), "undo": []}
        _STATE["current"] = current
        requery_library_handlers()
        real_err.write(f"[{stage}] log: {path}\n")
        sys.stdout, sys.stderr = out, err
        try:
            yield path
        except BaseException:
            out.close_line()
            err.close_line()
            log.write(traceback.format_exc())  # the log a failure points to says why
            real_err.write(f"[{stage}] failed; full log: {path}\n")
            raise
        finally:
            out.close_line()
            err.close_line()
            sys.stdout, sys.stderr = real_out, real_err
            root.removeHandler(fh)
            for kind, obj, value in reversed(current["undo"]):
                if kind == "level":
                    obj.setLevel(value)
                else:
                    obj.removeHandler(value)
            _STATE.pop("current", None)


def requery_library_handlers() -> None:
    """Quiet the terminal handlers that Ray or an in-process engine installed since the stage began."""
    current = _STATE.get("current")
    if current is None or _STATE["verbose"]:
        return
    current["undo"] += _quiet_library_handlers(current["consoles"], current["fh"])
