// Non-local means, scikit-image's fast mode (`denoise_nl_means(..., fast_mode=True)`, 2-D,
// sigma 0) on a batch of images.
//
// The same arithmetic, in the same order, as scikit-image's `_fast_nl_means_denoising_2d`
// (Darbon et al. 2008, Froment 2014): for every shift t = (t_row, t_col), t_row in [-d, d],
// t_col in [0, d], the integral image of the squared difference between the padded image and
// its shift gives each patch's distance in O(1),
//     D = max(I[r+o, c+o] + I[r-o, c-o] - I[r-o, c+o] - I[r+o, c-o], 0) / (C h^2 s^2),
// and a pair of patches closer than 5 adds w = alpha * fast_exp(-D) (alpha = 1/2 for t_col = 0,
// whose pairs are met twice) to the weights of both pixels and w times the other pixel to each
// result; the result is then divided by its weight. fast_exp is Schraudolph's approximation,
// as scikit-image's `_shared/fast_exp.h` computes it.
//
// Small images are vectorised across images: a group of as many images as a SIMD register
// holds doubles (8 with AVX-512, 4 with AVX2, else 2; fewer where threads would idle) is
// interleaved pixel by pixel, and each image goes through the same loops in its own lane. A
// lane computes exactly what one image's loops compute (a pair farther than 5 adds an exact
// zero where another lane's pair is closer; the file is compiled without fusing products into
// sums), so the results are scikit-image's to the last bit. Large images, whose groups would
// not stay in cache, run one by one. Groups run one per OpenMP thread.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "threads.h"

namespace nb = nanobind;

