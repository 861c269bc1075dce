"""Registries of pluggable parts (schedulers, KV managers, executors, ...): a name, a class and its typed config.

Each part declares its own config dataclass next to it; registering stores that dataclass in Hydra's ConfigStore
under the part's config group as `<name>_schema`, which the part's YAML file names in its defaults list. Hydra then
validates every override of that part against its own knobs only. Parts of fastgen are found by importing every
module of their package; parts defined elsewhere are imported by name or file path first (`module:` in their YAML
or `<group>.module=...`; see fastgen.plugins).
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import sys
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, group: str, package: str, base_config: type):
        self.group, self.package, self.base_config = group, package, base_config
        self._classes: dict[str, type[T]] = {}
        self._discovered = False

    def register(self, name: str, config: type | None = None) -> Callable[[type[T]], type[T]]:
        """Class decorator: makes `cls` selectable as `<group>=name`, with `config` as its typed config. Without
        `config` the part inherits its parent's knobs under a config of its own name."""
        def wrap(cls: type[T]) -> type[T]:
            cfg = config or _named_subclass(getattr(cls, "Config", self.base_config), name, cls.__module__)
            default = getattr(cfg, "name", dataclasses.MISSING)
            if default != name:
                raise TypeError(f"{cfg.__name__}.name must default to {name!r} (the name {cls.__name__} registers as "
                                f"in the {self.group} registry), got {default!r}")
            cls.name, cls.Config = name, cfg
            self._classes[name] = cls
            from hydra.core.config_store import ConfigStore
            ConfigStore.instance().store(group=self.group, name=f"{name}_schema", node=cfg)
            return cls
        return wrap

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._classes)

    def get(self, name: str) -> type[T]:
        self.discover()
        if name not in self._classes:
            raise ValueError(f"unknown {self.group} {name!r}; available: {', '.join(sorted(self._classes))} "
                             f"(a {self.group} defined elsewhere needs {self.group}.module=<module or file>)")
        return self._classes[name]

    def resolve(self, config) -> type[T]:
        """The class `config` selects, after checking the config's values and that it is that class's own typed
        config (a YAML file that forgot its schema would give the base class)."""
        config.validate()
        cls = self.get(config.name)
        if not isinstance(config, cls.Config):
            raise TypeError(f"{self.group} {config.name!r} needs its typed config {cls.Config.__name__}, got "
                            f"{type(config).__name__}: start conf/{self.group}/{config.name}.yaml with "
                            f"`defaults: [{config.name}_schema, _self_]`, or make it in code with the registry's "
                            f".config({config.name!r}, ...)")
        return cls

    def config(self, name: str, **knobs: Any):
        """The typed config of `name` with `knobs` set; an unknown knob is refused naming the valid ones."""
        cls = self.get(name).Config
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(knobs) - valid)
        if unknown:
            raise ValueError(f"{self.group} {name!r} has no knob(s) {unknown}; its knobs: {', '.join(sorted(valid))}")
        return cls(**knobs)

    def discover(self) -> None:
        """Imports every module of the package once, so that each registers its parts."""
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{info.name}")


def _named_subclass(config: type, name: str, module: str) -> type:
    """A dataclass with `config`'s knobs whose `name` defaults to `name`, importable from `module` (so configs
    pickle, e.g. to worker processes)."""
    derived = dataclasses.make_dataclass(f"{config.__name__}_{name.replace('-', '_')}",
                                         [("name", str, dataclasses.field(default=name))], bases=(config,))
    derived.__module__ = module
    setattr(sys.modules[module], derived.__name__, derived)
    return derived
