//! The CUDA C kernels of the forward pass, compiled at load with NVRTC, and
//! their launchers.
//!
//! Most kernels are written for being obviously right rather than fast: one
//! thread block per row (or per token and head), grid-stride loops for the
//! element-wise ones, f32 everywhere except the BF16 copies of activations
//! that feed cuBLAS. Those that hold a step's time are written for the
//! memory system (the split and tiled attention kernels, the matrix-vector
//! one) or for the tensor cores (the BF16 models' prompt attention, through
//! `mma.sync` in inline PTX, which the CPU emulation replaces with a
//! warp-wide multiply of the documented fragment layouts) and checked
//! against the plain ones. The KV kernels are compiled for an f32 or a BF16
//! device KV (`TANDEM_KV_BF16`). The source uses no headers
//! (NVRTC then needs no include path) and converts BF16 by hand (round to
//! nearest even, as `half` does on the host). Products that the CPU computes as separate multiplies (RoPE)
//! use `__fmul_rn`, so the compiler cannot contract them into FMAs and move
//! the result away from the CPU's.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::CompileOptions;

use super::KvPrecision;
use crate::error::{EngineError, Result};

/// Threads per block of the attention kernel (also its keys per tile).
pub(crate) const ATT_THREADS: u32 = 128;
/// Output dimensions one attention thread owns: head_dim may be at most
/// `ATT_DIMS_PER_THREAD * ATT_THREADS`.
pub(crate) const ATT_DIMS_PER_THREAD: usize = 4;
/// Query tokens per tile of the tiled (prefill) attention kernel.
pub(crate) const TILE_Q: usize = 16;
/// Keys per tile of the tiled attention kernel (one per lane of a warp).
const TILE_K: usize = 32;
/// Threads of the tiled attention kernel: 4 warps of `TILE_Q / 4` rows each.
const TILE_THREADS: u32 = 128;
/// The tiled kernel's lanes own 4 output dimensions each.
pub(crate) const TILE_MAX_HEAD_DIM: usize = 128;
/// Keys per tile of the tensor-core attention kernel (its `MMA_TK`).
const MMA_TK: usize = 64;
/// Warps of the tensor-core attention kernel (its `MMA_WARPS`): query
/// heads of one KV head a block takes.
const MMA_WARPS: usize = 4;
/// Widest head the tensor-core kernel takes (its `MMA_MAX_HD`).
const MMA_MAX_HEAD_DIM: usize = 128;
/// A sequence's run of new tokens goes to the tiled kernel from this
/// length on (a prompt chunk); shorter runs (decode steps, a few draft
/// tokens) keep one thread block per token, which spreads a long context
/// over more threads.
pub(crate) const TILE_MIN_RUN: usize = 8;
/// Most parts the split (flash-decoding) attention kernel cuts a decode
/// row's keys into (its `SPLIT_MAX_PARTS`): its scratch is this many
/// partial outputs per row and head.
pub(crate) const SPLIT_MAX_PARTS: usize = 128;
/// Keys per tile of the split kernel (its `SPLIT_TK`), the smallest part.
const SPLIT_TK: usize = 32;
/// Query heads of one KV head a block of the split kernel takes (its
/// `SPLIT_G`).
const SPLIT_G: usize = 8;
/// Threads of the split kernel (`SPLIT_WARPS` warps).
const SPLIT_THREADS: u32 = 128;
/// The split kernel's lanes own up to 8 output dimensions each.
pub(crate) const SPLIT_MAX_HEAD_DIM: usize = 256;
/// Thread blocks the split kernel aims at per multiprocessor: enough
/// independent loads in flight to cover the memory's latency.
const SPLIT_BLOCKS_PER_SM: usize = 4;
/// Token rows the BF16 matrix-vector kernel takes (its `GEMV_MAX_T`):
/// decode steps of up to this many tokens can skip cuBLAS.
pub(crate) const GEMV_MAX_T: usize = 8;
/// Weight rows per block of the matrix-vector kernel (one warp each).
const GEMV_ROWS: usize = 8;
/// Candidates per row of the top-k kernel (its `TOPK_MAX`): the most a
/// step asks for, `sampler::MAX_DEVICE_TOP_K`.
pub(crate) const TOPK_MAX: usize = 256;
const TOPK_THREADS: u32 = 512;
/// Threads per block of the row kernels.
const ROW_THREADS: u32 = 256;
/// Blocks of the grid-stride element-wise kernels (enough to fill any GPU).
const ELEMWISE_BLOCKS: u32 = 1024;

pub(crate) const SOURCE: &str = r#"
#define ATT_THREADS 128
#define ATT_DIMS 4
/* No headers: spell out what they would give. */
typedef unsigned long long u64;
#define NEG_INF __uint_as_float(0xff800000u)

__device__ float block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = ((int)threadIdx.x < nw) ? red[threadIdx.x] : 0.0f;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    float r = red[0];
    __syncthreads();
    return r;
}

__device__ float block_max(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = ((int)threadIdx.x < nw) ? red[threadIdx.x] : NEG_INF;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    float r = red[0];
    __syncthreads();
    return r;
}

__device__ unsigned short f32_to_bf16_bits(float f) {
    unsigned int b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((b >> 16) | 0x40u);
    b += 0x7fffu + ((b >> 16) & 1u);
    return (unsigned short)(b >> 16);
}

/* The element of the device KV: f32 (the default, and the path compared
   token for token with the CPU), or BF16 when compiled with TANDEM_KV_BF16
   (half the bytes a decode step reads and the device holds; rounded to
   nearest even as it is written). Kernels read it through kv_load and
   write it through kv_store; the host's layout stays f32 (kv_export,
   kv_import). */
#ifdef TANDEM_KV_BF16
typedef unsigned short kv_t;
__device__ float kv_load(kv_t v) { return __uint_as_float((unsigned int)v << 16); }
__device__ kv_t kv_store(float f) { return f32_to_bf16_bits(f); }
#else
typedef float kv_t;
__device__ float kv_load(kv_t v) { return v; }
__device__ kv_t kv_store(float f) { return f; }
#endif

/* x[t] = table[tok[t]]: one block per token. */
extern "C" __global__ void embed(const int* tok, const float* table, float* x, int h) {
    int t = blockIdx.x;
    const float* row = table + (u64)tok[t] * h;
    float* out = x + (u64)t * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) out[i] = row[i];
}

/* out[r] = w * x[src] / sqrt(mean(x[src]^2) + eps), src = rows ? rows[r] : r.
   With `add`, first x[src] += add[src] (the residual add before the norm,
   written back: one launch for both). With `out_bf16`, the output is also
   rounded to BF16 there (the input of the multiply that follows). One
   block per row. */
extern "C" __global__ void rms_norm(float* x, const int* rows, const float* add, const float* w,
                                    float* out, unsigned short* out_bf16, int h, float eps) {
    __shared__ float red[32];
    int r = blockIdx.x;
    int src = rows ? rows[r] : r;
    float* xr = x + (u64)src * h;
    const float* ar = add ? add + (u64)src * h : 0;
    float s = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float v = xr[i];
        if (ar) {
            v += ar[i];
            xr[i] = v; /* this thread's own element: read back below by it alone */
        }
        s = fmaf(v, v, s);
    }
    s = block_sum(s, red);
    float rs = 1.0f / sqrtf(s / (float)h + eps);
    float* o = out + (u64)r * h;
    unsigned short* ob = out_bf16 ? out_bf16 + (u64)r * h : 0;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float v = w[i] * (xr[i] * rs);
        o[i] = v;
        if (ob) ob[i] = f32_to_bf16_bits(v);
    }
}

/* Adds the QKV bias (if any), then rotates the first n_rot_heads heads of each
   row by its token's position. One block per token. */
extern "C" __global__ void bias_rope(float* qkv, const float* bias, const int* pos,
                                     const float* inv_freq, int row_len, int n_rot_heads,
                                     int hd, int neox) {
    int t = blockIdx.x;
    float* row = qkv + (u64)t * row_len;
    if (bias) {
        for (int i = threadIdx.x; i < row_len; i += blockDim.x) row[i] += bias[i];
        __syncthreads();
    }
    int half = hd / 2;
    float p = (float)pos[t];
    for (int j = threadIdx.x; j < n_rot_heads * half; j += blockDim.x) {
        int hh = j / half, i = j % half;
        float a = __fmul_rn(p, inv_freq[i]);
        float c = (float)cos((double)a), s = (float)sin((double)a);
        int ai = neox ? i : 2 * i;
        int bi = neox ? i + half : 2 * i + 1;
        float* x = row + (u64)hh * hd;
        float xa = x[ai], xb = x[bi];
        x[ai] = __fsub_rn(__fmul_rn(xa, c), __fmul_rn(xb, s));
        x[bi] = __fadd_rn(__fmul_rn(xb, c), __fmul_rn(xa, s));
    }
}

/* Writes each token's K and V into its block of one layer's KV (the KvLayout:
   per block K [head][dim][slot], then V [head][slot][dim]). One block per token. */
extern "C" __global__ void kv_write(const float* qkv, const int* pos, const int* blk, kv_t* kv,
                                    int row_len, int qd, int n_kv, int hd, int bs) {
    int t = blockIdx.x;
    const float* row = qkv + (u64)t * row_len;
    int slot = pos[t] % bs;
    kv_t* region = kv + (u64)blk[t] * (u64)(2 * n_kv * hd * bs);
    int kvd = n_kv * hd;
    for (int j = threadIdx.x; j < kvd; j += blockDim.x) {
        int h = j / hd, d = j % hd;
        region[(u64)h * hd * bs + (u64)d * bs + slot] = kv_store(row[qd + j]);
        region[(u64)(n_kv + h) * hd * bs + (u64)slot * hd + d] = kv_store(row[qd + kvd + j]);
    }
}

__device__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* RMSNorm of each query head (by q_w) and each key head (by k_w) of every
   token's QKV row, in place: the per-head norms of Qwen3, before RoPE (such
   models have no QKV bias). Grid (tokens, n_heads + n_kv), one warp each. */
extern "C" __global__ void head_norm(float* qkv, const float* q_w, const float* k_w, int row_len,
                                     int n_heads, int hd, float eps) {
    int t = blockIdx.x, h = blockIdx.y;
    float* x = qkv + (u64)t * row_len + (u64)h * hd;
    const float* w = h < n_heads ? q_w : k_w;
    float s = 0.0f;
    for (int i = threadIdx.x; i < hd; i += 32) s = fmaf(x[i], x[i], s);
    s = warp_sum(s);
    float rs = 1.0f / sqrtf(s / (float)hd + eps);
    for (int i = threadIdx.x; i < hd; i += 32) x[i] = w[i] * (x[i] * rs);
}

/* Causal attention of one query token and one query head over the keys
   0..=pos of its sequence, read through the sequence's block table: token
   rows[blockIdx.x] (blockIdx.x when rows is null).
   Grid (tokens, heads), ATT_THREADS threads: each tile of ATT_THREADS keys
   gets one score per thread, then an online softmax (running max and sum in
   f32) rescales the accumulated output, whose dimensions the threads share.
   Dynamic shared memory: (hd + ATT_THREADS + 32) floats. */
