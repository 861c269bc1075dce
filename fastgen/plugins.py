"""The registries of built-in parts and how parts defined outside fastgen get imported before Hydra composes a config.

A part defined elsewhere (a scheduler, KV manager, executor, router, ... of your own) is one Python file that
registers it and one YAML file in a config group that names the file or module (`module: my_policies.prompt_order`
or `module: my_policies/prompt_order.py`). Its typed config must be registered before Hydra reads the YAML, so
`import_plugins` runs first: for every config group it finds the chosen option's YAML (in fastgen's conf/, in
`./conf` and in `hydra.searchpath`), reads its `module`, or takes `<group>.module=...` from the overrides, and
imports it with the current directory on sys.path. Nothing here is specific to a kind of part: a new kind (a
registry of its own) only adds its registry to REGISTRIES, so that its built-in parts are discovered. A failure is
one line naming the module and sys.path, before any model loads.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import OmegaConf

from fastgen.registry import Registry


def _schedulers() -> Registry:
    from fastgen.schedulers import SCHEDULERS
    return SCHEDULERS


def _kv_managers() -> Registry:
    from fastgen.kv import KV_MANAGERS
    return KV_MANAGERS


def _executors() -> Registry:
    from fastgen.executors import EXECUTORS
    return EXECUTORS


def _routers() -> Registry:
    from fastgen.routers import ROUTERS
    return ROUTERS


def _proposers() -> Registry:
    from fastgen.speculative import PROPOSERS
    return PROPOSERS


# Each kind of part: its config group and its registry (imported lazily; discovery imports the built-in parts).
REGISTRIES: dict[str, Callable[[], Registry]] = {"scheduler": _schedulers, "kv": _kv_managers,
                                                 "executor": _executors, "router": _routers,
                                                 "speculative": _proposers}


class PluginError(ValueError):
    """A part named by the config could not be imported."""


def import_module_or_file(spec: str) -> None:
    """Imports `spec`, a dotted module name or a .py file path, with the current directory on sys.path."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        if spec.endswith(".py") or os.sep in spec or "/" in spec:
            path = Path(spec).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"no such file {path}")
            name = path.stem
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except Exception as e:  # noqa: BLE001  (whatever the plugin raises, the user needs one line)
        raise PluginError(f"cannot import plugin module {spec!r}: {type(e).__name__}: {e} (sys.path: "
                          f"{', '.join(sys.path[:6])}{' ...' if len(sys.path) > 6 else ''})") from None


def import_plugins(overrides: Sequence[str], conf_dirs: Sequence[Path], defaults: dict[str, str]) -> None:
    """Imports the modules the chosen parts name (see the module docstring). `defaults` maps each config group
    to its default option; sweeps (`scheduler=a,b`) import every option's module."""
    choices = dict(defaults)
    modules: list[str] = []
    search = list(conf_dirs) + [Path.cwd() / "conf"]
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        if not sep:
            continue
        if key == "hydra.searchpath":
            search += [Path(p.strip().strip("'\"").removeprefix("file://"))
                       for p in value.strip("[]").split(",") if p.strip().strip("'\"").startswith("file://")]
        elif key.endswith(".module") and key.count(".") == 1 and value not in ("", "null"):
            modules.append(value)
        elif "." not in key and "/" not in key and key != "hydra":
            choices[key] = value                 # group=option (a plain key=value is skipped below: no YAML)
    for group, value in choices.items():
        for option in filter(None, (v.strip() for v in value.split(","))):
            for directory in search:
                path = directory / group / f"{option}.yaml"
                if path.is_file():
                    module = OmegaConf.load(path).get("module")
                    if module:
                        modules.append(str(module))
                    break
    for module in dict.fromkeys(modules):
        import_module_or_file(module)
