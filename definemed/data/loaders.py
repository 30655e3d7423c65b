"""Read the bundled sample and the real datasets through one column mapping in config.

Web documents: FineWeb2-style Parquet (local dir, glob, or any fsspec URI such as hf://datasets/... or s3://...).
`read_web_ray` streams them as a Ray Dataset, `read_web_pandas` reads a small local set eagerly.
Multiple choice: our/HF MMLU style ("mmlu"), OpenAI MMMLU CSV ("mmmlu"), MedQA/MMedBench JSONL ("medqa"),
all turned into `MCItem`s. Prompts: JSONL with id, category, prompt.

A mapped column that the source lacks is a ConfigError (`MissingColumnError`) naming the column and the file,
raised before any work starts.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from definemed.config import ConfigError, InputPath, StrictModel
from definemed.data.schemas import LETTERS, InstructionItem, MCItem, PromptItem

if TYPE_CHECKING:  # heavy imports stay lazy
    import pandas as pd
    import ray.data

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["


class MissingColumnError(ConfigError):
    """A column named in a config mapping is absent from the source."""

    def __init__(self, column: str, source: str, available: Iterable[str], mapped_to: str | None = None):
        self.column, self.source = column, source
        self.available = sorted(available)
        what = f"column '{column}'" + (f" (mapped to '{mapped_to}')" if mapped_to and mapped_to != column else "")
        super().__init__(f"{what} not found in {source}; available columns: {', '.join(self.available)}")


class SourceError(ValueError):
    """The source exists in config but its content cannot be used (no files, bad row)."""


# ----------------------------------------------------------------------------------------------------------------
# paths


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def resolve_files(path: str, suffixes: tuple[str, ...]) -> tuple[list[str], Any]:
    """Expand a file, directory (recursive), glob or fsspec URI into a sorted file list and its filesystem.

    The filesystem is None for local paths (pyarrow/Ray default), else the fsspec filesystem.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if any(ch in root for ch in _GLOB_CHARS):
        files = [f for f in fs.glob(root) if not fs.isdir(f)]
    elif fs.isdir(root):
        files = [f for f in fs.find(root) if f.endswith(suffixes)]
        files = [f for f in files if not Path(f).name.startswith((".", "_"))]  # temp files, _DONE markers
    elif fs.exists(root):
        files = [root]
    else:
        raise SourceError(f"source not found: {path}")
    files = sorted(files)
    if not files:
        raise SourceError(f"no {'/'.join(suffixes)} files match {path}")
    if not _is_remote(path):
        return files, None
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [f"{protocol}://{f}" if "://" not in f else f for f in files], fs


def fs_path(f: str, fs: Any) -> str:
    """The path inside the filesystem that `fs.open` and pyarrow want (protocol removed), via fsspec's public
    `strip_protocol` rather than the filesystem's private `_strip_protocol`."""
    import fsspec.core

    return fsspec.core.strip_protocol(f) if fs is not None else f


def parquet_files(path: str) -> tuple[list[str], Any]:
    """Sorted Parquet files (local dir / glob / file, or fsspec URI) and the fsspec filesystem (None = local)."""
    return resolve_files(path, (".parquet",))


def arrow_paths(files: list[str], fs: Any) -> tuple[list[str], Any]:
    """Paths and pyarrow filesystem for Arrow/Ray readers (fsspec URIs go through pyarrow's fsspec handler)."""
    if fs is None:
        return files, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return [fs_path(f, fs) for f in files], PyFileSystem(FSSpecHandler(fs))


# ----------------------------------------------------------------------------------------------------------------
# web documents

_DEFAULT_WEB_COLUMNS: dict[str, str | None] = {"text": "text", "id": "id", "url": "url"}


class WebSourceConfig(StrictModel):
    """Where web documents come from and how their columns map onto ours.

    `columns` maps OUR name -> the SOURCE column; the defaults (text, id, url) are merged with what you give,
    and a None value drops that default (e.g. `url: null` for a source without URLs). `extra_columns` keeps
    further source columns under their own names: None keeps all of them, [] keeps only the mapped ones.
    """

    path: InputPath
    format: Literal["parquet"] = "parquet"
    columns: dict[str, str | None] = Field(default_factory=dict)
    extra_columns: list[str] | None = None
    limit: int | None = Field(default=None, ge=1)

    @field_validator("columns", mode="after")
    @classmethod
    def _merge_defaults(cls, v: dict[str, str | None]) -> dict[str, str | None]:
        merged = {**_DEFAULT_WEB_COLUMNS, **v}
        if not merged.get("text"):
            raise ValueError("the 'text' column must be mapped")
        sources = [s for s in merged.values() if s]
        dup = sorted({s for s in sources if sources.count(s) > 1})
        if dup:
            raise ValueError(f"source column(s) {dup} mapped more than once")
        return merged

    @property
    def mapping(self) -> dict[str, str]:
        """our name -> source name, only the columns actually read."""
        return {ours: src for ours, src in self.columns.items() if src}


