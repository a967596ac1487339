// 3x3 convolutions (stride 1, padding 1, no groups) on the CPU by Winograd's minimal filtering
// F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016), as an
// autograd Function: forward and both gradients are each one batched GEMM over the 36 points of
// the transform domain, where libtorch's direct convolution spends 9 multiply-adds per output
// and input channel pair, Winograd spends 36/16 = 2.25. cuDNN picks the same algorithm on GPUs
// (torch.backends.cudnn.benchmark); libtorch's CPU convolutions never do.
//
// Layouts. A 6x6 input tile starts every 4 pixels (tiles overlap by 2); tiles are numbered
// image by image, row by row: t = n*T + i*tw + j. The transformed weight is U [36, K, C].
// - Large planes (FPN levels, UperNet's 1/4 scale): the transformed input V is [36, C, N*T] and
//   the product M [36, K, N*T], so forward is one bmm (U @ V), the input gradient one (U^T @ dM)
//   and the weight gradient one (dM @ V^T). The four transforms (input, output and their
//   adjoints) run plane by plane (one channel of one image): a plane's tiles are deinterleaved
//   by phase (column 4j+k -> phase k, index j), so every inner loop runs over contiguous tile
//   indices j and vectorizes; the GEMMs run in chunks of channels whose product is transformed
//   while still in cache.
// - Small planes (RoI features, at most 32x32): a plane has too few tiles for that, so the
//   tensors go channels-last, V is [36, N*T, C] and M [36, N*T, K], and the transforms run tile
//   by tile with every inner loop over channels.
//
// Accuracy: F(4x4, 3x3)'s transforms (coefficients up to 8 and 1/24) cost about one decimal
// digit against the direct convolution: ~1e-5 relative error in float (vs ~5e-7), exact to
// ~1e-14 in double (what the tests compare against libtorch's convolution).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Input transform B^T (rows u, columns p): V = B^T d B.
constexpr double kBT[6][6] = {
    {4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
    {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1},
};
// Output transform A^T (rows r, columns u): Y = A^T M A.
constexpr double kAT[4][6] = {
    {1, 1, 1, 1, 1, 0},
    {0, 1, -1, 2, -2, 0},
    {0, 1, 1, 4, 4, 0},
    {0, 1, -1, 8, -8, 1},
};
// Their transposes, for the adjoints: B (rows p, columns u) and A (rows u, columns r).
constexpr double kB[6][6] = {
    {4, 0, 0, 0, 0, 0},     {0, -4, 4, -2, 2, 4}, {-5, -4, -4, -1, -1, 0},
    {0, 1, -1, 2, -2, -5}, {1, 1, 1, 1, 1, 0},   {0, 0, 0, 0, 0, 1},
};
constexpr double kA[6][4] = {
    {1, 0, 0, 0}, {1, 1, 1, 1}, {1, -1, 1, -1}, {1, 2, 4, 8}, {1, -2, 4, -8}, {0, 0, 0, 1},
};
constexpr bool are_transposes() {
  for (int a = 0; a < 6; ++a) {
    for (int b = 0; b < 6; ++b)
      if (kB[a][b] != kBT[b][a]) return false;
    for (int r = 0; r < 4; ++r)
      if (kA[a][r] != kAT[r][a]) return false;
  }
  return true;
}
static_assert(are_transposes(), "kB and kA must be the transposes of kBT and kAT");
// Filter transform G (rows u, columns 3x3 kernel taps): U = G g G^T.
constexpr double kG[6][3] = {
    {1.0 / 4, 0, 0},
    {-1.0 / 6, -1.0 / 6, -1.0 / 6},
    {-1.0 / 6, 1.0 / 6, -1.0 / 6},
    {1.0 / 24, 1.0 / 12, 1.0 / 6},
    {1.0 / 24, -1.0 / 12, 1.0 / 6},
    {0, 0, 1},
};

// The tiling of one image plane and where its tiles sit in the tile buffer.
struct Plane {
  int64_t H, W, th, tw;
  int64_t stride36;  // elements between transform points in the tile buffer
  int64_t offset;    // where this plane's tiles start (plane-by-plane path only)
};

// out[j] = sum_k c[k] * in[k][j] for a row of length n (the compiler folds the constant
// coefficients, zeros and ones included, once the loops over k are unrolled).
template <typename T, int K>
inline __attribute__((always_inline)) void combine(T* out, const double* c, T* const* in,
                                                   int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    T acc = 0;
#pragma GCC unroll 6
    for (int k = 0; k < K; ++k) acc += static_cast<T>(c[k]) * in[k][j];
    out[j] = acc;
  }
}

