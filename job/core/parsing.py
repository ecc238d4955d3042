"""Bounded parsers for what comes from outside: config files, datasets, files read back from the
bucket, judge replies.

Each parser either returns a value of the expected shape or raises a ``ParseError`` whose message is
one short line naming the source and the first problem (values cut to a few dozen characters). No
input makes them raise anything else, allocate without bound or take more than linear time: JSON
numbers are capped in length and nesting in depth, YAML aliases are counted as often as they are
used (a "billion laughs" document is refused before anything expands it), safetensors headers are
checked against the file before a tensor is read.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from job.core.errors import JobError

MAX_DEPTH = 64
"""Nesting of JSON/YAML containers; our own files nest at most 5 deep."""
MAX_NUMBER_CHARS = 100
"""Characters of one JSON number (Python refuses int strings past 4,300 digits with a bare ValueError)."""
MAX_YAML_BYTES = 1 << 20
"""A config file or config.yaml: ours are a few KB."""
MAX_YAML_NODES = 100_000
"""Scalars, sequences and mappings of a YAML document with every alias expanded where it is used."""
MAX_SAFETENSORS_HEADER = 16 << 20
"""A safetensors header (JSON): a 7B model's is ~100 KB."""
MESSAGE_VALUE_CHARS = 60

_short = reprlib.Repr()
_short.maxstring = _short.maxother = MESSAGE_VALUE_CHARS
_short.maxlist = _short.maxdict = _short.maxtuple = _short.maxset = 4
_short.maxlevel = 2


class ParseError(JobError):
    """Input from outside that is not of the expected shape (exit 1); one line naming the source."""


class RefusedValue(ParseError):
    """JSON that parses but ``strict`` refuses (a key twice in one object, NaN, a number that overflows)."""


def short(value: Any) -> str:
    """``repr(value)``, cut so a message stays one short line whatever the value is."""
    try:
        text = _short.repr(value)
    except Exception:  # noqa: BLE001  (a repr that fails must not hide the real error)
        return f"<{type(value).__name__}>"
    return text if len(text) <= 2 * MESSAGE_VALUE_CHARS else text[: 2 * MESSAGE_VALUE_CHARS - 3] + "..."


