//! The engine on the synthetic fixtures in `fixtures/synth/` (seeded tiny
//! models written by `tandem model synth`, see its README): last-position
//! logits and greedy continuations against `transformers` (the JSON next to
//! each checkpoint, from `reference/synth_reference.py`), tokenizer round
//! trips, and a check that the generator still reproduces every committed
//! checkpoint byte for byte and the checkpoint the JSON was computed on.
//!
//! Together they cover what the one real model does not: llama, qwen2
//! (Q/K/V biases) and qwen3 (per-head query/key norms), GGUF and sharded safetensors, MQA with a separate LM
//! head, the K-quants Q4_K/Q5_K/Q6_K, Q4_0, Q8_0, F16 and BF16, and both
//! tokenizer families.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tandem_engine::generate::GenerateRequest;
use tandem_engine::model::Model;
use tandem_engine::sampler::SamplingParams;
use tandem_model::quant::GgmlType;
use tandem_model::synth::{synth, Arch, SynthFormat, SynthShape, SynthSpec, SynthTokenizer};
use tandem_model::weights::ModelSource;

#[allow(dead_code)] // the helpers other test files use
mod common;

/// One fixture: a checkpoint (committed, or regenerated on the fly when too
/// big to commit) and its reference JSON `fixtures/synth/<name>.json`.
struct Fixture {
    /// The checkpoint's file or directory name under `fixtures/synth/`, and
    /// the JSON's stem (without `.gguf`).
    file: &'static str,
    arch: Arch,
    shape: &'static str,
    format: SynthFormat,
    tokenizer: SynthTokenizer,
    /// False: only the reference JSON is committed (the checkpoint would
    /// push the fixtures over their size budget); the test regenerates it
    /// and checks it against the sha256 the JSON recorded.
    committed: bool,
}

const SEED: u64 = 1;

fn gguf(weight_type: GgmlType) -> SynthFormat {
    SynthFormat::Gguf { weight_type }
}

/// Must match the commands in `fixtures/synth/README.md`.
fn fixtures() -> Vec<Fixture> {
    use Arch::{Llama, Qwen2, Qwen3};
    use SynthTokenizer::{Gpt2, SentencePiece};
    let f = |file, arch, shape, format, tokenizer, committed| Fixture {
        file,
        arch,
        shape,
        format,
        tokenizer,
        committed,
    };
    vec![
        f(
            "tiny-llama-q4_k.gguf",
            Llama,
            "tiny",
            gguf(GgmlType::Q4K),
            Gpt2,
            true,
        ),
        f(
            "tiny-qwen2-q6_k.gguf",
            Qwen2,
            "tiny",
            gguf(GgmlType::Q6K),
            Gpt2,
            true,
        ),
        f(
            "tiny-llama-spm-q5_k.gguf",
            Llama,
            "tiny",
            gguf(GgmlType::Q5K),
            SentencePiece,
            true,
        ),
        f(
            "tiny-llama-bf16-2shards",
            Llama,
            "tiny",
            SynthFormat::Safetensors {
                dtype: GgmlType::BF16,
                shards: 2,
            },
            Gpt2,
            true,
        ),
        f(
            "tiny-mqa-llama-q8_0.gguf",
            Llama,
            "tiny-mqa",
            gguf(GgmlType::Q8_0),
            Gpt2,
            true,
        ),
        f(
            "tiny-llama-q4_0.gguf",
            Llama,
            "tiny",
            gguf(GgmlType::Q4_0),
            Gpt2,
            true,
        ),
        f(
            "tiny-llama-f16.gguf",
            Llama,
            "tiny",
            gguf(GgmlType::F16),
            Gpt2,
            false,
        ),
        f(
            "tiny-qwen3-q8_0.gguf",
            Qwen3,
            "tiny",
            gguf(GgmlType::Q8_0),
            Gpt2,
            false,
        ),
        f(
            "tiny-qwen3-bf16",
            Qwen3,
            "tiny",
            SynthFormat::Safetensors {
                dtype: GgmlType::BF16,
                shards: 1,
            },
            Gpt2,
            false,
        ),
        // Mixtral: per-expert tensors under Mixtral's names (w1/w3/w2).
        f(
            "tiny-mixtral-f32",
            Llama,
            "tiny-moe",
            SynthFormat::Safetensors {
                dtype: GgmlType::F32,
                shards: 1,
            },
            Gpt2,
            false,
        ),
        // Qwen3-MoE: llama.cpp's stacked `ffn_*_exps` tensors, and Qwen's
        // per-expert names in safetensors.
        f(
            "tiny-qwen3moe-q8_0.gguf",
            Qwen3,
            "tiny-moe",
            gguf(GgmlType::Q8_0),
            Gpt2,
            false,
        ),
        f(
            "tiny-qwen3moe-bf16",
            Qwen3,
            "tiny-moe",
            SynthFormat::Safetensors {
                dtype: GgmlType::BF16,
                shards: 1,
            },
            Gpt2,
            false,
        ),
        // Qwen2-MoE: a gated shared expert, weights not renormalised, Q/K/V
        // biases; the gate a vector in the GGUF, a one-row matrix in
        // safetensors.
        f(
            "tiny-qwen2moe-q8_0.gguf",
            Qwen2,
            "tiny-moe-shared",
            gguf(GgmlType::Q8_0),
            Gpt2,
            false,
        ),
        f(
            "tiny-qwen2moe-bf16",
            Qwen2,
            "tiny-moe-shared",
            SynthFormat::Safetensors {
                dtype: GgmlType::BF16,
                shards: 1,
            },
            Gpt2,
            false,
        ),
    ]
}

