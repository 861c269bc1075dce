"""Microbenchmark: the model's linear shapes at decode/prefill token counts, F.linear vs alternatives."""
import sys, time, statistics, torch, torch.nn.functional as F
threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
timer = time.thread_time if threads == 1 else time.perf_counter
torch.set_num_threads(threads)
shapes = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
L = 30
def bench(fn, n=7):
    fn(); fn(); ts = []
    for _ in range(n):
        s = timer(); fn(); ts.append(timer() - s)
    return statistics.median(ts)
print(open('/proc/loadavg').read().strip(), "threads", threads)
for name, (N, K) in shapes.items():
    layers = 1 if name == "lm_head" else L
    Ws = [torch.randn(N, K) * 0.02 for _ in range(layers)]         # distinct weights: cold in cache like the model
    Wt = [w.t().contiguous() for w in Ws]
    pk = [torch.ops.mkldnn._reorder_linear_weight(w, None) if hasattr(torch.ops.mkldnn, "_reorder_linear_weight") else None for w in Ws]
    for M in (1, 8, 32, 64, 768):
        x = torch.randn(M, K)
        t_lin = bench(lambda: [F.linear(x, w) for w in Ws])
        t_t = bench(lambda: [x @ w for w in Wt])
        row = f"{name:8s} M={M:4d}: F.linear {t_lin*1e3/layers:7.3f} ms/layer ({2*M*N*K*layers/t_lin/1e9:5.1f} GF/s, {4*N*K*layers/t_lin/1e9:5.1f} GB/s)  x@Wt {t_t*1e3/layers:7.3f}"
        try:
            t_dnn = bench(lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in pk])
            row += f"  onednn-prepacked {t_dnn*1e3/layers:7.3f}"
        except Exception as e:
            row += f"  onednn err {type(e).__name__}"
        try:
            mk = [torch.ops.mkl._mkl_reorder_linear_weight(w, M) for w in Ws]
            t_mkl = bench(lambda: [torch.ops.mkl._mkl_linear(x, p, w, None, M) for p, w in zip(mk, Ws)])
            row += f"  mkl-packed {t_mkl*1e3/layers:7.3f}"
        except Exception as e:
            row += f"  mkl err {type(e).__name__}: {str(e)[:60]}"
        print(row, flush=True)
print(open('/proc/loadavg').read().strip())
