//! The CUDA backend on a real GPU. Run explicitly on a GPU machine:
//! `cargo test --release -p tandem-engine --features cuda --test cuda_backend`
//! (or the prebuilt binary, see `bench/gpu_check.sh`). Without a loadable
//! CUDA driver, cuBLAS and NVRTC every test fails, saying so.
//!
//! What is checked, and the tolerances:
//! - paged attention against a naive f64 reference on random inputs
//!   (several sequences, shuffled block tables, more keys than one tile),
//!   the per-token kernel, the split kernel and the step's plan (prompt
//!   chunks through the flash-style tiled kernel), with the KV in f32 and
//!   in BF16 (the reference reading the rounded values): max abs
//!   difference [`TOL_ATTN`]; the tensor-core kernel of BF16 models'
//!   prompt tiles against the reference of rounded queries and KV:
//!   [`TOL_ATTN_MMA`];
//! - FP32 logits against the CPU model on the default model's golden
//!   prompts: max abs difference over the whole vocabulary [`TOL_F32`];
//!   greedy continuations of [`GREEDY_STEPS`] tokens identical (up to a
//!   near tie on the CPU side: top-2 margin under [`TOL_F32`]);
//! - a batch of sequences of different lengths (prefill then decode, one
//!   prompt split in chunks, a fork whose copy-on-write block is repeated
//!   on the device) against each sequence alone, and the device KV against
//!   the CPU's, block for block, after a gather; installed KV decodes like
//!   the CPU: all within [`TOL_F32`];
//! - greedy and top-k rows (picked and selected on the device) against
//!   the argmax and `top_k_of` of the same batch's host logits: identical;
//! - decode steps replayed from CUDA graphs (padded to their batch bucket)
//!   against the same steps run kernel by kernel: within [`TOL_F32`], and
//!   greedy ids picked in the graph equal to its logits' argmax;
//! - warming up captures the decode graphs up to the largest batch's
//!   bucket and changes no output;
//! - an observed step (KV export) streams each layer's written KV like
//!   the CPU's: same calls, positions, and K/V within [`TOL_F32`];
//! - BF16 weights, with the KV in BF16 and in f32: logits of a prompt and
//!   of eight decode steps after it within [`TOL_BF16_REL`] of the largest
//!   CPU logit;
//!   the matrix-vector kernel of BF16 decode steps and cuBLAS against an
//!   f64 reference of the same rounded inputs;
//! - the committed synthetic checkpoints (llama, qwen2 with QKV bias, MQA
//!   with an untied head, safetensors with NeoX RoPE): every position's
//!   logits within [`TOL_F32`] of the CPU's.
//!
//! `bench_llama3_8b_shape` (ignored) prints the speed figures as JSON.
#![cfg(feature = "cuda")]

use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::Value;
use tandem_engine::cuda::{self, AttentionKernel, CudaModel, KvPrecision, Weights};
use tandem_engine::executor::Executor;
use tandem_engine::kv::{KvDtype, KvLayout, KvPool, SeqKv};
use tandem_engine::model::{top_k_candidates, Logits, Model, SeqStep};
use tandem_engine::sampler::{argmax, top_k_of};
use tandem_model::weights::ModelSource;

#[allow(dead_code)] // the helpers other test files use
mod common;
use common::model_path;

/// Attention output against the f64 reference (values of order 1).
const TOL_ATTN: f32 = 1e-4;
/// The tensor-core kernel against the f64 reference of its BF16-rounded
/// queries and KV: it also rounds the softmax weights to BF16, which moves
/// a weighted mean of values within 1 by 2^-8 at most.
const TOL_ATTN_MMA: f32 = 1e-2;
/// FP32 device logits against the CPU's: both multiply by the same f32
/// weights and differ only in summation order over 30 layers (the golden
/// fixture puts such float32 noise near 5e-5 on logits of magnitude ~20).
const TOL_F32: f32 = 1e-3;
/// Relative to the largest logit, for synthetic checkpoints whose logits
/// have no typical size: the default model's [`TOL_F32`] over its ~20.
const TOL_REL: f32 = 5e-5;
/// BF16 weights and activations (8-bit mantissas): max abs logit
/// difference as a fraction of the largest CPU logit magnitude.
const TOL_BF16_REL: f32 = 0.1;
const GREEDY_STEPS: usize = 16;
const GPU: usize = 0;

/// The GPU tests share one device model, which holds the device KV of one
/// pool at a time: they run one after another whatever the test threads.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static L: std::sync::Mutex<()> = std::sync::Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

fn require_gpu() {
    if let Err(e) = cuda::check_available() {
        panic!("no usable CUDA on this machine: {e}");
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Deterministic pseudo-random numbers in [-1, 1).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (((self.next() + 1.0) / 2.0 * n as f32) as usize).min(n - 1)
    }
}

fn cpu_model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let src = ModelSource::open(&model_path()).expect("open default model");
        Model::load(&src, 2).expect("load default model on the CPU")
    })
}

fn gpu_model() -> &'static CudaModel {
    static M: OnceLock<CudaModel> = OnceLock::new();
    M.get_or_init(|| {
        require_gpu();
        CudaModel::from_model(cpu_model(), GPU, Weights::F32).expect("default model on the GPU")
    })
}

/// The repository's `fixtures/`: `$TANDEM_FIXTURES_DIR`, else the source
/// tree this binary was built from, else `./fixtures` (a prebuilt binary
/// run from the repository root on another machine).
fn fixtures_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TANDEM_FIXTURES_DIR") {
        return d.into();
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    if built.is_dir() {
        built
    } else {
        PathBuf::from("fixtures")
    }
}

fn golden_prompts() -> Vec<(String, Vec<u32>)> {
    let p = fixtures_dir().join("golden/smollm2-135m-instruct-q4_1.json");
    let text =
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    let g: Value = serde_json::from_str(&text).expect("golden fixture is JSON");
    g["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| {
            let ids = p["prompt_ids"]
                .as_array()
                .expect("prompt_ids")
                .iter()
                .map(|x| x.as_u64().expect("token id") as u32)
                .collect();
            (p["name"].as_str().unwrap_or("?").to_string(), ids)
        })
        .collect()
}

