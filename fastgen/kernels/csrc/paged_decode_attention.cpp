// Decode attention read from the paged KV cache in place: each sequence's one query attends over its keys where
// they lie in the block pools, with no gathered copy. Registered as torch.ops.fastgen_cpu.paged_decode_attention
// (loaded by fastgen/kernels/cpu_ops.py, which picks the instruction-set flags for the machine it runs on).
//
// Work is split over (sequence, KV head, group of query heads): the query heads of a group share each key and
// value row they load, so grouped-query attention reads the cache once. Keys are visited block by block (no
// per-key division), scores go to a per-thread buffer, the softmax runs in float32 with a polynomial exp the
// compiler vectorises, and queries and outputs stay in float32 registers. Per key it reads 2 * head_dim elements.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace {

using fastgen_cpu::vec;
using fastgen_cpu::W;
typedef float vec4 __attribute__((vector_size(4 * sizeof(float))));
constexpr int64_t MAX_CHUNKS = 256 / W;  // head_dim <= 256
constexpr int64_t MAX_BLOCK = 256;        // block_size <= 256

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

// Lines of one row (row_bytes from p) asked for ahead of use: the next blocks lie elsewhere in the pool, where the
// hardware prefetcher cannot guess them, so each key's row of the block PREFETCH_BLOCKS ahead is requested while
// the current block is read (spread over the block's keys rather than issued in one burst; 0 turns it off), into
// the L2 cache (PREFETCH_LOCALITY 2: prefetcht1), not the L1 (3: prefetcht0), which the rows in use hold. Measured
// side by side on a 2-core AVX-512 EPYC (experiments/results/cpu_attention, bench_cpu_attention.py --variants):
// into L2 1.5-1.9x faster than into L1 with blocks at random in the pool; 1, 2 and 4 blocks ahead within 5%.
#ifndef PREFETCH_LOCALITY
#define PREFETCH_LOCALITY 2
#endif
#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 2
#endif
inline void prefetch_row(const void* p, int64_t row_bytes) {
  for (int64_t byte = 0; byte < row_bytes; byte += 64)
    __builtin_prefetch(static_cast<const char*>(p) + byte, 0, PREFETCH_LOCALITY);
}

// One item of work: query heads [g0, g0 + GT) of KV head h of sequence b over its keys [lo, hi), counted from the
// first slot of its first block. `part` >= 0 when the sequence's keys are split over several items (split-K), whose
// partial results are merged afterwards; -1 when the item writes the output itself.
struct Item {
  int64_t b, h, g0, lo, hi, part;
};

