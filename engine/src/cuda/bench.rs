//! Speed figures of the CUDA backend on a Llama-3-8B-shaped model with
//! random BF16 weights generated on the device (values do not matter for
//! speed, so no file is needed): device-to-device copy bandwidth, decode
//! tokens/s at a few batch sizes with the fraction of the memory roofline
//! they reach, and prefill TFLOP/s. Run by the ignored test
//! `bench_llama3_8b_shape` in `tests/cuda_backend.rs`.
//!
//! Roofline: a decode step must read every weight matrix once and every
//! sequence's KV once, so `(weight bytes + KV bytes) / step time` is the
//! bandwidth the step achieved; its fraction of the copy bandwidth measured
//! in the same run (bytes read + bytes written per second, what a device
//! copy can stream) is how close decode is to memory-bound.
//!
//! Each decode batch runs four ways: replayed from a CUDA graph with the
//! greedy choice picked on the device (one id per sequence comes back:
//! what a greedy request costs), the same with the per-token attention
//! kernel instead of the split one, the same with tandem's matrix-vector
//! kernel instead of cuBLAS, and launched kernel by kernel with every
//! sequence's logits moved to the host (what a sampled request costs
//! without graphs); the first way once more with f32 KV instead of BF16
//! (a second model). The steps' multiplies, and the prefill's, are also
//! timed alone, which says how much of a step is theirs, and one step per
//! batch size is profiled kernel by kernel.

use std::time::Instant;

use serde::Serialize;
use tandem_model::config::{Arch, ModelConfig};
use tandem_model::quant::GgmlType;
use tandem_model::synth::{SynthFormat, SynthShape, SynthSpec, SynthTokenizer};

use super::{cuda_err, ptr, CudaModel, KvPrecision, Weights};
use crate::error::Result;
use crate::executor::Executor;
use crate::kv::{KvPool, SeqKv};
use crate::model::{Logits, SeqStep};

