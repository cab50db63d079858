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
use tandem_engine::model::{greedy_token, top_k_candidates, Logits, Model, SeqStep};
use tandem_engine::sampler::{argmax, top_k_of, Sampled, SamplingParams};
use tandem_engine::EngineError;
use tandem_model::weights::ModelSource;

mod common;
use common::model_path;

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
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/golden/smollm2-135m-instruct-q4_1.json");
    let text =
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&text).expect("golden fixture is JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

use common::prompt_logits;

/// Logit tolerance against the float32 reference. The reference dequantises
/// the GGUF exactly, so both sides compute with identical weights and differ
/// only in float32 rounding order (accumulated over 30 layers). The fixture
/// records how far the float32 reference is from a float64 run on the same
/// prompts (~5e-5 on logits of magnitude ~20); another float32
/// implementation with a different summation order lands at the same
/// distance, in any direction. Ten times that noise is tight enough to catch
/// any real error (a wrong dequantisation or a misplaced head moves logits by
/// whole units) while leaving room for legitimate reordering.
fn tolerance(g: &Value) -> f32 {
    let noise = g["f32_vs_f64_max_abs_logit_diff"]
        .as_f64()
        .expect("fixture records the f32 noise") as f32;
    (10.0 * noise).max(1e-4)
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
            assert!(
                d <= tol,
                "{name}: logit of token {id}: got {}, reference {want} (tolerance {tol})",
                logits[id]
            );
        }
        for (i, want) in p["last_logits_head"].as_array().unwrap().iter().enumerate() {
            let d = (logits[i] - want.as_f64().unwrap() as f32).abs();
            worst = worst.max(d);
            assert!(
                d <= tol,
                "{name}: logit {i} differs by {d} (tolerance {tol})"
            );
        }
        // Greedy continuation: identical up to the first step where the
        // reference's top-2 margin is within the tolerance (a near tie that
        // float rounding may legitimately flip).
        let want = ids(&p["greedy_ids"]);
        let margins: Vec<f64> = p["greedy_margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let req = GenerateRequest {
            prompt: prompt.clone(),
            params: SamplingParams::greedy(),
            max_tokens: Some(want.len()),
            stop_tokens: vec![],
            adapter: 0,
        };
        let got = m.generate(&req, |_| true).unwrap().tokens;
        let limit = margins
            .iter()
            .position(|&mg| mg < tol as f64)
            .unwrap_or(want.len());
        if limit < want.len() {
            small_margin_steps += 1;
            eprintln!(
                "{name}: reference margin {} < tolerance at step {limit}; comparing {limit} steps",
                margins[limit]
            );
        }
        compared_steps += limit;
        assert_eq!(
            &got[..limit],
            &want[..limit],
            "{name}: greedy continuation differs"
        );
    }
    eprintln!(
        "golden: worst logit difference {worst:.2e} (tolerance {tol:.2e}); {compared_steps} greedy steps compared; {small_margin_steps} prompts stopped early at a near tie"
    );
    assert!(
        small_margin_steps <= 2,
        "too many near ties: the comparison would be too weak"
    );
}

#[test]
fn logits_are_bit_identical_whatever_the_thread_count() {
    let prompt: Vec<u32> = (0..40).map(|i| 100 + i * 37).collect();
    let two = prompt_logits(model(), &prompt);
    for threads in [1, 3] {
        let m = Model::load(source(), threads).unwrap();
        let other = prompt_logits(&m, &prompt);
        assert!(
            two.iter()
                .zip(&other)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "threads={threads} changed the logits"
        );
    }
}

#[test]
fn batching_and_chunking_do_not_change_bits() {
    let m = model();
    let prompts: Vec<Vec<u32>> = (0..4)
        .map(|s| {
            (0..(5 + 9 * s))
                .map(|i| 50 + ((i * 131 + s * 17) % 4000) as u32)
                .collect()
        })
        .collect();
    // The longest prompt (32 tokens) also in uneven chunks.
    let alone = common::assert_batching_and_chunking_keep_bits(m, &prompts, &[3, 4, 20], "model");
    let mut pool = m.pool_for_tokens(200, 16);
    // Greedy and top-k rows in a batch: the argmax as one id, the top-k
    // as (id, logit) pairs; the others unchanged.
    let mut kvs: Vec<SeqKv> = prompts.iter().map(|_| SeqKv::default()).collect();
    let kinds = [Logits::Greedy, Logits::Last, Logits::TopK(20), Logits::None];
    let mut steps: Vec<SeqStep<'_>> = kvs
        .iter_mut()
        .zip(&prompts)
        .zip(kinds)
        .map(|((kv, p), logits)| SeqStep {
            kv,
            tokens: p,
            logits,
        })
        .collect();
    let mixed = m.forward(&mut pool, &mut steps).unwrap();
    drop(steps);
    for kv in kvs.iter_mut() {
        pool.free_seq(kv);
    }
    assert_eq!(mixed[0], vec![argmax(&alone[0]) as f32]);
    assert_eq!(top_k_candidates(&mixed[2]), top_k_of(&alone[2], 20));
    assert_eq!(top_k_candidates(&mixed[2])[0].0, argmax(&alone[2]));
    assert_eq!(greedy_token(&mixed[1]), None);
    assert!(
        mixed[1]
            .iter()
            .zip(&alone[1])
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "a Last row next to greedy ones changed"
    );
    assert!(mixed[3].is_empty());
}

