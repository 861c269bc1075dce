// Decode attention read from the paged KV cache in place: each sequence's one query attends over its keys where
// they lie in the block pools, with no gathered copy. Registered as torch.ops.fastgen_cpu.paged_decode_attention
// (loaded by fastgen/kernels/cpu_attention.py, which picks the instruction-set flags for the machine it runs on).
//
// Work is split over (sequence, KV head): the G query heads of a KV head run back to back over each block, so
// grouped-query attention reads each key and value from memory once. Keys are visited block by block (no per-key division),
// scores go to a per-thread buffer, the softmax runs in float32 with a polynomial exp the compiler vectorises, and
// queries and outputs stay in float32 registers. Per key it reads 2 * head_dim elements.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace {

// One register of float32 lanes, in GCC/Clang vector extensions, as wide as the build's -m flags allow (16 lanes
// with AVX-512, 8 with AVX2, 4 otherwise): the flags come from the capability torch detected at run time
// (cpu_attention.py), so no instruction set is assumed here.
#if defined(__AVX512F__)
constexpr int64_t W = 16;
#elif defined(__AVX__)
constexpr int64_t W = 8;
#else
constexpr int64_t W = 4;
#endif
typedef float vec __attribute__((vector_size(W * sizeof(float))));
typedef float vec4 __attribute__((vector_size(4 * sizeof(float))));
constexpr int64_t MAX_CHUNKS = 256 / W;  // head_dim <= 256

// Chunk c (W elements) of a head_dim-D row as float32, zero-padded past D; DT != 0 means D == DT is a multiple of W.
template <typename scalar_t, int64_t DT>
inline vec load_chunk(const scalar_t* p, int64_t c, int64_t D) {
  vec v = {};
  if constexpr (std::is_same_v<scalar_t, float> && DT != 0) {
    std::memcpy(&v, p + c * W, sizeof(v));
  } else {
    const int64_t n = DT != 0 ? W : std::min(W, D - c * W);
    for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(p[c * W + i]);
  }
  return v;
}

