"""Generate docs/configuration.md from the config models, so the reference cannot drift from the code.

A field's description is its pydantic `description`, else the comment on its line or the comment lines just
above it in the class body. `python -m definemed.config_reference` rewrites the page; a test fails when the
committed page differs from what this renders.
"""
from __future__ import annotations

import inspect
import io
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _top_models() -> list[tuple[str, type[BaseModel]]]:
    from definemed.stages import STAGES
    from serve.config import ServeConfig

    out = [(f"{name} stage", stage.config_model()) for name, stage in STAGES.items()]
    out.append(("definemed serve", ServeConfig))
    return out


def _field_comments(model: type[BaseModel]) -> dict[str, str]:
    """Comments attached to `name: type = ...` lines of the class bodies (same line, else lines just above), the
    model's own over those of the bases it inherits fields from."""
    out: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if isinstance(cls, type) and issubclass(cls, BaseModel) and cls is not BaseModel:
            out.update(_own_comments(cls, model))
    return out


def _own_comments(cls: type, model: type[BaseModel]) -> dict[str, str]:
    try:
        src = inspect.getsource(cls)
        comments = {t.start[0]: t.string.lstrip("#").strip()
                    for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    except (OSError, TypeError, tokenize.TokenError, IndentationError):
        return {}
    out: dict[str, str] = {}
    pending: list[str] = []
    for row, line in enumerate(src.splitlines(), start=1):
        body = line[4:] if line.startswith("    ") else None
        if body is None or body[:1].isspace():
            continue  # class line, continuation lines, method bodies
        if body.startswith("#"):
            pending.append(comments.get(row, ""))
            continue
        name = body.split(":", 1)[0].strip()
        if ":" in body and name.isidentifier() and name in model.model_fields:
            text = comments.get(row) or " ".join(pending)
            if text:
                out[name] = text
        pending = []
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _nested_models(tp: Any) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    out: list[type[BaseModel]] = []
    for a in typing.get_args(tp):
        out.extend(_nested_models(a))
    return out


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    text = repr(value)
    return f"`{text}`" if len(text) <= 60 else f"`{text[:57]}...`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _render_model(title: str, model: type[BaseModel], seen: set[type], lines: list[str], prefix: str = "") -> None:
    comments = _field_comments(model)
    rows, nested = [], []
    for name, field in model.model_fields.items():
        desc = field.description or comments.get(name, "")
        rows.append(f"| `{prefix}{name}` | {_cell(_type_name(field.annotation))} | {_cell(_default(field))} | "
                    f"{_cell(desc)} |")
        for sub in _nested_models(field.annotation):
            nested.append((f"{prefix}{name}", sub))
    lines += [f"### {title}", "", f"`{model.__module__}.{model.__qualname__}`"]
    doc = inspect.cleandoc(model.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    if doc and model.__doc__ is not BaseModel.__doc__:
        lines += ["", doc]
    lines += ["", "| field | type | default | description |", "| --- | --- | --- | --- |", *rows, ""]
    for path, sub in nested:
        if sub in seen:
            lines += [f"`{path}` is a `{sub.__qualname__}` (see above).", ""]
            continue
        seen.add(sub)
        _render_model(f"`{path}` ({sub.__qualname__})", sub, seen, lines, prefix=f"{path}.")


def render() -> str:
    lines = ["# Configuration reference", "",
             "Generated by `python -m definemed.config_reference` from the pydantic config models; do not edit by "
             "hand (a test fails when this page is stale). Every config rejects unknown keys; an invalid value "
             "prints one line naming the field and exits 2.", ""]
    seen: set[type] = set()
    for title, model in _top_models():
        lines += [f"## {title}", ""]
        _render_model(model.__qualname__, model, seen, lines)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        if not PAGE.exists() or PAGE.read_text(encoding="utf-8") != text:
            print(f"{PAGE} is stale: run python -m definemed.config_reference", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