// DT: head_dim fixed at compile time (a multiple of W: the common sizes, fully unrolled), or 0 to read it from q.
// GT: query heads of a KV head that go through the key loops together (G is a multiple of GT): each key and value
// row is loaded once for all of them and their accumulators stay in registers, where running the heads one after
// another re-reads every row per head. KB keys are reduced together, so that one transposing reduction serves
// four dot products.
//
// One pass per block with an online softmax (flash-decoding): a block's scores are computed, exponentiated against
// the running maximum and applied to the same block's values at once, so each block's keys and values are read
// while the next block's are on their way, and the scores never leave the L1 cache.
template <typename scalar_t, int64_t DT, int64_t GT>
void attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& blocks,
            const at::Tensor& start, const at::Tensor& end, double scale, double softcap, at::Tensor& out) {
  constexpr int64_t KB = GT >= 4 ? 2 : 4;
  static_assert(KB * GT % 4 == 0, "the reductions take four dot products at a time");
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
  const int64_t row_bytes = head_dim * int64_t(sizeof(scalar_t));

  // Split-K: with more threads than work items (a few sequences), long contexts are cut, at block boundaries, into
  // parts of at least MIN_PART keys, so that every thread reads its share of the KV.
  constexpr int64_t MIN_PART = 512;
  const int64_t threads = at::get_num_threads(), groups = HKV * (G / GT);
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += ep[b] - sp[b];
  const int64_t part_keys = threads > 1 && B * groups < 4 * threads
                                ? std::max(MIN_PART, (total * groups / (4 * threads) + BS - 1) / BS * BS)
                                : INT64_MAX;
  std::vector<Item> items;
  int64_t parts = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lo = sp[b], hi = ep[b];
    const bool split = hi - lo > part_keys;
    for (int64_t h = 0; h < HKV; ++h)
      for (int64_t g0 = 0; g0 < G; g0 += GT)
        for (int64_t a = lo; a < hi;) {
          const int64_t z = split ? std::min(hi, (a / BS) * BS + part_keys) : hi;
          items.push_back({b, h, g0, a, z, split ? parts++ : -1});
          a = z;
        }
  }
  // A split part's (maximum, sum, unnormalised output) per head, merged below.
  std::vector<float> partial(parts * GT * (head_dim + 2));

  // Items are handed out one at a time to torch's threads (a shared counter), not in one contiguous range per
  // thread: contexts differ from sequence to sequence, and a batch lists its oldest (longest) sequences first,
  // where an even split measured 1.32x slower (32 sequences of 100-900 keys, longest first; 1.09x shuffled).
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(threads, n_items), 1, [&](int64_t, int64_t) {
    // Here, not outside: captured by the lambda they would be loads, and the chunk loops would not unroll.
    const int64_t D = DT ? DT : head_dim, NC = (D + W - 1) / W;
    float s[GT][MAX_BLOCK];
    // Each thread claims its next item while it works on the current one, so that the prefetches run on from the
    // current item's last blocks into the next item's first ones (one stream, not a cold start per item).
    auto claim = [&]() { return next.fetch_add(1, std::memory_order_relaxed); };
    for (int64_t i = claim(), following = i < n_items ? claim() : n_items; i < n_items;
         i = following, following = i < n_items ? claim() : n_items) {
      const Item it = items[i];
      const int64_t* table = bp + it.b * nb;
      const int64_t row0 = (it.b * H + it.h * G + it.g0) * D;   // the first of the GT query (and output) rows
      const scalar_t* kh = kp + it.h * k_head;
      const scalar_t* vh = vp + it.h * v_head;
      vec qv[GT][MAX_CHUNKS];
      for (int64_t g = 0; g < GT; ++g)
        for (int64_t c = 0; c < NC; ++c) qv[g][c] = load_chunk<scalar_t, DT>(qp + row0 + g * D, c, D) * sc;
      float mx[GT], sum[GT];
      vec acc[GT][MAX_CHUNKS] = {};
      for (int64_t g = 0; g < GT; ++g) mx[g] = -INFINITY, sum[g] = 0.f;

      const int64_t last = (it.hi - 1) / BS;
      for (int64_t blk = it.lo / BS; blk <= last; ++blk) {
        const int64_t t0 = std::max(it.lo - blk * BS, int64_t(0)), n = std::min(it.hi - blk * BS, BS) - t0;
        const scalar_t* k = kh + table[blk] * k_blk + t0 * k_tok;
        const scalar_t* v = vh + table[blk] * v_blk + t0 * v_tok;
        // The rows of the block PREFETCH_BLOCKS ahead: this item's, past its last block the following item's first
        // ones (past those, the current block's again: a no-op).
        const scalar_t* kn = k;
        const scalar_t* vn = v;
        if (blk + PREFETCH_BLOCKS <= last) {
          kn = kh + table[blk + PREFETCH_BLOCKS] * k_blk, vn = vh + table[blk + PREFETCH_BLOCKS] * v_blk;
        } else if (following < n_items) {
          const Item& f = items[following];
          const int64_t j = f.lo / BS + blk + PREFETCH_BLOCKS - last - 1;
          if (j <= (f.hi - 1) / BS) {
            const int64_t fb = bp[f.b * nb + j];
            kn = kp + f.h * k_head + fb * k_blk, vn = vp + f.h * v_head + fb * v_blk;
          }
        }

        // Scores q_g . k_t for KB keys x GT heads per reduction.
        auto dots = [&](int64_t t, int64_t keys) {
          vec a[KB * GT] = {};
          for (int64_t kb = 0; kb < keys; ++kb) {
            const scalar_t* row = k + (t + kb) * k_tok;
            for (int64_t c = 0; c < NC; ++c) {
              const vec kv = load_chunk<scalar_t, DT>(row, c, D);
              for (int64_t g = 0; g < GT; ++g) a[kb * GT + g] += qv[g][c] * kv;
            }
          }
          for (int64_t r = 0; r < KB * GT; r += 4) {
            const vec4 d = hsum4(a[r], a[r + 1], a[r + 2], a[r + 3]);
            for (int64_t x = 0; x < 4; ++x)
              if ((r + x) / GT < keys) s[(r + x) % GT][t + (r + x) / GT] = d[x];
          }
        };
        int64_t t = 0;
        for (; t + KB <= n; t += KB) {
          if (PREFETCH_BLOCKS)
            for (int64_t kb = 0; kb < KB; ++kb) prefetch_row(kn + (t + kb) * k_tok, row_bytes);
          dots(t, KB);
        }
        if (t < n) dots(t, n - t);

        // Online softmax in float32 (soft-capped first when the model asks: Gemma-2): rescale what came before to
        // the new maximum, exponentiate this block's scores.
        float alpha[GT];
        for (int64_t g = 0; g < GT; ++g) {
          float* sg = s[g];
          if (cap > 0.f)
            for (int64_t j = 0; j < n; ++j) sg[j] = cap * std::tanh(sg[j] / cap);
          float m = mx[g];
#pragma omp simd reduction(max : m)
          for (int64_t j = 0; j < n; ++j) m = sg[j] > m ? sg[j] : m;
          float add = 0.f;
#pragma omp simd reduction(+ : add)
          for (int64_t j = 0; j < n; ++j) {
            sg[j] = fastgen_cpu::exp(sg[j] - m);
            add += sg[j];
          }
          alpha[g] = fastgen_cpu::exp(mx[g] - m);   // 0 on the first block (mx = -inf, clamped)
          sum[g] = sum[g] * alpha[g] + add;
          mx[g] = m;
        }
        for (int64_t g = 0; g < GT; ++g)
          for (int64_t c = 0; c < NC; ++c) acc[g][c] *= alpha[g];
        // Outputs += p_gt v_t: each value row loaded once for the GT heads, their accumulators in registers.
        for (int64_t u = 0; u < n; ++u) {
          if (PREFETCH_BLOCKS) prefetch_row(vn + u * v_tok, row_bytes);
          const scalar_t* row = v + u * v_tok;
          for (int64_t c = 0; c < NC; ++c) {
            const vec vv = load_chunk<scalar_t, DT>(row, c, D);
            for (int64_t g = 0; g < GT; ++g) acc[g][c] += s[g][u] * vv;
          }
        }
      }
      for (int64_t g = 0; g < GT; ++g) {
        const float inv = it.part < 0 ? 1.f / sum[g] : 1.f;
        float* dst = it.part < 0 ? nullptr : partial.data() + (it.part * GT + g) * (head_dim + 2);
        if (dst) dst[0] = mx[g], dst[1] = sum[g];
        for (int64_t c = 0; c < NC; ++c) {
          const vec o = acc[g][c] * inv;
          for (int64_t x = 0; x < std::min(W, D - c * W); ++x) {
            if (dst) dst[2 + c * W + x] = o[x];
            else op[row0 + g * D + c * W + x] = static_cast<scalar_t>(o[x]);
          }
        }
      }
    }
  });
  if (!parts) return;
  // Merge each split sequence's parts (consecutive items): rescale each to the largest maximum, then normalise.
  for (int64_t i = 0; i < n_items;) {
    if (items[i].part < 0) { ++i; continue; }
    int64_t j = i;
    while (j < n_items && items[j].b == items[i].b && items[j].h == items[i].h && items[j].g0 == items[i].g0) ++j;
    for (int64_t g = 0; g < GT; ++g) {
      auto part = [&](int64_t x) { return partial.data() + (items[x].part * GT + g) * (head_dim + 2); };
      float m = -INFINITY, total_sum = 0.f;
      for (int64_t x = i; x < j; ++x) m = std::max(m, part(x)[0]);
      std::vector<float> o(head_dim, 0.f);
      for (int64_t x = i; x < j; ++x) {
        const float w = std::exp(part(x)[0] - m);
        total_sum += w * part(x)[1];
        for (int64_t d = 0; d < head_dim; ++d) o[d] += w * part(x)[2 + d];
      }
      const int64_t row = (items[i].b * H + items[i].h * G + items[i].g0 + g) * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) op[row + d] = static_cast<scalar_t>(o[d] / total_sum);
    }
    i = j;
  }
}

