// Prompt-chunk attention read from the paged KV cache in place: a chunk's queries attend causally over its cached
// prefix and its own keys where they lie in the block pools, flash-style (tiles of queries against tiles of keys,
// an online softmax, nothing of size queries x keys ever stored). Registered as
// torch.ops.fastgen_cpu.paged_chunk_attention beside paged_decode_attention (cpu_ops.py picks the -m flags).
//
// Work is split over (KV head, tile of query positions); a tile holds every query head of its KV head (grouped-query
// attention: all of them share each key and value tile) as the rows of small matrix products done in registers:
// scores = Q K^T against a transposed copy of the key tile (made once per tile, read by every row), and
// O += P V straight from the value rows in the pool. Float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec_math.h"

namespace {

using fastgen_cpu::vec;
using fastgen_cpu::W;

constexpr int64_t KT = 64;                 // keys per tile
constexpr int64_t NV = KT / W;             // registers per row of a score tile
constexpr int64_t ACC = 24;                // accumulator registers a micro-kernel may hold
constexpr int64_t R = ACC / NV > 0 ? ACC / NV : 1;   // rows per score micro-kernel
constexpr int64_t ROWS = 128;              // rows (query positions x query heads) per tile, at most

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof(v)); }
inline vec splat(float x) { return vec{} + x; }

// S[r, :KT] = Q[r, :D] . Kt[:D, :KT] for RR rows: each key vector of Kt is loaded once for RR rows.
template <int64_t RR>
inline void scores(const float* qs, int64_t D, const float* kt, float* s) {
  vec acc[RR][NV] = {};
  for (int64_t d = 0; d < D; ++d) {
    vec k[NV];
    for (int64_t c = 0; c < NV; ++c) k[c] = load(kt + d * KT + c * W);
    for (int64_t r = 0; r < RR; ++r) {
      const vec q = splat(qs[r * D + d]);
      for (int64_t c = 0; c < NV; ++c) acc[r][c] += q * k[c];
    }
  }
  for (int64_t r = 0; r < RR; ++r)
    for (int64_t c = 0; c < NV; ++c) store(s + r * KT + c * W, acc[r][c]);
}

// O[r, :D] += P[r, :n] . V[:n, :D] for RR rows, D = DV * W at most (a chunk of DV registers of the output rows).
template <int64_t RR, int64_t DV>
inline void values(const float* p, int64_t n, const float* v, int64_t v_tok, float* o, int64_t Dp) {
  vec acc[RR][DV];
  for (int64_t r = 0; r < RR; ++r)
    for (int64_t c = 0; c < DV; ++c) acc[r][c] = load(o + r * Dp + c * W);
  for (int64_t t = 0; t < n; ++t) {
    vec x[DV];
    for (int64_t c = 0; c < DV; ++c) x[c] = load(v + t * v_tok + c * W);
    for (int64_t r = 0; r < RR; ++r) {
      const vec pr = splat(p[r * KT + t]);
      for (int64_t c = 0; c < DV; ++c) acc[r][c] += pr * x[c];
    }
  }
  for (int64_t r = 0; r < RR; ++r)
    for (int64_t c = 0; c < DV; ++c) store(o + r * Dp + c * W, acc[r][c]);
}

// Row groups of R (and a tail) through a micro-kernel templated on its row count.
template <template <int64_t> class K, typename... A>
inline void by_rows(int64_t rows, A... a) {
  int64_t r = 0;
  for (; r + R <= rows; r += R) K<R>::run(r, a...);
  switch (rows - r) {
#define TAIL(n) \
  case n: if constexpr (n < R) K<n>::run(r, a...); break;
    TAIL(1) TAIL(2) TAIL(3) TAIL(4) TAIL(5) TAIL(6) TAIL(7) TAIL(8) TAIL(9) TAIL(10) TAIL(11)
#undef TAIL
    default: break;
  }
}