/// Logits of one prompt run alone in a fresh pool (`All` or `Last`).
fn run_prompt(m: &dyn Executor, prompt: &[u32], logits: Logits) -> Vec<f32> {
    let mut pool = m.pool_for_tokens(prompt.len() + GREEDY_STEPS + 1, 16);
    let mut kv = SeqKv::default();
    let mut step = [SeqStep {
        kv: &mut kv,
        tokens: prompt,
        logits,
    }];
    m.forward(&mut pool, &mut step)
        .expect("forward")
        .pop()
        .expect("one sequence")
}

/// The last logits after `prompt` as one prefill, then `more` one decode
/// step at a time (the decode path reads the KV the prefill wrote).
fn run_decoded(m: &dyn Executor, prompt: &[u32], more: &[u32]) -> Vec<f32> {
    let mut pool = m.pool_for_tokens(prompt.len() + more.len() + 1, 16);
    let mut kv = SeqKv::default();
    let mut run = |tokens: &[u32]| {
        let mut step = [SeqStep {
            kv: &mut kv,
            tokens,
            logits: Logits::Last,
        }];
        m.forward(&mut pool, &mut step)
            .expect("forward")
            .pop()
            .expect("one sequence")
    };
    let mut last = run(prompt);
    for t in more {
        last = run(std::slice::from_ref(t));
    }
    last
}

/// Greedy continuation and, per step, the top-2 margin of its logits.
fn greedy(m: &dyn Executor, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<f32>) {
    let mut pool = m.pool_for_tokens(prompt.len() + steps + 1, 16);
    let mut kv = SeqKv::default();
    let mut toks = Vec::new();
    let mut margins = Vec::new();
    let mut next: Vec<u32> = prompt.to_vec();
    for _ in 0..steps {
        let logits = m
            .forward(
                &mut pool,
                &mut [SeqStep {
                    kv: &mut kv,
                    tokens: &next,
                    logits: Logits::Last,
                }],
            )
            .expect("forward")
            .pop()
            .expect("one sequence");
        let best = argmax(&logits);
        let second = logits
            .iter()
            .enumerate()
            .filter(|&(i, _)| i as u32 != best)
            .map(|(_, &v)| v)
            .fold(f32::NEG_INFINITY, f32::max);
        margins.push(logits[best as usize] - second);
        toks.push(best);
        next = vec![best];
    }
    (toks, margins)
}

/// Naive causal attention over one layer's paged KV, in f64.
#[allow(clippy::too_many_arguments)]
fn naive_attention(
    l: &KvLayout,
    n_heads: usize,
    q: &[f32],
    kv: &[f32],
    tables: &[Vec<u32>],
    tok_seq: &[usize],
    tok_pos: &[usize],
) -> Vec<f32> {
    let (hd, nkv, bs) = (l.head_dim, l.n_kv_heads, l.block_size);
    let qd = n_heads * hd;
    let bf = l.block_floats();
    let mut out = vec![0f32; tok_seq.len() * qd];
    for t in 0..tok_seq.len() {
        let table = &tables[tok_seq[t]];
        for h in 0..n_heads {
            let g = h / (n_heads / nkv);
            let qh = &q[t * qd + h * hd..t * qd + (h + 1) * hd];
            let n = tok_pos[t] + 1;
            let key = |k: usize, d: usize| {
                kv[table[k / bs] as usize * bf + l.k_offset(g) + d * bs + k % bs] as f64
            };
            let val = |k: usize, d: usize| {
                kv[table[k / bs] as usize * bf + l.v_offset(g) + (k % bs) * hd + d] as f64
            };
            let scale = 1.0 / (hd as f64).sqrt();
            let scores: Vec<f64> = (0..n)
                .map(|k| (0..hd).map(|d| qh[d] as f64 * key(k, d)).sum::<f64>() * scale)
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let sum: f64 = w.iter().sum();
            for d in 0..hd {
                let o: f64 = (0..n).map(|k| w[k] * val(k, d)).sum::<f64>() / sum;
                out[t * qd + h * hd + d] = o as f32;
            }
        }
    }
    out
}

