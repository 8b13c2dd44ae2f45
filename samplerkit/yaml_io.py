"""Reading YAML configs within bounds: the C loader when present, duplicate keys refused,
alias expansion, nesting and size limited before anything is built (a 400-byte alias bomb
stands for 10**9 values). Below :mod:`samplerkit.config` and :mod:`samplerkit.presets`,
which both read YAML through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from samplerkit.errors import ConfigError, ConfigIssue, clip, short_repr

#: Largest config accepted, in bytes (characters for a string): a real run file is a few
#: hundred bytes; a ``logit_bias`` over a 50,000-token vocabulary is under 1 MB.
MAX_CONFIG_BYTES = 2 * 1024 * 1024
#: Most values (mappings, lists and scalars) a config may hold once its aliases are expanded:
#: an alias names a node instead of copying it, so 400 bytes can stand for 10**9 values.
MAX_CONFIG_NODES = 250_000
#: Deepest nesting of mappings and lists (a real config nests 6 deep at most).
MAX_CONFIG_DEPTH = 64

# libyaml's C parser when PyYAML was built with it (50 times faster than the pure-Python one
# on a large file); the pure-Python one otherwise. Both produce the same Python objects.
_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _LimitExceeded(Exception):
    """A bound of the config loader was hit; ``mark`` is where (a PyYAML Mark)."""

    def __init__(self, message: str, mark: Any = None):
        super().__init__(message)
        self.message, self.mark = message, mark


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """A safe loader that refuses duplicate keys, naming both lines."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            # Merge keys (`<<: *defaults`) override on purpose; other complex keys are
            # unhashable and PyYAML reports them itself.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            first = seen.setdefault(key, key_node)
            if first is not key_node:
                raise _LimitExceeded(
                    f"duplicate key {short_repr(key)} (first on line {first.start_mark.line + 1}, again on line "
                    f"{key_node.start_mark.line + 1}); YAML keeps only the last one, so remove one of them",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


def _check_events(text: str) -> None:
    """Refuse a document that nests deeper than :data:`MAX_CONFIG_DEPTH` or expands to more than
    :data:`MAX_CONFIG_NODES` values, from its parse events, before any node is built.

    The expanded size counts each alias as the size of the node it names (a subtree's size is
    the count between its start and end events), so an alias bomb is refused after reading
    its few hundred bytes, not after building 10**9 objects. The check runs on events because
    libyaml's composer recurses in C without a limit (100,000 nested ``[`` crash the process).
    """
    loader = _BaseLoader(text)
    try:
        count = 0
        open_nodes: list[tuple[int, str | None, int]] = []   # (count at start, anchor, depth reached)
        sizes: dict[str, tuple[int, int]] = {}               # anchor -> (expanded size, height)
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.ScalarEvent):
                count += 1
                if event.anchor:
                    sizes[event.anchor] = (1, 0)
            elif isinstance(event, yaml.CollectionStartEvent):
                count += 1
                if len(open_nodes) >= MAX_CONFIG_DEPTH:
                    raise _LimitExceeded(f"nested more than {MAX_CONFIG_DEPTH} levels deep", event.start_mark)
                open_nodes.append((count, event.anchor, len(open_nodes) + 1))
            elif isinstance(event, yaml.CollectionEndEvent):
                start, anchor, reached = open_nodes.pop()
                if open_nodes:
                    parent = open_nodes[-1]
                    open_nodes[-1] = (parent[0], parent[1], max(parent[2], reached))
                if anchor:
                    sizes[anchor] = (count - start + 1, reached - len(open_nodes))
            elif isinstance(event, yaml.AliasEvent):
                if event.anchor not in sizes:
                    if any(anchor == event.anchor for _, anchor, _ in open_nodes):
                        raise _LimitExceeded(f"alias *{event.anchor} refers to a node that contains it "
                                             "(a cycle)", event.start_mark)
                    continue                    # undefined: the composer reports it
                size, height = sizes[event.anchor]
                count += size
                depth = len(open_nodes) + height
                if depth > MAX_CONFIG_DEPTH:
                    raise _LimitExceeded(f"alias *{event.anchor} makes the document nest more than "
                                         f"{MAX_CONFIG_DEPTH} levels deep", event.start_mark)
                if open_nodes:
                    parent = open_nodes[-1]
                    open_nodes[-1] = (parent[0], parent[1], max(parent[2], depth))
            if count > MAX_CONFIG_NODES:
                raise _LimitExceeded(f"the document holds more than {MAX_CONFIG_NODES:,} values once its aliases "
                                     "are expanded (an alias bomb, or a config far larger than any run needs)",
                                     event.start_mark)
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from a UTF-8 file of at most :data:`MAX_CONFIG_BYTES`; errors report
    line and column."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)   # bounded: a FIFO or /dev/zero is not read forever
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; give a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"the file is larger than {MAX_CONFIG_BYTES:,} bytes, far more than any run config "
                          "needs; is it the right file?", str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw[:64]
        hint = " (it looks like UTF-16)" if utf16 else ""
        raise ConfigError(ConfigIssue(f"line {line}, column {column}",
                                      f"the file is not UTF-8 text{hint}: byte 0x{raw[exc.start]:02x} cannot be "
                                      "decoded; save it as UTF-8"), str(path)) from None
    return parse_yaml(text, source=str(path))


