// The `_ext` module: the entropy kernels and the reverse-walk kernels.
#include <nanobind/nanobind.h>

namespace nb = nanobind;

void register_entropy(nb::module_& m);
void register_walk(nb::module_& m);
void register_nl_means(nb::module_& m);

NB_MODULE(_ext, m) {
    m.doc() = "C++ CPU kernels of frmap: local entropy, response scores, ReLU rules, pooling, "
            "non-local means.";
    register_entropy(m);
    register_walk(m);
    register_nl_means(m);
}