#[test]
fn paged_attention_matches_naive_reference() {
    let _serial = serial();
    require_gpu();
    let mut rng = Lcg(7);
    for &(hd, n_heads, nkv, bs) in &[(64, 9, 3, 16), (128, 8, 2, 16), (64, 4, 1, 8)] {
        let layout = KvLayout {
            dtype: KvDtype::F32,
            n_layers: 1,
            n_kv_heads: nkv,
            head_dim: hd,
            block_size: bs,
        };
        // Lengths below, at and beyond one 128-key tile.
        let lens = [1usize, 17, 128, 129, 300];
        let total_blocks: usize = lens.iter().map(|&n| n.div_ceil(bs)).sum::<usize>() + 3;
        // Shuffled block ids, so tables are not contiguous.
        let mut ids: Vec<u32> = (0..total_blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.below(i + 1));
        }
        let mut tables = Vec::new();
        let mut next = 0;
        for &n in &lens {
            let nb = n.div_ceil(bs);
            tables.push(ids[next..next + nb].to_vec());
            next += nb;
        }
        let kv: Vec<f32> = (0..total_blocks * layout.block_floats())
            .map(|_| rng.next())
            .collect();
        // Up to three query positions per sequence (the last ones: a
        // decode step or a few draft tokens), plus one in the middle; then
        // prompt chunks long enough for the tiled kernel: all of the
        // 300-key sequence (a whole prompt, tiles past one key tile) and
        // 40..129 of the 129-key one (a later chunk whose tiles start
        // mid-block), right after short runs of the same sequences.
        let (mut tok_seq, mut tok_pos) = (Vec::new(), Vec::new());
        for (s, &n) in lens.iter().enumerate() {
            for p in n.saturating_sub(3)..n {
                tok_seq.push(s);
                tok_pos.push(p);
            }
            tok_seq.push(s);
            tok_pos.push(n / 2);
        }
        for p in 40..129 {
            tok_seq.push(3);
            tok_pos.push(p);
        }
        for p in 0..300 {
            tok_seq.push(4);
            tok_pos.push(p);
        }
        let q: Vec<f32> = (0..tok_seq.len() * n_heads * hd)
            .map(|_| rng.next() * 2.0)
            .collect();
        let kernels = [
            AttentionKernel::PerToken,
            AttentionKernel::Split,
            AttentionKernel::Planned,
        ];
        let mut outs = Vec::new();
        // With BF16 KV the device rounds the values as it takes them in
        // (nearest even, as `half` rounds): the reference reads the same.
        for kvp in [KvPrecision::F32, KvPrecision::Bf16] {
            let held: Vec<f32> = match kvp {
                KvPrecision::F32 => kv.clone(),
                KvPrecision::Bf16 => kv
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_f32())
                    .collect(),
            };
            let want = naive_attention(&layout, n_heads, &q, &held, &tables, &tok_seq, &tok_pos);
            // `kernel` on this KV against `want`, within `tol`.
            let checked = |kernel: AttentionKernel, want: &[f32], tol: f32| {
                let got = cuda::paged_attention(
                    (kernel, kvp),
                    GPU,
                    &layout,
                    n_heads,
                    &q,
                    &kv,
                    &tables,
                    &tok_seq,
                    &tok_pos,
                )
                .expect("paged attention on the GPU");
                let d = max_abs_diff(&got, want);
                eprintln!(
                    "paged attention {kernel:?}, {kvp:?} KV, hd={hd} heads={n_heads}/{nkv} bs={bs}: max abs diff {d:.2e}"
                );
                assert!(
                    d <= tol,
                    "{kernel:?} paged attention ({kvp:?} KV) differs by {d} (tolerance {tol})"
                );
                got
            };
            let first = outs.len();
            for kernel in kernels {
                outs.push(checked(kernel, &want, TOL_ATTN));
            }
            for (kernel, out) in kernels.iter().zip(&outs[first..]).skip(1) {
                let d = max_abs_diff(&outs[first], out);
                assert!(
                    d <= TOL_ATTN,
                    "{kernel:?} and per-token attention ({kvp:?} KV) differ by {d} (tolerance {TOL_ATTN})"
                );
            }
            // The prompt tiles on the tensor cores, against the reference
            // of the rounded queries and KV.
            let bf = |v: &f32| half::bf16::from_f32(*v).to_f32();
            let q_bf: Vec<f32> = q.iter().map(bf).collect();
            let held_bf: Vec<f32> = held.iter().map(bf).collect();
            let want_bf = naive_attention(
                &layout, n_heads, &q_bf, &held_bf, &tables, &tok_seq, &tok_pos,
            );
            checked(AttentionKernel::TensorCore, &want_bf, TOL_ATTN_MMA);
        }
        // The split kernel cuts keys by position alone: the last decode
        // row of the 300-key sequence alone gives the same bits as among
        // the other rows.
        let qd = n_heads * hd;
        let row = tok_seq
            .iter()
            .position(|&s| s == 4)
            .expect("a row of sequence 4");
        let alone = cuda::paged_attention(
            (AttentionKernel::Split, KvPrecision::F32),
            GPU,
            &layout,
            n_heads,
            &q[row * qd..(row + 1) * qd],
            &kv,
            &tables,
            &tok_seq[row..row + 1],
            &tok_pos[row..row + 1],
        )
        .expect("split attention of one row");
        assert!(
            alone
                .iter()
                .zip(&outs[1][row * qd..(row + 1) * qd])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "a row's split attention differs alone from among others"
        );
    }
}

#[test]
fn fp32_logits_and_greedy_match_the_cpu() {
    let _serial = serial();
    require_gpu();
    let (cpu, gpu) = (cpu_model(), gpu_model());
    let mut worst = 0f32;
    let mut compared = 0;
    for (name, prompt) in golden_prompts() {
        let want = run_prompt(cpu, &prompt, Logits::Last);
        let got = run_prompt(gpu, &prompt, Logits::Last);
        let d = max_abs_diff(&got, &want);
        worst = worst.max(d);
        assert!(
            d <= TOL_F32,
            "{name}: FP32 logits differ from the CPU's by {d} (tolerance {TOL_F32})"
        );
        let (want_t, margins) = greedy(cpu, &prompt, GREEDY_STEPS);
        let (got_t, _) = greedy(gpu, &prompt, GREEDY_STEPS);
        let limit = margins
            .iter()
            .position(|&m| m < TOL_F32)
            .unwrap_or(GREEDY_STEPS);
        if limit < GREEDY_STEPS {
            eprintln!("{name}: CPU near tie at step {limit}; comparing {limit} greedy steps");
        }
        compared += limit;
        assert_eq!(
            &got_t[..limit],
            &want_t[..limit],
            "{name}: greedy continuation differs from the CPU's"
        );
    }
    eprintln!("FP32 vs CPU: worst logit difference {worst:.2e} (tolerance {TOL_F32:.0e}); {compared} greedy steps identical");
}

/// The token decode step `step` feeds the sequence of `prompt` (fixed,
/// not sampled: the runs compared must take the same steps), below
/// `vocab`. A function of the prompt, not of its place in a batch: a
/// sequence run alone is fed what it is fed in a batch.
fn fed_token(step: usize, prompt: &[u32], vocab: usize) -> u32 {
    let seed = prompt.iter().fold(prompt.len(), |h, &t| {
        h.wrapping_mul(31).wrapping_add(t as usize)
    });
    ((step * 31 + seed % 997 + 5) % (vocab.min(1010) - 10)) as u32 + 10
}

