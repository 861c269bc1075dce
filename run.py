"""The main job: benchmark a scheduler on a workload with DeepSpeed-FastGen's metrics.

    python run.py                                   # splitfuse on the default workload, SmolLM2-135M
    python run.py scheduler=continuous workload=long-prompt
    python run.py -m scheduler=splitfuse,continuous,orca workload.clients=1,2,4,8
    python -m fastgen.analysis multirun/<date>/<time>   # gather a sweep into a table and the paper's figures
"""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fastgen.bench import run_benchmark
from fastgen.config import register_configs

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run_benchmark(OmegaConf.to_object(cfg), HydraConfig.get().runtime.output_dir)
    except (ValueError, FileNotFoundError) as e:   # a bad value or path in the config: say which, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