def parse_yaml(text: str, source: str = "<string>") -> dict[str, Any]:
    """Parse a YAML mapping within the loader's bounds (:data:`MAX_CONFIG_BYTES`,
    :data:`MAX_CONFIG_NODES`, :data:`MAX_CONFIG_DEPTH`); duplicate keys are an error."""
    data = _load_bounded(text, source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping (backend, pipeline, sampler, ...), got {type(data).__name__}", source)
    return data


def _load_bounded(text: str, source: str) -> Any:
    """One YAML document within the loader's bounds, as Python objects; errors are located."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"the config is longer than {MAX_CONFIG_BYTES:,} characters, far more than any run "
                          "config needs", source)
    try:
        return _load_one(text)
    except _LimitExceeded as exc:
        raise ConfigError(ConfigIssue(_where(exc.mark), exc.message), source) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(ConfigIssue(_where(mark), f"YAML syntax error: {exc.problem or exc}"), source) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {exc}", source) from None


def _load_one(text: str) -> Any:
    """One YAML document as Python objects: the bounds checked on its parse events first (before
    any node is built), then built by the duplicate-refusing loader. Raises :class:`_LimitExceeded`
    or PyYAML's errors."""
    _check_events(text)
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"


def check_bounds(data: Any, source: str | None = None) -> None:
    """Refuse a config object (a dict from Python, ``--set`` or YAML) that nests deeper than
    :data:`MAX_CONFIG_DEPTH` or holds more than :data:`MAX_CONFIG_NODES` values, counting a
    container shared in several places once per place (as validation would visit it).

    The walk recurses at most :data:`MAX_CONFIG_DEPTH` levels and memoizes each container's
    (size, height) by identity, so it is linear in the distinct objects: a shared-list bomb
    or a self-containing list is refused without being expanded.
    """
    memo: dict[int, tuple[int, int]] = {}
    path: list[str] = []

    def walk(value: Any, depth: int) -> tuple[int, int]:
        if not isinstance(value, (dict, list, tuple)):
            return 1, 0
        known = memo.get(id(value))
        if known is None:
            if depth >= MAX_CONFIG_DEPTH:
                raise ConfigError(ConfigIssue(_path_text(path), f"nested more than {MAX_CONFIG_DEPTH} levels deep"),
                                  source)
            size, height = 1, 0
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, child in items:
                path.append(f".{key}" if isinstance(value, dict) else f"[{key}]")
                child_size, child_height = walk(child, depth + 1)
                path.pop()
                size, height = size + child_size, max(height, child_height + 1)
                if size > MAX_CONFIG_NODES:
                    raise ConfigError(ConfigIssue(_path_text(path), f"holds more than {MAX_CONFIG_NODES:,} values "
                                                                    "(counting each shared list or mapping once per "
                                                                    "place it is used)"), source)
            known = memo[id(value)] = (size, height)
        if depth + known[1] > MAX_CONFIG_DEPTH:
            raise ConfigError(ConfigIssue(_path_text(path), f"nested more than {MAX_CONFIG_DEPTH} levels deep"), source)
        return known

    walk(data, 0)


def _path_text(path: list[str]) -> str:
    return clip("".join(path).lstrip("."), 120) or "the top level"


def parse_set_value(raw: str, key: str) -> Any:
    """A ``--set`` value parsed as YAML within the loader's bounds; text that is not valid
    YAML stays a plain string (``--set generation.stop=[`` sets the stop string ``[``)."""
    if not raw.strip():
        return ""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(ConfigIssue(f"--set {clip(key)}", f"the value is longer than {MAX_CONFIG_BYTES:,} characters"))
    try:
        return _load_one(raw)
    except _LimitExceeded as exc:
        raise ConfigError(ConfigIssue(f"--set {clip(key)}", exc.message)) from None
    except yaml.YAMLError:
        return raw
