// Runs every kernel of kernels.cu (except flash.cu's, which tests/flash_emu checks) on the CPU
// (emu.h) against a double-precision reference of what its comment says it computes, with
// the launch shapes model/src/cuda.rs uses (rows_cfg, warp_cfg) or deliberately small grids
// where the kernel is a grid-stride loop. Prints one line per check and exits non-zero if
// any is over its bound. Built and run by model/tests/kernels_emu.rs.
#include "emu.h"

#include <cstdio>
#include <random>
#include <string>

#include "kernels.cu"
#include "../emu_harness/checks.h"

static int failures = 0;

static double max_abs(const std::vector<float>& a, const std::vector<double>& b) {
    double m = 0;
    for (size_t i = 0; i < a.size(); i++) m = std::max(m, std::abs(a[i] - b[i]));
    return m;
}

static void check(const std::string& name, double err, double bound) {
    bool ok = err <= bound;
    if (!ok) failures++;
    std::printf("%-44s error %.2e (bound %.0e): %s\n", name.c_str(), err, bound,
                ok ? "ok" : "FAIL");
}

static void check_true(const std::string& name, bool ok) {
    if (!ok) failures++;
    std::printf("%-44s: %s\n", name.c_str(), ok ? "ok" : "FAIL");
}

static std::vector<float> randn(size_t n, unsigned seed, float scale = 1.f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> d(0.f, scale);
    std::vector<float> x(n);
    for (auto& v : x) v = d(rng);
    return x;
}

static bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), 4 * a.size()) == 0;
}

// model/src/cuda.rs's launch shapes.
static Dim3 rows_grid(int rows) { return {unsigned(rows), 1, 1}; }
static Dim3 rows_block(int width) {
    unsigned t = width >= (1 << 16) ? 1024 : width >= 1024 ? 512 : width >= 256 ? 256 : 128;
    return {t, 1, 1};
}

static void rms_norm() {
    for (int h : {200, 896}) {
        const int rows = 5;
        const float eps = 1e-6f;
        auto x = randn(rows * h, 1), w = randn(h, 2), g = randn(rows * h, 3);
        std::vector<float> y(rows * h), dx(rows * h);
        emu_launch(rows_grid(rows), rows_block(h),
                   [&] { rms_norm_fwd(x.data(), w.data(), y.data(), rows, h, eps); });
        emu_launch(rows_grid(rows), rows_block(h), [&] {
            rms_norm_bwd(x.data(), g.data(), w.data(), dx.data(), rows, h, eps);
        });
        std::vector<double> ry(rows * h), rdx(rows * h);
        for (int r = 0; r < rows; r++) {
            const float* xr = &x[r * h];
            const float* gr = &g[r * h];
            double ss = 0, dot = 0;
            for (int j = 0; j < h; j++) {
                ss += double(xr[j]) * xr[j];
                dot += double(xr[j]) * gr[j] * w[j];
            }
            double inv = 1 / std::sqrt(ss / h + eps);
            for (int j = 0; j < h; j++) {
                ry[r * h + j] = w[j] * (xr[j] * inv);
                rdx[r * h + j] = inv * w[j] * gr[j] - xr[j] * dot * inv * inv * inv / h;
            }
        }
        check("rms_norm_fwd h=" + std::to_string(h), normwise(y, ry), 1e-6);
        check("rms_norm_bwd h=" + std::to_string(h), normwise(dx, rdx), 1e-5);
    }
}

static void swiglu() {
    const long long n = 1000;
    auto g = randn(n, 4, 3.f), u = randn(n, 5), d = randn(n, 6);
    std::vector<float> y(n), dgu(2 * n);
    // 3 blocks of 64 threads: every thread loops (the grid-stride path).
    emu_launch({3, 1, 1}, {64, 1, 1}, [&] { swiglu_fwd(g.data(), u.data(), y.data(), n); });
    emu_launch({3, 1, 1}, {64, 1, 1},
               [&] { swiglu_bwd(g.data(), u.data(), d.data(), dgu.data(), n); });
    std::vector<double> ry(n), rdgu(2 * n);
    for (long long i = 0; i < n; i++) {
        double gv = g[i], sig = 1 / (1 + std::exp(-gv));
        ry[i] = gv * sig * u[i];
        rdgu[i] = d[i] * u[i] * (sig * (1 + gv * (1 - sig)));
        rdgu[n + i] = d[i] * gv * sig;
    }
    check("swiglu_fwd", normwise(y, ry), 1e-6);
    check("swiglu_bwd", normwise(dgu, rdgu), 1e-6);
    // The float4 kernels (n a multiple of 4, vectors 16-byte aligned): the same per-element
    // arithmetic, so the same bits.
    std::vector<float> y4(n), dgu4(2 * n);
    const long long n4 = n / 4;
    auto v4 = [](std::vector<float>& x) { return reinterpret_cast<float4*>(x.data()); };
    emu_launch({3, 1, 1}, {64, 1, 1}, [&] { swiglu_fwd_v4(v4(g), v4(u), v4(y4), n4); });
    emu_launch({3, 1, 1}, {64, 1, 1},
               [&] { swiglu_bwd_v4(v4(g), v4(u), v4(d), v4(dgu4), n4); });
    check_true("swiglu_fwd_v4 == swiglu_fwd", same_bits(y4, y));
    check_true("swiglu_bwd_v4 == swiglu_bwd", same_bits(dgu4, dgu));
}

