// CPU kernels of the reverse walk (frmap.engine.reverse_walk): the ReLU rules with a bit-packed
// mask, and max-pooling that keeps each window's argmax as a one-byte offset.
//
// ReLU forward: y = relu(x) (in place when y aliases x) and bit i of byte j = (x[8j + i] > 0),
// in one pass. Backward, from the signal g and that mask, in one pass (in place when out
// aliases g):
//     gradient   out = bit ? g : 0
//     deconvnet  out = g > 0 ? g : 0        (no mask)
//     guided     out = bit and g > 0 ? g : 0
//
// Max-pool with stride = kernel (kh, kw), no padding, floor mode: y is each window's maximum
// and the offset a * kw + b of its first maximum in row-major order, NaN counting as larger
// than any number (max_pool2d's value; its argmax for NaN-free windows). With `dead_first`, a
// window without a positive value gets offset 0: the argmax of max_pool2d(relu(x)). One byte
// per pooled element instead of max_pool2d's int64 index. The unpool writes every element of
// its output once: the signal at each window's offset, 0 elsewhere (no separate zero fill).
//
// Arrays arrive C-contiguous in physical order: [N, C, H, W], or [N, H, W, C] for channels-last
// tensors (then the inner loops run along channels, which vectorise).

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "threads.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#define FRMAP_SSE2 1
#endif

namespace nb = nanobind;

