// CPU backend of frmap.kernels: local entropy with an incremental sliding histogram, and the
// response image / response score of METHOD step 4-6.
//
// Local entropy of a window with population n and bin counts c_v:
//     S = -sum_v (c_v / n) log2(c_v / n) = (n log2 n - sum_v c_v log2 c_v) / n.
// A row of windows is walked left to right. Moving one pixel right, only the footprint's edge
// pixels change: for every pixel that enters, c_v -> c_v + 1, and for every pixel that leaves,
// c_v -> c_v - 1; each change moves sum_v c_v log2 c_v by a table value D[c] = T[c+1] - T[c].
// The cost per pixel therefore grows with the footprint's height, not with its area or the
// number of bins.
//
// T[c] = c log2 c is kept in 64-bit fixed point (scaled by 2^k), so the running sum is an exact
// integer: no drift along a row, and a window holding one value gives exactly 0 bits.
//
// Borders and masks: each image is copied once into a padded index image in which pixels outside
// the image or masked out carry an extra bin PAD. That bin is counted like any other but left out
// of the population and of the sum, so the inner loop has no branch (the window "shrinks").

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "threads.h"

namespace nb = nanobind;

namespace {

using Images = nb::ndarray<nb::ndim<3>, nb::c_contig, nb::device::cpu>;
using Mask = nb::ndarray<const uint8_t, nb::ndim<3>, nb::c_contig, nb::device::cpu>;
using Footprint = nb::ndarray<const uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using Scores = nb::ndarray<double, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Responses = nb::ndarray<nb::ndim<4>, nb::c_contig, nb::device::cpu>;
using Gray = nb::ndarray<uint8_t, nb::ndim<3>, nb::c_contig, nb::device::cpu>;

// Offsets of the footprint relative to its centre (h // 2, w // 2), as flat offsets into the
// padded image: the whole window, and per run of set elements in a footprint row the pixel that
// enters and the pixel that leaves on a step right.
struct Window {
    int64_t area = 0;
    int top = 0, bottom = 0, left = 0, right = 0;  // padding around the image
    int64_t pw = 0;                                // padded row length
    std::vector<int64_t> all;
    std::vector<int64_t> enter, leave;  // enter[k], leave[k]: the two ends of run k

    Window(const uint8_t* fp, int h, int w, int64_t width) {
        const int cr = h / 2, cc = w / 2;
        top = cr;
        bottom = h - 1 - cr;
        left = cc + 1;  // one more column: the pixel that leaves on the first step
        right = w - 1 - cc;
        pw = width + left + right;
        auto on = [&](int i, int j) { return j >= 0 && j < w && fp[i * w + j] != 0; };
        for (int i = 0; i < h; ++i) {
            for (int j = -1; j < w; ++j) {
                const int64_t off = int64_t(i - cr) * pw + (j - cc);
                if (on(i, j)) {
                    all.push_back(off);
                    ++area;
                    if (!on(i, j + 1)) enter.push_back(off);
                }
                if (on(i, j + 1) && !on(i, j)) leave.push_back(off);
            }
        }
    }
};

// Fixed-point tables for windows of up to `area` pixels: T[c] = c log2 c, D[c] = T[c+1] - T[c].
struct Tables {
    std::vector<int64_t> T, D;
    std::vector<double> inv;  // inv[n] = 1 / (n * 2^k)