static void rope_and_bias() {
    const int prefix = 3, T = 5, d = 8, half = d / 2;
    auto x = randn(prefix * T * d, 7);
    std::vector<float> cos(T * half), sin(T * half);
    for (int p = 0; p < T; p++)
        for (int i = 0; i < half; i++) {
            double th = p * std::pow(10000.0, -2.0 * i / d);
            cos[p * half + i] = float(std::cos(th));
            sin[p * half + i] = float(std::sin(th));
        }
    for (float sign : {1.f, -1.f}) {
        std::vector<float> y(x.size());
        emu_launch({2, 1, 1}, {32, 1, 1}, [&] {
            rope_fwd(x.data(), cos.data(), sin.data(), y.data(), prefix, T, d, sign);
        });
        std::vector<double> ry(x.size());
        for (int r = 0; r < prefix; r++)
            for (int p = 0; p < T; p++)
                for (int i = 0; i < half; i++) {
                    size_t o = (size_t(r) * T + p) * d;
                    double c = cos[p * half + i], s = sign * sin[p * half + i];
                    ry[o + i] = x[o + i] * c - x[o + i + half] * s;
                    ry[o + i + half] = x[o + i + half] * c + x[o + i] * s;
                }
        check(sign > 0 ? "rope_fwd" : "rope_fwd (sign -1)", normwise(y, ry), 1e-6);
    }
    const long long m = 7;
    const int n = 13;
    auto y = randn(m * n, 8), b = randn(n, 9);
    std::vector<double> ry(y.size());
    for (long long i = 0; i < m * n; i++) ry[i] = double(y[i] + b[i % n]);
    emu_launch({2, 1, 1}, {32, 1, 1}, [&] { add_bias_rows(y.data(), b.data(), m, n); });
    check("add_bias_rows", max_abs(y, ry), 0);
}

// The attention mask of attn_softmax_fwd: may row `row` (of rows = BG·R) see key j?
struct Mask {
    int R, T, groups, tq, window;
    const std::vector<uint8_t>* key_valid;
    bool sees(int row, int j) const {
        int i = (row % R) % tq, b = row / R / groups;
        if (j > i || (window > 0 && i - j >= window)) return false;
        return !key_valid || (*key_valid)[b * T + j];
    }
};

static std::vector<double> softmax_ref(const std::vector<float>& s, int rows, const Mask& mk) {
    const int T = mk.T;
    std::vector<double> p(s.size(), 0.0);
    for (int r = 0; r < rows; r++) {
        double m = -INFINITY, sum = 0;
        for (int j = 0; j < T; j++)
            if (mk.sees(r, j)) m = std::max(m, double(s[r * T + j]));
        if (m == -INFINITY) continue;  // sees no key: all zeros
        for (int j = 0; j < T; j++)
            if (mk.sees(r, j)) sum += std::exp(s[r * T + j] - m);
        for (int j = 0; j < T; j++)
            if (mk.sees(r, j)) p[r * T + j] = std::exp(s[r * T + j] - m) / sum;
    }
    return p;
}

static std::vector<double> softmax_bwd_ref(const std::vector<float>& p, const std::vector<float>& dp,
                                           int rows, int T, float scale) {
    std::vector<double> ds(p.size());
    for (int r = 0; r < rows; r++) {
        double dot = 0;
        for (int j = 0; j < T; j++) dot += double(p[r * T + j]) * dp[r * T + j];
        for (int j = 0; j < T; j++)
            ds[r * T + j] = scale * double(p[r * T + j]) * (dp[r * T + j] - dot);
    }
    return ds;
}