impl Fixture {
    fn spec(&self) -> SynthSpec {
        SynthSpec {
            arch: self.arch,
            shape: SynthShape::preset(self.shape).unwrap(),
            seed: SEED,
            format: self.format,
            tokenizer: self.tokenizer,
        }
    }
    fn stem(&self) -> &'static str {
        self.file.strip_suffix(".gguf").unwrap_or(self.file)
    }
    fn reference(&self) -> Value {
        let p = fixtures_dir().join(format!("{}.json", self.stem()));
        let text =
            std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }
    /// Writes the checkpoint afresh under `tag` in the target's temp dir.
    fn regenerate(&self, tag: &str) -> PathBuf {
        // By file name: a GGUF and a directory may share a stem.
        let dir = scratch(&format!("{tag}-{}", self.file));
        let out = dir.join(self.file);
        synth(&self.spec(), &out).unwrap_or_else(|e| panic!("synth {}: {e}", self.file));
        out
    }
    /// The checkpoint to run: the committed one, else a fresh one (removed
    /// when the returned guard drops).
    fn checkpoint(&self, tag: &str) -> (PathBuf, Option<Scratch>) {
        if self.committed {
            let p = fixtures_dir().join(self.file);
            assert!(p.exists(), "fixture {} is missing", p.display());
            (p, None)
        } else {
            let p = self.regenerate(tag);
            let guard = Scratch(p.parent().unwrap().to_path_buf());
            (p, Some(guard))
        }
    }
}

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/synth")
}

