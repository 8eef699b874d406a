"""The plugin manager: built-in plugins, entry-point plugins, and the registry of components.

Built-in components are registered through the very hooks a third-party plugin implements. Entry
points (group ``align``) load one at a time, and every phase of a plugin's loading is isolated:
one that fails to import, implements a hook align does not have, or whose ``register_*`` hook
raises or registers a name it may not is recorded and shown by ``align plugins``, never a crash
of the tool. Built-ins register first, and a third-party plugin may shadow one of their
components (datasette's rule), with a warning naming both.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from align.errors import PluginError, closest
from align.plugins import hookspecs

ENTRY_POINT_GROUP = "align"

#: Modules whose hooks contribute the built-in components, registered like any other plugin.
DEFAULT_PLUGINS = (
    "align.objectives.sft",
    "align.objectives.dpo",
    "align.objectives.kto",
    "align.evaluators.quiz",
    "align.evaluators.voice",
    "align.evaluators.style",
    "align.gates.threshold",
    "align.core.sources",
)

#: The component kinds and the hook that contributes each.
KINDS = {
    "objective": "register_objectives",
    "evaluator": "register_evaluators",
    "gate": "register_gates",
    "topic_source": "register_topic_sources",
}


@dataclass(frozen=True)
class LoadFailure:
    """A plugin that could not be loaded: shown by ``align plugins`` and warned about by ``align run``."""

    name: str
    distribution: str | None
    version: str | None
    error: str


@dataclass(frozen=True)
class Registration:
    name: str
    kind: str
    factory: Callable[..., Any]
    plugin: str


@dataclass
class Registry:
    """Every component by kind and name, and the plugin that registered it."""

    components: dict[str, dict[str, Registration]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )
    #: What loading found worth a word but not an error: a plugin shadowing a built-in's component.
    warnings: list[str] = field(default_factory=list)

    @staticmethod
    def check(kind: str, name: Any, factory: Any, reserved: frozenset[str] = frozenset()) -> None:
        """Refuse a name a config could not use (empty, dotted, a base section's) or a factory that
        cannot be called; the message reads after the plugin's name."""
        a = "an" if kind[0] in "aeiou" else "a"
        if not isinstance(name, str) or not name or "." in name:
            raise PluginError(f"registered {a} {kind} with the invalid name {name!r}")
        if name in reserved:
            raise PluginError(
                f"registered {a} {kind} named '{name}', which is a base section of the config "
                f"(reserved: {', '.join(sorted(reserved))}); register it under another name"
            )
        if not callable(factory):
            raise PluginError(f"registered {kind} '{name}' with a factory that is not callable")

    def get(self, kind: str, name: str) -> Registration | None:
        return self.components[kind].get(name)

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])


@dataclass
class Plugins:
    """A loaded plugin manager with its registry and the plugins that failed to load."""

    manager: pluggy.PluginManager
    registry: Registry
    failures: list[LoadFailure]

    @property
    def warnings(self) -> list[str]:
        """Worth a word at start-up but no failure: a plugin shadowing a built-in component."""
        return self.registry.warnings


def new_plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager("align")
    manager.add_hookspecs(hookspecs)
    return manager


def register_builtins(manager: pluggy.PluginManager, only: Iterable[str] | None = None) -> None:
    """Register the built-in plugins, or ``only`` those named (``"threshold"`` or its module name)."""
    wanted = None if only is None else set(only)
    if wanted is not None:
        short = {module.rsplit(".", 1)[-1] for module in DEFAULT_PLUGINS}
        unknown = wanted - short - set(DEFAULT_PLUGINS)
        if unknown:
            raise PluginError(
                f"no built-in plugin named {', '.join(sorted(unknown))} (built-ins: {', '.join(sorted(short))})"
            )
    for module_name in DEFAULT_PLUGINS:
        if wanted is None or module_name in wanted or module_name.rsplit(".", 1)[-1] in wanted:
            manager.register(importlib.import_module(module_name), name=module_name)


def load_entry_points(
    manager: pluggy.PluginManager,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
) -> list[LoadFailure]:
    """Load entry-point plugins one by one; return the ones that failed instead of raising."""
    only = None if only is None else set(only)
    skip = set(skip)
    failures = []
    for entry_point in _entry_points():
        if entry_point.name in skip or (only is not None and entry_point.name not in only):
            continue
        if manager.get_plugin(entry_point.name) is not None:
            continue
        dist = getattr(entry_point, "dist", None)
        try:
            plugin = entry_point.load()
            manager.register(plugin, name=entry_point.name)
            problem = unknown_hooks(manager, plugin)
            if problem is not None:
                raise PluginError(problem)
        except KeyboardInterrupt:
            raise
        except (
            BaseException
        ) as exc:  # a broken plugin (even one calling sys.exit) must never take the tool down
            if manager.get_plugin(entry_point.name) is not None:
                manager.unregister(name=entry_point.name)
            failures.append(
                LoadFailure(
                    name=entry_point.name,
                    distribution=dist.metadata["Name"] if dist is not None else None,
                    version=dist.version if dist is not None else None,
                    error=_describe(exc),
                )
            )
    return failures


