// Runs the backend's kernels (kernels.h: their CUDA source, as the test
// writes it) under shim.h's emulation and checks each against a plain
// reference written here. Prints one line per check; exits 1 if any fails.
// Built once as the kernels are by default and once with TANDEM_KV_BF16
// (the device KV in BF16): that build runs the checks that touch the KV,
// whose references read the KV's own (rounded) values.
#include "kernels.h"

#include <algorithm>
#include <cstdio>
#include <random>

static int failures = 0;

static void check(bool ok, const char* what, double detail) {
    printf("%s %s (%.3g)\n", ok ? "ok  " : "FAIL", what, detail);
    failures += !ok;
}

static std::mt19937 rng(7);
static float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }

// Against causal attention in double over the same paged KV: the per-token
// kernel for every token and the plan a step uses (runs of at least 8
// tokens of one sequence in tiles of 16, the rest per token), unless
// `split_only`; then the split kernel for the decode rows, on several grids
// and alone when `all_grids` (slow under emulation: once).
static void attention_case(int hd, int nh, int nkv, int bs, bool split_only, bool all_grids) {
    std::vector<int> lens = {1, 17, 40, 70};
    int n_blocks = 2;
    for (int n : lens) n_blocks += (n + bs - 1) / bs;
    std::vector<int> ids(n_blocks);
    for (int i = 0; i < n_blocks; ++i) ids[i] = i;
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<int> toff, tables;
    int next = 0;
    for (int n : lens) {
        toff.push_back((int)tables.size());
        for (int b = 0; b < (n + bs - 1) / bs; ++b) tables.push_back(ids[next++]);
    }
    long bf = 2L * nkv * hd * bs;
    std::vector<kv_t> kv(n_blocks * bf);
    for (auto& v : kv) v = kv_store(uniform(-1, 1));
    std::vector<int> seq, pos;
    for (int s = 0; s < (int)lens.size(); ++s) {
        for (int p = std::max(0, lens[s] - 3); p < lens[s]; ++p) seq.push_back(s), pos.push_back(p);
        seq.push_back(s), pos.push_back(lens[s] / 2);
    }
    int n_dec = (int)seq.size();
    for (int p = 10; p < 40; ++p) seq.push_back(2), pos.push_back(p);
    for (int p = 0; p < 70; ++p) seq.push_back(3), pos.push_back(p);
    int nt = (int)seq.size(), qd = nh * hd;
    std::vector<float> q((size_t)nt * qd);
    for (auto& v : q) v = uniform(-2, 2);
    // Causal attention in double; `bf16`: of the queries and KV rounded
    // to BF16, as the tensor-core kernel reads them.
    auto reference = [&](bool bf16) {
        auto r = [&](float v) { return bf16 ? (double)__uint_as_float((unsigned)f32_to_bf16_bits(v) << 16) : (double)v; };
        std::vector<double> want((size_t)nt * qd);
        for (int t = 0; t < nt; ++t)
        for (int h = 0; h < nh; ++h) {
            int g = h / (nh / nkv), n = pos[t] + 1;
            const int* tb = &tables[toff[seq[t]]];
            auto key = [&](int k, int d) { return r(kv_load(kv[tb[k / bs] * bf + (long)g * hd * bs + (long)d * bs + k % bs])); };
            auto val = [&](int k, int d) { return r(kv_load(kv[tb[k / bs] * bf + (long)(nkv + g) * hd * bs + (long)(k % bs) * hd + d])); };
            std::vector<double> w(n);
            double mx = -1e300, sum = 0;
            for (int k = 0; k < n; ++k) {
                double dot = 0;
                for (int d = 0; d < hd; ++d) dot += r(q[(size_t)t * qd + h * hd + d]) * key(k, d);
                w[k] = dot / std::sqrt((double)hd);
                mx = std::max(mx, w[k]);
            }
            for (auto& x : w) sum += (x = std::exp(x - mx));
            for (int d = 0; d < hd; ++d) {
                double o = 0;
                for (int k = 0; k < n; ++k) o += w[k] * val(k, d);
                want[(size_t)t * qd + h * hd + d] = o / sum;
            }
        }
        return want;
    };
    std::vector<double> want = reference(false);
    float scale = 1.0f / std::sqrt((float)hd);
    auto diff = [&](const std::vector<float>& got) {
        double d = 0;
        for (size_t i = 0; i < want.size(); ++i) d = std::max(d, std::isnan(got[i]) ? 1e9 : std::fabs(got[i] - want[i]));
        return d;
    };
    char what[200];
    double d;
    if (!split_only) {
        std::vector<float> per_token((size_t)nt * qd, NAN), planned((size_t)nt * qd, NAN);
        launch({(unsigned)nt, (unsigned)nh, 1}, 128, hd + 128 + 32, [&] {
            attention(nullptr, q.data(), kv.data(), seq.data(), pos.data(), tables.data(), toff.data(),
                      per_token.data(), qd, nh, nkv, hd, bs, scale);
        });
        std::vector<int> tiles, rows;
        for (int s0 = 0; s0 < nt;) {
            int e = s0 + 1;
            while (e < nt && seq[e] == seq[s0]) ++e;
            if (e - s0 >= 8) {
                for (int t0 = s0; t0 < e; t0 += 16) {
                    int t1 = std::min(t0 + 16, e), keys = 0;
                    for (int t = t0; t < t1; ++t) keys = std::max(keys, pos[t] + 1);
                    tiles.insert(tiles.end(), {t0, t1 - t0, keys});
                }
            } else {
                for (int t = s0; t < e; ++t) rows.push_back(t);
            }
            s0 = e;
        }
        launch({(unsigned)rows.size(), (unsigned)nh, 1}, 128, hd + 128 + 32, [&] {
            attention(rows.data(), q.data(), kv.data(), seq.data(), pos.data(), tables.data(), toff.data(),
                      planned.data(), qd, nh, nkv, hd, bs, scale);
        });
        launch({(unsigned)(tiles.size() / 3), (unsigned)nh, 1}, 128, 16 * hd + 2 * 32 * hd + 4 * 32, [&] {
            attention_tiled(tiles.data(), q.data(), kv.data(), seq.data(), pos.data(), tables.data(),
                            toff.data(), planned.data(), qd, nh, nkv, hd, bs, scale);
        });
        snprintf(what, sizeof what, "attention per token, hd %d, heads %d/%d, block %d", hd, nh, nkv, bs);
        d = diff(per_token);
        check(d <= 1e-5, what, d);
        snprintf(what, sizeof what, "attention planned (%zu tiles, %zu rows), hd %d, heads %d/%d, block %d",
                 tiles.size() / 3, rows.size(), hd, nh, nkv, bs);
        d = diff(planned);
        check(d <= 1e-5 && tiles.size() >= 3 && !rows.empty(), what, d);
        if (hd % 16 == 0 && hd <= 128) {
            // The tensor-core kernel over the same tiles, against the
            // reference of rounded inputs: within what rounding the
            // softmax weights to BF16 moves a weighted mean of values in
            // [-1, 1] (2^-8 of them, at most). Rows outside the tiles stay
            // NaN: it writes nothing else.
            std::vector<float> mma((size_t)nt * qd, NAN);
            int G = nh / nkv, gy = nkv * ((G + 3) / 4);
            size_t shared_halves = (size_t)64 * (hd + 8) + (size_t)hd * (64 + 8) + 4 * 2 * 64;
            launch({(unsigned)(tiles.size() / 3), (unsigned)gy, 1}, 128, shared_halves / 2, [&] {
                attention_mma(tiles.data(), q.data(), kv.data(), seq.data(), pos.data(), tables.data(),
                              toff.data(), mma.data(), qd, nh, nkv, hd, bs, scale);
            });
            std::vector<double> want_bf16 = reference(true);
            double dm = 0;
            int untouched = 0, in_tiles = 0;
            std::vector<bool> tiled(nt, false);
            for (size_t i = 0; i < tiles.size(); i += 3)
                for (int t = tiles[i]; t < tiles[i] + tiles[i + 1]; ++t) tiled[t] = true;
            for (int t = 0; t < nt; ++t)
                for (int i = 0; i < qd; ++i) {
                    float v = mma[(size_t)t * qd + i];
                    if (!tiled[t]) {
                        untouched += std::isnan(v);
                        continue;
                    }
                    ++in_tiles;
                    dm = std::max(dm, std::isnan(v) ? 1e9 : std::fabs(v - want_bf16[(size_t)t * qd + i]));
                }
            snprintf(what, sizeof what, "attention on tensor cores (%zu tiles), hd %d, heads %d/%d, block %d",
                     tiles.size() / 3, hd, nh, nkv, bs);
            check(dm <= 4e-3 && in_tiles > 0 && untouched == (nt - in_tiles / qd) * qd, what, dm);
        }
    }

    // The split kernel and its merge over the decode-like rows (the last
    // positions of each sequence and one in the middle), parts of 32 keys
    // (one tile) or 64, grids of one block per row and head group or one
    // per part: within 1e-5 of the reference, and the same bits whatever
    // the grid and whether a row runs alone or among others (its output
    // depends on its position only).
    int longest = *std::max_element(lens.begin(), lens.end());
    int G = nh / nkv, ge = std::min(G, 8), gy = nkv * ((G + 7) / 8);
    size_t shared = (size_t)ge * (5 * hd + 5 * 32 + 3);
    std::vector<int> dec;
    for (int t = 0; t < n_dec; ++t) dec.push_back(t);
    auto diff_rows = [&](const std::vector<float>& got) {
        double d = 0;
        for (int t : dec)
            for (int i = 0; i < qd; ++i) {
                size_t j = (size_t)t * qd + i;
                d = std::max(d, std::isnan(got[j]) ? 1e9 : std::fabs(got[j] - want[j]));
            }
        return d;
    };
    int nd = (int)dec.size();
    for (int chunk : {32, 64}) {
        if (chunk != 32 && !all_grids) continue;
        int max_parts = (longest + chunk - 1) / chunk;
        std::vector<float> first;
        bool same = true;
        for (int z : {max_parts, 1}) {
            if ((chunk != 32 || !all_grids) && z != max_parts) continue;
            std::vector<float> part((size_t)nd * nh * max_parts * (hd + 2), NAN), split((size_t)nt * qd, NAN);
            launch({(unsigned)nd, (unsigned)gy, (unsigned)z}, 128, shared, [&] {
                attention_split(dec.data(), q.data(), kv.data(), seq.data(), pos.data(), tables.data(),
                                toff.data(), part.data(), qd, nh, nkv, hd, bs, scale, chunk, max_parts);
            });
            launch({(unsigned)nd, (unsigned)nh, 1}, 128, 0, [&] {
                attention_combine(dec.data(), pos.data(), part.data(), split.data(), nh, hd, chunk, max_parts);
            });
            snprintf(what, sizeof what, "attention split, %d rows, parts of %d keys, grid z %d, hd %d, heads %d/%d, block %d",
                     nd, chunk, z, hd, nh, nkv, bs);
            d = diff_rows(split);
            check(d <= 1e-5, what, d);
            if (first.empty()) first = split;
            for (int t : dec) same = same && memcmp(&first[(size_t)t * qd], &split[(size_t)t * qd], (size_t)qd * 4) == 0;
        }
        if (chunk != 32 || !all_grids) continue;
        // The last row of the longest sequence alone.
        int t = dec[nd - 1];
        std::vector<float> part((size_t)nh * max_parts * (hd + 2), NAN), alone((size_t)nt * qd, NAN);
        launch({1, (unsigned)gy, 2}, 128, shared, [&] {
            attention_split(&t, q.data(), kv.data(), seq.data(), pos.data(), tables.data(), toff.data(),
                            part.data(), qd, nh, nkv, hd, bs, scale, chunk, max_parts);
        });
        launch({1, (unsigned)nh, 1}, 128, 0, [&] {
            attention_combine(&t, pos.data(), part.data(), alone.data(), nh, hd, chunk, max_parts);
        });
        same = same && memcmp(&first[(size_t)t * qd], &alone[(size_t)t * qd], (size_t)qd * 4) == 0;
        check(same, "attention split: the same bits for every grid and for a row alone", 0);
    }
}