/// Llama-3-8B's shape (32 layers, hidden 4096, FFN 14336, 32 query and 8
/// KV heads of 128, vocabulary 128256, untied head): `tandem model synth`'s
/// `llama3-8b` preset, as a BF16 Hugging Face checkpoint of it would read.
pub fn llama3_8b_config() -> ModelConfig {
    SynthSpec {
        arch: Arch::Llama,
        shape: SynthShape::preset("llama3-8b").expect("llama3-8b is a built-in preset"),
        seed: 0,
        format: SynthFormat::Safetensors {
            dtype: GgmlType::BF16,
            shards: 1,
        },
        tokenizer: SynthTokenizer::Gpt2,
    }
    .model_config()
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchOptions {
    /// Decode batch sizes.
    pub decode_batches: Vec<usize>,
    /// Tokens already in each sequence's KV when decode is timed.
    pub context: usize,
    /// Timed decode steps (after two warm-up steps).
    pub decode_steps: usize,
    /// Tokens of the one prompt whose prefill is timed.
    pub prefill_tokens: usize,
    /// Timed prefill runs (after one warm-up run).
    pub prefill_runs: usize,
    pub block_size: usize,
    /// Bytes of the device-to-device copy measured.
    pub copy_bytes: usize,
    pub seed: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            decode_batches: vec![1, 64],
            context: 512,
            decode_steps: 32,
            prefill_tokens: 2048,
            prefill_runs: 3,
            block_size: 16,
            copy_bytes: 1 << 30,
            seed: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CopyResult {
    pub bytes: usize,
    pub copies: usize,
    pub seconds: f64,
    /// (read + written bytes) per second, in GB/s.
    pub gb_per_s: f64,
}

/// How a timed decode step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DecodeMode {
    /// Replayed from a CUDA graph.
    pub graphs: bool,
    /// Only the greedy id of each sequence comes back (else its logits).
    pub greedy_on_device: bool,
    /// Multiplies of up to `GEMV_MAX_T` tokens by the matrix-vector
    /// kernel (else by cuBLAS).
    pub gemv: bool,
    /// Attention by the split (flash-decoding) kernel (else one block per
    /// token and head).
    pub split_attention: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeResult {
    pub batch: usize,
    pub mode: DecodeMode,
    pub context: usize,
    pub steps: usize,
    pub step_ms: f64,
    pub tok_per_s: f64,
    pub weight_bytes: usize,
    /// KV read per step, averaged over the timed steps.
    pub kv_bytes_per_step: f64,
    pub achieved_gb_per_s: f64,
    /// `achieved_gb_per_s / copy.gb_per_s`.
    pub roofline_fraction: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PrefillResult {
    pub tokens: usize,
    pub runs: usize,
    pub seconds_per_run: f64,
    pub tok_per_s: f64,
    pub matmul_flops: f64,
    pub attention_flops: f64,
    /// (matmul + attention FLOPs) / time, in TFLOP/s.
    pub tflops: f64,
    pub matmul_tflops: f64,
    /// The layers' multiplies of the prompt alone, timed on their own:
    /// what cuBLAS reaches on these shapes, apart from the rest of a step.
    pub matmuls_alone_seconds: f64,
    pub matmuls_alone_tflops: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub weights: String,
    pub model: &'static str,
    pub options: BenchOptions,
    pub copy: CopyResult,
    pub decode: Vec<DecodeResult>,
    /// The server's decode mode again on the same shape with f32 KV (the
    /// KV bytes a step reads doubled), for the difference BF16 KV makes.
    pub decode_f32_kv: Vec<DecodeResult>,
    /// The multiplies of the decode steps above, timed alone.
    pub decode_matmuls: Vec<DecodeMatmuls>,
    /// One decode step per batch size and the prefill, kernel by kernel.
    pub profiles: Vec<PassProfile>,
    /// Prefill with the prompt's attention on tensor cores (what a BF16
    /// model runs).
    pub prefill: PrefillResult,
    /// The same prefill with it on the f32 tiled kernel.
    pub prefill_cuda_cores: PrefillResult,
    pub notes: Vec<&'static str>,
}

/// How a server decodes: graphs, greedy ids picked on the device, cuBLAS,
/// split attention.
const SERVER: DecodeMode = DecodeMode {
    graphs: true,
    greedy_on_device: true,
    gemv: false,
    split_attention: true,
};

/// Device-to-device copy bandwidth on `model`'s device.
pub fn copy_bandwidth(model: &CudaModel, bytes: usize, copies: usize) -> Result<CopyResult> {
    let dev = &model.dev;
    dev.bind()?;
    let n = bytes / 4;
    let a = dev.zeros::<f32>(n, "copy source")?;
    let b = dev.zeros::<f32>(n, "copy destination")?;
    let (pa, pb) = (ptr(&a, &dev.stream), ptr(&b, &dev.stream));
    let copy = || -> Result<()> {
        // SAFETY: both buffers hold n floats.
        unsafe { cudarc::driver::result::memcpy_dtod_async(pb, pa, n * 4, dev.stream.cu_stream()) }
            .map_err(|e| cuda_err("device copy", e))
    };
    copy()?;
    dev.sync("copy warm-up")?;
    let t0 = Instant::now();
    for _ in 0..copies {
        copy()?;
    }
    dev.sync("copy")?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok(CopyResult {
        bytes: n * 4,
        copies,
        seconds,
        gb_per_s: 2.0 * (n * 4 * copies) as f64 / seconds / 1e9,
    })
}

/// `batch` sequences of `opts.context` tokens each (KV contents are
/// whatever the device holds: speed does not depend on them), with room
/// for `steps` more tokens, and the token each of them decodes.
struct DecodeFixture {
    pool: KvPool,
    seqs: Vec<SeqKv>,
    toks: Vec<u32>,
    logits: Logits,
}

impl DecodeFixture {
    fn new(
        model: &CudaModel,
        batch: usize,
        steps: usize,
        logits: Logits,
        opts: &BenchOptions,
    ) -> Result<Self> {
        let layout = model.kv_layout(opts.block_size);
        let per_seq = layout.blocks_for(opts.context + steps);
        let mut pool = KvPool::new_tracking(layout, batch * per_seq);
        let mut seqs: Vec<SeqKv> = (0..batch).map(|_| SeqKv::default()).collect();
        for s in seqs.iter_mut() {
            pool.reserve(s, opts.context)?;
            s.len = opts.context;
        }
        let vocab = model.config.vocab_size as u32;
        let toks = (0..batch as u32).map(|i| (i * 7919 + 13) % vocab).collect();
        Ok(Self {
            pool,
            seqs,
            toks,
            logits,
        })
    }

    /// One decode step of every sequence.
    fn step(&mut self, model: &CudaModel) -> Result<()> {
        let mut b: Vec<SeqStep<'_>> = self
            .seqs
            .iter_mut()
            .zip(&self.toks)
            .map(|(kv, t)| SeqStep {
                kv,
                tokens: std::slice::from_ref(t),
                logits: self.logits,
            })
            .collect();
        model.forward(&mut self.pool, &mut b).map(|_| ())
    }
}

/// Decode at `batch` sequences of `opts.context` tokens.
pub fn decode(
    model: &CudaModel,
    batch: usize,
    mode: DecodeMode,
    opts: &BenchOptions,
    copy_gb_per_s: f64,
) -> Result<DecodeResult> {
    model.set_graphs(mode.graphs);
    model.set_gemv(mode.gemv);
    model.set_split_attention(mode.split_attention);
    let logits = if mode.greedy_on_device {
        Logits::Greedy
    } else {
        Logits::Last
    };
    let warmup = 2;
    let mut fx = DecodeFixture::new(model, batch, warmup + opts.decode_steps, logits, opts)?;
    let layout = *fx.pool.layout();
    for _ in 0..warmup {
        fx.step(model)?;
    }
    let len0 = fx.seqs[0].len;
    let t0 = Instant::now();
    for _ in 0..opts.decode_steps {
        fx.step(model)?;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let steps = opts.decode_steps.max(1) as f64;
    let step_s = seconds / steps;
    // Keys read by a step: every sequence's length after its new token.
    let mean_len = len0 as f64 + (steps + 1.0) / 2.0;
    let kv_bytes = batch as f64 * mean_len * model.kv_block_bytes(layout.block_size) as f64
        / layout.block_size as f64;
    let weight_bytes = model.weight_bytes();
    let achieved = (weight_bytes as f64 + kv_bytes) / step_s / 1e9;
    Ok(DecodeResult {
        batch,
        mode,
        context: opts.context,
        steps: opts.decode_steps,
        step_ms: step_s * 1e3,
        tok_per_s: batch as f64 / step_s,
        weight_bytes,
        kv_bytes_per_step: kv_bytes,
        achieved_gb_per_s: achieved,
        roofline_fraction: achieved / copy_gb_per_s,
    })
}

/// Device time of one kernel or multiply (every layer's calls together).
#[derive(Debug, Clone, Serialize)]
pub struct KernelTime {
    pub name: &'static str,
    pub ms: f64,
    pub calls: usize,
}

/// One pass launched kernel by kernel, each launch between two timing
/// events: where its time goes.
#[derive(Debug, Clone, Serialize)]
pub struct PassProfile {
    /// "decode step" (greedy on the device, multiplies by cuBLAS),
    /// "prefill" or "prefill, attention on CUDA cores".
    pub pass: &'static str,
    pub sequences: usize,
    pub tokens: usize,
    pub split_attention: bool,
    /// Wall time of the profiled pass (the events add a little).
    pub ms: f64,
    /// The kernels' device times summed: the rest of `ms` is the host and
    /// the gaps between launches.
    pub kernels_ms: f64,
    /// Largest first.
    pub kernels: Vec<KernelTime>,
}

/// Runs `pass` (eager: graphs off) with every launch timed.
fn profiled(
    model: &CudaModel,
    what: (&'static str, usize, usize),
    pass: impl FnOnce() -> Result<()>,
) -> Result<PassProfile> {
    let k = &model.dev.k;
    k.start_profile();
    let t0 = Instant::now();
    let ran = pass();
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let times = k.end_profile()?;
    ran?;
    let mut kernels: Vec<KernelTime> = times
        .into_iter()
        .map(|(name, ms, calls)| KernelTime { name, ms, calls })
        .collect();
    kernels.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    Ok(PassProfile {
        pass: what.0,
        sequences: what.1,
        tokens: what.2,
        split_attention: model.split_enabled(),
        ms,
        kernels_ms: kernels.iter().map(|k| k.ms).sum(),
        kernels,
    })
}

/// One decode step of `batch` sequences, profiled.
pub fn profile_step(
    model: &CudaModel,
    batch: usize,
    split_attention: bool,
    opts: &BenchOptions,
) -> Result<PassProfile> {
    model.set_graphs(false);
    model.set_gemv(false);
    model.set_split_attention(split_attention);
    let warmup = 2;
    let mut fx = DecodeFixture::new(model, batch, warmup + 1, Logits::Greedy, opts)?;
    for _ in 0..warmup {
        fx.step(model)?;
    }
    profiled(model, ("decode step", batch, batch), || fx.step(model))
}

/// A run of the prefill of one prompt of `opts.prefill_tokens` tokens
/// (last logits only): its seconds.
fn prefill_runner<'m>(
    model: &'m CudaModel,
    opts: &BenchOptions,
) -> impl FnMut() -> Result<f64> + 'm {
    let t = opts.prefill_tokens;
    let layout = model.kv_layout(opts.block_size);
    let mut pool = KvPool::new_tracking(layout, layout.blocks_for(t));
    let vocab = model.config.vocab_size as u32;
    let prompt: Vec<u32> = (0..t as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    move || -> Result<f64> {
        let mut kv = SeqKv::default();
        let t0 = Instant::now();
        model.forward(
            &mut pool,
            &mut [SeqStep {
                kv: &mut kv,
                tokens: &prompt,
                logits: Logits::Last,
            }],
        )?;
        let s = t0.elapsed().as_secs_f64();
        pool.free_seq(&mut kv);
        Ok(s)
    }
}

/// One prefill (after a warm-up), profiled.
fn prefill_profile(
    model: &CudaModel,
    opts: &BenchOptions,
    name: &'static str,
) -> Result<PassProfile> {
    let mut run = prefill_runner(model, opts);
    run()?;
    let t = opts.prefill_tokens;
    profiled(model, (name, 1, t), || run().map(|_| ()))
}

/// Prefill of one prompt of `opts.prefill_tokens` tokens (last logits only).
pub fn prefill(model: &CudaModel, opts: &BenchOptions) -> Result<PrefillResult> {
    let t = opts.prefill_tokens;
    let mut run = prefill_runner(model, opts);
    run()?;
    let runs = opts.prefill_runs.max(1);
    let mut total = 0.0;
    for _ in 0..runs {
        total += run()?;
    }
    let secs = total / runs as f64;
    let c = &model.config;
    let head = c.vocab_size * c.hidden;
    let body = model.matmul_params() - head;
    let matmul = 2.0 * (t as f64 * body as f64 + head as f64);
    // QKᵀ and PV: 2 FLOPs per multiply-add, over keys 0..=p for each position p.
    let pairs = t as f64 * (t as f64 + 1.0) / 2.0;
    let attention = 4.0 * (c.n_layers * c.n_heads * c.head_dim) as f64 * pairs;
    let alone = matmuls_alone(model, t, runs, false)?;
    Ok(PrefillResult {
        tokens: t,
        runs,
        seconds_per_run: secs,
        tok_per_s: t as f64 / secs,
        matmul_flops: matmul,
        attention_flops: attention,
        tflops: (matmul + attention) / secs / 1e12,
        matmul_tflops: matmul / secs / 1e12,
        matmuls_alone_seconds: alone.seconds,
        matmuls_alone_tflops: alone.flops / alone.seconds / 1e12,
    })
}

/// The multiplies of one pass timed alone.
struct MatmulTiming {
    seconds: f64,
    flops: f64,
    /// Weight bytes read.
    bytes: f64,
}

/// Seconds per pass of every layer's multiplies for `t` tokens (random
/// activations; with the LM head when `head`), their FLOPs and weight
/// bytes: a step's multiplies without the attention, norms and other
/// kernels between them. Runs as `model`'s multiplies run (its GEMV
/// setting), `runs` passes after one warm-up.
fn matmuls_alone(model: &CudaModel, t: usize, runs: usize, head: bool) -> Result<MatmulTiming> {
    let dev = &model.dev;
    dev.bind()?;
    let mut mats: Vec<&super::DevMatrix> = model
        .layers
        .iter()
        .flat_map(|l| [&l.qkv, &l.wo, &l.gate_up, &l.down])
        .collect();
    if head {
        mats.push(&model.head);
    }
    let widest = mats.iter().map(|m| m.rows.max(m.cols)).max().unwrap_or(0);
    let x = dev.zeros::<f32>(t * widest, "activations")?;
    let out = dev.zeros::<f32>(t * widest, "products")?;
    let xb = dev.zeros::<u16>(t * widest, "bf16 activations")?;
    let s = &dev.stream;
    dev.k.fill_uniform_f32(ptr(&x, s), t * widest, 7, 1.0)?;
    let pass = || -> Result<()> {
        for m in &mats {
            model.gemm(
                "matmul",
                m,
                ptr(&x, s),
                t,
                ptr(&out, s),
                (ptr(&xb, s), false),
            )?;
        }
        Ok(())
    };
    pass()?;
    dev.sync("multiplies warm-up")?;
    let t0 = Instant::now();
    for _ in 0..runs.max(1) {
        pass()?;
    }
    dev.sync("multiplies")?;
    Ok(MatmulTiming {
        seconds: t0.elapsed().as_secs_f64() / runs.max(1) as f64,
        flops: mats
            .iter()
            .map(|m| 2.0 * (t * m.rows * m.cols) as f64)
            .sum(),
        bytes: mats.iter().map(|m| m.nbytes() as f64).sum(),
    })
}

/// A decode step's multiplies (every layer's and the LM head) timed alone:
/// how much of a step they take, and how close they read the weights to
/// the copy bandwidth.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeMatmuls {
    pub tokens: usize,
    /// By tandem's matrix-vector kernel (else cuBLAS).
    pub gemv: bool,
    pub ms: f64,
    pub weight_gb_per_s: f64,
    /// `weight_gb_per_s / copy.gb_per_s`.
    pub roofline_fraction: f64,
}

fn decode_matmuls(
    model: &CudaModel,
    tokens: usize,
    gemv: bool,
    opts: &BenchOptions,
    copy_gb_per_s: f64,
) -> Result<DecodeMatmuls> {
    model.set_gemv(gemv);
    let m = matmuls_alone(model, tokens, opts.decode_steps, true)?;
    let gb = m.bytes / m.seconds / 1e9;
    Ok(DecodeMatmuls {
        tokens,
        gemv,
        ms: m.seconds * 1e3,
        weight_gb_per_s: gb,
        roofline_fraction: gb / copy_gb_per_s,
    })
}

/// The whole benchmark on GPU `ordinal` (about 20 GB of device memory at
/// the defaults: 16 GB of BF16 weights, a 2 GB f32 embedding, the KV).
/// The KV is BF16, as a server with BF16 weights keeps it; the server's
/// decode mode is timed once more with f32 KV on a second model (made
/// once the first is freed, and held to the same copy bandwidth).
pub fn run(ordinal: usize, opts: BenchOptions) -> Result<BenchReport> {
    let synthetic =
        |kv| CudaModel::synthetic(llama3_8b_config(), ordinal, (Weights::Bf16, kv), opts.seed);
    let model = synthetic(KvPrecision::Bf16)?;
    let copy = copy_bandwidth(&model, opts.copy_bytes, 20)?;
    let mut dec = Vec::new();
    // What a server runs first (cuBLAS, split attention), then the
    // per-token attention kernel, the matrix-vector kernel, and no graphs.
    let server = SERVER;
    let modes = [
        server,
        DecodeMode {
            split_attention: false,
            ..server
        },
        DecodeMode {
            gemv: true,
            ..server
        },
        DecodeMode {
            graphs: false,
            greedy_on_device: false,
            ..server
        },
    ];
    for &b in &opts.decode_batches {
        for mode in modes {
            dec.push(decode(&model, b, mode, &opts, copy.gb_per_s)?);
        }
    }
    let mut dm = Vec::new();
    for &b in &opts.decode_batches {
        for gemv in [false, true] {
            if gemv && b > super::kernels::GEMV_MAX_T {
                continue;
            }
            dm.push(decode_matmuls(&model, b, gemv, &opts, copy.gb_per_s)?);
        }
    }
    let mut profiles = Vec::new();
    for &b in &opts.decode_batches {
        for split in [true, false] {
            profiles.push(profile_step(&model, b, split, &opts)?);
        }
    }
    // Prefill as a server runs it (the one logits row by cuBLAS).
    model.set_graphs(true);
    model.set_gemv(false);
    model.set_split_attention(true);
    let pre = prefill(&model, &opts)?;
    // And with the prompt's attention on the f32 tiled kernel instead of
    // the tensor cores.
    model.set_tensor_core_attention(false);
    let pre_cuda_cores = prefill(&model, &opts)?;
    model.set_graphs(false);
    profiles.push(prefill_profile(
        &model,
        &opts,
        "prefill, attention on CUDA cores",
    )?);
    model.set_tensor_core_attention(true);
    profiles.push(prefill_profile(&model, &opts, "prefill")?);
    let device = model.device_name();
    let weights = format!(
        "bf16 (random, generated on the device), f32 activations, {:?} KV",
        model.kv_precision()
    )
    .to_lowercase();
    drop(model);
    let f32_model = synthetic(KvPrecision::F32)?;
    let mut f32_kv = Vec::new();
    for &b in &opts.decode_batches {
        f32_kv.push(decode(&f32_model, b, SERVER, &opts, copy.gb_per_s)?);
    }
    Ok(BenchReport {
        device,
        weights,
        model: "llama-3-8b shape",
        options: opts,
        copy,
        decode: dec,
        decode_f32_kv: f32_kv,
        decode_matmuls: dm,
        profiles,
        prefill: pre,
        prefill_cuda_cores: pre_cuda_cores,
        notes: vec![
            "copy gb_per_s counts bytes read plus bytes written",
            "decode steps include moving each sequence's greedy id (mode.greedy_on_device) or its logits (128256 floats) to the host",
            "mode.graphs: the step replayed from a CUDA graph captured at its batch size (during warm-up)",
            "mode.gemv: multiplies of up to 8 tokens by tandem's matrix-vector kernel, else by cuBLAS",
            "mode.split_attention: decode attention by the split (flash-decoding) kernel, else one block per token and head",
            "profiles: one eager decode step per batch, with each attention kernel, and one prefill, every launch between timing events; multiplies include their bf16 copy of the input",
            "decode_matmuls: the same steps' multiplies (LM head included) alone, weight bytes read / time",
            "roofline_fraction = (weight bytes + KV bytes read) / step time / copy gb_per_s",
            "prefill tflops = (2 x matmul params x tokens + causal attention FLOPs) / time",
            "prefill: the prompt's attention on tensor cores (bf16 inputs and softmax weights, f32 sums); prefill_cuda_cores: on the f32 tiled kernel",
        ],
    })
}