/// Removes a scratch directory when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh, empty directory of this process under the target's temp dir.
fn scratch(tag: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("synthetic_models-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

// ---------------------------------------------------------------------------
// Fidelity against transformers
// ---------------------------------------------------------------------------

/// Relative logit tolerance against the float32 reference.
///
/// Both sides compute with the same weights: the reference dequantises the
/// GGUF with the `gguf` package (exactly, to float32) and reads BF16
/// safetensors exactly, and our engine dequantises the same bytes; they
/// differ only in float32 rounding order. The synthetic models' logits are
/// of magnitude ~1-3 (the real model's are ~20), so the bound scales with
/// the prompt's largest logit, floored at 1: `tol = REL_TOL * max(1, |top1|)`.
///
/// Measured on these fixtures (fixtures/synth/README.md): the float32
/// reference is at most 1.4e-6 (relative, as above) from the same model run
/// in float64, and our engine at most 1.4e-6 from the float32 reference
/// (the test prints it). As for the real model, the tolerance is ten times
/// that float32 noise: room for other summation orders (thread counts,
/// SIMD widths), yet far below what a real error does: merely storing the
/// same weights as F16 instead of BF16 moves the top logit by 1.2e-3 (80x
/// the tolerance), Q4_0 instead of BF16 by 1e-1, and a wrong dequantisation,
/// RoPE pairing or misplaced head by far more. The references' smallest greedy top-2 margin is 1.8e-4, so no
/// near tie cuts a continuation short.
const REL_TOL: f32 = 1.5e-5;

/// What one fixture's comparison found.
struct Fidelity {
    worst_abs: f32,
    worst_rel: f32,
    compared_steps: usize,
    total_steps: usize,
}

fn check_against_reference(fx: &Fixture) -> Fidelity {
    check_against(fx, fx.reference(), None)
}

/// `fx` against `reference`, run with the LoRA adapter in `lora` (as
/// adapter 1) when given.
fn check_against(fx: &Fixture, reference: Value, lora: Option<&Path>) -> Fidelity {
    let (path, _scratch) = fx.checkpoint("fidelity");
    let src = ModelSource::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    assert_eq!(
        src.config,
        fx.spec().model_config(),
        "{}: config read back differs from the spec",
        fx.file
    );
    assert_eq!(
        reference["config"]["vocab_size"].as_u64().unwrap() as usize,
        src.config.vocab_size,
        "{}: reference ran a different model",
        fx.file
    );
    let m = Model::load(&src, 2).unwrap_or_else(|e| panic!("load {}: {e}", fx.file));
    if let Some(dir) = lora {
        let a = tandem_model::lora::load(dir, &src.config)
            .unwrap_or_else(|e| panic!("{}: LoRA: {e}", fx.file));
        assert_eq!(m.add_adapter("lora", a).unwrap(), 1);
    }
    let mut out = Fidelity {
        worst_abs: 0.0,
        worst_rel: 0.0,
        compared_steps: 0,
        total_steps: 0,
    };
    for p in reference["prompts"].as_array().unwrap() {
        let prompt = ids(&p["prompt_ids"]);
        let want = ids(&p["greedy"]);
        let margins: Vec<f32> = p["greedy_margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(want.len(), margins.len());
        let top5 = p["top5"].as_array().unwrap();
        assert_eq!(top5.len(), 5, "{}: reference top-5", fx.file);
        let scale = (top5[0]["logit"].as_f64().unwrap() as f32).abs().max(1.0);
        let tol = REL_TOL * scale;

        let req = GenerateRequest {
            prompt: prompt.clone(),
            params: SamplingParams::greedy(),
            max_tokens: Some(want.len()),
            stop_tokens: vec![],
            adapter: lora.is_some() as u32,
        };
        let gen = m
            .generate(&req, |_| true)
            .unwrap_or_else(|e| panic!("{}: generate: {e}", fx.file));
        let logits = &gen.prompt_logits;
        assert_eq!(
            logits.len(),
            src.config.vocab_size,
            "{}: logits length",
            fx.file
        );

        for t in top5 {
            let id = t["id"].as_u64().unwrap() as usize;
            let r = t["logit"].as_f64().unwrap() as f32;
            let d = (logits[id] - r).abs();
            out.worst_abs = out.worst_abs.max(d);
            out.worst_rel = out.worst_rel.max(d / scale);
            assert!(
                d <= tol,
                "{} prompt {prompt:?}: logit of token {id}: engine {}, reference {r} (|diff| {d:.3e} > tolerance {tol:.3e})",
                fx.file,
                logits[id]
            );
        }
        // The reference's top-5 are the engine's top-5 too: nothing else
        // outranks the reference's 5th by more than the tolerance.
        let fifth = top5[4]["logit"].as_f64().unwrap() as f32;
        let listed: Vec<usize> = top5
            .iter()
            .map(|t| t["id"].as_u64().unwrap() as usize)
            .collect();
        for (i, &l) in logits.iter().enumerate() {
            assert!(
                listed.contains(&i) || l <= fifth + tol,
                "{} prompt {prompt:?}: token {i} has logit {l}, above the reference's 5th best {fifth}",
                fx.file
            );
        }

        // Greedy: identical up to the first step where the reference's
        // top-2 margin is within the tolerance (a tie rounding may flip).
        let limit = margins
            .iter()
            .position(|&mg| mg <= tol)
            .unwrap_or(want.len());
        if limit < want.len() {
            eprintln!(
                "{}: prompt {prompt:?}: reference margin {:.2e} within tolerance at step {limit}; comparing {limit} steps",
                fx.file, margins[limit]
            );
        }
        assert_eq!(gen.tokens.len(), want.len(), "{}: greedy length", fx.file);
        assert_eq!(
            &gen.tokens[..limit],
            &want[..limit],
            "{} prompt {prompt:?}: greedy continuation differs",
            fx.file
        );
        out.compared_steps += limit;
        out.total_steps += want.len();
    }
    eprintln!(
        "{}: worst logit difference {:.2e} abs, {:.2e} relative (tolerance {REL_TOL:.1e} relative); {}/{} greedy steps compared",
        fx.file, out.worst_abs, out.worst_rel, out.compared_steps, out.total_steps
    );
    // A comparison cut short by near ties everywhere would prove little.
    assert!(
        out.compared_steps * 4 >= out.total_steps * 3,
        "{}: only {}/{} greedy steps compared",
        fx.file,
        out.compared_steps,
        out.total_steps
    );
    out
}

#[test]
fn engine_matches_transformers_on_every_fixture() {
    let mut worst = (0f32, "");
    let mut failures = Vec::new();
    for fx in fixtures() {
        // Run them all, then fail listing every fixture that disagreed.
        match std::panic::catch_unwind(|| check_against_reference(&fx)) {
            Ok(f) => {
                if f.worst_rel > worst.0 {
                    worst = (f.worst_rel, fx.file);
                }
            }
            Err(_) => failures.push(fx.file),
        }
    }
    eprintln!(
        "worst relative logit difference over all fixtures: {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(
        failures.is_empty(),
        "engine disagrees with transformers on: {failures:?}"
    );
}

// ---------------------------------------------------------------------------
// Mixture of experts
// ---------------------------------------------------------------------------

fn fixture(stem: &str) -> Fixture {
    fixtures()
        .into_iter()
        .find(|f| f.stem() == stem)
        .unwrap_or_else(|| panic!("no fixture {stem}"))
}

/// A Mixtral GGUF as llama.cpp writes one (experts stacked in
/// `ffn_*_exps` tensors, Q/K rows permuted for its RoPE) holds the same
/// F32 values as the `tiny-mixtral-f32` safetensors, so it must match that
/// checkpoint's transformers reference too. (transformers reads no Mixtral
/// GGUF: llama.cpp calls it a llama, whose loader has no experts.)
#[test]
fn mixtral_gguf_with_stacked_experts_matches_the_safetensors_reference() {
    let st = fixture("tiny-mixtral-f32");
    let gguf_fx = Fixture {
        file: "tiny-mixtral-f32.gguf",
        format: gguf(GgmlType::F32),
        ..st
    };
    let (path, _scratch) = gguf_fx.checkpoint("mixtral-gguf");
    let src = ModelSource::open(&path).unwrap();
    for name in ["blk.0.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight"] {
        assert!(src.get(name).is_some(), "{name} is not stacked");
    }
    assert!(src.get("blk.0.ffn_gate.0.weight").is_none());
    drop(src);
    check_against(&gguf_fx, st.reference(), None);
}

/// Routing groups a step's tokens by expert, so an expert's matrices see
/// other rows in a batch than alone: a token's logits must still be the
/// same bits batched, chunked, decoded step by step, and on any thread
/// count (what the scheduler, the prefix cache and disaggregation rely on).
#[test]
fn moe_batching_chunking_and_threads_do_not_change_bits() {
    for stem in [
        "tiny-mixtral-f32",
        "tiny-qwen3moe-q8_0",
        "tiny-qwen2moe-q8_0",
    ] {
        let fx = fixture(stem);
        let (path, _scratch) = fx.checkpoint("moe-bits");
        let src = ModelSource::open(&path).unwrap();
        let m = Model::load(&src, 2).unwrap();
        let prompts: Vec<Vec<u32>> = (0..4)
            .map(|s| {
                (0..(3 + 11 * s))
                    .map(|i| ((i * 131 + s * 17) % 383) as u32 + 1)
                    .collect()
            })
            .collect();
        let alone = common::assert_batching_and_chunking_keep_bits(&m, &prompts, &[1, 5, 17], stem);
        let one = Model::load(&src, 1).unwrap();
        assert!(
            common::same_bits(&common::prompt_logits(&one, &prompts[2]), &alone[2]),
            "{stem}: one thread differs from two"
        );
        // The router's counts: every token of the one forward pass went to
        // `experts_used` experts in each layer, each at most once.
        let moe = src.config.moe.as_ref().unwrap();
        let counts = one.expert_tokens();
        let per_layer = prompts[2].len() as u64;
        assert_eq!(counts.len(), moe.experts, "{stem}");
        assert_eq!(
            counts.iter().sum::<u64>(),
            per_layer * src.config.n_layers as u64 * moe.experts_used as u64,
            "{stem}: {counts:?}"
        );
        assert!(
            counts
                .iter()
                .all(|&c| c <= per_layer * src.config.n_layers as u64),
            "{stem}: {counts:?}"
        );
    }
    // A dense model has no experts to count.
    let (path, _scratch) = fixture("tiny-llama-q4_k").checkpoint("moe-dense");
    let dense = Model::load(&ModelSource::open(&path).unwrap(), 1).unwrap();
    common::prompt_logits(&dense, &[1, 2, 3]);
    assert!(dense.expert_tokens().is_empty());
}

/// What a mixture-of-experts model refuses, each with its reason: more
/// tensor-parallel ranks than experts, an adapter on the MLP it does not
/// have, and a checkpoint missing an expert.
#[test]
fn moe_refusals_name_their_reason() {
    let fx = fixture("tiny-mixtral-f32");
    let (path, _scratch) = fx.checkpoint("moe-refusals");
    let src = ModelSource::open(&path).unwrap();
    let tp = |tp| tandem_engine::shard::ShardSpec { tp, pp: 1, rank: 0 };
    assert!(tp(4).validate(&src.config).is_ok());
    let err = tp(8).validate(&src.config).unwrap_err().to_string();
    assert!(err.contains("4 experts"), "{err}");

    let dir = scratch("moe-lora");
    let _guard = Scratch(dir.clone());
    let m = Model::load(&src, 1).unwrap();
    tandem_model::lora::synth(&src.config, &lora_spec(), &dir).unwrap();
    let a = tandem_model::lora::load(&dir, &src.config).unwrap();
    let err = m.add_adapter("mlp", a).unwrap_err().to_string();
    assert!(err.contains("MLP"), "{err}");
    let attention_only = tandem_model::lora::LoraSynthSpec {
        targets: vec![tandem_model::lora::Target::Q, tandem_model::lora::Target::V],
        ..lora_spec()
    };
    let dir2 = scratch("moe-lora-qv");
    let _guard2 = Scratch(dir2.clone());
    tandem_model::lora::synth(&src.config, &attention_only, &dir2).unwrap();
    let a = tandem_model::lora::load(&dir2, &src.config).unwrap();
    assert_eq!(m.add_adapter("qv", a).unwrap(), 1);
    drop(m);

    // The checkpoint with layer 1's expert 3 down projection misnamed as an
    // expert 9 the config does not have (the bytes stay where they were).
    let cut = scratch("moe-cut");
    let _guard3 = Scratch(cut.clone());
    let bytes = std::fs::read(path.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let map = header.as_object_mut().unwrap();
    let t = map
        .remove("model.layers.1.block_sparse_moe.experts.3.w2.weight")
        .unwrap();
    map.insert(
        "model.layers.1.block_sparse_moe.experts.9.w2.weight".into(),
        t,
    );
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(path.join(f), cut.join(f)).unwrap();
    }
    std::fs::write(cut.join("model.safetensors"), out).unwrap();
    let src = ModelSource::open(&cut).unwrap();
    let err = Model::load(&src, 1)
        .err()
        .expect("a missing expert")
        .to_string();
    assert!(err.contains("blk.1.ffn_down.3.weight"), "{err}");
}

// ---------------------------------------------------------------------------
// LoRA adapters against peft
// ---------------------------------------------------------------------------

/// The adapter the `*.lora-r8.json` references ran with (see the README):
/// `tandem model synth-lora --rank 8 --alpha 16 --targets all --b-std 0.02 --seed 7`.
fn lora_spec() -> tandem_model::lora::LoraSynthSpec {
    tandem_model::lora::LoraSynthSpec {
        rank: 8,
        alpha: 16.0,
        targets: tandem_model::lora::Target::ALL.to_vec(),
        seed: 7,
        b_std: 0.02,
    }
}

/// The attention-only adapter of `*.lora-attn-r8.json`: [`lora_spec`] on
/// q/k/v/o (`--targets q_proj,k_proj,v_proj,o_proj`), what a mixture of
/// experts serves.
fn attention_lora_spec() -> tandem_model::lora::LoraSynthSpec {
    use tandem_model::lora::Target;
    tandem_model::lora::LoraSynthSpec {
        targets: vec![Target::Q, Target::K, Target::V, Target::O],
        ..lora_spec()
    }
}

/// The engine with a LoRA adapter on every projection matches transformers
/// with peft on three checkpoints: safetensors (Hugging Face row order),
/// a llama GGUF (whose Q/K rows llama.cpp permuted, so the adapter's B rows
/// of q_proj and k_proj must be permuted alike) and qwen2 (Q/K/V biases);
/// and an attention-only adapter on a Qwen3-MoE checkpoint.
/// The adapter is regenerated and checked against the sha256 the JSON
/// recorded; a base-model fixture's greedy tokens must differ somewhere,
/// or the test would not show the adapter applied at all.
#[test]
fn lora_adapters_match_peft() {
    let mut failures = Vec::new();
    for (stem, spec, kind) in [
        ("tiny-llama-bf16-2shards", lora_spec(), "lora-r8"),
        ("tiny-llama-q4_k", lora_spec(), "lora-r8"),
        ("tiny-qwen2-q6_k", lora_spec(), "lora-r8"),
        ("tiny-qwen3moe-bf16", attention_lora_spec(), "lora-attn-r8"),
    ] {
        let fx = fixtures()
            .into_iter()
            .find(|f| f.stem() == stem)
            .expect("a base fixture");
        let p = fixtures_dir().join(format!("{stem}.{kind}.json"));
        let reference: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let dir = scratch(&format!("lora-{stem}"));
        let _guard = Scratch(dir.clone());
        let (src_path, _s) = fx.checkpoint("lora-base");
        let src = ModelSource::open(&src_path).unwrap();
        tandem_model::lora::synth(&src.config, &spec, &dir).unwrap();
        for (name, sha) in reference["lora"]["files"].as_object().unwrap() {
            let got = sha256_hex(&std::fs::read(dir.join(name)).unwrap());
            assert_eq!(
                &got,
                sha.as_str().unwrap(),
                "{stem}: adapter file {name} differs from the one peft ran"
            );
        }
        let base = fx.reference();
        let moved = base["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .zip(reference["prompts"].as_array().unwrap())
            .any(|(b, l)| b["greedy"] != l["greedy"]);
        assert!(moved, "{stem}: the adapter changes no greedy token");
        if std::panic::catch_unwind(|| check_against(&fx, reference, Some(&dir))).is_err() {
            failures.push(stem);
        }
    }
    assert!(
        failures.is_empty(),
        "engine with LoRA disagrees with peft on: {failures:?}"
    );
}

// ---------------------------------------------------------------------------
// Tokenizers
// ---------------------------------------------------------------------------

#[test]
fn tokenizers_round_trip_text() {
    let texts = [
        "the word",
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        "  leading spaces, tabs\tand\nnewlines  ",
        "naïve café — Zürich 東京 🙂 1234567890",
    ];
    for fx in fixtures() {
        let (path, _scratch) = fx.checkpoint("tokenizer");
        let src = ModelSource::open(&path).unwrap();
        let tok = src
            .tokenizer()
            .unwrap_or_else(|e| panic!("{}: tokenizer: {e}", fx.file));
        assert_eq!(tok.vocab_size(), src.config.vocab_size, "{}", fx.file);
        assert_eq!(tok.bos_id(), Some(1), "{}", fx.file);
        assert!(tok.eos_ids().contains(&2), "{}", fx.file);
        for text in texts {
            let ids = tok.encode(text, false).unwrap();
            assert!(
                ids.iter().all(|&i| (i as usize) < tok.vocab_size()),
                "{}: {ids:?}",
                fx.file
            );
            assert_eq!(
                tok.decode(&ids, false).unwrap(),
                text,
                "{}: ids {ids:?}",
                fx.file
            );
            // With special tokens added (BOS where the tokenizer adds one)
            // and skipped on decoding, the text still comes back.
            let with = tok.encode(text, true).unwrap();
            if tok.add_bos() {
                assert_eq!(with.first(), Some(&1), "{}: {text:?} -> {with:?}", fx.file);
            }
            assert_eq!(
                tok.decode(&with, true).unwrap(),
                text,
                "{}: ids {with:?}",
                fx.file
            );
        }
        // The vocabulary's merges are used: common words (in both synthetic
        // vocabularies) are one token each.
        let ids = tok.encode("the they", false).unwrap();
        assert_eq!(ids.len(), 2, "{}: {ids:?}", fx.file);
    }
}

// ---------------------------------------------------------------------------
// The generator reproduces the fixtures
// ---------------------------------------------------------------------------

/// Files of a checkpoint: the file itself, or every file in the directory.
fn files_of(path: &Path) -> Vec<(String, PathBuf)> {
    if path.is_file() {
        return vec![(
            path.file_name().unwrap().to_string_lossy().into_owned(),
            path.to_path_buf(),
        )];
    }
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(path)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), e.path())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn synth_reproduces_the_fixtures_byte_for_byte() {
    for fx in fixtures() {
        let fresh = fx.regenerate("repro");
        let _scratch = Scratch(fresh.parent().unwrap().to_path_buf());
        let fresh_files = files_of(&fresh);
        if fx.committed {
            let committed = fixtures_dir().join(fx.file);
            let committed_files = files_of(&committed);
            let names =
                |v: &[(String, PathBuf)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
            assert_eq!(
                names(&fresh_files),
                names(&committed_files),
                "{}: file set differs",
                fx.file
            );
            for ((name, a), (_, b)) in fresh_files.iter().zip(&committed_files) {
                let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
                assert!(
                    a == b,
                    "{}/{name}: `tandem model synth` no longer reproduces the committed fixture ({} vs {} bytes); regenerate the fixtures and their reference JSON (fixtures/synth/README.md)",
                    fx.file,
                    a.len(),
                    b.len()
                );
            }
        }
        // The reference JSON was computed on exactly these bytes.
        let recorded = fx.reference()["files"].as_object().unwrap().clone();
        assert!(
            !recorded.is_empty(),
            "{}: reference records no files",
            fx.file
        );
        for (name, sum) in &recorded {
            let (_, p) = fresh_files
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| {
                    panic!(
                        "{}: reference lists {name}, which synth does not write",
                        fx.file
                    )
                });
            let got = sha256_hex(&std::fs::read(p).unwrap());
            assert_eq!(
                &got,
                sum.as_str().unwrap(),
                "{}/{name}: not the bytes the reference ran on",
                fx.file
            );
        }
    }
}

// ---------------------------------------------------------------------------
// SHA-256 (FIPS 180-4), to check the digests the reference JSON records
// without another dev-dependency.
// ---------------------------------------------------------------------------

fn sha256_hex(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, c) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

#[test]
fn sha256_matches_the_standard_vectors() {
    assert_eq!(
        sha256_hex(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    // Two-block message (padding crosses a block boundary).
    assert_eq!(
        sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
}
