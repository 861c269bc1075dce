"""What every command-line entry point (run.py, python -m fastgen.serve, calibrate) does around Hydra: import
plugin parts before composing, and turn a bad config into one `error:` line (with the valid keys, for a typo)
instead of a traceback."""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

from omegaconf import OmegaConf

from fastgen.conf import CONF_DIR, quote_null_choices, register_all
from fastgen.plugins import PluginError, import_plugins


def run_hydra(main: Callable[[], None], config_name: str = "config") -> None:
    """Runs a @hydra.main function `main` with clean errors; exits 2 on a config error."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [a for a in sys.argv[1:] if not a.startswith("-") and "=" in a]     # not `--cfg job`'s `job`
    local = os.path.join(os.getcwd(), "conf")
    if os.path.isdir(local) and os.path.realpath(local) != os.path.realpath(CONF_DIR) \
            and not any(o.startswith("hydra.searchpath=") for o in overrides):
        overrides.append(f"hydra.searchpath=[file://{local}]")     # a user's own conf/ beside fastgen's
    # Hydra's parser takes the overrides as one run of positional arguments (`a=1 --cfg job b=2` is refused): the
    # flags first, then every override, in the order given, whatever order they were typed in
    sys.argv = [sys.argv[0], *(a for a in sys.argv[1:] if a not in overrides), *quote_null_choices(overrides)]
    os.environ["HYDRA_FULL_ERROR"] = "1"     # errors reach us (below) instead of Hydra's printer
    try:
        import_plugins(overrides, [CONF_DIR], _defaults(config_name))
        register_all()
        main()
    except (PluginError, ValueError, FileNotFoundError) as e:   # a bad value or path in the config
        raise SystemExit(f"error: {e}") from None
    except (HydraException, OmegaConfBaseException) as e:
        raise SystemExit(f"error: {_config_error(e)}") from None


def _defaults(config_name: str) -> dict[str, str]:
    """Each config group's default option in conf/<config_name>.yaml (plain `group: option` and `override group:
    option` entries, over those of a config it extends, e.g. conf/capacity.yaml's `config`; any group's chosen
    YAML may name a plugin `module`, so a new kind of part needs nothing here)."""
    chosen = {}
    config = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{config_name}.yaml"), resolve=False)
    for entry in config.get("defaults", []):
        if isinstance(entry, str) and (CONF_DIR / f"{entry}.yaml").is_file():
            chosen.update(_defaults(entry))
        elif isinstance(entry, dict):
            chosen.update((group.removeprefix("override "), str(option)) for group, option in entry.items()
                          if group.removeprefix("override ").isidentifier() and "${" not in str(option))
    return chosen


def _config_error(e: Exception) -> str:
    """Hydra's message and its cause's first line; for an unknown key of a typed part, the keys that part has."""
    cause = e.__cause__ or e
    message = " ".join(str(e).split())
    if cause is not e:
        message += f": {str(cause).splitlines()[0]}"
    object_type = getattr(cause, "object_type", None)
    if "not in" in str(cause) and dataclasses.is_dataclass(object_type):
        keys = ", ".join(f.name for f in dataclasses.fields(object_type))
        message = message.split(" To append")[0] + f" {str(cause).splitlines()[0]}" \
            f" (valid keys of {object_type.__name__}: {keys})"
        return message
    # a typo in a YAML file (a plugin's knob): Hydra raises while composing, the key error only its context
    context = e.__context__
    object_type = getattr(context, "object_type", None)
    if "not in" in str(context) and dataclasses.is_dataclass(object_type):
        keys = ", ".join(f.name for f in dataclasses.fields(object_type))
        message = message.split(" full_key:")[0] + f" (valid keys of {object_type.__name__}: {keys})"
    return message


def hydra_script(config_name: str, schema: type, run: Callable[[Any, str], Any]) -> None:
    """A script's entry point over its own config (see fastgen.conf.compose_schema): conf/<config_name>.yaml with
    the command line's overrides through run_hydra (a bad value ends with one `error:` line), `run(cfg, out_dir)`
    into the config's `out_dir` or Hydra's run directory."""
    import hydra
    from hydra.core.config_store import ConfigStore
    from hydra.core.hydra_config import HydraConfig

    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)

    def app(cfg) -> None:
        typed = OmegaConf.to_object(cfg)
        try:
            run(typed, typed.out_dir or HydraConfig.get().runtime.output_dir)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None

    app.__module__ = "__main__"            # Hydra names the job (and its --help) after the script, not this module
    run_hydra(hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base=None)(app), config_name)
