// Helpers shared by the emulated-kernel harnesses (tests/flash_emu, tests/kernels_emu):
// bf16 rounding and widening, and the normwise error against a double-precision reference.
// Include after emu.h.
#pragma once

#include <cmath>
#include <vector>

static std::vector<float> rounded(const std::vector<float>& x) {
    std::vector<float> y(x.size());
    for (size_t i = 0; i < x.size(); i++) y[i] = __bfloat162float(__float2bfloat16(x[i]));
    return y;
}

static std::vector<float> widen(const std::vector<__nv_bfloat16>& x) {
    std::vector<float> y(x.size());
    for (size_t i = 0; i < x.size(); i++) y[i] = __bfloat162float(x[i]);
    return y;
}

// ‖a − b‖ / ‖b‖ (b the reference), or ‖a‖ when the reference is all zeros.
static double normwise(const std::vector<float>& a, const std::vector<double>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}