#[test]
fn sampling_is_reproducible_per_seed() {
    let m = model();
    let prompt: Vec<u32> = vec![1, 504, 3458, 282, 1345, 28];
    let run = |seed| {
        let req = GenerateRequest {
            prompt: prompt.clone(),
            params: SamplingParams {
                temperature: 0.9,
                top_p: 0.95,
                seed,
                ..Default::default()
            },
            max_tokens: Some(12),
            stop_tokens: vec![],
            adapter: 0,
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
    let req = GenerateRequest {
        prompt: long,
        params: SamplingParams::greedy(),
        max_tokens: Some(1),
        stop_tokens: vec![],
        adapter: 0,
    };
    let e = m.generate(&req, |_| true).unwrap_err();
    assert!(matches!(e, EngineError::ContextOverflow { .. }), "{e}");
    assert!(e.to_string().contains("context length"), "{e}");

    let req = GenerateRequest {
        prompt: vec![5; 10],
        params: SamplingParams::greedy(),
        max_tokens: Some(ctx),
        stop_tokens: vec![],
        adapter: 0,
    };
    assert!(matches!(
        m.generate(&req, |_| true).unwrap_err(),
        EngineError::ContextOverflow { .. }
    ));

    let req = GenerateRequest {
        prompt: vec![],
        params: SamplingParams::greedy(),
        max_tokens: Some(4),
        stop_tokens: vec![],
        adapter: 0,
    };
    assert!(matches!(
        m.generate(&req, |_| true).unwrap_err(),
        EngineError::EmptyPrompt
    ));

    let mut pool = m.pool_for_tokens(4, 16);
    let mut kv = SeqKv::default();
    let bad = [m.config.vocab_size as u32 + 5];
    let mut step = [SeqStep {
        kv: &mut kv,
        tokens: &bad,
        logits: Logits::Last,
    }];
    let e = m.forward(&mut pool, &mut step).unwrap_err();
    assert!(matches!(e, EngineError::BadToken { .. }), "{e}");
    assert_eq!(kv.len(), 0, "a rejected step must not touch the cache");
    assert_eq!(pool.free_blocks(), pool.n_blocks(), "nor reserve blocks");
    // A step that does not fit the pool is refused whole.
    let mut kv = SeqKv::default();
    let long = vec![7u32; 17];
    let mut step = [SeqStep {
        kv: &mut kv,
        tokens: &long,
        logits: Logits::Last,
    }];
    let e = m.forward(&mut pool, &mut step).unwrap_err();
    assert!(matches!(e, EngineError::OutOfBlocks { .. }), "{e}");
    assert_eq!(pool.free_blocks(), pool.n_blocks());
}

// ---------------------------------------------------------------------------
// Continuous batching: the scheduler over the paged pool.

mod batching {
    use super::*;
    use std::sync::mpsc::{channel, Receiver};
    use tandem_engine::generate::FinishReason;
    use tandem_engine::kv::KvPool;
    use tandem_engine::scheduler::{Event, Request, Scheduler, SchedulerConfig};
    use tandem_engine::speculative::SpeculativeConfig;

    /// 16 distinct prompts of 3..60 tokens, some sharing a 20-token prefix.
    fn prompts() -> Vec<Vec<u32>> {
        let shared: Vec<u32> = (0..20).map(|i| 300 + i * 11).collect();
        (0..16u32)
            .map(|k| {
                let len = 3 + (k as usize * 7) % 58;
                let own: Vec<u32> = (0..len as u32)
                    .map(|i| 100 + (i * 97 + k * 131) % 20000)
                    .collect();
                if k % 4 == 0 {
                    shared.iter().copied().chain(own).collect()
                } else {
                    own
                }
            })
            .collect()
    }

    fn alone(p: &[u32], params: &SamplingParams, n: usize) -> Vec<u32> {
        let req = GenerateRequest {
            prompt: p.to_vec(),
            params: params.clone(),
            max_tokens: Some(n),
            stop_tokens: vec![],
            adapter: 0,
        };
        model().generate(&req, |_| true).unwrap().tokens
    }

    /// [`alone`] for each prompt, with its index as request key (as
    /// the batched runs give them).
    fn alone_each(ps: &[Vec<u32>], params: &SamplingParams, n: usize) -> Vec<Vec<u32>> {
        ps.iter()
            .enumerate()
            .map(|(i, p)| {
                let mut pr = params.clone();
                pr.request_key = i as u64;
                alone(p, &pr, n)
            })
            .collect()
    }

    struct Run {
        rx: Receiver<Event>,
        tokens: Vec<u32>,
        finished: Option<(FinishReason, usize)>,
    }

    impl Run {
        /// A stream not read yet.
        fn of(rx: Receiver<Event>) -> Self {
            Self {
                rx,
                tokens: vec![],
                finished: None,
            }
        }
    }

    fn drain(runs: &mut [Run]) {
        for r in runs.iter_mut() {
            while let Ok(e) = r.rx.try_recv() {
                match e {
                    Event::Token(s) => r.tokens.push(s.token),
                    Event::PromptLogprobs(_) => panic!("prompt scores were not asked for"),
                    Event::Finished {
                        reason,
                        cached_tokens,
                        ..
                    } => r.finished = Some((reason, cached_tokens)),
                    Event::Error(m) => panic!("request failed: {m}"),
                }
            }
        }
    }

    pub(super) fn request(id: u64, prompt: &[u32], params: &SamplingParams, n: usize) -> Request {
        Request {
            id,
            prompt: prompt.to_vec(),
            params: params.clone(),
            max_tokens: Some(n),
            stop_tokens: vec![],
            priority: 0,
            generated: vec![],
            guide: None,
            adapter: 0,
        }
    }

    /// Runs every prompt through one scheduler, adding them a few at a time
    /// between steps; returns each request's tokens and the scheduler.
    fn run_batched(
        sched: &mut Scheduler,
        prompts: &[Vec<u32>],
        params: &SamplingParams,
        n: usize,
    ) -> Vec<Run> {
        let mut runs: Vec<Run> = Vec::new();
        let mut next = 0;
        let mut steps = 0;
        while next < prompts.len() || sched.has_work() {
            // Staggered arrivals: three new requests every other step.
            if steps % 2 == 0 {
                for _ in 0..3 {
                    if next < prompts.len() {
                        let (tx, rx) = channel();
                        sched
                            .add(
                                request(next as u64, &prompts[next], params, n),
                                Box::new(tx),
                            )
                            .unwrap();
                        runs.push(Run::of(rx));
                        next += 1;
                    }
                }
            }
            sched.step(model()).unwrap();
            drain(&mut runs);
            steps += 1;
            assert!(steps < 10_000, "scheduler made no progress");
        }
        drain(&mut runs);
        runs
    }

    fn scheduler(blocks: usize, step_tokens: usize, prefix_cache: bool) -> Scheduler {
        let pool = KvPool::new(model().kv_layout(16), blocks);
        let cfg = SchedulerConfig {
            max_step_tokens: step_tokens,
            max_running: 64,
            prefix_cache,
            ..Default::default()
        };
        Scheduler::new(cfg, pool, model().config.context_length)
    }

    /// Runs `prompts` (all added at once, request key = index) to the end
    /// and returns each one's events as sampled, with the scheduler.
    fn run_all(
        s: &mut Scheduler,
        prompts: &[Vec<u32>],
        params: &SamplingParams,
        n: usize,
    ) -> Vec<Vec<Sampled>> {
        let mut rxs = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let (tx, rx) = channel();
            let mut pr = params.clone();
            pr.request_key = i as u64;
            s.add(request(i as u64, p, &pr, n), Box::new(tx)).unwrap();
            rxs.push(rx);
        }
        let mut steps = 0;
        while s.has_work() {
            s.step(model()).unwrap();
            steps += 1;
            assert!(steps < 20_000, "scheduler made no progress");
        }
        rxs.iter()
            .map(|rx| {
                let mut out = Vec::new();
                for e in rx.try_iter() {
                    match e {
                        Event::Token(t) => out.push(t),
                        Event::Finished { .. } => {}
                        e => panic!("unexpected event {e:?}"),
                    }
                }
                out
            })
            .collect()
    }

    /// Prompt-lookup speculation changes no token and no log-probability:
    /// greedy, seeded sampling, penalties and log-probabilities alike, in
    /// batches, under memory pressure (drafts are dropped when blocks are
    /// short, sequences preempted and recomputed), and with stop tokens
    /// and lengths that end a sequence in the middle of a draft. Prompts
    /// that repeat themselves get drafts accepted; every block comes back.
    #[test]
    fn speculation_never_changes_the_output() {
        let mut ps = prompts();
        ps.truncate(8);
        // Patterns the model continues: a 12-token phrase three times,
        // and a count-like run, cut at different points.
        let phrase: Vec<u32> = (0..12u32).map(|i| 400 + i * 37).collect();
        for cut in [0, 5, 9] {
            let mut p: Vec<u32> = phrase.iter().cycle().take(36 + cut).copied().collect();
            p.insert(0, 1);
            ps.push(p);
        }
        // A token cost of 0 drafts whenever a draft exists (the most
        // verification); 0.25 lets acceptance rates pick the lengths.
        let spec = |tokens, max_batch, token_cost| SpeculativeConfig {
            tokens,
            ngram_min: 1,
            ngram_max: 3,
            max_batch,
            token_cost,
        };
        let params = [
            SamplingParams::greedy(),
            SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                seed: 11,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 1.15,
                frequency_penalty: 0.3,
                logprobs: true,
                top_logprobs: 3,
                ..Default::default()
            },
        ];
        for (pi, params) in params.iter().enumerate() {
            let n = 28;
            let want = alone_each(&ps, params, n);
            let mut plain = scheduler(512, 256, true);
            let base = run_all(&mut plain, &ps, params, n);
            // Drafts whenever a lookup matches, in a roomy pool; drafts
            // sized by acceptance rates, in a pool that forces
            // preemptions; drafts only while at most 2 sequences decode.
            for (blocks, cfg) in [
                (512, spec(5, 64, 0.0)),
                (14, spec(7, 64, 0.25)),
                (512, spec(3, 2, 0.0)),
            ] {
                let pool = KvPool::new(model().kv_layout(16), blocks);
                let mut s = Scheduler::new(
                    SchedulerConfig {
                        max_step_tokens: 128,
                        max_running: 64,
                        prefix_cache: true,
                        speculative: cfg,
                    },
                    pool,
                    model().config.context_length,
                );
                let got = run_all(&mut s, &ps, params, n);
                for (i, (g, b)) in got.iter().zip(&base).enumerate() {
                    assert_eq!(g, b, "params {pi}, pool {blocks}, {cfg:?}: request {i}");
                    let ids: Vec<u32> = g.iter().map(|t| t.token).collect();
                    assert_eq!(
                        ids, want[i],
                        "params {pi}: request {i} against the plain path"
                    );
                }
                let st = s.stats();
                // (With a batch limit of 2, 11 requests mostly decode
                // together: drafts are then rare, and that is the point.)
                assert!(st.draft_tokens > 0 || cfg.max_batch < ps.len(), "{st:?}");
                if pi == 0 && cfg.max_batch >= ps.len() && cfg.token_cost == 0.0 {
                    assert!(
                        st.accepted_draft_tokens * 4 > st.draft_tokens,
                        "greedy continuations of repeated text should mostly be drafted right: {st:?}"
                    );
                }
                if blocks < 512 {
                    assert!(st.preemptions > 0, "the pool was meant to be short: {st:?}");
                }
                s.clear_prefix_cache();
                assert_eq!(s.pool().free_blocks(), s.pool().n_blocks(), "{cfg:?}");
            }
        }
    }

    /// A stop token or `max_tokens` reached inside an accepted draft ends
    /// the sequence right there, as without speculation.
    #[test]
    fn a_draft_cut_by_a_stop_or_the_length_ends_where_the_plain_path_does() {
        let phrase: Vec<u32> = (0..10u32).map(|i| 500 + i * 41).collect();
        let p: Vec<u32> = phrase.iter().cycle().take(40).copied().collect();
        let params = SamplingParams::greedy();
        let free_run = alone(&p, &params, 30);
        for n in [1, 2, 3, 7, 13] {
            for stop_at in [None, Some(4usize), Some(9)] {
                let stop_tokens: Vec<u32> = stop_at.map(|k| vec![free_run[k]]).unwrap_or_default();
                let req = GenerateRequest {
                    prompt: p.clone(),
                    params: params.clone(),
                    max_tokens: Some(n),
                    stop_tokens: stop_tokens.clone(),
                    adapter: 0,
                };
                let want = model().generate(&req, |_| true).unwrap();
                let pool = KvPool::new(model().kv_layout(16), 64);
                let mut s = Scheduler::new(
                    SchedulerConfig {
                        speculative: SpeculativeConfig::ngram(8),
                        ..Default::default()
                    },
                    pool,
                    model().config.context_length,
                );
                let (tx, rx) = channel();
                let mut r = request(0, &p, &params, n);
                r.stop_tokens = stop_tokens;
                s.add(r, Box::new(tx)).unwrap();
                while s.has_work() {
                    s.step(model()).unwrap();
                }
                let mut got = Vec::new();
                let mut end = None;
                for e in rx.try_iter() {
                    match e {
                        Event::Token(t) => got.push(t.token),
                        Event::Finished {
                            reason,
                            completion_tokens,
                            ..
                        } => end = Some((reason, completion_tokens)),
                        e => panic!("{e:?}"),
                    }
                }
                assert_eq!(got, want.tokens, "max_tokens {n}, stop {stop_at:?}");
                assert_eq!(
                    end,
                    Some((want.finish, want.tokens.len())),
                    "max_tokens {n}, stop {stop_at:?}"
                );
                assert!(
                    s.stats().accepted_draft_tokens > 0 || n < 3,
                    "{:?}",
                    s.stats()
                );
                s.clear_prefix_cache();
                assert_eq!(s.pool().free_blocks(), s.pool().n_blocks());
            }
        }
    }

    #[test]
    fn sixteen_staggered_prompts_batched_equal_one_at_a_time() {
        let ps = prompts();
        let params = SamplingParams::greedy();
        let want: Vec<Vec<u32>> = ps.iter().map(|p| alone(p, &params, 12)).collect();
        // Small step budget: long prompts are prefilled in chunks beside decodes.
        let mut s = scheduler(512, 48, false);
        let runs = run_batched(&mut s, &ps, &params, 12);
        for (i, (r, w)) in runs.iter().zip(&want).enumerate() {
            assert_eq!(&r.tokens, w, "prompt {i}");
            assert_eq!(r.finished.map(|f| f.0), Some(FinishReason::Length));
        }
        assert_eq!(
            s.pool().free_blocks(),
            s.pool().n_blocks(),
            "every block returned"
        );
    }

    /// A transfer waiting for blocks holds admission while the batch runs
    /// (a stream of local prompts must not starve it), is granted once the
    /// batch gives blocks back, and the held request then runs unharmed.
    #[test]
    fn a_waiting_transfer_holds_admission_until_it_is_granted() {
        let params = SamplingParams::greedy();
        let m = model();
        let mut s = scheduler(8, 256, false); // 8 blocks of 16 tokens
        let tokens = |n: u32, k: u32| {
            (0..n)
                .map(|i| 100 + (i * 97 + k) % 20000)
                .collect::<Vec<_>>()
        };
        let (p, q) = (&tokens(40, 1)[..], &tokens(20, 2)[..]); // 3 and 2 blocks
        let (tx_p, rx_p) = channel();
        s.add(request(1, p, &params, 20), Box::new(tx_p)).unwrap();
        s.step(m).unwrap(); // prefilled: 3 blocks (4 once it grows past 48)
        assert!(
            s.reserve_for_transfer(80).unwrap().is_none(),
            "5 blocks + 1 headroom of 5 free"
        );
        s.set_transfers_waiting(1);
        assert_eq!(s.stats().waiting, 1, "a waiting transfer counts as waiting");
        let (tx_q, rx_q) = channel();
        s.add(request(2, q, &params, 4), Box::new(tx_q)).unwrap();
        s.step(m).unwrap();
        assert_eq!(s.stats().running, 1, "the local request is held back");
        assert_eq!(s.stats().waiting, 2);
        // The running sequence finishes and gives its blocks back.
        while s.stats().running > 0 {
            s.step(m).unwrap();
        }
        let kv = s
            .reserve_for_transfer(80)
            .unwrap()
            .expect("room once the batch is done");
        s.set_transfers_waiting(0);
        let mut runs = vec![Run::of(rx_p), Run::of(rx_q)];
        while s.has_work() {
            s.step(m).unwrap();
        }
        drain(&mut runs);
        assert_eq!(runs[0].tokens, alone(p, &params, 20));
        assert_eq!(
            runs[1].tokens,
            alone(q, &params, 4),
            "the held request ran after"
        );
        s.release(kv);
        assert_eq!(s.pool().free_blocks(), s.pool().n_blocks());
    }

    /// A sequence that outgrows what a transfer's reservation left of the
    /// pool is preempted, not failed (a step that can plan nothing is not
    /// an error), and once the reservation is given back it finishes with
    /// the tokens it has alone.
    #[test]
    fn a_sequence_squeezed_by_a_reservation_waits_instead_of_failing() {
        let params = SamplingParams::greedy();
        let m = model();
        let mut s = scheduler(8, 256, false); // 8 blocks of 16 tokens
        let p: Vec<u32> = (0..40).map(|i| 100 + (i * 97 + 3) % 20000).collect();
        let (tx, rx) = channel();
        s.add(request(1, &p, &params, 40), Box::new(tx)).unwrap();
        s.step(m).unwrap(); // prefilled: 3 blocks
        let kv = s
            .reserve_for_transfer(64)
            .unwrap()
            .expect("4 blocks + 1 headroom of 5 free");
        // It grows into the last free block (at 48 tokens), then has
        // nowhere to go at 64.
        for _ in 0..40 {
            s.step(m).expect("a squeezed batch waits");
        }
        assert!(s.stats().preemptions >= 1, "{:?}", s.stats());
        assert_eq!(s.stats().running, 0, "it waits for the reservation");
        let mut runs = vec![Run::of(rx)];
        drain(&mut runs);
        assert!(runs[0].finished.is_none(), "not failed, not finished");
        s.release(kv);
        let mut steps = 0;
        while s.has_work() {
            s.step(m).unwrap();
            steps += 1;
            assert!(steps < 1_000, "no progress after the release");
        }
        drain(&mut runs);
        assert_eq!(runs[0].tokens, alone(&p, &params, 40));
        assert_eq!(runs[0].finished.map(|f| f.0), Some(FinishReason::Length));
        assert_eq!(s.pool().free_blocks(), s.pool().n_blocks());
    }

    /// A reservation leaves a prompt that is still computing the room it
    /// was admitted with.
    #[test]
    fn a_reservation_keeps_the_room_of_a_prompt_being_computed() {
        let params = SamplingParams::greedy();
        let m = model();
        // 8 blocks, 16-token chunks: a 64-token prompt (4 blocks) takes
        // four steps to compute.
        let mut s = scheduler(8, 16, false);
        let p: Vec<u32> = (0..64).map(|i| 100 + (i * 89 + 5) % 20000).collect();
        let (tx, rx) = channel();
        s.add(request(1, &p, &params, 8), Box::new(tx)).unwrap();
        s.step(m).unwrap(); // one chunk in: 1 block held, 3 to come
        assert!(
            s.reserve_for_transfer(80).unwrap().is_none(),
            "5 blocks + the prompt's 3 of 7 free"
        );
        let kv = s
            .reserve_for_transfer(48)
            .unwrap()
            .expect("3 blocks + the prompt's 3 of 7 free");
        let mut runs = vec![Run::of(rx)];
        while s.has_work() {
            s.step(m).unwrap();
        }
        drain(&mut runs);
        assert_eq!(runs[0].tokens, alone(&p, &params, 8));
        assert_eq!(s.stats().preemptions, 0, "it was never squeezed");
        s.release(kv);
        assert_eq!(s.pool().free_blocks(), s.pool().n_blocks());
    }

    #[test]
    fn prefix_cache_hits_give_the_same_tokens() {
        let ps = prompts();
        let params = SamplingParams::greedy();
        let mut s = scheduler(512, 256, true);
        let runs = run_batched(&mut s, &ps, &params, 8);
        let stats = s.stats();
        assert!(
            stats.prefix.hits >= 2,
            "shared prefixes should hit: {stats:?}"
        );
        let hit_runs = runs.iter().filter(|r| r.finished.unwrap().1 > 0).count();
        assert!(hit_runs >= 2, "requests served from the cache: {hit_runs}");
        for (i, (r, p)) in runs.iter().zip(&ps).enumerate() {
            assert_eq!(
                r.tokens,
                alone(p, &params, 8),
                "prompt {i} (cached {} tokens)",
                r.finished.unwrap().1
            );
        }
        // The same prompt again is served almost entirely from the cache.
        let again = run_batched(&mut s, &ps[..1], &params, 8);
        assert!(
            again[0].finished.unwrap().1 >= ps[0].len() / 16 * 16 - 16,
            "{:?}",
            again[0].finished
        );
        assert_eq!(again[0].tokens, runs[0].tokens);
        s.clear_prefix_cache();
        assert_eq!(s.pool().free_blocks(), s.pool().n_blocks());
    }

    #[test]
    fn preemption_under_memory_pressure_loses_nothing() {
        let ps = prompts();
        // Sampling too: counter-based randomness must survive recomputation.
        // Greedy steps ask the executor for the argmax only, and top-k
        // ones for their candidates only: both must sample what the plain
        // path (whole logits) samples.
        for params in [
            SamplingParams::greedy(),
            SamplingParams {
                temperature: 0.8,
                top_p: 0.9,
                seed: 7,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.1,
                top_k: 40,
                top_p: 0.95,
                min_p: 0.02,
                seed: 8,
                ..Default::default()
            },
        ] {
            let n = 24;
            let want = alone_each(&ps, &params, n);
            // 16 requests need ~80 blocks at once; give the pool 14.
            let mut s = scheduler(14, 64, false);
            let mut runs: Vec<Run> = Vec::new();
            for (i, p) in ps.iter().enumerate() {
                let (tx, rx) = channel();
                let mut pr = params.clone();
                pr.request_key = i as u64;
                s.add(request(i as u64, p, &pr, n), Box::new(tx)).unwrap();
                runs.push(Run::of(rx));
            }
            let mut steps = 0;
            while s.has_work() {
                s.step(model()).unwrap();
                drain(&mut runs);
                steps += 1;
                assert!(steps < 20_000);
            }
            assert!(
                s.stats().preemptions > 0,
                "the pool was meant to be too small"
            );
            for (i, (r, w)) in runs.iter().zip(&want).enumerate() {
                assert_eq!(&r.tokens, w, "request {i} after preemption");
            }
            assert_eq!(s.pool().free_blocks(), s.pool().n_blocks());
        }
    }

    /// A long prompt that arrives while decodes hold most of the pool
    /// waits until all of it fits (plus a block per running sequence to
    /// grow into), instead of being admitted on its first chunk, prefilled
    /// part way and then preempted by the decodes' growth to be computed
    /// again: under pressure that thrashed. Nobody is preempted here, and
    /// every request gets the tokens it gets alone.
    #[test]
    fn a_long_prompt_waits_for_room_instead_of_being_preempted_half_computed() {
        let params = SamplingParams::greedy();
        // Three decodes of 8 + 88 tokens: 6 blocks each at the end.
        let short: Vec<Vec<u32>> = (0..3u32)
            .map(|k| (0..8u32).map(|i| 200 + i * 31 + k * 7).collect())
            .collect();
        let long: Vec<u32> = (0..160u32).map(|i| 100 + (i * 97) % 20000).collect();
        let mut s = scheduler(24, 32, false);
        let mut runs: Vec<Run> = Vec::new();
        let add = |s: &mut Scheduler, id: u64, p: &[u32], n: usize, runs: &mut Vec<Run>| {
            let (tx, rx) = channel();
            s.add(request(id, p, &params, n), Box::new(tx)).unwrap();
            runs.push(Run::of(rx));
        };
        for (i, p) in short.iter().enumerate() {
            add(&mut s, i as u64, p, 88, &mut runs);
        }
        // The decodes reach 4 blocks each: 12 of 24 used, the long prompt
        // needs 10 (its first chunk only 2).
        for _ in 0..50 {
            s.step(model()).unwrap();
        }
        assert_eq!(s.pool().used_blocks(), 12);
        add(&mut s, 3, &long, 4, &mut runs);
        let mut steps = 0;
        while s.has_work() {
            s.step(model()).unwrap();
            drain(&mut runs);
            steps += 1;
            assert!(steps < 2_000);
        }
        assert_eq!(s.stats().preemptions, 0, "nobody was computed twice");
        for (i, p) in short.iter().chain(std::iter::once(&long)).enumerate() {
            let n = if i < 3 { 88 } else { 4 };
            assert_eq!(runs[i].tokens, alone(p, &params, n), "request {i}");
        }
        assert_eq!(s.pool().free_blocks(), s.pool().n_blocks());
    }

    #[test]
    fn requests_that_can_never_fit_are_refused_at_admission() {
        let mut s = scheduler(4, 64, true); // 64 tokens of KV in all
        let (tx, _rx) = channel();
        let e = s
            .add(
                request(1, &[5; 40], &SamplingParams::greedy(), 40),
                Box::new(tx),
            )
            .unwrap_err();
        assert!(matches!(e, EngineError::TooLargeForPool { .. }), "{e}");
        let (tx, _rx) = channel();
        let ctx = model().config.context_length;
        let e = s
            .add(
                request(2, &[5; 10], &SamplingParams::greedy(), ctx),
                Box::new(tx),
            )
            .unwrap_err();
        assert!(matches!(e, EngineError::ContextOverflow { .. }), "{e}");
        let (tx, _rx) = channel();
        let bad = SamplingParams {
            top_p: 2.0,
            ..Default::default()
        };
        assert!(s.add(request(3, &[5; 10], &bad, 4), Box::new(tx)).is_err());
        assert!(!s.has_work());
    }

    #[test]
    fn cancel_and_dropped_streams_free_blocks() {
        let mut s = scheduler(64, 64, false);
        let (tx, rx) = channel();
        s.add(
            request(1, &[9; 30], &SamplingParams::greedy(), 50),
            Box::new(tx),
        )
        .unwrap();
        let (tx2, rx2) = channel();
        s.add(
            request(2, &[8; 30], &SamplingParams::greedy(), 50),
            Box::new(tx2),
        )
        .unwrap();
        for _ in 0..3 {
            s.step(model()).unwrap();
        }
        assert!(s.pool().used_blocks() > 0);
        assert!(s.cancel(1));
        drop(rx2); // the client went away
        while s.has_work() {
            s.step(model()).unwrap();
        }
        assert_eq!(s.pool().free_blocks(), s.pool().n_blocks());
        drop(rx);
    }

    /// Scored prompts (`prompt_logprobs`) in a batch under memory pressure,
    /// with prompts chunked across steps, a warm prefix cache and parallel
    /// choices: each choice's stream opens with the prompt's scores, once,
    /// bit for bit the plain path's, and then carries the plain path's
    /// tokens. Each score is what the model gives the next prompt token:
    /// the top alternatives equal the ones reported for the first token
    /// generated from the prompt cut there.
    #[test]
    fn scored_prompts_batched_equal_the_plain_path() {
        use tandem_engine::sampler::Sampled;
        let ps: Vec<Vec<u32>> = prompts().into_iter().take(8).collect();
        let params = |i: usize| SamplingParams {
            temperature: if i.is_multiple_of(2) { 0.0 } else { 0.9 },
            seed: 11,
            request_key: i as u64 * 100,
            prompt_logprobs: (i % 4 != 3).then_some(i % 3),
            ..Default::default()
        };
        let n_tokens = 6;
        let plain: Vec<_> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let req = GenerateRequest {
                    prompt: p.clone(),
                    params: params(i),
                    max_tokens: Some(n_tokens),
                    stop_tokens: vec![],
                    adapter: 0,
                };
                model().generate(&req, |_| true).unwrap()
            })
            .collect();
        let mut s = scheduler(20, 40, true);
        // Warm the prefix cache with every prompt, unscored.
        let warm: Vec<_> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (tx, rx) = channel();
                s.add(
                    request(100 + i as u64, p, &SamplingParams::greedy(), 1),
                    Box::new(tx),
                )
                .unwrap();
                rx
            })
            .collect();
        while s.has_work() {
            s.step(model()).unwrap();
        }
        drop(warm);
        assert!(
            s.stats().cached_blocks > 0,
            "the prefix cache was meant to be warm"
        );
        // Two choices per request: both get the scores.
        let mut streams: Vec<Vec<Receiver<Event>>> = Vec::new();
        for (i, p) in ps.iter().enumerate() {
            let (txs, rxs): (Vec<_>, Vec<_>) = (0..2).map(|_| channel()).unzip();
            let mut req = request(i as u64, p, &params(i), n_tokens);
            req.params = params(i);
            s.add_parallel(
                req,
                txs.into_iter()
                    .map(|t| Box::new(t) as Box<dyn tandem_engine::scheduler::EventSink>)
                    .collect(),
                None,
            )
            .unwrap();
            streams.push(rxs);
        }
        let mut steps = 0;
        while s.has_work() {
            s.step(model()).unwrap();
            steps += 1;
            assert!(steps < 20_000);
        }
        assert!(
            s.stats().preemptions > 0,
            "the pool was meant to be too small"
        );
        for (i, rxs) in streams.iter().enumerate() {
            for (c, rx) in rxs.iter().enumerate() {
                let mut scores: Option<Vec<Sampled>> = None;
                let mut tokens = Vec::new();
                while let Ok(e) = rx.try_recv() {
                    match e {
                        Event::PromptLogprobs(lp) => {
                            assert!(scores.is_none(), "request {i}: scores sent twice");
                            assert!(tokens.is_empty(), "request {i}: scores after a token");
                            scores = Some(lp);
                        }
                        Event::Token(t) => tokens.push(t.token),
                        Event::Finished { .. } => {}
                        Event::Error(m) => panic!("request {i} failed: {m}"),
                    }
                }
                assert_eq!(scores, plain[i].prompt_logprobs, "request {i} choice {c}");
                if c == 0 {
                    assert_eq!(tokens, plain[i].tokens, "request {i} tokens");
                }
                if let Some(lp) = &scores {
                    assert_eq!(lp.len(), ps[i].len() - 1);
                    for (j, e) in lp.iter().enumerate() {
                        assert_eq!(e.token, ps[i][j + 1]);
                        assert!(e.logprob <= 0.0 && e.logprob.is_finite());
                        assert_eq!(e.top.len(), params(i).prompt_logprobs.unwrap());
                        // Every likelier token is in the top when the token is.
                        let rank = e.rank.expect("a rank") as usize;
                        let likelier_in_top = e.top.iter().filter(|t| t.1 > e.logprob).count();
                        match e.top.iter().any(|t| t.0 == e.token) {
                            true => assert_eq!(rank, likelier_in_top + 1),
                            false => assert!(rank > likelier_in_top),
                        }
                    }
                }
            }
        }
        assert_eq!(
            s.pool().free_blocks() + s.stats().cached_blocks,
            s.pool().n_blocks()
        );
        // What a score means, on the longest scored prompt: the first
        // generated token's report from the prompt cut at each position.
        let (i, p) = ps
            .iter()
            .enumerate()
            .filter(|(i, _)| params(*i).prompt_logprobs == Some(2))
            .max_by_key(|(_, p)| p.len())
            .unwrap();
        let lp = plain[i].prompt_logprobs.as_ref().unwrap();
        for j in [0, p.len() / 2, p.len() - 2] {
            let req = GenerateRequest {
                prompt: p[..j + 1].to_vec(),
                params: SamplingParams {
                    logprobs: true,
                    top_logprobs: 2,
                    logit_bias: vec![(p[j + 1], 100.0)],
                    ..Default::default()
                },
                max_tokens: Some(1),
                stop_tokens: vec![],
                adapter: 0,
            };
            let g = model().generate(&req, |_| true).unwrap();
            // Forced by the bias; reported as the model sees it.
            assert_eq!(g.sampled[0].token, p[j + 1]);
            assert_eq!(g.sampled[0].logprob, lp[j].logprob, "position {}", j + 1);
            assert_eq!(g.sampled[0].top, lp[j].top, "position {}", j + 1);
        }
    }

    /// The disaggregation primitives in one process: a "prefill" pool computes
    /// the prompt and hands each layer's blocks over as soon as the layer is
    /// done; a "decode" scheduler reserves blocks, receives them, and
    /// continues the request. Tokens equal a local run.
    #[test]
    fn kv_handed_over_layer_by_layer_continues_exactly() {
        use tandem_engine::model::LayerKv;
        use tandem_engine::sampler::sample;
        let m = model();
        for (i, p) in prompts().iter().enumerate().filter(|(i, _)| i % 5 == 0) {
            let params = SamplingParams {
                temperature: 0.7,
                seed: 3,
                request_key: i as u64,
                ..Default::default()
            };
            let want = alone(p, &params, 10);
            // Prefill side, in uneven chunks, streaming (layer, block, region) as layers finish.
            let mut pre_pool = m.pool_for_tokens(p.len(), 16);
            let mut pre = SeqKv::default();
            let mut shipped: Vec<(usize, usize, Vec<f32>)> = Vec::new();
            let mut logits = Vec::new();
            let cut = p.len() / 2;
            for chunk in [&p[..cut], &p[cut..]] {
                if chunk.is_empty() {
                    continue;
                }
                let mut step = [SeqStep {
                    kv: &mut pre,
                    tokens: chunk,
                    logits: Logits::Last,
                }];
                logits = m
                    .forward_observed(&mut pre_pool, &mut step, &mut |l: LayerKv<'_>| {
                        let bs = 16;
                        for bi in l.positions.start / bs..=(l.positions.end - 1) / bs {
                            shipped.push((
                                l.layer,
                                bi,
                                l.pool.region(l.layer, l.kv.blocks[bi]).to_vec(),
                            ));
                        }
                    })
                    .unwrap()
                    .pop()
                    .unwrap();
            }
            let first = sample(&params, &logits, p, p.len(), 0);
            // Decode side.
            let mut s = scheduler(256, 64, true);
            let mut kv = s.reserve_for_transfer(p.len()).unwrap().expect("room");
            for (layer, bi, region) in &shipped {
                s.pool_mut()
                    .region_mut(*layer, kv.blocks[*bi])
                    .copy_from_slice(region);
            }
            kv.len = p.len();
            let (tx, rx) = channel();
            let req = request(i as u64, p, &params, 10);
            s.add_prefilled(req, kv, first, Box::new(tx)).unwrap();
            let mut runs = vec![Run::of(rx)];
            while s.has_work() {
                s.step(m).unwrap();
            }
            drain(&mut runs);
            assert_eq!(runs[0].tokens, want, "prompt {i}");
            s.clear_prefix_cache();
            assert_eq!(s.pool().free_blocks(), s.pool().n_blocks());
        }
    }

    /// Scheduler-level export contract: the exporter is dropped only after
    /// `Finished`; an exporter that gives up cancels the request silently
    /// and frees its blocks.
    #[test]
    fn exporter_drop_order_and_abandon() {
        use std::sync::{Arc, Mutex};
        use tandem_engine::scheduler::{EventSink, ExportBlock, KvExport};
        type Log = Arc<Mutex<Vec<String>>>;
        struct Sink(Log);
        impl EventSink for Sink {
            fn send(&mut self, e: Event) -> bool {
                let what = match e {
                    Event::PromptLogprobs(_) => "prompt scores",
                    Event::Token(_) => "token",
                    Event::Finished { .. } => "finished",
                    Event::Error(_) => "error",
                };
                self.0.lock().unwrap().push(what.into());
                true
            }
        }
        struct Exp {
            log: Log,
            /// Give up after this many export calls.
            budget: usize,
        }
        impl KvExport for Exp {
            fn export(&mut self, layer: usize, _: &[ExportBlock<'_>]) -> bool {
                self.log.lock().unwrap().push(format!("export {layer}"));
                if self.budget == 0 {
                    return false;
                }
                self.budget -= 1;
                true
            }
        }
        impl Drop for Exp {
            fn drop(&mut self) {
                self.log.lock().unwrap().push("drop".into());
            }
        }
        let n_layers = model().config.n_layers;
        let p = &prompts()[3];
        for budget in [usize::MAX, 3] {
            let mut s = scheduler(64, 16, false);
            let log: Log = Arc::default();
            s.add_with_export(
                request(1, p, &SamplingParams::greedy(), 3),
                Box::new(Sink(log.clone())),
                Box::new(Exp {
                    log: log.clone(),
                    budget,
                }),
            )
            .unwrap();
            while s.has_work() {
                s.step(model()).unwrap();
            }
            let log = log.lock().unwrap().clone();
            let exports = log.iter().filter(|l| l.starts_with("export")).count();
            if budget == usize::MAX {
                // One call per layer per prefill chunk; decodes export nothing.
                assert_eq!(exports, n_layers * p.len().div_ceil(16), "{log:?}");
                assert_eq!(log.iter().filter(|l| *l == "token").count(), 3);
                assert_eq!(&log[log.len() - 2..], ["finished", "drop"], "{log:?}");
            } else {
                assert_eq!(exports, 4, "stops at the first refusal: {log:?}");
                assert_eq!(log.last().map(String::as_str), Some("drop"));
                assert!(
                    !log.iter().any(|l| l == "token" || l == "finished"),
                    "no events after abandoning: {log:?}"
                );
            }
            assert_eq!(s.pool().free_blocks(), s.pool().n_blocks());
        }
    }

    // ---- Disaggregation through the engine service: export, reserve, install.

    mod disagg {
        use super::super::*;
        use crate::common::{block_on, collect_all};
        use std::sync::mpsc::{channel, Receiver, Sender};
        use std::sync::{Arc, OnceLock};
        use std::time::{Duration, Instant};
        use tandem_engine::engine::{Engine, EngineConfig, RequestHandle, RequestSpec};
        use tandem_engine::kv::KvStaging;
        use tandem_engine::sampler::Sampled;
        use tandem_engine::scheduler::{Event, ExportBlock, KvExport, SchedulerConfig};

        fn shared_model() -> Arc<Model> {
            static M: OnceLock<Arc<Model>> = OnceLock::new();
            M.get_or_init(|| Arc::new(Model::load(source(), 2).expect("load default model")))
                .clone()
        }

        fn engine(step_tokens: usize, kv_cache_bytes: usize) -> Engine {
            Engine::start(
                shared_model(),
                EngineConfig {
                    scheduler: SchedulerConfig {
                        max_step_tokens: step_tokens,
                        ..Default::default()
                    },
                    block_size: 16,
                    kv_cache_bytes,
                    ..Default::default()
                },
            )
        }

        /// What the exporter saw, handed to the test when it is dropped.
        struct Exported {
            staging: KvStaging,
            /// Highest slot count exported per (layer, block), layer-major.
            slots: Vec<u32>,
            bad: Vec<String>,
        }

        /// Copies every exported block into a `KvStaging`, the way a prefill
        /// worker's sender would, and sends it all to the test on drop.
        struct ToStaging {
            out: Option<Exported>,
            tx: Sender<Exported>,
        }

        impl ToStaging {
            fn new(engine: &Engine, tokens: usize) -> (Box<Self>, Receiver<Exported>) {
                let staging = KvStaging::new(engine.kv_layout(), tokens);
                let n = staging.layout().n_layers * staging.n_blocks();
                let (tx, rx) = channel();
                let out = Exported {
                    staging,
                    slots: vec![0; n],
                    bad: vec![],
                };
                (Box::new(Self { out: Some(out), tx }), rx)
            }
        }

        impl KvExport for ToStaging {
            fn export(&mut self, layer: usize, blocks: &[ExportBlock<'_>]) -> bool {
                let out = self.out.as_mut().expect("live");
                let (nb, bs, tokens) = (
                    out.staging.n_blocks(),
                    out.staging.layout().block_size,
                    out.staging.tokens(),
                );
                for b in blocks {
                    let bi = b.block as usize;
                    let valid = bi < nb
                        && b.slots > 0
                        && b.slots as usize <= bs.min(tokens - bi * bs)
                        && b.data.len() == out.staging.layout().block_floats();
                    if !valid {
                        out.bad
                            .push(format!("layer {layer} block {bi} slots {}", b.slots));
                        continue;
                    }
                    out.staging.region_mut(layer, bi).copy_from_slice(b.data);
                    let g = &mut out.slots[layer * nb + bi];
                    *g = (*g).max(b.slots);
                }
                true
            }
        }

        impl Drop for ToStaging {
            fn drop(&mut self) {
                if let Some(out) = self.out.take() {
                    let _ = self.tx.send(out);
                }
            }
        }

        /// Every event of a stream, until `Finished`.
        fn collect(h: &mut RequestHandle) -> (Vec<Sampled>, usize) {
            let (got, end) = crate::common::drain(&mut h.events);
            (got, end.cached_tokens)
        }

        fn spec(p: &[u32], n: usize) -> RequestSpec {
            RequestSpec {
                prompt: p.to_vec(),
                params: SamplingParams::greedy(),
                max_tokens: Some(n),
                ..Default::default()
            }
        }

        fn prompt(len: usize, k: u32) -> Vec<u32> {
            (0..len as u32)
                .map(|i| 100 + (i * 97 + k * 131) % 20000)
                .collect()
        }

        /// Prefill `p` on `pre` with export; returns the first token, the
        /// export, and the cached tokens of the prefill.
        fn prefill(pre: &Engine, p: &[u32]) -> (Sampled, KvStaging, usize) {
            let (exp, rx) = ToStaging::new(pre, p.len());
            let mut h = pre.submit_with_export(spec(p, 1), exp).unwrap();
            let (toks, cached) = collect(&mut h);
            assert_eq!(toks.len(), 1, "max_tokens 1");
            let out = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("exporter dropped when the request left");
            assert!(out.bad.is_empty(), "bad exports: {:?}", out.bad);
            let (nb, bs) = (out.staging.n_blocks(), out.staging.layout().block_size);
            for (i, &g) in out.slots.iter().enumerate() {
                let (layer, block) = (i / nb, i % nb);
                let want = bs.min(p.len() - block * bs) as u32;
                assert_eq!(
                    g,
                    want,
                    "layer {layer} block {block} of a {}-token prompt",
                    p.len()
                );
            }
            (toks[0].clone(), out.staging, cached)
        }

        /// Installs the staged prefill on `dec` and returns all its tokens.
        fn decode(
            dec: &Engine,
            p: &[u32],
            first: Sampled,
            staging: KvStaging,
            n: usize,
        ) -> Vec<u32> {
            let mut r = block_on(dec.reserve(p.len())).unwrap();
            assert_eq!(r.tokens(), p.len());
            assert!(r.in_place(), "a host pool takes KV in place: {r:?}");
            r.fill_from(&staging).unwrap();
            let mut h = block_on(dec.install(r, spec(p, n), vec![first], None)).unwrap();
            collect(&mut h).0.iter().map(|s| s.token).collect()
        }

        fn plain(e: &Engine, p: &[u32], n: usize) -> Vec<u32> {
            let mut h = e.submit(spec(p, n)).unwrap();
            collect(&mut h).0.iter().map(|s| s.token).collect()
        }

        fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !f() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        #[test]
        fn export_then_install_equals_plain_generation() {
            // Step budget 24 (not a multiple of the block size): the long
            // prompt's chunks end mid-block, so blocks are exported partial
            // first, then again with more slots.
            let pre = engine(24, 64 << 20);
            let dec = engine(512, 64 << 20);
            let reference = engine(512, 64 << 20);
            let n = 8;
            for (len, k) in [(7, 1), (40, 2), (101, 3)] {
                let p = prompt(len, k);
                let (first, staging, _) = prefill(&pre, &p);
                let got = decode(&dec, &p, first, staging, n);
                assert_eq!(got, plain(&reference, &p, n), "{len}-token prompt");
                assert_eq!(got.len(), n);
            }
            assert!(pre.stats().steps > 0);
        }

        /// A transferred prompt joins the receiver's prefix cache, also
        /// when the request ends with the prefill worker's first token
        /// (`max_tokens` 1: it never decodes there), so the next request
        /// with that prompt finds it cached where the router sends it.
        #[test]
        fn an_installed_prompt_is_cached_even_when_its_request_ends_at_once() {
            let pre = engine(512, 64 << 20);
            let dec = engine(512, 64 << 20);
            let p = prompt(40, 21);
            let (first, staging, _) = prefill(&pre, &p);
            assert_eq!(dec.cached_prefix_len(0, p.clone()), 0);
            assert_eq!(decode(&dec, &p, first, staging, 1).len(), 1);
            assert_eq!(dec.cached_prefix_len(0, p.clone()), 32, "two whole blocks");
            // And the cached blocks hold the right KV: the same tokens as
            // computing the prompt from scratch.
            let reference = engine(512, 64 << 20);
            let mut h = dec.submit(spec(&p, 8)).unwrap();
            let (toks, cached) = collect(&mut h);
            assert_eq!(cached, 32);
            let got: Vec<u32> = toks.iter().map(|s| s.token).collect();
            assert_eq!(got, plain(&reference, &p, 8));
        }

        /// KV written in place into reserved blocks while the engine decodes
        /// another sequence from the same pool: both give the tokens of
        /// plain generation (the writer touches only its blocks, the engine
        /// only its sequences').
        #[test]
        fn in_place_receive_runs_beside_a_decoding_sequence() {
            let pre = engine(512, 64 << 20);
            let dec = engine(512, 64 << 20);
            let reference = engine(512, 64 << 20);
            let (bg, long) = (prompt(30, 11), 160);
            let mut running = dec.submit(spec(&bg, long)).unwrap();
            // Its first token: it is in the batch before any KV arrives.
            let first_bg = match running.events.blocking_recv() {
                Some(Event::Token(s)) => s,
                e => panic!("expected a token, got {e:?}"),
            };
            for (len, k) in [(40, 12), (101, 13), (17, 14)] {
                let p = prompt(len, k);
                let (first, staging, _) = prefill(&pre, &p);
                assert_eq!(
                    decode(&dec, &p, first, staging, 8),
                    plain(&reference, &p, 8)
                );
            }
            let mut got = vec![first_bg];
            got.extend(collect(&mut running).0);
            let got: Vec<u32> = got.iter().map(|s| s.token).collect();
            assert_eq!(got, plain(&reference, &bg, long));
            wait_until("decode engine idle with every block free", || {
                let s = dec.stats();
                s.running == 0 && s.free_blocks + s.cached_blocks == s.total_blocks
            });
        }

        #[test]
        fn export_of_prefix_cache_hits_is_complete() {
            let pre = engine(512, 64 << 20);
            let dec = engine(512, 64 << 20);
            let reference = engine(512, 64 << 20);
            let shared = prompt(40, 7);
            let p1: Vec<u32> = shared.iter().copied().chain(prompt(9, 8)).collect();
            let p2: Vec<u32> = shared.iter().copied().chain(prompt(13, 9)).collect();
            let n = 6;
            let (f1, s1, c1) = prefill(&pre, &p1);
            assert_eq!(c1, 0);
            assert_eq!(decode(&dec, &p1, f1, s1, n), plain(&reference, &p1, n));
            let (f2, s2, c2) = prefill(&pre, &p2);
            assert_eq!(c2, 32, "two whole shared blocks from the cache");
            wait_until("prefix hit in stats", || pre.stats().prefix.hits >= 1);
            assert_eq!(decode(&dec, &p2, f2, s2, n), plain(&reference, &p2, n));
        }

        /// Parallel sampling across the disaggregation seam: the prefill
        /// engine samples every choice's first token from the one prompt
        /// pass; the decode engine forks the installed KV. Each choice equals
        /// a plain single-choice request with its key.
        #[test]
        fn parallel_choices_prefilled_elsewhere_equal_single_requests() {
            let pre = engine(512, 64 << 20);
            let dec = engine(512, 64 << 20);
            let reference = engine(512, 64 << 20);
            let n = 3;
            let params = SamplingParams {
                temperature: 0.9,
                seed: 5,
                request_key: 40,
                ..Default::default()
            };
            let p = prompt(45, 6);
            let with = |n: usize, key: u64, max: usize| RequestSpec {
                prompt: p.clone(),
                params: SamplingParams {
                    request_key: key,
                    ..params.clone()
                },
                max_tokens: Some(max),
                n,
                ..Default::default()
            };
            let (exp, rx) = ToStaging::new(&pre, p.len());
            let h = pre.submit_with_export(with(n, 40, 1), exp).unwrap();
            let firsts: Vec<Sampled> = collect_all(h)
                .into_iter()
                .map(|mut t| {
                    assert_eq!(t.len(), 1);
                    t.remove(0)
                })
                .collect();
            let staged = rx.recv_timeout(Duration::from_secs(60)).unwrap();
            let mut r = block_on(dec.reserve(p.len())).unwrap();
            r.fill_from(&staged.staging).unwrap();
            let h = block_on(dec.install(r, with(n, 40, 10), firsts, None)).unwrap();
            let got = collect_all(h);
            for (i, g) in got.iter().enumerate() {
                let want = collect_all(reference.submit(with(1, 40 + i as u64, 10)).unwrap());
                let toks = |v: &[Sampled]| v.iter().map(|s| s.token).collect::<Vec<_>>();
                assert_eq!(toks(g), toks(&want[0]), "choice {i}");
            }
            // Local parallel sampling on the engine service agrees too.
            let local = collect_all(reference.submit(with(n, 40, 10)).unwrap());
            assert_eq!(local, got);
            wait_until("decode engine idle with every block free", || {
                let s = dec.stats();
                s.running == 0 && s.free_blocks + s.cached_blocks == s.total_blocks
            });
        }

        #[test]
        fn a_reservation_waits_in_line_only_so_long_and_gives_up_its_place_when_dropped() {
            let layout = model().kv_layout(16);
            let dec = Engine::start(
                shared_model(),
                EngineConfig {
                    block_size: 16,
                    kv_cache_bytes: 16 * layout.block_bytes(),
                    reserve_wait: Duration::from_millis(300),
                    ..Default::default()
                },
            );
            let free = || dec.stats().free_blocks;
            let big = block_on(dec.reserve(200)).unwrap(); // 13 of 16 blocks
            wait_until("13 blocks reserved", || free() == 3);
            // Refused once its patience runs out, with the reason.
            let asked = Instant::now();
            let e = block_on(dec.reserve(100)).unwrap_err();
            assert!(
                asked.elapsed() >= Duration::from_millis(300),
                "refused early"
            );
            assert!(
                matches!(e, EngineError::OutOfBlocks { needed: 7, free: 3 }),
                "{e}"
            );
            wait_until("a refused reservation out of the line", || {
                dec.stats().waiting == 0
            });
            // A caller that gives up leaves the line at once: a smaller
            // reservation behind it is not held up by it.
            use std::future::Future;
            let mut first = Box::pin(dec.reserve(100));
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            assert!(first.as_mut().poll(&mut cx).is_pending());
            wait_until("the first in line", || dec.stats().waiting == 1);
            drop(first);
            wait_until("the line empty again", || dec.stats().waiting == 0);
            let small = block_on(dec.reserve(40)).expect("3 blocks are free"); // 3 blocks
            wait_until("all 16 blocks reserved", || free() == 0);
            drop((big, small));
            wait_until("every block back", || free() == 16);
        }

        #[test]
        fn reservations_are_released_on_drop_and_on_bad_install() {
            let layout = model().kv_layout(16);
            let dec = engine(512, 16 * layout.block_bytes());
            assert_eq!(dec.total_blocks(), 16);
            assert_eq!(dec.block_size(), 16);
            assert_eq!(dec.kv_layout(), layout);
            let all = dec.stats().free_blocks;
            assert_eq!(all, 16);
            let free = || dec.stats().free_blocks;

            let big = block_on(dec.reserve(200)).unwrap(); // 13 blocks
            wait_until("13 blocks reserved", || free() == 3);
            // One the pool cannot serve now waits in line, holding nothing
            // and counted as waiting, and is granted when blocks come back.
            std::thread::scope(|s| {
                let waiter = s.spawn(|| block_on(dec.reserve(100))); // 7 blocks
                wait_until("the second reservation in line", || {
                    dec.stats().waiting == 1
                });
                assert_eq!(free(), 3, "a waiting reservation holds no block");
                drop(big);
                let second = waiter
                    .join()
                    .unwrap()
                    .expect("granted once blocks are back");
                wait_until("the second reservation granted", || free() == all - 7);
                assert_eq!(dec.stats().waiting, 0);
                drop(second);
            });
            wait_until("blocks back after drop", || free() == all);
            assert!(
                block_on(dec.reserve(10_000)).is_err(),
                "larger than the pool"
            );
            assert!(block_on(dec.reserve(0)).is_err());

            // Staged KV of the wrong size is refused; the reservation
            // still gives its blocks back.
            let mut r = block_on(dec.reserve(40)).unwrap();
            wait_until("3 blocks reserved", || free() == all - 3);
            assert!(r.region_mut(0, 2).is_some() && r.region_mut(0, 3).is_none());
            assert!(r.region_mut(layout.n_layers, 0).is_none());
            let e = r.fill_from(&KvStaging::new(layout, 30)).unwrap_err();
            assert!(e.to_string().contains("30"), "{e}");
            drop(r);
            wait_until("blocks back after a bad fill", || free() == all);
            let p = prompt(40, 4);
            let first = Sampled::bare(5);

            // A prompt that does not match the reservation.
            let r = block_on(dec.reserve(40)).unwrap();
            let e =
                block_on(dec.install(r, spec(&p[..39], 4), vec![first.clone()], None)).unwrap_err();
            assert!(e.to_string().contains("39"), "{e}");
            wait_until("blocks back after a mismatched prompt", || free() == all);

            // An invalid request (bad sampling parameters) frees them too.
            let r = block_on(dec.reserve(40)).unwrap();
            let mut bad = spec(&p, 4);
            bad.params.top_p = 2.0;
            assert!(block_on(dec.install(r, bad, vec![first], None)).is_err());
            wait_until("blocks back after an invalid request", || free() == all);
        }
    }

    /// Parallel sampling (`n` choices of one prompt) on the scheduler: the
    /// prompt's blocks are shared by fork + copy-on-write, and every choice
    /// gives exactly the tokens of a separate request with its key.
    mod parallel {
        use super::*;
        use tandem_engine::scheduler::EventSink;

        const N: usize = 4;

        fn params() -> SamplingParams {
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                presence_penalty: 0.3,
                seed: 11,
                request_key: 5,
                ..Default::default()
            }
        }

        /// Choice `i`'s key is the request's plus `i`.
        fn keyed(params: &SamplingParams, i: usize) -> SamplingParams {
            SamplingParams {
                request_key: params.request_key + i as u64,
                ..params.clone()
            }
        }

        fn runs(n: usize) -> (Vec<Box<dyn EventSink>>, Vec<Run>) {
            (0..n)
                .map(|_| {
                    let (tx, rx) = channel();
                    (Box::new(tx) as Box<dyn EventSink>, Run::of(rx))
                })
                .unzip()
        }

        /// Steps until idle; returns the most blocks in use at any step.
        fn run_to_end(s: &mut Scheduler, runs: &mut [Run]) -> usize {
            let mut peak = 0;
            let mut steps = 0;
            while s.has_work() {
                s.step(model()).unwrap();
                peak = peak.max(s.pool().used_blocks());
                drain(runs);
                steps += 1;
                assert!(steps < 20_000, "scheduler made no progress");
            }
            drain(runs);
            peak
        }

        fn prompt(len: usize) -> Vec<u32> {
            (0..len as u32).map(|i| 200 + (i * 389) % 15000).collect()
        }

        #[test]
        fn forked_choices_equal_separate_requests_and_share_blocks() {
            let params = params();
            let max = 16;
            // A partial last block (copied on write) and a block-aligned prompt.
            for len in [37, 48] {
                let p = prompt(len);
                let mut forked = scheduler(256, 512, false);
                let (sinks, mut got) = runs(N);
                forked
                    .add_parallel(request(1, &p, &params, max), sinks, None)
                    .unwrap();
                let forked_peak = run_to_end(&mut forked, &mut got);

                let mut separate = scheduler(256, 512, false);
                let mut want: Vec<Run> = Vec::new();
                for i in 0..N {
                    let (tx, rx) = channel();
                    separate
                        .add(
                            request(10 + i as u64, &p, &keyed(&params, i), max),
                            Box::new(tx),
                        )
                        .unwrap();
                    want.push(Run::of(rx));
                }
                let separate_peak = run_to_end(&mut separate, &mut want);

                for i in 0..N {
                    assert_eq!(
                        got[i].tokens, want[i].tokens,
                        "choice {i}, {len}-token prompt"
                    );
                    assert_eq!(
                        got[i].tokens,
                        alone(&p, &keyed(&params, i), max),
                        "choice {i} against the plain path"
                    );
                    assert_eq!(got[i].finished.map(|f| f.0), Some(FinishReason::Length));
                }
                let distinct: std::collections::HashSet<&Vec<u32>> =
                    got.iter().map(|r| &r.tokens).collect();
                assert!(
                    distinct.len() > 1,
                    "the choices should differ: {distinct:?}"
                );
                // The last token sampled is never written to the KV.
                let bs = 16;
                let full = len / bs;
                let per_choice = (len + max - 1).div_ceil(bs);
                assert_eq!(separate_peak, N * per_choice);
                assert_eq!(
                    forked_peak,
                    full + N * (per_choice - full),
                    "full prompt blocks held once, the rest per choice ({len}-token prompt)"
                );
                assert!(forked_peak < separate_peak);
                assert_eq!(
                    forked.pool().free_blocks(),
                    forked.pool().n_blocks(),
                    "no leak"
                );
                assert_eq!(
                    forked.stats().prompt_tokens_computed,
                    len as u64,
                    "prompt computed once"
                );
            }
        }

        /// Choices that share a partial last block and draft into it
        /// (each draft copies it on write first) give the tokens of
        /// separate requests, and leave no block behind.
        #[test]
        fn speculating_choices_equal_separate_requests() {
            let params = params();
            let max = 24;
            let phrase = prompt(9);
            let p: Vec<u32> = phrase.iter().cycle().take(37).copied().collect();
            let pool = KvPool::new(model().kv_layout(16), 256);
            let mut s = Scheduler::new(
                SchedulerConfig {
                    speculative: SpeculativeConfig {
                        token_cost: 0.0,
                        max_batch: 64,
                        ..SpeculativeConfig::ngram(4)
                    },
                    ..Default::default()
                },
                pool,
                model().config.context_length,
            );
            let (sinks, mut got) = runs(N);
            s.add_parallel(request(1, &p, &params, max), sinks, None)
                .unwrap();
            run_to_end(&mut s, &mut got);
            for (i, r) in got.iter().enumerate() {
                assert_eq!(r.tokens, alone(&p, &keyed(&params, i), max), "choice {i}");
            }
            assert!(s.stats().draft_tokens > 0, "{:?}", s.stats());
            s.clear_prefix_cache();
            assert_eq!(s.pool().free_blocks(), s.pool().n_blocks(), "no leak");
        }

        #[test]
        fn one_token_choices_finish_at_the_fork() {
            let params = params();
            let p = prompt(21);
            let mut s = scheduler(64, 512, true);
            let (sinks, mut got) = runs(N);
            s.add_parallel(request(1, &p, &params, 1), sinks, None)
                .unwrap();
            run_to_end(&mut s, &mut got);
            for (i, r) in got.iter().enumerate() {
                assert_eq!(r.tokens, alone(&p, &keyed(&params, i), 1), "choice {i}");
                assert_eq!(r.finished.map(|f| f.0), Some(FinishReason::Length));
            }
            s.clear_prefix_cache();
            assert_eq!(s.pool().free_blocks(), s.pool().n_blocks());
        }

        #[test]
        fn cancelling_choices_keeps_the_others_exact_and_frees_everything() {
            let params = params();
            let p = prompt(37);
            let max = 12;

            // One choice cancelled after the fork, one before it (the
            // parent, whose place the next pending choice takes).
            let mut s = scheduler(64, 512, false);
            let (sinks, mut got) = runs(N);
            s.add_parallel(request(1, &p, &params, max), sinks, None)
                .unwrap();
            assert!(s.cancel_choice(1, 0), "parent cancelled before the fork");
            s.step(model()).unwrap(); // prompt + fork
            s.step(model()).unwrap();
            assert!(s.cancel_choice(1, 2));
            assert!(!s.cancel_choice(1, 2), "already gone");
            run_to_end(&mut s, &mut got);
            for i in [1, 3] {
                assert_eq!(
                    got[i].tokens,
                    alone(&p, &keyed(&params, i), max),
                    "choice {i}"
                );
                assert!(got[i].finished.is_some());
            }
            assert!(got[0].tokens.is_empty() && got[0].finished.is_none());
            assert_eq!(got[2].tokens.len(), 2);
            assert!(got[2].finished.is_none());
            assert_eq!(s.pool().free_blocks(), s.pool().n_blocks(), "no leak");

            // The whole request cancelled mid-run, and a dropped stream.
            let mut s = scheduler(64, 512, false);
            let (sinks, got) = runs(N);
            s.add_parallel(request(2, &p, &params, max), sinks, None)
                .unwrap();
            let (sinks, mut got2) = runs(N);
            s.add_parallel(request(3, &p, &params, max), sinks, None)
                .unwrap();
            for _ in 0..3 {
                s.step(model()).unwrap();
            }
            assert!(s.pool().used_blocks() > 0);
            assert!(s.cancel(2));
            assert_eq!(s.stats().running, N, "request 3's choices still run");
            let dropped = got2.remove(1);
            drop(dropped);
            run_to_end(&mut s, &mut got2);
            assert_eq!(s.pool().free_blocks(), s.pool().n_blocks(), "no leak");
            drop(got);
        }

        #[test]
        fn preempted_choices_lose_nothing() {
            let params = params();
            let p = prompt(37);
            let max = 40;
            // The four choices need 2 shared + 4 x 3 private blocks at the
            // end; the pool has 8: choices are preempted and recomputed.
            let mut s = scheduler(8, 64, false);
            let (sinks, mut got) = runs(N);
            s.add_parallel(request(1, &p, &params, max), sinks, None)
                .unwrap();
            run_to_end(&mut s, &mut got);
            assert!(
                s.stats().preemptions > 0,
                "the pool was meant to be too small"
            );
            for (i, r) in got.iter().enumerate() {
                assert_eq!(r.tokens, alone(&p, &keyed(&params, i), max), "choice {i}");
                assert_eq!(r.finished.map(|f| f.0), Some(FinishReason::Length));
            }
            assert_eq!(s.pool().free_blocks(), s.pool().n_blocks(), "no leak");
        }

        #[test]
        fn bad_choice_counts_are_refused() {
            let mut s = scheduler(64, 512, false);
            assert!(s
                .add_parallel(request(1, &[5; 8], &params(), 4), vec![], None)
                .is_err());
            let mut resumed = request(2, &[5; 8], &params(), 4);
            resumed.generated = vec![7];
            let (sinks, _got) = runs(2);
            assert!(s.add_parallel(resumed, sinks, None).is_err());
            assert!(!s.has_work());
        }
    }

    #[test]
    fn engine_thread_streams_tokens() {
        use std::sync::Arc;
        use tandem_engine::engine::{Engine, EngineConfig, RequestSpec};
        let m = Arc::new(Model::load(source(), 2).unwrap());
        let engine = Engine::start(
            m,
            EngineConfig {
                kv_cache_bytes: 64 << 20,
                ..Default::default()
            },
        );
        let p = prompts()[1].clone();
        let mut h = engine
            .submit(RequestSpec {
                prompt: p.clone(),
                max_tokens: Some(6),
                ..Default::default()
            })
            .unwrap();
        let (got, end) = crate::common::drain(&mut h.events);
        assert_eq!(end.completion_tokens, 6);
        let got: Vec<u32> = got.iter().map(|s| s.token).collect();
        assert_eq!(got, alone(&p, &SamplingParams::greedy(), 6));
        assert!(engine.cached_prefix_len(0, p.clone()) >= p.len() / 16 * 16);
        let too_big = engine.submit(RequestSpec {
            prompt: vec![1; 10],
            max_tokens: Some(10_000_000),
            ..Default::default()
        });
        assert!(too_big.is_err());
    }

    /// A stream resumed on another engine with the tokens already sent
    /// continues exactly, sampling included (counter-based randomness,
    /// penalties over the output so far).
    #[test]
    fn resumed_request_continues_exactly() {
        use std::sync::Arc;
        use tandem_engine::engine::{Engine, EngineConfig, RequestSpec};
        let m = Arc::new(Model::load(source(), 2).unwrap());
        let engine = Engine::start(
            m,
            EngineConfig {
                kv_cache_bytes: 64 << 20,
                ..Default::default()
            },
        );
        let run = |spec: RequestSpec| -> (Vec<u32>, usize) {
            let mut h = engine.submit(spec).unwrap();
            let (got, end) = crate::common::drain(&mut h.events);
            (got.iter().map(|s| s.token).collect(), end.completion_tokens)
        };
        let params = SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            presence_penalty: 0.5,
            seed: 42,
            request_key: 7,
            ..Default::default()
        };
        let p = prompts()[2].clone();
        let spec = RequestSpec {
            prompt: p.clone(),
            params: params.clone(),
            max_tokens: Some(24),
            ..Default::default()
        };
        let (full, n) = run(spec.clone());
        assert_eq!((full.len(), n), (24, 24));
        for cut in [1, 9, 23] {
            let (rest, n) = run(RequestSpec {
                generated: full[..cut].to_vec(),
                ..spec.clone()
            });
            assert_eq!(rest, full[cut..], "resumed after {cut} tokens");
            assert_eq!(n, 24, "completion tokens count the resumed ones");
        }
        // Nothing left to generate is refused, not run.
        assert!(engine
            .submit(RequestSpec {
                generated: full.clone(),
                ..spec
            })
            .is_err());
    }

    /// Guided decoding (JSON mode) in the engine (batched, first token
    /// sampled in the prefill step) gives the plain path's tokens, and what
    /// it writes is a JSON object's start, a whole object when it stops.
    #[test]
    fn json_mode_matches_the_plain_path_and_writes_json() {
        use std::sync::Arc;
        use tandem_engine::engine::{Engine, EngineConfig, RequestSpec};
        use tandem_engine::generate::generate_guided;
        use tandem_engine::guided::{Grammars, ResponseFormat};
        let tok = source().tokenizer().unwrap();
        let grammars = Grammars::from_tokenizer(&tok).unwrap();
        let stop = tok.eos_ids().to_vec();
        let m = Arc::new(Model::load(source(), 2).unwrap());
        let config = EngineConfig {
            kv_cache_bytes: 64 << 20,
            ..Default::default()
        };
        // Without the grammars, JSON mode is refused, not ignored.
        let bare = Engine::start(m.clone(), config.clone());
        let json = |params: SamplingParams| SamplingParams {
            response_format: ResponseFormat::JsonObject,
            ..params
        };
        let refused = bare.submit(RequestSpec {
            prompt: vec![1, 2, 3],
            params: json(SamplingParams::greedy()),
            ..Default::default()
        });
        let Err(err) = refused else {
            panic!("JSON mode without grammars was accepted");
        };
        assert!(matches!(err, EngineError::Unsupported(_)), "{err}");
        drop(bare);

        let engine = Engine::start(
            m.clone(),
            EngineConfig {
                grammars: Some(grammars.clone()),
                ..config
            },
        );
        let asks = [
            "A JSON object describing a cat, with its name and age:",
            "Reply in JSON. What are the three primary colours?",
            "The weather in Paris today, as JSON:",
        ];
        let sampled = SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            seed: 5,
            ..Default::default()
        };
        let mut cases: Vec<(Vec<u32>, SamplingParams)> = asks
            .iter()
            .flat_map(|a| {
                let p = tok.encode(a, true).unwrap();
                [
                    (p.clone(), json(SamplingParams::greedy())),
                    (p, json(sampled.clone())),
                ]
            })
            .collect();
        // A schema: these keys, these types, nothing else.
        let schema = r#"{"type": "object", "properties": {"name": {"type": "string"},
            "age": {"type": "integer"}}, "required": ["name", "age"],
            "additionalProperties": false}"#;
        cases.push((
            tok.encode(asks[0], true).unwrap(),
            SamplingParams {
                response_format: ResponseFormat::JsonSchema(schema.into()),
                ..SamplingParams::greedy()
            },
        ));
        // All at once, so that they share steps.
        let handles: Vec<_> = cases
            .iter()
            .map(|(p, params)| {
                engine
                    .submit(RequestSpec {
                        prompt: p.clone(),
                        params: params.clone(),
                        max_tokens: Some(48),
                        stop_tokens: stop.clone(),
                        ..Default::default()
                    })
                    .unwrap()
            })
            .collect();
        let mut stopped = 0;
        for ((p, params), mut h) in cases.iter().zip(handles) {
            let (got, end) = crate::common::drain(&mut h.events);
            let got: Vec<u32> = got.iter().map(|s| s.token).collect();
            let finish = end.reason;
            let req = GenerateRequest {
                prompt: p.clone(),
                params: params.clone(),
                max_tokens: Some(48),
                stop_tokens: stop.clone(),
                adapter: 0,
            };
            let plain = generate_guided(m.as_ref(), &req, Some(&grammars), |_| true).unwrap();
            assert_eq!(got, plain.tokens, "{params:?}");
            assert_eq!(finish, plain.finish);
            let bytes: Vec<u8> = got
                .iter()
                .flat_map(|&t| tok.token_bytes(t).unwrap().to_vec())
                .collect();
            let text = String::from_utf8_lossy(&bytes);
            assert!(text.trim_start().starts_with('{'), "{text:?}");
            if finish == FinishReason::Stop {
                stopped += 1;
                let v: Value = serde_json::from_str(&text).expect("a whole JSON text");
                assert!(v.is_object(), "{text:?}");
                if let ResponseFormat::JsonSchema(_) = params.response_format {
                    let o = v.as_object().unwrap();
                    assert_eq!(o.len(), 2, "{text:?}");
                    assert!(o["name"].is_string() && o["age"].is_i64(), "{text:?}");
                }
            } else {
                // Cut by max_tokens: still the start of an object, which
                // serde_json reads as far as it goes.
                let e = serde_json::from_str::<Value>(&text).unwrap_err();
                assert!(e.is_eof(), "{text:?}: {e}");
            }
        }
        // Most of these end as whole objects within 48 tokens.
        assert!(stopped >= 4, "only {stopped} of 7 completed their object");
        // A guided stream resumed elsewhere continues exactly.
        let (p, params) = &cases[6];
        let spec = RequestSpec {
            prompt: p.clone(),
            params: params.clone(),
            max_tokens: Some(48),
            stop_tokens: stop.clone(),
            ..Default::default()
        };
        let collect = |spec: RequestSpec| -> Vec<u32> {
            let mut h = engine.submit(spec).unwrap();
            let (got, _) = crate::common::drain(&mut h.events);
            got.iter().map(|s| s.token).collect()
        };
        let full = collect(spec.clone());
        assert!(full.len() > 6);
        let rest = collect(RequestSpec {
            generated: full[..5].to_vec(),
            ..spec.clone()
        });
        assert_eq!(rest, full[5..]);
        // A resumed stream whose tokens break the grammar is refused.
        let broken = engine.submit(RequestSpec {
            generated: tok.encode("not json", false).unwrap(),
            ..spec
        });
        assert!(broken.is_err());
    }
}