// V = B^T d B for every tile of one input plane `x` (H x W, zero-padded by one pixel).
template <typename T>
inline __attribute__((always_inline)) void input_transform_plane(const T* x, T* v, Plane p,
                                                                  T* scratch) {
  const int64_t n = p.tw + 1;  // phases 0 and 1 of the next tile give columns 4 and 5
  T* d = scratch;              // d[row 0..5][phase 0..3][n]: the tile row's input rows
  T* r = scratch + 24 * n;     // r[u][phase][n]: B^T applied down the columns
  T* q = r + 24 * n;           // one output row of length tw
  for (int64_t i = 0; i < p.th; ++i) {
    for (int row = 0; row < 6; ++row) {
      const int64_t y = 4 * i - 1 + row;
      for (int k = 0; k < 4; ++k) {
        T* dst = d + (row * 4 + k) * n;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t xc = 4 * j + k - 1;
          dst[j] = (y >= 0 && y < p.H && xc >= 0 && xc < p.W) ? x[y * p.W + xc] : T(0);
        }
      }
    }
    for (int u = 0; u < 6; ++u) {
      for (int k = 0; k < 4; ++k) {
        T* rows[6];
        for (int row = 0; row < 6; ++row) rows[row] = d + (row * 4 + k) * n;
        combine<T, 6>(r + (u * 4 + k) * n, kBT[u], rows, n);
      }
    }
    for (int u = 0; u < 6; ++u) {
      T* cols[6];
      for (int c = 0; c < 6; ++c) cols[c] = r + (u * 4 + (c & 3)) * n + (c >> 2);
      for (int w = 0; w < 6; ++w) {
        T* out = v + (u * 6 + w) * p.stride36 + p.offset + i * p.tw;
        combine<T, 6>(q, kBT[w], cols, p.tw);
        for (int64_t j = 0; j < p.tw; ++j) out[j] = q[j];
      }
    }
  }
}

// Y = A^T M A for every tile of one output plane `y` (tiles cropped to H x W).
template <typename T>
inline __attribute__((always_inline)) void output_transform_plane(const T* m, T* y, Plane p,
                                                                   T* scratch) {
  const int64_t n = p.tw;
  T* s = scratch;           // s[u][col 0..3][n]: A^T applied along each tile row
  T* o = scratch + 24 * n;  // o[row 0..3][col 0..3][n]
  for (int64_t i = 0; i < p.th; ++i) {
    for (int u = 0; u < 6; ++u) {
      T* in[6];
      for (int w = 0; w < 6; ++w) in[w] = const_cast<T*>(m + (u * 6 + w) * p.stride36 + p.offset + i * n);
      for (int c = 0; c < 4; ++c) combine<T, 6>(s + (u * 4 + c) * n, kAT[c], in, n);
    }
    for (int row = 0; row < 4; ++row) {
      for (int c = 0; c < 4; ++c) {
        T* in[6];
        for (int u = 0; u < 6; ++u) in[u] = s + (u * 4 + c) * n;
        combine<T, 6>(o + (row * 4 + c) * n, kAT[row], in, n);
      }
      const int64_t yy = 4 * i + row;
      if (yy >= p.H) continue;
      T* dst = y + yy * p.W;
      for (int64_t j = 0; j < n; ++j) {
        for (int c = 0; c < 4; ++c) {
          const int64_t xc = 4 * j + c;
          if (xc < p.W) dst[xc] = o[(row * 4 + c) * n + j];
        }
      }
    }
  }
}