template <int64_t RR>
struct Scores {
  static void run(int64_t r, const float* qs, int64_t D, const float* kt, float* s) {
    scores<RR>(qs + r * D, D, kt, s + r * KT);
  }
};

// The output's registers in chunks of 4 (AVX-512 at head_dim 64: one chunk), so RR x 4 accumulators fit.
template <int64_t RR>
struct Values {
  static void run(int64_t r, const float* p, int64_t n, const float* v, int64_t v_tok, float* o, int64_t Dp) {
    constexpr int64_t DV = 4;
    int64_t c = 0;
    for (; c + DV * W <= Dp; c += DV * W) values<RR, DV>(p + r * KT, n, v + c, v_tok, o + r * Dp + c, Dp);
    for (; c < Dp; c += W) values<RR, 1>(p + r * KT, n, v + c, v_tok, o + r * Dp + c, Dp);
  }
};

// q [n, H, D] float32 contiguous; k_cache, v_cache [num_blocks, block_size, HKV, D] with unit stride in D; blocks
// [nb] int64, the chunk's blocks in order; it reads keys [start, end) counted from the first slot of blocks[0], and
// query j sits at key end - n + j (its own key). window > 0 keeps the keys within `window` of each query; softcap > 0
// squashes each score s to softcap * tanh(s / softcap). Returns [n, H, D].
at::Tensor paged_chunk_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& blocks, int64_t start, int64_t end, double scale, int64_t window,
                                 double softcap) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.scalar_type() == at::kFloat,
              "q must be a contiguous float32 [n, H, D] tensor");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "k_cache and v_cache must be [blocks, block_size, HKV, D]");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "the KV pools need unit stride in head_dim");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "q and the KV pools must share a dtype (float32)");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "q's heads must match the pools'");
  TORCH_CHECK(q.size(1) / k_cache.size(2) <= ROWS, "paged_chunk_attention supports <= ", ROWS,
              " query heads per KV head");
  TORCH_CHECK(blocks.dim() == 1 && blocks.is_contiguous() && blocks.scalar_type() == at::kLong,
              "blocks must be a contiguous int64 [nb] tensor");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), HKV = k_cache.size(2), G = H / HKV;
  const int64_t BS = k_cache.size(1);
  TORCH_CHECK(0 <= start && start < end && end - start >= n && end <= blocks.numel() * BS,
              "keys [start, end) must hold the chunk's own keys and lie in its blocks");
  at::Tensor out = at::empty_like(q);
  if (n == 0) return out;
  const int64_t k_blk = k_cache.stride(0), k_tok = k_cache.stride(1), k_head = k_cache.stride(2);
  const int64_t v_blk = v_cache.stride(0), v_tok = v_cache.stride(1), v_head = v_cache.stride(2);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* table = blocks.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
  const int64_t Dp = (D + W - 1) / W * W;          // output rows padded to whole registers
  const bool copy_v = Dp != D;                     // value rows then go through a zero-padded copy

  // Tiles of QT query positions (QT x G rows), handed out last (longest) first by a shared counter.
  const int64_t QT = std::max<int64_t>(1, ROWS / G), tiles = (n + QT - 1) / QT, items = HKV * tiles;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), items), 1, [&](int64_t, int64_t) {
    std::vector<float> qs(ROWS * D), kt(D * KT), s(ROWS * KT), o(ROWS * Dp), vs(copy_v ? KT * Dp : 0);
    float mx[ROWS], sum[ROWS], alpha[ROWS];
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int64_t h = i % HKV, tile = tiles - 1 - i / HKV;
      const int64_t q0 = tile * QT, nq = std::min(QT, n - q0), rows = nq * G;
      // Row r is query position q0 + r / G, query head h * G + r % G: one query's G heads are adjacent in q.
      for (int64_t j = 0; j < nq; ++j)
        for (int64_t x = 0; x < G * D; ++x) qs[j * G * D + x] = qp[((q0 + j) * H + h * G) * D + x] * sc;
      std::fill(o.begin(), o.begin() + rows * Dp, 0.f);
      std::fill(mx, mx + rows, -INFINITY);
      std::fill(sum, sum + rows, 0.f);
      const int64_t pos0 = end - n + q0, pos1 = pos0 + nq - 1;     // the tile's first and last query's key
      const int64_t lo = window > 0 ? std::max(start, pos0 - window + 1) : start, hi = pos1 + 1;
      for (int64_t a = lo; a < hi;) {
        const int64_t blk = a / BS, t0 = a % BS, m = std::min({KT, BS - t0, hi - a});
        const float* k = kp + h * k_head + table[blk] * k_blk + t0 * k_tok;
        const float* v = vp + h * v_head + table[blk] * v_blk + t0 * v_tok;
        // Kt[d, t] = k_t[d], zero past the m keys.
        for (int64_t d = 0; d < D; ++d) {
          float* row = kt.data() + d * KT;
          for (int64_t t = 0; t < m; ++t) row[t] = k[t * k_tok + d];
          std::fill(row + m, row + KT, 0.f);
        }
        by_rows<Scores>(rows, qs.data(), D, kt.data(), s.data());
        // Mask (causal, window, past the m keys), soft cap, online softmax per row.
        const bool edge = a + m - 1 > pos0 || (window > 0 && a <= pos1 - window);
        for (int64_t r = 0; r < rows; ++r) {
          float* sr = s.data() + r * KT;
          const int64_t pos = pos0 + r / G;
          int64_t first = 0, last = m;                   // the row's unmasked keys: [first, last)
          if (edge) {
            last = std::clamp<int64_t>(pos - a + 1, 0, m);
            if (window > 0) first = std::clamp<int64_t>(pos - window + 1 - a, 0, last);
          }
          if (cap > 0.f)
            for (int64_t t = first; t < last; ++t) sr[t] = cap * std::tanh(sr[t] / cap);
          float mnew = mx[r];
          for (int64_t t = first; t < last; ++t) mnew = std::max(mnew, sr[t]);
          if (mnew == -INFINITY) {                       // nothing to attend yet in this row
            std::fill(sr, sr + KT, 0.f);
            alpha[r] = 1.f;
            continue;
          }
          float add = 0.f;
#pragma omp simd reduction(+ : add)
          for (int64_t t = 0; t < KT; ++t) {
            const float e = t >= first && t < last ? fastgen_cpu::exp(sr[t] - mnew) : 0.f;
            sr[t] = e;
            add += e;
          }
          alpha[r] = mx[r] == -INFINITY ? 0.f : fastgen_cpu::exp(mx[r] - mnew);
          sum[r] = sum[r] * alpha[r] + add;
          mx[r] = mnew;
        }
        for (int64_t r = 0; r < rows; ++r)
          if (alpha[r] != 1.f)
            for (int64_t x = 0; x < Dp; ++x) o[r * Dp + x] *= alpha[r];
        const float* vrows = v;
        int64_t vstride = v_tok;
        if (copy_v) {
          for (int64_t t = 0; t < m; ++t) {
            std::memcpy(vs.data() + t * Dp, v + t * v_tok, D * sizeof(float));
            std::fill(vs.data() + t * Dp + D, vs.data() + (t + 1) * Dp, 0.f);
          }
          vrows = vs.data(), vstride = Dp;
        }
        by_rows<Values>(rows, s.data(), m, vrows, vstride, o.data(), Dp);
        a += m;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = 1.f / sum[r];
        float* dst = op + ((q0 + r / G) * H + h * G + r % G) * D;
        for (int64_t x = 0; x < D; ++x) dst[x] = o[r * Dp + x] * inv;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastgen_cpu, m) {
  m.def("paged_chunk_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor blocks, int start, int end, "
        "float scale, int window, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastgen_cpu, CPU, m) { m.impl("paged_chunk_attention", &paged_chunk_attention); }
