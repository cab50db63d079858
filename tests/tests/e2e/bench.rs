//! `tandem bench serve` against a real cluster: a small, bounded Poisson
//! load on loopback, checked through the JSON it writes and the plots.

use std::process::Command;

use serde_json::Value;
use tandem_tests::{tandem_bin, Cluster};

fn num(v: &Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

#[test]
fn bench_serve_reports_consistent_figures_and_plots() {
    let cluster = Cluster::start(1, 1, 1, &[]);
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("serve.json");
    let plots = dir.path().join("plots");
    let requests = 6usize;
    let out = Command::new(tandem_bin())
        .args(["bench", "serve", "--url", &cluster.base_url()])
        .args(["--dataset", "chat", "--max-tokens", "8"])
        .args(["--requests", &requests.to_string(), "--rate", "3"])
        .args(["--slo-ttft", "30", "--slo-tpot", "5", "--duration", "60"])
        .args(["--request-timeout", "60"])
        .arg("--json")
        .arg(&json_path)
        .arg("--plot-dir")
        .arg(&plots)
        .output()
        .expect("running tandem bench serve");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench serve failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("TTFT ms"), "no figures printed:\n{stdout}");
    let v: Value = serde_json::from_slice(&std::fs::read(&json_path).expect("the JSON file"))
        .expect("valid JSON");
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 1, "one rate, one run");
    let run = &runs[0];
    assert_eq!(num(&run["load"]["rate"], "rate"), 3.0);
    let s = &run["summary"];
    let (n, ok, errors, met) = (
        num(&s["requests"], "requests") as usize,
        num(&s["completed"], "completed") as usize,
        num(&s["errors"], "errors") as usize,
        num(&s["met_slo"], "met_slo") as usize,
    );
    assert_eq!(n, requests, "every request was sent");
    assert_eq!(ok + errors, n, "counts add up");
    assert_eq!(errors, 0, "errors: {}", run["first_errors"]);
    assert!(met <= ok);
    let duration = num(&s["duration_s"], "duration");
    assert!(duration > 0.0 && duration < 60.0, "{duration}");
    let thr = num(&s["request_throughput"], "throughput");
    let goodput = num(&s["goodput"], "goodput");
    assert!((thr - ok as f64 / duration).abs() < 1e-9);
    assert!(
        goodput <= thr + 1e-12,
        "goodput {goodput} > throughput {thr}"
    );
    assert!(num(&s["output_token_throughput"], "tok/s") > 0.0);
    assert!(
        num(&s["mean_input_tokens"], "input") > 0.0,
        "prompt tokens from usage"
    );
    let out_tokens = num(&s["mean_output_tokens"], "output");
    assert!(out_tokens > 0.0 && out_tokens <= 8.0, "{out_tokens}");
    for d in ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"] {
        for k in ["mean", "p50", "p90", "p99"] {
            let x = num(&s[d][k], &format!("{d}.{k}"));
            assert!(x.is_finite() && x >= 0.0, "{d}.{k} = {x}");
        }
        let (p50, p90, p99) = (
            num(&s[d]["p50"], "p50"),
            num(&s[d]["p90"], "p90"),
            num(&s[d]["p99"], "p99"),
        );
        assert!(p50 <= p90 && p90 <= p99, "{d} percentiles out of order");
    }
    assert_eq!(num(&s["ttft_ms"]["n"], "n") as usize, ok);
    assert!(num(&s["ttft_ms"]["p50"], "ttft") <= num(&s["e2e_ms"]["p50"], "e2e"));
    assert_eq!(num(&v["slo"]["ttft_s"], "slo"), 30.0);
    // The router's own latency, read from its /metrics for this run.
    let dispatch = &run["router"]["dispatch"];
    assert!(
        num(&dispatch["count"], "dispatch count") >= requests as f64,
        "router: {}",
        run["router"]
    );
    assert!(num(&dispatch["p99_ms"], "dispatch p99") >= 0.0);
    for png in ["latency_cdf.png", "goodput.png"] {
        let bytes = std::fs::read(plots.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(bytes.len() > 1000, "{png} is nearly empty");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{png} is not a PNG");
    }
}

#[test]
fn bench_serve_refuses_bad_arguments_without_panicking() {
    for args in [
        vec!["--rate", "0"],
        vec!["--requests", "0"],
        vec!["--concurrency", "0"],
        vec!["--slo-tpot", "0"],
        vec!["--long-rate", "nan"],
    ] {
        let out = Command::new(tandem_bin())
            .args(["bench", "serve", "--url", "http://127.0.0.1:9/v1"])
            .args(&args)
            .output()
            .expect("running tandem bench serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error:"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// Settings that cannot work are refused with one line before anything
/// is served: a thread count no machine has (spawning would fail), an
/// empty API key (it would open the API), a block larger than the KV
/// budget (one block is always kept: it would overrun the budget), an etcd
/// address that is no URL, and flags that would be silently ignored or do
/// nothing.
#[test]
fn nodes_refuse_settings_that_cannot_work() {
    let model = tandem_tests::model_path();
    let model = model.to_str().unwrap();
    for (args, code, words) in [
        (
            vec!["generate", "--prompt", "hi", "--threads", "100000"],
            2,
            "at most 1024",
        ),
        (
            vec!["router", "--api-key", " ", "--port", "0"],
            2,
            "would leave the API open",
        ),
        (
            vec![
                "decode",
                "--block-size",
                "100000",
                "--kv-cache-memory",
                "128MiB",
                "--port",
                "0",
                "--cluster-secret",
                "s",
            ],
            1,
            "holds no KV block",
        ),
        (
            vec![
                "decode",
                "--etcd",
                "notaurl",
                "--port",
                "0",
                "--cluster-secret",
                "s",
            ],
            1,
            "has no port (etcd listens on 2379 by default: notaurl:2379)",
        ),
        (
            vec!["up", "--route-policy", "bogus", "--port", "0"],
            2,
            "unknown route policy \"bogus\"",
        ),
        (
            vec!["up", "--speculative-token-cost", "-5", "--port", "0"],
            2,
            "must be between 0 and 10, got -5",
        ),
        (
            vec!["generate", "--prompt", "hi", "--max-tokens", "-1"],
            2,
            "invalid value '-1' for '--max-tokens",
        ),
        (
            vec!["generate", "--prompt", "hi", "--max-tokens", "0"],
            1,
            "goes with --prompt-logprobs",
        ),
        (
            vec!["generate", "--prompt", "hi", "--system", "Be brief."],
            2,
            "--chat",
        ),
        (
            vec![
                "bench",
                "engine",
                "--prompt-tokens",
                "100000",
                "--runs",
                "1",
            ],
            1,
            "--prompt-tokens makes a sequence of 100000 tokens, beyond the model's context of 8192",
        ),
    ] {
        let mut child = Command::new(tandem_bin())
            .args(&args)
            .args(["--model", model])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running tandem");
        // A worker that accepted the sizes would serve for ever: bounded.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{args:?}: still running after 60 s: the sizes were accepted");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(words), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