/// Prefills `prompts` (each with its own token count) then decodes
/// `decode` steps with fixed tokens, all in one batch per step; returns
/// each sequence's logits of every step, concatenated.
fn batched(m: &dyn Executor, prompts: &[Vec<u32>], decode: usize) -> Vec<Vec<f32>> {
    let total: usize = prompts.iter().map(|p| p.len() + decode + 16).sum();
    let mut pool = m.pool_for_tokens(total, 16);
    let mut kvs: Vec<SeqKv> = prompts.iter().map(|_| SeqKv::default()).collect();
    let mut out: Vec<Vec<f32>> = prompts.iter().map(|_| Vec::new()).collect();
    let mut feed: Vec<Vec<u32>> = prompts.to_vec();
    for step in 0..=decode {
        let mut b: Vec<SeqStep<'_>> = kvs
            .iter_mut()
            .zip(&feed)
            .map(|(kv, t)| SeqStep {
                kv,
                tokens: t,
                logits: Logits::Last,
            })
            .collect();
        let logits = m.forward(&mut pool, &mut b).expect("batched forward");
        for (o, l) in out.iter_mut().zip(logits) {
            o.extend(l);
        }
        feed = prompts
            .iter()
            .map(|p| vec![fed_token(step, p, m.config().vocab_size)])
            .collect();
    }
    out
}

/// Sequences that ask for the greedy id only, or their top-k only, get
/// the argmax, or `top_k_of`, of exactly the logits they would have been
/// sent (the same batch with every row `Last`: same shapes, same cuBLAS
/// algorithms, same bits), selected on the device; the other rows of the
/// batch are unchanged, bit for bit.
#[test]
fn greedy_and_top_k_rows_are_picked_from_the_logits_they_replace() {
    let _serial = serial();
    let m = gpu_model();
    let prompts: Vec<Vec<u32>> = golden_prompts().into_iter().map(|(_, p)| p).collect();
    let kinds: Vec<Logits> = (0..prompts.len())
        .map(|i| match i % 4 {
            0 => Logits::Greedy,
            1 => Logits::Last,
            2 => Logits::TopK(40),
            _ => Logits::TopK(256),
        })
        .collect();
    let run = |as_asked: bool| {
        let total: usize = prompts.iter().map(|p| p.len() + 16).sum();
        let mut pool = m.pool_for_tokens(total, 16);
        let mut kvs: Vec<SeqKv> = prompts.iter().map(|_| SeqKv::default()).collect();
        let mut b: Vec<SeqStep<'_>> = kvs
            .iter_mut()
            .zip(&prompts)
            .zip(&kinds)
            .map(|((kv, t), &k)| SeqStep {
                kv,
                tokens: t,
                logits: if as_asked { k } else { Logits::Last },
            })
            .collect();
        m.forward(&mut pool, &mut b).expect("batched forward")
    };
    let mixed = run(true);
    let full = run(false);
    for (i, k) in kinds.iter().enumerate() {
        if *k == Logits::Greedy {
            assert_eq!(
                mixed[i],
                vec![argmax(&full[i]) as f32],
                "prompt {i}: the device's greedy pick"
            );
        } else if let Logits::TopK(n) = *k {
            assert_eq!(
                top_k_candidates(&mixed[i]),
                top_k_of(&full[i], n),
                "prompt {i}: the device's top-{n}"
            );
        } else {
            assert!(
                mixed[i]
                    .iter()
                    .zip(&full[i])
                    .all(|(a, b)| a.to_bits() == b.to_bits())
                    && mixed[i].len() == full[i].len(),
                "prompt {i}: a Last row next to greedy ones changed"
            );
        }
    }
}

/// Prefills `prompts` (one batch), then runs `steps` decode steps in one
/// batch with fixed tokens, sequence `i` asking for `kinds[i]`; returns
/// each decode step's rows. `warm`: warm the model up on the fresh pool
/// first, for batches of up to that many sequences.
fn decode_steps(
    m: &CudaModel,
    prompts: &[Vec<u32>],
    steps: usize,
    kinds: &[Logits],
    warm: Option<usize>,
) -> Vec<Vec<Vec<f32>>> {
    let total: usize = prompts.iter().map(|p| p.len() + steps + 16).sum();
    let mut pool = m.pool_for_tokens(total, 16);
    if let Some(n) = warm {
        m.warm_up(&mut pool, n).expect("warm-up");
    }
    let mut kvs: Vec<SeqKv> = prompts.iter().map(|_| SeqKv::default()).collect();
    let mut b: Vec<SeqStep<'_>> = kvs
        .iter_mut()
        .zip(prompts)
        .map(|(kv, t)| SeqStep {
            kv,
            tokens: t,
            logits: Logits::None,
        })
        .collect();
    m.forward(&mut pool, &mut b).expect("prefill");
    drop(b);
    let mut out = Vec::new();
    for step in 0..steps {
        let feed: Vec<[u32; 1]> = prompts
            .iter()
            .map(|p| [fed_token(step, p, m.config().vocab_size)])
            .collect();
        let mut b: Vec<SeqStep<'_>> = kvs
            .iter_mut()
            .zip(&feed)
            .zip(kinds)
            .map(|((kv, t), &logits)| SeqStep {
                kv,
                tokens: t,
                logits,
            })
            .collect();
        out.push(m.forward(&mut pool, &mut b).expect("decode step"));
    }
    out
}