// dM = A dY A^T (the adjoint of output_transform_plane) for one output-gradient plane.
template <typename T>
inline __attribute__((always_inline)) void output_adjoint_plane(const T* dy, T* dm, Plane p,
                                                                 T* scratch) {
  const int64_t n = p.tw;
  T* g = scratch;           // g[row 0..3][col 0..3][n]: the tile row's output gradient
  T* t = scratch + 16 * n;  // t[u][col 0..3][n]: A applied down the columns
  T* q = t + 24 * n;
  for (int64_t i = 0; i < p.th; ++i) {
    for (int row = 0; row < 4; ++row) {
      const int64_t yy = 4 * i + row;
      for (int c = 0; c < 4; ++c) {
        T* dst = g + (row * 4 + c) * n;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t xc = 4 * j + c;
          dst[j] = (yy < p.H && xc < p.W) ? dy[yy * p.W + xc] : T(0);
        }
      }
    }
    for (int u = 0; u < 6; ++u) {
      for (int c = 0; c < 4; ++c) {
        T* rows[4];
        for (int row = 0; row < 4; ++row) rows[row] = g + (row * 4 + c) * n;
        combine<T, 4>(t + (u * 4 + c) * n, kA[u], rows, n);
      }
    }
    for (int u = 0; u < 6; ++u) {
      T* cols[4];
      for (int c = 0; c < 4; ++c) cols[c] = t + (u * 4 + c) * n;
      for (int w = 0; w < 6; ++w) {
        T* out = dm + (u * 6 + w) * p.stride36 + p.offset + i * n;
        combine<T, 4>(q, kA[w], cols, n);
        for (int64_t j = 0; j < n; ++j) out[j] = q[j];
      }
    }
  }
}

// dx += B dV B^T scattered back onto the overlapping 6x6 windows (the adjoint of
// input_transform_plane) for one input-gradient plane; `dx` starts zeroed.
template <typename T>
inline __attribute__((always_inline)) void input_adjoint_plane(const T* dv, T* dx, Plane p,
                                                                T* scratch) {
  const int64_t n = p.tw;
  T* h = scratch;           // h[u][col 0..5][n]: B applied along each tile row
  T* e = scratch + 36 * n;  // one row of the 6x6 window gradient: e[col 0..5][n]
  for (int64_t i = 0; i < p.th; ++i) {
    for (int u = 0; u < 6; ++u) {
      T* in[6];
      for (int w = 0; w < 6; ++w)
        in[w] = const_cast<T*>(dv + (u * 6 + w) * p.stride36 + p.offset + i * n);
      for (int c = 0; c < 6; ++c) combine<T, 6>(h + (u * 6 + c) * n, kB[c], in, n);
    }
    for (int row = 0; row < 6; ++row) {
      const int64_t yy = 4 * i - 1 + row;
      for (int c = 0; c < 6; ++c) {
        T* in[6];
        for (int u = 0; u < 6; ++u) in[u] = h + (u * 6 + c) * n;
        combine<T, 6>(e + c * n, kB[row], in, n);
      }
      if (yy < 0 || yy >= p.H) continue;
      T* dst = dx + yy * p.W;
      // Columns 4j-1 .. 4j+4; neighbouring windows overlap by two columns, so accumulate.
      for (int64_t j = 0; j < n; ++j) {
        for (int c = 0; c < 6; ++c) {
          const int64_t xc = 4 * j - 1 + c;
          if (xc >= 0 && xc < p.W) dst[xc] += e[c * n + j];
        }
      }
    }
  }
}

// The float versions are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load
// time (GCC function multiversioning), so one binary runs everywhere at full width.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CNX_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CNX_MULTIVERSION
#endif

CNX_MULTIVERSION void input_transform_f32(const float* x, float* v, Plane p, float* s) {
  input_transform_plane<float>(x, v, p, s);
}
CNX_MULTIVERSION void output_transform_f32(const float* m, float* y, Plane p, float* s) {
  output_transform_plane<float>(m, y, p, s);
}
CNX_MULTIVERSION void output_adjoint_f32(const float* dy, float* dm, Plane p, float* s) {
  output_adjoint_plane<float>(dy, dm, p, s);
}
CNX_MULTIVERSION void input_adjoint_f32(const float* dv, float* dx, Plane p, float* s) {
  input_adjoint_plane<float>(dv, dx, p, s);
}

// The four transforms: the input's, the output's, and their adjoints (the gradients' way back).
enum Which { kInput = 0, kOutput = 1, kOutputAdjoint = 2, kInputAdjoint = 3 };

