"""The `fastgen` command (pyproject's console script; also `python -m fastgen`), so the examples work from any
folder:

    fastgen run [key=value ...] [-m]      # = python run.py ...: benchmark a scheduler on a workload (or a sweep)
    fastgen serve [key=value ...]         # = python -m fastgen.serve: an OpenAI-compatible server
    fastgen capacity [key=value ...]      # = python -m fastgen.capacity: the highest rate that meets an SLO
    fastgen analyze SWEEP_DIR [...]       # = python -m fastgen.analysis: a sweep's table and figures
    fastgen ablate factors='[...]' [...]  # = python -m fastgen.ablate: the base and each one-factor change

Each reads fastgen's conf/ and, as run.py does, a conf/ in the current folder (plugins' YAML files).
"""
from __future__ import annotations

import sys

COMMANDS = {"run": "benchmark a scheduler on a workload (python run.py)",
            "serve": "serve a model over OpenAI-compatible HTTP (python -m fastgen.serve)",
            "capacity": "search the highest request rate that meets an SLO (python -m fastgen.capacity)",
            "analyze": "a sweep directory's table and figures (python -m fastgen.analysis)",
            "ablate": "the base and each one-factor change, a factor table (python -m fastgen.ablate)"}


def _run() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    from fastgen.bench import run_benchmark
    from fastgen.cli import run_hydra
    from fastgen.conf import CONF_DIR

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def main(cfg: DictConfig) -> None:
        run_benchmark(OmegaConf.to_object(cfg), HydraConfig.get().runtime.output_dir)

    if not any(a.startswith("hydra.job.name=") for a in sys.argv[1:]):
        sys.argv.append("hydra.job.name=run")          # run.log, as run.py writes it
    run_hydra(main)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip() + "\n\ncommands:\n" + "\n".join(f"  {c:<10}{h}" for c, h in COMMANDS.items()))
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    sys.argv = [f"fastgen {command}", *rest]
    if command == "run":
        _run()
    elif command == "serve":
        from fastgen.cli import run_hydra
        from fastgen.serve.__main__ import main as serve
        run_hydra(serve, config_name="serve")
    elif command == "capacity":
        from fastgen.capacity import main as capacity
        from fastgen.cli import run_hydra
        run_hydra(capacity, config_name="capacity")
    elif command == "ablate":
        from fastgen.ablate import main as ablate
        ablate(rest)
    else:
        from fastgen.analysis import main as analyze
        analyze(rest)


if __name__ == "__main__":
    main()