/// LoRA adapters on the default model: requests with different adapters
/// (and none) share one batch and one pool, each getting exactly the
/// tokens the plain path gives it alone, and their prefixes never mix in
/// the cache.
mod lora {
    use super::*;
    use std::sync::mpsc::channel;
    use tandem_engine::kv::KvPool;
    use tandem_engine::scheduler::{Event, Request, Scheduler, SchedulerConfig};
    use tandem_engine::speculative::SpeculativeConfig;
    use tandem_model::lora::{LoraSynthSpec, Target};

    /// The default model with two seeded adapters: 1 on every projection,
    /// 2 on the attention's q and v only (another rank and scale).
    fn adapted() -> &'static Model {
        static M: OnceLock<Model> = OnceLock::new();
        M.get_or_init(|| {
            let m = Model::load(source(), 2).expect("load default model");
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("real_model-lora-{}", std::process::id()));
            for (name, spec) in [
                (
                    "all",
                    LoraSynthSpec {
                        rank: 8,
                        alpha: 16.0,
                        targets: Target::ALL.to_vec(),
                        seed: 3,
                        b_std: 0.1,
                    },
                ),
                (
                    "qv",
                    LoraSynthSpec {
                        rank: 4,
                        alpha: 4.0,
                        targets: vec![Target::Q, Target::V],
                        seed: 4,
                        b_std: 0.3,
                    },
                ),
            ] {
                let d = dir.join(name);
                tandem_model::lora::synth(&m.config, &spec, &d).unwrap();
                let a = tandem_model::lora::load(&d, &m.config).unwrap();
                m.add_adapter(name, a).unwrap();
            }
            let _ = std::fs::remove_dir_all(&dir);
            m
        })
    }

    fn alone(prompt: &[u32], adapter: u32, n: usize) -> Vec<u32> {
        let req = GenerateRequest {
            prompt: prompt.to_vec(),
            params: SamplingParams::greedy(),
            max_tokens: Some(n),
            stop_tokens: vec![],
            adapter,
        };
        adapted().generate(&req, |_| true).unwrap().tokens
    }

    const N: usize = 12;

    /// A prompt and the adapter it runs with.
    type Run = (Vec<u32>, u32);

    /// Two prompts sharing a prefix of whole blocks, each with every
    /// adapter (0, 1, 2), and the plain path's tokens for each.
    fn cases() -> Vec<(Run, Vec<u32>)> {
        let tok = source().tokenizer().unwrap();
        let shared = "You are a helpful assistant who answers in one short sentence. ".repeat(3);
        let mut want = Vec::new();
        for q in ["What is the capital of France?", "Name a primary colour."] {
            let p = tok.encode(&format!("{shared}{q}"), true).unwrap();
            assert!(p.len() > 32, "the shared prefix spans whole blocks");
            for adapter in 0..3u32 {
                let out = alone(&p, adapter, N);
                want.push(((p.clone(), adapter), out));
            }
        }
        // The adapters change the output (else nothing is shown).
        for chunk in want.chunks(3) {
            assert!(
                chunk[0].1 != chunk[1].1 && chunk[0].1 != chunk[2].1,
                "an adapter leaves the greedy tokens unchanged"
            );
        }
        want
    }

    /// Runs every `(prompt, adapter)` through `s` at once; each one's
    /// tokens and cached prompt tokens.
    fn run_all(s: &mut Scheduler, reqs: &[Run], n: usize) -> Vec<(Vec<u32>, usize)> {
        let mut rxs = Vec::new();
        for (i, (p, adapter)) in reqs.iter().enumerate() {
            let (tx, rx) = channel();
            let req = Request {
                adapter: *adapter,
                ..super::batching::request(i as u64, p, &SamplingParams::greedy(), n)
            };
            s.add(req, Box::new(tx)).unwrap();
            rxs.push(rx);
        }
        let mut steps = 0;
        while s.has_work() {
            s.step(adapted()).unwrap();
            steps += 1;
            assert!(steps < 10_000);
        }
        rxs.iter()
            .map(|rx| {
                let mut got = (Vec::new(), 0);
                for e in rx.try_iter() {
                    match e {
                        Event::Token(t) => got.0.push(t.token),
                        Event::Finished { cached_tokens, .. } => got.1 = cached_tokens,
                        e => panic!("unexpected event {e:?}"),
                    }
                }
                got
            })
            .collect()
    }

    fn scheduler(speculative: SpeculativeConfig) -> Scheduler {
        let pool = KvPool::new(adapted().kv_layout(16), 256);
        let cfg = SchedulerConfig {
            max_step_tokens: 64,
            speculative,
            ..Default::default()
        };
        Scheduler::new(cfg, pool, adapted().config.context_length)
    }

    #[test]
    fn adapters_batch_together_and_keep_their_own_prefixes() {
        let want = cases();
        let reqs: Vec<Run> = want.iter().map(|(r, _)| r.clone()).collect();
        let mut s = scheduler(SpeculativeConfig::OFF);
        // Twice: the second round finds the first's prefixes cached, each
        // under its own adapter.
        for round in 0..2 {
            for ((tokens, cached), ((_, adapter), expected)) in
                run_all(&mut s, &reqs, N).iter().zip(&want)
            {
                assert_eq!(tokens, expected, "round {round}, adapter {adapter}");
                if round == 1 {
                    assert!(*cached >= 32, "round 2 reuses the cache");
                }
            }
        }
        // A prompt cached under one adapter is not offered to another.
        let tok = source().tokenizer().unwrap();
        let fresh = tok
            .encode(
                &"Only the base model saw this prompt, long enough for two whole blocks. "
                    .repeat(3),
                true,
            )
            .unwrap();
        run_all(&mut s, &[(fresh.clone(), 0)], 1);
        assert!(s.cached_prefix_len(0, &fresh) >= 32);
        assert_eq!(s.cached_prefix_len(1, &fresh), 0);
        assert_eq!(s.cached_prefix_len(2, &fresh), 0);
        assert!(s.cached_prefix_len(2, &reqs[0].0) >= 32);
    }

    /// Speculative decoding verifies each draft with the sequence's own
    /// adapter: the output is the plain path's, drafts accepted or not.
    #[test]
    fn speculative_decoding_keeps_each_requests_adapter() {
        let want = cases();
        let reqs: Vec<Run> = want.iter().map(|(r, _)| r.clone()).collect();
        let mut s = scheduler(SpeculativeConfig {
            token_cost: 0.0,
            max_batch: 64,
            ..SpeculativeConfig::ngram(4)
        });
        for ((tokens, _), ((_, adapter), expected)) in run_all(&mut s, &reqs, N).iter().zip(&want) {
            assert_eq!(tokens, expected, "adapter {adapter}");
        }
        let st = s.stats();
        assert!(st.draft_tokens > 0, "nothing was drafted: {st:?}");
    }

    /// Adapters loaded and unloaded while the engine serves: one loaded at
    /// run time gives what one loaded at start gives; unloading refuses
    /// its name at once but lets the request running with it finish with
    /// the same tokens, and frees the weights after; a bad directory
    /// changes nothing.
    #[test]
    fn adapters_come_and_go_while_the_engine_serves() {
        use std::sync::Arc;
        use tandem_engine::engine::{Engine, EngineConfig, RequestSpec};
        let m = Arc::new(Model::load(source(), 2).unwrap());
        let engine = Engine::start(
            m.clone(),
            EngineConfig {
                kv_cache_bytes: 64 << 20,
                ..Default::default()
            },
        );
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("real_model-runtime-lora-{}", std::process::id()));
        // The same seed and shape as `adapted()`'s adapter 1.
        let spec = LoraSynthSpec {
            rank: 8,
            alpha: 16.0,
            targets: Target::ALL.to_vec(),
            seed: 3,
            b_std: 0.1,
        };
        tandem_model::lora::synth(&m.config, &spec, &dir).unwrap();
        let run = |adapter: u32, n: usize| {
            let tok = source().tokenizer().unwrap();
            let prompt = tok
                .encode("Write a story about a lighthouse.", true)
                .unwrap();
            let want = alone(&prompt, if adapter == 0 { 0 } else { 1 }, n);
            let h = engine
                .submit(RequestSpec {
                    prompt,
                    max_tokens: Some(n),
                    adapter,
                    ..Default::default()
                })
                .unwrap();
            (h, want)
        };
        let tokens = |h: &mut tandem_engine::engine::RequestHandle| -> Vec<u32> {
            crate::common::drain(&mut h.events)
                .0
                .iter()
                .map(|s| s.token)
                .collect()
        };

        // Nothing there yet; a directory without an adapter changes nothing.
        assert!(engine.adapter_id("all").is_none());
        let e = engine
            .load_adapter("all", &dir.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("adapter_config.json"), "{e}");
        assert!(engine.adapters().is_empty() && m.adapters().is_empty());

        let info = engine.load_adapter("all", &dir).unwrap();
        assert_eq!((info.id, engine.adapter_id("all")), (1, Some(1)));
        let e = engine.load_adapter("all", &dir).unwrap_err().to_string();
        assert!(e.contains("loaded already"), "{e}");
        let (mut h, want) = run(1, N);
        assert_eq!(tokens(&mut h), want, "loaded at run time = loaded at start");

        // Unloaded while a long request runs with it.
        let (mut long, want_long) = run(1, 160);
        let first = long.events.blocking_recv();
        assert!(matches!(first, Some(Event::Token(_))), "{first:?}");
        engine.unload_adapter("all").unwrap();
        assert!(engine.adapter_id("all").is_none());
        assert!(engine.adapters().is_empty());
        let refused = engine.submit(RequestSpec {
            prompt: vec![1, 2, 3],
            adapter: 1,
            ..Default::default()
        });
        assert!(refused.is_err(), "an unloaded adapter's number is refused");
        let e = engine.load_adapter("all", &dir).unwrap_err().to_string();
        assert!(e.contains("still runs requests"), "{e}");
        let e = engine.unload_adapter("all").unwrap_err().to_string();
        assert!(e.contains("not loaded"), "{e}");
        let Some(Event::Token(t)) = first else {
            unreachable!()
        };
        let mut got = vec![t.token];
        got.extend(tokens(&mut long));
        assert_eq!(got, want_long, "the running request kept its adapter");
        // Freed once nothing runs with it (after the step that ended it).
        let mut waited = 0;
        while !m.adapters().is_empty() {
            assert!(
                waited < 500,
                "the unloaded adapter's weights were never freed"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
            waited += 1;
        }

        // Loaded again: a new number, the same tokens; the base model is
        // untouched throughout.
        let info = engine.load_adapter("all", &dir).unwrap();
        assert_eq!(info.id, 2, "numbers are not reused");
        let (mut h, want) = run(2, N);
        assert_eq!(tokens(&mut h), want);
        let (mut h, want) = run(0, N);
        assert_eq!(tokens(&mut h), want);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A worker holds at most `max_adapters` adapters of rank at most
    /// `max_rank`; a load past either is refused, naming the limit, and
    /// changes nothing.
    #[test]
    fn adapter_limits_refuse_loads_past_them() {
        use std::sync::Arc;
        use tandem_engine::engine::{AdapterLimits, Engine, EngineConfig};
        let m = Arc::new(Model::load(source(), 1).unwrap());
        let engine = Engine::start(
            m.clone(),
            EngineConfig {
                kv_cache_bytes: 16 << 20,
                adapter_limits: AdapterLimits {
                    max_adapters: 1,
                    max_rank: 8,
                },
                ..Default::default()
            },
        );
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("real_model-lora-limits-{}", std::process::id()));
        for (name, rank) in [("r8", 8), ("r16", 16)] {
            let spec = LoraSynthSpec {
                rank,
                alpha: 16.0,
                targets: vec![Target::Q],
                seed: rank as u64,
                b_std: 0.1,
            };
            tandem_model::lora::synth(&m.config, &spec, &dir.join(name)).unwrap();
        }
        let e = engine
            .load_adapter("big", &dir.join("r16"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--max-lora-rank 8"), "{e}");
        engine.load_adapter("a", &dir.join("r8")).unwrap();
        let e = engine
            .load_adapter("b", &dir.join("r8"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--max-lora-adapters"), "{e}");
        assert_eq!(engine.adapters().len(), 1);
        // Room again once one is unloaded (and, with nothing running, freed).
        engine.unload_adapter("a").unwrap();
        engine.load_adapter("b", &dir.join("r8")).unwrap();
        assert_eq!(engine.adapter_id("b"), Some(2));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_adapter_is_refused_with_its_reason() {
        let m = model();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("real_model-bad-lora-{}", std::process::id()));
        let spec = LoraSynthSpec {
            rank: 4,
            alpha: 8.0,
            targets: vec![Target::Q],
            seed: 1,
            b_std: 0.01,
        };
        tandem_model::lora::synth(&m.config, &spec, &dir).unwrap();
        // Another model's shapes.
        let mut other = m.config.clone();
        other.hidden += 64;
        let e = tandem_model::lora::load(&dir, &other)
            .unwrap_err()
            .to_string();
        assert!(e.contains("shape"), "{e}");
        // A truncated weights file.
        let w = dir.join(tandem_model::lora::ADAPTER_WEIGHTS);
        let bytes = std::fs::read(&w).unwrap();
        std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
        let e = tandem_model::lora::load(&dir, &m.config)
            .unwrap_err()
            .to_string();
        assert!(e.contains("adapter_model.safetensors"), "{e}");
        // DoRA is not LoRA.
        std::fs::write(&w, &bytes).unwrap();
        let cfg = dir.join(tandem_model::lora::ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(
            &cfg,
            text.replace("\"use_dora\": false", "\"use_dora\": true"),
        )
        .unwrap();
        let e = tandem_model::lora::load(&dir, &m.config)
            .unwrap_err()
            .to_string();
        assert!(e.contains("DoRA"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        // An adapter number the model does not have.
        let req = GenerateRequest {
            prompt: vec![1, 2, 3],
            params: SamplingParams::greedy(),
            max_tokens: Some(1),
            stop_tokens: vec![],
            adapter: 1,
        };
        let e = m.generate(&req, |_| true).unwrap_err().to_string();
        assert!(e.contains("LoRA adapter 1"), "{e}");
    }
}