    explicit Tables(int64_t area) : T(area + 2), D(area + 1), inv(area + 1) {
        const double top = std::max(1.0, double(area + 1) * std::log2(double(area + 1)));
        const int k = std::min(48, 61 - int(std::ceil(std::log2(top))));
        const double scale = std::ldexp(1.0, k);
        for (int64_t c = 0; c <= area + 1; ++c)
            T[c] = c < 2 ? 0 : std::llround(double(c) * std::log2(double(c)) * scale);
        for (int64_t c = 0; c <= area; ++c) D[c] = T[c + 1] - T[c];
        for (int64_t n = 1; n <= area; ++n) inv[n] = 1.0 / (double(n) * scale);
    }
};

// Copy image rows [r0, r1) and the rows the window reaches around them into `out`, a band of the
// padded image: outside the image and masked out -> pad.
template <typename Idx, typename In>
void pad_band(const In* img, const uint8_t* mask, int64_t h, int64_t w, int64_t r0, int64_t r1,
              const Window& win, Idx pad, Idx* out) {
    const int64_t rows = r1 - r0 + win.top + win.bottom;
    std::fill(out, out + rows * win.pw, pad);
    for (int64_t pr = 0; pr < rows; ++pr) {
        const int64_t y = r0 - win.top + pr;
        if (y < 0 || y >= h) continue;
        Idx* row = out + pr * win.pw + win.left;
        const In* src = img + y * w;
        const uint8_t* m = mask ? mask + y * w : nullptr;
        for (int64_t c = 0; c < w; ++c) row[c] = (m && !m[c]) ? pad : Idx(src[c]);
    }
}

// Walk one row of windows; sink(c, bits) receives each pixel's entropy.
template <typename Idx, typename Sink>
void entropy_row(const Idx* center, int64_t w, const Window& win, const Tables& tab, Idx pad,
                 int32_t* hist, Sink&& sink) {
    int64_t sum = 0;  // sum over all bins (PAD included) of T[count]
    for (int64_t off : win.all) sum += tab.D[hist[center[off]]++];
    for (int64_t c = 0;; ++c) {
        const int32_t outside = hist[pad];
        const int64_t n = win.area - outside;
        if (n > 0) {
            const int64_t num = tab.T[n] - (sum - tab.T[outside]);
            sink(c, double(num) * tab.inv[n]);
        } else {
            sink(c, 0.0);
        }
        if (c + 1 == w) break;
        const Idx* p = center + c + 1;
        for (size_t k = 0; k < win.enter.size(); ++k) {
            sum += tab.D[hist[p[win.enter[k]]]++];
            sum -= tab.D[--hist[p[win.leave[k]]]];
        }
    }
    const Idx* last = center + w - 1;
    for (int64_t off : win.all) --hist[last[off]];  // leave the histogram empty for the next row
}

// Runs `per_row(image, row, centre pointer, histogram)` for every row of every image. The work is
// split into bands of rows, each padded into a thread-local buffer and handed out dynamically,
// so a thread slowed by other load does not hold the others up.
template <typename Idx, typename In, typename PerRow>
void for_each_row(const In* images, const uint8_t* mask, int64_t n, int64_t h, int64_t w,
                  const Window& win, int64_t nbins, int threads, PerRow&& per_row) {
    constexpr int64_t kBand = 32;
    const Idx pad = Idx(nbins);
    const int64_t bands = (h + kBand - 1) / kBand;
#pragma omp parallel num_threads(resolve_threads(threads, n * h * w))
    {
        std::vector<Idx> buf(size_t((kBand + win.top + win.bottom) * win.pw));
        std::vector<int32_t> hist(size_t(nbins + 1), 0);
#pragma omp for schedule(dynamic)
        for (int64_t t = 0; t < n * bands; ++t) {
            const int64_t i = t / bands, r0 = (t % bands) * kBand, r1 = std::min(h, r0 + kBand);
            pad_band(images + i * h * w, mask ? mask + i * h * w : nullptr, h, w, r0, r1, win,
                     pad, buf.data());
            for (int64_t r = r0; r < r1; ++r)
                per_row(i, r, buf.data() + (r - r0 + win.top) * win.pw + win.left, hist.data());
        }
    }
}

template <typename In, typename PerRowFactory>
void dispatch_index(const In* images, const uint8_t* mask, int64_t n, int64_t h, int64_t w,
                    const Window& win, int threads, PerRowFactory&& make) {
    int64_t nbins = 256;
    if constexpr (sizeof(In) == 2) {
        In top = 0;
        for (int64_t k = 0; k < n * h * w; ++k) top = std::max(top, images[k]);
        nbins = std::max<int64_t>(3, top) + 1;  // scikit-image's bin count for uint16
    }
    if (nbins < 65535)
        for_each_row<uint16_t>(images, mask, n, h, w, win, nbins, threads, make(uint16_t(nbins)));
    else
        for_each_row<uint32_t>(images, mask, n, h, w, win, nbins, threads, make(uint32_t(nbins)));
}

// A validated batch of [n, h, w] uint8 or uint16 images, an optional mask, and the tables.
struct Problem {
    const void* data;
    nb::dlpack::dtype dtype;
    int64_t n, h, w;
    const uint8_t* mask;
    Window win;
    Tables tab;

