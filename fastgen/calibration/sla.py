"""Derive a deployment's SLA from the paper's: ask it for the same fraction of its single-request speed.

The paper's chat SLA (first token within prompt_tokens / 512 s; generation at 2, 4 or 6 tokens/s) was set for its
GPU deployments. On a CPU serving SmolLM2-135M almost no request meets it, so every effective throughput is 0 and
the metric cannot tell schedulers apart. The SLA of a deployment D is the paper's, scaled by how fast D serves one
request alone compared with the paper's reference deployment R, Llama-2 70B on 4 A100-80GB (the deployment of
its effective-throughput figure):

    prompt_tokens_per_s(D) = 512 x prefill_rate(D) / prefill_rate(R)
    gen_tokens_per_s(D)    = g x decode_step_s(R) / decode_step_s(D)       for g in 2, 4, 6

prefill_rate: prompt tokens per second of one request's whole-prompt step; decode_step_s: one step decoding one
sequence. R's are the simulator's (the A100 profile fitted to Vidur's measured operator times) at the paper's
workload (prompt 1200, decode context 1200 + 60/2); D's are measured on the real executor at the run's workload
(prompt = its mean prompt length, decode context = that + half its mean output), each the median of `--repeats`
steps after a warm-up (fastgen.calibration.calibrate.measure). The EMA span (a token count) stays 16. Values are
rounded to two significant digits; the measurements are kept in the SLA's `derived_from`, so `scale` recomputes
it exactly.

    python -m fastgen.calibration.sla                                   # this CPU, the default model and workload
    python -m fastgen.calibration.sla --write conf/hardware/cpu.yaml    # ... into the `sla:` of hardware=cpu's file
    python -m fastgen.calibration.sla --speeds profile --write conf/hardware/cpu.yaml   # speeds from the calibrated profile

Positional arguments are run.py overrides (model, hardware, workload). On a shared machine run it when idle:
other load slows the measured steps and so loosens the SLA (the output records the load average). Where the
machine is busy, `--speeds profile` reads D's speeds off its calibrated simulator profile instead: the cost model
fitted to step times that `python -m fastgen.calibration.calibrate` measured (on an idle machine) for this model.
"""
from __future__ import annotations

import argparse
import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from fastgen.metrics import SLAConfig

REFERENCE = ["executor=simulated", "hardware=a100-80gb", "hardware.tensor_parallel=4", "model.source=llama-2-70b"]
REFERENCE_PROMPT, REFERENCE_OUTPUT = 1200, 60


@dataclass
class Speeds:
    """How fast a deployment serves one request alone."""

    prefill_tokens_per_s: float      # prompt tokens / seconds of one request's whole-prompt step
    decode_step_s: float             # seconds of one step decoding one sequence


def scale(paper: SLAConfig, name: str, prefill_tokens_per_s: float, decode_step_s: float,
          reference_prefill_tokens_per_s: float, reference_decode_step_s: float, **context: float) -> SLAConfig:
    """The paper's SLA scaled to a deployment with these speeds (see the module docstring); `context` (the lengths
    measured at) is recorded with the measurements."""
    prompt_scale = prefill_tokens_per_s / reference_prefill_tokens_per_s
    gen_scale = reference_decode_step_s / decode_step_s
    two_digits = lambda x: float(f"{x:.2g}")  # noqa: E731
    return SLAConfig(name=name, prompt_tokens_per_s=two_digits(paper.prompt_tokens_per_s * prompt_scale),
                     gen_tokens_per_s=[two_digits(g * gen_scale) for g in paper.gen_tokens_per_s],
                     ema_span=paper.ema_span,
                     derived_from=dict(prefill_tokens_per_s=prefill_tokens_per_s, decode_step_s=decode_step_s,
                                       reference_prefill_tokens_per_s=reference_prefill_tokens_per_s,
                                       reference_decode_step_s=reference_decode_step_s, **context))


def simulated_speeds(cfg, prompt_tokens: int, decode_context: int) -> Speeds:
    """One request's prompt step and one decode step as executor=simulated predicts them for cfg's deployment
    (its datasheet and fitted profile)."""
    from fastgen.sim.cost_model import CostModel, Profile
    from fastgen.sim.work import BatchShape
    from fastgen.sim.shapes import model_spec

    sheet = cfg.hardware.sim
    cost = CostModel(model_spec(cfg.model.source), sheet, cfg.hardware.dtype, cfg.hardware.tensor_parallel,
                     Profile.load(sheet.profile) if sheet.profile else Profile())
    return Speeds(prompt_tokens / cost.step_time(BatchShape.of([prompt_tokens], [prompt_tokens])),
                  cost.step_time(BatchShape.of([1], [decode_context])))


