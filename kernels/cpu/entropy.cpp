// CPU backend of frmap.kernels: local entropy with an incremental sliding histogram, and the
// response image / response score of METHOD step 4-6.
//
// Local entropy of a window with population n and bin counts c_v:
//     S = -sum_v (c_v / n) log2(c_v / n) = (n log2 n - sum_v c_v log2 c_v) / n.
// A row of windows is walked left to right. Moving one pixel right, only the footprint's edge
// pixels change: for every pixel that enters, c_v -> c_v + 1, and for every pixel that leaves,
// c_v -> c_v - 1; each change moves sum_v c_v log2 c_v by a table value D[c] = T[c+1] - T[c].
// The cost per pixel therefore grows with the footprint's cross-section (its rows, over all its
// planes), not with its area or volume or the number of bins. A 2-D footprint is a volume of
// one plane.
//
// Exact fixed point: T[c] = c * L[c], where L[c] is log2 c in fixed point with P = 58 fraction
// bits, built additively from its prime factors: L[2] = 2^P exactly, L[p] = round(log2 p * 2^P)
// (long double) for an odd prime p, L[ab] = L[a] + L[b]. T is an integer up to 2^94, kept as two
// int64 words (bits above and below 2^32) that are summed separately, so the running sums are
// exact integers: no drift along a row, and a window holding one value gives exactly 0. Because
// L is additive, the numerator N = n L[n] - sum_v c_v L[c_v] is exactly m 2^P whenever the true
// entropy is a rational m / n (the logs of distinct primes are independent over the rationals):
// windows of 2^k equally frequent values (c_v = c, n = 2^k c) give N = n k 2^P. The final
// conversion tests whether N is a multiple of 2^P; if so it returns m / n (one correctly rounded
// division: exact wherever the value is representable), otherwise N (rounded once to double)
// times 2^-P / n: within about an ulp of the true entropy (L's rounding adds at most 2^-58 bits
// per odd prime factor of a count: under 2^-55 for windows of fewer than 256 pixels).
//
// Borders and masks: each band of rows is copied into a padded index buffer in which pixels
// outside the image or masked out carry an extra bin PAD. That bin is counted like any other but
// left out of the population and of the sum, so the inner loop has no branch (the window
// "shrinks").

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

using Images = nb::ndarray<nb::c_contig, nb::device::cpu>;  // [N, H, W] or [N, D, H, W]
using Mask = nb::ndarray<const uint8_t, nb::c_contig, nb::device::cpu>;
using Footprint = nb::ndarray<const uint8_t, nb::c_contig, nb::device::cpu>;  // [h, w] / [d, h, w]
using Scores = nb::ndarray<double, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Responses = nb::ndarray<nb::ndim<4>, nb::c_contig, nb::device::cpu>;
using Gray = nb::ndarray<uint8_t, nb::ndim<3>, nb::c_contig, nb::device::cpu>;

constexpr int64_t kBand = 32;  // image rows per task

// Offsets of the footprint relative to its centre (d // 2, h // 2, w // 2), as flat offsets into
// a padded band buffer (planes of kBand + top + bottom rows of pw pixels): the whole window, and
// per run of set elements in a footprint row the pixel that enters and the pixel that leaves on
// a step right.
struct Window {
    int64_t area = 0;
    int front = 0, back = 0;  // planes before and after the centre
    int top = 0, bottom = 0, left = 0, right = 0;  // padding around a plane
    int64_t pw = 0, plane = 0;                     // padded row length and plane size
    std::vector<int64_t> all;
    std::vector<int64_t> enter, leave;  // enter[k], leave[k]: the two ends of run k

    Window(const uint8_t* fp, int d, int h, int w, int64_t width) {
        const int cz = d / 2, cr = h / 2, cc = w / 2;
        front = cz;
        back = d - 1 - cz;
        top = cr;
        bottom = h - 1 - cr;
        left = cc + 1;  // one more column: the pixel that leaves on the first step
        right = w - 1 - cc;
        pw = width + left + right;
        plane = (kBand + top + bottom) * pw;
        for (int z = 0; z < d; ++z) {
            const uint8_t* f = fp + int64_t(z) * h * w;
            auto on = [&](int i, int j) { return j >= 0 && j < w && f[i * w + j] != 0; };
            for (int i = 0; i < h; ++i) {
                for (int j = -1; j < w; ++j) {
                    const int64_t off = int64_t(z - cz) * plane + int64_t(i - cr) * pw + (j - cc);
                    if (on(i, j)) {
                        all.push_back(off);
                        ++area;
                        if (!on(i, j + 1)) enter.push_back(off);
                    }
                    if (on(i, j + 1) && !on(i, j)) leave.push_back(off);
                }
            }
        }
    }
};

