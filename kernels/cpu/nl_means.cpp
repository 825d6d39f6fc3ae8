// Non-local means, scikit-image's fast mode (`denoise_nl_means(..., fast_mode=True)`, 2-D,
// sigma 0) on a batch of images, one image per OpenMP thread.
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
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "threads.h"

namespace nb = nanobind;

namespace {

using Padded = nb::ndarray<const double, nb::ndim<4>, nb::c_contig, nb::device::cpu>;
using Output = nb::ndarray<double, nb::ndim<4>, nb::c_contig, nb::device::cpu>;

// exp(y) by Schraudolph's construction: the high 32 bits of a double set to
// (int32)(2^20 / ln 2 * y) + 1023 * 2^20 - 60801, the low 32 bits to 0.
inline double fast_exp(double y) {
    const int32_t high = static_cast<int32_t>(1512775.3951951856938 * y) + 1072632447;
    const uint64_t bits = static_cast<uint64_t>(static_cast<uint32_t>(high)) << 32;
    double d;
    std::memcpy(&d, &bits, sizeof d);
    return d;
}

// One padded image [n_row, n_col, C] -> the denoised padded image (only the interior is read).
void denoise_one(const double* padded, double* result, int64_t n_row, int64_t n_col,
                 int64_t n_ch, int64_t s, int64_t d, double h, std::vector<double>& weights,
                 std::vector<double>& integral) {
    const int64_t offset = s / 2;
    const int64_t pad = offset + d + 1;
    const double h2s2 = static_cast<double>(n_ch) * h * h * static_cast<double>(s * s);
    std::fill(weights.begin(), weights.end(), 0.0);
    std::fill(integral.begin(), integral.end(), 0.0);
    std::fill(result, result + n_row * n_col * n_ch, 0.0);
    auto px = [&](int64_t r, int64_t c, int64_t ch) { return padded[(r * n_col + c) * n_ch + ch]; };
    auto I = [&](int64_t r, int64_t c) -> double& { return integral[r * n_col + c]; };
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
                    double distance = 0.0;
                    for (int64_t ch = 0; ch < n_ch; ++ch) {
                        const double t = px(row, col, ch) - px(row + t_row, col + t_col, ch);
                        distance += t * t;
                    }
                    I(row, col) = distance + I(row - 1, col) + I(row, col - 1) -
                                  I(row - 1, col - 1);
                }
            }
            for (int64_t row = row_start; row < row_end; ++row) {
                const int64_t row_shift = row + t_row;
                for (int64_t col = offset; col < n_col - offset - t_col; ++col) {
                    double distance = I(row + offset, col + offset) +
                                      I(row - offset, col - offset) -
                                      I(row - offset, col + offset) -
                                      I(row + offset, col - offset);
                    distance = std::max(distance, 0.0) / h2s2;
                    if (distance > 5.0) continue;
                    const int64_t col_shift = col + t_col;
                    const double weight = alpha * fast_exp(-distance);
                    weights[row * n_col + col] += weight;
                    weights[row_shift * n_col + col_shift] += weight;
                    for (int64_t ch = 0; ch < n_ch; ++ch) {
                        result[(row * n_col + col) * n_ch + ch] +=
                            weight * px(row_shift, col_shift, ch);
                        result[(row_shift * n_col + col_shift) * n_ch + ch] +=
                            weight * px(row, col, ch);
                    }
                }
            }
        }
    }
    for (int64_t row = pad; row < n_row - pad; ++row)
        for (int64_t col = pad; col < n_col - pad; ++col)
            for (int64_t ch = 0; ch < n_ch; ++ch)
                result[(row * n_col + col) * n_ch + ch] /= weights[row * n_col + col];
}

// padded: [N, n_row, n_col, C] images reflect-padded by s // 2 + d + 1 (s odd); out: the same
// shape, the denoised images in its interior.
void nl_means(Padded padded, Output out, int64_t s, int64_t d, double h, int threads) {
    const int64_t n = static_cast<int64_t>(padded.shape(0));
    const int64_t n_row = static_cast<int64_t>(padded.shape(1));
    const int64_t n_col = static_cast<int64_t>(padded.shape(2));
    const int64_t n_ch = static_cast<int64_t>(padded.shape(3));
    const int64_t size = n_row * n_col * n_ch;
    const double* in = padded.data();
    double* res = out.data();
    nb::gil_scoped_release release;
#pragma omp parallel num_threads(resolve_threads(threads, n * size * (2 * d + 1) * (d + 1)))
    {
        std::vector<double> weights(n_row * n_col), integral(n_row * n_col);
#pragma omp for schedule(dynamic)
        for (int64_t i = 0; i < n; ++i)
            denoise_one(in + i * size, res + i * size, n_row, n_col, n_ch, s, d, h, weights,
                        integral);
    }
}

}  // namespace

void register_nl_means(nb::module_& m) {
    m.def("nl_means", &nl_means, nb::arg("padded"), nb::arg("out"), nb::arg("s"), nb::arg("d"),
          nb::arg("h"), nb::arg("threads"),
          "scikit-image's fast non-local means (sigma 0) of reflect-padded [N, H, W, C] float64 "
          "images into `out`'s interior, one image per thread.");
}