def _parquet_schema(file: str, fs: Any):
    import pyarrow.parquet as pq

    if fs is None:
        return pq.read_schema(file)
    with fs.open(fs_path(file, fs), "rb") as fh:
        return pq.read_schema(fh)


def _plan_web_columns(cfg: WebSourceConfig, files: list[str], fs: Any) -> tuple[list[str], dict[str, str]]:
    """Source columns to read and the rename map, checked against the files' schemas.

    Every local file is checked (footers are cheap); for remote sources only the first, to avoid thousands of
    round trips before streaming starts.
    """
    mapping = cfg.mapping
    to_check = files if fs is None else files[:1]
    first_names: list[str] | None = None
    for f in to_check:
        names = _parquet_schema(f, fs).names
        first_names = first_names if first_names is not None else names
        for ours, src in mapping.items():
            if src not in names:
                raise MissingColumnError(src, f, names, mapped_to=ours)
        for extra in cfg.extra_columns or []:
            if extra not in names:
                raise MissingColumnError(extra, f, names)
    assert first_names is not None
    targets = set(mapping)
    mapped_sources = set(mapping.values())
    if cfg.extra_columns is None:
        # keep unmapped source columns, except ones whose name our renamed columns would take over
        extras = [n for n in first_names if n not in mapped_sources and n not in targets]
    else:
        extras = [n for n in cfg.extra_columns if n not in mapped_sources]
        clash = [n for n in extras if n in targets]
        if clash:
            raise ConfigError(f"extra_columns {clash} clash with mapped column names")
    wanted = set(mapping.values()) | set(extras)
    read = [n for n in first_names if n in wanted]  # keep the source's column order
    rename = {src: ours for ours, src in mapping.items() if src != ours}
    return read, rename


def read_web_ray(cfg: WebSourceConfig, **read_kwargs: Any) -> "ray.data.Dataset":
    """Stream the web documents as a Ray Dataset with our column names. Nothing is materialised here."""
    import ray.data

    files, fs = resolve_files(cfg.path, (".parquet",))
    read, rename = _plan_web_columns(cfg, files, fs)
    # select_columns right after the read: Ray pushes the projection down into the Parquet reader
    paths = [fs_path(f, fs) for f in files]  # with an explicit filesystem, pyarrow wants bare paths
    ds = ray.data.read_parquet(paths, filesystem=fs, **read_kwargs).select_columns(read)
    if rename:
        ds = ds.rename_columns(rename)
    if cfg.limit is not None:
        ds = ds.limit(cfg.limit)
    return ds


def _footer(f: str, fs: Any):
    import pyarrow.parquet as pq

    if fs is None:
        return pq.ParquetFile(f).metadata
    with fs.open(fs_path(f, fs), "rb") as fh:
        return pq.ParquetFile(fh).metadata


def plan_web_parts(cfg: WebSourceConfig, rows_per_part: int) -> dict[str, Any]:
    """Cut the source into numbered parts of at most `rows_per_part` consecutive rows of one file, from the
    Parquet footers only: the unit of work and of resume for a pass that must survive a kill. The plan is a
    pure function of the files and their row counts, so a rerun over the same source finds the same parts.

    Returns {"parts": [{"index", "file", "start", "stop"}], "read": columns, "rename": map, "files": [(file,
    rows)]}; `read_web_part` reads one part with it."""
    files, fs = resolve_files(cfg.path, (".parquet",))
    read, rename = _plan_web_columns(cfg, files, fs)
    parts: list[dict[str, Any]] = []
    sizes: list[tuple[str, int]] = []
    left = cfg.limit if cfg.limit is not None else float("inf")
    for f in files:
        n = int(min(_footer(f, fs).num_rows, left))
        sizes.append((f, n))
        left -= n
        for start in range(0, n, rows_per_part):
            parts.append({"index": len(parts), "file": f, "start": start, "stop": min(n, start + rows_per_part)})
        if left <= 0:
            break
    return {"parts": parts, "read": read, "rename": rename, "files": sizes}


