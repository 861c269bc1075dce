// The CPU backend's per-token ops, each one pass over its rows instead of the several PyTorch ops (and as many
// thread wake-ups and temporaries) the reference spends: at a decode step's few rows those fixed costs, not the
// arithmetic, set their time (issue 20's profile: ~0.1 ms per norm, rotary or KV write at 32 rows). Float32 rows;
// the Python side sends other dtypes to the PyTorch backend. Registered beside paged_decode_attention.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

#include "vec_math.h"

namespace {

// Rows per thread task: enough elements that waking a second thread pays.
int64_t grain(int64_t row_elements) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_elements, 1)); }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1 && t.scalar_type() == at::kFloat, name,
              " must be a float32 [rows, hidden] tensor with unit stride in hidden");
}

// (norm(x + residual) * weight, x + residual); without a residual, (norm(x) * weight, x).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::kFloat && weight.numel() == x.size(1),
              "weight must be a contiguous float32 [hidden] tensor");
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows, n}, x.options());
  at::Tensor sum = x;
  if (residual.has_value()) {
    check_rows(*residual, "residual");
    sum = at::empty({rows, n}, x.options());
  }
  const float* w = weight.data_ptr<float>();
  at::parallel_for(0, rows, grain(n), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float* xr = x.data_ptr<float>() + r * x.stride(0);
      const float* s = xr;
      if (residual.has_value()) {
        const float* rr = residual->data_ptr<float>() + r * residual->stride(0);
        float* sr = sum.data_ptr<float>() + r * n;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) sr[i] = xr[i] + rr[i];
        s = sr;
      }
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < n; ++i) squares += s[i] * s[i];
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(n) + static_cast<float>(eps));
      float* o = out.data_ptr<float>() + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] = s[i] * inv * w[i];
    }
  });
  return {out, sum};
}

// Rotates q [T, Hq, R] and k [T, Hk, R] in place (rotate-half layout) at positions [T]; cos_sin [max_pos, R] holds
// cos in its first half and sin in its second.
void rotary(at::Tensor q, at::Tensor k, const at::Tensor& positions, const at::Tensor& cos_sin) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && cos_sin.scalar_type() == at::kFloat,
              "rotary: float32 q, k and table");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && cos_sin.is_contiguous(), "rotary: unit stride in head_dim");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "rotary: int64 positions");
  const int64_t T = q.size(0), half = cos_sin.size(1) / 2;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* table = cos_sin.data_ptr<float>();
  at::parallel_for(0, T, grain((q.size(1) + k.size(1)) * 2 * half), [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const float* cs = table + pos[t] * 2 * half;
      for (at::Tensor* x : {&q, &k}) {
        for (int64_t h = 0; h < x->size(1); ++h) {
          float* x1 = x->data_ptr<float>() + t * x->stride(0) + h * x->stride(1);
          float* x2 = x1 + half;
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            const float a = x1[i], b = x2[i];
            x1[i] = a * cs[i] - b * cs[half + i];
            x2[i] = b * cs[i] + a * cs[half + i];
          }
        }
      }
    }
  });
}

// Copies each token's keys and values [T, Hkv, D] into its slot of the pools [blocks, block_size, Hkv, D] (any
// strides but unit stride in D; any dtype: a row copy).
void kv_write(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(), "kv_write: int64 slots");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "kv_write: unit stride in head_dim");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(),
              "kv_write: keys and values must have the pools' dtype");
  const int64_t T = k.size(0), H = k.size(1), BS = k_cache.size(1), capacity = k_cache.size(0) * BS;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < capacity, "kv_write: slot ", slots[t], " outside the pool");
  const int64_t row_bytes = k.size(2) * k.element_size();
  at::parallel_for(0, T, grain(2 * H * k.size(2)), [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const int64_t block = slots[t] / BS, offset = slots[t] % BS;
      for (auto [src, dst] : {std::pair<const at::Tensor*, at::Tensor*>{&k, &k_cache}, {&v, &v_cache}}) {
        const char* s = static_cast<const char*>(src->data_ptr());
        char* d = static_cast<char*>(dst->data_ptr());
        for (int64_t h = 0; h < H; ++h)
          std::memcpy(d + (block * dst->stride(0) + offset * dst->stride(1) + h * dst->stride(2)) * dst->element_size(),
                      s + (t * src->stride(0) + h * src->stride(1)) * src->element_size(), row_bytes);
      }
    }
  });
}

// x [T, 2I] holding gate then up: silu(gate) * up, [T, I].
at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, "x");
  const int64_t rows = x.size(0), n = x.size(1) / 2;
  at::Tensor out = at::empty({rows, n}, x.options());
  at::parallel_for(0, rows, grain(n), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float* gate = x.data_ptr<float>() + r * x.stride(0);
      const float* up = gate + n;
      float* o = out.data_ptr<float>() + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] = gate[i] / (1.f + fastgen_cpu::exp(-gate[i])) * up[i];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastgen_cpu, m) {
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos_sin) -> ()");
  m.def("kv_write(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastgen_cpu, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary", &rotary);
  m.impl("kv_write", &kv_write);
  m.impl("silu_and_mul", &silu_and_mul);
}