/// Decode steps replayed from CUDA graphs (three sequences padded to a
/// bucket of four, then one alone) against the same steps launched kernel
/// by kernel: logits within [`TOL_F32`] (padding changes the multiplies'
/// shapes, so cuBLAS may sum in another order); greedy ids picked inside
/// the graph equal to the argmax of the same graph's logits, exactly.
#[test]
fn decode_graphs_match_eager_steps() {
    let _serial = serial();
    let m = gpu_model();
    let prompts: Vec<Vec<u32>> = golden_prompts()
        .into_iter()
        .map(|(_, p)| p)
        .take(3)
        .collect();
    let steps = 6;
    for set in [&prompts[..], &prompts[..1]] {
        let last = vec![Logits::Last; set.len()];
        let mixed: Vec<Logits> = (0..set.len())
            .map(|i| match i % 3 {
                0 => Logits::Greedy,
                1 => Logits::Last,
                _ => Logits::TopK(50),
            })
            .collect();
        m.set_graphs(false);
        let eager = decode_steps(m, set, steps, &last, None);
        m.set_graphs(true);
        let graphed = decode_steps(m, set, steps, &last, None);
        let picked = decode_steps(m, set, steps, &mixed, None);
        for step in 0..steps {
            for i in 0..set.len() {
                let d = max_abs_diff(&graphed[step][i], &eager[step][i]);
                eprintln!(
                    "decode graph, {} rows, step {step}, seq {i}: max abs diff {d:.2e}",
                    set.len()
                );
                assert!(
                    d <= TOL_F32,
                    "graph step {step} seq {i} differs from eager by {d} (tolerance {TOL_F32})"
                );
                if mixed[i] == Logits::Greedy {
                    assert_eq!(
                        picked[step][i],
                        vec![argmax(&graphed[step][i]) as f32],
                        "graph step {step} seq {i}: greedy pick"
                    );
                } else if let Logits::TopK(n) = mixed[i] {
                    assert_eq!(
                        top_k_candidates(&picked[step][i]),
                        top_k_of(&graphed[step][i], n),
                        "graph step {step} seq {i}: top-{n}"
                    );
                } else {
                    assert_eq!(picked[step][i], graphed[step][i], "step {step} seq {i}");
                }
            }
        }
    }
}

/// Warming up captures the decode graph of every bucket up to the one that
/// holds the largest batch, before any step, and writes nothing a sequence
/// reads: decoding afterwards gives what a pool never warmed gives.
#[test]
fn warming_up_captures_the_graphs_and_changes_no_output() {
    let _serial = serial();
    let m = gpu_model();
    m.set_graphs(true);
    let prompts: Vec<Vec<u32>> = golden_prompts()
        .into_iter()
        .map(|(_, p)| p)
        .take(3)
        .collect();
    let last = vec![Logits::Last; prompts.len()];
    let cold = decode_steps(m, &prompts, 3, &last, None);
    // Another pool size: fresh device KV, no graph left from before.
    let mut longer = prompts.clone();
    longer[0].extend(15..55u32);
    let warm = decode_steps(m, &longer, 3, &last, Some(6));
    assert_eq!(
        m.captured_graph_buckets(),
        vec![1, 2, 4, 8],
        "buckets up to the one holding 6"
    );
    let cold_longer = {
        m.set_graphs(false);
        let out = decode_steps(m, &longer, 3, &last, None);
        m.set_graphs(true);
        out
    };
    for step in 0..3 {
        for i in 0..prompts.len() {
            let d = max_abs_diff(&warm[step][i], &cold_longer[step][i]);
            assert!(d <= TOL_F32, "warmed step {step} seq {i} differs by {d}");
            assert_eq!(warm[step][i].len(), cold[step][i].len());
        }
    }
}

/// What an observer of a step (a prefill worker's KV export) sees, layer
/// by layer, on the GPU (each layer copied out as the device writes it,
/// while the later layers compute) and on the CPU: the same calls in the
/// same order (layer-major, then sequence), the same positions, and every
/// written token's K and V within [`TOL_F32`]; the step's logits too.
#[test]
fn observed_steps_stream_each_layer_like_the_cpu() {
    let _serial = serial();
    let (gpu, cpu) = (gpu_model(), cpu_model());
    let cut = 11;
    let prompts: Vec<Vec<u32>> = golden_prompts()
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| p.len() > cut)
        .take(2)
        .collect();
    assert_eq!(
        prompts.len(),
        2,
        "two golden prompts longer than {cut} tokens"
    );
    type Seen = Vec<(usize, usize, std::ops::Range<usize>, Vec<f32>)>;
    let observe = |m: &dyn Executor| -> (Seen, Vec<Vec<f32>>) {
        let total: usize = prompts.iter().map(|p| p.len() + 16).sum();
        let mut pool = m.pool_for_tokens(total, 16);
        let mut kvs: Vec<SeqKv> = prompts.iter().map(|_| SeqKv::default()).collect();
        let mut seen: Seen = Vec::new();
        let mut logits = Vec::new();
        // Two chunks per prompt, both observed: the second starts mid-block.
        for chunk in [0..cut, cut..usize::MAX] {
            let mut b: Vec<SeqStep<'_>> = kvs
                .iter_mut()
                .zip(&prompts)
                .map(|(kv, p)| SeqStep {
                    kv,
                    tokens: &p[chunk.start..chunk.end.min(p.len())],
                    logits: Logits::Last,
                })
                .collect();
            let mut on_layer = |l: tandem_engine::model::LayerKv<'_>| {
                let layout = *l.pool.layout();
                let mut kv = Vec::new();
                for pos in l.positions.clone() {
                    let region = l.pool.region(l.layer, l.kv.blocks[pos / layout.block_size]);
                    kv.extend(token_kv(&layout, region, pos));
                }
                seen.push((l.layer, l.seq, l.positions.clone(), kv));
            };
            logits = m
                .forward_observed(&mut pool, &mut b, &mut on_layer)
                .expect("observed step");
        }
        (seen, logits)
    };
    let (g, gl) = observe(gpu);
    let (c, cl) = observe(cpu);
    assert_eq!(g.len(), c.len(), "observer calls");
    let mut worst = 0f32;
    for (a, b) in g.iter().zip(&c) {
        assert_eq!(
            (a.0, a.1, &a.2),
            (b.0, b.1, &b.2),
            "call order and positions"
        );
        worst = worst.max(max_abs_diff(&a.3, &b.3));
    }
    eprintln!("observed KV, GPU vs CPU: max abs diff {worst:.2e}");
    assert!(
        worst <= TOL_F32,
        "observed KV differs from the CPU's by {worst}"
    );
    for (a, b) in gl.iter().zip(&cl) {
        assert!(max_abs_diff(a, b) <= TOL_F32, "observed step logits");
    }
}