extern "C" __global__ void attention(const int* rows, const float* qkv, const kv_t* kv,
                                     const int* tok_seq, const int* pos, const int* tables,
                                     const int* table_off, float* out, int row_len, int n_heads,
                                     int n_kv, int hd, int bs, float scale) {
    extern __shared__ float sh[];
    float* q = sh;
    float* p = sh + hd;
    float* red = p + ATT_THREADS;
    int t = rows ? rows[blockIdx.x] : (int)blockIdx.x, h = blockIdx.y;
    int g = h / (n_heads / n_kv);
    int n_keys = pos[t] + 1;
    const int* table = tables + table_off[tok_seq[t]];
    const float* qrow = qkv + (u64)t * row_len + (u64)h * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) q[d] = qrow[d];
    __syncthreads();
    u64 bf = (u64)2 * n_kv * hd * bs;
    u64 k_off = (u64)g * hd * bs;
    u64 v_off = (u64)(n_kv + g) * hd * bs;
    float acc[ATT_DIMS];
    for (int i = 0; i < ATT_DIMS; ++i) acc[i] = 0.0f;
    float m = NEG_INF, l = 0.0f;
    for (int k0 = 0; k0 < n_keys; k0 += blockDim.x) {
        int k = k0 + threadIdx.x;
        float s = NEG_INF;
        if (k < n_keys) {
            const kv_t* kp = kv + (u64)table[k / bs] * bf + k_off + (k % bs);
            float dot = 0.0f;
            for (int d = 0; d < hd; ++d) dot = fmaf(q[d], kv_load(kp[(u64)d * bs]), dot);
            s = dot * scale;
        }
        float m_new = fmaxf(m, block_max(s, red));
        float e = (k < n_keys) ? expf(s - m_new) : 0.0f;
        p[threadIdx.x] = e;
        float tile_sum = block_sum(e, red); /* its barriers also publish p */
        float corr = expf(m - m_new);
        l = l * corr + tile_sum;
        int n_tile = n_keys - k0 < (int)blockDim.x ? n_keys - k0 : (int)blockDim.x;
        for (int i = 0; i < ATT_DIMS; ++i) {
            int d = threadIdx.x + i * blockDim.x;
            if (d < hd) {
                float a = acc[i] * corr;
                for (int j = 0; j < n_tile; ++j) {
                    int kk = k0 + j;
                    const kv_t* vp = kv + (u64)table[kk / bs] * bf + v_off + (u64)(kk % bs) * hd;
                    a = fmaf(p[j], kv_load(vp[d]), a);
                }
                acc[i] = a;
            }
        }
        m = m_new;
        __syncthreads(); /* p is rewritten by the next tile */
    }
    float* o = out + (u64)t * n_heads * hd + (u64)h * hd;
    for (int i = 0; i < ATT_DIMS; ++i) {
        int d = threadIdx.x + i * blockDim.x;
        if (d < hd) o[d] = acc[i] / l;
    }
}

/* Flash-decoding: the attention of decode rows (one query token each, or a
   few draft tokens) with a sequence's keys cut into fixed parts of `chunk`
   keys, each part computed by its own thread block, then merged by
   attention_combine. The per-token kernel gives one block to a whole
   context, a long chain of dependent loads on a few of the card's
   multiprocessors; here a step of one sequence still fills the card.
   The parts depend only on the position (never on the batch or the grid),
   and are merged in order, so a row's output is the same whatever else
   the step holds.
   Grid (rows, n_kv * ceil(G / SPLIT_G), Z), SPLIT_WARPS warps: a block
   takes up to SPLIT_G query heads of one KV head (G = n_heads / n_kv: the
   heads that share K and V, which it reads once for all of them) and the
   parts z, z + Z, z + 2 Z, .. of row rows[blockIdx.x] (blockIdx.x when rows
   is null). Per tile of SPLIT_TK keys: lane j of every warp dots key j with
   the queries over a quarter of the dimensions, the quarters are summed
   in shared memory, warp w takes the softmax of heads w, w + 4, .. (online,
   as the per-token kernel's), then warp w accumulates values of keys
   w, w + 4, .. over dimensions lane + 32 i; at the end of a part the warps'
   sums are added. part[((r n_heads + h) max_parts + p) (hd + 2) ..] =
   (max score, sum of exponentials, unnormalised output).
   Dynamic shared memory: ge (hd + (SPLIT_WARPS + 1) SPLIT_TK + 3
   + SPLIT_WARPS hd) floats, ge = min(G, SPLIT_G). */
#define SPLIT_WARPS 4
#define SPLIT_TK 32
#define SPLIT_G 8
#define SPLIT_DIMS 8
extern "C" __global__ void attention_split(const int* rows, const float* qkv, const kv_t* kv,
                                           const int* tok_seq, const int* pos, const int* tables,
                                           const int* table_off, float* part, int row_len,
                                           int n_heads, int n_kv, int hd, int bs, float scale,
                                           int chunk, int max_parts) {
    extern __shared__ float sh[];
    int G = n_heads / n_kv;
    int ge = G < SPLIT_G ? G : SPLIT_G;
    int gchunks = (G + SPLIT_G - 1) / SPLIT_G;
    float* q = sh;                               /* [ge][hd] */
    float* sdot = q + ge * hd;                   /* [SPLIT_WARPS][ge][SPLIT_TK] */
    float* p = sdot + SPLIT_WARPS * ge * SPLIT_TK; /* [ge][SPLIT_TK] */
    float* m_run = p + ge * SPLIT_TK;            /* [ge] */
    float* l_run = m_run + ge;                   /* [ge] */
    float* corr = l_run + ge;                    /* [ge] */
    float* wacc = corr + ge;                     /* [SPLIT_WARPS][ge][hd] */
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int r = blockIdx.x;
    int t = rows ? rows[r] : r;
    int kvh = blockIdx.y / gchunks;
    int h0 = kvh * G + (blockIdx.y % gchunks) * SPLIT_G;
    int ng = kvh * G + G - h0;
    if (ng > SPLIT_G) ng = SPLIT_G;
    int n_keys = pos[t] + 1;
    int n_parts = (n_keys + chunk - 1) / chunk;
    if (n_parts > max_parts) n_parts = max_parts; /* past the context: never written beyond */
    const int* table = tables + table_off[tok_seq[t]];
    u64 bf = (u64)2 * n_kv * hd * bs;
    u64 k_off = (u64)kvh * hd * bs;
    u64 v_off = (u64)(n_kv + kvh) * hd * bs;
    for (int i = threadIdx.x; i < ng * hd; i += blockDim.x)
        q[i] = qkv[(u64)t * row_len + (u64)h0 * hd + i];
    int dpw = (hd + SPLIT_WARPS - 1) / SPLIT_WARPS;
    int d0 = warp * dpw, d1 = d0 + dpw < hd ? d0 + dpw : hd;
    for (int pi = blockIdx.z; pi < n_parts; pi += gridDim.z) {
        int k_begin = pi * chunk;
        int k_end = k_begin + chunk < n_keys ? k_begin + chunk : n_keys;
        if ((int)threadIdx.x < ng) {
            m_run[threadIdx.x] = NEG_INF;
            l_run[threadIdx.x] = 0.0f;
        }
        float acc[SPLIT_G][SPLIT_DIMS];
        #pragma unroll
        for (int g = 0; g < SPLIT_G; ++g)
            #pragma unroll
            for (int i = 0; i < SPLIT_DIMS; ++i) acc[g][i] = 0.0f;
        for (int k0 = k_begin; k0 < k_end; k0 += SPLIT_TK) {
            int n_tile = k_end - k0 < SPLIT_TK ? k_end - k0 : SPLIT_TK;
            __syncthreads(); /* q written; the previous tile's p and corr consumed */
            float dot[SPLIT_G];
            #pragma unroll
            for (int g = 0; g < SPLIT_G; ++g) dot[g] = 0.0f;
            if (lane < n_tile) {
                int k = k0 + lane;
                /* K is [dim][slot] in a block: lanes read consecutive slots. */
                const kv_t* kp = kv + (u64)table[k / bs] * bf + k_off + (k % bs);
                #pragma unroll 8
                for (int d = d0; d < d1; ++d) {
                    float kd = kv_load(kp[(u64)d * bs]);
                    #pragma unroll
                    for (int g = 0; g < SPLIT_G; ++g)
                        if (g < ng) dot[g] = fmaf(q[g * hd + d], kd, dot[g]);
                }
            }
            #pragma unroll
            for (int g = 0; g < SPLIT_G; ++g)
                if (g < ng) sdot[(warp * ge + g) * SPLIT_TK + lane] = dot[g];
            __syncthreads();
            for (int g = warp; g < ng; g += SPLIT_WARPS) {
                float s = NEG_INF;
                if (lane < n_tile) {
                    float d = 0.0f;
                    for (int w = 0; w < SPLIT_WARPS; ++w) d += sdot[(w * ge + g) * SPLIT_TK + lane];
                    s = d * scale;
                }
                /* Key k0 is in the tile, so the new maximum is finite. */
                float m_old = m_run[g];
                float m_new = fmaxf(m_old, warp_max(s));
                float e = lane < n_tile ? expf(s - m_new) : 0.0f;
                p[g * SPLIT_TK + lane] = e;
                float tile_sum = warp_sum(e);
                if (lane == 0) {
                    float c = expf(m_old - m_new);
                    corr[g] = c;
                    m_run[g] = m_new;
                    l_run[g] = l_run[g] * c + tile_sum;
                }
            }
            __syncthreads();
            #pragma unroll
            for (int g = 0; g < SPLIT_G; ++g) {
                if (g < ng) {
                    float c = corr[g];
                    #pragma unroll
                    for (int i = 0; i < SPLIT_DIMS; ++i) acc[g][i] *= c;
                }
            }
            /* V is [slot][dim]: lanes read consecutive dimensions. */
            for (int j = warp; j < n_tile; j += SPLIT_WARPS) {
                int kk = k0 + j;
                const kv_t* vp = kv + (u64)table[kk / bs] * bf + v_off + (u64)(kk % bs) * hd;
                float v[SPLIT_DIMS];
                #pragma unroll
                for (int i = 0; i < SPLIT_DIMS; ++i) {
                    int d = lane + 32 * i;
                    v[i] = d < hd ? kv_load(vp[d]) : 0.0f;
                }
                #pragma unroll
                for (int g = 0; g < SPLIT_G; ++g) {
                    if (g < ng) {
                        float pj = p[g * SPLIT_TK + j];
                        #pragma unroll
                        for (int i = 0; i < SPLIT_DIMS; ++i) acc[g][i] = fmaf(pj, v[i], acc[g][i]);
                    }
                }
            }
        }
        #pragma unroll
        for (int g = 0; g < SPLIT_G; ++g) {
            if (g < ng) {
                #pragma unroll
                for (int i = 0; i < SPLIT_DIMS; ++i) {
                    int d = lane + 32 * i;
                    if (d < hd) wacc[(warp * ge + g) * hd + d] = acc[g][i];
                }
            }
        }
        __syncthreads();
        for (int i = threadIdx.x; i < ng * hd; i += blockDim.x) {
            int g = i / hd, d = i % hd;
            float a = 0.0f;
            for (int w = 0; w < SPLIT_WARPS; ++w) a += wacc[(w * ge + g) * hd + d];
            float* pp = part + (((u64)r * n_heads + h0 + g) * max_parts + pi) * (hd + 2);
            pp[2 + d] = a;
            if (d == 0) {
                pp[0] = m_run[g];
                pp[1] = l_run[g];
            }
        }
        __syncthreads(); /* wacc and the running statistics are read */
    }
}

/* The output of each decode row and query head from its parts (see
   attention_split), merged in order: out = sum_p e^(m_p - M) acc_p /
   sum_p e^(m_p - M) l_p, M the largest m_p. Grid (rows, heads), ATT_THREADS
   threads; static shared memory for the parts' weights. */
#define SPLIT_MAX_PARTS 128
extern "C" __global__ void attention_combine(const int* rows, const int* pos, const float* part,
                                             float* out, int n_heads, int hd, int chunk,
                                             int max_parts) {
    __shared__ float wt[SPLIT_MAX_PARTS];
    int r = blockIdx.x, h = blockIdx.y;
    int t = rows ? rows[r] : r;
    int n_parts = (pos[t] + 1 + chunk - 1) / chunk;
    if (n_parts > max_parts) n_parts = max_parts;
    const float* pp = part + ((u64)r * n_heads + h) * max_parts * (hd + 2);
    if (threadIdx.x == 0) {
        float mx = NEG_INF;
        for (int i = 0; i < n_parts; ++i) mx = fmaxf(mx, pp[(u64)i * (hd + 2)]);
        float l = 0.0f;
        for (int i = 0; i < n_parts; ++i) {
            float w = expf(pp[(u64)i * (hd + 2)] - mx);
            wt[i] = w;
            l += w * pp[(u64)i * (hd + 2) + 1];
        }
        for (int i = 0; i < n_parts; ++i) wt[i] /= l;
    }
    __syncthreads();
    float* o = out + (u64)t * n_heads * hd + (u64)h * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.0f;
        for (int i = 0; i < n_parts; ++i) a = fmaf(wt[i], pp[(u64)i * (hd + 2) + 2 + d], a);
        o[d] = a;
    }
}

