// Just enough of CUDA's execution model, on CPU threads, to run the
// backend's kernels as written (see `kernels::tests`): one OS thread per
// CUDA thread of a block, blocks one after another, `__syncthreads` a
// barrier of the block, warp shuffles through a per-warp exchange slot
// between two barriers of the warp, `__shared__` arrays static (so shared
// by the block that runs), atomics the compiler's. It checks what a kernel
// computes (indexing, synchronisation, reductions, tie rules), not how fast
// or how a GPU's compiler lays it out.
#pragma once
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct U3 {
    unsigned x = 0, y = 0, z = 0;
};
thread_local U3 threadIdx, blockIdx;
U3 blockDim, gridDim;
float* g_shared;
std::barrier<>* g_block;
std::barrier<>* g_warp[32];
float g_fslot[32][32];
int g_islot[32][32];

#define TANDEM_EMULATION
struct uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline uint4 load_stream(const uint4* p) { return *p; }

#define __global__
#define __device__
#define __shared__ static

inline void __syncthreads() { g_block->arrive_and_wait(); }

template <typename T>
inline T warp_exchange(T (&slot)[32][32], T v, int from) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    g_warp[w]->arrive_and_wait();
    slot[w][lane] = v;
    g_warp[w]->arrive_and_wait();
    return slot[w][from];
}
inline float __shfl_xor_sync(unsigned, float v, int o) {
    return warp_exchange(g_fslot, v, (threadIdx.x & 31) ^ o);
}
inline int __shfl_xor_sync(unsigned, int v, int o) {
    return warp_exchange(g_islot, v, (threadIdx.x & 31) ^ o);
}
inline float __shfl_sync(unsigned, float v, int j) { return warp_exchange(g_fslot, v, j); }

inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
// mma.sync m16n8k16 BF16 -> f32 of one warp: every lane's fragments
// through per-warp slots, then each lane's four outputs, from the layout
// PTX documents (see mma_bf16_16816 in the kernels).
unsigned g_mma_a[32][32][4], g_mma_b[32][32][2];
inline void emulated_mma_bf16_16816(float* d, const unsigned* a, const unsigned* b) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    g_warp[w]->arrive_and_wait();
    for (int i = 0; i < 4; ++i) g_mma_a[w][lane][i] = a[i];
    for (int i = 0; i < 2; ++i) g_mma_b[w][lane][i] = b[i];
    g_warp[w]->arrive_and_wait();
    auto half = [](unsigned word, int k) {
        unsigned bits = (k % 2 ? word >> 16 : word & 0xffffu) << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    };
    // A[row][k]: lane (row % 8) * 4 + (k % 8) / 2, register row / 8 + 2 (k / 8).
    auto A = [&](int row, int k) { return half(g_mma_a[w][(row % 8) * 4 + (k % 8) / 2][row / 8 + 2 * (k / 8)], k); };
    // B[k][n]: lane n * 4 + (k % 8) / 2, register k / 8.
    auto B = [&](int k, int n) { return half(g_mma_b[w][n * 4 + (k % 8) / 2][k / 8], k); };
    int g = lane >> 2, c = lane & 3;
    for (int i = 0; i < 4; ++i) {
        int row = g + 8 * (i / 2), col = 2 * c + i % 2;
        float acc = d[i];
        for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
        d[i] = acc;
    }
    g_warp[w]->arrive_and_wait(); // every lane has read the slots
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

// Runs `body` (one kernel call) for every block of `grid`, `threads`
// threads each (a multiple of 32), with `shared_floats` floats of dynamic
// shared memory.
inline void launch(U3 grid, unsigned threads, size_t shared_floats, const std::function<void()>& body) {
    blockDim = {threads, 1, 1};
    gridDim = grid;
    std::vector<float> shared(shared_floats + 1);
    g_shared = shared.data();
    std::barrier<> block(threads);
    g_block = &block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    for (unsigned w = 0; w < threads / 32; ++w) {
        warps.push_back(std::make_unique<std::barrier<>>(32));
        g_warp[w] = warps.back().get();
    }
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; ++t)
        ts.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            for (unsigned z = 0; z < (grid.z ? grid.z : 1); ++z)
                for (unsigned y = 0; y < (grid.y ? grid.y : 1); ++y)
                    for (unsigned x = 0; x < grid.x; ++x) {
                        blockIdx = {x, y, z};
                        body();
                        block.arrive_and_wait();
                    }
        });
    for (auto& t : ts) t.join();
}