// kv_write puts each token's K and V where attention reads them: a prompt
// written through it attends like attention over the rows themselves.
static void kv_write_case() {
    int hd = 32, nh = 4, nkv = 2, bs = 8, n = 30, qd = nh * hd, row_len = qd + 2 * nkv * hd;
    std::vector<int> table = {5, 0, 3, 6};
    long bf = 2L * nkv * hd * bs;
    std::vector<kv_t> kv(7 * bf, kv_store(NAN));
    std::vector<float> qkv((size_t)n * row_len);
    for (auto& v : qkv) v = uniform(-1, 1);
    // What the KV holds of a K or V value of a row.
    auto stored = [&](int t, int i) { return (double)kv_load(kv_store(qkv[(size_t)t * row_len + i])); };
    std::vector<int> pos(n), blk(n), seq(n, 0), toff = {0};
    for (int t = 0; t < n; ++t) pos[t] = t, blk[t] = table[t / bs];
    launch({(unsigned)n, 1, 1}, 256, 0, [&] {
        kv_write(qkv.data(), pos.data(), blk.data(), kv.data(), row_len, qd, nkv, hd, bs);
    });
    std::vector<float> out((size_t)n * qd, NAN);
    std::vector<int> tiles = {0, 16, 16, 16, n - 16, n};
    launch({2, (unsigned)nh, 1}, 128, 16 * hd + 2 * 32 * hd + 4 * 32, [&] {
        attention_tiled(tiles.data(), qkv.data(), kv.data(), seq.data(), pos.data(), table.data(),
                        toff.data(), out.data(), row_len, nh, nkv, hd, bs, 1.0f / std::sqrt((float)hd));
    });
    double d = 0;
    for (int t = 0; t < n; ++t)
        for (int h = 0; h < nh; ++h) {
            int g = h / (nh / nkv);
            const float* qr = &qkv[(size_t)t * row_len + h * hd];
            std::vector<double> w(t + 1);
            double mx = -1e300, sum = 0;
            for (int k = 0; k <= t; ++k) {
                double dot = 0;
                for (int i = 0; i < hd; ++i) dot += qr[i] * stored(k, qd + g * hd + i);
                w[k] = dot / std::sqrt((double)hd);
                mx = std::max(mx, w[k]);
            }
            for (auto& x : w) sum += (x = std::exp(x - mx));
            for (int i = 0; i < hd; ++i) {
                double o = 0;
                for (int k = 0; k <= t; ++k) o += w[k] * stored(k, qd + nkv * hd + g * hd + i);
                double e = std::fabs(out[(size_t)t * qd + h * hd + i] - o / sum);
                d = std::max(d, std::isnan(e) ? 1e9 : e);
            }
        }
    check(d <= 1e-5, "kv_write then tiled attention, against attention over the rows", d);
}