def _describe(exc: BaseException) -> str:
    """A load failure on one line: align's own message, or the exception's type and text (pluggy
    spreads a validation error over several lines)."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text if isinstance(exc, PluginError) else f"{type(exc).__name__}: {text}"


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def reserved_names() -> frozenset[str]:
    """The config's top-level keys: a component's params section is named like the component, so a
    component named ``model`` or ``seed`` would be read as that base section."""
    from align.core.config import BASE_DEFAULTS

    return frozenset(BASE_DEFAULTS)


def collect_components(
    manager: pluggy.PluginManager, disable_hint: Callable[[str], str] | None = None
) -> tuple[Registry, list[tuple[str, str]]]:
    """Ask each plugin's contribution hooks for its components, one plugin at a time.

    A plugin whose hook raises, registers an invalid or reserved name, or a name another
    third-party plugin already has, contributes nothing and is returned as ``(plugin, error)``;
    the other plugins' components are unaffected. Built-ins come first; a third-party plugin may
    shadow a built-in's component (datasette's rule), which the registry's ``warnings`` name.
    ``disable_hint(plugin)`` is the fix a message suggests (default: ``ALIGN_DISABLE_PLUGINS``).
    """
    hint = disable_hint or (lambda plugin: f"disable it with ALIGN_DISABLE_PLUGINS={plugin}")
    reserved = reserved_names()
    registry = Registry()
    failures = []
    for plugin_name, plugin in manager.list_name_plugin():  # in registration order: built-ins first
        if plugin is None:  # blocked
            continue
        try:
            staged = _contributions(manager, plugin)
            for kind, name, factory in staged:
                registry.check(kind, name, factory, reserved)
            seen: set[tuple[str, str]] = set()
            for kind, name, _ in staged:
                if (kind, name) in seen:
                    raise PluginError(f"registered {kind} '{name}' twice")
                seen.add((kind, name))
            shadowed = []
            for kind, name, _ in staged:
                existing = registry.get(kind, name)
                if existing is None:
                    continue
                if existing.plugin not in DEFAULT_PLUGINS or plugin_name in DEFAULT_PLUGINS:
                    raise PluginError(
                        f"registered {kind} '{name}', which plugin '{existing.plugin}' registered "
                        f"already; uninstall one of the two, or {hint(plugin_name)}"
                    )
                shadowed.append(existing)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: it would end align with exit 0 and no word
            failures.append((plugin_name, _describe(exc)))
            continue
        for kind, name, factory in staged:
            registry.components[kind][name] = Registration(name, kind, factory, plugin_name)
        for existing in shadowed:
            registry.warnings.append(
                f"plugin '{plugin_name}' replaces the built-in {existing.kind} '{existing.name}' of "
                f"'{existing.plugin}'; to use the built-in, {hint(plugin_name)}"
            )
    return registry, failures


def _contributions(
    manager: pluggy.PluginManager, plugin: object
) -> list[tuple[str, str, Callable[..., Any]]]:
    """What one plugin's contribution hooks register, as ``(kind, name, factory)``, in order."""
    staged: list[tuple[str, str, Callable[..., Any]]] = []
    for kind, hook_name in KINDS.items():
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            if impl.plugin is not plugin:
                continue
            if impl.wrapper or impl.hookwrapper:
                raise PluginError(
                    f"made {hook_name} a wrapper (wrapper=True or hookwrapper=True), which a "
                    "contribution hook cannot be: it calls register(name, factory); use a plain @hookimpl"
                )

            def register(name: str, factory: Callable[..., Any], _kind: str = kind) -> None:
                staged.append((_kind, name, factory))

            try:
                impl.function(register=register)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                raise PluginError(f"raised in {hook_name}: {type(exc).__name__}: {exc}") from exc
    return staged


def build_registry(manager: pluggy.PluginManager) -> Registry:
    """:func:`collect_components`, where a plugin that fails is an error (the test harness's way:
    the author of the plugin under test sees why)."""
    registry, failures = collect_components(manager, disable_hint=lambda plugin: "unregister it")
    if failures:
        plugin, error = failures[0]
        raise PluginError(f"plugin '{plugin}' {error}")
    return registry


def unknown_hooks(manager: pluggy.PluginManager, plugin: object) -> str | None:
    """Why ``plugin`` implements a hook align never calls (a typo), or ``None``: pluggy's
    ``check_pending`` for one plugin, with the closest hook's name."""
    specs = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "align_spec")]
    for caller in manager.get_hookcallers(plugin) or []:
        if caller.spec is not None:
            continue
        if any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls()):
            return (
                f"implements '{caller.name}', which is not an align hook{closest(caller.name, specs)} "
                "(docs/plugins.md lists the hooks)"
            )
    return None