// Exact fixed-point tables for windows of up to `area` pixels (see the top of the file):
// T[c] = c log2 c * 2^P as two words, D[c] = T[c+1] - T[c], and U[m] = T[area - m] + T[m] for
// a window with m pixels outside (n = area - m inside: its numerator is U[m] - sum over all
// bins). The two words travel as one two-lane vector, so a histogram step is one load and one
// add.
struct Tables {
    static constexpr int kP = 58;
    typedef int64_t Words __attribute__((vector_size(16)));  // {hi, lo}: hi * 2^32 + lo
    std::vector<Words> D, U;
    std::vector<double> inv;  // inv[n] = 2^-P / n

    explicit Tables(int64_t area)
        : D(size_t(area + 1)), U(size_t(area + 1)), inv(size_t(area + 1)) {
        if (area >= (int64_t(1) << 31)) throw std::invalid_argument("footprint too large");
        // L[c] = sum over the prime factors p of c of round(log2(p) * 2^P), exactly 2^P for
        // p = 2: additive, L[ab] = L[a] + L[b], so every integer relation between the logs holds.
        std::vector<uint64_t> L(size_t(area + 2), 0);
        for (int64_t c = 2; c <= area + 1; ++c) {
            int64_t p = 2;
            while (c % p != 0 && p * p <= c) ++p;
            if (c % p != 0) p = c;  // c is prime
            const uint64_t lp =
                p == 2 ? uint64_t(1) << kP
                       : uint64_t(llroundl(log2l((long double)p) * ldexpl(1.0L, kP)));
            L[size_t(c)] = L[size_t(c / p)] + lp;
        }
        std::vector<Words> T(size_t(area + 2), Words{0, 0});
        for (int64_t c = 1; c <= area + 1; ++c) {
            const unsigned __int128 t = (unsigned __int128)(uint64_t(c)) * L[size_t(c)];
            T[size_t(c)] = Words{int64_t(t >> 32), int64_t(uint64_t(t) & 0xffffffffu)};
        }
        for (int64_t c = 0; c <= area; ++c) {
            D[size_t(c)] = T[size_t(c + 1)] - T[size_t(c)];
            U[size_t(c)] = T[size_t(area - c)] + T[size_t(c)];
            inv[size_t(c)] = c ? 1.0 / (double(c) * std::ldexp(1.0, kP)) : 0.0;
        }
    }

    // Bits of a window of population n > 0 whose fixed-point numerator
    // n log2 n - sum_v c_v log2 c_v is `num`. When num is a multiple of 2^P, the entropy is a
    // rational m / n (m = num / 2^P), divided exactly: exact wherever it is representable
    // (2^k equally frequent values -> k). Otherwise one rounding to double and one product.
    double bits(Words num, int64_t n) const {
        constexpr uint64_t kLow = (uint64_t(1) << kP) - 1;
        if ((((uint64_t(num[0]) << 32) + uint64_t(num[1])) & kLow) == 0) {
            const int64_t m = (num[0] + (num[1] >> 32)) >> (kP - 32);
            return double(m) / double(n);
        }
        return (double(num[0]) * 4294967296.0 + double(num[1])) * inv[size_t(n)];
    }
};

// Copy image rows [r0, r1) of plane z and the rows and planes the window reaches around them
// into `out`, a band of the padded volume: outside the image and masked out -> pad.
template <typename Idx, typename In>
void pad_band(const In* img, const uint8_t* mask, int64_t d, int64_t h, int64_t w, int64_t z,
              int64_t r0, int64_t r1, const Window& win, Idx pad, Idx* out) {
    const int64_t rows = r1 - r0 + win.top + win.bottom;
    for (int64_t pz = 0; pz <= win.front + win.back; ++pz) {
        Idx* dst = out + pz * win.plane;
        std::fill(dst, dst + rows * win.pw, pad);
        const int64_t zz = z - win.front + pz;
        if (zz < 0 || zz >= d) continue;
        for (int64_t pr = 0; pr < rows; ++pr) {
            const int64_t y = r0 - win.top + pr;
            if (y < 0 || y >= h) continue;
            Idx* row = dst + pr * win.pw + win.left;
            const In* src = img + (zz * h + y) * w;
            const uint8_t* m = mask ? mask + (zz * h + y) * w : nullptr;
            for (int64_t c = 0; c < w; ++c) row[c] = (m && !m[c]) ? pad : Idx(src[c]);
        }
    }
}