namespace {

using Flat = nb::ndarray<nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Bits = nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Planes = nb::ndarray<nb::ndim<4>, nb::c_contig, nb::device::cpu>;
using Offsets = nb::ndarray<uint8_t, nb::ndim<4>, nb::c_contig, nb::device::cpu>;

enum Rule { kGradient = 0, kDeconvnet = 1, kGuided = 2 };

// Calls fn(T* tag) with the float type of `a` (float32 or float64).
template <typename Array, typename Fn>
void with_float(const Array& a, const char* name, Fn&& fn) {
    if (a.dtype() == nb::dtype<float>())
        fn(static_cast<float*>(nullptr));
    else if (a.dtype() == nb::dtype<double>())
        fn(static_cast<double*>(nullptr));
    else
        throw std::invalid_argument(std::string(name) + " must be float32 or float64");
}

template <typename A, typename B>
void same_dtype(const A& a, const B& b, const char* what) {
    if (a.dtype() != b.dtype()) throw std::invalid_argument(std::string(what) + " differ in dtype");
}

// per_byte(j, count) for every mask byte j of n elements (count = 8 but for the tail): the full
// bytes across threads with a constant count, whose inner loops the compiler unrolls.
template <typename PerByte>
void for_each_byte(int64_t n, int threads, PerByte&& per_byte) {
    const int64_t full = n / 8;
#pragma omp parallel for schedule(static) num_threads(resolve_threads(threads, n))
    for (int64_t j = 0; j < full; ++j) per_byte(j, 8);
    if (n % 8) per_byte(full, int(n % 8));
}

#ifdef FRMAP_SSE2
// Eight float32 elements: y = relu(x) (keeps NaN) and the byte of (x > 0), with SSE2 compares
// and movemask (the portable loop below leaves the bit packing scalar).
inline uint32_t relu_byte_sse2(const float* x, float* y) {
    const __m128 zero = _mm_setzero_ps(), a = _mm_loadu_ps(x), b = _mm_loadu_ps(x + 4);
    const uint32_t byte = uint32_t(_mm_movemask_ps(_mm_cmpgt_ps(a, zero))) |
                          uint32_t(_mm_movemask_ps(_mm_cmpgt_ps(b, zero))) << 4;
    _mm_storeu_ps(y, _mm_andnot_ps(_mm_cmple_ps(a, zero), a));
    _mm_storeu_ps(y + 4, _mm_andnot_ps(_mm_cmple_ps(b, zero), b));
    return byte;
}
#endif

template <typename T, bool kMask>
void relu_forward_impl(const T* x, T* y, uint8_t* bits, int64_t n, int threads) {
    for_each_byte(n, threads, [=](int64_t j, int count) {
#ifdef FRMAP_SSE2
        if constexpr (std::is_same_v<T, float>) {
            if (count == 8) {
                const uint32_t byte = relu_byte_sse2(x + 8 * j, y + 8 * j);
                if constexpr (kMask) bits[j] = uint8_t(byte);
                return;
            }
        }
#endif
        T v[8] = {};
        uint32_t byte = 0;
        for (int i = 0; i < count; ++i) v[i] = x[8 * j + i];  // all read before y is written
        for (int i = 0; i < 8; ++i) byte |= uint32_t(v[i] > T(0)) << i;
        for (int i = 0; i < count; ++i) y[8 * j + i] = v[i] <= T(0) ? T(0) : v[i];  // keeps NaN
        if constexpr (kMask) bits[j] = uint8_t(byte);
    });
}

void relu_forward(Flat x, Flat y, std::optional<Bits> bits, int threads) {
    const int64_t n = int64_t(x.shape(0));
    same_dtype(x, y, "x and y");
    if (int64_t(y.shape(0)) != n) throw std::invalid_argument("y differs from x in length");
    if (bits && int64_t(bits->shape(0)) != (n + 7) / 8)
        throw std::invalid_argument("bits must hold ceil(numel / 8) bytes");
    with_float(x, "x", [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        const T* xp = static_cast<const T*>(x.data());
        T* yp = static_cast<T*>(y.data());
        nb::gil_scoped_release release;
        if (bits)
            relu_forward_impl<T, true>(xp, yp, bits->data(), n, threads);
        else
            relu_forward_impl<T, false>(xp, yp, nullptr, n, threads);
    });
}

// An integer as wide as T: masks and offset selects in it vectorise beside T's compares.
template <typename T>
using Lane = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

// Each mask byte's 8 bits as lanes of all ones or zeros (8 or 16 KiB, stays in L1).
template <typename T>
struct ExpandedBits {
    alignas(64) Lane<T> lanes[256][8];
    ExpandedBits() {
        for (int b = 0; b < 256; ++b)
            for (int i = 0; i < 8; ++i) lanes[b][i] = (b >> i) & 1 ? Lane<T>(-1) : Lane<T>(0);
    }
};

// out = g with the bits of the rejected elements cleared (+0.0), one byte's elements at a time.
template <typename T, int kRule>
void relu_backward_impl(const T* g, const uint8_t* bits, T* out, int64_t n, int threads) {
    static const ExpandedBits<T> expanded;
    for_each_byte(n, threads, [=](int64_t j, int count) {
        T v[8] = {};
        for (int i = 0; i < count; ++i) v[i] = g[8 * j + i];
        Lane<T> raw[8];
        std::memcpy(raw, v, sizeof raw);
        const Lane<T>* on = expanded.lanes[kRule == kDeconvnet ? 255 : bits[j]];
        for (int i = 0; i < 8; ++i) {
            const Lane<T> positive = -Lane<T>(v[i] > T(0));
            raw[i] &= kRule == kGradient ? on[i] : (kRule == kDeconvnet ? positive : on[i] & positive);
        }
        std::memcpy(v, raw, sizeof raw);
        for (int i = 0; i < count; ++i) out[8 * j + i] = v[i];
    });
}

void relu_backward(Flat g, std::optional<Bits> bits, Flat out, int rule, int threads) {
    const int64_t n = int64_t(g.shape(0));
    same_dtype(g, out, "g and out");
    if (int64_t(out.shape(0)) != n) throw std::invalid_argument("out differs from g in length");
    if (rule != kGradient && rule != kDeconvnet && rule != kGuided)
        throw std::invalid_argument("rule must be 0 (gradient), 1 (deconvnet) or 2 (guided)");
    if (rule != kDeconvnet && (!bits || int64_t(bits->shape(0)) != (n + 7) / 8))
        throw std::invalid_argument("the gradient and guided rules need ceil(numel / 8) mask bytes");
    with_float(g, "g", [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        const T* gp = static_cast<const T*>(g.data());
        T* op = static_cast<T*>(out.data());
        const uint8_t* bp = bits ? bits->data() : nullptr;
        nb::gil_scoped_release release;
        switch (rule) {
            case kGradient: relu_backward_impl<T, kGradient>(gp, bp, op, n, threads); break;
            case kDeconvnet: relu_backward_impl<T, kDeconvnet>(gp, bp, op, n, threads); break;
            default: relu_backward_impl<T, kGuided>(gp, bp, op, n, threads); break;
        }
    });
}

// Pooling geometry: logical sizes, whatever the layout.
struct Pool {
    int64_t n, c, h, w, oh, ow;
    int kh, kw;
    bool channels_last;
};

// Whether v replaces the running maximum m: larger, or the first NaN (NaN beats numbers).
// Bitwise, not short-circuit, operators keep the loops branch-free.
template <typename T>
inline bool larger(T v, T m) {
    return (v > m) | ((v != v) & (m == m));
}

constexpr int64_t kChannelChunk = 64;

// One pooling window of a channels-last image: y[k] and off[k] for channels [c0, c), the
// window's first element at `win`, its rows `row_stride` elements apart.
template <typename T>
void pool_window(const T* win, T* y, uint8_t* off, int64_t c0, int64_t c, int64_t row_stride,
                 int kh, int kw, bool dead_first) {
    alignas(64) T m[kChannelChunk];
    alignas(64) Lane<T> o[kChannelChunk];
    for (; c0 < c; c0 += kChannelChunk) {
        const int64_t cc = std::min(kChannelChunk, c - c0);
        for (int64_t k = 0; k < cc; ++k) {
            m[k] = win[c0 + k];
            o[k] = 0;
        }
        for (int a = 0; a < kh; ++a)
            for (int d = 0; d < kw; ++d) {
                if (a == 0 && d == 0) continue;
                const T* xs = win + a * row_stride + d * c + c0;
                const Lane<T> code = a * kw + d;
                for (int64_t k = 0; k < cc; ++k) {
                    const T v = xs[k], cur = m[k];
                    const bool take = larger(v, cur);
                    m[k] = take ? v : cur;
                    o[k] = take ? code : o[k];
                }
            }
        for (int64_t k = 0; k < cc; ++k) {
            y[c0 + k] = m[k];
            off[c0 + k] = uint8_t(dead_first & (m[k] <= T(0)) ? 0 : o[k]);
        }
    }
}

#ifdef FRMAP_SSE2
// The float32 window, 16 channels at a time in SSE2 registers; returns the channels done.
inline int64_t pool_window_sse2(const float* win, float* y, uint8_t* off, int64_t c,
                                int64_t row_stride, int kh, int kw, bool dead_first) {
    int64_t k = 0;
    for (; k + 16 <= c; k += 16) {
        __m128 m[4];
        __m128i o[4];
        for (int q = 0; q < 4; ++q) {
            m[q] = _mm_loadu_ps(win + k + 4 * q);
            o[q] = _mm_setzero_si128();
        }
        for (int a = 0; a < kh; ++a)
            for (int d = 0; d < kw; ++d) {
                if (a == 0 && d == 0) continue;
                const float* xs = win + a * row_stride + d * c + k;
                const __m128i code = _mm_set1_epi32(a * kw + d);
                for (int q = 0; q < 4; ++q) {
                    const __m128 v = _mm_loadu_ps(xs + 4 * q);
                    // larger, or the first NaN: v > m, or v unordered with itself and m not
                    const __m128 take = _mm_or_ps(_mm_cmpgt_ps(v, m[q]),
                                                  _mm_and_ps(_mm_cmpunord_ps(v, v),
                                                             _mm_cmpord_ps(m[q], m[q])));
                    m[q] = _mm_or_ps(_mm_and_ps(take, v), _mm_andnot_ps(take, m[q]));
                    const __m128i t = _mm_castps_si128(take);
                    o[q] = _mm_or_si128(_mm_and_si128(t, code), _mm_andnot_si128(t, o[q]));
                }
            }
        for (int q = 0; q < 4; ++q) {
            _mm_storeu_ps(y + k + 4 * q, m[q]);
            if (dead_first)
                o[q] = _mm_andnot_si128(_mm_castps_si128(_mm_cmple_ps(m[q], _mm_setzero_ps())),
                                        o[q]);
        }
        const __m128i bytes = _mm_packus_epi16(_mm_packs_epi32(o[0], o[1]),
                                               _mm_packs_epi32(o[2], o[3]));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(off + k), bytes);
    }
    return k;
}
#endif