/* Flash-style causal attention of a tile of up to TILE_Q query tokens of one
   sequence (consecutive rows) and one query head: each tile of TILE_K keys
   and values is read from the paged KV into shared memory once and serves
   every query of the tile, where the per-token kernel reads the whole
   prefix once per query. tiles[3 b ..] = (first row, rows, keys: the
   largest position + 1). Grid (tiles, heads), TILE_THREADS threads = 4
   warps: warp w owns query rows w, w + 4, w + 8, w + 12; lane j scores key
   j of the key tile and owns output dimensions lane + 32 i (hd <= 128, a
   multiple of 4). The online softmax is the per-token kernel's, per row.
   Shared memory bounds the kernel, so each value read from it serves all
   four rows of a warp: a key's four dimensions (K is kept [dim][key],
   lanes reading consecutive words) meet the rows' queries read four at a
   time, and a value's dimensions meet every row's weight of that key.
   Dynamic shared memory: (TILE_Q hd + 2 TILE_K hd + 4 TILE_K) floats (the
   last, where each key of the tile begins). */
/* Where key k's K and V begin in one layer's paged KV (through its
   sequence's block table; ~0 past the n_keys keys), into slot
   threadIdx.x of k_at and v_at: one table lookup a key, for the kernels
   that read a tile of keys into shared memory. */
__device__ void key_offsets(u64* k_at, u64* v_at, int k, int n_keys, const int* table, u64 bf,
                            u64 k_off, u64 v_off, int hd, int bs) {
    u64 base = k < n_keys ? (u64)table[k / bs] * bf : 0;
    k_at[threadIdx.x] = k < n_keys ? base + k_off + k % bs : ~0ull;
    v_at[threadIdx.x] = k < n_keys ? base + v_off + (u64)(k % bs) * hd : ~0ull;
}

#define TILE_Q 16
#define TILE_K 32
#define TILE_ROWS (TILE_Q / 4)
extern "C" __global__ void attention_tiled(const int* tiles, const float* qkv, const kv_t* kv,
                                           const int* tok_seq, const int* pos,
                                           const int* tables, const int* table_off, float* out,
                                           int row_len, int n_heads, int n_kv, int hd, int bs,
                                           float scale) {
    extern __shared__ float sh[];
    float* qs = sh;                    /* [TILE_Q][hd] */
    float* ks = qs + TILE_Q * hd;      /* [hd][TILE_K] */
    float* vs = ks + TILE_K * hd;      /* [TILE_K][hd] */
    u64* k_at = (u64*)(vs + TILE_K * hd); /* [TILE_K]: ~0 past the keys */
    u64* v_at = k_at + TILE_K;             /* [TILE_K] */
    const int* tile = tiles + 3 * blockIdx.x;
    int t0 = tile[0], nq = tile[1], n_keys = tile[2];
    int h = blockIdx.y, g = h / (n_heads / n_kv);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int* table = tables + table_off[tok_seq[t0]];
    for (int i = threadIdx.x; i < TILE_Q * hd; i += blockDim.x) {
        int r = i / hd, d = i % hd;
        qs[i] = r < nq ? qkv[(u64)(t0 + r) * row_len + (u64)h * hd + d] : 0.0f;
    }
    u64 bf = (u64)2 * n_kv * hd * bs;
    u64 k_off = (u64)g * hd * bs;
    u64 v_off = (u64)(n_kv + g) * hd * bs;
    float acc[TILE_ROWS][4], m[TILE_ROWS], l[TILE_ROWS];
    int qpos[TILE_ROWS];
    #pragma unroll
    for (int rr = 0; rr < TILE_ROWS; ++rr) {
        int r = warp + 4 * rr;
        qpos[rr] = r < nq ? pos[t0 + r] : -1;
        m[rr] = NEG_INF;
        l[rr] = 0.0f;
        #pragma unroll
        for (int i = 0; i < 4; ++i) acc[rr][i] = 0.0f;
    }
    for (int k0 = 0; k0 < n_keys; k0 += TILE_K) {
        __syncthreads(); /* the previous key tile is consumed (and qs written) */
        if (threadIdx.x < TILE_K)
            key_offsets(k_at, v_at, k0 + threadIdx.x, n_keys, table, bf, k_off, v_off, hd, bs);
        __syncthreads();
        /* K is [dim][slot] in a block, and [dim][key] here: lane j reads
           key j (consecutive slots), writes consecutive words. */
        for (int d = warp; d < hd; d += 4) {
            u64 at = k_at[lane];
            ks[d * TILE_K + lane] = at != ~0ull ? kv_load(kv[at + (u64)d * bs]) : 0.0f;
        }
        /* V is [slot][dim]: lanes read consecutive dimensions. */
        for (int j = warp; j < TILE_K; j += 4) {
            u64 at = v_at[j];
            for (int d = lane; d < hd; d += 32) vs[j * hd + d] = at != ~0ull ? kv_load(kv[at + d]) : 0.0f;
        }
        __syncthreads();
        int k = k0 + lane;
        /* The scores of key k for the warp's rows, dimensions in order. */
        float dot[TILE_ROWS];
        #pragma unroll
        for (int rr = 0; rr < TILE_ROWS; ++rr) dot[rr] = 0.0f;
        #pragma unroll 2
        for (int d = 0; d < hd; d += 4) {
            float k_0 = ks[(d + 0) * TILE_K + lane], k_1 = ks[(d + 1) * TILE_K + lane];
            float k_2 = ks[(d + 2) * TILE_K + lane], k_3 = ks[(d + 3) * TILE_K + lane];
            #pragma unroll
            for (int rr = 0; rr < TILE_ROWS; ++rr) {
                float4 q = *(const float4*)(qs + (warp + 4 * rr) * hd + d);
                float a = dot[rr];
                a = fmaf(q.x, k_0, a);
                a = fmaf(q.y, k_1, a);
                a = fmaf(q.z, k_2, a);
                a = fmaf(q.w, k_3, a);
                dot[rr] = a;
            }
        }
        float p[TILE_ROWS];
        #pragma unroll
        for (int rr = 0; rr < TILE_ROWS; ++rr) {
            p[rr] = 0.0f;
            /* Uniform across the warp: no row, or no key of this tile visible. */
            if (qpos[rr] < k0) continue;
            bool visible = k <= qpos[rr];
            float s = visible ? dot[rr] * scale : NEG_INF;
            /* Key k0 is visible, so the new maximum is finite. */
            float m_new = fmaxf(m[rr], warp_max(s));
            p[rr] = visible ? expf(s - m_new) : 0.0f;
            float corr = expf(m[rr] - m_new);
            l[rr] = l[rr] * corr + warp_sum(p[rr]);
            #pragma unroll
            for (int i = 0; i < 4; ++i) acc[rr][i] *= corr;
            m[rr] = m_new;
        }
        /* Rows without a visible key here add p = 0 times a value: their
           sums stay as they were. */
        #pragma unroll 4
        for (int j = 0; j < TILE_K; ++j) {
            float v[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                int d = lane + 32 * i;
                v[i] = d < hd ? vs[j * hd + d] : 0.0f;
            }
            #pragma unroll
            for (int rr = 0; rr < TILE_ROWS; ++rr) {
                float pj = __shfl_sync(0xffffffffu, p[rr], j);
                #pragma unroll
                for (int i = 0; i < 4; ++i) acc[rr][i] = fmaf(pj, v[i], acc[rr][i]);
            }
        }
    }
    #pragma unroll
    for (int rr = 0; rr < TILE_ROWS; ++rr) {
        int r = warp + 4 * rr;
        if (r >= nq) continue;
        float* o = out + (u64)(t0 + r) * n_heads * hd + (u64)h * hd;
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            int d = lane + 32 * i;
            if (d < hd) o[d] = acc[rr][i] / l[rr];
        }
    }
}

/* Two floats as the BF16 pair of one 32-bit register of an mma fragment:
   lo in the low half (the lower index), hi in the high half. */
__device__ unsigned int pack_bf16(float lo, float hi) {
    return (unsigned int)f32_to_bf16_bits(lo) | ((unsigned int)f32_to_bf16_bits(hi) << 16);
}

/* d += a b, one warp's m16n8k16 tensor-core multiply of BF16 with f32
   accumulation. Fragments as PTX lays them out, g = lane / 4, c = lane % 4:
   a[r] holds A[g + 8 (r % 2)][2 c + 8 (r / 2) + {0, 1}] (16 x 16, rows);
   b[r] holds B[2 c + 8 r + {0, 1}][g] (16 x 8, by column);
   d[r] is D[g + 8 (r / 2)][2 c + (r % 2)] (16 x 8). */