void plane_kernel(const float* a, float* b, Plane p, float* s, int which) {
  switch (which) {
    case kInput: input_transform_f32(a, b, p, s); break;
    case kOutput: output_transform_f32(a, b, p, s); break;
    case kOutputAdjoint: output_adjoint_f32(a, b, p, s); break;
    default: input_adjoint_f32(a, b, p, s); break;
  }
}
void plane_kernel(const double* a, double* b, Plane p, double* s, int which) {
  switch (which) {
    case kInput: input_transform_plane<double>(a, b, p, s); break;
    case kOutput: output_transform_plane<double>(a, b, p, s); break;
    case kOutputAdjoint: output_adjoint_plane<double>(a, b, p, s); break;
    default: input_adjoint_plane<double>(a, b, p, s); break;
  }
}

// Runs one transform over every (image, channel) plane in parallel. `image` is [N, channels,
// H, W] with contiguous H x W planes (a channel slice of a larger tensor is fine); `tiles` is
// [36, channels, N*T] with contiguous tile rows. Input-side transforms read `image` and write
// `tiles` (kInput) or the reverse (kInputAdjoint); output-side ones likewise (kOutputAdjoint /
// kOutput).
void for_each_plane(const at::Tensor& image, const at::Tensor& tiles, Which which) {
  const int64_t N = image.size(0), C = image.size(1), H = image.size(2), W = image.size(3);
  TORCH_CHECK(image.stride(3) == 1 && image.stride(2) == W && tiles.stride(2) == 1,
              "winograd: planes must be contiguous");
  const int64_t th = (H + 3) / 4, tw = (W + 3) / 4;
  const int64_t s_n = image.stride(0), s_c = image.stride(1);
  const int64_t s_36 = tiles.stride(0), s_tc = tiles.stride(1);
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "winograd_plane", [&] {
    scalar_t* img = image.data_ptr<scalar_t>();
    scalar_t* til = tiles.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(64 * (tw + 1));
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C;
        Plane p{H, W, th, tw, s_36, c * s_tc + n * th * tw};
        scalar_t* im = img + n * s_n + c * s_c;
        if (which == kInput || which == kOutputAdjoint) {
          plane_kernel(im, til, p, scratch.data(), which);
        } else {
          plane_kernel(til, im, p, scratch.data(), which);
        }
      }
    });
  });
}

// ---- Small planes (RoI features): channels innermost --------------------------------------
// For planes of a few tiles (7x7 or 14x14 RoI features) the plane-by-plane transforms above are
// loop overhead. These run tile by tile on channels-last tensors ([N, H, W, C]), every inner loop
// over the channels of one pixel; V is then [36, N*T, C] and M [36, N*T, K].

// Pointers to the C channels of pixel (y, x) of image n, or to `zero` outside the image.
template <typename T>
inline const T* pixel(const T* img, int64_t y, int64_t x, const Plane& p, int64_t c,
                      const T* zero) {
  return (y >= 0 && y < p.H && x >= 0 && x < p.W) ? img + (y * p.W + x) * c : zero;
}

template <typename T>
inline __attribute__((always_inline)) void input_transform_tile(const T* img, T* v, int64_t i,
                                                                 int64_t j, int64_t t, Plane p,
                                                                 int64_t C, T* r, const T* zero) {
  for (int q = 0; q < 6; ++q) {
    T* in[6];
    for (int row = 0; row < 6; ++row)
      in[row] = const_cast<T*>(pixel(img, 4 * i - 1 + row, 4 * j - 1 + q, p, C, zero));
    for (int u = 0; u < 6; ++u) combine<T, 6>(r + (u * 6 + q) * C, kBT[u], in, C);
  }
  for (int u = 0; u < 6; ++u) {
    T* in[6];
    for (int q = 0; q < 6; ++q) in[q] = r + (u * 6 + q) * C;
    for (int w = 0; w < 6; ++w) combine<T, 6>(v + (u * 6 + w) * p.stride36 + t * C, kBT[w], in, C);
  }
}