static unsigned order_key_host(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// argmax_rows and topk_rows: the host's argmax (first largest) and
// top_k_of (largest first, ties to the lower id, total order on floats).
static void pick_cases() {
    int vocab = 4099;
    std::vector<std::vector<float>> rows;
    std::vector<float> r(vocab);
    for (auto& v : r) v = std::normal_distribution<float>(0, 3)(rng);
    rows.push_back(r);
    for (auto& v : r) v = (float)(rng() % 40) / 8.0f; // many ties
    rows.push_back(r);
    rows.push_back(std::vector<float>(vocab, 1.0f)); // all tied
    std::vector<float> inf(vocab, -INFINITY);
    inf[77] = 0.0f, inf[12] = -0.0f, inf[vocab - 1] = 0.0f;
    rows.push_back(inf);
    rows.push_back(std::vector<float>(vocab, -INFINITY));
    int n = (int)rows.size();
    std::vector<float> flat;
    for (auto& x : rows) flat.insert(flat.end(), x.begin(), x.end());
    std::vector<int> ids(n, -1);
    launch({(unsigned)n, 1, 1}, 256, 0, [&] { argmax_rows(flat.data(), nullptr, ids.data(), vocab); });
    int bad = 0;
    for (int i = 0; i < n; ++i) {
        float m = -INFINITY;
        for (float v : rows[i]) m = std::max(m, v);
        int first = (int)(std::find(rows[i].begin(), rows[i].end(), m) - rows[i].begin());
        bad += ids[i] != first;
    }
    check(bad == 0, "argmax_rows: first largest, -inf rows pick 0", bad);
    for (int k : {1, 7, 40, 256}) {
        std::vector<int> ks(n, k), tid(n * 256, -1);
        std::vector<float> tval(n * 256, NAN);
        launch({(unsigned)n, 1, 1}, 512, 0,
               [&] { topk_rows(flat.data(), nullptr, ks.data(), vocab, tval.data(), tid.data()); });
        bad = 0;
        for (int i = 0; i < n; ++i) {
            std::vector<int> idx(vocab);
            for (int j = 0; j < vocab; ++j) idx[j] = j;
            std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) {
                return order_key_host(rows[i][a]) > order_key_host(rows[i][b]);
            });
            for (int j = 0; j < k; ++j)
                bad += tid[i * 256 + j] != idx[j] || memcmp(&tval[i * 256 + j], &rows[i][idx[j]], 4) != 0;
        }
        char what[96];
        snprintf(what, sizeof what, "topk_rows k=%d: largest first, ties to the lower id", k);
        check(bad == 0, what, bad);
    }
}