__device__ void mma_bf16_16816(float* d, const unsigned int* a, const unsigned int* b) {
#ifdef TANDEM_EMULATION
    emulated_mma_bf16_16816(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

/* The prompt tiles of attention_tiled (the same tiles, causal rule and
   online softmax) on the tensor cores, for models with BF16 weights:
   queries, keys, values and the softmax weights rounded to BF16, products
   summed in f32 by mma.sync m16n8k16, the softmax itself in f32.
   Grid (tiles, n_kv * ceil(G / MMA_WARPS)), MMA_WARPS warps: the block
   reads each tile of MMA_TK keys and values of one KV head into shared
   memory once, as BF16, and warp w computes query head h0 + w (the G
   query heads share the KV head) for the tile's up to 16 rows, one row of
   the multiplies' M; a warp without a head only loads. Per key tile,
   S = Q K^T (scores of 8 keys an mma), masked and scaled, the running
   maxima and sums updated, then O += P V with P taken straight from S's
   registers (its layout is the A operand's). hd: a multiple of 16, at most
   MMA_MAX_HD. Dynamic shared memory: K [key][dim] (MMA_TK (hd + 8) BF16,
   pairs of dimensions one word) and V [dim][key] (hd (MMA_TK + 8) BF16,
   pairs of keys one word), then 2 MMA_TK u64 (where each key begins). */
#define MMA_WARPS 4
#define MMA_TK 64
#define MMA_MAX_HD 128
extern "C" __global__ void attention_mma(const int* tiles, const float* qkv, const kv_t* kv,
                                         const int* tok_seq, const int* pos, const int* tables,
                                         const int* table_off, float* out, int row_len,
                                         int n_heads, int n_kv, int hd, int bs, float scale) {
    extern __shared__ float sh[];
    int kst = hd + 8, vst = MMA_TK + 8;
    unsigned short* ks = (unsigned short*)sh; /* [MMA_TK][kst] */
    unsigned short* vs = ks + MMA_TK * kst;   /* [hd][vst] */
    u64* k_at = (u64*)(vs + hd * vst);        /* [MMA_TK]: ~0 past the keys */
    u64* v_at = k_at + MMA_TK;
    const int* tile = tiles + 3 * blockIdx.x;
    int t0 = tile[0], nq = tile[1], n_keys = tile[2];
    int G = n_heads / n_kv;
    int gchunks = (G + MMA_WARPS - 1) / MMA_WARPS;
    int kvh = blockIdx.y / gchunks;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int h = kvh * G + (blockIdx.y % gchunks) * MMA_WARPS + warp;
    bool has_head = h < kvh * G + G; /* the same for the whole warp */
    int g = lane >> 2, c = lane & 3;
    const int* table = tables + table_off[tok_seq[t0]];
    u64 bf = (u64)2 * n_kv * hd * bs;
    u64 k_off = (u64)kvh * hd * bs;
    u64 v_off = (u64)(n_kv + kvh) * hd * bs;
    /* This lane's two rows of the tile, g and g + 8: their positions
       (-1: no such row, nothing visible). */
    int qp[2];
    qp[0] = g < nq ? pos[t0 + g] : -1;
    qp[1] = g + 8 < nq ? pos[t0 + g + 8] : -1;
    /* The queries as A fragments, k-step s over dimensions 16 s ..; rows
       past the tile are zeros. */
    unsigned int qa[MMA_MAX_HD / 16][4];
    #pragma unroll
    for (int st = 0; st < MMA_MAX_HD / 16; ++st) {
        #pragma unroll
        for (int r = 0; r < 4; ++r) {
            int row = g + 8 * (r % 2), d = 16 * st + 2 * c + 8 * (r / 2);
            float lo = 0.0f, hi = 0.0f;
            if (has_head && row < nq && d < hd) {
                const float* q = qkv + (u64)(t0 + row) * row_len + (u64)h * hd + d;
                lo = q[0];
                hi = q[1];
            }
            qa[st][r] = pack_bf16(lo, hi);
        }
    }
    float o[MMA_MAX_HD / 8][4];
    #pragma unroll
    for (int n = 0; n < MMA_MAX_HD / 8; ++n)
        #pragma unroll
        for (int r = 0; r < 4; ++r) o[n][r] = 0.0f;
    /* Running maximum (whole row) and sum (this lane's columns) of rows
       g and g + 8. */
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    for (int k0 = 0; k0 < n_keys; k0 += MMA_TK) {
        __syncthreads(); /* the previous key tile is consumed */
        if (threadIdx.x < MMA_TK)
            key_offsets(k_at, v_at, k0 + threadIdx.x, n_keys, table, bf, k_off, v_off, hd, bs);
        __syncthreads();
        /* K is [dim][slot] in a block: consecutive threads read consecutive
           keys. Keys past the context are zeros (and masked below). */
        for (int i = threadIdx.x; i < MMA_TK * hd; i += blockDim.x) {
            int d = i / MMA_TK, j = i % MMA_TK;
            u64 at = k_at[j];
            float v = at != ~0ull ? kv_load(kv[at + (u64)d * bs]) : 0.0f;
            ks[j * kst + d] = f32_to_bf16_bits(v);
        }
        /* V is [slot][dim]: consecutive threads read consecutive dimensions. */
        for (int i = threadIdx.x; i < MMA_TK * hd; i += blockDim.x) {
            int j = i / hd, d = i % hd;
            u64 at = v_at[j];
            float v = at != ~0ull ? kv_load(kv[at + d]) : 0.0f;
            vs[d * vst + j] = f32_to_bf16_bits(v);
        }
        __syncthreads();
        if (!has_head) continue;
        float sc[MMA_TK / 8][4];
        #pragma unroll
        for (int n = 0; n < MMA_TK / 8; ++n) {
            #pragma unroll
            for (int r = 0; r < 4; ++r) sc[n][r] = 0.0f;
            const unsigned short* kr = ks + (n * 8 + g) * kst + 2 * c;
            #pragma unroll
            for (int st = 0; st < MMA_MAX_HD / 16; ++st) {
                if (16 * st < hd) {
                    unsigned int b[2];
                    b[0] = *(const unsigned int*)(kr + 16 * st);
                    b[1] = *(const unsigned int*)(kr + 16 * st + 8);
                    mma_bf16_16816(sc[n], qa[st], b);
                }
            }
        }
        /* Mask, scale, and the new row maxima (over the 4 lanes of a row). */
        float mx[2] = {NEG_INF, NEG_INF};
        #pragma unroll
        for (int n = 0; n < MMA_TK / 8; ++n) {
            #pragma unroll
            for (int r = 0; r < 4; ++r) {
                int key = k0 + 8 * n + 2 * c + (r % 2);
                float v = key <= qp[r / 2] ? sc[n][r] * scale : NEG_INF;
                sc[n][r] = v;
                mx[r / 2] = fmaxf(mx[r / 2], v);
            }
        }
        float base[2], corr[2];
        #pragma unroll
        for (int i = 0; i < 2; ++i) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            float m_new = fmaxf(m[i], mx[i]);
            /* A row with nothing visible yet keeps weights 0, not NaN. */
            base[i] = m_new == NEG_INF ? 0.0f : m_new;
            corr[i] = expf(m[i] - base[i]);
            m[i] = m_new;
            l[i] *= corr[i];
        }
        #pragma unroll
        for (int n = 0; n < MMA_MAX_HD / 8; ++n) {
            #pragma unroll
            for (int r = 0; r < 4; ++r) o[n][r] *= corr[r / 2];
        }
        /* P in BF16, as the A fragments of k-steps of 16 keys: the scores
           of keys 16 s .. 16 s + 7 (sc[2 s]) and the next 8 (sc[2 s + 1]);
           the sums add the rounded weights that multiply V. */
        #pragma unroll
        for (int st = 0; st < MMA_TK / 16; ++st) {
            unsigned int pa[4];
            #pragma unroll
            for (int r = 0; r < 4; ++r) {
                int row = r % 2; /* a[r]: row g + 8 (r % 2), keys + 8 (r / 2) */
                float lo = expf(sc[2 * st + r / 2][2 * row] - base[row]);
                float hi = expf(sc[2 * st + r / 2][2 * row + 1] - base[row]);
                pa[r] = pack_bf16(lo, hi);
                l[row] += __uint_as_float(pa[r] << 16) + __uint_as_float(pa[r] & 0xffff0000u);
            }
            #pragma unroll
            for (int n = 0; n < MMA_MAX_HD / 8; ++n) {
                if (8 * n < hd) {
                    const unsigned short* vr = vs + (n * 8 + g) * vst + 16 * st + 2 * c;
                    unsigned int b[2];
                    b[0] = *(const unsigned int*)vr;
                    b[1] = *(const unsigned int*)(vr + 8);
                    mma_bf16_16816(o[n], pa, b);
                }
            }
        }
    }
    if (!has_head) return;
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
    #pragma unroll
    for (int n = 0; n < MMA_MAX_HD / 8; ++n) {
        #pragma unroll
        for (int r = 0; r < 4; ++r) {
            int row = g + 8 * (r / 2), d = 8 * n + 2 * c + (r % 2);
            if (row < nq && d < hd)
                out[(u64)(t0 + row) * n_heads * hd + (u64)h * hd + d] = o[n][r] / l[r / 2];
        }
    }
}

/* ids[r] = the first index of the largest value of logits row rows[r]
   (row r when rows is null; `vocab` values each), as the host's argmax:
   one block per row; each
   thread keeps the first largest of its strided values, then pairs reduce
   by value, ties to the lower index. A row of -inf picks 0, as the host
   does. */
extern "C" __global__ void argmax_rows(const float* logits, const int* rows, int* ids, int vocab) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    const float* row = logits + (u64)(rows ? rows[blockIdx.x] : (int)blockIdx.x) * vocab;
    float v = NEG_INF;
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float x = row[i];
        if (x > v) {
            v = x;
            idx = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > v || (ov == v && oi < idx)) {
            v = ov;
            idx = oi;
        }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        best_v[warp] = v;
        best_i[warp] = idx;
    }
    __syncthreads();
    if (warp == 0) {
        int nw = (blockDim.x + 31) >> 5;
        v = lane < nw ? best_v[lane] : NEG_INF;
        idx = lane < nw ? best_i[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, v, o);
            int oi = __shfl_xor_sync(0xffffffffu, idx, o);
            if (ov > v || (ov == v && oi < idx)) {
                v = ov;
                idx = oi;
            }
        }
        if (lane == 0) ids[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;
    }
}

/* Order-preserving key of a float: a larger value in Rust's total_cmp
   order (-NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN) has a larger key. */
__device__ unsigned int order_key(float f) {
    unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

#define TOPK_MAX 256
#define TOPK_THREADS 512
/* The k = ks[r] largest values of logits row rows[r] (row r when rows is
   null; `vocab` values each, 1 <= k <= min(TOPK_MAX, vocab)), as the host's
   top_k_of: largest first, ties to the lower index; into ids[r TOPK_MAX ..]
   and vals[r TOPK_MAX ..]. One block of TOPK_THREADS per row:
   1. a radix select, eight bits of the key a pass from the top, finds the
      key T of the k-th largest value and how many values equal to T are
      among the k (need);
   2. every value above T is taken, and the `need` values equal to T of
      lowest index (each thread owns a contiguous range of indices, and a
      block scan of their tie counts orders them);
   3. a bitonic sort of the candidates in shared memory. */
extern "C" __global__ void topk_rows(const float* logits, const int* rows, const int* ks,
                                     int vocab, float* vals, int* ids) {
    __shared__ unsigned int hist[256];
    __shared__ unsigned int cand_key[TOPK_MAX];
    __shared__ int cand_id[TOPK_MAX];
    __shared__ int scan[TOPK_THREADS];
    __shared__ unsigned int s_bin, s_need;
    __shared__ int s_count;
    const float* row = logits + (u64)(rows ? rows[blockIdx.x] : (int)blockIdx.x) * vocab;
    int k = ks[blockIdx.x];
    unsigned int prefix = 0u, mask = 0u, need = (unsigned int)k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
        __syncthreads();
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            unsigned int key = order_key(row[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            /* The highest bin whose count, with the bins above it, reaches need. */
            unsigned int above = 0u;
            int b = 255;
            for (; b > 0; --b) {
                if (above + hist[b] >= need) break;
                above += hist[b];
            }
            s_bin = (unsigned int)b;
            s_need = need - above;
        }
        __syncthreads();
        prefix |= s_bin << shift;
        mask |= 0xffu << shift;
        need = s_need;
        __syncthreads(); /* s_bin and s_need are read before the next pass rewrites them */
    }
    /* prefix is now T; need of the values equal to it are among the k. */
    if (threadIdx.x == 0) s_count = 0;
    int chunk = (vocab + (int)blockDim.x - 1) / (int)blockDim.x;
    int lo = (int)threadIdx.x * chunk;
    int hi = lo + chunk < vocab ? lo + chunk : vocab;
    int ties = 0;
    for (int i = lo; i < hi; ++i) ties += order_key(row[i]) == prefix;
    scan[threadIdx.x] = ties;
    __syncthreads();
    for (int o = 1; o < (int)blockDim.x; o <<= 1) {
        int v = (int)threadIdx.x >= o ? scan[threadIdx.x - o] : 0;
        __syncthreads();
        scan[threadIdx.x] += v;
        __syncthreads();
    }
    int rank = scan[threadIdx.x] - ties; /* ties at lower indices */
    int above_n = k - (int)need;
    for (int i = lo; i < hi; ++i) {
        unsigned int key = order_key(row[i]);
        if (key > prefix) {
            int slot = atomicAdd(&s_count, 1);
            cand_key[slot] = key;
            cand_id[slot] = i;
        } else if (key == prefix) {
            if (rank < (int)need) {
                cand_key[above_n + rank] = key;
                cand_id[above_n + rank] = i;
            }
            ++rank;
        }
    }
    for (int i = k + (int)threadIdx.x; i < TOPK_MAX; i += blockDim.x) {
        cand_key[i] = 0u;
        cand_id[i] = 0x7fffffff;
    }
    __syncthreads();
    /* Bitonic sort into "comes first" order: larger key, then lower index. */
    for (int size = 2; size <= TOPK_MAX; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < TOPK_MAX; i += blockDim.x) {
                int j = i ^ stride;
                if (j > i) {
                    unsigned int ki = cand_key[i], kj = cand_key[j];
                    int ii = cand_id[i], ij = cand_id[j];
                    bool i_first = ki > kj || (ki == kj && ii < ij);
                    bool forward = (i & size) == 0;
                    if (forward != i_first) {
                        cand_key[i] = kj;
                        cand_key[j] = ki;
                        cand_id[i] = ij;
                        cand_id[j] = ii;
                    }
                }
            }
            __syncthreads();
        }
    }
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        ids[(u64)blockIdx.x * TOPK_MAX + i] = cand_id[i];
        vals[(u64)blockIdx.x * TOPK_MAX + i] = row[cand_id[i]];
    }
}

/* KV block dst_idx[b] (b when null) of dst = block src_idx[b] (b when null)
   of src, bf values each: one thread block per KV block. kv_export gathers
   a sequence's blocks of the device KV into a contiguous f32 buffer (the
   host's layout), kv_import scatters such a buffer into it. */
extern "C" __global__ void kv_export(const kv_t* src, const int* src_idx, float* dst,
                                     const int* dst_idx, long long bf) {
    int b = blockIdx.x;
    const kv_t* s = src + (u64)(src_idx ? src_idx[b] : b) * (u64)bf;
    float* d = dst + (u64)(dst_idx ? dst_idx[b] : b) * (u64)bf;
    for (long long i = threadIdx.x; i < bf; i += blockDim.x) d[i] = kv_load(s[i]);
}

extern "C" __global__ void kv_import(const float* src, const int* src_idx, kv_t* dst,
                                     const int* dst_idx, long long bf) {
    int b = blockIdx.x;
    const float* s = src + (u64)(src_idx ? src_idx[b] : b) * (u64)bf;
    kv_t* d = dst + (u64)(dst_idx ? dst_idx[b] : b) * (u64)bf;
    for (long long i = threadIdx.x; i < bf; i += blockDim.x) d[i] = kv_store(s[i]);
}

/* act[t][j] = silu(gu[t][j]) * gu[t][ffn + j], silu(g) = g / (1 + e^-g);
   with `act_bf16`, also rounded to BF16 there (the down projection's input). */
