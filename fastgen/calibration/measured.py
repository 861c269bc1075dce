"""GPU profiles fitted to published operator measurements instead of live steps: Vidur's per-layer operator times
of Llama-2-7B and 70B on one A100-80GB / H100-80GB (every token count 1..4096, tensor parallel 1/2/4/8) and its
all-reduce times inside a DGX node, shipped (thinned) in fastgen/calibration/data/vidur/.

    python -m fastgen.calibration.measured a100-80gb h100-80gb       # fit; write fastgen/sim/profiles/<gpu>.json
    python -m fastgen.calibration.measured --extract /path/to/vidur/data    # re-make the shipped rows from Vidur's files

Every series (one model, TP degree and operator over token counts; one worker count over all-reduce sizes) is
split: every second point is held out (`held_out`), the fit sees the others, first and last included. What is
fitted, from the rows it sees:

- the GEMMs (QKV, output, gate+up, down) of the measured shapes: their times over token counts, kept as curves
  (`Profile.gemm_times`, interpolated between the fit's token counts): cuBLAS switches tiles per shape, so a
  GEMM's time is a staircase that no smooth efficiency follows;
- GEMMs of other shapes (other models, the LM head): the roofline efficiencies (`matmul_efficiency`,
  `matmul_half_tokens`, `bandwidth_efficiency`), least squares over all measured GEMM rows of the GPU;
- norms, rotary, activation and residual adds, the per-layer overhead: `layer_overhead_s` (their launches) plus
  their bytes at `elementwise_efficiency` x memory bandwidth;
- all-reduce: `allreduce_latency_s` + 2 (n-1)/n x bytes / `allreduce_bandwidth_gbs`, over the in-node rows of
  2, 4 and 8 GPUs;
- send/recv between two GPUs of a node (moving KV between disaggregated prefill and decode engines):
  `kv_link_latency_s` + bytes / `kv_link_bandwidth_gbs` (fastgen.kv.connector.Link). Vidur's rows between two
  nodes are kept too (`internode_errors` sets them against a datasheet link).

Attention kernels are not in these measurements: the attention efficiencies and the per-chunk, per-step and
per-sequence overheads keep their typical (uncalibrated) values; `meta["modelled"]` lists them.
`evaluate` predicts the held-out rows through `CostModel`, the code the simulator runs.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from fastgen.kv.connector import Link
from fastgen.sim.cost_model import PROFILES_DIR, CostModel, Profile
from fastgen.sim.work import Gemm
from fastgen.sim.shapes import model_spec

DATA_DIR = Path(__file__).resolve().parent / "data" / "vidur"
OPERATORS_PATH, ALLREDUCE_PATH = DATA_DIR / "operators.csv.gz", DATA_DIR / "all_reduce.csv.gz"
SEND_RECV_PATH = DATA_DIR / "send_recv.csv.gz"
SOURCE = ("Vidur (github.com/microsoft/vidur, commit 7d47513363ec, MIT licence): "
          "data/profiling/compute/{gpu}/meta-llama/Llama-2-{{7b,70b}}-hf/mlp.csv and "
          "data/profiling/network/{gpu}_dgx/{{all_reduce,send_recv}}.csv, thinned into fastgen/calibration/data/vidur/")
GPUS = {"a100-80gb": "a100", "h100-80gb": "h100"}          # fastgen hardware / profile name -> Vidur's name
MODELS = {"llama-2-7b": "Llama-2-7b-hf", "llama-2-70b": "Llama-2-70b-hf"}
GEMM_OPS = {"attn_pre_proj": "qkv", "attn_post_proj": "o", "mlp_up_proj": "gate_up", "mlp_down_proj": "down"}
# per-layer elementwise kernels and how often a layer runs each (two residual adds, measured once)
ELEMENTWISE_OPS = {"input_layernorm": 1, "attn_rope": 1, "post_attention_layernorm": 1, "mlp_act": 1, "add": 2}
SHAPE_COLUMNS = {"n_embd": "hidden", "n_expanded_embd": "intermediate", "n_head": "num_heads",
                 "n_kv_head": "num_kv_heads"}
MODELLED = {
    "prefill_attention_efficiency": "typical value: attention kernels are not in the measurements",
    "decode_attention_efficiency": "typical value: attention kernels are not in the measurements",
    "chunk_overhead_s": "typical value: per-chunk attention launches are not in the measurements",
    "step_overhead_s": "typical value: host-side scheduling, batch building and sampling are not measured here",
    "seq_overhead_s": "typical value: host-side per-sequence work is not measured here",
    "head_s": "LM head: roofline with the fitted GEMM efficiencies (its GEMM shape is not measured)",
}


# -- the shipped rows ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OperatorRow:
    """Median milliseconds of each operator of one decoder layer on one device, at one token count."""

    gpu: str
    model: str
    tensor_parallel: int
    tokens: int
    ms: dict


@dataclass(frozen=True)
class AllReduceRow:
    gpu: str
    workers: int
    nbytes: int
    ms: float


@dataclass(frozen=True)
class SendRecvRow:
    gpu: str
    same_node: bool        # both GPUs in one node (NVLink), else one in each of two nodes
    nbytes: int
    ms: float


def _read_csv(path: Path) -> list[dict]:
    with gzip.open(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


@functools.lru_cache(maxsize=None)
def load_operators(path: Path = OPERATORS_PATH) -> tuple[OperatorRow, ...]:
    rows, shapes = [], {}
    for r in _read_csv(path):
        if r["model"] not in shapes:
            shapes[r["model"]] = model_spec(r["model"])
        shape = shapes[r["model"]]
        for column, attribute in SHAPE_COLUMNS.items():
            if int(r[column]) != getattr(shape, attribute):
                raise ValueError(f"{path}: {r['model']} has {column}={r[column]} but fastgen's shape has "
                                 f"{attribute}={getattr(shape, attribute)}")
        rows.append(OperatorRow(r["gpu"], r["model"], int(r["tensor_parallel"]), int(r["num_tokens"]),
                                {op: float(r[op]) for op in (*GEMM_OPS, *ELEMENTWISE_OPS)}))
    return tuple(rows)


@functools.lru_cache(maxsize=None)
def load_allreduce(path: Path = ALLREDUCE_PATH) -> tuple[AllReduceRow, ...]:
    return tuple(AllReduceRow(r["gpu"], int(r["num_workers"]), int(r["size_bytes"]), float(r["ms"]))
                 for r in _read_csv(path))


@functools.lru_cache(maxsize=None)
def load_send_recv(path: Path = SEND_RECV_PATH) -> tuple[SendRecvRow, ...]:
    return tuple(SendRecvRow(r["gpu"], r["same_node"] == "1", int(r["size_bytes"]), float(r["ms"]))
                 for r in _read_csv(path))


def held_out(n: int) -> np.ndarray:
    """Which of a series' n points (sorted) the fit does not see: every second one, never the first or last."""
    mask = np.arange(n) % 2 == 1
    mask[-1] = False
    return mask