// The row kernels of a layer against the CPU model's formulas: the
// embedding lookup, RMSNorm (of listed rows), the QKV bias and RoPE (both
// pairings, angles as the CPU takes them), SiLU-and-multiply.
static void row_cases() {
    int h = 96, nt = 5, vocab = 11;
    std::vector<float> table(vocab * h), x(nt * h, NAN), w(h);
    for (auto& v : table) v = uniform(-1, 1);
    for (auto& v : w) v = uniform(0.5f, 1.5f);
    std::vector<int> tok = {3, 0, 10, 3, 7};
    launch({(unsigned)nt, 1, 1}, 256, 0, [&] { embed(tok.data(), table.data(), x.data(), h); });
    int bad = 0;
    for (int t = 0; t < nt; ++t)
        for (int i = 0; i < h; ++i) bad += x[t * h + i] != table[tok[t] * h + i];
    check(bad == 0, "embed: rows of the table", bad);

    std::vector<int> rows = {4, 1};
    std::vector<float> out(2 * h, NAN);
    float eps = 1e-5f;
    launch({2, 1, 1}, 256, 0, [&] {
        rms_norm(x.data(), rows.data(), nullptr, w.data(), out.data(), nullptr, h, eps);
    });
    double d = 0;
    for (int r = 0; r < 2; ++r) {
        const float* xr = &x[rows[r] * h];
        double ss = 0;
        for (int i = 0; i < h; ++i) ss += (double)xr[i] * xr[i];
        double rs = 1.0 / std::sqrt(ss / h + eps);
        for (int i = 0; i < h; ++i) d = std::max(d, std::fabs(out[r * h + i] - w[i] * xr[i] * rs));
    }
    check(d <= 1e-5, "rms_norm of listed rows", d);

    // The residual add before the norm, and a BF16 copy of the output: the
    // sum is written back to every row, exactly x + add, and the norm and
    // its copy are the plain kernel's on that sum.
    {
        std::vector<float> add(nt * h), summed = x, plain(nt * h, NAN), fused(nt * h, NAN);
        std::vector<unsigned short> fused_bf16(nt * h, 0xffff);
        for (auto& v : add) v = uniform(-1, 1);
        for (int i = 0; i < nt * h; ++i) summed[i] = x[i] + add[i];
        std::vector<float> x2 = x;
        launch({(unsigned)nt, 1, 1}, 256, 0, [&] {
            rms_norm(summed.data(), nullptr, nullptr, w.data(), plain.data(), nullptr, h, eps);
        });
        launch({(unsigned)nt, 1, 1}, 256, 0, [&] {
            rms_norm(x2.data(), nullptr, add.data(), w.data(), fused.data(), fused_bf16.data(), h, eps);
        });
        int wrong = 0;
        for (int i = 0; i < nt * h; ++i)
            wrong += x2[i] != summed[i] || fused[i] != plain[i] || fused_bf16[i] != f32_to_bf16_bits(plain[i]);
        check(wrong == 0, "rms_norm with the residual add and a BF16 copy: the plain kernel's bits", wrong);
    }

    int hd = 16, nrot = 3, row_len = 4 * hd, half = hd / 2;
    std::vector<float> inv_freq(half), bias(row_len);
    for (int i = 0; i < half; ++i) inv_freq[i] = 1.0f / std::pow(10000.0f, 2.0f * i / hd);
    for (auto& v : bias) v = uniform(-0.5f, 0.5f);
    std::vector<int> pos = {0, 7, 1000, 31, 4095};
    for (int neox = 0; neox < 2; ++neox) {
        std::vector<float> qkv(nt * row_len), want;
        for (auto& v : qkv) v = uniform(-1, 1);
        want = qkv;
        for (int t = 0; t < nt; ++t) {
            float* r = &want[t * row_len];
            for (int i = 0; i < row_len; ++i) r[i] += bias[i];
            for (int hh = 0; hh < nrot; ++hh)
                for (int i = 0; i < half; ++i) {
                    float a = (float)pos[t] * inv_freq[i];
                    float c = (float)std::cos((double)a), s = (float)std::sin((double)a);
                    int ai = neox ? i : 2 * i, bi = neox ? i + half : 2 * i + 1;
                    float* xh = r + hh * hd;
                    float xa = xh[ai], xb = xh[bi];
                    xh[ai] = xa * c - xb * s;
                    xh[bi] = xb * c + xa * s;
                }
        }
        launch({(unsigned)nt, 1, 1}, 256, 0, [&] {
            bias_rope(qkv.data(), bias.data(), pos.data(), inv_freq.data(), row_len, nrot, hd, neox);
        });
        d = 0;
        for (int i = 0; i < nt * row_len; ++i) d = std::max(d, (double)std::fabs(qkv[i] - want[i]));
        check(d <= 1e-6, neox ? "bias_rope, NeoX pairs (i, i + half)" : "bias_rope, interleaved pairs (2i, 2i + 1)", d);
    }

    int ffn = 40;
    std::vector<float> gu(nt * 2 * ffn), act(nt * ffn, NAN);
    for (auto& v : gu) v = uniform(-4, 4);
    std::vector<unsigned short> act_bf16(nt * ffn, 0xffff);
    launch({1, 1, 1}, 256, 0, [&] { silu_mul(gu.data(), act.data(), act_bf16.data(), nt, ffn); });
    d = 0;
    int wrong = 0;
    for (int t = 0; t < nt; ++t)
        for (int j = 0; j < ffn; ++j) {
            double g = gu[t * 2 * ffn + j], u = gu[t * 2 * ffn + ffn + j];
            d = std::max(d, std::fabs(act[t * ffn + j] - g / (1 + std::exp(-g)) * u));
            wrong += act_bf16[t * ffn + j] != f32_to_bf16_bits(act[t * ffn + j]);
        }
    check(d <= 1e-5 && wrong == 0, "silu_mul: silu(gate) * up, and its BF16 copy", d);
}