/// One token's K then V (every KV head) out of a block region.
fn token_kv(l: &KvLayout, region: &[f32], pos: usize) -> Vec<f32> {
    let (bs, hd) = (l.block_size, l.head_dim);
    let slot = pos % bs;
    let mut out = Vec::new();
    for h in 0..l.n_kv_heads {
        out.extend((0..hd).map(|d| region[l.k_offset(h) + d * bs + slot]));
        out.extend((0..hd).map(|d| region[l.v_offset(h) + slot * hd + d]));
    }
    out
}

#[test]
fn batch_chunks_and_forks_match_single_runs() {
    let _serial = serial();
    require_gpu();
    let (cpu, gpu) = (cpu_model(), gpu_model());
    let prompts: Vec<Vec<u32>> = golden_prompts()
        .into_iter()
        .map(|(_, p)| p)
        .take(4)
        .enumerate()
        .map(|(i, p)| p[..p.len().min(5 + 9 * i)].to_vec())
        .collect();
    // Batched vs alone, on the GPU.
    let together = batched(gpu, &prompts, 3);
    for (i, p) in prompts.iter().enumerate() {
        let alone = batched(gpu, std::slice::from_ref(p), 3);
        let d = max_abs_diff(&together[i], &alone[0]);
        assert!(
            d <= TOL_F32,
            "sequence {i}: batched differs from alone by {d}"
        );
        // And the CPU agrees.
        let c = batched(cpu, std::slice::from_ref(p), 3);
        let d = max_abs_diff(&together[i], &c[0]);
        assert!(
            d <= TOL_F32,
            "sequence {i}: GPU batch differs from the CPU by {d}"
        );
    }

    // One prompt in chunks (7, then the rest) vs whole: every position.
    let long: Vec<u32> = golden_prompts()
        .into_iter()
        .map(|(_, p)| p)
        .max_by_key(|p| p.len())
        .expect("a prompt");
    let whole = run_prompt(gpu, &long, Logits::All);
    let mut pool = gpu.pool_for_tokens(long.len(), 16);
    let mut kv = SeqKv::default();
    let mut chunked = Vec::new();
    for chunk in [&long[..7], &long[7..]] {
        chunked.extend(
            gpu.forward(
                &mut pool,
                &mut [SeqStep {
                    kv: &mut kv,
                    tokens: chunk,
                    logits: Logits::All,
                }],
            )
            .expect("chunk")
            .remove(0),
        );
    }
    let d = max_abs_diff(&whole, &chunked);
    assert!(d <= TOL_F32, "chunked prefill differs by {d}");

    // Fork after a partial block: the fork's copy-on-write block must be
    // repeated on the device. CPU and GPU take the same steps.
    let prompt = &long[..21]; // 16 + 5: the second block is partial
    let fork_run = |m: &dyn Executor| -> Vec<Vec<f32>> {
        let mut pool = m.pool_for_tokens(4 * 32, 16);
        m.prepare_pool(&mut pool);
        let mut a = SeqKv::default();
        m.forward(
            &mut pool,
            &mut [SeqStep {
                kv: &mut a,
                tokens: prompt,
                logits: Logits::None,
            }],
        )
        .expect("prefill");
        let mut b = pool.fork(&a);
        let mut outs = Vec::new();
        for (ta, tb) in [(100u32, 200u32), (101, 201)] {
            let (sa, sb) = ([ta], [tb]);
            outs.extend(
                m.forward(
                    &mut pool,
                    &mut [
                        SeqStep {
                            kv: &mut a,
                            tokens: &sa,
                            logits: Logits::Last,
                        },
                        SeqStep {
                            kv: &mut b,
                            tokens: &sb,
                            logits: Logits::Last,
                        },
                    ],
                )
                .expect("forked step"),
            );
        }
        outs
    };
    let (g, c) = (fork_run(gpu), fork_run(cpu));
    for (i, (g, c)) in g.iter().zip(&c).enumerate() {
        let d = max_abs_diff(g, c);
        assert!(
            d <= TOL_F32,
            "forked step output {i} differs from the CPU by {d}"
        );
    }

    // KV layout: the device blocks after a prefill equal the CPU pool's.
    let p = &long[..long.len().min(40)];
    let mut cpool = cpu.pool_for_tokens(p.len() + 1, 16);
    let mut gpool = gpu.pool_for_tokens(p.len() + 1, 16);
    let (mut ckv, mut gkv) = (SeqKv::default(), SeqKv::default());
    for (m, pool, kv) in [
        (cpu as &dyn Executor, &mut cpool, &mut ckv),
        (gpu as &dyn Executor, &mut gpool, &mut gkv),
    ] {
        m.forward(
            pool,
            &mut [SeqStep {
                kv,
                tokens: p,
                logits: Logits::None,
            }],
        )
        .expect("prefill");
    }
    let staged = gpu
        .gather(&gpool, &gkv.blocks)
        .expect("gather")
        .expect("the GPU always stages");
    let layout = *cpool.layout();
    let mut worst = 0f32;
    for layer in 0..layout.n_layers {
        for pos in 0..p.len() {
            let bi = pos / layout.block_size;
            let g = token_kv(&layout, staged.region(layer, bi), pos);
            let c = token_kv(&layout, cpool.region(layer, ckv.blocks[bi]), pos);
            worst = worst.max(max_abs_diff(&g, &c));
        }
    }
    eprintln!("device KV vs CPU KV: max abs diff {worst:.2e}");
    assert!(
        worst <= TOL_F32,
        "device KV differs from the CPU's by {worst}"
    );

    // Install the CPU's KV into a fresh device pool and decode one token.
    let cpu_staged = cpu
        .gather(&cpool, &ckv.blocks)
        .expect("gather")
        .unwrap_or_else(|| {
            let mut s = tandem_engine::kv::KvStaging::new(layout, ckv.blocks.len() * 16);
            for layer in 0..layout.n_layers {
                for (bi, &b) in ckv.blocks.iter().enumerate() {
                    s.region_mut(layer, bi)
                        .copy_from_slice(cpool.region(layer, b));
                }
            }
            s
        });
    let mut ipool = gpu.pool_for_tokens(p.len() + 1, 16);
    let mut ikv = SeqKv::default();
    ipool.reserve(&mut ikv, p.len()).expect("reserve");
    gpu.install(&mut ipool, &ikv, &cpu_staged).expect("install");
    ikv.len = p.len();
    let next = [42u32];
    let got = gpu
        .forward(
            &mut ipool,
            &mut [SeqStep {
                kv: &mut ikv,
                tokens: &next,
                logits: Logits::Last,
            }],
        )
        .expect("decode after install")
        .remove(0);
    let want = cpu
        .forward(
            &mut cpool,
            &mut [SeqStep {
                kv: &mut ckv,
                tokens: &next,
                logits: Logits::Last,
            }],
        )
        .expect("CPU decode")
        .remove(0);
    let d = max_abs_diff(&got, &want);
    assert!(
        d <= TOL_F32,
        "decode after install differs from the CPU by {d}"
    );
}