def read_web_part(path: str, part: dict[str, Any], read: list[str], rename: dict[str, str]):
    """Rows [start, stop) of one part's file as a pyarrow Table with our column names; only the row groups that
    hold them are read. `path` is the source's configured path (it gives the filesystem)."""
    import fsspec
    import pyarrow.parquet as pq

    fs = fsspec.core.url_to_fs(path)[0] if _is_remote(path) else None
    f = part["file"]
    with (fs.open(fs_path(f, fs), "rb") if fs is not None else open(f, "rb")) as fh:
        pf = pq.ParquetFile(fh)
        groups, first, at = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if at < part["stop"] and at + n > part["start"]:
                groups.append(g)
                first = at if first is None else first
            at += n
        table = pf.read_row_groups(groups, columns=read)
    table = table.slice(part["start"] - (first or 0), part["stop"] - part["start"])
    return table.rename_columns([rename.get(c, c) for c in table.column_names])


def count_web_rows(cfg: WebSourceConfig) -> int:
    """Row count from the Parquet footers only (no data read), e.g. for a progress bar's total.

    Prefer this to read_web_ray(cfg).count(): after the column projection/rename Ray can no longer answer
    count() from metadata and reads the files.
    """
    import pyarrow.parquet as pq

    files, fs = resolve_files(cfg.path, (".parquet",))
    n = sum(_footer(f, fs).num_rows for f in files)
    return n if cfg.limit is None else min(n, cfg.limit)


def read_web_pandas(cfg: WebSourceConfig) -> "pd.DataFrame":
    """Read a small set of web documents eagerly (tests, notebooks, the sample). Same mapping as read_web_ray."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files, fs = resolve_files(cfg.path, (".parquet",))
    read, rename = _plan_web_columns(cfg, files, fs)
    tables = []
    n = 0
    for f in files:
        t = pq.read_table(fs_path(f, fs), columns=read, filesystem=fs)
        tables.append(t)
        n += t.num_rows
        if cfg.limit is not None and n >= cfg.limit:
            break
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    if cfg.limit is not None:
        table = table.slice(0, cfg.limit)
    return table.rename_columns([rename.get(c, c) for c in table.column_names]).to_pandas()


# ----------------------------------------------------------------------------------------------------------------
# multiple choice

MCFormat = Literal["mmlu", "mmmlu", "medqa"]

#: our key -> source column, per format. For "mmmlu" the choices are the columns A..D.
_MC_DEFAULT_COLUMNS: dict[str, dict[str, str | None]] = {
    "mmlu": {"id": None, "question": "question", "choices": "choices", "answer": "answer", "subject": "subject"},
    "mmmlu": {"id": None, "question": "Question", "A": "A", "B": "B", "C": "C", "D": "D",
              "answer": "Answer", "subject": "Subject"},
    "medqa": {"id": None, "question": "question", "options": "options", "answer": "answer_idx",
              "subject": "meta_info"},
}
_MC_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def normalise_subject(s: str) -> str:
    """'Clinical Knowledge', 'clinical-knowledge', 'clinical_knowledge' -> 'clinical_knowledge'."""
    return re.sub(r"[^0-9a-z]+", "_", str(s).strip().lower()).strip("_")


class MCSourceConfig(StrictModel):
    """A multiple-choice benchmark file (or dir/glob of files) and how to read it.

    `columns` maps OUR key -> SOURCE column and is merged with the format's defaults (see _MC_DEFAULT_COLUMNS).
    `subject: null` takes the subject from the file name; `id: <col>` uses a source id column, otherwise ids
    are `<benchmark>/<file stem>/<row>` (stable under subject filtering and limits).
    `subjects` filters after normalising names ('Clinical Knowledge' == 'clinical_knowledge').
    """

    path: InputPath
    format: MCFormat
    benchmark: str | None = None
    subjects: list[str] | None = None
    limit: int | None = Field(default=None, ge=1)
    columns: dict[str, str | None] = Field(default_factory=dict)
    on_invalid: Literal["error", "skip"] = "error"
    _user_keys: set[str] = PrivateAttr(default_factory=set)

    @model_validator(mode="after")
    def _merge(self) -> "MCSourceConfig":
        defaults = _MC_DEFAULT_COLUMNS[self.format]
        self._user_keys = set(self.columns)
        unknown = sorted(set(self.columns) - set(defaults))
        if unknown:
            raise ValueError(f"unknown column key(s) {unknown} for format '{self.format}'; "
                             f"known: {sorted(defaults)}")
        self.columns = {**defaults, **self.columns}
        required = [k for k in defaults if k not in ("id", "subject")]
        missing = [k for k in required if not self.columns.get(k)]
        if missing:
            raise ValueError(f"column(s) {missing} must be mapped for format '{self.format}'")
        if self.benchmark is None:
            self.benchmark = "medqa" if self.format == "medqa" else "mmlu"
        return self


def _read_records(file: str, fs: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of one file as dicts, plus the column names seen (for missing-column errors)."""
    import pandas as pd

    name = file.lower()
    opener = (lambda: fs.open(fs_path(file, fs), "rb")) if fs is not None else (lambda: open(file, "rb"))
    if name.endswith(".parquet"):
        with opener() as fh:
            df = pd.read_parquet(fh)
        rows = df.to_dict(orient="records")
        return rows, list(df.columns)
    if name.endswith(".csv"):
        with opener() as fh:
            # keep_default_na=False: an answer "None" or a choice "NA" must stay a string
            df = pd.read_csv(fh, dtype=str, keep_default_na=False)
        return df.to_dict(orient="records"), list(df.columns)
    with opener() as fh:
        raw = fh.read().decode("utf-8")
    if name.endswith(".json") and raw.lstrip().startswith("["):
        rows = json.loads(raw)
    else:
        rows = []
        for ln, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SourceError(f"{file}:{ln}: not valid JSON ({e.msg})") from None
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return rows, cols


