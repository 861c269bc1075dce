// What the CPU kernels share: the float32 register type as wide as the build allows, and math written so that the
// compiler vectorises it for whatever -m flags the build has.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastgen_cpu {

// One register of float32 lanes, in GCC/Clang vector extensions, as wide as the build's -m flags allow (16 lanes
// with AVX-512, 8 with AVX2, 4 otherwise): the flags come from the capability torch detected at run time
// (cpu_ops.py), so no instruction set is assumed here.
#if defined(__AVX512F__)
constexpr int64_t W = 16;
#elif defined(__AVX__)
constexpr int64_t W = 8;
#else
constexpr int64_t W = 4;
#endif
typedef float vec __attribute__((vector_size(W * sizeof(float))));

// e^x for x in [-87, 88] (clamped outside): x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-6 Taylor polynomial
// (relative error < 2e-7, under float32's rounding), 2^n built in the exponent bits. Branch-free, so it vectorises
// where std::exp (a libm call) does not.
inline float exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace fastgen_cpu