// The lane sums of four vectors at once: a transposing reduction, halving the lanes per vector at each step.
inline vec4 hsum4(vec a, vec b, vec c, vec d) {
#if defined(__AVX512F__)
  const vec ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                 __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vec cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                 __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vec u = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                 __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const vec w = u + __builtin_shufflevector(u, u, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  const vec x = w + __builtin_shufflevector(w, w, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return __builtin_shufflevector(x, x, 0, 4, 8, 12);
#elif defined(__AVX__)
  const vec ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
                 __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  const vec cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 8, 9, 10, 11) +
                 __builtin_shufflevector(c, d, 4, 5, 6, 7, 12, 13, 14, 15);
  const vec u = __builtin_shufflevector(ab, cd, 0, 1, 4, 5, 8, 9, 12, 13) +
                 __builtin_shufflevector(ab, cd, 2, 3, 6, 7, 10, 11, 14, 15);
  const vec x = u + __builtin_shufflevector(u, u, 1, 0, 3, 2, 5, 4, 7, 6);
  return __builtin_shufflevector(x, x, 0, 2, 4, 6);
#else
  const vec ab = __builtin_shufflevector(a, b, 0, 1, 4, 5) +
                 __builtin_shufflevector(a, b, 2, 3, 6, 7);
  const vec cd = __builtin_shufflevector(c, d, 0, 1, 4, 5) +
                 __builtin_shufflevector(c, d, 2, 3, 6, 7);
  return __builtin_shufflevector(ab, cd, 0, 2, 4, 6) + __builtin_shufflevector(ab, cd, 1, 3, 5, 7);
#endif
}

// Calls visit(first_row, n, j) for each run of keys of [lo, hi) that lie in one block: n keys whose rows start at
// first_row (head h's, one token stride apart), the first of them key j counted from lo. Before each run it asks
// for the next block's rows (row_bytes each) to be prefetched.
template <typename scalar_t, typename F>
inline void for_each_run(const scalar_t* pool, int64_t blk_stride, const int64_t* table, int64_t BS, int64_t lo,
                         int64_t hi, int64_t tok_stride, int64_t row_bytes, F&& visit) {
  const int64_t last = (hi - 1) / BS;
  for (int64_t blk = lo / BS; blk <= last; ++blk) {
    const int64_t t0 = std::max(lo - blk * BS, int64_t(0)), t1 = std::min(hi - blk * BS, BS);
    if (blk < last) {  // the next block lies elsewhere in the pool, where the hardware prefetcher cannot guess
      const char* next = reinterpret_cast<const char*>(pool + table[blk + 1] * blk_stride);
      for (int64_t t = 0; t < std::min(hi - (blk + 1) * BS, BS); ++t)
        for (int64_t byte = 0; byte < row_bytes; byte += 64) __builtin_prefetch(next + t * tok_stride * sizeof(scalar_t) + byte);
    }
    visit(pool + table[blk] * blk_stride + t0 * tok_stride, t1 - t0, blk * BS + t0 - lo);
  }
}

// DT: head_dim fixed at compile time (a multiple of W: the common sizes, fully unrolled), or 0 to read it from q.
// Each (sequence, KV head) item runs its G query heads one after another: the first reads the head's keys and
// values from memory, the others find them in cache, and each keeps its query and output rows in registers.
template <typename scalar_t, int64_t DT>
void attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& blocks,
            const at::Tensor& start, const at::Tensor& end, double scale, double softcap, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), HKV = k_cache.size(2), G = H / HKV, BS = k_cache.size(1);
  const int64_t nb = blocks.size(1), head_dim = q.size(2);
  const int64_t k_blk = k_cache.stride(0), k_tok = k_cache.stride(1), k_head = k_cache.stride(2);
  const int64_t v_blk = v_cache.stride(0), v_tok = v_cache.stride(1), v_head = v_cache.stride(2);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  const int64_t* bp = blocks.data_ptr<int64_t>();
  const int64_t* sp = start.data_ptr<int64_t>();
  const int64_t* ep = end.data_ptr<int64_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);

  at::parallel_for(0, B * HKV, 1, [&](int64_t first, int64_t last) {
    // Here, not outside: captured by the lambda they would be loads, and the chunk loops would not unroll.
    const int64_t D = DT ? DT : head_dim, NC = (D + W - 1) / W;
    std::vector<float> scores, sums(G);
    std::vector<vec> queries(G * NC), outputs(G * 2 * NC);
    for (int64_t item = first; item < last; ++item) {
      const int64_t b = item / HKV, h = item % HKV;
      const int64_t lo = sp[b], hi = ep[b], m = hi - lo;
      const int64_t* table = bp + b * nb;
      const int64_t row0 = (b * H + h * G) * D;   // the first of the G query (and output) rows
      scores.resize(G * m);
      for (int64_t i = 0; i < G * NC; ++i) queries[i] = load_chunk<scalar_t, DT>(qp + row0 + i / NC * D, i % NC, D) * sc;
      // Scores q_g . k_j. Blocks outside, heads inside: a block's keys come from memory for the first head and
      // from L1 for the others (head after head over the whole context would read them from L2 G times).
      for_each_run(kp + h * k_head, k_blk, table, BS, lo, hi, k_tok, D * int64_t(sizeof(scalar_t)), [&](const scalar_t* k0, int64_t n, int64_t j) {
        for (int64_t g = 0; g < G; ++g) {
          const vec* qv = queries.data() + g * NC;
          float* s = scores.data() + g * m + j;
          auto dot = [&](const scalar_t* k) {
            vec acc = qv[0] * load_chunk<scalar_t, DT>(k, 0, D);
            for (int64_t c = 1; c < NC; ++c) acc += qv[c] * load_chunk<scalar_t, DT>(k, c, D);
            return acc;
          };
          const scalar_t* k = k0;
          int64_t t = 0;
          for (; t + 4 <= n; t += 4, k += 4 * k_tok) {
            const vec4 d4 = hsum4(dot(k), dot(k + k_tok), dot(k + 2 * k_tok), dot(k + 3 * k_tok));
            std::memcpy(s + t, &d4, sizeof(d4));
          }
          for (; t < n; ++t, k += k_tok) s[t] = hsum4(dot(k), vec{}, vec{}, vec{})[0];
        }
      });
      // Softmax of each head's row in float32 (soft-capped first when the model asks: Gemma-2), unnormalised.
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * m;
        if (cap > 0.f)
          for (int64_t j = 0; j < m; ++j) s[j] = cap * std::tanh(s[j] / cap);
        float mx = -INFINITY;
        for (int64_t j = 0; j < m; ++j) mx = std::max(mx, s[j]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < m; ++j) {
          s[j] = fastgen_cpu::exp(s[j] - mx);
          sum += s[j];
        }
        sums[g] = sum;
      }
      // Outputs sum_j p_gj v_j, blocks outside and heads inside again. Each head keeps two sets of accumulators in
      // registers over a block, for even and odd keys, so that consecutive keys' FMAs do not wait on each other.
      std::fill(outputs.begin(), outputs.end(), vec{});
      for_each_run(vp + h * v_head, v_blk, table, BS, lo, hi, v_tok, D * int64_t(sizeof(scalar_t)), [&](const scalar_t* v0, int64_t n, int64_t j) {
        for (int64_t g = 0; g < G; ++g) {
          const float* p = scores.data() + g * m + j;
          vec acc[2][MAX_CHUNKS];
          for (int64_t c = 0; c < NC; ++c) acc[0][c] = outputs[(g * 2) * NC + c], acc[1][c] = outputs[(g * 2 + 1) * NC + c];
          const scalar_t* v = v0;
          int64_t t = 0;
          for (; t + 2 <= n; t += 2, v += 2 * v_tok)
            for (int64_t c = 0; c < NC; ++c) {
              acc[0][c] += p[t] * load_chunk<scalar_t, DT>(v, c, D);
              acc[1][c] += p[t + 1] * load_chunk<scalar_t, DT>(v + v_tok, c, D);
            }
          for (; t < n; ++t, v += v_tok)
            for (int64_t c = 0; c < NC; ++c) acc[0][c] += p[t] * load_chunk<scalar_t, DT>(v, c, D);
          for (int64_t c = 0; c < NC; ++c) outputs[(g * 2) * NC + c] = acc[0][c], outputs[(g * 2 + 1) * NC + c] = acc[1][c];
        }
      });
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / sums[g];
        for (int64_t c = 0; c < NC; ++c) {
          const vec o = (outputs[(g * 2) * NC + c] + outputs[(g * 2 + 1) * NC + c]) * inv;
          for (int64_t i = 0; i < std::min(W, D - c * W); ++i) op[row0 + g * D + c * W + i] = static_cast<scalar_t>(o[i]);
        }
      }
    }
  });
}