def reference_speeds() -> Speeds:
    """The paper's reference deployment, simulated with its fitted A100 profile."""
    from fastgen.conf import compose_config
    return simulated_speeds(compose_config(REFERENCE), REFERENCE_PROMPT, REFERENCE_PROMPT + REFERENCE_OUTPUT // 2)


def measured_speeds(executor, prompt_tokens: int, decode_context: int, repeats: int) -> Speeds:
    """One request's prompt step and one decode step on the real executor (medians, wall clock)."""
    from fastgen.calibration.calibrate import measure
    from fastgen.sim.work import BatchShape

    prompt = BatchShape.of([prompt_tokens], [prompt_tokens])
    decode = BatchShape.of([1], [decode_context])
    measure(executor, prompt, 1)                  # warm-up: allocation and kernel selection
    return Speeds(prompt_tokens / measure(executor, prompt, repeats), measure(executor, decode, repeats))


SPEEDS = ("measured", "profile")


def derive(cfg, name: str, repeats: int = 7, speeds: str = "measured", model=None, tokenizer=None) -> SLAConfig:
    """The paper's SLA scaled to cfg's deployment (model, hardware) at cfg's workload lengths. `speeds`:
    `measured` times the real executor now; `profile` reads them off the deployment's calibrated simulator
    profile (step times measured by fastgen.calibration.calibrate, on an idle machine, and fitted): for a machine that is
    busy now."""
    prompt = max(1, round(cfg.workload.prompt.mean))
    context = prompt + max(1, round(cfg.workload.output.mean / 2))
    if speeds == "profile":
        here = simulated_speeds(cfg, prompt, context)
    else:
        from fastgen.executors import make_executor
        cfg.kv.num_blocks = -(-context // cfg.kv.block_size)
        executor = make_executor(cfg, model, tokenizer)
        try:
            here = measured_speeds(executor, prompt, context, repeats)
        finally:
            executor.close()
    ref = reference_speeds()
    return scale(SLAConfig(), name, here.prefill_tokens_per_s, here.decode_step_s, ref.prefill_tokens_per_s,
                 ref.decode_step_s, prompt_tokens=prompt, decode_context=context)


def to_yaml(sla: SLAConfig, comment: str) -> str:
    from omegaconf import OmegaConf
    body = OmegaConf.to_yaml(OmegaConf.structured(sla))
    return "".join(f"# {line}\n" if line else "#\n" for line in comment.splitlines()) + body


def write_into(path: Path, block: str) -> None:
    """Puts `block` (comment lines, then `sla:` and its indented values) in place of the `sla:` section of a
    conf/hardware/<name>.yaml (with the comment lines right above it; a `# sla: ...` line marks where none is set
    yet), or at its end; the rest of the file is left as it is."""
    lines = path.read_text().splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(("sla:", "# sla:"))), len(lines))
    end = start + 1
    while end < len(lines) and lines[end][:1] in (" ", "\t", "\n"):
        end += 1
    if start < len(lines) and lines[start].startswith("sla:"):
        while start > 0 and lines[start - 1].startswith("#"):      # the comment above it goes with it
            start -= 1
    elif start == len(lines) and lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    path.write_text("".join(lines[:start]) + block + "".join(lines[end:]))


def main(argv: list[str] | None = None) -> SLAConfig:
    from fastgen.conf import compose_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="run.py overrides (model, hardware, workload)")
    parser.add_argument("--repeats", type=int, default=7, help="median of this many steps per measurement")
    parser.add_argument("--speeds", choices=SPEEDS, default="measured",
                        help="measured: time the real executor now; profile: the calibrated simulator profile's "
                             "(step times measured when it was calibrated), for a machine that is busy now")
    parser.add_argument("--name", help="the SLA's name (default: the hardware config's)")
    parser.add_argument("--write", type=Path, help="write the SLA into this conf/hardware/<name>.yaml (its `sla:`)")
    args = parser.parse_args(argv)
    executor = "executor=simulated" if args.speeds == "profile" else "executor=real"
    cfg = compose_config(["progress=false", executor, *args.overrides])
    hardware = cfg.hardware.name or cfg.hardware.device
    load = os.getloadavg()
    sla = derive(cfg, args.name or hardware, args.repeats, args.speeds)
    d = sla.derived_from
    if args.speeds == "measured":
        how = f"measured on the real executor now (median of {args.repeats} steps)"
    else:
        from fastgen.sim.cost_model import Profile
        meta = Profile.load(cfg.hardware.sim.profile).meta
        how = (f"read off the calibrated profile {cfg.hardware.sim.profile!r}: the cost model fitted to step "
               f"times\nthat fastgen.calibration.calibrate measured on {meta.get('date', '?')} ({meta.get('threads', '?')} "
               f"threads, {meta.get('timer', '?')} clock; median fit error {meta.get('fit_rel_error_median', 0):.1%})")
    comment = "\n".join([
        f"The paper's chat SLA scaled to {cfg.model.source} on hardware={hardware} ({cfg.hardware.dtype}) by its "
        "single-request speed",
        "against the paper's Llama-2 70B on 4xA100 (fastgen/calibration/sla.py). Speeds here are", how + ":",
        f"  prompt: 512 x {d['prefill_tokens_per_s']:.0f} / {d['reference_prefill_tokens_per_s']:.0f} tok/s "
        f"(one {d['prompt_tokens']:.0f}-token prompt step, here / reference)",
        f"  generation: g x {d['reference_decode_step_s'] * 1e3:.1f} / {d['decode_step_s'] * 1e3:.1f} ms "
        f"(one decode step at context {d['decode_context']:.0f}, reference / here)",
        f"Derived {datetime.date.today()} (load average {load[0]:.2f} -> {os.getloadavg()[0]:.2f} on {os.cpu_count()} "
        "CPUs); regenerate:",
        f"  python -m fastgen.calibration.sla {' '.join(args.overrides)}{' ' if args.overrides else ''}--speeds {args.speeds} "
        f"--write {args.write or f'conf/hardware/{hardware}.yaml'}"])
    text = to_yaml(sla, comment)
    print(text)
    if args.write:
        body = to_yaml(sla, "")                      # the values below the comment, nested as hardware.sla
        write_into(args.write, text[:-len(body)] + "sla:\n" + "".join(f"  {line}\n" for line in body.splitlines()))
        print("wrote", args.write)
    return sla


if __name__ == "__main__":
    main()