template <typename T>
inline __attribute__((always_inline)) void output_transform_tile(const T* m, T* img, int64_t i,
                                                                  int64_t j, int64_t t, Plane p,
                                                                  int64_t K, T* s) {
  for (int u = 0; u < 6; ++u) {
    T* in[6];
    for (int w = 0; w < 6; ++w) in[w] = const_cast<T*>(m + (u * 6 + w) * p.stride36 + t * K);
    for (int c = 0; c < 4; ++c) combine<T, 6>(s + (u * 4 + c) * K, kAT[c], in, K);
  }
  for (int row = 0; row < 4; ++row) {
    const int64_t y = 4 * i + row;
    if (y >= p.H) break;
    for (int c = 0; c < 4; ++c) {
      const int64_t x = 4 * j + c;
      if (x >= p.W) break;
      T* in[6];
      for (int u = 0; u < 6; ++u) in[u] = s + (u * 4 + c) * K;
      combine<T, 6>(img + (y * p.W + x) * K, kAT[row], in, K);
    }
  }
}

template <typename T>
inline __attribute__((always_inline)) void output_adjoint_tile(const T* dy, T* dm, int64_t i,
                                                                int64_t j, int64_t t, Plane p,
                                                                int64_t K, T* g, const T* zero) {
  for (int c = 0; c < 4; ++c) {
    T* in[4];
    for (int row = 0; row < 4; ++row)
      in[row] = const_cast<T*>(pixel(dy, 4 * i + row, 4 * j + c, p, K, zero));
    for (int u = 0; u < 6; ++u) combine<T, 4>(g + (u * 4 + c) * K, kA[u], in, K);
  }
  for (int u = 0; u < 6; ++u) {
    T* in[4];
    for (int c = 0; c < 4; ++c) in[c] = g + (u * 4 + c) * K;
    for (int w = 0; w < 6; ++w) combine<T, 4>(dm + (u * 6 + w) * p.stride36 + t * K, kA[w], in, K);
  }
}

template <typename T>
inline __attribute__((always_inline)) void input_adjoint_tile(const T* dv, T* dx, int64_t i,
                                                               int64_t j, int64_t t, Plane p,
                                                               int64_t C, T* h) {
  T* e = h + 36 * C;
  for (int u = 0; u < 6; ++u) {
    T* in[6];
    for (int w = 0; w < 6; ++w) in[w] = const_cast<T*>(dv + (u * 6 + w) * p.stride36 + t * C);
    for (int c = 0; c < 6; ++c) combine<T, 6>(h + (u * 6 + c) * C, kB[c], in, C);
  }
  for (int row = 0; row < 6; ++row) {
    const int64_t y = 4 * i - 1 + row;
    if (y < 0 || y >= p.H) continue;
    for (int c = 0; c < 6; ++c) {
      const int64_t x = 4 * j - 1 + c;
      if (x < 0 || x >= p.W) continue;
      T* in[6];
      for (int u = 0; u < 6; ++u) in[u] = h + (u * 6 + c) * C;
      combine<T, 6>(e, kB[row], in, C);
      T* dst = dx + (y * p.W + x) * C;
      for (int64_t k = 0; k < C; ++k) dst[k] += e[k];
    }
  }
}

CNX_MULTIVERSION void input_transform_tile_f32(const float* a, float* b, int64_t i, int64_t j,
                                               int64_t t, Plane p, int64_t c, float* s,
                                               const float* z) {
  input_transform_tile<float>(a, b, i, j, t, p, c, s, z);
}
CNX_MULTIVERSION void output_transform_tile_f32(const float* a, float* b, int64_t i, int64_t j,
                                                int64_t t, Plane p, int64_t c, float* s,
                                                const float*) {
  output_transform_tile<float>(a, b, i, j, t, p, c, s);
}
CNX_MULTIVERSION void output_adjoint_tile_f32(const float* a, float* b, int64_t i, int64_t j,
                                              int64_t t, Plane p, int64_t c, float* s,
                                              const float* z) {
  output_adjoint_tile<float>(a, b, i, j, t, p, c, s, z);
}
CNX_MULTIVERSION void input_adjoint_tile_f32(const float* a, float* b, int64_t i, int64_t j,
                                             int64_t t, Plane p, int64_t c, float* s,
                                             const float*) {
  input_adjoint_tile<float>(a, b, i, j, t, p, c, s);
}

