"""A decode engine in a process of its own (the cross-process KV connector's test): it builds the tiny model,
takes `count` handoffs and their KV from a ProcessConnector, decodes them and puts their tokens on `results`."""
from tiny import compose_engine, drain, fastgen_from_hf, tiny_hf_model


def decode_in_this_process(connector, results, family: str, count: int, knobs: dict) -> None:
    engine = compose_engine(fastgen_from_hf(tiny_hf_model(family, seed=0)), "splitfuse", num_blocks=64,
                            block_size=16, **knobs).engine
    for _ in range(count):
        handoff, contents = connector.recv(timeout=300)
        assert engine.import_request(handoff, contents)
    results.put({i: r.output_token_ids for i, r in drain(engine).items()})
