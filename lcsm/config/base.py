"""What every configuration file shares: the pydantic base model with helpful unknown-key errors,
YAML loading, and error messages that name the file, the line and the field.

A user misspells keys and writes values out of range; every error here says where (file:line),
which field (its full YAML path) and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, model_validator

class FieldError(ValueError):
    """A validation error about a field below the model that raised it.

    `path` is relative to that model; the error formatter appends it to pydantic's location so
    the user sees the full YAML path of the offending field.
    """

    def __init__(self, path: str | tuple, message: str):
        self.path = (path,) if isinstance(path, str) else tuple(path)
        super().__init__(message)


class Base(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=False)

    @model_validator(mode="before")
    @classmethod
    def _unknown_keys(cls, data: Any) -> Any:
        # pydantic's extra="forbid" only says "extra inputs are not permitted"; users misspell
        # keys, so name the key, suggest the closest field and list the allowed ones.
        if isinstance(data, dict):
            allowed = list(cls.model_fields)
            for key in data:
                if key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), allowed, n=1)
                    hint = f"did you mean '{close[0]}'? " if close else ""
                    raise FieldError(str(key), f"unknown key; {hint}allowed here: {', '.join(allowed)}")
        return data


def set_only_with(info: ValidationInfo, field: str, allowed: tuple, what: str) -> None:
    """Reject a field given explicitly where an earlier field makes it meaningless."""
    value = info.data.get(field)
    if value is not None and value not in allowed:
        raise ValueError(f"{what} only applies with {field}: {' or '.join(allowed)} (here {field} is '{value}')")



class SpecError(Exception):
    """A spec could not be read or is invalid; str() is the message for the user."""


class RecipeError(SpecError):
    """A recipe (or an argument that stands for part of one) is invalid; str() is the user message."""


def load_yaml(path: str | Path) -> tuple[Any, yaml.Node | None]:
    """Read a YAML file; returns the data and its node tree (for line numbers in errors)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise SpecError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from None



def format_errors(err: ValidationError, data: Any, source: str, node: yaml.Node | None = None) -> str:
    lines = []
    for e in err.errors(include_url=False):
        loc = _user_loc(e["loc"], data)
        exc = (e.get("ctx") or {}).get("error")
        if isinstance(exc, FieldError):
            loc = loc + list(exc.path)
        path = ".".join(str(p) for p in loc) or "(top level)"
        line = _yaml_line(node, loc)
        where = f"{source}:{line}" if line else source
        lines.append(f"{where}: {path}: {_message(e, data, loc)}")
    return "\n".join(dict.fromkeys(lines))


def _user_loc(loc: tuple, data: Any) -> list:
    """pydantic's location without union tags and validator names: the path as written in YAML."""
    out, cur = [], data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            out.append(part)
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            out.append(part)
            cur = cur[part]
        elif isinstance(part, str) and (part in ("eos", "attention") or "[" in part or part == cur):
            continue  # a discriminator tag or a validator's name
        elif isinstance(cur, dict) and isinstance(part, str) and cur.get("kind") == part:
            continue
        else:
            out.append(part)
            cur = None
    return out


def _message(e: dict, data: Any, loc: list) -> str:
    kind, ctx = e["type"], e.get("ctx") or {}
    got = _lookup(data, loc)
    if kind == "union_tag_invalid":
        return f"unknown kind '{ctx.get('tag')}'; allowed: {_tags(ctx.get('expected_tags'))}"
    if kind == "union_tag_not_found":
        return "missing 'kind'; every mixer, oscillation and channel mixer names its kind"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return f"'{got}' is not allowed; allowed: {_tags(ctx.get('expected'))}"
    if kind in ("value_error", "assertion_error"):
        msg = str(ctx.get("error", e["msg"]))
        return msg
    msg = e["msg"]
    return f"{msg[0].lower()}{msg[1:]} (got {got!r})" if got is not _MISSING else msg


_MISSING = object()


def _lookup(data: Any, loc: list) -> Any:
    cur = data
    for part in loc:
        try:
            cur = cur[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return cur


def _tags(expected: str | None) -> str:
    return (expected or "").replace("'", "").replace(" or ", ", ")


def _yaml_line(node: yaml.Node | None, loc: list) -> int | None:
    line = None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for key, value in node.value:
                if key.value == str(part):
                    nxt, line = value, key.start_mark.line + 1
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            node = None
    return line