def validate_hooks(manager: pluggy.PluginManager) -> None:
    """A hook implementation whose name matches no hook (a typo) is an error naming its plugin."""
    for name, plugin in manager.list_name_plugin():
        problem = None if plugin is None else unknown_hooks(manager, plugin)
        if problem is not None:
            raise PluginError(f"plugin '{name}' {problem}")


def _split_env(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def load_plugins(
    *,
    entry_points: bool = True,
    extra: Iterable[object] = (),
    environ: dict[str, str] | None = None,
) -> Plugins:
    """The plugin manager align runs with: built-ins, then entry points, then ``extra`` plugin objects.

    ``ALIGN_LOAD_PLUGINS=a,b`` loads only those entry points (empty: none);
    ``ALIGN_DISABLE_PLUGINS=a,b`` skips those. A plugin that fails at any point (its import, a
    hook align does not have, its contribution hooks) is unregistered and listed in ``failures``;
    one that shadows a built-in's component wins, and ``warnings`` says so.
    """
    import os

    environ = os.environ if environ is None else environ
    manager = new_plugin_manager()
    register_builtins(manager)
    failures: list[LoadFailure] = []
    if entry_points:
        failures = load_entry_points(
            manager,
            only=_split_env(environ.get("ALIGN_LOAD_PLUGINS")),
            skip=_split_env(environ.get("ALIGN_DISABLE_PLUGINS")) or (),
        )
    for plugin in extra:
        name = _plugin_name(manager, plugin)
        try:
            register_plugin(manager, plugin, name)
        except pluggy.PluginValidationError as exc:  # a hook with arguments the spec lacks …
            # pluggy keeps the name, and the hooks it took before the refused one: none may run
            manager.unregister(name=name)
            failures.append(LoadFailure(name, None, None, _describe(exc)))
            continue
        problem = unknown_hooks(manager, plugin)
        if problem is not None:
            manager.unregister(name=name)
            failures.append(LoadFailure(name=name, distribution=None, version=None, error=problem))
    owners = _distribution_owners()

    def disable_hint(plugin: str) -> str:
        if plugin in owners:
            return f"disable it with ALIGN_DISABLE_PLUGINS={plugin}"
        return "leave it out of the plugins given to load_plugins"

    registry, failed = collect_components(manager, disable_hint)
    for name, error in failed:  # a plugin that contributes nothing watches nothing either
        manager.unregister(name=name)
        dist = owners.get(name)
        failures.append(
            LoadFailure(
                name=name,
                distribution=dist[0] if dist else None,
                version=dist[1] if dist else None,
                error=error,
            )
        )
    return Plugins(manager=manager, registry=registry, failures=failures)


def register_plugin(manager: pluggy.PluginManager, plugin: Any, name: str | None = None) -> str:
    """Register ``plugin`` under ``name``, by default its module's name or its class's (``Broken``,
    then ``Broken-2``), so that errors and ``align plugins`` name it readably; returns the name."""
    name = name or _plugin_name(manager, plugin)
    manager.register(plugin, name=name)
    return name


def _plugin_name(manager: pluggy.PluginManager, plugin: Any) -> str:
    if isinstance(plugin, ModuleType):
        return plugin.__name__
    base = type(plugin).__name__
    name, n = base, 1
    while manager.has_plugin(name):
        n += 1
        name = f"{base}-{n}"
    return name


def describe_plugins(plugins: Plugins) -> list[dict[str, Any]]:
    """What ``align plugins`` prints: each plugin's name, version, hooks, components and load error."""
    rows = []
    owners = _distribution_owners()
    for name, plugin in sorted(plugins.manager.list_name_plugin(), key=lambda item: item[0]):
        hooks = sorted(h.name for h in plugins.manager.get_hookcallers(plugin) or [])
        components = {
            kind: sorted(r.name for r in plugins.registry.components[kind].values() if r.plugin == name)
            for kind in KINDS
        }
        dist = owners.get(name) or (_module_distribution(plugin) if isinstance(plugin, ModuleType) else None)
        rows.append(
            {
                "name": name,
                "distribution": dist[0] if dist else None,
                "version": dist[1] if dist else None,
                "builtin": name in DEFAULT_PLUGINS,
                "hooks": hooks,
                "components": {k: v for k, v in components.items() if v},
                "error": None,
            }
        )
    for failure in plugins.failures:
        rows.append(
            {
                "name": failure.name,
                "distribution": failure.distribution,
                "version": failure.version,
                "builtin": False,
                "hooks": [],
                "components": {},
                "error": failure.error,
            }
        )
    return rows


def _distribution_owners() -> dict[str, tuple[str, str]]:
    owners = {}
    for ep in _entry_points():
        dist = getattr(ep, "dist", None)
        if dist is not None:
            owners[ep.name] = (dist.metadata["Name"], dist.version)
    return owners


def _module_distribution(module: ModuleType) -> tuple[str, str] | None:
    top = module.__name__.split(".")[0]
    if top == "align":
        from align import __version__

        return ("mindprint-align", __version__)
    names = importlib.metadata.packages_distributions().get(top)
    if not names:
        return None
    return (names[0], importlib.metadata.version(names[0]))