def split_series(rows, key, order) -> list[tuple[list, np.ndarray]]:
    """Rows grouped by key(row), each group sorted by order(row), with its held-out mask."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    out = []
    for k in sorted(groups):
        series = sorted(groups[k], key=order)
        out.append((series, held_out(len(series))))
    return out


def operator_series(gpu: str, models: tuple[str, ...] = tuple(MODELS)) -> list[tuple[list[OperatorRow], np.ndarray]]:
    rows = [r for r in load_operators() if r.gpu == gpu and r.model in models]
    if not rows:
        raise ValueError(f"no operator measurements for {gpu!r} and {models}; measured GPUs: {', '.join(GPUS)}, "
                         f"models: {', '.join(MODELS)}")
    return split_series(rows, lambda r: (r.model, r.tensor_parallel), lambda r: r.tokens)


def allreduce_series(gpu: str) -> list[tuple[list[AllReduceRow], np.ndarray]]:
    return split_series([r for r in load_allreduce() if r.gpu == gpu], lambda r: r.workers, lambda r: r.nbytes)


def send_recv_series(gpu: str, same_node: bool = True) -> list[tuple[list[SendRecvRow], np.ndarray]]:
    return split_series([r for r in load_send_recv() if r.gpu == gpu and r.same_node == same_node],
                        lambda r: r.same_node, lambda r: r.nbytes)


def link_of(profile: Profile) -> Link:
    return Link(profile.kv_link_latency_s, profile.kv_link_bandwidth_gbs)


def internode_errors(gpu: str, link: Link) -> dict:
    """A datasheet link between nodes (hardware.sim.internode_*) against Vidur's send/recv rows between two
    nodes: its relative errors (the datasheet is not fitted, so every row counts)."""
    rows = [r for r in load_send_recv() if r.gpu == gpu and not r.same_node]
    errors = [abs(link.seconds(r.nbytes) / (r.ms * 1e-3) - 1) for r in rows]
    measured_gbs = [r.nbytes / (r.ms * 1e-3) / 1e9 for r in rows if r.nbytes >= 2**24]
    return {"rows": len(rows), "median": round(float(np.median(errors)), 4), "max": round(float(np.max(errors)), 4),
            "measured_gbs_at_16mb_plus": round(float(np.median(measured_gbs)), 2)}


# -- cost models of the measured deployments ---------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _hardware(gpu: str):
    """(the datasheet in conf/hardware/<gpu>.yaml, the hardware config's dtype)."""
    from fastgen.conf import compose_config
    cfg = compose_config([f"hardware={gpu}", "executor=simulated", "hardware.sim.profile=null"])
    return cfg.hardware.sim, cfg.hardware.dtype


def cost_model(gpu: str, model: str, tensor_parallel: int, profile: Profile | None = None) -> CostModel:
    """fastgen's cost model of `model` on `tensor_parallel` x `gpu` (its datasheet, conf/hardware/<gpu>.yaml)."""
    device, dtype = _hardware(gpu)
    return CostModel(model_spec(model), device, dtype, tensor_parallel, profile or Profile())


def gemms_by_op(cost: CostModel) -> dict[str, Gemm]:
    by_name = {g.name: g for g in cost.gemms}
    return {op: by_name[name] for op, name in GEMM_OPS.items()}


def elementwise_ms(row: OperatorRow) -> float:
    return sum(row.ms[op] * count for op, count in ELEMENTWISE_OPS.items())


# -- the fit -----------------------------------------------------------------------------------------------------
def _least_squares_log(predict, rows: list, start: Profile, bounds: dict[str, tuple[float, float]]) -> dict:
    """The parameters (all positive, within bounds) of `start` that minimise the squared log errors of
    predict(profile) against the measured seconds of `rows`, from a few starts (max() is not smooth)."""
    names, measured = list(bounds), np.log(np.concatenate([seconds for *_, seconds in rows]))
    lo, hi = np.log([bounds[n][0] for n in names]), np.log([bounds[n][1] for n in names])

    def residuals(x: np.ndarray) -> np.ndarray:
        return np.log(predict(dataclasses.replace(start, **dict(zip(names, np.exp(x)))))) - measured

    best = None
    for scale in (1.0, 0.5, 2.0):
        x0 = np.clip(np.log([getattr(start, n) * scale for n in names]), lo + 1e-6, hi - 1e-6)
        result = least_squares(residuals, x0, bounds=(lo, hi))
        if best is None or result.cost < best.cost:
            best = result
    return {n: float(v) for n, v in zip(names, np.exp(best.x))}


def fit(gpu: str, models: tuple[str, ...] = tuple(MODELS)) -> Profile:
    """The profile of `gpu` from the shipped rows of `models` that are not held out."""
    profile = Profile(elementwise_efficiency=0.5, allreduce_latency_s=20e-6, allreduce_bandwidth_gbs=100.0,
                      kv_link_latency_s=10e-6, kv_link_bandwidth_gbs=100.0)
    # the rows the fit sees, by cost model: (cost model, gemm or None for the elementwise kernels, tokens, seconds)
    gemm_rows, elementwise_rows = [], []
    for series, test in operator_series(gpu, models):
        model, tp = series[0].model, series[0].tensor_parallel
        cost = cost_model(gpu, model, tp)
        seen = [r for r, t in zip(series, test) if not t]
        tokens = np.array([r.tokens for r in seen], dtype=np.float64)
        for op, gemm in gemms_by_op(cost).items():
            if gemm.key in profile.gemm_times:
                raise ValueError(f"{gpu}: GEMM shape {gemm.key} measured twice ({model} TP{tp} {op})")
            profile.gemm_times[gemm.key] = {"tokens": [r.tokens for r in seen],
                                            "seconds": [float(f"{r.ms[op] * 1e-3:.6g}") for r in seen]}
            gemm_rows.append((cost, gemm, tokens, np.array([r.ms[op] * 1e-3 for r in seen])))
        elementwise_rows.append((cost, None, tokens, np.array([elementwise_ms(r) * 1e-3 for r in seen])))

    def gemm_predict(p: Profile) -> np.ndarray:     # one GEMM of one layer: the roofline's larger side
        return np.concatenate([np.maximum(*c.gemm_roofline(*c.gemm_work([g], t), profile=p)) / c.spec.num_layers
                               for c, g, t, _ in gemm_rows])

    fitted = _least_squares_log(gemm_predict, gemm_rows, profile, {
        "matmul_efficiency": (1e-3, 1.0), "matmul_half_tokens": (1e-2, 1e5), "bandwidth_efficiency": (1e-3, 1.0)})

    def elementwise_predict(p: Profile) -> np.ndarray:
        return np.concatenate([p.layer_overhead_s + c.elementwise_seconds(t, p) / c.spec.num_layers
                               for c, _, t, _ in elementwise_rows])

    fitted |= _least_squares_log(elementwise_predict, elementwise_rows, profile, {
        "layer_overhead_s": (1e-7, 1e-3), "elementwise_efficiency": (1e-3, 1.0)})

    allreduce_rows = []
    for series, test in allreduce_series(gpu):
        seen = [r for r, t in zip(series, test) if not t]
        allreduce_rows.append((cost_model(gpu, "llama-2-7b", series[0].workers), None,
                               np.array([r.nbytes for r in seen], dtype=np.float64),
                               np.array([r.ms * 1e-3 for r in seen])))

    def allreduce_predict(p: Profile) -> np.ndarray:
        return np.concatenate([c.allreduce_seconds(nbytes, p) for c, _, nbytes, _ in allreduce_rows])

    fitted |= _least_squares_log(allreduce_predict, allreduce_rows, profile, {
        "allreduce_latency_s": (1e-7, 1e-2), "allreduce_bandwidth_gbs": (1.0, 1e4)})
    send_recv_rows = [(None, None, np.array([r.nbytes for r, t in zip(series, test) if not t], dtype=np.float64),
                       np.array([r.ms * 1e-3 for r, t in zip(series, test) if not t]))
                      for series, test in send_recv_series(gpu)]

    def send_recv_predict(p: Profile) -> np.ndarray:
        return np.concatenate([link_of(p).seconds(nbytes) for _, _, nbytes, _ in send_recv_rows])

    fitted |= _least_squares_log(send_recv_predict, send_recv_rows, profile, {
        "kv_link_latency_s": (1e-7, 1e-2), "kv_link_bandwidth_gbs": (1.0, 1e4)})
    profile = dataclasses.replace(profile, **{k: float(f"{v:.6g}") for k, v in fitted.items()})
    profile.meta = {
        "source": SOURCE.format(gpu=GPUS[gpu]), "device": gpu, "dtype": "float16",
        "command": f"python -m fastgen.calibration.measured {gpu}",
        "held_out": "every second token count of each (model, TP) series and every second all-reduce and "
                    "send/recv size (never the first or last): the fit did not see them; evaluate() predicts them",
        "measured": ["gemm_times", "matmul_efficiency", "matmul_half_tokens", "bandwidth_efficiency",
                     "layer_overhead_s", "elementwise_efficiency", "allreduce_latency_s", "allreduce_bandwidth_gbs",
                     "kv_link_latency_s", "kv_link_bandwidth_gbs"],
        "modelled": MODELLED,
        "held_out_error": summary(evaluate(profile, gpu, models=models)),
    }
    return profile


# -- held-out predictions ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    """One held-out measurement and the cost model's prediction of it, in seconds."""

    gpu: str
    part: str              # a GEMM op (attn_pre_proj, ...), "linear" (their sum), "elementwise", "all_reduce",
    #                        "send_recv" (two GPUs of a node)
    model: str | None      # None for all-reduce rows
    tensor_parallel: int   # all-reduce: the number of workers
    x: int                 # tokens, or all-reduce bytes
    measured_s: float
    predicted_s: float

    @property
    def error(self) -> float:
        return abs(self.predicted_s / self.measured_s - 1)


def evaluate(profile: Profile, gpu: str, fallback_only: bool = False,
             models: tuple[str, ...] = tuple(MODELS)) -> list[Prediction]:
    """The held-out rows of `gpu` (of `models`) and their predictions. `fallback_only`: predict every GEMM with the
    roofline efficiencies, as for a model whose GEMM shapes were not measured."""
    if fallback_only:
        profile = dataclasses.replace(profile, gemm_times={})
    out = []
    for series, test in operator_series(gpu, models):
        model, tp = series[0].model, series[0].tensor_parallel
        cost = cost_model(gpu, model, tp, profile)
        gemms = gemms_by_op(cost)
        for r in (r for r, t in zip(series, test) if t):
            linear_measured = linear_predicted = 0.0
            for op, g in gemms.items():
                predicted = (profile.gemm_seconds(g.key, r.tokens) if g.key in profile.gemm_times
                             else max(cost.gemm_roofline(*cost.gemm_work([g], r.tokens))) / cost.spec.num_layers)
                out.append(Prediction(gpu, op, model, tp, r.tokens, r.ms[op] * 1e-3, predicted))
                linear_measured, linear_predicted = linear_measured + r.ms[op] * 1e-3, linear_predicted + predicted
            out.append(Prediction(gpu, "linear", model, tp, r.tokens, linear_measured, linear_predicted))
            elementwise = profile.layer_overhead_s + cost.elementwise_seconds(r.tokens) / cost.spec.num_layers
            out.append(Prediction(gpu, "elementwise", model, tp, r.tokens, elementwise_ms(r) * 1e-3, elementwise))
    for series, test in allreduce_series(gpu):
        cost = cost_model(gpu, "llama-2-7b", series[0].workers, profile)
        out += [Prediction(gpu, "all_reduce", None, r.workers, r.nbytes, r.ms * 1e-3, cost.allreduce_seconds(r.nbytes))
                for r, t in zip(series, test) if t]
    for series, test in send_recv_series(gpu):
        out += [Prediction(gpu, "send_recv", None, 2, r.nbytes, r.ms * 1e-3, link_of(profile).seconds(r.nbytes))
                for r, t in zip(series, test) if t]
    return out


def summary(predictions: list[Prediction]) -> dict:
    """Median / P95 / worst relative error per part, over all models and TP degrees."""
    parts: dict = {}
    for p in predictions:
        parts.setdefault(p.part, []).append(p.error)
    return {part: {"rows": len(e), "median": round(float(np.median(e)), 4),
                   "p95": round(float(np.quantile(e, 0.95)), 4), "max": round(float(np.max(e)), 4)}
            for part, e in parts.items()}


# -- making the shipped rows from Vidur's files ----------------------------------------------------------------------
def _write_csv_gz(path: Path, header: list[str], rows: list[list]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:   # byte-reproducible
        f.write(text.getvalue().encode())


def extract(vidur_data: Path, out_dir: Path = DATA_DIR) -> None:
    """Vidur's mlp.csv and DGX all_reduce.csv -> the shipped rows: the medians only, the two models and GPUs
    fastgen fits, all-reduces inside one node only; rows measured twice (same shape) averaged."""
    ops = [*GEMM_OPS, *ELEMENTWISE_OPS]
    operator_rows = []
    for gpu, vidur_gpu in GPUS.items():
        for model, vidur_model in MODELS.items():
            path = vidur_data / "profiling" / "compute" / vidur_gpu / "meta-llama" / vidur_model / "mlp.csv"
            with open(path, newline="") as f:
                groups: dict = {}
                for r in csv.DictReader(f):
                    key = (int(r["num_tensor_parallel_workers"]), int(r["num_tokens"]),
                           *(int(r[c]) for c in SHAPE_COLUMNS))
                    groups.setdefault(key, []).append([float(r[f"time_stats.{op}.median"]) for op in ops])
            for (tp, tokens, *shape), values in sorted(groups.items()):
                operator_rows.append([gpu, model, tp, tokens, *shape, *(f"{v:.6g}" for v in np.mean(values, axis=0))])
    _write_csv_gz(out_dir / OPERATORS_PATH.name,
                  ["gpu", "model", "tensor_parallel", "num_tokens", *SHAPE_COLUMNS, *ops], operator_rows)

    allreduce_rows = []
    for gpu, vidur_gpu in GPUS.items():
        with open(vidur_data / "profiling" / "network" / f"{vidur_gpu}_dgx" / "all_reduce.csv", newline="") as f:
            groups = {}
            for r in csv.DictReader(f):
                if r["devices_per_node"] == r["num_workers"]:           # inside one node
                    groups.setdefault((int(r["num_workers"]), int(r["size"])), []).append(
                        float(r["time_stats.all_reduce.median"]))
        allreduce_rows += [[gpu, n, size, f"{np.mean(ms):.6g}"] for (n, size), ms in sorted(groups.items())]
    _write_csv_gz(out_dir / ALLREDUCE_PATH.name, ["gpu", "num_workers", "size_bytes", "ms"], allreduce_rows)

    send_recv_rows = []
    for gpu, vidur_gpu in GPUS.items():
        with open(vidur_data / "profiling" / "network" / f"{vidur_gpu}_dgx" / "send_recv.csv", newline="") as f:
            groups = {}
            for r in csv.DictReader(f):
                groups.setdefault((int(r["devices_per_node"] == "2"), int(r["size"])), []).append(
                    float(r["time_stats.send_recv.median"]))
        send_recv_rows += [[gpu, same, size, f"{np.mean(ms):.6g}"] for (same, size), ms in sorted(groups.items())]
    _write_csv_gz(out_dir / SEND_RECV_PATH.name, ["gpu", "same_node", "size_bytes", "ms"], send_recv_rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gpus", nargs="*", help=f"profiles to fit: {', '.join(GPUS)}")
    parser.add_argument("--extract", type=Path, metavar="VIDUR_DATA",
                        help="first re-make the shipped rows from a Vidur data/ directory")
    args = parser.parse_args(argv)
    unknown = [g for g in args.gpus if g not in GPUS]
    if unknown:
        parser.error(f"no measurements for {', '.join(unknown)}; measured GPUs: {', '.join(GPUS)}")
    if args.extract:
        extract(args.extract)
        load_operators.cache_clear()
        load_allreduce.cache_clear()
        load_send_recv.cache_clear()
        print(f"wrote {OPERATORS_PATH}, {ALLREDUCE_PATH} and {SEND_RECV_PATH}")
    for gpu in args.gpus:
        profile = fit(gpu)
        path = profile.save(PROFILES_DIR / f"{gpu}.json")
        print(f"wrote {path}")
        for part, s in profile.meta["held_out_error"].items():
            print(f"  held out {part:15s} rows {s['rows']:5d}  median {s['median']:.1%}  p95 {s['p95']:.1%}  "
                  f"max {s['max']:.1%}")


if __name__ == "__main__":
    main()