def _as_list(v: Any) -> list:
    if hasattr(v, "tolist"):  # numpy arrays from Parquet
        v = v.tolist()
    if isinstance(v, str):
        v = json.loads(v)  # choices serialised as a JSON string (some CSV exports)
    return list(v)


def _letter_index(v: Any, letters: list[str]) -> int:
    """Answer given as a letter ('B', ' b ', '(B)') or an index (1, '1', numpy int)."""
    if isinstance(v, str):
        s = v.strip().strip("().").upper()
        if s in letters:
            return letters.index(s)
        if s.isdigit():
            return int(s)
        raise ValueError(f"answer {v!r} is not one of {letters}")
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"answer {v!r} is neither a letter nor an index")
    return v


def _row_to_item(row: dict[str, Any], cfg: MCSourceConfig, default_id: str, default_subject: str) -> MCItem:
    c = cfg.columns
    if cfg.format == "mmlu":
        choices = [str(x) for x in _as_list(row[c["choices"]])]
        letters = list(LETTERS[: len(choices)])
    elif cfg.format == "mmmlu":
        letters = ["A", "B", "C", "D"]
        choices = [str(row[c[k]]) for k in letters]
    else:
        opts = row[c["options"]]
        if isinstance(opts, str):
            opts = json.loads(opts)
        if isinstance(opts, list):  # [{"key": "A", "value": "..."}] variant
            opts = {o["key"]: o["value"] for o in opts}
        letters = sorted(str(k).strip().upper() for k in opts)
        by_letter = {str(k).strip().upper(): v for k, v in opts.items()}
        choices = [str(by_letter[k]) for k in letters]
    answer = _letter_index(row[c["answer"]], letters)
    subject = row.get(c["subject"]) if c.get("subject") else None
    subject = normalise_subject(subject) if subject not in (None, "") else default_subject
    rid = row.get(c["id"]) if c.get("id") else None
    return MCItem(id=str(rid) if rid not in (None, "") else default_id, benchmark=cfg.benchmark or "",
                  subject=subject, question=str(row[c["question"]]), choices=choices, answer=answer,
                  letters=letters)