/// BF16 weights, with the KV in BF16 (what `cuda-bf16` serves with) and
/// in f32 (`TANDEM_CUDA_KV=f32`): both within [`TOL_BF16_REL`].
#[test]
fn bf16_logits_within_tolerance() {
    let _serial = serial();
    require_gpu();
    let cpu = cpu_model();
    let prompts = golden_prompts();
    for kvp in [KvPrecision::Bf16, KvPrecision::F32] {
        let gpu = CudaModel::from_model_with_kv(cpu, GPU, Weights::Bf16, kvp)
            .expect("BF16 model on the GPU");
        assert_eq!(gpu.kv_precision(), kvp);
        let mut worst_rel = 0f32;
        let mut top1_same = 0;
        for (name, prompt) in &prompts {
            let want = run_prompt(cpu, prompt, Logits::Last);
            let got = run_prompt(&gpu, prompt, Logits::Last);
            // And eight decode steps after it (the prompt's first tokens
            // again), against the CPU's prefill of the whole.
            let more = &prompt[..prompt.len().min(8)];
            let whole: Vec<u32> = prompt.iter().chain(more).copied().collect();
            let want_decoded = run_prompt(cpu, &whole, Logits::Last);
            let got_decoded = run_decoded(&gpu, prompt, more);
            for (what, got, want) in [
                ("prefill", got, want),
                ("decode", got_decoded, want_decoded),
            ] {
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1.0);
                let rel = max_abs_diff(&got, &want) / scale;
                worst_rel = worst_rel.max(rel);
                top1_same += usize::from(argmax(&got) == argmax(&want));
                assert!(
                    rel <= TOL_BF16_REL,
                    "{name}, {what}: BF16 logits ({kvp:?} KV) differ by {rel} of the largest logit (tolerance {TOL_BF16_REL})"
                );
            }
        }
        eprintln!(
            "BF16 vs CPU, {kvp:?} KV: worst max-abs-diff / max|logit| {worst_rel:.3e}; top-1 agrees on {top1_same}/{} (prefills and decodes)",
            2 * prompts.len()
        );
    }
}

#[test]
fn synthetic_checkpoints_match_the_cpu() {
    let _serial = serial();
    require_gpu();
    let dir = fixtures_dir().join("synth");
    for name in [
        "tiny-llama-q4_k.gguf",
        "tiny-qwen2-q6_k.gguf",
        "tiny-mqa-llama-q8_0.gguf",
        "tiny-llama-bf16-2shards",
    ] {
        let src = ModelSource::open(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let cpu = Model::load(&src, 2).unwrap_or_else(|e| panic!("{name} on the CPU: {e}"));
        let gpu = CudaModel::from_model(&cpu, GPU, Weights::F32)
            .unwrap_or_else(|e| panic!("{name} on the GPU: {e}"));
        let vocab = cpu.config.vocab_size;
        let mut rng = Lcg(3);
        let prompt: Vec<u32> = (0..40).map(|_| rng.below(vocab) as u32).collect();
        let want = run_prompt(&cpu, &prompt, Logits::All);
        let got = run_prompt(&gpu, &prompt, Logits::All);
        let d = max_abs_diff(&got, &want);
        eprintln!(
            "{name}: max abs logit diff {d:.2e} over {} positions",
            prompt.len()
        );
        assert!(d <= TOL_F32, "{name}: logits differ from the CPU's by {d}");
    }
}

/// The BF16 matrix-vector kernel (decode steps of up to 8 tokens) and
/// cuBLAS against an f64 reference of the same BF16-rounded inputs, on
/// shapes of the default model and of larger ones, rows that do not fill
/// the kernel's last block, and widths it does not take (cuBLAS then).
#[test]
fn bf16_gemv_matches_cublas_and_a_reference() {
    let _serial = serial();
    require_gpu();
    let bf = |v: f32| half::bf16::from_f32(v).to_f32();
    let mut rng = Lcg(5);
    for &(rows, cols, t) in &[
        (576, 576, 1),
        (3072, 576, 3),
        (4099, 4096, 8),
        (1000, 14336, 2),
        (300, 100, 4),
        (512, 1024, 9),
    ] {
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.next()).collect();
        let x: Vec<f32> = (0..t * cols).map(|_| rng.next()).collect();
        let want: Vec<f64> = (0..t)
            .flat_map(|ti| {
                let (w, x) = (&w, &x);
                (0..rows).map(move |r| {
                    (0..cols)
                        .map(|j| bf(w[r * cols + j]) as f64 * bf(x[ti * cols + j]) as f64)
                        .sum()
                })
            })
            .collect();
        let tol = 1e-4 * (cols as f32 / 1000.0).max(1.0);
        for gemv in [true, false] {
            let got = cuda::bf16_matmul(GPU, &w, rows, cols, &x, gemv).expect("bf16 matmul");
            let d = got
                .iter()
                .zip(&want)
                .map(|(&g, &w)| (g as f64 - w).abs() as f32)
                .fold(0f32, f32::max);
            eprintln!("bf16 matmul [{rows}, {cols}] x {t} rows, gemv={gemv}: max abs diff {d:.2e}");
            assert!(
                d <= tol,
                "[{rows}, {cols}] x {t}, gemv={gemv}: differs from the reference by {d} (tolerance {tol})"
            );
        }
    }
}