static void softmax() {
    // B = 2 batch rows, G = 1 kv head with rep = 2 query heads; T = 40 keys, so the warp
    // kernels' lanes hold one or two values. Batch row 1 has padding keys, among them key
    // 0: its query 0 sees no key at all. (Every emulated GPU thread is an OS thread, so the
    // shapes stay small.)
    const int B = 2, G = 1, rep = 2, T = 40, tq = T, R = rep * tq, rows = B * G * R;
    const float scale = 0.125f;
    std::vector<uint8_t> kv(B * T, 1);
    for (int j : {0, 3, 4, 33, 39}) kv[T + j] = 0;
    for (auto [window, padding] : {std::pair{0, false}, std::pair{9, true}}) {
            Mask mk{R, T, G, tq, window, padding ? &kv : nullptr};
            const uint8_t* kvp = padding ? kv.data() : nullptr;
            std::string tag = std::string(" window ") + std::to_string(window) +
                              (padding ? " padding" : "");
            auto s0 = randn(rows * T, 10 + window, 2.f);
            auto ref = softmax_ref(s0, rows, mk);
            // f32, in place, one block per row.
            auto s = s0;
            emu_launch(rows_grid(rows), rows_block(T),
                       [&] { attn_softmax_fwd(s.data(), rows, R, T, G, tq, window, kvp); });
            check("attn_softmax_fwd" + tag, max_abs(s, ref), 1e-6);
            bool zero_outside = true;
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < T; j++)
                    if (!mk.sees(r, j) && s[r * T + j] != 0.f) zero_outside = false;
            check_true("attn_softmax_fwd masked keys exactly 0" + tag, zero_outside);
            // bf16 out, block per row: the f32 kernel's values rounded, bit for bit.
            std::vector<__nv_bfloat16> pb(rows * T);
            emu_launch(rows_grid(rows), rows_block(T), [&] {
                attn_softmax_fwd_bf16(s0.data(), pb.data(), rows, R, T, G, tq, window, kvp);
            });
            check_true("attn_softmax_fwd_bf16 == bf16(f32 kernel)" + tag,
                       same_bits(widen(pb), rounded(s)));
            // bf16 out, warp per row (8 rows per 256-thread block): within bf16 rounding.
            for (int nv : {32, 64}) {
                std::vector<__nv_bfloat16> pw(rows * T);
                emu_launch({unsigned((rows + 7) / 8), 1, 1}, {256, 1, 1}, [&] {
                    if (nv == 32)
                        attn_softmax_fwd_bf16_w32(s0.data(), pw.data(), rows, R, T, G, tq,
                                                  window, kvp);
                    else
                        attn_softmax_fwd_bf16_w64(s0.data(), pw.data(), rows, R, T, G, tq,
                                                  window, kvp);
                });
                check("attn_softmax_fwd_bf16_w" + std::to_string(nv) + tag,
                      max_abs(widen(pw), ref), 4e-3);
            }
            // Backward on the f32 probabilities, then on their bf16 roundings.
            auto dp0 = randn(rows * T, 20 + window);
            auto ds = dp0;
            emu_launch(rows_grid(rows), rows_block(T),
                       [&] { attn_softmax_bwd(s.data(), ds.data(), rows, T, scale); });
            check("attn_softmax_bwd" + tag, max_abs(ds, softmax_bwd_ref(s, dp0, rows, T, scale)),
                  1e-6);
            auto pr = widen(pb);
            auto rb = softmax_bwd_ref(pr, dp0, rows, T, scale);
            auto pds = pb;
            emu_launch(rows_grid(rows), rows_block(T),
                       [&] { attn_softmax_bwd_bf16(pds.data(), dp0.data(), rows, T, scale); });
            check("attn_softmax_bwd_bf16" + tag, max_abs(widen(pds), rb), 2e-3);
            for (int nv : {32, 64}) {
                auto pw = pb;
                emu_launch({unsigned((rows + 7) / 8), 1, 1}, {256, 1, 1}, [&] {
                    if (nv == 32)
                        attn_softmax_bwd_bf16_w32(pw.data(), dp0.data(), rows, T, scale);
                    else
                        attn_softmax_bwd_bf16_w64(pw.data(), dp0.data(), rows, T, scale);
                });
                check("attn_softmax_bwd_bf16_w" + std::to_string(nv) + tag,
                      max_abs(widen(pw), rb), 2e-3);
            }
        }
}