void tile_kernel(const float* a, float* b, int64_t i, int64_t j, int64_t t, Plane p, int64_t c,
                 float* s, const float* z, int which) {
  switch (which) {
    case kInput: input_transform_tile_f32(a, b, i, j, t, p, c, s, z); break;
    case kOutput: output_transform_tile_f32(a, b, i, j, t, p, c, s, z); break;
    case kOutputAdjoint: output_adjoint_tile_f32(a, b, i, j, t, p, c, s, z); break;
    default: input_adjoint_tile_f32(a, b, i, j, t, p, c, s, z); break;
  }
}
void tile_kernel(const double* a, double* b, int64_t i, int64_t j, int64_t t, Plane p, int64_t c,
                 double* s, const double* z, int which) {
  switch (which) {
    case kInput: input_transform_tile<double>(a, b, i, j, t, p, c, s, z); break;
    case kOutput: output_transform_tile<double>(a, b, i, j, t, p, c, s); break;
    case kOutputAdjoint: output_adjoint_tile<double>(a, b, i, j, t, p, c, s, z); break;
    default: input_adjoint_tile<double>(a, b, i, j, t, p, c, s); break;
  }
}

// Runs one transform over every tile, channels-last. `image` is [N, H, W, channels] contiguous,
// `tiles` [36, N*T, channels] contiguous; directions as in for_each_plane. The input adjoint
// accumulates into overlapping windows, so it runs image by image; the others tile by tile.
void for_each_tile(const at::Tensor& image, const at::Tensor& tiles, Which which) {
  const int64_t N = image.size(0), H = image.size(1), W = image.size(2), C = image.size(3);
  const int64_t th = (H + 3) / 4, tw = (W + 3) / 4, T = th * tw;
  const Plane p{H, W, th, tw, tiles.stride(0), 0};
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "winograd_tile", [&] {
    scalar_t* img = image.data_ptr<scalar_t>();
    scalar_t* til = tiles.data_ptr<scalar_t>();
    const bool per_image = which == kInputAdjoint;
    at::parallel_for(0, per_image ? N : N * T, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(43 * C, scalar_t(0));
      const scalar_t* zero = scratch.data() + 42 * C;  // never written
      for (int64_t k = begin; k < end; ++k) {
        const int64_t t0 = per_image ? k * T : k, t1 = per_image ? (k + 1) * T : k + 1;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n = t / T, i = (t % T) / tw, j = t % tw;
          scalar_t* im = img + n * H * W * C;
          if (which == kInput || which == kOutputAdjoint) {
            tile_kernel(im, til, i, j, t, p, C, scratch.data(), zero, which);
          } else {
            tile_kernel(til, im, i, j, t, p, C, scratch.data(), zero, which);
          }
        }
      }
    });
  });
}

// Planes of at most this many pixels take the channels-last path.
constexpr int64_t kSmallPlane = 32 * 32;

// Output channels (forward) or input channels (input gradient) per GEMM chunk: the chunk's
// [36, chunk, N*T] product is transformed right after the GEMM, while still in cache, instead of
// materializing the whole product (and paying its page faults) first.
constexpr int64_t kChunk = 64;

