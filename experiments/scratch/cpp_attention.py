"""Prototype: decode attention that reads the KV blocks in place (no gathered copy, no SDPA), a small C++ kernel
built with torch.utils.cpp_extension.load_inline (OpenMP over sequence x KV head; GQA: the G query heads of a KV
head share each K/V read; online-free two-pass softmax in float32). Compared with the current gather + SDPA path,
30 layers of SmolLM2-135M's attention shape, b sequences at context 340.

    python experiments/scratch/cpp_attention.py [threads]
"""
import os, sys, time, statistics
sys.path.insert(0, os.getcwd())
import torch
from torch.utils.cpp_extension import load_inline

SRC = r"""
#include <torch/extension.h>
#include <vector>
#include <cmath>
#include <algorithm>

// q [B, H, D]; k_pool, v_pool [NB, BS, HKV, D]; tables [B, maxnb] int64; ctx [B] int64 (keys [lo, ctx) are read,
// lo = max(0, ctx - window) when window > 0). Returns [B, H, D].
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor tables,
                           torch::Tensor ctx, double scale, int64_t window) {
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous(), "contiguous inputs");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_pool.size(1), HKV = k_pool.size(2), G = H / HKV, maxnb = tables.size(1);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_pool.data_ptr<float>();
  const float* vp = v_pool.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* cp = ctx.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t tok = HKV * D, blk = BS * HKV * D;
  const float sc = (float)scale;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < HKV; ++h) {
      const int64_t n = cp[b];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, n - window) : 0;
      const int64_t m = n - lo;
      std::vector<float> s(G * m);
      std::vector<float> acc(G * D, 0.f);
      const float* qb = qp + (b * H + h * G) * D;
      const int64_t* tb = tp + b * maxnb;
      for (int64_t j = lo; j < n; ++j) {
        const float* kj = kp + tb[j / BS] * blk + (j % BS) * tok + h * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qb + g * D;
          float dot = 0.f;
#pragma omp simd reduction(+:dot)
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * kj[d];
          s[g * m + (j - lo)] = dot * sc;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = s.data() + g * m;
        float mx = -INFINITY;
        for (int64_t j = 0; j < m; ++j) mx = std::max(mx, sg[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < m; ++j) { sg[j] = std::exp(sg[j] - mx); sum += sg[j]; }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < m; ++j) sg[j] *= inv;
      }
      for (int64_t j = lo; j < n; ++j) {
        const float* vj = vp + tb[j / BS] * blk + (j % BS) * tok + h * D;
        for (int64_t g = 0; g < G; ++g) {
          const float w = s[g * m + (j - lo)];
          float* ag = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] += w * vj[d];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        std::copy(acc.begin() + g * D, acc.begin() + (g + 1) * D, op + (b * H + h * G + g) * D);
    }
  }
  return out;
}

// scores[b, h*G+g, j] = scale * q . k_j for keys j < ctx[b] (others -inf), read from the blocks in place.
torch::Tensor paged_scores(torch::Tensor q, torch::Tensor k_pool, torch::Tensor tables, torch::Tensor ctx,
                           double scale, int64_t cmax) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_pool.size(1), HKV = k_pool.size(2), G = H / HKV, maxnb = tables.size(1);
  auto s = torch::full({B, H, cmax}, -INFINITY, q.options());
  const float* qp = q.data_ptr<float>(); const float* kp = k_pool.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>(); const int64_t* cp = ctx.data_ptr<int64_t>();
  float* sp = s.data_ptr<float>();
  const int64_t tok = HKV * D, blk = BS * HKV * D; const float sc = (float)scale;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) for (int64_t h = 0; h < HKV; ++h) {
    const int64_t n = cp[b]; const float* qb = qp + (b * H + h * G) * D; const int64_t* tb = tp + b * maxnb;
    float* sb = sp + (b * H + h * G) * cmax;
    for (int64_t j = 0; j < n; ++j) {
      const float* kj = kp + tb[j / BS] * blk + (j % BS) * tok + h * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qb + g * D; float dot = 0.f;
#pragma omp simd reduction(+:dot)
        for (int64_t d = 0; d < D; ++d) dot += qg[d] * kj[d];
        sb[g * cmax + j] = dot * sc;
      }
    }
  }
  return s;
}

// out[b, h*G+g, :] = sum_j p[b, h*G+g, j] v_j, reading V from the blocks in place.
torch::Tensor paged_pv(torch::Tensor p, torch::Tensor v_pool, torch::Tensor tables, torch::Tensor ctx) {
  const int64_t B = p.size(0), H = p.size(1), cmax = p.size(2);
  const int64_t BS = v_pool.size(1), HKV = v_pool.size(2), D = v_pool.size(3), G = H / HKV, maxnb = tables.size(1);
  auto out = torch::zeros({B, H, D}, p.options());
  const float* pp = p.data_ptr<float>(); const float* vp = v_pool.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>(); const int64_t* cp = ctx.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t tok = HKV * D, blk = BS * HKV * D;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) for (int64_t h = 0; h < HKV; ++h) {
    const int64_t n = cp[b]; const int64_t* tb = tp + b * maxnb;
    const float* pb = pp + (b * H + h * G) * cmax; float* ob = op + (b * H + h * G) * D;
    for (int64_t j = 0; j < n; ++j) {
      const float* vj = vp + tb[j / BS] * blk + (j % BS) * tok + h * D;
      for (int64_t g = 0; g < G; ++g) {
        const float w = pb[g * cmax + j]; float* og = ob + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) og[d] += w * vj[d];
      }
    }
  }
  return out;
}
"""