// The largest group of query heads (<= 4) that divides G.
template <typename scalar_t, int64_t DT>
void attend_groups(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& blocks, const at::Tensor& start, const at::Tensor& end, double scale,
                   double softcap, at::Tensor& out) {
  const int64_t G = q.size(1) / k_cache.size(2);
  if (G % 4 == 0) attend<scalar_t, DT, 4>(q, k_cache, v_cache, blocks, start, end, scale, softcap, out);
  else if (G % 3 == 0) attend<scalar_t, DT, 3>(q, k_cache, v_cache, blocks, start, end, scale, softcap, out);
  else if (G % 2 == 0) attend<scalar_t, DT, 2>(q, k_cache, v_cache, blocks, start, end, scale, softcap, out);
  else attend<scalar_t, DT, 1>(q, k_cache, v_cache, blocks, start, end, scale, softcap, out);
}

template <typename scalar_t>
void attend_dims(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& blocks,
                 const at::Tensor& start, const at::Tensor& end, double scale, double softcap, at::Tensor& out) {
  switch (q.size(2)) {
    case 64: attend_groups<scalar_t, 64>(q, k_cache, v_cache, blocks, start, end, scale, softcap, out); break;
    case 128: attend_groups<scalar_t, 128>(q, k_cache, v_cache, blocks, start, end, scale, softcap, out); break;
    default: attend_groups<scalar_t, 0>(q, k_cache, v_cache, blocks, start, end, scale, softcap, out);
  }
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
  TORCH_CHECK(k_cache.size(1) <= MAX_BLOCK, "paged_decode_attention supports block_size <= ", MAX_BLOCK, ", got ",
              k_cache.size(1));
  TORCH_CHECK(blocks.scalar_type() == at::kLong && start.scalar_type() == at::kLong && end.scalar_type() == at::kLong,
              "blocks, start and end must be int64");
  TORCH_CHECK(blocks.is_contiguous() && blocks.size(0) == q.size(0), "blocks must be a contiguous [B, nb] tensor");
  TORCH_CHECK(start.numel() == q.size(0) && end.numel() == q.size(0), "start and end need one entry per sequence");
  const at::Tensor s = start.contiguous(), e = end.contiguous();
  for (int64_t b = 0; b < q.size(0); ++b)
    TORCH_CHECK(e.data_ptr<int64_t>()[b] > s.data_ptr<int64_t>()[b], "every sequence must read at least one key");
  at::Tensor out = at::empty_like(q);
  switch (q.scalar_type()) {
    case at::kFloat: attend_dims<float>(q, k_cache, v_cache, blocks, s, e, scale, softcap, out); break;
    case at::kBFloat16: attend_dims<c10::BFloat16>(q, k_cache, v_cache, blocks, s, e, scale, softcap, out); break;
    case at::kHalf: attend_dims<c10::Half>(q, k_cache, v_cache, blocks, s, e, scale, softcap, out); break;
    default: TORCH_CHECK(false, "paged_decode_attention runs float32, bfloat16 or float16, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(fastgen_cpu, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor blocks, Tensor start, "
        "Tensor end, float scale, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastgen_cpu, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