namespace {

using Padded = nb::ndarray<const double, nb::ndim<4>, nb::c_contig, nb::device::cpu>;
using Output = nb::ndarray<double, nb::ndim<4>, nb::c_contig, nb::device::cpu>;

// Lanes of doubles (L = 2, 4 or 8) and the integers of the same lane count; one image alone
// (L = 1) in scalars.
template <int L>
struct Lanes {
    typedef double D __attribute__((vector_size(8 * L)));
    typedef uint64_t Bits __attribute__((vector_size(8 * L)));
    typedef int32_t Int __attribute__((vector_size(4 * L)));
    typedef uint32_t Word __attribute__((vector_size(4 * L)));
};

template <>
struct Lanes<1> {
    typedef double D;
    typedef uint64_t Bits;
    typedef int32_t Int;
    typedef uint32_t Word;
};

template <int L>
[[gnu::always_inline]] inline typename Lanes<L>::D load(const double* p) {
    typename Lanes<L>::D v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

template <int L>
[[gnu::always_inline]] inline void store(double* p, typename Lanes<L>::D v) {
    std::memcpy(p, &v, sizeof v);
}

// exp(y) by Schraudolph's construction, in each lane: the high 32 bits of a double set to
// (int32)(2^20 / ln 2 * y) + 1023 * 2^20 - 60801, the low 32 bits to 0.
template <int L>
[[gnu::always_inline]] inline typename Lanes<L>::D fast_exp(typename Lanes<L>::D y) {
    using T = Lanes<L>;
    typename T::Bits bits;
    if constexpr (L == 1) {
        const int32_t high = static_cast<int32_t>(1512775.3951951856938 * y) + 1072632447;
        bits = static_cast<uint64_t>(static_cast<uint32_t>(high)) << 32;
    } else {
        const typename T::Int high = __builtin_convertvector(1512775.3951951856938 * y,
                                                             typename T::Int) + 1072632447;
        bits = __builtin_convertvector((typename T::Word)high, typename T::Bits) << 32;
    }
    typename T::D v;
    std::memcpy(&v, &bits, sizeof v);  // the same bits
    return v;
}

// One group of L interleaved padded images [n_row, n_col, C, L] -> the denoised group in
// `result` (only the interior is meaningful). `weights` and `integral` hold n_row * n_col * L.
template <int L>
[[gnu::always_inline]] inline void denoise_group(
        const double* padded, double* result, int64_t n_row, int64_t n_col, int64_t n_ch,
        int64_t s, int64_t d, double h, double* weights, double* integral) {
    using V = typename Lanes<L>::D;
    using Bits = typename Lanes<L>::Bits;
    const int64_t offset = s / 2;
    const int64_t pad = offset + d + 1;
    const double h2s2 = static_cast<double>(n_ch) * h * h * static_cast<double>(s * s);
    std::fill(weights, weights + n_row * n_col * L, 0.0);
    std::fill(integral, integral + n_row * n_col * L, 0.0);
    std::fill(result, result + n_row * n_col * n_ch * L, 0.0);
    auto px = [&](int64_t r, int64_t c, int64_t ch) {
        return padded + ((r * n_col + c) * n_ch + ch) * L;
    };
    auto I = [&](int64_t r, int64_t c) { return integral + (r * n_col + c) * L; };
    for (int64_t t_row = -d; t_row <= d; ++t_row) {
        const int64_t row_start = std::max(offset, offset - t_row);
        const int64_t row_end = std::min(n_row - offset, n_row - offset - t_row);
        for (int64_t t_col = 0; t_col <= d; ++t_col) {
            const double alpha = t_col == 0 ? 0.5 : 1.0;
            // the integral image of the squared difference (rows and columns from 1; what
            // lies outside keeps the previous shift's values, which cancel in D)
            for (int64_t row = std::max<int64_t>(1, -t_row);
                 row < std::min(n_row, n_row - t_row); ++row) {
                for (int64_t col = 1; col < n_col - t_col; ++col) {
                    V distance = V{};
                    for (int64_t ch = 0; ch < n_ch; ++ch) {
                        const V t = load<L>(px(row, col, ch)) -
                                    load<L>(px(row + t_row, col + t_col, ch));
                        distance += t * t;
                    }
                    store<L>(I(row, col), distance + load<L>(I(row - 1, col)) +
                                              load<L>(I(row, col - 1)) -
                                              load<L>(I(row - 1, col - 1)));
                }
            }
            for (int64_t row = row_start; row < row_end; ++row) {
                const int64_t row_shift = row + t_row;
                for (int64_t col = offset; col < n_col - offset - t_col; ++col) {
                    V distance = load<L>(I(row + offset, col + offset)) +
                                 load<L>(I(row - offset, col - offset)) -
                                 load<L>(I(row - offset, col + offset)) -
                                 load<L>(I(row + offset, col - offset));
                    distance = (distance < 0.0 ? 0.0 : distance) / h2s2;  // max(distance, 0)
                    // a pair farther than 5 adds nothing: one image skips it; in a group, its
                    // lane adds zeros (+0.0: the sums stay as they are), unless all lanes skip
                    Bits near{};
                    if constexpr (L == 1) {
                        if (distance > 5.0) continue;
                    } else {
                        near = (Bits)~(distance > 5.0);  // all ones or zeros
                        bool any = false;
                        for (int lane = 0; lane < L; ++lane) any |= near[lane] != 0;
                        if (!any) continue;
                    }
                    const V clipped = distance > 5.0 ? 5.0 : distance;  // an int32 in fast_exp
                    const V weight = alpha * fast_exp<L>(-clipped);
                    const int64_t col_shift = col + t_col;
                    auto add = [&](double* at, V v) {
                        if constexpr (L == 1)
                            store<L>(at, load<L>(at) + v);
                        else
                            store<L>(at, load<L>(at) + (V)((Bits)v & near));
                    };
                    add(weights + (row * n_col + col) * L, weight);
                    add(weights + (row_shift * n_col + col_shift) * L, weight);
                    for (int64_t ch = 0; ch < n_ch; ++ch) {
                        add(result + ((row * n_col + col) * n_ch + ch) * L,
                            weight * load<L>(px(row_shift, col_shift, ch)));
                        add(result + ((row_shift * n_col + col_shift) * n_ch + ch) * L,
                            weight * load<L>(px(row, col, ch)));
                    }
                }
            }
        }
    }
    for (int64_t row = pad; row < n_row - pad; ++row)
        for (int64_t col = pad; col < n_col - pad; ++col)
            for (int64_t ch = 0; ch < n_ch; ++ch) {
                double* at = result + ((row * n_col + col) * n_ch + ch) * L;
                store<L>(at, load<L>(at) / load<L>(weights + (row * n_col + col) * L));
            }
}

// One group's denoising, compiled for each instruction set (the group's loops are what the
// OpenMP threads run, so they carry the target themselves).
using Group = void (*)(const double*, double*, int64_t, int64_t, int64_t, int64_t, int64_t,
                       double, double*, double*);

#if defined(__x86_64__)
__attribute__((target("avx512f"))) void group_avx512(
        const double* padded, double* result, int64_t n_row, int64_t n_col, int64_t n_ch,
        int64_t s, int64_t d, double h, double* weights, double* integral) {
    denoise_group<8>(padded, result, n_row, n_col, n_ch, s, d, h, weights, integral);
}

__attribute__((target("avx2"))) void group_avx2(
        const double* padded, double* result, int64_t n_row, int64_t n_col, int64_t n_ch,
        int64_t s, int64_t d, double h, double* weights, double* integral) {
    denoise_group<4>(padded, result, n_row, n_col, n_ch, s, d, h, weights, integral);
}
#endif

template <int L>
void group_default(const double* padded, double* result, int64_t n_row, int64_t n_col,
                   int64_t n_ch, int64_t s, int64_t d, double h, double* weights,
                   double* integral) {
    denoise_group<L>(padded, result, n_row, n_col, n_ch, s, d, h, weights, integral);
}

// The images per group and its function: the widest group this CPU runs that still gives each
// of `threads` threads a group and whose buffers (`lane_bytes` an image) stay in a core's
// cache; one image alone otherwise (large images: the lanes would stream from memory).
std::pair<int64_t, Group> group_for(int64_t n, int threads, int64_t lane_bytes) {
    constexpr int64_t kCache = int64_t(1) << 20;
    auto fits = [&](int64_t lanes) {
        return lanes <= n && (n + lanes - 1) / lanes >= threads && lanes * lane_bytes <= kCache;
    };
#if defined(__x86_64__)
    if (fits(8) && __builtin_cpu_supports("avx512f")) return {8, group_avx512};
    if (fits(4) && __builtin_cpu_supports("avx2")) return {4, group_avx2};
#endif
    if (fits(2)) return {2, group_default<2>};
    return {1, group_default<1>};
}

// padded: [N, n_row, n_col, C] images reflect-padded by s // 2 + d + 1 (s odd); out: the same
// shape, the denoised images in its interior. Groups of L images, one group per thread; a last
// group short of images fills its lanes with copies of the last image.
void nl_means(Padded padded, Output out, int64_t s, int64_t d, double h, int threads) {
    const int64_t n = static_cast<int64_t>(padded.shape(0));
    const int64_t n_row = static_cast<int64_t>(padded.shape(1));
    const int64_t n_col = static_cast<int64_t>(padded.shape(2));
    const int64_t n_ch = static_cast<int64_t>(padded.shape(3));
    const double* in = padded.data();
    double* res = out.data();
    const int64_t pixels = n_row * n_col, size = pixels * n_ch;
    const int team = resolve_threads(threads, n * size * (2 * d + 1) * (d + 1));
    const auto [L, denoise] = group_for(n, team, (2 * size + 2 * pixels) * 8);
    const int64_t groups = (n + L - 1) / L;
    const int64_t pad = s / 2 + d + 1;
    nb::gil_scoped_release release;
#pragma omp parallel num_threads(team)
    {
        std::vector<double> group(size * L), result(size * L), weights(pixels * L),
            integral(pixels * L);
#pragma omp for schedule(dynamic)
        for (int64_t g = 0; g < groups; ++g) {
            for (int64_t lane = 0; lane < L; ++lane) {
                const double* image = in + std::min(g * L + lane, n - 1) * size;
                for (int64_t i = 0; i < size; ++i) group[i * L + lane] = image[i];
            }
            denoise(group.data(), result.data(), n_row, n_col, n_ch, s, d, h, weights.data(),
                    integral.data());
            for (int64_t lane = 0; lane < L && g * L + lane < n; ++lane) {
                double* image = res + (g * L + lane) * size;
                for (int64_t row = pad; row < n_row - pad; ++row)
                    for (int64_t i = (row * n_col + pad) * n_ch;
                         i < (row * n_col + n_col - pad) * n_ch; ++i)
                        image[i] = result[i * L + lane];
            }
        }
    }
}

}  // namespace

void register_nl_means(nb::module_& m) {
    m.def("nl_means", &nl_means, nb::arg("padded"), nb::arg("out"), nb::arg("s"), nb::arg("d"),
          nb::arg("h"), nb::arg("threads"),
          "scikit-image's fast non-local means (sigma 0) of reflect-padded [N, H, W, C] float64 "
          "images into `out`'s interior, small images in groups a SIMD register wide.");
}