static void token_loss() {
    // V = 3000 with 1024 threads per row (rows_cfg(rows, 1 << 20)); row 2's coefficient is
    // 0 (a weight-0 or padding position), row 3's target is the last token.
    const int rows = 4, V = 3000;
    auto x = randn(rows * V, 30, 3.f);
    // Row 1 rises along the row, so every thread's running maximum keeps moving (the
    // online log-sum-exp's rescaling path), up to 60 above where it started.
    for (int j = 0; j < V; j++) x[V + j] = 0.02f * j + 0.1f * x[V + j];
    std::vector<unsigned> tgt = {7, 2999 - 5, 11, 2999};
    std::vector<float> stats(2 * rows);
    emu_launch(rows_grid(rows), rows_block(1 << 20),
               [&] { ce_row_stats(x.data(), tgt.data(), stats.data(), rows, V); });
    std::vector<double> rstats(2 * rows), rgrad(rows * V);
    std::vector<float> lc(2 * rows);
    const float coef[rows] = {0.5f, -1.25f, 0.f, 2.f};
    for (int r = 0; r < rows; r++) {
        double m = -INFINITY, sum = 0;
        for (int j = 0; j < V; j++) m = std::max(m, double(x[r * V + j]));
        for (int j = 0; j < V; j++) sum += std::exp(x[r * V + j] - m);
        double lse = m + std::log(sum);
        rstats[2 * r] = x[r * V + tgt[r]] - lse;
        rstats[2 * r + 1] = lse;
        lc[2 * r] = stats[2 * r + 1];
        lc[2 * r + 1] = coef[r];
        for (int j = 0; j < V; j++)
            rgrad[r * V + j] =
                coef[r] == 0.f ? 0.0 : coef[r] * ((j == int(tgt[r])) - std::exp(x[r * V + j] - lse));
    }
    check("ce_row_stats", max_abs(stats, rstats), 1e-5);
    std::vector<__nv_bfloat16> gb(rows * V);
    auto x_before = x;
    emu_launch(rows_grid(rows), rows_block(1 << 20), [&] {
        ce_row_grad_bf16(x.data(), gb.data(), tgt.data(), lc.data(), rows, V);
    });
    check_true("ce_row_grad_bf16 leaves the logits as they are", same_bits(x, x_before));
    auto g = x;
    emu_launch(rows_grid(rows), rows_block(1 << 20),
               [&] { ce_row_grad(g.data(), tgt.data(), lc.data(), rows, V); });
    check("ce_row_grad", max_abs(g, rgrad), 1e-5);
    // The head's ∂L/∂h GEMM reads the same bf16 operand either way.
    check_true("ce_row_grad_bf16 == bf16(ce_row_grad)", same_bits(widen(gb), rounded(g)));
}

static void packing() {
    // B = 2, T = 5, 4 query heads over G = 2 kv heads, d = 8.
    const int B = 2, T = 5, H = 4, G = 2, d = 8, half = d / 2, rep = H / G;
    const size_t n = size_t(B) * T * H * d;
    auto x = randn(n, 40);
    std::vector<float> cos(T * half), sin(T * half);
    for (int p = 0; p < T; p++)
        for (int i = 0; i < half; i++) {
            cos[p * half + i] = float(std::cos(0.3 * p * (i + 1)));
            sin[p * half + i] = float(std::sin(0.3 * p * (i + 1)));
        }
    auto pack = [&](const std::vector<float>& src, int sign, int to_packed) {
        std::vector<float> dst(n);
        emu_launch({2, 1, 1}, {32, 1, 1}, [&] {
            attn_pack(src.data(), dst.data(), cos.data(), sin.data(), B, T, H, G, d, sign,
                      to_packed);
        });
        return dst;
    };
    auto p0 = pack(x, 0, 1);
    // Where each (batch, position, head) row lands: block (b, h / rep), row (h % rep)·T + t.
    bool placed = true;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++)
                for (int i = 0; i < d; i++) {
                    size_t s = ((size_t(b) * T + t) * H + h) * d + i;
                    size_t p = ((size_t(b) * G + h / rep) * (rep * T) + (h % rep) * T + t) * d + i;
                    if (p0[p] != x[s]) placed = false;
                }
    check_true("attn_pack places rows as documented", placed);
    // The flash backward packs the forward's output back: the round trip must be exact.
    check_true("attn_pack unpack(pack(x)) == x bit for bit", same_bits(pack(p0, 0, 0), x));
    auto rot = pack(x, 1, 1);
    auto back = pack(rot, -1, 0);
    std::vector<double> xd(x.begin(), x.end());
    check("attn_pack rotate, then unrotate", max_abs(back, xd), 1e-6);
    std::vector<__nv_bfloat16> hb(n);
    emu_launch({2, 1, 1}, {32, 1, 1}, [&] {
        attn_pack_bf16(x.data(), hb.data(), cos.data(), sin.data(), B, T, H, G, d, 1);
    });
    check_true("attn_pack_bf16 == bf16(attn_pack)", same_bits(widen(hb), rounded(rot)));
}

int main() {
    rms_norm();
    swiglu();
    rope_and_bias();
    softmax();
    token_loss();
    packing();
    if (failures) std::printf("%d check(s) failed\n", failures);
    return failures ? 1 : 0;
}
