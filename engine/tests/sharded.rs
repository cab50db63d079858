//! Tensor- and pipeline-parallel workers against the single process: the
//! ranks are threads here, talking over real loopback sockets (the worker
//! binary runs them as processes; see the e2e suite). Logits must be the
//! same bits, and so greedy tokens the same, for every shape.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tandem_engine::cpu::ExpandWeights;
use tandem_engine::engine::{Engine, EngineConfig, RequestSpec};
use tandem_engine::executor::Executor;
use tandem_engine::generate::{generate, GenerateRequest};
use tandem_engine::kv::KvStaging;
use tandem_engine::model::Model;
use tandem_engine::sampler::{Sampled, SamplingParams};
use tandem_engine::scheduler::{ExportBlock, KvExport, SchedulerConfig};
use tandem_engine::shard::{run_follower, ShardOptions, ShardSpec, ShardedModel};
use tandem_engine::EngineError;
use tandem_model::weights::ModelSource;

#[allow(dead_code)] // the helpers other test files use
mod common;
use common::{block_on, collect_all, model_path as default_model};

fn synth_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/synth")
        .join(name)
}

/// A worker of `tp × pp` ranks: rank 0 here, the others on threads.
struct Worker {
    rank0: Arc<ShardedModel>,
    followers: Vec<std::thread::JoinHandle<Result<(), EngineError>>>,
}

fn start(path: &Path, tp: usize, pp: usize) -> Worker {
    // Tests run at once: each group has a session of its own, so that a
    // rank never joins another test's group (should both pick a port the
    // other just released), which drops strangers.
    static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(77);
    let session = SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let rendezvous = ShardOptions::local_rendezvous(tp, pp).unwrap();
    let opts = |rank| ShardOptions {
        spec: ShardSpec { tp, pp, rank },
        rendezvous: rendezvous.clone(),
        session,
        timeout: Duration::from_secs(60),
        threads: 1,
        expand: ExpandWeights::Off,
    };
    let followers = (1..tp * pp)
        .map(|rank| {
            let (path, o) = (path.to_path_buf(), opts(rank));
            std::thread::spawn(move || {
                let src = ModelSource::open(&path).unwrap();
                run_follower(&src, &o)
            })
        })
        .collect();
    let src = ModelSource::open(path).unwrap();
    let rank0 = Arc::new(ShardedModel::start(&src, &opts(0)).expect("rank 0 starts"));
    Worker { rank0, followers }
}

impl Worker {
    /// Shuts the followers down and checks they left cleanly.
    fn stop(self) {
        let Worker { rank0, followers } = self;
        drop(rank0);
        for f in followers {
            f.join()
                .unwrap()
                .expect("follower ends cleanly on shutdown");
        }
    }
}

fn single(path: &Path) -> Model {
    Model::load_with(&ModelSource::open(path).unwrap(), 2, ExpandWeights::Off).unwrap()
}

fn greedy(prompt: &[u32], n: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.to_vec(),
        params: SamplingParams::greedy(),
        max_tokens: Some(n),
        stop_tokens: vec![],
        adapter: 0,
    }
}

/// Prompts of several lengths, including one longer than a prefill chunk.
fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    [5usize, 23, 300]
        .iter()
        .enumerate()
        .map(|(k, &len)| {
            (0..len as u32)
                .map(|i| 1 + (i * 97 + k as u32 * 131) % (vocab as u32 - 1))
                .collect()
        })
        .collect()
}

/// Prompt logits bit for bit and greedy tokens equal for every prompt.
fn check_shape(path: &Path, reference: &Model, tp: usize, pp: usize, n: usize) {
    let w = start(path, tp, pp);
    for p in prompts(reference.config.vocab_size) {
        let want = reference.generate(&greedy(&p, n), |_| true).unwrap();
        let got = generate(w.rank0.as_ref(), &greedy(&p, n), |_| true).unwrap();
        let same_bits = want
            .prompt_logits
            .iter()
            .zip(&got.prompt_logits)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same_bits && want.prompt_logits.len() == got.prompt_logits.len(),
            "tp {tp} pp {pp}: prompt logits differ for a {}-token prompt",
            p.len()
        );
        assert_eq!(got.tokens, want.tokens, "tp {tp} pp {pp}: greedy tokens");
    }
    w.stop();
}

#[test]
fn default_model_tp3_pp2_pp3_and_tp3xpp2_match_the_single_process() {
    let path = default_model();
    let reference = single(&path);
    for (tp, pp) in [(3, 1), (1, 2), (1, 3), (3, 2)] {
        check_shape(&path, &reference, tp, pp, 8);
    }
}

