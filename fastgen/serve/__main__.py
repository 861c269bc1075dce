"""`python -m fastgen.serve [key=value ...]`: load the model named by conf/serve.yaml and serve it over HTTP.

Binds 127.0.0.1:8000 unless told otherwise (host=0.0.0.0 port=9000); the API key comes from FASTGEN_API_KEY.
replicas=N (> 1) serves N engine replicas on Ray Serve behind router=NAME (fastgen/serve/replicas.py);
deployment=disaggregated serves prefill and decode pools (fastgen.deployment) behind this process's front.
"""
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from fastgen.cli import run_hydra
from fastgen.conf import CONF_DIR
from fastgen.deployment import build_deployment
from fastgen.engine import freeze_startup_heap
from fastgen.serve.app import create_app
from fastgen.serve.config import LOOPBACK_HOSTS, ServeConfig
from fastgen.serve.edge import uvicorn_server


@hydra.main(config_path=str(CONF_DIR), config_name="serve", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    cfg: ServeConfig = OmegaConf.to_object(dict_cfg)
    cfg.validate()
    if cfg.api_key is None and cfg.host not in LOOPBACK_HOSTS:
        logging.getLogger(__name__).warning("serving on %s without an api_key: anyone who can reach it can use it; "
                                            "set FASTGEN_API_KEY", cfg.host)
    if cfg.replicas == 1:
        engine = build_deployment(cfg, cfg.deployment, cfg.router)
        freeze_startup_heap()
        try:
            uvicorn_server(create_app(engine, cfg), cfg).run()
        finally:
            engine.close()                  # deployment.placement=process: its engines' worker processes end
        return
    from fastgen.serve.replicas import ReplicaSet      # Ray only where replicas are asked for
    replicas = ReplicaSet(cfg)
    try:
        uvicorn_server(create_app(replicas, cfg), cfg).run()
    finally:
        replicas.stop()


if __name__ == "__main__":
    run_hydra(main, config_name="serve")