def build():
    s = time.perf_counter()
    mod = load_inline("fastgen_paged_decode_proto2", cpp_sources=SRC, functions=["paged_decode", "paged_scores", "paged_pv"],
                      extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    return mod, time.perf_counter() - s


def main():
    from fastgen.kernels import reference
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.set_num_threads(threads)
    timer = time.thread_time if threads == 1 else time.perf_counter
    H, HKV, D, BS, LAYERS = 9, 3, 64, 64, 30
    mod, build_s = build()
    print(open('/proc/loadavg').read().strip(), f"threads {threads}, build {build_s:.1f} s")

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import mb_attention
    from mb_attention import decode_case

    def bench(fn, n=5):
        return mb_attention.bench(fn, n, timer)

    torch.manual_seed(0)
    for b in (1, 8, 32, 64):
        ctx = 340
        pools, perm, batch, q, ctx_lens = decode_case(b, ctx)
        scale = D ** -0.5
        ref = reference.attention(q, *pools[0], batch.attn, scale)
        got = mod.paged_decode(q, *pools[0], perm, ctx_lens, scale, 0)
        err = (ref - got).abs().max().item()
        t_ref = bench(lambda: [reference.attention(q, k, v, batch.attn, scale) for k, v in pools])
        t_c = bench(lambda: [mod.paged_decode(q, k, v, perm, ctx_lens, scale, 0) for k, v in pools])
        cmax = ctx + 1

        def split(k, v):
            return mod.paged_pv(torch.softmax(mod.paged_scores(q, k, perm, ctx_lens, scale, cmax), -1), v, perm, ctx_lens)
        err2 = (ref - split(*pools[0])).abs().max().item()
        t_s = bench(lambda: [split(k, v) for k, v in pools])
        print(f"   split (C++ QK, torch softmax, C++ PV): {t_s*1e3:7.1f} ms ({t_ref/t_s:.2f}x, max err {err2:.1e}, {2 * b * (ctx + 1) * HKV * D * 4 * LAYERS/t_s/1e9:.1f} GB/s)")
        kv_bytes = 2 * b * (ctx + 1) * HKV * D * 4 * LAYERS
        print(f"b={b:3d}: current {t_ref*1e3:7.1f} ms | in-place C++ {t_c*1e3:7.1f} ms ({t_ref/t_c:.2f}x, max err {err:.1e})"
              f" | KV {kv_bytes/1e6:.0f} MB read at {kv_bytes/t_c/1e9:.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
