"""Records speculative decoding's per-request acceptance rates on the real engine, for the simulator's synthetic
proposer to draw from (fastgen.sim.acceptance). Runs the configured workload's requests all at once (as a closed
batch: acceptance depends on the text, not on load) and keeps each request's rate from its speculation record.

    python -m fastgen.calibration.acceptance --name smollm2-ngram-quote workload=quote speculative=ngram \\
        workload.num_requests=8 workload.output.mean=96
    python run.py executor=simulated speculative=synthetic speculative.acceptance=measured:smollm2-ngram-quote
"""
from __future__ import annotations

import argparse
import time

from fastgen.compose import build_engine
from fastgen.conf import compose_config
from fastgen.request import SamplingParams
from fastgen.sim.acceptance import ACCEPTANCE_DIR, MeasuredAcceptance
from fastgen.workloads.workload import build_workload


def measure(overrides: list[str]) -> MeasuredAcceptance:
    """The acceptance rates of the run `overrides` describe (run.py's overrides; a speculative proposer needed)."""
    cfg = compose_config(overrides)
    if cfg.speculative.name == "none" or cfg.executor.name == "simulated":
        raise ValueError("measuring acceptance needs a real executor and a proposer, e.g. speculative=ngram")
    engine = build_engine(cfg)
    try:
        workload = build_workload(cfg.workload, engine.vocab_size, engine.tokenizer, max_model_len=engine.max_model_len)
        for r in workload.requests:
            engine.add_request(r.prompt_token_ids, SamplingParams(max_new_tokens=r.max_new_tokens, ignore_eos=True,
                                                                  detokenize=False))
        finished = []
        while engine.has_unfinished():
            finished += [out.request for out in engine.step() if out.finished]
    finally:
        engine.close()
    stats = [req.speculation for req in finished if req.speculation.accepted + req.speculation.rejected]
    if not stats:
        raise ValueError("no request verified a proposal: nothing to measure (a workload where the proposer "
                         "proposes, e.g. workload=quote for speculative=ngram)")
    return MeasuredAcceptance([round(MeasuredAcceptance.rate(s.accepted, s.rejected), 4) for s in stats], meta={
        "overrides": overrides, "model": cfg.model.source, "proposer": cfg.speculative.name,
        "requests": len(finished), "verifies": sum(s.verifies for s in stats),
        "proposed": sum(s.proposed for s in stats), "accepted": sum(s.accepted for s in stats),
        "date": time.strftime("%Y-%m-%d", time.gmtime())})


def main(argv: list[str] | None = None) -> MeasuredAcceptance:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help=f"written to {ACCEPTANCE_DIR}/<name>.json")
    parser.add_argument("overrides", nargs="*", help="run.py overrides (a real executor and a proposer)")
    args = parser.parse_args(argv)
    measured = measure(args.overrides)
    path = measured.save(ACCEPTANCE_DIR / f"{args.name}.json")
    print(f"{path}: {len(measured.rates)} requests, mean rate {measured.mean:.3f}")
    return measured


if __name__ == "__main__":
    main()
