"""The machinery of the configuration schema (shared/runtime/schema.py): value rules, the section
decorators that attach them, and the omegaconf merge that checks a run's config against it.

Nothing here knows a key of the project: schema.py declares the sections with @rules and
@overrides and hands its root dataclass to merge(), plain() and check(). merge() lays the user's
files and key=value overrides onto that root, so an unknown key, a value of the wrong type or one
a rule refuses raises ConfigError naming the key (and the file or override that set it) before a
run starts, not midway through it.
"""
from dataclasses import field, fields, is_dataclass, make_dataclass
from typing import Any, Callable, NamedTuple, Optional, get_args, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration a run cannot use; the message names the key and, for a choice, the values allowed."""


# ---------------------------------------------------------------- value rules
class Rule(NamedTuple):
    ok: Callable[[Any], bool]
    expected: str                      # what the error message says was expected


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, "one of " + " | ".join(choices))


def each_of(*choices: str) -> Rule:
    return Rule(lambda v: all(x in choices for x in v), "a list of " + " | ".join(choices))


def at_least(low: int) -> Rule:
    return Rule(lambda v: v >= low, f">= {low}")


POSITIVE = Rule(lambda v: v > 0, "> 0")
FRACTION = Rule(lambda v: 0 < v <= 1, "in (0, 1]")
DECAY = Rule(lambda v: 0 <= v < 1, "in [0, 1)")         # momenta and Adam's betas
# isinstance, not `in (True, False)`: that would let 1 and 0 through, as 1 == True
BF16 = Rule(lambda v: isinstance(v, bool) or v == "auto", "true, false or auto")


def rules(**checks: Rule):
    """Attach a section's value rules to its dataclass (merge() runs them; an Optional key's null
    is not checked)."""
    def wrap(cls):
        cls._rules = checks
        return cls
    return wrap


def overrides(*sources):
    """Let a stage section also set keys of other sections, for that stage alone: each source is a
    dataclass (all its keys) or (dataclass, keys). They become Optional fields defaulting to null
    (= the other section's value), checked by the same rules as there."""
    def wrap(cls):
        extra = []
        for src in sources:
            src, keys = src if isinstance(src, tuple) else (src, None)
            extra += [(name, hint, src) for name, hint in get_type_hints(src).items() if keys is None or name in keys]
        spec = [(f.name, f.type, field(default=f.default, default_factory=f.default_factory)) for f in fields(cls)]
        spec += [(name, Optional[hint], field(default=None)) for name, hint, _ in extra]
        new = make_dataclass(cls.__name__, spec)
        new.__doc__, new.__module__, new.__qualname__ = cls.__doc__, cls.__module__, cls.__qualname__
        borrowed = {name: src._rules[name] for name, _, src in extra if name in getattr(src, "_rules", {})}
        new._rules = {**borrowed, **getattr(cls, "_rules", {})}
        new._overrides = tuple(name for name, _, _ in extra)
        return new
    return wrap


# ---------------------------------------------------------------- merging and checking
def merge(root, layers: list[tuple[str, Any]], gone: dict[str, str]) -> DictConfig:
    """Merge `layers` ((where it came from, its config), in order) onto the defaults of the `root`
    dataclass and check every value; `gone` maps keys that existed once to what replaced them.
    Returns a plain DictConfig without the unset stage overrides (plain())."""
    cfg = OmegaConf.structured(root)
    for where, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{where}: {_explain(e, layer, root, gone)}") from None
    for key, message in _violations(cfg, ""):
        # the final value is what counts, but the error should say which file or override set it
        where = next((w for w, layer in reversed(layers) if _sets(layer, key)), None)
        raise ConfigError(f"{where}: {message}" if where else message)
    return OmegaConf.create(plain(cfg))


def check(root, key: str, value) -> None:
    """Check one value against the rule of `key` (e.g. "train.bf16") under the `root` dataclass."""
    *path, name = key.split(".")
    section = root
    for part in path:
        section = _unwrap(get_type_hints(section)[part])
    rule = getattr(section, "_rules", {}).get(name)
    if rule and not rule.ok(value):
        raise ConfigError(f"{key}: expected {rule.expected}, got {value!r}")


def plain(node):
    """`node` as dicts and lists, leaving out stage overrides that are unset (null): merged over
    train, a null would erase train's value."""
    if isinstance(node, ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, DictConfig):
        return node
    unset = getattr(OmegaConf.get_type(node), "_overrides", ())
    return {k: plain(v) for k, v in node.items() if not (k in unset and v is None)}


def _violations(node: DictConfig, prefix: str):
    """(key, message) for each value its section's rules refuse."""
    section = OmegaConf.get_type(node)
    hints = get_type_hints(section)
    for name, rule in getattr(section, "_rules", {}).items():
        value = node[name]
        if value is None and type(None) in get_args(hints[name]):
            continue
        if not rule.ok(value):
            shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
            yield prefix + name, f"{prefix}{name}: expected {rule.expected}, got {shown!r}"
    for name in node:
        if isinstance(node[name], DictConfig):
            yield from _violations(node[name], f"{prefix}{name}.")


_UNSET = object()


def _sets(layer, key: str) -> bool:
    return OmegaConf.select(OmegaConf.create(layer), key, default=_UNSET) is not _UNSET


def _explain(e: OmegaConfBaseException, layer, root, gone: dict[str, str]) -> str:
    key = e.full_key
    if isinstance(e, ConfigKeyError) and key:
        if key in gone:
            return f"{key} is gone: {gone[key]}"
        parent = key.rpartition(".")[0]
        known = ", ".join(f.name for f in fields(e.object_type)) if is_dataclass(e.object_type) else ""
        return f"unknown key {key!r}" + (f" ({parent or 'the top level'} has: {known})" if known else "")
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    key = key or _misshapen(OmegaConf.to_container(OmegaConf.create(layer)), root, "")
    return f"{key}: {reason}" if key else reason


def _misshapen(layer: dict, section, prefix: str) -> str | None:
    """The first key of `layer` that the schema has as a section but the layer sets to a value
    (omegaconf's error for that does not name the key)."""
    hints = get_type_hints(section)
    for k, v in layer.items():
        hint = _unwrap(hints.get(k))
        if not is_dataclass(hint):
            continue
        if v is not None and not isinstance(v, dict):
            return prefix + k
        if isinstance(v, dict) and (found := _misshapen(v, hint, f"{prefix}{k}.")):
            return found
    return None


def _unwrap(hint):
    """Optional[X] -> X."""
    args = [a for a in get_args(hint) if a is not type(None)]
    return args[0] if args else hint
