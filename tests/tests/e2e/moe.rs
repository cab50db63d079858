//! A mixture-of-experts model served by a disaggregated cluster: a seeded
//! Mixtral-shaped checkpoint (`tandem model synth --shape tiny-moe`, its
//! experts stacked as llama.cpp writes them) prefilled on the prefill tier
//! (its experts split over two ranks) and decoded on the
//! decode tier (two pipeline stages, speculative decoding on) gives exactly
//! what `tandem generate` gives on the plain path, for prompts batched
//! together.

use std::path::Path;
use std::process::Command;

use serde_json::json;
use tandem_tests::{tandem_bin, Cluster, ClusterSpec};

use super::{api_json, counter, generate_json_on, prompts, rt, MAX_TOKENS};

/// Writes the seeded Mixtral GGUF.
fn synth_moe(out: &Path) {
    let o = Command::new(tandem_bin())
        .args(["model", "synth", "--arch", "llama", "--shape", "tiny-moe"])
        .args(["--seed", "5", "--weight-type", "q8_0", "--out"])
        .arg(out)
        .output()
        .expect("running tandem model synth");
    assert!(
        o.status.success(),
        "synth: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The plain path's greedy text for `prompt` on `model`.
fn plain(model: &Path, prompt: &str, max_tokens: u32) -> String {
    let v = generate_json_on(model, prompt, false, max_tokens, &[]);
    v["text"].as_str().unwrap().to_string()
}

#[test]
fn a_mixture_of_experts_model_is_served_disaggregated_as_on_the_plain_path() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny-mixtral.gguf");
    synth_moe(&model);
    let prompts = prompts();
    let want: Vec<String> = prompts
        .iter()
        .map(|p| plain(&model, p, MAX_TOKENS))
        .collect();
    // Alone and long, where drafting pays: prompt lookup finds n-grams.
    let repetitive = "one two three four one two three four one two three four one two";
    let long_want = plain(&model, repetitive, 96);
    assert!(
        want.iter().any(|t| !t.is_empty()),
        "the plain path generated nothing"
    );

    let cluster = Cluster::start_spec(ClusterSpec {
        prefill: 1,
        decode: 1,
        threads: 1,
        model: Some(model.clone()),
        // The prefill worker split by expert over two ranks, the decode
        // worker as two pipeline stages drafting by prompt lookup: none of
        // it may change a token.
        prefill_args: vec!["--tp".into(), "2".into()],
        decode_args: ["--pp", "2", "--speculative-tokens", "4"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    });
    let cluster = &cluster;
    rt().block_on(async {
        let answers = futures_util::future::join_all(prompts.iter().map(|prompt| {
            let body = json!({
                "model": "tiny-mixtral", "prompt": prompt,
                "max_tokens": MAX_TOKENS, "temperature": 0,
            });
            async move { api_json(cluster, "completions", &body).await }
        }))
        .await;
        for ((prompt, want), v) in prompts.iter().zip(&want).zip(&answers) {
            assert_eq!(v["choices"][0]["text"], want.as_str(), "{prompt:?}: {v}");
        }
        let remote = r#"tandem_router_dispatched_total{prefill="remote"}"#;
        assert_eq!(
            counter(&cluster.router, remote).await,
            prompts.len() as f64,
            "every prompt was prefilled on the prefill tier"
        );
        let body = json!({
            "model": "tiny-mixtral", "prompt": repetitive, "max_tokens": 96, "temperature": 0,
        });
        let v = api_json(cluster, "completions", &body).await;
        assert_eq!(v["choices"][0]["text"], long_want.as_str());
        // Workers publish engine counters once a second.
        let mut drafted = 0.0;
        for _ in 0..30 {
            drafted = counter(&cluster.decode[0], "tandem_spec_decode_draft_tokens_total").await;
            if drafted > 0.0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert!(drafted > 0.0, "the decode worker drafted no token");

        // The router's spread over the experts: the prefill worker (tensor
        // ranks, every layer on rank 0) sent each prompt token it computed
        // to 2 of the 4 experts in each of the 2 layers.
        let prefill = &cluster.prefill[0];
        let expert = |e: usize| format!(r#"tandem_moe_expert_tokens_total{{expert="{e}"}}"#);
        let mut seen = (0.0, 0.0);
        for _ in 0..30 {
            let computed = counter(prefill, "tandem_prompt_tokens_computed_total").await;
            let routed = counter(prefill, "tandem_moe_expert_tokens_total").await;
            seen = (computed, routed);
            if computed > 0.0 && routed == computed * 2.0 * 2.0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert!(
            seen.0 > 0.0 && seen.1 == seen.0 * 4.0,
            "computed, routed: {seen:?}"
        );
        let mut per_expert = Vec::new();
        for e in 0..4 {
            per_expert.push(counter(prefill, &expert(e)).await);
        }
        assert_eq!(per_expert.iter().sum::<f64>(), seen.1, "{per_expert:?}");
        assert!(
            per_expert.iter().all(|&n| n <= seen.0 * 2.0),
            "{per_expert:?}"
        );
        assert!(
            counter(&cluster.decode[0], "tandem_moe_expert_tokens_total").await > 0.0,
            "the decode worker counts its experts too"
        );
    });
}