// kv_export gathers device KV blocks by id into a contiguous f32 buffer,
// kv_import scatters such a buffer to other ids: each block moves whole,
// its values converted as kv_store and kv_load do (exactly, for f32 KV),
// and nothing else is written.
static void kv_copy_case() {
    long bf = 24;
    int pool = 9;
    std::vector<float> host(4 * bf), buf(4 * bf, NAN);
    for (auto& v : host) v = uniform(-100, 100);
    std::vector<kv_t> src(pool * bf, kv_store(-1.0f)), dst(pool * bf, kv_store(-1.0f));
    std::vector<int> ids = {7, 2, 3, 5}, from = {7, 2, 2, 5}, to = {0, 8, 3, 4};
    launch({4, 1, 1}, 256, 0, [&] { kv_import(host.data(), nullptr, src.data(), ids.data(), bf); });
    launch({4, 1, 1}, 256, 0, [&] { kv_export(src.data(), from.data(), buf.data(), nullptr, bf); });
    launch({4, 1, 1}, 256, 0, [&] { kv_import(buf.data(), nullptr, dst.data(), to.data(), bf); });
    int bad = 0;
    auto held = [&](int b, long i) { return kv_load(kv_store(host[b * bf + i])); };
    for (int b = 0; b < 4; ++b)
        for (long i = 0; i < bf; ++i) {
            int from_b = from[b] == 7 ? 0 : from[b] == 2 ? 1 : 3; // where host put block from[b]
            bad += kv_load(src[ids[b] * bf + i]) != held(b, i);
            bad += buf[b * bf + i] != held(from_b, i);
            bad += kv_load(dst[to[b] * bf + i]) != held(from_b, i);
        }
    for (int b : {1, 2, 5, 6, 7})
        for (long i = 0; i < bf; ++i) bad += kv_load(dst[b * bf + i]) != -1.0f;
#ifdef TANDEM_KV_BF16
    // Rounded to BF16 as f32_to_bf16 rounds (nearest, ties to even).
    for (long i = 0; i < 4 * bf; ++i) bad += kv_store(host[i]) != f32_to_bf16_bits(host[i]);
    const char* what = "kv_export and kv_import (BF16 KV): blocks by ids, rounded once, nothing else written";
#else
    for (long i = 0; i < 4 * bf; ++i) bad += held(i / bf, i % bf) != host[i];
    const char* what = "kv_export and kv_import (f32 KV): blocks by ids, exact, nothing else written";
#endif
    check(bad == 0, what, bad);
}

