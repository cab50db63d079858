//! The `tandem` binary as a user meets it: real process, real model, exit
//! codes and messages on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tandem_model::gguf::{write_gguf, GgufFile, GgufTensorOut, MetaValue};
use tandem_model::quant::GgmlType;

fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .output()
        .expect("run tandem")
}

fn model() -> PathBuf {
    let p = tandem_model::default_model_path();
    assert!(
        p.exists(),
        "default model missing at {}: run `tandem model fetch`",
        p.display()
    );
    p
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `generate` on `model` and expects a clean failure mentioning `needle`.
fn expect_failure(model: &Path, needle: &str) {
    let o = tandem(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-tokens",
        "2",
    ]);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "expected failure for {}",
        model.display()
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "a clean error exit, not a crash: {err}"
    );
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "message should mention '{needle}': {err}"
    );
}

#[test]
fn generate_json_is_one_line_and_greedy_is_repeatable() {
    let m = model();
    let args = [
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
        "--json",
        "--threads",
        "2",
    ];
    let a = tandem(&args);
    assert!(a.status.success(), "{}", stderr(&a));
    let out = String::from_utf8(a.stdout.clone()).unwrap();
    assert_eq!(out.lines().count(), 1, "{out}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let ids = j["token_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 8);
    assert!(j["prompt_tokens"].as_u64().unwrap() >= 5);
    assert!(!j["text"].as_str().unwrap().is_empty());
    let b = tandem(&args);
    assert_eq!(a.stdout, b.stdout, "greedy generation must be repeatable");
    // One thread gives the same tokens.
    let mut one = args.to_vec();
    let last = one.len() - 1;
    one[last] = "1";
    assert_eq!(tandem(&one).stdout, a.stdout);
}

#[test]
fn chat_mode_answers() {
    let m = model();
    let o = tandem(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--chat",
        "--prompt",
        "What is 2+2?",
        "--max-tokens",
        "12",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // The ChatML template wraps the question: far more tokens than the question alone.
    assert!(j["prompt_tokens"].as_u64().unwrap() > 20, "{j}");
}

#[test]
fn missing_model_file() {
    expect_failure(Path::new("/nonexistent/model.gguf"), "cannot open");
}

#[test]
fn truncated_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(model()).unwrap();
    for cut in [3usize, 64, 4096, bytes.len() / 2, bytes.len() - 1] {
        let p = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        expect_failure(&p, "truncated");
    }
}

#[test]
fn corrupted_magic() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(model()).unwrap();
    bytes[0] = b'X';
    let p = dir.path().join("bad.gguf");
    std::fs::write(&p, &bytes).unwrap();
    expect_failure(&p, "not a valid GGUF");
}

/// A small GGUF with the given architecture name and one Q8_0 tensor.
fn tiny_gguf(path: &Path, arch: &str) {
    let meta = vec![
        (
            "general.architecture".to_string(),
            MetaValue::String(arch.into()),
        ),
        (format!("{arch}.block_count"), MetaValue::U32(1)),
    ];
    let t = GgufTensorOut {
        name: "token_embd.weight".into(),
        ty: GgmlType::Q8_0,
        dims: vec![32, 4],
        bytes: vec![0; 34 * 4],
    };
    write_gguf(path, &meta, &[t]).unwrap();
}

#[test]
fn unknown_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("gptx.gguf");
    tiny_gguf(&p, "gptx");
    expect_failure(&p, "unsupported architecture 'gptx'");
}

#[test]
fn unsupported_quant_type() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q5_0.gguf");
    tiny_gguf(&p, "llama");
    // Patch the tensor's type from Q8_0 (8) to Q5_0 (6): it follows the name and dims.
    let mut bytes = std::fs::read(&p).unwrap();
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let ty_off = at + 4 + 2 * 8;
    assert_eq!(
        u32::from_le_bytes(bytes[ty_off..ty_off + 4].try_into().unwrap()),
        8
    );
    bytes[ty_off..ty_off + 4].copy_from_slice(&6u32.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    assert!(GgufFile::open(&p).is_err());
    expect_failure(&p, "Q5_0");
}

#[test]
fn prompt_longer_than_the_context() {
    let m = model();
    let prompt = "word ".repeat(9000);
    let o = tandem(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        &prompt,
        "--max-tokens",
        "1",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("context length"), "{err}");
}

#[test]
fn every_kernel_tier_gives_the_same_tokens() {
    // The dispatch is forced by TANDEM_KERNEL; tiers this CPU lacks fall back
    // (with a warning), which still must not change a single token.
    let m = model();
    let run = |kernel: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args([
                "generate",
                "--model",
                m.to_str().unwrap(),
                "--prompt",
                "Rust is a language that",
                "--max-tokens",
                "6",
                "--json",
                "--threads",
                "2",
            ])
            .env("TANDEM_KERNEL", kernel)
            .output()
            .unwrap();
        assert!(o.status.success(), "{kernel}: {}", stderr(&o));
        o.stdout
    };
    let scalar = run("scalar");
    assert_eq!(run("avx2"), scalar, "avx2 differs from scalar");
    assert_eq!(run("avx512"), scalar, "avx512 differs from scalar");
}

#[test]
fn interactive_chat_reads_turns_from_the_terminal() {
    use std::io::Write;
    use std::process::Stdio;
    let m = model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--chat",
            "--max-tokens",
            "6",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Two turns, then an empty line to quit.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello!\nWhat is 2+2?\n\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out.lines().filter(|l| !l.trim().is_empty()).count(),
        2,
        "one reply per turn: {out:?}"
    );
    // Piped text without --chat is one raw prompt.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--max-tokens",
            "4",
            "--json",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Once upon a time")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["prompt_tokens"], 4);
}
