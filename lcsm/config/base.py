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


INT64_MAX = 2**63 - 1  # the largest integer torch, safetensors and the data generators take


def _oversized_int(value: Any, path: tuple = ()) -> tuple[tuple, int] | None:
    """(path, value) of the first integer in value (a scalar, list or mapping) outside int64."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return (path, value) if not -INT64_MAX - 1 <= value <= INT64_MAX else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _oversized_int(item, path + (key,))
        if found is not None:
            return found
    return None


class Base(BaseModel):
    # allow_inf_nan=False: no size, rate or ratio of a spec or recipe may be inf or nan (lr: .inf
    # or --set optimizer.lr=inf would otherwise pass `gt=0` and train on nan weights)
    model_config = ConfigDict(extra="forbid", validate_default=False, allow_inf_nan=False)

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
            # Python integers are unbounded, torch's are int64: a huge value must be refused here,
            # by name, not overflow inside torch with a traceback
            found = _oversized_int(data)
            if found is not None:
                path, value = found
                shown = str(value) if len(str(value)) <= 30 else f"{str(value)[:12]}...({len(str(value))} digits)"
                raise FieldError(path, f"{shown} is too large; integers must fit in 64 bits (at most {INT64_MAX})")
        return data


def set_only_with(info: ValidationInfo, field: str, allowed: tuple, what: str) -> None:
    """Reject a field given explicitly where an earlier field makes it meaningless."""
    value = info.data.get(field)
    if value is not None and value not in allowed:
        raise ValueError(f"{what} only applies with {field}: {' or '.join(allowed)} (here {field} is '{value}')")



def path_component_problem(name: str) -> str | None:
    """Why `name` cannot be one folder name inside another (runs/<name>, --out/<name>), or None.

    A name becomes a path: '..', an absolute path or a separator would put the run outside the
    folder meant for it (and past the check for an existing run there)."""
    if not name or not name.strip():
        return "is empty"
    if name in (".", ".."):
        return f"'{name}' is not a folder name"
    if "/" in name or "\\" in name:
        return f"'{name}' holds a path separator"
    if Path(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        return f"'{name}' is an absolute path"
    if any(ord(c) < 32 for c in name):
        return f"{name!r} holds a control character"
    return None


class SpecError(Exception):
    """A spec could not be read or is invalid; str() is the message for the user."""


class RecipeError(SpecError):
    """A recipe (or an argument that stands for part of one) is invalid; str() is the user message."""


def read_utf8(path: str | Path) -> str:
    """The text of a UTF-8 file. Raises SpecError naming the file and the byte offset of the first
    byte that is not UTF-8 (a Latin-1 file, random bytes); OSError as open() raises it."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise SpecError(
            f"{path}: not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} (line {line}) cannot be decoded; "
            "save the file as UTF-8"
        ) from None


def load_yaml(path: str | Path) -> tuple[Any, yaml.Node | None]:
    """Read a YAML file; returns the data and its node tree (for line numbers in errors)."""
    path = Path(path)
    try:
        text = read_utf8(path)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a folder, not a YAML file") from None
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