// Walk one row of windows; sink(c, bits) receives each pixel's entropy.
template <typename Idx, typename Sink>
void entropy_row(const Idx* center, int64_t w, const Window& win, const Tables& tab, Idx pad,
                 int32_t* hist, Sink&& sink) {
    Tables::Words sum = {0, 0};  // sum over all bins (PAD included) of T[count]
    for (int64_t off : win.all) sum += tab.D[size_t(hist[center[off]]++)];
    for (int64_t c = 0;; ++c) {
        const int32_t outside = hist[pad];
        const int64_t n = win.area - outside;
        if (n > 0) {
            sink(c, tab.bits(tab.U[size_t(outside)] - sum, n));
        } else {
            sink(c, 0.0);
        }
        if (c + 1 == w) break;
        const Idx* p = center + c + 1;
        for (size_t k = 0; k < win.enter.size(); ++k) {
            sum += tab.D[size_t(hist[p[win.enter[k]]]++)];
            sum -= tab.D[size_t(--hist[p[win.leave[k]]])];
        }
    }
    const Idx* last = center + w - 1;
    for (int64_t off : win.all) --hist[last[off]];  // leave the histogram empty for the next row
}

// Runs `per_row(row, centre pointer, histogram)` for every image row (row = (i * d + z) * h + r
// in [N, D, H, W]). The work is split into bands of rows, each padded into a thread-local buffer
// and handed out dynamically, so a thread slowed by other load does not hold the others up.
template <typename Idx, typename In, typename PerRow>
void for_each_row(const In* images, const uint8_t* mask, int64_t n, int64_t d, int64_t h,
                  int64_t w, const Window& win, int64_t nbins, int threads, PerRow&& per_row) {
    const Idx pad = Idx(nbins);
    const int64_t bands = (h + kBand - 1) / kBand;
#pragma omp parallel num_threads(resolve_threads(threads, n * d * h * w))
    {
        std::vector<Idx> buf(size_t((win.front + win.back + 1) * win.plane));
        std::vector<int32_t> hist(size_t(nbins + 1), 0);
        const int64_t centre = win.front * win.plane + win.top * win.pw + win.left;
#pragma omp for schedule(dynamic)
        for (int64_t t = 0; t < n * d * bands; ++t) {
            const int64_t iz = t / bands, r0 = (t % bands) * kBand, r1 = std::min(h, r0 + kBand);
            const int64_t i = iz / d, z = iz % d;
            pad_band(images + i * d * h * w, mask ? mask + i * d * h * w : nullptr, d, h, w, z,
                     r0, r1, win, pad, buf.data());
            for (int64_t r = r0; r < r1; ++r)
                per_row(iz * h + r, buf.data() + centre + (r - r0) * win.pw, hist.data());
        }
    }
}

template <typename In, typename PerRowFactory>
void dispatch_index(const In* images, const uint8_t* mask, int64_t n, int64_t d, int64_t h,
                    int64_t w, const Window& win, int threads, PerRowFactory&& make) {
    int64_t nbins = 256;
    if constexpr (sizeof(In) == 2) {
        In top = 0;
        for (int64_t k = 0; k < n * d * h * w; ++k) top = std::max(top, images[k]);
        nbins = std::max<int64_t>(3, top) + 1;  // scikit-image's bin count for uint16
    }
    if (nbins < 65535)
        for_each_row<uint16_t>(images, mask, n, d, h, w, win, nbins, threads,
                               make(uint16_t(nbins)));
    else
        for_each_row<uint32_t>(images, mask, n, d, h, w, win, nbins, threads,
                               make(uint32_t(nbins)));
}

// A validated batch of [n, d, h, w] uint8 or uint16 volumes (d = 1 for images), an optional
// mask, and the tables.
struct Problem {
    const void* data;
    nb::dlpack::dtype dtype;
    int64_t n, d, h, w;
    const uint8_t* mask;
    Window win;
    Tables tab;

    Problem(const void* data, nb::dlpack::dtype dtype, int64_t n, int64_t d, int64_t h,
            int64_t w, const uint8_t* mask, const Footprint& fp)
        : data(data), dtype(dtype), n(n), d(d), h(h), w(w), mask(mask),
          win(fp.data(), fp.ndim() == 3 ? int(fp.shape(0)) : 1, int(fp.shape(fp.ndim() - 2)),
              int(fp.shape(fp.ndim() - 1)), w),
          tab(win.area) {
        if (dtype != nb::dtype<uint8_t>() && dtype != nb::dtype<uint16_t>())
            throw std::invalid_argument("images must be uint8 or uint16");
        if (win.area == 0) throw std::invalid_argument("footprint selects no pixel");
    }

    // Run per_row(row, centre pointer, histogram) over every row, in parallel.
    template <typename PerRowFactory>
    void run(int threads, PerRowFactory&& make) const {
        if (dtype == nb::dtype<uint8_t>())
            dispatch_index(static_cast<const uint8_t*>(data), mask, n, d, h, w, win, threads,
                           make);
        else
            dispatch_index(static_cast<const uint16_t*>(data), mask, n, d, h, w, win, threads,
                           make);
    }
};

