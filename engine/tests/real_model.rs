//! The engine on the real default model: fidelity against golden fixtures
//! from a reference implementation, determinism, batch invariance, bad input.
//!
//! The model is installed by `tandem model fetch` (the test script does it);
//! these tests fail, loudly, when it is missing.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::Value;
use tandem_engine::generate::GenerateRequest;
use tandem_engine::kv::SeqKv;
use tandem_engine::model::{Logits, Model, SeqStep};
use tandem_engine::sampler::{argmax, SamplingParams};
use tandem_engine::EngineError;
use tandem_model::weights::ModelSource;

fn model_path() -> PathBuf {
    let p = tandem_model::default_model_path();
    assert!(p.exists(), "default model missing at {}: run `tandem model fetch`", p.display());
    p
}

fn source() -> &'static ModelSource {
    static S: OnceLock<ModelSource> = OnceLock::new();
    S.get_or_init(|| ModelSource::open(&model_path()).expect("open default model"))
}

/// The model with two threads, shared by the tests of this binary.
fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load(source(), 2).expect("load default model"))
}

fn golden() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/golden/smollm2-135m-instruct-q4_1.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&text).expect("golden fixture is JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn prompt_logits(m: &Model, prompt: &[u32]) -> Vec<f32> {
    let mut pool = m.pool_for_tokens(prompt.len(), 16);
    let mut kv = SeqKv::default();
    let mut step = [SeqStep { kv: &mut kv, tokens: prompt, logits: Logits::Last }];
    m.forward(&mut pool, &mut step).unwrap().pop().unwrap()
}

/// Logit tolerance against the float32 reference. The reference dequantises
/// the GGUF exactly, so both sides compute with identical weights and differ
/// only in float32 rounding order (accumulated over 30 layers); the fixture
/// records how far float32 itself is from float64 on the same prompts, and
/// two float32 implementations may each be that far off, in opposite
/// directions. Bounded below so a tiny measured noise does not make the
/// check flaky.
fn tolerance(g: &Value) -> f32 {
    let noise = g["f32_vs_f64_max_abs_logit_diff"].as_f64().expect("fixture records the f32 noise") as f32;
    (4.0 * noise).max(2e-3)
}

#[test]
fn golden_logits_and_greedy_continuations() {
    let g = golden();
    let tol = tolerance(&g);
    let m = model();
    let mut worst = 0f32;
    let mut small_margin_steps = 0;
    let mut compared_steps = 0;
    for p in g["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let prompt = ids(&p["prompt_ids"]);
        let logits = prompt_logits(m, &prompt);
        for pair in p["last_logits_top5"].as_array().unwrap() {
            let id = pair[0].as_u64().unwrap() as usize;
            let want = pair[1].as_f64().unwrap() as f32;
            let d = (logits[id] - want).abs();
            worst = worst.max(d);
            assert!(d <= tol, "{name}: logit of token {id}: got {}, reference {want} (tolerance {tol})", logits[id]);
        }
        for (i, want) in p["last_logits_head"].as_array().unwrap().iter().enumerate() {
            let d = (logits[i] - want.as_f64().unwrap() as f32).abs();
            worst = worst.max(d);
            assert!(d <= tol, "{name}: logit {i} differs by {d} (tolerance {tol})");
        }
        // Greedy continuation: identical up to the first step where the
        // reference's top-2 margin is within the tolerance (a near tie that
        // float rounding may legitimately flip).
        let want = ids(&p["greedy_ids"]);
        let margins: Vec<f64> = p["greedy_margins"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let req = GenerateRequest {
            prompt: prompt.clone(),
            params: SamplingParams::greedy(),
            max_tokens: Some(want.len()),
            stop_tokens: vec![],
        };
        let got = m.generate(&req, |_| true).unwrap().tokens;
        let limit = margins.iter().position(|&mg| mg < tol as f64).unwrap_or(want.len());
        if limit < want.len() {
            small_margin_steps += 1;
            eprintln!("{name}: reference margin {} < tolerance at step {limit}; comparing {limit} steps", margins[limit]);
        }
        compared_steps += limit;
        assert_eq!(&got[..limit], &want[..limit], "{name}: greedy continuation differs");
    }
    eprintln!(
        "golden: worst logit difference {worst:.2e} (tolerance {tol:.2e}); {compared_steps} greedy steps compared; {small_margin_steps} prompts stopped early at a near tie"
    );
    assert!(small_margin_steps <= 2, "too many near ties: the comparison would be too weak");
}

#[test]
fn logits_are_bit_identical_whatever_the_thread_count() {
    let prompt: Vec<u32> = (0..40).map(|i| 100 + i * 37).collect();
    let two = prompt_logits(model(), &prompt);
    for threads in [1, 3] {
        let m = Model::load(source(), threads).unwrap();
        let other = prompt_logits(&m, &prompt);
        assert!(two.iter().zip(&other).all(|(a, b)| a.to_bits() == b.to_bits()), "threads={threads} changed the logits");
    }
}

#[test]
fn batching_and_chunking_do_not_change_bits() {
    let m = model();
    let prompts: Vec<Vec<u32>> = (0..4).map(|s| (0..(5 + 9 * s)).map(|i| 50 + ((i * 131 + s * 17) % 4000) as u32).collect()).collect();
    let alone: Vec<Vec<f32>> = prompts.iter().map(|p| prompt_logits(m, p)).collect();
    // All prompts in one forward call.
    let mut pool = m.pool_for_tokens(200, 16);
    let mut kvs: Vec<SeqKv> = prompts.iter().map(|_| SeqKv::default()).collect();
    let mut steps: Vec<SeqStep<'_>> = kvs
        .iter_mut()
        .zip(&prompts)
        .map(|(kv, p)| SeqStep { kv, tokens: p, logits: Logits::Last })
        .collect();
    let together = m.forward(&mut pool, &mut steps).unwrap();
    drop(steps);
    for kv in kvs.iter_mut() {
        pool.free_seq(kv);
    }
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "prompt {i} changed when batched");
    }
    // The longest prompt in uneven chunks.
    let p = &prompts[3];
    let mut kv = SeqKv::default();
    let mut last = Vec::new();
    for chunk in [&p[..3], &p[3..4], &p[4..20], &p[20..]] {
        let mut step = [SeqStep { kv: &mut kv, tokens: chunk, logits: Logits::Last }];
        last = m.forward(&mut pool, &mut step).unwrap().pop().unwrap();
    }
    assert!(last.iter().zip(&alone[3]).all(|(x, y)| x.to_bits() == y.to_bits()), "chunked prefill changed the logits");
    // Decoding token by token equals scoring the whole sequence at once.
    let next = argmax(&alone[3]);
    let mut step = [SeqStep { kv: &mut kv, tokens: &[next], logits: Logits::Last }];
    let stepwise = m.forward(&mut pool, &mut step).unwrap().pop().unwrap();
    let mut whole = p.clone();
    whole.push(next);
    let direct = prompt_logits(m, &whole);
    assert!(stepwise.iter().zip(&direct).all(|(x, y)| x.to_bits() == y.to_bits()), "decode step differs from prefill");
}

