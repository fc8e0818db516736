"""Reading YAML that a user or an attacker wrote, with the work it can cause bounded.

:func:`load_yaml` refuses, before anything is composed:

- more than ``max_bytes`` (checked by the caller that reads the file, :func:`read_bounded`);
- more than ``MAX_NODES`` keys and values, nesting deeper than ``MAX_DEPTH``, any alias
  (``*name``, the "billion laughs" expansion), a key given twice in one mapping (DVC refuses
  those too), a mapping or list used as a key;
- plain scalars that YAML 1.1 (PyYAML, here) and YAML 1.2 (DVC) read differently:
  ``yes``/``no``/``on``/``off`` (booleans here, text to DVC) and numbers with ``_``, ``:`` or
  a leading ``0``.

Anchors (``&name``) without an alias expand nothing and are tolerated. The event stream is
walked without recursion, so the refusal comes as soon as the offending event does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MAX_NODES = 20_000
MAX_DEPTH = 32  # params.yaml nests 4 deep (runs.<name>.capture.<key>)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml, where installed, is 10x faster
_RESOLVER = yaml.resolver.Resolver()


class UnsafeYamlError(ValueError):
    """The YAML text is refused: it would expand, recurse deep, collide or read differently in DVC."""


def read_bounded(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, refused (UnsafeYamlError) past ``max_bytes`` before more is read."""
    with open(path, "rb") as stream:
        data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnsafeYamlError(f"{path}: more than {max_bytes:,} bytes, too large for a params file "
                              "(the repository's is 3 KB); is this the right file?")
    return data


def load_yaml(data: bytes, *, source: str) -> Any:
    """Parse ``data`` as YAML after :func:`check_yaml_events`; every problem an UnsafeYamlError of one line."""
    try:
        text = data.decode("utf-8")
        check_yaml_events(text, source=source)
        return yaml.load(text, Loader=_LOADER)  # CSafeLoader or SafeLoader: no arbitrary objects
    except UnicodeDecodeError as error:
        raise UnsafeYamlError(f"{source}: byte {error.start:,} is not UTF-8 text; save the file as UTF-8") from None
    except yaml.YAMLError as error:
        raise UnsafeYamlError(f"{source}: {_yaml_problem(error)}") from None
    except UnsafeYamlError:
        raise
    except ValueError as error:  # an integer of more digits than Python converts
        raise UnsafeYamlError(f"{source}: a value cannot be read ({str(error).split(';')[0]}); "
                              "write a smaller one") from None


@dataclass
class _Open:
    """A mapping or list the event walk is inside of."""

    path: str
    keys: dict[str, int] | None  # a mapping's keys so far -> the line each is on; None for a list
    key: str | None = None  # the mapping key whose value comes next; None while a key is due
    index: int = 0  # the list's next item

    def child(self, key: str | None) -> str:
        if self.keys is None:
            return f"{self.path}[{self.index}]"
        step = key if key is not None else self.key
        return self.path if step is None else f"{self.path}.{step}" if self.path else step

    def value_done(self) -> None:
        self.key = None
        self.index += 1


def check_yaml_events(text: str, *, source: str = "params") -> None:
    """Refuse what would expand (aliases), recurse deep, collide (a key twice) or read differently in
    DVC (YAML 1.1-only booleans and numbers), from the event stream: nothing is composed, and the
    refusal comes as soon as the offending event does."""
    stack: list[_Open] = []
    n_nodes = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.CollectionEndEvent):
            stack.pop()
            if stack:
                stack[-1].value_done()
        if not isinstance(event, yaml.NodeEvent):
            continue  # a collection's end, or stream and document markers
        parent = stack[-1] if stack else None
        as_key = parent is not None and parent.keys is not None and parent.key is None
        name = event.value if as_key and isinstance(event, yaml.ScalarEvent) else None
        path = parent.child(name) if parent else ""
        where = f"{source}: line {event.start_mark.line + 1}" + (f" ({shown(path, quote=False)})" if path else "")
        n_nodes += 1
        if n_nodes > MAX_NODES:
            raise UnsafeYamlError(f"{where}: more than {MAX_NODES:,} keys and values (params.yaml has about 100); "
                              "is this the right file?")
        if isinstance(event, yaml.AliasEvent):
            raise UnsafeYamlError(f"{where}: alias *{event.anchor} refused (aliases can expand a small file into "
                              "gigabytes); write the value out in full")
        if isinstance(event, yaml.CollectionStartEvent):
            if as_key:
                raise UnsafeYamlError(f"{where}: a mapping or list used as a key; keys must be plain text")
            if len(stack) >= MAX_DEPTH:
                raise UnsafeYamlError(f"{where}: nested more than {MAX_DEPTH} levels deep (params.yaml needs 4); "
                                  "is this the right file?")
            stack.append(_Open(path, {} if isinstance(event, yaml.MappingStartEvent) else None))
            continue
        if event.implicit[0]:
            _check_plain_scalar(event.value, where)
        if not as_key:
            if parent:
                parent.value_done()
        elif name in parent.keys:
            within = shown(parent.path or "the top level", quote=False)
            raise UnsafeYamlError(f"{where}: key {shown(name)} appears twice in {within} (first on line "
                              f"{parent.keys[name]}); keep one (DVC refuses duplicate keys too)")
        else:
            parent.keys[name], parent.key = event.start_mark.line + 1, name


def _check_plain_scalar(text: str, where: str) -> None:
    tag = _RESOLVER.resolve(yaml.ScalarNode, text, (True, False)).rsplit(":", 1)[-1]
    written = shown(text, quote=False)
    if tag == "bool" and text.lower() not in ("true", "false"):
        raise UnsafeYamlError(f"{where}: {written} is a boolean in YAML 1.1 but text to DVC (YAML 1.2); "
                              f"write true or false for a boolean, or quote it ('{written}') for text")
    if tag in ("int", "float") and ("_" in text or ":" in text or re.match(r"[-+]?0[0-9bB]", text)):
        raise UnsafeYamlError(f"{where}: the number {written} reads differently in YAML 1.1 and in DVC (YAML 1.2); "
                              "write it in plain decimal digits (no '_', ':' or leading 0), or quote it for text")


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error on one line: where, and what."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    if "nesting depth" in problem:  # libyaml's own bound, met before ours when one line opens 1000 levels
        return f"{where}nested too deep (params.yaml needs 4 levels); is this the right file?"
    return f"{where}not valid YAML: {problem}; fix the syntax there"


def shown(value: Any, *, quote: bool = True, limit: int = 60) -> str:
    """A value from the file, cut short: an error message stays one readable line."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