    Problem(const void* data, nb::dlpack::dtype dtype, int64_t n, int64_t h, int64_t w,
            const uint8_t* mask, const Footprint& fp)
        : data(data), dtype(dtype), n(n), h(h), w(w), mask(mask),
          win(fp.data(), int(fp.shape(0)), int(fp.shape(1)), w), tab(win.area) {
        if (dtype != nb::dtype<uint8_t>() && dtype != nb::dtype<uint16_t>())
            throw std::invalid_argument("images must be uint8 or uint16");
        if (win.area == 0) throw std::invalid_argument("footprint selects no pixel");
    }

    // Run per_row(image, row, centre pointer, histogram) over every row, in parallel.
    template <typename PerRowFactory>
    void run(int threads, PerRowFactory&& make) const {
        if (dtype == nb::dtype<uint8_t>())
            dispatch_index(static_cast<const uint8_t*>(data), mask, n, h, w, win, threads, make);
        else
            dispatch_index(static_cast<const uint16_t*>(data), mask, n, h, w, win, threads, make);
    }
};

Problem make_problem(const Images& images, const Footprint& fp, const nb::object& mask_obj) {
    const int64_t n = images.shape(0), h = images.shape(1), w = images.shape(2);
    const uint8_t* mask = nullptr;
    if (!mask_obj.is_none()) {
        Mask m = nb::cast<Mask>(mask_obj);
        if (m.shape(0) != size_t(n) || m.shape(1) != size_t(h) || m.shape(2) != size_t(w))
            throw std::invalid_argument("mask shape differs from the images' shape");
        mask = m.data();
    }
    return Problem(images.data(), images.dtype(), n, h, w, mask, fp);
}

template <typename Out>
void local_entropy_impl(const Problem& pb, Out* out, int threads) {
    nb::gil_scoped_release release;
    pb.run(threads, [&](auto pad) {
        return [&, pad](int64_t i, int64_t r, const auto* center, int32_t* hist) {
            Out* row = out + (i * pb.h + r) * pb.w;
            entropy_row(center, pb.w, pb.win, pb.tab, pad, hist,
                        [row](int64_t c, double bits) { row[c] = Out(bits); });
        };
    });
}

void local_entropy(const Images& images, const Footprint& fp, const nb::object& mask,
                   Images out, int threads) {
    if (out.shape(0) != images.shape(0) || out.shape(1) != images.shape(1) ||
        out.shape(2) != images.shape(2))
        throw std::invalid_argument("out shape differs from the images' shape");
    const Problem pb = make_problem(images, fp, mask);
    if (out.dtype() == nb::dtype<double>())
        local_entropy_impl(pb, static_cast<double*>(out.data()), threads);
    else if (out.dtype() == nb::dtype<float>())
        local_entropy_impl(pb, static_cast<float*>(out.data()), threads);
    else
        throw std::invalid_argument("out must be float32 or float64");
}

// Mean of each image's entropy map: per-row sums, then added in row order (deterministic for
// any thread count). Called without the GIL.
void mean_entropy_into(const Problem& pb, double* scores, int threads) {
    std::vector<double> row_sums(size_t(pb.n * pb.h));
    pb.run(threads, [&](auto pad) {
        return [&, pad](int64_t i, int64_t r, const auto* center, int32_t* hist) {
            double s = 0.0;
            entropy_row(center, pb.w, pb.win, pb.tab, pad, hist,
                        [&s](int64_t, double bits) { s += bits; });
            row_sums[size_t(i * pb.h + r)] = s;
        };
    });
    for (int64_t i = 0; i < pb.n; ++i) {
        double s = 0.0;
        for (int64_t r = 0; r < pb.h; ++r) s += row_sums[size_t(i * pb.h + r)];
        scores[i] = s / double(pb.h * pb.w);
    }
}

void mean_local_entropy(const Images& images, const Footprint& fp, const nb::object& mask,
                        Scores out, int threads) {
    if (out.shape(0) != images.shape(0))
        throw std::invalid_argument("out length differs from the number of images");
    const Problem pb = make_problem(images, fp, mask);
    nb::gil_scoped_release release;
    mean_entropy_into(pb, out.data(), threads);
}

// METHOD step 4 for one image of `count` = C*H*W values: standardise with the mean and the
// population std, (r - mean) / (std + 1e-5) * 0.1 + 0.5, clip to [0, 1], x255, truncate.
// Three channels become gray as PIL's convert("L"): (19595 R + 38470 G + 7471 B + 2^15) >> 16.
template <typename F>
void response_image_one(const F* r, int64_t c, int64_t hw, uint8_t* gray) {
    const int64_t count = c * hw;
    double sum = 0.0;
    for (int64_t k = 0; k < count; ++k) sum += double(r[k]);
    const double mean = sum / double(count);
    double sq = 0.0;
    for (int64_t k = 0; k < count; ++k) {
        const double d = double(r[k]) - mean;
        sq += d * d;
    }
    const double denom = std::sqrt(sq / double(count)) + 1e-5;
    auto level = [&](F v) -> uint32_t {
        const double x = std::clamp((double(v) - mean) / denom * 0.1 + 0.5, 0.0, 1.0);
        return uint32_t(x * 255);
    };
    for (int64_t p = 0; p < hw; ++p) {
        if (c == 1) {
            gray[p] = uint8_t(level(r[p]));
        } else {
            const uint32_t l = 19595u * level(r[p]) + 38470u * level(r[hw + p]) +
                               7471u * level(r[2 * hw + p]) + 0x8000u;
            gray[p] = uint8_t(l >> 16);
        }
    }
}

// Called without the GIL.
void response_image_into(const Responses& responses, uint8_t* gray, int threads) {
    const int64_t n = responses.shape(0), c = responses.shape(1);
    const int64_t hw = int64_t(responses.shape(2)) * int64_t(responses.shape(3));
    if (c != 1 && c != 3) throw std::invalid_argument("responses must have 1 or 3 channels");
    auto run = [&](const auto* r) {
#pragma omp parallel for schedule(dynamic) num_threads(resolve_threads(threads, n * c * hw))
        for (int64_t i = 0; i < n; ++i) response_image_one(r + i * c * hw, c, hw, gray + i * hw);
    };
    if (responses.dtype() == nb::dtype<float>())
        run(static_cast<const float*>(responses.data()));
    else if (responses.dtype() == nb::dtype<double>())
        run(static_cast<const double*>(responses.data()));
    else
        throw std::invalid_argument("responses must be float32 or float64");
}

void response_image(const Responses& responses, Gray out, int threads) {
    if (out.shape(0) != responses.shape(0) || out.shape(1) != responses.shape(2) ||
        out.shape(2) != responses.shape(3))
        throw std::invalid_argument("out must have shape [N, H, W] of the responses");
    nb::gil_scoped_release release;
    response_image_into(responses, out.data(), threads);
}

// The whole score in one call: response images into a small uint8 buffer, then mean entropy.
void response_score(const Responses& responses, const Footprint& fp, Scores out, int threads) {
    const int64_t n = responses.shape(0), h = responses.shape(2), w = responses.shape(3);
    if (out.shape(0) != size_t(n)) throw std::invalid_argument("out length differs from N");
    std::vector<uint8_t> gray(size_t(n * h * w));
    const Problem pb(gray.data(), nb::dtype<uint8_t>(), n, h, w, nullptr, fp);
    nb::gil_scoped_release release;
    response_image_into(responses, gray.data(), threads);
    mean_entropy_into(pb, out.data(), threads);
}

}  // namespace

void register_entropy(nb::module_& m) {
    m.def("local_entropy", &local_entropy, nb::arg("images"), nb::arg("footprint"),
          nb::arg("mask").none(), nb::arg("out"), nb::arg("threads"),
          "Local entropy (bits) of [N, H, W] uint8/uint16 images into out [N, H, W] float.");
    m.def("mean_local_entropy", &mean_local_entropy, nb::arg("images"), nb::arg("footprint"),
          nb::arg("mask").none(), nb::arg("out"), nb::arg("threads"),
          "Mean local entropy of each [N, H, W] image into out [N] float64.");
    m.def("response_image", &response_image, nb::arg("responses"), nb::arg("out"),
          nb::arg("threads"), "[N, C, H, W] float responses -> out [N, H, W] uint8 images.");
    m.def("response_score", &response_score, nb::arg("responses"), nb::arg("footprint"),
          nb::arg("out"), nb::arg("threads"),
          "[N, C, H, W] float responses -> out [N] float64 mean local entropy.");
}