def iter_mc_items(cfg: MCSourceConfig) -> Iterator[MCItem]:
    """Items in file order, filtered by subject, up to `limit`."""
    files, fs = resolve_files(cfg.path, _MC_SUFFIXES)
    wanted = {normalise_subject(s) for s in cfg.subjects} if cfg.subjects else None
    needed = {k: v for k, v in cfg.columns.items() if v}
    # a default subject column (e.g. MedQA's meta_info) may be absent; one the user named may not
    optional = {"subject"} - cfg._user_keys
    n = skipped = 0
    for f in files:
        rows, cols = _read_records(f, fs)
        for ours, src in needed.items():
            if src not in cols and ours not in optional:
                raise MissingColumnError(src, f, cols, mapped_to=ours)
        stem = Path(fs_path(f, fs)).stem
        for i, row in enumerate(rows):
            try:
                item = _row_to_item(row, cfg, f"{cfg.benchmark}/{stem}/{i}", normalise_subject(stem))
            except (ValidationError, ValueError, KeyError, TypeError) as e:
                msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
                if cfg.on_invalid == "error":
                    raise SourceError(f"{f}: row {i}: invalid {cfg.format} item: {msg}") from None
                skipped += 1
                continue
            if wanted is not None and item.subject not in wanted:
                continue
            yield item
            n += 1
            if cfg.limit is not None and n >= cfg.limit:
                break
        if cfg.limit is not None and n >= cfg.limit:
            break
    if skipped:
        log.warning("%s: skipped %d invalid %s item(s)", cfg.path, skipped, cfg.format)


def load_mc_items(cfg: MCSourceConfig) -> list[MCItem]:
    items = list(iter_mc_items(cfg))
    if not items:
        raise SourceError(f"no items in {cfg.path}" + (f" for subjects {cfg.subjects}" if cfg.subjects else ""))
    return items


# ----------------------------------------------------------------------------------------------------------------
# prompts


def load_prompts(path: str | Path, categories: list[str] | None = None) -> list[PromptItem]:
    """Prompts from JSONL (id, category, prompt); duplicate ids are an error."""
    files, fs = resolve_files(str(path), (".jsonl", ".json"))
    out: list[PromptItem] = []
    for f in files:
        rows, cols = _read_records(f, fs)
        for key in ("id", "category", "prompt"):
            if rows and key not in cols:
                raise MissingColumnError(key, f, cols)
        for i, row in enumerate(rows):
            try:
                item = PromptItem(id=str(row["id"]), category=str(row["category"]), prompt=row["prompt"])
            except (ValidationError, KeyError) as e:
                raise SourceError(f"{f}: row {i}: invalid prompt: {e}") from None
            if categories is None or item.category in categories:
                out.append(item)
    _refuse_duplicate_ids(path, out, "prompt")
    return out


def load_instruction_items(path: str | Path, splits: list[str] | None = None) -> list[InstructionItem]:
    """Parallel instruction-following items from JSONL (id, category, split, de, en); every instruction is
    validated against definemed.eval.instructions.TYPES. Duplicate ids are an error."""
    files, fs = resolve_files(str(path), (".jsonl", ".json"))
    out: list[InstructionItem] = []
    for f in files:
        rows, _ = _read_records(f, fs)
        for i, row in enumerate(rows):
            try:
                item = InstructionItem.model_validate(row)
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                raise SourceError(f"{f}: row {i} (id {row.get('id')!r}): {where}: {err['msg']}") from None
            if splits is None or item.split in splits:
                out.append(item)
    _refuse_duplicate_ids(path, out, "item")
    return out


def _refuse_duplicate_ids(path, items: list, what: str) -> None:
    ids = [p.id for p in items]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise SourceError(f"{path}: duplicate {what} ids {dup[:5]}")


# ----------------------------------------------------------------------------------------------------------------
# the bundled sample


def sample_web_config(**overrides: Any) -> WebSourceConfig:
    from definemed.data.sample import SAMPLE_WEB_DIR

    return WebSourceConfig(path=str(SAMPLE_WEB_DIR), **overrides)


def sample_mc_config(benchmark: Literal["mmlu", "medqa"], **overrides: Any) -> MCSourceConfig:
    from definemed.data.sample import SAMPLE_MEDQA, SAMPLE_MMLU

    path = SAMPLE_MMLU if benchmark == "mmlu" else SAMPLE_MEDQA
    return MCSourceConfig(path=str(path), format=benchmark, benchmark=f"{benchmark}_de", **overrides)


__all__ = [
    "MissingColumnError", "SourceError", "resolve_files", "fs_path",
    "WebSourceConfig", "read_web_ray", "read_web_pandas", "count_web_rows",
    "MCItem", "MCSourceConfig", "MCFormat", "normalise_subject", "iter_mc_items", "load_mc_items",
    "PromptItem", "load_prompts", "sample_web_config", "sample_mc_config",
]