// f32_to_bf16 rounds to nearest, ties to even, as the host's `half` does:
// known cases at and around the ties, signed zero, infinities, overflow,
// and NaN kept a (quiet) NaN.
static void bf16_case() {
    struct Case {
        unsigned in;
        unsigned short out;
    } cases[] = {
        {0x3F800000u, 0x3F80}, // 1
        {0x3F808000u, 0x3F80}, // 1 + half an ulp: tie, to even (down)
        {0x3F818000u, 0x3F82}, // tie, to even (up)
        {0x3F808001u, 0x3F81}, // just above the tie
        {0x3F807FFFu, 0x3F80}, // just below it
        {0xBF808001u, 0xBF81}, // negative, above the tie
        {0x80000000u, 0x8000}, // -0
        {0x7F800000u, 0x7F80}, // +inf
        {0xFF800000u, 0xFF80}, // -inf
        {0x7F7FFFFFu, 0x7F80}, // largest float rounds to +inf
        {0x00000001u, 0x0000}, // smallest subnormal rounds to 0
    };
    int n = sizeof cases / sizeof cases[0];
    std::vector<float> x(n + 1);
    for (int i = 0; i < n; ++i) x[i] = __uint_as_float(cases[i].in);
    x[n] = __uint_as_float(0x7FA00000u); // a signalling NaN
    std::vector<unsigned short> y(n + 1, 0x1234);
    launch({1, 1, 1}, 256, 0, [&] { f32_to_bf16(x.data(), y.data(), n + 1); });
    int bad = 0;
    for (int i = 0; i < n; ++i) bad += y[i] != cases[i].out;
    bad += (y[n] & 0x7F80) != 0x7F80 || (y[n] & 0x007F) == 0 || !(y[n] & 0x0040);
    check(bad == 0, "f32_to_bf16: nearest, ties to even; NaN stays a quiet NaN", bad);
}