// q [B, H, D] contiguous; k_cache, v_cache [num_blocks, block_size, HKV, D] with unit stride in D (any layout
// otherwise: fastgen's pools are head-major views); blocks [B, nb] int64, the blocks each sequence reads, in order;
// start, end [B] int64: it reads keys [start, end) counted from the first slot of blocks[b, 0]. scale multiplies
// q.k; softcap > 0 squashes each score s to softcap * tanh(s / softcap). Returns [B, H, D].
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& blocks, const at::Tensor& start, const at::Tensor& end,
                                  double scale, double softcap) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous [B, H, D] tensor");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "k_cache and v_cache must be [blocks, block_size, HKV, D]");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "the KV pools need unit stride in head_dim");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and the KV pools must share a dtype");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "q's heads must match the pools'");
  TORCH_CHECK(q.size(2) <= 256, "paged_decode_attention supports head_dim <= 256, got ", q.size(2));
  TORCH_CHECK(blocks.scalar_type() == at::kLong && start.scalar_type() == at::kLong && end.scalar_type() == at::kLong,
              "blocks, start and end must be int64");
  TORCH_CHECK(blocks.is_contiguous() && blocks.size(0) == q.size(0), "blocks must be a contiguous [B, nb] tensor");
  TORCH_CHECK((end > start).all().item<bool>(), "every sequence must read at least one key");
  at::Tensor out = at::empty_like(q);
  const at::Tensor s = start.contiguous(), e = end.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    switch (q.size(2)) {
      case 64: attend<scalar_t, 64>(q, k_cache, v_cache, blocks, s, e, scale, softcap, out); break;
      case 128: attend<scalar_t, 128>(q, k_cache, v_cache, blocks, s, e, scale, softcap, out); break;
      case 256: attend<scalar_t, 256>(q, k_cache, v_cache, blocks, s, e, scale, softcap, out); break;
      default: attend<scalar_t, 0>(q, k_cache, v_cache, blocks, s, e, scale, softcap, out);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(fastgen_cpu, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor blocks, Tensor start, "
        "Tensor end, float scale, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastgen_cpu, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
