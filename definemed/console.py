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
            self._log.write(line.rsplit("\r", 1)[-1] + "\n")
        noise = is_noise(line) or (self._in_noise and line[:1] in (" ", "\t"))
        self._in_noise = noise
        if self._verbose or not noise:
            self._console.write(line + "\n")

    def flush(self) -> None:
        self._console.flush()
        if not self._log.closed:
            self._log.flush()

    def close_line(self) -> None:
        if self._buf:
            self._emit(self._buf)
            self._buf = ""

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