// gemv_bf16 against a double reference of the same BF16 values: rows
// that do not fill the last block, one to GEMV_MAX_T token rows.
static void gemv_case() {
    auto bf16 = [](float f) { return (unsigned short)(__float_as_uint(f) >> 16); };
    auto back = [](unsigned short b) { return __uint_as_float((unsigned)b << 16); };
    int m = 19;
    double worst = 0;
    // Rows of 25 loads of 16 bytes (fewer than a warp's lanes) and of 300
    // (three rounds of a lane's batched loads, the last one partial).
    for (int k : {200, 2400})
    for (int nt : {1, 3, 8}) {
        std::vector<unsigned short> w((size_t)m * k);
        for (auto& v : w) v = bf16(uniform(-1, 1));
        std::vector<unsigned short> x((size_t)nt * k);
        for (auto& v : x) v = bf16(uniform(-1, 1));
        std::vector<float> out((size_t)nt * m + 1, -7.0f);
        launch({(unsigned)((m + GEMV_ROWS - 1) / GEMV_ROWS), 1, 1}, GEMV_ROWS * 32, 0,
               [&] { gemv_bf16(w.data(), x.data(), out.data(), m, k, nt); });
        for (int t = 0; t < nt; ++t)
            for (int r = 0; r < m; ++r) {
                double want = 0;
                for (int j = 0; j < k; ++j) want += (double)back(w[(size_t)r * k + j]) * back(x[(size_t)t * k + j]);
                worst = std::max(worst, std::abs(want - out[(size_t)t * m + r]));
            }
        worst = std::max(worst, out[(size_t)nt * m] == -7.0f ? 0.0 : 1e9);
    }
    check(worst <= 1e-4, "gemv_bf16: every row of 1, 3 and 8 tokens, rows of 200 and 2400, nothing past them written", worst);
}