#[test]
fn sampling_is_reproducible_per_seed() {
    let m = model();
    let prompt: Vec<u32> = vec![1, 504, 3458, 282, 1345, 28];
    let run = |seed| {
        let req = GenerateRequest {
            prompt: prompt.clone(),
            params: SamplingParams { temperature: 0.9, top_p: 0.95, seed, ..Default::default() },
            max_tokens: Some(12),
            stop_tokens: vec![],
        };
        m.generate(&req, |_| true).unwrap().tokens
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

#[test]
fn bad_requests_are_clear_errors() {
    let m = model();
    let ctx = m.config.context_length;
    let long = vec![200u32; ctx];
    let req = GenerateRequest { prompt: long, params: SamplingParams::greedy(), max_tokens: Some(1), stop_tokens: vec![] };
    let e = m.generate(&req, |_| true).unwrap_err();
    assert!(matches!(e, EngineError::ContextOverflow { .. }), "{e}");
    assert!(e.to_string().contains("context length"), "{e}");

    let req = GenerateRequest { prompt: vec![5; 10], params: SamplingParams::greedy(), max_tokens: Some(ctx), stop_tokens: vec![] };
    assert!(matches!(m.generate(&req, |_| true).unwrap_err(), EngineError::ContextOverflow { .. }));

    let req = GenerateRequest { prompt: vec![], params: SamplingParams::greedy(), max_tokens: Some(4), stop_tokens: vec![] };
    assert!(matches!(m.generate(&req, |_| true).unwrap_err(), EngineError::EmptyPrompt));

    let mut pool = m.pool_for_tokens(4, 16);
    let mut kv = SeqKv::default();
    let bad = [m.config.vocab_size as u32 + 5];
    let mut step = [SeqStep { kv: &mut kv, tokens: &bad, logits: Logits::Last }];
    let e = m.forward(&mut pool, &mut step).unwrap_err();
    assert!(matches!(e, EngineError::BadToken { .. }), "{e}");
    assert_eq!(kv.len(), 0, "a rejected step must not touch the cache");
    assert_eq!(pool.free_blocks(), pool.n_blocks(), "nor reserve blocks");
    // A step that does not fit the pool is refused whole.
    let mut kv = SeqKv::default();
    let long = vec![7u32; 17];
    let mut step = [SeqStep { kv: &mut kv, tokens: &long, logits: Logits::Last }];
    let e = m.forward(&mut pool, &mut step).unwrap_err();
    assert!(matches!(e, EngineError::OutOfBlocks { .. }), "{e}");
    assert_eq!(pool.free_blocks(), pool.n_blocks());
}