/// `tiny-mqa` has 4 query heads and one KV head: with 2 and 4 ranks the KV
/// head is replicated on every rank.
#[test]
fn replicated_kv_heads_match_the_single_process() {
    let path = synth_fixture("tiny-mqa-llama-q8_0.gguf");
    let reference = single(&path);
    for (tp, pp) in [(2, 1), (4, 1), (2, 2)] {
        check_shape(&path, &reference, tp, pp, 12);
    }
    // Grouped KV heads split evenly (4 query / 2 KV heads), tied LM head
    // split by vocabulary rows, a K-quant file.
    let path = synth_fixture("tiny-llama-q4_k.gguf");
    let reference = single(&path);
    check_shape(&path, &reference, 2, 1, 12);
}

/// qwen3's per-head query/key norms on the heads each rank holds.
#[test]
fn qwen3_shards_match_the_single_process() {
    use tandem_model::quant::GgmlType;
    use tandem_model::synth::{synth, Arch, SynthFormat, SynthShape, SynthSpec, SynthTokenizer};
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sharded-qwen3-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny-qwen3-q8_0.gguf");
    let spec = SynthSpec {
        arch: Arch::Qwen3,
        shape: SynthShape::preset("tiny").unwrap(),
        seed: 1,
        format: SynthFormat::Gguf {
            weight_type: GgmlType::Q8_0,
        },
        tokenizer: SynthTokenizer::Gpt2,
    };
    synth(&spec, &path).unwrap();
    let reference = single(&path);
    for (tp, pp) in [(2, 1), (2, 2)] {
        check_shape(&path, &reference, tp, pp, 12);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mixtures of experts split by expert (each rank holds whole experts and
/// the ranks exchange their weighted outputs): Mixtral's per-expert
/// tensors, and Qwen2-MoE's stacked ones with its replicated shared expert.
#[test]
fn mixtures_split_by_expert_match_the_single_process() {
    use tandem_model::quant::GgmlType;
    use tandem_model::synth::{synth, Arch, SynthFormat, SynthShape, SynthSpec, SynthTokenizer};
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sharded-moe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (arch, shape, file, format) in [
        (
            Arch::Llama,
            "tiny-moe",
            "tiny-mixtral-bf16",
            SynthFormat::Safetensors {
                dtype: GgmlType::BF16,
                shards: 1,
            },
        ),
        (
            Arch::Qwen2,
            "tiny-moe-shared",
            "tiny-qwen2moe-q8_0.gguf",
            SynthFormat::Gguf {
                weight_type: GgmlType::Q8_0,
            },
        ),
    ] {
        let path = dir.join(file);
        let spec = SynthSpec {
            arch,
            shape: SynthShape::preset(shape).unwrap(),
            seed: 1,
            format,
            tokenizer: SynthTokenizer::Gpt2,
        };
        synth(&spec, &path).unwrap();
        let reference = single(&path);
        for (tp, pp) in [(2, 1), (4, 1), (2, 2)] {
            check_shape(&path, &reference, tp, pp, 12);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shapes_that_cannot_be_exact_are_refused() {
    let src = ModelSource::open(&default_model()).unwrap();
    // 9 heads do not split over 2 ranks; 30 layers cannot make 31 stages.
    for (tp, pp) in [(2, 1), (1, 31)] {
        let spec = ShardSpec { tp, pp, rank: 0 };
        let e = spec.validate(&src.config).unwrap_err();
        assert!(matches!(e, EngineError::Shard(_)), "tp {tp} pp {pp}: {e}");
    }
}

fn engine(model: Arc<dyn Executor>, kv_blocks: usize) -> Engine {
    let layout = model.kv_layout(16);
    Engine::start(
        model,
        EngineConfig {
            scheduler: SchedulerConfig {
                max_step_tokens: 64,
                ..Default::default()
            },
            block_size: 16,
            kv_cache_bytes: kv_blocks * layout.block_bytes(),
            ..Default::default()
        },
    )
}

/// The batching engine on a sharded worker: sequences of a step split into
/// pipeline micro-batches, chunked prefill, parallel sampling whose shared
/// partial block is copied on write (the copy repeated on every rank), a
/// pool small enough to preempt. Every choice equals the single process's.
#[test]
fn batching_engine_on_a_sharded_worker_matches_the_single_process() {
    let path = default_model();
    let reference = engine(Arc::new(single(&path)), 40);
    let w = start(&path, 3, 2);
    let sharded = engine(w.rank0.clone(), 40);
    let specs: Vec<RequestSpec> = prompts(49152)
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| RequestSpec {
            prompt,
            params: SamplingParams {
                temperature: 0.8,
                seed: 5,
                request_key: i as u64,
                ..SamplingParams::greedy()
            },
            max_tokens: Some(12),
            n: 2,
            ..Default::default()
        })
        .collect();
    let run = |e: &Engine| -> Vec<Vec<Vec<Sampled>>> {
        let hs: Vec<_> = specs.iter().map(|s| e.submit(s.clone()).unwrap()).collect();
        hs.into_iter().map(collect_all).collect()
    };
    let want = run(&reference);
    let got = run(&sharded);
    assert_eq!(got, want);
    drop(sharded);
    w.stop();
}

/// Copies exported blocks into a staging, as a prefill worker's sender
/// would; hands it over when the exporter drops (the request left).
struct ToStaging {
    staging: Option<KvStaging>,
    tx: std::sync::mpsc::Sender<KvStaging>,
}

impl KvExport for ToStaging {
    fn export(&mut self, layer: usize, blocks: &[ExportBlock<'_>]) -> bool {
        let st = self.staging.as_mut().expect("live");
        for b in blocks {
            st.region_mut(layer, b.block as usize)
                .copy_from_slice(b.data);
        }
        true
    }
}

impl Drop for ToStaging {
    fn drop(&mut self) {
        if let Some(s) = self.staging.take() {
            let _ = self.tx.send(s);
        }
    }
}

fn greedy_spec(prompt: &[u32], n: usize) -> RequestSpec {
    RequestSpec {
        prompt: prompt.to_vec(),
        params: SamplingParams::greedy(),
        max_tokens: Some(n),
        ..Default::default()
    }
}

/// Prefill on `pre`, ship the KV in the wire layout, decode on `dec`
/// (which receives in place when `dec_in_place`).
fn disaggregated(
    pre: &Engine,
    dec: &Engine,
    dec_in_place: bool,
    prompt: &[u32],
    n: usize,
) -> Vec<u32> {
    assert_eq!(
        pre.kv_layout(),
        dec.kv_layout(),
        "both speak the whole-model layout"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let exp = Box::new(ToStaging {
        staging: Some(KvStaging::new(pre.kv_layout(), prompt.len())),
        tx,
    });
    let h = pre.submit_with_export(greedy_spec(prompt, 1), exp).unwrap();
    let first = collect_all(h).remove(0);
    let staging = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let mut r = block_on(dec.reserve(prompt.len())).unwrap();
    // A sharded engine's pool holds one rank's shard: it must stage, and
    // scatter at install. A single process's pool takes the KV in place.
    assert_eq!(r.in_place(), dec_in_place, "{r:?}");
    r.fill_from(&staging).unwrap();
    let h = block_on(dec.install(r, greedy_spec(prompt, n), first, None)).unwrap();
    collect_all(h).remove(0).iter().map(|s| s.token).collect()
}

/// KV moves between workers of different shapes: whole → TP=3, TP=3 →
/// TP=3×PP=2, TP=3×PP=2 → whole. A sharded receiver scatters each rank's
/// heads and layers; a sharded sender gathers them (including blocks its
/// prefix cache served, on the second run of a prompt). Tokens equal the
/// single process's.
#[test]
fn kv_moves_between_workers_of_different_shapes() {
    let path = default_model();
    let whole = engine(Arc::new(single(&path)), 80);
    let (w3, w32) = (start(&path, 3, 1), start(&path, 3, 2));
    let tp3 = engine(w3.rank0.clone(), 80);
    let tp3pp2 = engine(w32.rank0.clone(), 80);
    let n = 10;
    for p in prompts(49152) {
        let want: Vec<u32> = collect_all(whole.submit(greedy_spec(&p, n)).unwrap())
            .remove(0)
            .iter()
            .map(|s| s.token)
            .collect();
        for (name, pre, dec, in_place) in [
            ("whole → tp3", &whole, &tp3, false),
            ("tp3 → tp3×pp2", &tp3, &tp3pp2, false),
            ("tp3×pp2 → whole", &tp3pp2, &whole, true),
            ("tp3×pp2 (cached prefix) → tp3", &tp3pp2, &tp3, false),
        ] {
            assert_eq!(
                disaggregated(pre, dec, in_place, &p, n),
                want,
                "{name}, {}-token prompt",
                p.len()
            );
        }
    }
    // No block is left behind on either side.
    for e in [&whole, &tp3, &tp3pp2] {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let s = e.stats();
            if s.running == 0 && s.free_blocks + s.cached_blocks == s.total_blocks {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "engine not idle: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    drop((tp3, tp3pp2));
    w3.stop();
    w32.stop();
}