def read_bounded(path: str | Path, limit: int, what: str) -> bytes:
    """At most ``limit`` bytes of a file (a named pipe or /dev/zero never ends); more is a ParseError.
    OSError passes through for the caller to name."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ParseError(f"{what} is larger than {limit >> 20 or limit} {'MB' if limit >> 20 else 'bytes'}")
    return data


# --- JSON -------------------------------------------------------------------------------------------


class _NumberTooLong(ValueError):
    pass


def _number(kind):
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise _NumberTooLong(f"a number of {len(text)} characters")
        return kind(text)

    return parse


class _Refused(ValueError):
    """Something ``strict`` JSON refuses (a key twice in one object, NaN, a number that overflows), raised from
    inside ``json.loads``; where it is, is found by a second, marking parse."""


class _Marked(dict):
    """An object whose key ``twice`` appears twice (the marking parse's)."""

    twice: str


@dataclass(frozen=True)
class _Bad:
    """A value the marking parse found in place of a number: NaN, Infinity, or one that overflows."""

    text: str


def _unique_object(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # one C-level comparison: the common case costs a dict built from a list
        raise _Refused
    return obj


def _refuse(_text: str):
    raise _Refused


def _finite_number(text: str) -> float:
    value = _number(float)(text)
    if math.isinf(value):
        raise _Refused
    return value


def _marked_object(pairs: list) -> dict:
    obj = _Marked(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        obj.twice = next(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def _marked_number(text: str):
    value = float(text)
    return _Bad(text) if math.isinf(value) else value


def _refused_where(text: str | bytes, what: str) -> str:
    """The first refused thing in ``text`` (parsed again, marking each), as ``what: entry 3: field 'a.b': ...``."""
    try:  # ints by their length: only where the refused thing is matters (a 5,000-digit int is not it)
        value = json.loads(
            text, object_pairs_hook=_marked_object, parse_constant=_Bad, parse_float=_marked_number, parse_int=len
        )
    except (RecursionError, ValueError):
        return f"{what} is not JSON we can read (nested too deep or malformed)"
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:  # depth first, in the document's order
        item, path = stack.pop()
        if isinstance(item, _Bad):
            constant = item.text in ("NaN", "Infinity", "-Infinity")
            why = "is not JSON (NaN and Infinity are not numbers JSON holds)" if constant else "overflows to infinity"
            return f"{what}: {_located(path)}: {short(item.text)[1:-1]} {why}: give a finite number or null"
        if getattr(item, "twice", None) is not None:
            where = f"{_located(path)}: " if path else ""
            return f"{what}: {where}key {short(item.twice)} appears twice: keep one"
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        stack.extend((child, (*path, key)) for key, child in reversed(list(children)))
    return f"{what} holds a value JSON does not allow"


def _located(path: tuple) -> str:
    """``(3, 'messages', 1, 'content')`` as ``entry 3: field 'messages.1.content'``."""
    entry = f"entry {path[0]}" if path and isinstance(path[0], int) else ""
    rest = path[1:] if entry else path
    field = f"field {'.'.join(map(str, rest))!r}" if rest else ""
    return ": ".join(part for part in (entry, field) if part) or "the document"


def first_refused(value: Any, refused: Callable[[Any], str | None], path: tuple = ()) -> str | None:
    """Where in ``value`` (rows: a list; found at ``path``) the first item ``refused`` says why of is, in the
    document's order, with why (``entry 3: field 'score': ...``), or None. Iterative: no recursion to exhaust."""
    stack: list[tuple[Any, tuple]] = [(value, path)]
    while stack:
        item, path = stack.pop()
        why = refused(item)
        if why is not None:
            return f"{_located(path)}: {why}"
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        stack.extend((child, (*path, key)) for key, child in reversed(list(children)))
    return None


def non_finite(value: Any) -> str | None:
    """Why ``value`` is no JSON number (NaN, an infinity: Parquet's doubles hold them), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number (JSON holds no NaN or Infinity)"
    return None


def load_json(text: str | bytes, what: str, max_depth: int = MAX_DEPTH, strict: bool = False) -> Any:
    """JSON from outside: numbers of at most 100 characters, containers nested at most ``max_depth``.
    ``strict`` (datasets): no key twice in one object, no NaN/Infinity, no number that overflows to infinity;
    the error names where (``entry 3: field 'output'``)."""
    hooks = {"object_pairs_hook": _unique_object, "parse_constant": _refuse} if strict else {}
    try:
        value = json.loads(
            text, parse_int=_number(int), parse_float=_finite_number if strict else _number(float), **hooks
        )
    except _NumberTooLong as exc:
        raise ParseError(f"{what}: {exc} (at most {MAX_NUMBER_CHARS})") from None
    except _Refused:
        raise RefusedValue(_refused_where(text, what)) from None
    except json.JSONDecodeError as exc:
        raise ParseError(f"{what} is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except UnicodeDecodeError:
        raise ParseError(f"{what} is not UTF-8 text") from None
    except (RecursionError, ValueError):
        raise ParseError(f"{what} is not JSON we can read (nested too deep or malformed)") from None
    check_depth(value, what, max_depth)
    return value


def check_depth(value: Any, what: str, max_depth: int = MAX_DEPTH) -> None:
    """Containers nested at most ``max_depth`` (an iterative walk: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > max_depth:
            raise ParseError(f"{what}: nested deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children)


# --- YAML -------------------------------------------------------------------------------------------


def load_yaml(text: str | bytes, what: str) -> Any:
    """YAML from outside with PyYAML's safe loader, refused past 1 MB, 100,000 expanded nodes or 64
    levels, before anything is constructed from it."""
    if len(text) > MAX_YAML_BYTES:
        raise ParseError(f"{what} is {len(text)} bytes: more than a config file holds ({MAX_YAML_BYTES} at most)")
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded(node, what)
        _check_unique_keys(node, what)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ParseError(f"{what} is not YAML we can read: {short(problem)[1:-1]}{where}") from None
    except RecursionError:  # PyYAML composes recursively: a document nested ~1,000 deep
        raise ParseError(f"{what}: nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a timestamp like 2020-99-99, a huge int
        raise ParseError(f"{what}: a value cannot be read ({type(exc).__name__}: {short(str(exc))[1:-1]})") from None
    finally:
        if loader is not None:
            loader.dispose()


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expanded(root: yaml.Node, what: str) -> None:
    """The document's size with every alias expanded, counted over the node graph (each shared node
    once, memoised), and no node inside itself."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool, int]] = [(root, False, 1)]
    while stack:
        node, finished, depth = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            sizes[key] = min(1 + sum(sizes[id(c)] for c in _children(node)), MAX_YAML_NODES + 1)
            if sizes[key] > MAX_YAML_NODES:
                raise ParseError(f"{what} expands to more than {MAX_YAML_NODES} values (aliases counted where used)")
            continue
        if key in sizes:
            continue
        if depth > MAX_DEPTH:
            raise ParseError(f"{what}: nested deeper than {MAX_DEPTH} levels")
        on_path.add(key)
        stack.append((node, True, depth))
        for child in _children(node):
            if id(child) in on_path:
                raise ParseError(f"{what}: an alias refers to a value that contains it")
            if id(child) not in sizes:
                stack.append((child, False, depth + 1))


def _check_unique_keys(root: yaml.Node, what: str) -> None:
    """No mapping names a key twice (PyYAML keeps the last silently; YAML says keys are unique)."""
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}  # by tag too: 1 and "1" are two keys
            for key, _value in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue
                line, seen = key.start_mark.line + 1, first.get((key.tag, key.value))
                if seen is not None:
                    raise ParseError(
                        f"{what}: key {short(key.value)} appears twice (lines {seen} and {line}): keep one"
                    )
                first[(key.tag, key.value)] = line
        stack.extend(_children(node))


# --- shapes -----------------------------------------------------------------------------------------


def validated(model, value: Any, what: str):
    """``value`` as ``model`` (a pydantic model or any type pydantic validates; strict: no coercion);
    a ParseError names the first field that does not fit and the value found there."""
    import pydantic

    try:
        return pydantic.TypeAdapter(model).validate_python(value, strict=True)
    except pydantic.ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in error["loc"]) or "the document"
        raise ParseError(f"{what}: {where}: {error['msg']} (found {short(error.get('input'))})") from None


def finite(value: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --- safetensors ------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32", "F64"}
SAFETENSORS_DTYPES |= {"F8_E4M3", "F8_E5M2", "C64", "U1", "F4"}


def safetensors_header(path: str | Path, what: str | None = None) -> dict[str, dict]:
    """A safetensors file's tensor table ({name: {dtype, shape, data_offsets}}), checked before any
    tensor is read: the header's length against the file and a bound, every entry's shape and
    offsets inside the data. ``safetensors.load_file`` may then read the file safely."""
    path, what = Path(path), what or str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or length > MAX_SAFETENSORS_HEADER or 8 + length > size:
                raise ParseError(f"{what} is not a safetensors file (header of {length} bytes in {size})")
            header = load_json(f.read(length), f"{what}'s header", max_depth=4)
    except OSError as exc:
        raise ParseError(f"{what} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(header, dict):
        raise ParseError(f"{what}'s header is not a table of tensors")
    data = size - 8 - length
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, entry in tensors.items():
        problem = _tensor_entry_problem(entry, data)
        if problem:
            raise ParseError(f"{what}: tensor {short(name)}: {problem}")
    return tensors


def _tensor_entry_problem(entry: Any, data_bytes: int) -> str | None:
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
        return "no known dtype"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"shape {short(shape)} is not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        return f"data_offsets {short(offsets)} is not [start, end]"
    if not 0 <= offsets[0] <= offsets[1] <= data_bytes:
        return f"data_offsets {offsets} lie outside the file's {data_bytes} bytes of data"
    return None


def load_safetensors(path: str | Path, what: str | None = None) -> dict:
    """Every tensor of a safetensors file from outside, on the CPU, after ``safetensors_header``."""
    from safetensors.torch import load_file

    safetensors_header(path, what)
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001  (safetensors' own checks: sizes that do not add up, dtypes)
        raise ParseError(f"{what or path} is not a readable safetensors file: {short(str(exc))[1:-1]}") from None