extern "C" __global__ void silu_mul(const float* gu, float* act, unsigned short* act_bf16,
                                    long long n_tok, int ffn) {
    long long n = n_tok * (long long)ffn;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long t = i / ffn, j = i % ffn;
        float g = gu[t * 2 * ffn + j], u = gu[t * 2 * ffn + ffn + j];
        float s = g / (1.0f + expf(-g));
        float a = s * u;
        act[i] = a;
        if (act_bf16) act_bf16[i] = f32_to_bf16_bits(a);
    }
}

/* x += y */
extern "C" __global__ void add_in_place(float* x, const float* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] += y[i];
}

extern "C" __global__ void f32_to_bf16(const float* x, unsigned short* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = f32_to_bf16_bits(x[i]);
}

/* out[t][r] = sum_j w[r][j] x[t][j] for the n_t <= GEMV_MAX_T token rows of
   a decode step: BF16 weights (m rows of k, k a multiple of 8, rows 16-byte
   aligned), BF16 activations (what cuBLAS multiplies on this path), f32
   products and sums. A step of few tokens reads every weight once and does
   little else, so it is bound by memory bandwidth: one warp per weight row
   streams it in 16-byte loads that bypass L1 (each weight is used once),
   every load serving all the step's tokens; GEMV_ROWS rows per block.
   Grid (ceil(m / GEMV_ROWS)), GEMV_ROWS * 32 threads. */
#define GEMV_MAX_T 8
#define GEMV_ROWS 8
#define GEMV_LOADS 4
#ifndef TANDEM_EMULATION
/* 16 bytes read once: through the non-coherent path, not kept in L1. */
__device__ uint4 load_stream(const uint4* p) {
    uint4 v;
    /* Not volatile: the loads may be scheduled ahead like any other. */
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}
#endif

__device__ void bf16x8_to_f32(uint4 v, float* f) {
    unsigned int u[4] = {v.x, v.y, v.z, v.w};
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(u[i] << 16);
        f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
}

extern "C" __global__ void gemv_bf16(const unsigned short* w, const unsigned short* x,
                                     float* out, int m, int k, int n_t) {
    int lane = threadIdx.x & 31;
    int r = blockIdx.x * GEMV_ROWS + (threadIdx.x >> 5);
    if (r >= m) return;
    const uint4* wr = (const uint4*)(w + (u64)r * k);
    int chunks = k >> 3;
    float acc[GEMV_MAX_T];
    #pragma unroll
    for (int t = 0; t < GEMV_MAX_T; ++t) acc[t] = 0.0f;
    /* GEMV_LOADS loads of each lane issued before any is used: the bytes
       in flight are what a memory-bound kernel's speed is made of. */
    for (int c0 = lane; c0 < chunks; c0 += 32 * GEMV_LOADS) {
        uint4 wv[GEMV_LOADS];
        #pragma unroll
        for (int u = 0; u < GEMV_LOADS; ++u) {
            int c = c0 + 32 * u;
            if (c < chunks) wv[u] = load_stream(wr + c);
        }
        #pragma unroll
        for (int u = 0; u < GEMV_LOADS; ++u) {
            int c = c0 + 32 * u;
            if (c >= chunks) break;
            float wf[8];
            bf16x8_to_f32(wv[u], wf);
            #pragma unroll
            for (int t = 0; t < GEMV_MAX_T; ++t) {
                if (t < n_t) {
                    float xf[8];
                    bf16x8_to_f32(((const uint4*)(x + (u64)t * k))[c], xf);
                    float a = acc[t];
                    #pragma unroll
                    for (int i = 0; i < 8; ++i) a = fmaf(wf[i], xf[i], a);
                    acc[t] = a;
                }
            }
        }
    }
    #pragma unroll
    for (int t = 0; t < GEMV_MAX_T; ++t) {
        if (t < n_t) {
            float v = warp_sum(acc[t]);
            if (lane == 0) out[(u64)t * m + r] = v;
        }
    }
}

__device__ float hash_uniform(unsigned long long seed, long long i) {
    unsigned long long z = seed + (unsigned long long)i * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z = z ^ (z >> 31);
    return (float)(z >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
}

/* Synthetic weights (benchmarks): uniform in [-scale, scale]. */
extern "C" __global__ void fill_uniform_f32(float* y, long long n, unsigned long long seed, float scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = hash_uniform(seed, i) * scale;
}

extern "C" __global__ void fill_uniform_bf16(unsigned short* y, long long n, unsigned long long seed, float scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = f32_to_bf16_bits(hash_uniform(seed, i) * scale);
}
"#;

/// One kernel argument (pointers travel as `u64` device addresses).
#[derive(Clone, Copy)]
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    U64(u64),
    F32(f32),
}

/// The arguments the attention kernels share (device addresses as `u64`).
#[derive(Clone)]
pub(crate) struct AttentionArgs {
    /// `[tokens, row_len]`: each token's Q (then K and V) after RoPE.
    pub qkv: u64,
    /// One layer's paged KV.
    pub kv: u64,
    /// Sequence index of each token.
    pub tok_seq: u64,
    /// Position of each token.
    pub pos: u64,
    /// The block tables, one after another, and where each begins.
    pub tables: u64,
    pub table_off: u64,
    /// `[tokens, n_heads * hd]`.
    pub out: u64,
    pub row_len: usize,
    pub n_heads: usize,
    pub n_kv: usize,
    pub hd: usize,
    pub bs: usize,
    pub scale: f32,
}

impl AttentionArgs {
    fn args(&self) -> Result<[Arg; 13]> {
        Ok([
            Arg::Ptr(self.qkv),
            Arg::Ptr(self.kv),
            Arg::Ptr(self.tok_seq),
            Arg::Ptr(self.pos),
            Arg::Ptr(self.tables),
            Arg::Ptr(self.table_off),
            Arg::Ptr(self.out),
            Arg::I32(int(self.row_len, "qkv row")?),
            Arg::I32(int(self.n_heads, "heads")?),
            Arg::I32(int(self.n_kv, "kv heads")?),
            Arg::I32(int(self.hd, "head_dim")?),
            Arg::I32(int(self.bs, "block size")?),
            Arg::F32(self.scale),
        ])
    }
}

/// Which query tokens of a step each attention kernel takes: every run of
/// at least [`TILE_MIN_RUN`] consecutive tokens of one sequence goes to the
/// tiled kernel in tiles of up to [`TILE_Q`]; the other tokens to the
/// per-token kernel. Both write disjoint rows of one output.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct AttentionPlan {
    /// `(first token, tokens, keys)` per tile, flattened; keys is the
    /// tile's largest position + 1.
    pub tiles: Vec<i32>,
    /// Tokens for the per-token kernel.
    pub rows: Vec<i32>,
}

/// Whether prompt chunks go to the tiled kernel: yes, unless
/// `TANDEM_CUDA_ATTENTION=per-token` says to run every token through the
/// per-token kernel (to tell a kernel's fault from the rest of a step's).
fn tiles_wanted() -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| {
        std::env::var("TANDEM_CUDA_ATTENTION").map_or(true, |v| v.trim() != "per-token")
    })
}

/// Whether the tiled kernel takes heads of `head_dim`: its lanes own four
/// dimensions each and read queries four at a time.
fn tiles_fit(head_dim: usize) -> bool {
    head_dim <= TILE_MAX_HEAD_DIM && head_dim.is_multiple_of(4)
}

/// Whether the tensor-core kernel takes heads of `head_dim`: whole k-steps
/// of 16 dimensions, at most [`MMA_MAX_HEAD_DIM`] (its registers).
pub(crate) fn mma_fits(head_dim: usize) -> bool {
    head_dim.is_multiple_of(16) && head_dim <= MMA_MAX_HEAD_DIM && tiles_fit(head_dim)
}

/// Whether a BF16 model's prompt chunks take the tensor-core kernel: yes,
/// unless `TANDEM_CUDA_ATTENTION=cuda-cores` keeps them on the f32 tiled
/// kernel (or `per-token` sends everything to the per-token kernel).
pub(crate) fn tensor_cores_wanted() -> bool {
    std::env::var("TANDEM_CUDA_ATTENTION").map_or(true, |v| v.trim() != "cuda-cores")
}

/// Whether decode rows go to the split kernel: where the model's heads fit
/// it, unless `TANDEM_CUDA_ATTENTION=per-token` asks for the per-token
/// kernel everywhere.
pub(crate) fn split_wanted(c: &tandem_model::config::ModelConfig) -> bool {
    tiles_wanted() && SplitPlan::fits(c.head_dim)
}

impl AttentionPlan {
    pub(crate) fn of(tok_seq: &[usize], tok_pos: &[usize], head_dim: usize) -> Result<Self> {
        let mut plan = Self::default();
        let mut start = 0;
        while start < tok_seq.len() {
            let mut end = start + 1;
            while end < tok_seq.len() && tok_seq[end] == tok_seq[start] {
                end += 1;
            }
            if end - start >= TILE_MIN_RUN && tiles_fit(head_dim) && tiles_wanted() {
                for t0 in (start..end).step_by(TILE_Q) {
                    let t1 = (t0 + TILE_Q).min(end);
                    let keys = tok_pos[t0..t1].iter().max().map_or(0, |&p| p + 1);
                    plan.tiles.extend([
                        int(t0, "token")?,
                        int(t1 - t0, "tile")?,
                        int(keys, "keys")?,
                    ]);
                }
            } else {
                for t in start..end {
                    plan.rows.push(int(t, "token")?);
                }
            }
            start = end;
        }
        Ok(plan)
    }

    pub(crate) fn n_tiles(&self) -> usize {
        self.tiles.len() / 3
    }
}

/// How the split attention kernel cuts a decode row's keys: parts of
/// `chunk` keys, at most `max_parts` of them for the model's context. The
/// cut depends on the model alone, so a row's output does not depend on
/// the batch it runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SplitPlan {
    pub chunk: usize,
    pub max_parts: usize,
}

impl SplitPlan {
    /// Parts of one key tile, or longer ones where a context of
    /// `context` tokens would need more than [`SPLIT_MAX_PARTS`].
    pub(crate) fn for_context(context: usize) -> Self {
        let chunk = context
            .div_ceil(SPLIT_MAX_PARTS)
            .next_multiple_of(SPLIT_TK)
            .max(SPLIT_TK);
        Self {
            chunk,
            max_parts: context.div_ceil(chunk).max(1),
        }
    }

    /// Floats of the partial outputs of `rows` decode rows.
    pub(crate) fn part_floats(&self, rows: usize, n_heads: usize, head_dim: usize) -> usize {
        rows * n_heads * self.max_parts * (head_dim + 2)
    }

    /// Whether the split kernel takes heads of `head_dim`.
    pub(crate) fn fits(head_dim: usize) -> bool {
        head_dim <= SPLIT_MAX_HEAD_DIM
    }
}

/// Timing events of a profile (see [`Kernels::start_profile`]).
#[derive(Default)]
struct Profile {
    /// Timed calls now open: only the outermost is timed.
    depth: usize,
    marks: Vec<(
        &'static str,
        cudarc::driver::CudaEvent,
        cudarc::driver::CudaEvent,
    )>,
}

/// Which way [`Kernels::kv_copy`] moves KV blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KvCopy {
    /// From the device KV into an f32 buffer (the host's layout).
    Export,
    /// From an f32 buffer into the device KV (rounded to its element).
    Import,
}

/// The compiled kernels.
pub(crate) struct Kernels {
    embed: CudaFunction,
    rms_norm: CudaFunction,
    head_norm: CudaFunction,
    bias_rope: CudaFunction,
    kv_write: CudaFunction,
    attention: CudaFunction,
    attention_tiled: CudaFunction,
    attention_split: CudaFunction,
    attention_combine: CudaFunction,
    attention_mma: CudaFunction,
    argmax_rows: CudaFunction,
    topk_rows: CudaFunction,
    kv_export: CudaFunction,
    kv_import: CudaFunction,
    silu_mul: CudaFunction,
    add_in_place: CudaFunction,
    f32_to_bf16: CudaFunction,
    gemv_bf16: CudaFunction,
    fill_uniform_f32: CudaFunction,
    fill_uniform_bf16: CudaFunction,
    stream: Arc<CudaStream>,
    /// The device's multiprocessors (the split kernel sizes its grid by them).
    sms: usize,
    /// On while a benchmark profiles a step.
    profile: std::sync::Mutex<Option<Profile>>,
}

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> EngineError {
    EngineError::Cuda(format!("{what}: {e:?}"))
}