// A footprint of 2 or 3 dims and images of one more ([N, H, W] or [N, D, H, W]).
Problem make_problem(const Images& images, const Footprint& fp, const nb::object& mask_obj) {
    if (fp.ndim() != 2 && fp.ndim() != 3) throw std::invalid_argument("footprint must be 2-D or 3-D");
    if (images.ndim() != fp.ndim() + 1)
        throw std::invalid_argument("images must have one dimension more than the footprint");
    const bool vol = images.ndim() == 4;
    const int64_t n = images.shape(0), d = vol ? images.shape(1) : 1;
    const int64_t h = images.shape(images.ndim() - 2), w = images.shape(images.ndim() - 1);
    const uint8_t* mask = nullptr;
    if (!mask_obj.is_none()) {
        Mask m = nb::cast<Mask>(mask_obj);
        bool same = m.ndim() == images.ndim();
        for (size_t k = 0; same && k < m.ndim(); ++k) same = m.shape(k) == images.shape(k);
        if (!same) throw std::invalid_argument("mask shape differs from the images' shape");
        mask = m.data();
    }
    return Problem(images.data(), images.dtype(), n, d, h, w, mask, fp);
}

template <typename Out>
void local_entropy_impl(const Problem& pb, Out* out, int threads) {
    nb::gil_scoped_release release;
    pb.run(threads, [&](auto pad) {
        return [&, pad](int64_t row, const auto* center, int32_t* hist) {
            Out* dst = out + row * pb.w;
            entropy_row(center, pb.w, pb.win, pb.tab, pad, hist,
                        [dst](int64_t c, double bits) { dst[c] = Out(bits); });
        };
    });
}

void local_entropy(const Images& images, const Footprint& fp, const nb::object& mask,
                   Images out, int threads) {
    bool same = out.ndim() == images.ndim();
    for (size_t k = 0; same && k < out.ndim(); ++k) same = out.shape(k) == images.shape(k);
    if (!same) throw std::invalid_argument("out shape differs from the images' shape");
    const Problem pb = make_problem(images, fp, mask);
    if (out.dtype() == nb::dtype<double>())
        local_entropy_impl(pb, static_cast<double*>(out.data()), threads);
    else if (out.dtype() == nb::dtype<float>())
        local_entropy_impl(pb, static_cast<float*>(out.data()), threads);
    else
        throw std::invalid_argument("out must be float32 or float64");
}

// Mean of each image's (or volume's) entropy map: per-row sums, then added in row order
// (deterministic for any thread count). Called without the GIL.
void mean_entropy_into(const Problem& pb, double* scores, int threads) {
    const int64_t rows = pb.d * pb.h;
    std::vector<double> row_sums(size_t(pb.n * rows));
    pb.run(threads, [&](auto pad) {
        return [&, pad](int64_t row, const auto* center, int32_t* hist) {
            double s = 0.0;
            entropy_row(center, pb.w, pb.win, pb.tab, pad, hist,
                        [&s](int64_t, double bits) { s += bits; });
            row_sums[size_t(row)] = s;
        };
    });
    for (int64_t i = 0; i < pb.n; ++i) {
        double s = 0.0;
        for (int64_t r = 0; r < rows; ++r) s += row_sums[size_t(i * rows + r)];
        scores[i] = s / double(rows * pb.w);
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
    if (fp.ndim() != 2) throw std::invalid_argument("footprint must be 2-D");
    std::vector<uint8_t> gray(size_t(n * h * w));
    const Problem pb(gray.data(), nb::dtype<uint8_t>(), n, 1, h, w, nullptr, fp);
    nb::gil_scoped_release release;
    response_image_into(responses, gray.data(), threads);
    mean_entropy_into(pb, out.data(), threads);
}

}  // namespace

void register_entropy(nb::module_& m) {
    m.def("local_entropy", &local_entropy, nb::arg("images"), nb::arg("footprint"),
          nb::arg("mask").none(), nb::arg("out"), nb::arg("threads"),
          "Local entropy (bits) of [N, H, W] images (2-D footprint) or [N, D, H, W] volumes (3-D "
          "footprint), uint8/uint16, into out of the same shape, float.");
    m.def("mean_local_entropy", &mean_local_entropy, nb::arg("images"), nb::arg("footprint"),
          nb::arg("mask").none(), nb::arg("out"), nb::arg("threads"),
          "Mean local entropy of each image or volume into out [N] float64.");
    m.def("response_image", &response_image, nb::arg("responses"), nb::arg("out"),
          nb::arg("threads"), "[N, C, H, W] float responses -> out [N, H, W] uint8 images.");
    m.def("response_score", &response_score, nb::arg("responses"), nb::arg("footprint"),
          nb::arg("out"), nb::arg("threads"),
          "[N, C, H, W] float responses -> out [N] float64 mean local entropy.");
}