/// A batch of prompts of different lengths (a one-token prompt, short
/// ones per token, longer ones in tiles, then decode steps that cross
/// block boundaries) against each prompt alone and against the CPU, every
/// step's logits, with decode graphs off and on; on a committed synthetic
/// checkpoint, a Qwen3 one and one of the default model's shape with
/// random weights (both written here), so that it needs no model file.
#[test]
fn batches_match_single_runs_on_synthetic_checkpoints() {
    use tandem_model::config::Arch;
    use tandem_model::quant::GgmlType;
    use tandem_model::synth::{synth, SynthFormat, SynthShape, SynthSpec, SynthTokenizer};
    let _serial = serial();
    require_gpu();
    let dir = std::env::temp_dir().join(format!("tandem-cuda-batches-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    let smol = dir.join("smollm2-shape-q8_0.gguf");
    synth(
        &SynthSpec {
            arch: Arch::Llama,
            shape: SynthShape::preset("smollm2-135m").expect("preset"),
            seed: 5,
            format: SynthFormat::Gguf {
                weight_type: GgmlType::Q8_0,
            },
            tokenizer: SynthTokenizer::Gpt2,
        },
        &smol,
    )
    .expect("writing a synthetic checkpoint");
    // Qwen3: per-head query and key norms before RoPE.
    let qwen3 = dir.join("tiny-qwen3-q8_0.gguf");
    synth(
        &SynthSpec {
            arch: Arch::Qwen3,
            shape: SynthShape::preset("tiny").expect("preset"),
            seed: 1,
            format: SynthFormat::Gguf {
                weight_type: GgmlType::Q8_0,
            },
            tokenizer: SynthTokenizer::Gpt2,
        },
        &qwen3,
    )
    .expect("writing a synthetic checkpoint");
    let decode = 4;
    let mut failures = Vec::new();
    for path in [
        fixtures_dir().join("synth/tiny-llama-q4_k.gguf"),
        qwen3,
        smol,
    ] {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let src = ModelSource::open(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let cpu = Model::load(&src, 2).unwrap_or_else(|e| panic!("{name} on the CPU: {e}"));
        let gpu = CudaModel::from_model(&cpu, GPU, Weights::F32)
            .unwrap_or_else(|e| panic!("{name} on the GPU: {e}"));
        let vocab = cpu.config.vocab_size;
        let mut rng = Lcg(11);
        let prompts: Vec<Vec<u32>> = [1usize, 5, 14, 23, 32, 40]
            .iter()
            .map(|&n| (0..n).map(|_| rng.below(vocab) as u32).collect())
            .collect();
        let on_cpu: Vec<Vec<f32>> = prompts
            .iter()
            .map(|p| batched(&cpu, std::slice::from_ref(p), decode).remove(0))
            .collect();
        for graphs in [false, true] {
            gpu.set_graphs(graphs);
            let together = batched(&gpu, &prompts, decode);
            for (i, p) in prompts.iter().enumerate() {
                let alone = batched(&gpu, std::slice::from_ref(p), decode).remove(0);
                for step in 0..=decode {
                    let r = step * vocab..(step + 1) * vocab;
                    let scale = on_cpu[i][r.clone()]
                        .iter()
                        .fold(1f32, |m, x| m.max(x.abs()));
                    let tol = TOL_REL * scale;
                    let d_alone = max_abs_diff(&together[i][r.clone()], &alone[r.clone()]);
                    let d_cpu = max_abs_diff(&together[i][r.clone()], &on_cpu[i][r.clone()]);
                    eprintln!(
                        "{name} graphs={graphs} prompt {i} ({} tokens) step {step}: \
                         batch vs alone {d_alone:.2e}, vs CPU {d_cpu:.2e} (tolerance {tol:.2e})",
                        p.len()
                    );
                    if d_alone > tol || d_cpu > tol {
                        failures.push(format!(
                            "{name} graphs={graphs} prompt {i} step {step}: alone {d_alone}, CPU {d_cpu}"
                        ));
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        failures.is_empty(),
        "batched steps differ:\n{}",
        failures.join("\n")
    );
}

/// Speed figures (see `tandem_engine::cuda::bench`): prints one line
/// `CUDA_BENCH_JSON {...}` and writes the JSON to `$TANDEM_BENCH_JSON` when set.
#[test]
#[ignore = "GPU benchmark: run with --ignored on a GPU machine"]
fn bench_llama3_8b_shape() {
    let _serial = serial();
    require_gpu();
    let report = cuda::bench::run(GPU, cuda::bench::BenchOptions::default()).expect("benchmark");
    let json = serde_json::to_string(&report).expect("report to JSON");
    println!("CUDA_BENCH_JSON {json}");
    if let Some(p) = std::env::var_os("TANDEM_BENCH_JSON") {
        std::fs::write(&p, &json).expect("writing the benchmark JSON");
    }
}

/// A tracking pool is what the scheduler needs with this executor: it
/// allocates and counts, and holds no KV.
#[test]
fn tracking_pool_holds_no_kv() {
    let layout = KvLayout {
        dtype: KvDtype::F32,
        n_layers: 2,
        n_kv_heads: 1,
        head_dim: 4,
        block_size: 4,
    };
    let mut p = KvPool::new_tracking(layout, 3);
    assert!(!p.holds_kv());
    let mut s = SeqKv::default();
    p.reserve(&mut s, 5).expect("reserve");
    s.len = 5;
    let mut f = p.fork(&s);
    p.reserve(&mut f, 1).expect("copy on write");
    assert_eq!(p.take_copies(), vec![(s.blocks[1], f.blocks[1])]);
}