/// `usize` to a kernel's `int`, refusing what does not fit.
pub(crate) fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| EngineError::Cuda(format!("{what} = {v} exceeds a 32-bit int")))
}

/// NVRTC options beside the architecture that compile [`SOURCE`] for a
/// device KV of `kv`.
fn source_options(kv: KvPrecision) -> Vec<String> {
    match kv {
        KvPrecision::F32 => vec![],
        KvPrecision::Bf16 => vec!["-DTANDEM_KV_BF16".into()],
    }
}

/// A CUBIN of [`SOURCE`] for the architecture option `arch` and a device
/// KV of `kv`, or NVRTC's error and log.
fn compile_cubin(arch: &str, kv: KvPrecision) -> std::result::Result<Vec<u8>, String> {
    use cudarc::nvrtc::{result as nv, sys as nvsys};
    let src = std::ffi::CString::new(SOURCE).map_err(|e| e.to_string())?;
    let name = c"tandem_kernels.cu";
    let prog = nv::create_program(&src, Some(name)).map_err(|e| format!("{e:?}"))?;
    // SAFETY: `prog` is live until destroyed at the end; the buffers are
    // sized by NVRTC's own size queries.
    let out = unsafe {
        let mut opts = source_options(kv);
        opts.push(arch.to_string());
        match nv::compile_program(prog, &opts) {
            Err(e) => {
                let log = nv::get_program_log(prog)
                    .map(|l| {
                        let bytes: Vec<u8> =
                            l.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
                        String::from_utf8_lossy(&bytes).into_owned()
                    })
                    .unwrap_or_default();
                Err(format!("{e:?}: {log}"))
            }
            Ok(()) => {
                let mut size = 0usize;
                match nvsys::nvrtcGetCUBINSize(prog, &mut size).result() {
                    Err(e) => Err(format!("CUBIN size: {e:?}")),
                    Ok(()) => {
                        let mut bin = vec![0u8; size];
                        nvsys::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut std::ffi::c_char)
                            .result()
                            .map(|()| bin)
                            .map_err(|e| format!("CUBIN: {e:?}"))
                    }
                }
            }
        }
    };
    // SAFETY: created above, destroyed once.
    let _ = unsafe { nv::destroy_program(prog) };
    out
}

/// PTX of [`SOURCE`] for the virtual architecture `arch` (`compute_80`)
/// and a device KV of `kv`, which the driver compiles for the device at
/// load.
fn compile_ptx(
    arch: &'static str,
    kv: KvPrecision,
) -> std::result::Result<cudarc::nvrtc::Ptx, cudarc::nvrtc::CompileError> {
    cudarc::nvrtc::compile_ptx_with_opts(
        SOURCE,
        CompileOptions {
            arch: Some(arch),
            name: Some("tandem_kernels.cu".into()),
            options: source_options(kv),
            ..Default::default()
        },
    )
}

fn grid_for(n: usize, threads: u32) -> u32 {
    (n.div_ceil(threads as usize)).clamp(1, ELEMWISE_BLOCKS as usize) as u32
}

fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid_for(n, ROW_THREADS), 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn per_row(rows: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (int(rows.max(1), "rows")? as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

impl Kernels {
    /// Compiles [`SOURCE`] for the device and loads it: a CUBIN for the
    /// device's exact architecture when NVRTC knows it (no JIT by the
    /// driver, so an NVRTC newer than the driver works, as CUDA's minor
    /// version compatibility allows), else PTX for a virtual architecture
    /// that the driver JIT-compiles. `kv`: the element of the device KV
    /// that the KV kernels read and write.
    pub(crate) fn load(
        ctx: &Arc<CudaContext>,
        stream: Arc<CudaStream>,
        kv: KvPrecision,
    ) -> Result<Self> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| cuda_err("reading the compute capability", e))?;
        if major < 8 {
            return Err(EngineError::Cuda(format!(
                "compute capability {major}.{minor} is too old: the CUDA backend needs 8.0 or newer"
            )));
        }
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| cuda_err("reading the multiprocessor count", e))?
            .max(1) as usize;
        let cubin = compile_cubin(&format!("--gpu-architecture=sm_{major}{minor}"), kv);
        let module = match cubin {
            Ok(bin) => ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(bin))
                .map_err(|e| cuda_err(&format!("loading the sm_{major}{minor} kernels"), e))?,
            Err(cubin_err) => {
                // NVRTC 12.x and 13.x both know these two.
                let arch = if major >= 9 {
                    "compute_90"
                } else {
                    "compute_80"
                };
                let ptx = compile_ptx(arch, kv).map_err(|e| {
                    EngineError::Cuda(format!(
                        "compiling the kernels with NVRTC: for sm_{major}{minor}: {cubin_err}; for {arch}: {e:?}"
                    ))
                })?;
                ctx.load_module(ptx).map_err(|e| {
                    cuda_err(
                        &format!("loading the {arch} kernels (a CUBIN failed: {cubin_err})"),
                        e,
                    )
                })?
            }
        };
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| cuda_err(&format!("kernel {name}"), e))
        };
        Ok(Self {
            embed: f("embed")?,
            rms_norm: f("rms_norm")?,
            head_norm: f("head_norm")?,
            bias_rope: f("bias_rope")?,
            kv_write: f("kv_write")?,
            attention: f("attention")?,
            attention_tiled: f("attention_tiled")?,
            attention_split: f("attention_split")?,
            attention_combine: f("attention_combine")?,
            attention_mma: f("attention_mma")?,
            argmax_rows: f("argmax_rows")?,
            topk_rows: f("topk_rows")?,
            kv_export: f("kv_export")?,
            kv_import: f("kv_import")?,
            silu_mul: f("silu_mul")?,
            add_in_place: f("add_in_place")?,
            f32_to_bf16: f("f32_to_bf16")?,
            gemv_bf16: f("gemv_bf16")?,
            fill_uniform_f32: f("fill_uniform_f32")?,
            fill_uniform_bf16: f("fill_uniform_bf16")?,
            stream,
            sms,
            profile: std::sync::Mutex::new(None),
        })
    }

    /// Starts timing every launch and multiply on the stream (kernel by
    /// kernel: not while a graph is captured), until [`Kernels::end_profile`].
    pub(crate) fn start_profile(&self) {
        *self.profile_lock() = Some(Profile::default());
    }

    /// Ends a profile: device milliseconds and count of each name, summed,
    /// in the order first seen. Waits for the stream.
    pub(crate) fn end_profile(&self) -> Result<Vec<(&'static str, f64, usize)>> {
        let Some(profile) = self.profile_lock().take() else {
            return Ok(Vec::new());
        };
        let mut sums: Vec<(&'static str, f64, usize)> = Vec::new();
        for (name, start, end) in &profile.marks {
            let ms = start
                .elapsed_ms(end)
                .map_err(|e| cuda_err("reading a profile event", e))? as f64;
            match sums.iter_mut().find(|(n, _, _)| n == name) {
                Some(s) => {
                    s.1 += ms;
                    s.2 += 1;
                }
                None => sums.push((name, ms, 1)),
            }
        }
        Ok(sums)
    }

    fn profile_lock(&self) -> std::sync::MutexGuard<'_, Option<Profile>> {
        self.profile.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f`, which queues work on the stream, between two timing events
    /// when a profile is on (only the outermost of nested calls: a
    /// multiply's BF16 copy counts as the multiply's).
    pub(crate) fn timed<T>(&self, name: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let timing = || {
            self.stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| cuda_err("recording a profile event", e))
        };
        let start = match self.profile_lock().as_mut() {
            None => return f(),
            Some(p) if p.depth > 0 => {
                p.depth += 1;
                None
            }
            Some(p) => {
                let start = timing()?;
                p.depth = 1;
                Some(start)
            }
        };
        let out = f();
        let end = start.as_ref().map(|_| timing());
        if let Some(p) = self.profile_lock().as_mut() {
            p.depth = p.depth.saturating_sub(1);
            match (start, end) {
                (Some(start), Some(Ok(end))) => p.marks.push((name, start, end)),
                (_, Some(Err(e))) => {
                    tracing::warn!(kernel = name, error = %e, "profile event lost")
                }
                _ => {}
            }
        }
        out
    }

    fn launch(
        &self,
        name: &'static str,
        f: &CudaFunction,
        cfg: LaunchConfig,
        args: &[Arg],
    ) -> Result<()> {
        self.timed(name, || self.launch_untimed(name, f, cfg, args))
    }

    fn launch_untimed(
        &self,
        name: &str,
        f: &CudaFunction,
        cfg: LaunchConfig,
        args: &[Arg],
    ) -> Result<()> {
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(v) | Arg::U64(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        // SAFETY: every caller passes the kernel's parameters in order with
        // their C types (pointers as u64 device addresses of live buffers
        // sized for the launch, which the callers check).
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err(&format!("launching {name}"), e))?;
        Ok(())
    }

    pub(crate) fn embed(&self, tok: u64, table: u64, x: u64, n_tok: usize, h: usize) -> Result<()> {
        self.launch(
            "embed",
            &self.embed,
            per_row(n_tok)?,
            &[
                Arg::Ptr(tok),
                Arg::Ptr(table),
                Arg::Ptr(x),
                Arg::I32(int(h, "hidden")?),
            ],
        )
    }

    /// `rows`: 0 for rows `0..n_rows` of `x`, else a device array of row indices.
    #[allow(clippy::too_many_arguments)]
    /// RMSNorm of `n_rows` rows of `x` (those at `rows`, or `0..n_rows`
    /// when 0) into `out`, after adding `add` to them in place when it is
    /// not 0, and into `out_bf16` as BF16 too when that is not 0.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rms_norm(
        &self,
        x: u64,
        rows: u64,
        add: u64,
        w: u64,
        (out, out_bf16): (u64, u64),
        n_rows: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        self.launch(
            "rms_norm",
            &self.rms_norm,
            per_row(n_rows)?,
            &[
                Arg::Ptr(x),
                Arg::Ptr(rows),
                Arg::Ptr(add),
                Arg::Ptr(w),
                Arg::Ptr(out),
                Arg::Ptr(out_bf16),
                Arg::I32(int(h, "hidden")?),
                Arg::F32(eps),
            ],
        )
    }

    /// RMSNorm of each of the `n_heads` query and `n_kv` key heads of the
    /// `n_tok` rows of `qkv`, in place (by `q_w` and `k_w`, `hd` each).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn head_norm(
        &self,
        qkv: u64,
        q_w: u64,
        k_w: u64,
        n_tok: usize,
        row_len: usize,
        n_heads: usize,
        n_kv: usize,
        hd: usize,
        eps: f32,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (
                int(n_tok.max(1), "tokens")? as u32,
                int(n_heads + n_kv, "heads")? as u32,
                1,
            ),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "head_norm",
            &self.head_norm,
            cfg,
            &[
                Arg::Ptr(qkv),
                Arg::Ptr(q_w),
                Arg::Ptr(k_w),
                Arg::I32(int(row_len, "qkv row")?),
                Arg::I32(int(n_heads, "heads")?),
                Arg::I32(int(hd, "head_dim")?),
                Arg::F32(eps),
            ],
        )
    }

    /// `bias`: 0 for none.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn bias_rope(
        &self,
        qkv: u64,
        bias: u64,
        pos: u64,
        inv_freq: u64,
        n_tok: usize,
        row_len: usize,
        n_rot_heads: usize,
        hd: usize,
        neox: bool,
    ) -> Result<()> {
        self.launch(
            "bias_rope",
            &self.bias_rope,
            per_row(n_tok)?,
            &[
                Arg::Ptr(qkv),
                Arg::Ptr(bias),
                Arg::Ptr(pos),
                Arg::Ptr(inv_freq),
                Arg::I32(int(row_len, "qkv row")?),
                Arg::I32(int(n_rot_heads, "heads")?),
                Arg::I32(int(hd, "head_dim")?),
                Arg::I32(i32::from(neox)),
            ],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn kv_write(
        &self,
        qkv: u64,
        pos: u64,
        blk: u64,
        kv: u64,
        n_tok: usize,
        row_len: usize,
        qd: usize,
        n_kv: usize,
        hd: usize,
        bs: usize,
    ) -> Result<()> {
        self.launch(
            "kv_write",
            &self.kv_write,
            per_row(n_tok)?,
            &[
                Arg::Ptr(qkv),
                Arg::Ptr(pos),
                Arg::Ptr(blk),
                Arg::Ptr(kv),
                Arg::I32(int(row_len, "qkv row")?),
                Arg::I32(int(qd, "q dim")?),
                Arg::I32(int(n_kv, "kv heads")?),
                Arg::I32(int(hd, "head_dim")?),
                Arg::I32(int(bs, "block size")?),
            ],
        )
    }

    /// The per-token kernel over `n_rows` tokens: those listed at `rows`,
    /// or tokens `0..n_rows` when `rows` is 0.
    pub(crate) fn attention(&self, a: &AttentionArgs, rows: u64, n_rows: usize) -> Result<()> {
        if a.hd > ATT_DIMS_PER_THREAD * ATT_THREADS as usize {
            return Err(EngineError::Cuda(format!(
                "head_dim {} exceeds the attention kernel's {}",
                a.hd,
                ATT_DIMS_PER_THREAD * ATT_THREADS as usize
            )));
        }
        let cfg = LaunchConfig {
            grid_dim: (
                int(n_rows.max(1), "tokens")? as u32,
                int(a.n_heads, "heads")? as u32,
                1,
            ),
            block_dim: (ATT_THREADS, 1, 1),
            shared_mem_bytes: ((a.hd + ATT_THREADS as usize + 32) * 4) as u32,
        };
        let mut args = vec![Arg::Ptr(rows)];
        args.extend(a.args()?);
        self.launch("attention", &self.attention, cfg, &args)
    }

    /// The tiled kernel over the `n_tiles` tiles at `tiles` (see
    /// [`AttentionPlan`]).
    pub(crate) fn attention_tiled(
        &self,
        a: &AttentionArgs,
        tiles: u64,
        n_tiles: usize,
    ) -> Result<()> {
        if n_tiles == 0 {
            return Ok(());
        }
        if !tiles_fit(a.hd) {
            return Err(EngineError::Cuda(format!(
                "head_dim {} does not fit the tiled attention kernel (a multiple of 4 up to {TILE_MAX_HEAD_DIM})",
                a.hd
            )));
        }
        let floats = TILE_Q * a.hd + 2 * TILE_K * a.hd + 4 * TILE_K;
        let cfg = LaunchConfig {
            grid_dim: (
                int(n_tiles, "tiles")? as u32,
                int(a.n_heads, "heads")? as u32,
                1,
            ),
            block_dim: (TILE_THREADS, 1, 1),
            shared_mem_bytes: (floats * 4) as u32,
        };
        let mut args = vec![Arg::Ptr(tiles)];
        args.extend(a.args()?);
        self.launch("attention_tiled", &self.attention_tiled, cfg, &args)
    }

    /// The prompt tiles of [`Kernels::attention_tiled`] on the tensor
    /// cores (BF16 inputs, f32 sums; see `attention_mma`).
    pub(crate) fn attention_mma(
        &self,
        a: &AttentionArgs,
        tiles: u64,
        n_tiles: usize,
    ) -> Result<()> {
        if n_tiles == 0 {
            return Ok(());
        }
        if !mma_fits(a.hd) || a.n_kv == 0 || !a.n_heads.is_multiple_of(a.n_kv) {
            return Err(EngineError::Cuda(format!(
                "head_dim {} (heads {}/{}) does not fit the tensor-core attention kernel (a multiple of 16 up to {MMA_MAX_HEAD_DIM})",
                a.hd, a.n_heads, a.n_kv
            )));
        }
        let groups = (a.n_heads / a.n_kv).div_ceil(MMA_WARPS);
        let halves = MMA_TK * (a.hd + 8) + a.hd * (MMA_TK + 8);
        let cfg = LaunchConfig {
            grid_dim: (
                int(n_tiles, "tiles")? as u32,
                int(a.n_kv * groups, "head groups")? as u32,
                1,
            ),
            block_dim: (32 * MMA_WARPS as u32, 1, 1),
            shared_mem_bytes: (halves * 2 + 2 * MMA_TK * 8) as u32,
        };
        let mut args = vec![Arg::Ptr(tiles)];
        args.extend(a.args()?);
        self.launch("attention_mma", &self.attention_mma, cfg, &args)
    }

    /// The split (flash-decoding) kernel and its merge over `n_rows`
    /// tokens: those listed at `rows`, or tokens `0..n_rows` when `rows`
    /// is 0. `part`: scratch of `plan.part_floats(n_rows, ..)` floats.
    pub(crate) fn attention_split(
        &self,
        a: &AttentionArgs,
        rows: u64,
        n_rows: usize,
        part: u64,
        plan: SplitPlan,
    ) -> Result<()> {
        if n_rows == 0 {
            return Ok(());
        }
        if !SplitPlan::fits(a.hd) || plan.max_parts > SPLIT_MAX_PARTS {
            return Err(EngineError::Cuda(format!(
                "head_dim {} (or {} parts) exceeds the split attention kernel's {SPLIT_MAX_HEAD_DIM} ({SPLIT_MAX_PARTS})",
                a.hd, plan.max_parts
            )));
        }
        let group = a.n_heads / a.n_kv;
        let ge = group.min(SPLIT_G);
        let y = a.n_kv * group.div_ceil(SPLIT_G);
        // Enough blocks to fill the card: a part each, or several parts a
        // block when the rows alone fill it (blocks past a row's parts
        // return at once).
        let z = (SPLIT_BLOCKS_PER_SM * self.sms)
            .div_ceil(n_rows * y)
            .clamp(1, plan.max_parts);
        let floats = ge * (5 * a.hd + 5 * SPLIT_TK + 3);
        let cfg = LaunchConfig {
            grid_dim: (
                int(n_rows, "tokens")? as u32,
                int(y, "head groups")? as u32,
                z as u32,
            ),
            block_dim: (SPLIT_THREADS, 1, 1),
            shared_mem_bytes: (floats * 4) as u32,
        };
        // The kernel's parameters are the others', with the parts where
        // they write their output.
        let mut args = vec![Arg::Ptr(rows)];
        args.extend(
            AttentionArgs {
                out: part,
                ..a.clone()
            }
            .args()?,
        );
        args.push(Arg::I32(int(plan.chunk, "keys per part")?));
        args.push(Arg::I32(int(plan.max_parts, "parts")?));
        self.launch("attention_split", &self.attention_split, cfg, &args)?;
        let cfg = LaunchConfig {
            grid_dim: (
                int(n_rows, "tokens")? as u32,
                int(a.n_heads, "heads")? as u32,
                1,
            ),
            block_dim: (ATT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "attention_combine",
            &self.attention_combine,
            cfg,
            &[
                Arg::Ptr(rows),
                Arg::Ptr(a.pos),
                Arg::Ptr(part),
                Arg::Ptr(a.out),
                Arg::I32(int(a.n_heads, "heads")?),
                Arg::I32(int(a.hd, "head_dim")?),
                Arg::I32(int(plan.chunk, "keys per part")?),
                Arg::I32(int(plan.max_parts, "parts")?),
            ],
        )
    }

    /// `ids[r]` = the greedy choice of logits row `rows[r]` (row `r` when
    /// `rows` is 0), for `n` rows.
    pub(crate) fn argmax_rows(
        &self,
        logits: u64,
        rows: u64,
        ids: u64,
        n: usize,
        vocab: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.launch(
            "argmax_rows",
            &self.argmax_rows,
            per_row(n)?,
            &[
                Arg::Ptr(logits),
                Arg::Ptr(rows),
                Arg::Ptr(ids),
                Arg::I32(int(vocab, "vocabulary")?),
            ],
        )
    }

    /// The `ks[r]` largest values of logits row `rows[r]` (row `r` when
    /// `rows` is 0), for `n` rows, into `vals` and `ids` at
    /// `r * TOPK_MAX` (see the kernel).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn topk_rows(
        &self,
        logits: u64,
        rows: u64,
        ks: u64,
        n: usize,
        vocab: usize,
        vals: u64,
        ids: u64,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.launch(
            "topk_rows",
            &self.topk_rows,
            LaunchConfig {
                grid_dim: (int(n, "rows")? as u32, 1, 1),
                block_dim: (TOPK_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::Ptr(logits),
                Arg::Ptr(rows),
                Arg::Ptr(ks),
                Arg::I32(int(vocab, "vocabulary")?),
                Arg::Ptr(vals),
                Arg::Ptr(ids),
            ],
        )
    }

    /// `n` KV blocks of `block_floats` values between the device KV and an
    /// f32 buffer, as `dir` says: block `dst_idx[b]` of `dst` (`b` when 0)
    /// = block `src_idx[b]` of `src` (`b` when 0).
    pub(crate) fn kv_copy(
        &self,
        dir: KvCopy,
        blocks: [u64; 4],
        n: usize,
        block_floats: usize,
    ) -> Result<()> {
        match dir {
            KvCopy::Export => {
                self.copy_blocks("kv_export", &self.kv_export, blocks, n, block_floats)
            }
            KvCopy::Import => {
                self.copy_blocks("kv_import", &self.kv_import, blocks, n, block_floats)
            }
        }
    }

    fn copy_blocks(
        &self,
        name: &'static str,
        f: &CudaFunction,
        [src, src_idx, dst, dst_idx]: [u64; 4],
        n: usize,
        block_floats: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.launch(
            name,
            f,
            per_row(n)?,
            &[
                Arg::Ptr(src),
                Arg::Ptr(src_idx),
                Arg::Ptr(dst),
                Arg::Ptr(dst_idx),
                Arg::I64(block_floats as i64),
            ],
        )
    }

    /// SiLU-and-multiply of `n_tok` rows into `act`, and into `act_bf16`
    /// as BF16 too when that is not 0.
    pub(crate) fn silu_mul(
        &self,
        gu: u64,
        (act, act_bf16): (u64, u64),
        n_tok: usize,
        ffn: usize,
    ) -> Result<()> {
        self.launch(
            "silu_mul",
            &self.silu_mul,
            elementwise(n_tok * ffn),
            &[
                Arg::Ptr(gu),
                Arg::Ptr(act),
                Arg::Ptr(act_bf16),
                Arg::I64(n_tok as i64),
                Arg::I32(int(ffn, "ffn")?),
            ],
        )
    }

    pub(crate) fn add_in_place(&self, x: u64, y: u64, n: usize) -> Result<()> {
        self.launch(
            "add_in_place",
            &self.add_in_place,
            elementwise(n),
            &[Arg::Ptr(x), Arg::Ptr(y), Arg::I64(n as i64)],
        )
    }

    pub(crate) fn f32_to_bf16(&self, x: u64, y: u64, n: usize) -> Result<()> {
        self.launch(
            "f32_to_bf16",
            &self.f32_to_bf16,
            elementwise(n),
            &[Arg::Ptr(x), Arg::Ptr(y), Arg::I64(n as i64)],
        )
    }

    /// Whether [`Kernels::gemv_bf16`] takes a `[rows, cols]` BF16 matrix
    /// times `t` token rows: few enough tokens, and rows of whole 16-byte
    /// loads.
    pub(crate) fn gemv_fits(cols: usize, t: usize) -> bool {
        (1..=GEMV_MAX_T).contains(&t) && cols.is_multiple_of(8)
    }

    /// `out[t][r] = Σ_j w[r][j]·x[t][j]` for `t` token rows (see
    /// [`Kernels::gemv_fits`]): `w` is `[rows, cols]` BF16, `x` `[t, cols]`
    /// BF16, `out` `[t, rows]` f32.
    pub(crate) fn gemv_bf16(
        &self,
        w: u64,
        x: u64,
        out: u64,
        rows: usize,
        cols: usize,
        t: usize,
    ) -> Result<()> {
        if !Self::gemv_fits(cols, t) || !w.is_multiple_of(16) || !x.is_multiple_of(16) {
            return Err(EngineError::Cuda(format!(
                "gemv_bf16: {t} rows of {cols} (or an unaligned buffer) do not fit the kernel"
            )));
        }
        let cfg = LaunchConfig {
            grid_dim: (int(rows.div_ceil(GEMV_ROWS), "matrix rows")? as u32, 1, 1),
            block_dim: (GEMV_ROWS as u32 * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "gemv_bf16",
            &self.gemv_bf16,
            cfg,
            &[
                Arg::Ptr(w),
                Arg::Ptr(x),
                Arg::Ptr(out),
                Arg::I32(int(rows, "matrix rows")?),
                Arg::I32(int(cols, "matrix cols")?),
                Arg::I32(int(t, "tokens")?),
            ],
        )
    }

    pub(crate) fn fill_uniform_f32(&self, y: u64, n: usize, seed: u64, scale: f32) -> Result<()> {
        self.launch(
            "fill_uniform_f32",
            &self.fill_uniform_f32,
            elementwise(n),
            &[
                Arg::Ptr(y),
                Arg::I64(n as i64),
                Arg::U64(seed),
                Arg::F32(scale),
            ],
        )
    }

    pub(crate) fn fill_uniform_bf16(&self, y: u64, n: usize, seed: u64, scale: f32) -> Result<()> {
        self.launch(
            "fill_uniform_bf16",
            &self.fill_uniform_bf16,
            elementwise(n),
            &[
                Arg::Ptr(y),
                Arg::I64(n as i64),
                Arg::U64(seed),
                Arg::F32(scale),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `__global__` functions [`SOURCE`] declares.
    fn declared_kernels() -> Vec<&'static str> {
        SOURCE
            .split("__global__")
            .skip(1)
            .map(|rest| {
                let rest = rest
                    .trim_start()
                    .strip_prefix("void")
                    .expect("kernels return void")
                    .trim_start();
                rest[..rest.find('(').expect("a parameter list")].trim()
            })
            .collect()
    }

    #[test]
    fn the_top_k_kernel_holds_what_the_sampler_asks_for() {
        assert_eq!(TOPK_MAX, crate::sampler::MAX_DEVICE_TOP_K);
        assert!(SOURCE.contains(&format!("#define TOPK_MAX {TOPK_MAX}\n")));
        assert!(SOURCE.contains(&format!("#define TOPK_THREADS {TOPK_THREADS}\n")));
    }

    #[test]
    fn split_parts_cover_the_context_in_whole_tiles() {
        for context in [
            1,
            31,
            32,
            33,
            2048,
            4096,
            4097,
            8192,
            32768,
            131072,
            1 << 20,
        ] {
            let p = SplitPlan::for_context(context);
            assert!(p.chunk.is_multiple_of(SPLIT_TK), "{context}: {p:?}");
            assert!(p.chunk * p.max_parts >= context, "{context}: {p:?}");
            assert!(
                (1..=SPLIT_MAX_PARTS).contains(&p.max_parts),
                "{context}: {p:?}"
            );
            // No longer parts than the cap asks for.
            assert!(p.chunk == SPLIT_TK || p.chunk < context.div_ceil(SPLIT_MAX_PARTS) + SPLIT_TK);
        }
        assert_eq!(
            SplitPlan::for_context(8192),
            SplitPlan {
                chunk: 64,
                max_parts: 128
            }
        );
        assert_eq!(
            SplitPlan::for_context(2048),
            SplitPlan {
                chunk: 32,
                max_parts: 64
            }
        );
        assert!(SplitPlan::fits(256) && !SplitPlan::fits(257));
    }

    #[test]
    fn attention_plan_tiles_long_runs_and_leaves_short_ones_per_token() {
        // Sequence 0 decodes one token; sequence 1 brings a 40-token prompt
        // chunk at positions 100..140; sequence 2 three draft tokens;
        // sequence 3 exactly TILE_MIN_RUN tokens.
        let mut seq = vec![0];
        let mut pos = vec![57];
        seq.extend([1; 40]);
        pos.extend(100..140);
        seq.extend([2; 3]);
        pos.extend(9..12);
        seq.extend([3; TILE_MIN_RUN]);
        pos.extend(0..TILE_MIN_RUN);
        let plan = AttentionPlan::of(&seq, &pos, 64).unwrap();
        assert_eq!(
            plan.tiles,
            vec![
                1,
                16,
                116,
                17,
                16,
                132,
                33,
                8,
                140,
                44,
                TILE_MIN_RUN as i32,
                TILE_MIN_RUN as i32
            ]
        );
        assert_eq!(plan.n_tiles(), 4);
        assert_eq!(plan.rows, vec![0, 41, 42, 43]);
        // Every token in exactly one place.
        let mut covered: Vec<i32> = plan.rows.clone();
        for t in plan.tiles.chunks(3) {
            covered.extend(t[0]..t[0] + t[1]);
        }
        covered.sort();
        assert_eq!(covered, (0..seq.len() as i32).collect::<Vec<_>>());
        // Heads wider than the tiled kernel's lanes cover: all per token.
        let wide = AttentionPlan::of(&seq, &pos, TILE_MAX_HEAD_DIM + 32).unwrap();
        assert!(wide.tiles.is_empty());
        assert_eq!(wide.rows.len(), seq.len());
        // And heads whose queries cannot be read four dimensions at a time.
        let odd = AttentionPlan::of(&seq, &pos, 66).unwrap();
        assert!(odd.tiles.is_empty());
        assert_eq!(odd.rows.len(), seq.len());
    }

    /// [`SOURCE`] as C++ for the CPU emulation: `shim.h` supplies CUDA's
    /// names; dynamic shared memory is the launch's buffer.
    fn emulated_source() -> String {
        let body = SOURCE
            .replace("extern \"C\" ", "")
            .replace("extern __shared__ float sh[];", "float* sh = g_shared;");
        format!("#include \"shim.h\"\n{body}")
    }

    /// The kernels' logic, run on the CPU under `emulation/shim.h` (a
    /// thread per CUDA thread, barriers for `__syncthreads` and for warp
    /// shuffles) against the plain references of `emulation/harness.cpp`:
    /// the embedding lookup, RMSNorm, bias and RoPE (both pairings) and
    /// SiLU-and-multiply against the CPU model's formulas; the BF16
    /// rounding of activations at its ties; the three attention
    /// kernels over shuffled paged KV (decode rows, prompt chunks in tiles,
    /// head sizes 32 to 128, grouped and plain heads; the split kernel also
    /// with 256 and with 18 query heads a KV head, on several grids, the
    /// same bits for a row alone); `kv_write` into the
    /// layout attention reads; `kv_export` and `kv_import` gathering and
    /// scattering KV blocks; the attention, KV write and KV copy checks
    /// once more with the KV in BF16 (a second build); `argmax_rows` and `topk_rows` with ties, signed zeros and
    /// -inf rows; `gemv_bf16` against a double reference; `head_norm` per
    /// query and key head. It catches wrong
    /// indexing, synchronisation or tie rules without a GPU; what only
    /// hardware shows (speed, the GPU compiler) is the GPU check's. Needs a
    /// C++20 compiler (`$CXX`, else `c++`: Debian's g++, which the setup
    /// installs); without one it fails, it does not skip.
    #[test]
    fn kernels_compute_their_references_under_a_cpu_emulation() {
        let dir =
            std::env::temp_dir().join(format!("tandem-kernel-emulation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("shim.h"), include_str!("emulation/shim.h")).unwrap();
        std::fs::write(
            dir.join("harness.cpp"),
            include_str!("emulation/harness.cpp"),
        )
        .unwrap();
        std::fs::write(dir.join("kernels.h"), emulated_source()).unwrap();
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        // The default build, and the KV checks again with BF16 KV; both
        // built, then run side by side.
        let builds = [
            ("harness", None, 30),
            ("harness_bf16", Some("-DTANDEM_KV_BF16"), 15),
        ];
        for (name, define, _) in builds {
            let built = std::process::Command::new(&cxx)
                .args(["-O2", "-std=c++20", "-pthread", "-Wno-unknown-pragmas"])
                .args(define)
                .args(["-o", name, "harness.cpp"])
                .current_dir(&dir)
                .output()
                .unwrap_or_else(|e| panic!("running the C++ compiler {cxx:?}: {e}"));
            assert!(
                built.status.success(),
                "compiling the emulation ({name}): {}",
                String::from_utf8_lossy(&built.stderr)
            );
        }
        let running: Vec<_> = builds
            .iter()
            .map(|(name, _, _)| {
                std::process::Command::new(dir.join(name))
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("running the emulation")
            })
            .collect();
        let ran: Vec<_> = running
            .into_iter()
            .map(|c| c.wait_with_output().expect("waiting for the emulation"))
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        for ((name, _, at_least), ran) in builds.iter().zip(ran) {
            let report = String::from_utf8_lossy(&ran.stdout).into_owned();
            eprintln!("{name}:\n{report}");
            assert!(
                ran.status.success(),
                "kernels differ from their references under emulation ({name}):\n{report}{}",
                String::from_utf8_lossy(&ran.stderr)
            );
            assert!(
                report.lines().filter(|l| l.starts_with("ok")).count() >= *at_least,
                "fewer checks than expected ran ({name}):\n{report}"
            );
        }
    }

    /// The kernels compile with NVRTC, as [`Kernels::load`] asks for them on
    /// the cards the backend supports: a CUBIN for each real architecture
    /// from Ampere to Hopper, PTX for the virtual fallbacks. NVRTC needs no
    /// GPU, so this runs where none is: `scripts/test.sh` installs NVRTC from
    /// PyPI. Without a loadable NVRTC the test fails, it does not skip.
    #[test]
    fn kernels_compile_with_nvrtc_for_every_supported_architecture() {
        // SAFETY: only tries to load the library (as `missing_libraries` does).
        let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
        assert!(
            present,
            "NVRTC (libnvrtc.so.12) is not loadable: put its directory on LD_LIBRARY_PATH"
        );
        let names = declared_kernels();
        assert_eq!(names.len(), 20, "{names:?}");
        let kvs = [KvPrecision::F32, KvPrecision::Bf16];
        for (arch, kv) in ["sm_80", "sm_86", "sm_89", "sm_90"]
            .into_iter()
            .flat_map(|a| kvs.map(|kv| (a, kv)))
        {
            let cubin = compile_cubin(&format!("--gpu-architecture={arch}"), kv)
                .unwrap_or_else(|e| panic!("{arch}, {kv:?} KV: {e}"));
            for n in &names {
                assert!(
                    cubin
                        .windows(n.len() + 1)
                        .any(|w| &w[..n.len()] == n.as_bytes() && w[n.len()] == 0),
                    "the {arch} CUBIN ({kv:?} KV) has no symbol {n}"
                );
            }
        }
        for (arch, kv) in ["compute_80", "compute_90"]
            .into_iter()
            .flat_map(|a| kvs.map(|kv| (a, kv)))
        {
            let ptx = compile_ptx(arch, kv)
                .unwrap_or_else(|e| panic!("{arch}, {kv:?} KV: {e:?}"))
                .to_src();
            for n in &names {
                assert!(
                    ptx.contains(&format!(".entry {n}(")),
                    "the {arch} PTX ({kv:?} KV) has no entry {n}"
                );
            }
        }
    }

    /// No kernel spills registers to local memory on Hopper (what ptxas
    /// reports when NVRTC compiles with `-v`): a spill in a kernel's loop
    /// would be local-memory traffic on every key or weight, and a kernel
    /// edit that adds one should be seen here, not on a lent card.
    #[test]
    fn kernels_do_not_spill_registers() {
        use cudarc::nvrtc::result as nv;
        for kv in [KvPrecision::F32, KvPrecision::Bf16] {
            let src = std::ffi::CString::new(SOURCE).unwrap();
            let prog = nv::create_program(&src, Some(c"tandem_kernels.cu")).unwrap();
            let mut opts = source_options(kv);
            opts.extend(["--gpu-architecture=sm_90", "--ptxas-options=-v"].map(String::from));
            // SAFETY: `prog` is live until destroyed below.
            let (compiled, log) = unsafe {
                let compiled = nv::compile_program(prog, &opts);
                let log = nv::get_program_log(prog).expect("NVRTC's log");
                let _ = nv::destroy_program(prog);
                (compiled, log)
            };
            let log: Vec<u8> = log
                .iter()
                .map(|&c| c as u8)
                .take_while(|&b| b != 0)
                .collect();
            let log = String::from_utf8_lossy(&log);
            assert!(compiled.is_ok(), "{kv:?} KV: {compiled:?}: {log}");
            let entries = log
                .lines()
                .filter(|l| l.contains("Compiling entry function"))
                .count();
            assert_eq!(entries, declared_kernels().len(), "{log}");
            let properties: Vec<&str> =
                log.lines().filter(|l| l.contains("spill stores")).collect();
            assert!(properties.len() >= entries, "{log}");
            for line in properties {
                assert!(
                    line.contains(" 0 bytes spill stores, 0 bytes spill loads"),
                    "a kernel spills with {kv:?} KV: {line}\n{log}"
                );
            }
        }
    }
}