// head_norm: each query and key head of every row normalised by its own
// weights (the CPU model's rms_norm_in_place per head); values untouched.
static void head_norm_case() {
    int nt = 3, nh = 4, nkv = 2, hd = 64, row_len = (nh + 2 * nkv) * hd;
    float eps = 1e-6f;
    std::vector<float> qkv((size_t)nt * row_len), qw(hd), kw(hd);
    for (auto& v : qkv) v = uniform(-3, 3);
    for (auto& v : qw) v = uniform(0.5f, 1.5f);
    for (auto& v : kw) v = uniform(0.5f, 1.5f);
    std::vector<float> before = qkv;
    launch({(unsigned)nt, (unsigned)(nh + nkv), 1}, 32, 0,
           [&] { head_norm(qkv.data(), qw.data(), kw.data(), row_len, nh, hd, eps); });
    double d = 0;
    for (int t = 0; t < nt; ++t)
        for (int h = 0; h < nh + 2 * nkv; ++h) {
            const float* x = &before[(size_t)t * row_len + h * hd];
            const float* got = &qkv[(size_t)t * row_len + h * hd];
            double ss = 0;
            for (int i = 0; i < hd; ++i) ss += (double)x[i] * x[i];
            double r = 1.0 / std::sqrt(ss / hd + eps);
            for (int i = 0; i < hd; ++i) {
                double want = h < nh ? qw[i] * x[i] * r : h < nh + nkv ? kw[i] * x[i] * r : x[i];
                d = std::max(d, std::abs(want - got[i]));
            }
        }
    check(d <= 1e-5, "head_norm: query heads by q_w, key heads by k_w, values untouched", d);
}

int main() {
#ifndef TANDEM_KV_BF16
    gemv_case();
    head_norm_case();
    row_cases();
    bf16_case();
#endif
    kv_copy_case();
    attention_case(64, 4, 2, 16, false, true);
    attention_case(128, 2, 1, 8, false, false);
    attention_case(32, 3, 3, 4, false, false);
    attention_case(32, 9, 1, 8, false, false); // 9 query heads a KV head: 3 blocks of the tensor-core kernel's 4 warps
    attention_case(64, 18, 1, 16, true, false); // a group of 18 query heads: blocks of at most 8
    attention_case(256, 4, 2, 16, true, false); // 8 dimensions per lane
    kv_write_case();
#ifndef TANDEM_KV_BF16
    pick_cases();
#endif
    return failures ? 1 : 0;
}
