"""gin configs of training runs: parsed safely, and compared to guard `--resume`.

Safety: with `from __gin__ import dynamic_registration` and `import os`, a gin
file can bind and call any Python function: `train.data_dir = @os.system()` runs
a shell command when train() starts (checked with gin 0.5). A config or a
workdir's operative_config.gin from someone else must not run code, so `parse`
walks every statement first (following `include`s) and refuses imports and any
binding or reference to a configurable outside fundusflow's own packages, before
gin imports or binds anything.

Resume: `plan_changes(old_text, new_text)` lists the bindings (`train.learning_rate`,
`resnetv2_lite.widths`, ...) whose values differ between two config texts, a
binding absent on one side counting as the configurable's default.
"""

import dataclasses
import inspect
import os
from typing import Any

import gin
from gin import config_parser

PROJECT_PACKAGES = ("models", "input_pipeline", "training", "evaluation", "serving")
# gin's own configurables (macros, constants, singletons of other references).
_GIN_MODULES = ("gin",)
UNSET = "(unset)"


class UnsafeConfigError(ValueError):
    """A gin import, or a binding / reference to a configurable outside fundusflow."""


@dataclasses.dataclass(frozen=True)
class Reference:
    """`@name` or `@name()` in a gin value, kept unevaluated."""

    name: str
    evaluate: bool

    def __repr__(self) -> str:
        return f"@{self.name}{'()' if self.evaluate else ''}"


@dataclasses.dataclass(frozen=True)
class Macro:
    """`%name` in a gin value."""

    name: str

    def __repr__(self) -> str:
        return f"%{self.name}"


class _Delegate(config_parser.ParserDelegate):
    """Parses references and macros into inert values: nothing is looked up or called."""

    def configurable_reference(self, scoped_configurable_name, evaluate):
        return Reference(scoped_configurable_name, evaluate)

    def macro(self, macro_name):
        return Macro(macro_name)


def statements(text_or_file) -> list:
    """gin statements (BindingStatement, ImportStatement, ...) of a text or open file."""
    return list(config_parser.ConfigParser(text_or_file, _Delegate()))


# ----------------------------------------------------------------------------- safety


def _references(value):
    """Every Reference inside a (nested) gin value."""
    if isinstance(value, Reference):
        yield value
    elif isinstance(value, list | tuple | set):
        for v in value:
            yield from _references(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _references(k)
            yield from _references(v)


def _configurable(selector: str):
    """gin's registered configurable for `selector` (a name, maybe scoped), or None."""
    name = selector.rsplit("/", 1)[-1]
    try:
        # gin has no public lookup by name; its registry is what `parse_config` uses.
        return gin.config._REGISTRY.get_match(name)
    except (KeyError, ValueError):  # ambiguous: gin itself reports it while parsing
        return None


def _check_selector(selector: str, where: str) -> None:
    found = _configurable(selector)
    if found is None:
        return  # unknown: gin refuses it while parsing (or skips it when asked to)
    module = getattr(found.wrapped, "__module__", "") or ""
    if module.split(".")[0] not in PROJECT_PACKAGES + _GIN_MODULES:
        raise UnsafeConfigError(
            f"{where}: {selector!r} is {module}.{found.name}, not a fundusflow configurable; "
            "gin configs may only bind train, build_model, make_dataset, AugmentConfig, "
            "backbones, losses, ... (fundusflow's own).")


def _where(location, default: str) -> str:
    if location is None:
        return default
    return f"{location.filename or default}, line {location.line_num + 1}"


def _resolve_include(filename: str) -> str:
    """The path gin would open for `include 'filename'` (its search-path prefixes)."""
    if os.path.isabs(filename):
        return filename
    for prefix in gin.config._LOCATION_PREFIXES:
        path = os.path.join(prefix, filename)
        if os.path.exists(path):
            return path
    return filename


def check_statements(stmts, where: str, seen: set | None = None) -> None:
    """Raises UnsafeConfigError on an import or a non-fundusflow configurable."""
    seen = set() if seen is None else seen
    for st in stmts:
        loc = _where(st.location, where)
        if isinstance(st, config_parser.ImportStatement):
            raise UnsafeConfigError(
                f"{loc}: `{st.format()}` refused: gin imports let a config bind and call "
                "any Python function; fundusflow configs need none.")
        if isinstance(st, config_parser.IncludeStatement):
            check_file(_resolve_include(st.filename), seen)
        elif isinstance(st, config_parser.BindingStatement | config_parser.BlockDeclaration):
            if st.selector:
                _check_selector(st.selector, loc)
            for ref in _references(getattr(st, "value", None)):
                _check_selector(ref.name, loc)


def check_file(path: str, seen: set | None = None) -> None:
    """`check_statements` over a gin file and the files it includes."""
    seen = set() if seen is None else seen
    real = os.path.realpath(path)
    if real in seen:
        return
    seen.add(real)
    if not os.path.exists(path):
        return  # gin reports the missing file itself
    with open(path) as f:
        check_statements(statements(f), path, seen)


def parse(files, bindings, skip_unknown: bool = False, finalize: bool = True) -> None:
    """`gin.parse_config_files_and_bindings`, after refusing unsafe statements."""
    for path in files:
        check_file(path)
    for binding in bindings:
        check_statements(statements(binding), f"binding {binding!r}")
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=finalize,
                                        skip_unknown=skip_unknown)


# ----------------------------------------------------------------------------- resume


def bindings_of(text: str) -> dict[str, Any]:
    """{"[scope/]selector.arg": value} of a gin config text; a later binding wins, as in gin."""
    out = {}
    for st in statements(text):
        if isinstance(st, config_parser.BindingStatement):
            selector = f"{st.scope}/{st.selector}" if st.scope else st.selector
            out[f"{selector}.{st.arg_name}" if st.arg_name else selector] = st.value
    return out


def _default(key: str):
    """The default of the argument a binding key names, or UNSET."""
    selector, _, arg = key.rpartition(".")
    found = _configurable(selector) if selector else None
    if found is None:
        return UNSET
    try:
        param = inspect.signature(found.wrapped).parameters.get(arg)
    except (TypeError, ValueError):
        return UNSET
    if param is None or any(param.default is x for x in (inspect.Parameter.empty, gin.REQUIRED)):
        return UNSET
    return param.default


def plan_changes(old_text: str, new_text: str, ignore=()) -> dict[str, tuple[Any, Any]]:
    """{binding key: (old value, new value)} for every binding whose value differs."""
    old, new = bindings_of(old_text), bindings_of(new_text)
    changes = {}
    for key in sorted(old.keys() | new.keys()):
        if key in ignore:
            continue
        before, after = old.get(key, _default(key)), new.get(key, _default(key))
        if before != after:
            changes[key] = (before, after)
    return changes


def describe_changes(changes: dict) -> str:
    """'train.learning_rate: 0.001 -> 0.0005; train.model: ...' (one line)."""
    return "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items())


def _show(value) -> str:
    return value if value is UNSET else repr(value)


def changes_as_gin(changes: dict) -> str:
    """Bindings that apply the new values, each commented with the old one."""
    return "".join(f"{k} = {b!r}  # was {_show(a)}\n" for k, (a, b) in changes.items()
                   if b is not UNSET)
