"""The plugin manager: built-in plugins, entry-point plugins, and the registry of components.

Built-in components are registered through the very hooks a third-party plugin implements. Entry
points (group ``align``) load one at a time: one that fails is recorded and shown by
``align plugins``, never a crash of the tool.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from align.errors import PluginError
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

    def add(self, kind: str, name: str, factory: Callable[..., Any], plugin: str) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise PluginError(f"plugin '{plugin}' registered a {kind} with the invalid name {name!r}")
        if not callable(factory):
            raise PluginError(
                f"plugin '{plugin}' registered {kind} '{name}' with a factory that is not callable"
            )
        existing = self.components[kind].get(name)
        if existing is not None:
            raise PluginError(
                f"{kind} '{name}' is registered by two plugins, '{existing.plugin}' and '{plugin}'; "
                f"uninstall or disable one (ALIGN_DISABLE_PLUGINS={plugin})"
            )
        self.components[kind][name] = Registration(name, kind, factory, plugin)

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
            manager.check_pending()
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
                    error=f"{type(exc).__name__}: {exc}",
                )
            )
    return failures


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def build_registry(manager: pluggy.PluginManager) -> Registry:
    """Ask every plugin's contribution hooks for its components, remembering who registered what."""
    registry = Registry()
    for kind, hook_name in KINDS.items():
        hook = getattr(manager.hook, hook_name)
        # Call implementations one at a time so every registration is attributed to its plugin.
        for impl in reversed(hook.get_hookimpls()):

            def register(
                name: str, factory: Callable[..., Any], _kind=kind, _plugin=impl.plugin_name
            ) -> None:
                registry.add(_kind, name, factory, _plugin)

            try:
                impl.function(register=register)
            except (KeyboardInterrupt, PluginError):
                raise
            except BaseException as exc:  # SystemExit too: it would end align with exit 0 and no word
                raise PluginError(
                    f"plugin '{impl.plugin_name}' raised in {hook_name}: {type(exc).__name__}: {exc}; fix the "
                    f"plugin, or disable it with ALIGN_DISABLE_PLUGINS={impl.plugin_name}"
                ) from exc
    return registry


def validate_hooks(manager: pluggy.PluginManager) -> None:
    """A hook implementation whose name matches no hook (a typo) is an error naming its plugin."""
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        name = manager.get_name(exc.plugin) or repr(exc.plugin)
        raise PluginError(f"plugin '{name}': {exc}") from None


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
    ``ALIGN_DISABLE_PLUGINS=a,b`` skips those.
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
        register_plugin(manager, plugin)
    validate_hooks(manager)
    return Plugins(manager=manager, registry=build_registry(manager), failures=failures)


def register_plugin(manager: pluggy.PluginManager, plugin: Any, name: str | None = None) -> str:
    """Register ``plugin`` under ``name``, by default its module's name or its class's (``Broken``,
    then ``Broken-2``), so that errors and ``align plugins`` name it readably; returns the name."""
    if name is None:
        if isinstance(plugin, ModuleType):
            name = plugin.__name__
        else:
            base = type(plugin).__name__
            name, n = base, 1
            while manager.has_plugin(name):
                n += 1
                name = f"{base}-{n}"
    manager.register(plugin, name=name)
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