struct WinogradConvFn : public torch::autograd::Function<WinogradConvFn> {
  // x [N, C, H, W]; u [36, K, C] (the transformed weight). Returns [N, K, H, W].
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& u) {
    const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
    const int64_t K = u.size(1), NT = N * ((H + 3) / 4) * ((W + 3) / 4);
    const bool small = H * W <= kSmallPlane;
    ctx->saved_data["shape"] = std::vector<int64_t>{N, C, H, W};
    ctx->saved_data["small"] = small;
    if (small) {
      const at::Tensor xl = x_in.permute({0, 2, 3, 1}).contiguous();
      at::Tensor v = at::empty({36, NT, C}, x_in.options());
      for_each_tile(xl, v, kInput);
      const at::Tensor m = at::bmm(v, u.transpose(1, 2));  // [36, NT, K]
      at::Tensor yl = at::empty({N, H, W, K}, x_in.options());
      for_each_tile(yl, m, kOutput);
      ctx->save_for_backward({v, u});
      return yl.permute({0, 3, 1, 2}).contiguous();
    }
    const at::Tensor x = x_in.contiguous();
    at::Tensor v = at::empty({36, C, NT}, x.options());
    for_each_plane(x, v, kInput);
    at::Tensor y = at::empty({N, K, H, W}, x.options());
    at::Tensor m = at::empty({36, std::min(K, kChunk), NT}, x.options());
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
      const int64_t kc = std::min(kChunk, K - k0);
      at::Tensor mc = m.narrow(1, 0, kc);
      at::bmm_out(mc, u.narrow(1, k0, kc), v);
      for_each_plane(y.narrow(1, k0, kc), mc, kOutput);
    }
    ctx->save_for_backward({v, u});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &v = saved[0], &u = saved[1];
    const auto shape = ctx->saved_data["shape"].toIntVector();
    const int64_t N = shape[0], C = shape[1], H = shape[2], W = shape[3], K = u.size(1);
    at::Tensor dx, du;
    if (ctx->saved_data["small"].toBool()) {
      const at::Tensor dyl = grads[0].permute({0, 2, 3, 1}).contiguous();
      at::Tensor dm = at::empty({36, v.size(1), K}, dyl.options());  // [36, NT, K]
      for_each_tile(dyl, dm, kOutputAdjoint);
      if (ctx->needs_input_grad(0)) {
        const at::Tensor dv = at::bmm(dm, u);  // [36, NT, C]
        at::Tensor dxl = at::zeros({N, H, W, C}, dyl.options());
        for_each_tile(dxl, dv, kInputAdjoint);
        dx = dxl.permute({0, 3, 1, 2}).contiguous();
      }
      if (ctx->needs_input_grad(1)) du = at::bmm(dm.transpose(1, 2), v);  // [36, K, C]
      return {dx, du};
    }
    const at::Tensor dy = grads[0].contiguous();
    at::Tensor dm = at::empty({36, K, v.size(2)}, dy.options());
    for_each_plane(dy, dm, kOutputAdjoint);
    if (ctx->needs_input_grad(0)) {
      dx = at::zeros(shape, dy.options());
      const at::Tensor ut = u.transpose(1, 2);
      at::Tensor dv = at::empty({36, std::min(C, kChunk), v.size(2)}, dy.options());
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int64_t cc = std::min(kChunk, C - c0);
        at::Tensor dvc = dv.narrow(1, 0, cc);
        at::bmm_out(dvc, ut.narrow(1, c0, cc), dm);
        for_each_plane(dx.narrow(1, c0, cc), dvc, kInputAdjoint);
      }
    }
    if (ctx->needs_input_grad(1)) du = at::bmm(dm, v.transpose(1, 2));
    return {dx, du};
  }
};

}  // namespace

extern "C" {

char* cnx_winograd_conv3x3(void* input, void* weight, void** out) {
  *out = nullptr;
  return cnx::guarded("winograd_conv3x3", [&] {
    const at::Tensor& x = cnx::as_tensor(input);
    const at::Tensor& w = cnx::as_tensor(weight);
    TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "CPU tensors only");
    // Under CPU autocast the convolution's precision is autocast's to choose (bf16): leave the
    // layer to libtorch's convolution rather than compute it in float behind autocast's back.
    TORCH_CHECK(!at::autocast::is_autocast_enabled(at::kCPU), "CPU autocast is on");
    TORCH_CHECK(x.scalar_type() == w.scalar_type() &&
                    (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
                "float or double input and weight of one dtype, got ", x.scalar_type(), " and ",
                w.scalar_type());
    TORCH_CHECK(x.dim() == 4 && w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 &&
                    w.size(1) == x.size(1),
                "input [N, C, H, W] and weight [K, C, 3, 3], got ", x.sizes(), " and ",
                w.sizes());
    // U = G g G^T by ordinary (autograd-recorded) ops: the weight gradient flows back through
    // it from the Function's gradient with respect to U. As one GEMM: every (k, c) filter's
    // nine taps times the 9 x 36 matrix (G ⊗ G)^T.
    at::Tensor gg = at::empty({36, 9}, at::TensorOptions().dtype(at::kDouble));
    auto acc = gg.accessor<double, 2>();
    for (int a = 0; a < 6; ++a)
      for (int b = 0; b < 6; ++b)
        for (int p = 0; p < 3; ++p)
          for (int q = 0; q < 3; ++q) acc[a * 6 + b][p * 3 + q] = kG[a][p] * kG[b][q];
    gg = gg.to(w.scalar_type());
    const int64_t K = w.size(0), C = w.size(1);
    at::Tensor u = at::mm(w.reshape({K * C, 9}), gg.t()).reshape({K, C, 36}).permute({2, 0, 1});
    *out = new at::Tensor(WinogradConvFn::apply(x, u.contiguous()));
  });
}

}  // extern "C"