template <typename T>
void max_pool_impl(const Pool& p, const T* x, T* y, uint8_t* off, bool dead_first, int threads) {
    const int64_t n = p.n, c = p.c, h = p.h, w = p.w, oh = p.oh, ow = p.ow;
    const int kh = p.kh, kw = p.kw;
    if (p.channels_last) {
#pragma omp parallel for schedule(static) num_threads(resolve_threads(threads, n * c * h * w))
        for (int64_t row = 0; row < n * oh; ++row) {
            const int64_t b = row / oh, i = row % oh;
            for (int64_t j = 0; j < ow; ++j) {
                const T* win = x + ((b * h + i * kh) * w + j * kw) * c;
                const int64_t at = (row * ow + j) * c;
                int64_t done = 0;
#ifdef FRMAP_SSE2
                if constexpr (std::is_same_v<T, float>)
                    done = pool_window_sse2(win, y + at, off + at, c, w * c, kh, kw, dead_first);
#endif
                pool_window(win, y + at, off + at, done, c, w * c, kh, kw, dead_first);
            }
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads(resolve_threads(threads, n * c * h * w))
    for (int64_t row = 0; row < n * c * oh; ++row) {
        const int64_t plane = row / oh, i = row % oh;
        const T* band = x + (plane * h + i * kh) * w;
        for (int64_t j = 0; j < ow; ++j) {
            T m = band[j * kw];
            int o = 0;
            for (int code = 1; code < kh * kw; ++code) {
                const T v = band[(code / kw) * w + j * kw + code % kw];
                const bool take = larger(v, m);
                m = take ? v : m;
                o = take ? code : o;
            }
            y[row * ow + j] = m;
            off[row * ow + j] = uint8_t(dead_first & (m <= T(0)) ? 0 : o);
        }
    }
}

template <typename T>
void max_unpool_impl(const Pool& p, const T* r, const uint8_t* off, T* out, int threads) {
    const int64_t n = p.n, c = p.c, h = p.h, w = p.w, oh = p.oh, ow = p.ow;
    const int kh = p.kh, kw = p.kw;
    const int64_t work = n * c * h * w;
    if (p.channels_last) {
#pragma omp parallel for schedule(static) num_threads(resolve_threads(threads, work))
        for (int64_t row = 0; row < n * h; ++row) {
            const int64_t b = row / h, i = (row % h) / kh, a = (row % h) % kh;
            T* o = out + row * w * c;
            const int64_t inside = i < oh ? ow * kw : 0;  // columns under a window
            for (int64_t col = 0; col < inside; ++col) {
                const Lane<T> code = Lane<T>(a * kw + col % kw);
                const int64_t at = ((b * oh + i) * ow + col / kw) * c;
                const T* rs = r + at;
                const uint8_t* os = off + at;
                T* oc = o + col * c;
                for (int64_t k = 0; k < c; ++k) {
                    const T v = rs[k];
                    oc[k] = Lane<T>(os[k]) == code ? v : T(0);
                }
            }
            std::fill(o + inside * c, o + w * c, T(0));
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads(resolve_threads(threads, work))
    for (int64_t row = 0; row < n * c * h; ++row) {
        const int64_t plane = row / h, i = (row % h) / kh, a = (row % h) % kh;
        T* o = out + row * w;
        const int64_t inside = i < oh ? ow * kw : 0;
        const T* rs = r + (plane * oh + i) * ow;
        const uint8_t* os = off + (plane * oh + i) * ow;
        for (int64_t col = 0; col < inside; ++col) {
            const T v = rs[col / kw];
            o[col] = int(os[col / kw]) == a * kw + col % kw ? v : T(0);
        }
        std::fill(o + inside, o + w, T(0));
    }
}

// The geometry of a pool from its full-size and pooled arrays (physical order), checked.
Pool pool_of(const Planes& full, const Planes& pooled, const Offsets& off, int kh, int kw,
             bool channels_last) {
    if (kh < 1 || kw < 1 || kh * kw > 256)
        throw std::invalid_argument("the pooling window must have 1 to 256 elements");
    Pool p{};
    p.n = int64_t(full.shape(0));
    p.c = int64_t(channels_last ? full.shape(3) : full.shape(1));
    p.h = int64_t(channels_last ? full.shape(1) : full.shape(2));
    p.w = int64_t(channels_last ? full.shape(2) : full.shape(3));
    p.oh = p.h / kh;
    p.ow = p.w / kw;
    p.kh = kh;
    p.kw = kw;
    p.channels_last = channels_last;
    const int64_t expect[4] = {p.n, channels_last ? p.oh : p.c, channels_last ? p.ow : p.oh,
                               channels_last ? p.c : p.ow};
    for (int d = 0; d < 4; ++d)
        if (int64_t(pooled.shape(d)) != expect[d] || int64_t(off.shape(d)) != expect[d])
            throw std::invalid_argument("pooled arrays do not have the pooled shape");
    same_dtype(full, pooled, "the full-size and pooled arrays");
    return p;
}

void max_pool(Planes x, Planes y, Offsets offsets, int kh, int kw, bool channels_last,
              bool dead_first, int threads) {
    const Pool p = pool_of(x, y, offsets, kh, kw, channels_last);
    with_float(x, "x", [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        nb::gil_scoped_release release;
        max_pool_impl<T>(p, static_cast<const T*>(x.data()), static_cast<T*>(y.data()),
                         offsets.data(), dead_first, threads);
    });
}

void max_unpool(Planes r, Offsets offsets, Planes out, int kh, int kw, bool channels_last,
                int threads) {
    const Pool p = pool_of(out, r, offsets, kh, kw, channels_last);
    with_float(r, "r", [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        nb::gil_scoped_release release;
        max_unpool_impl<T>(p, static_cast<const T*>(r.data()), offsets.data(),
                           static_cast<T*>(out.data()), threads);
    });
}

}  // namespace

void register_walk(nb::module_& m) {
    m.def("relu_forward", &relu_forward, nb::arg("x"), nb::arg("y"), nb::arg("bits").none(),
          nb::arg("threads"), "y = relu(x) (flat, y may alias x) and the packed mask x > 0.");
    m.def("relu_backward", &relu_backward, nb::arg("g"), nb::arg("bits").none(), nb::arg("out"),
          nb::arg("rule"), nb::arg("threads"),
          "The rule (0 gradient, 1 deconvnet, 2 guided) from signal g and mask; out may alias g.");
    m.def("max_pool", &max_pool, nb::arg("x"), nb::arg("y"), nb::arg("offsets"), nb::arg("kh"),
          nb::arg("kw"), nb::arg("channels_last"), nb::arg("dead_first"), nb::arg("threads"),
          "Max-pool, stride = kernel, into y and one-byte argmax offsets.");
    m.def("max_unpool", &max_unpool, nb::arg("r"), nb::arg("offsets"), nb::arg("out"),
          nb::arg("kh"), nb::arg("kw"), nb::arg("channels_last"), nb::arg("threads"),
          "The signal r of a max-pool routed back to each window's offset, zeros elsewhere.");
}
