//! LoRA adapters served by a cluster: a request names an adapter as its
//! `model`, runs with it on both tiers (the prefill worker's KV and the
//! decode worker's tokens), shares batches with base-model requests, and
//! gets exactly what `tandem generate --lora` gives on the plain path.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use tandem_cluster::Role;
use tandem_proto::worker as w;
use tandem_tests::{model_path, tandem_bin, Cluster, ClusterSpec, SECRET};

use super::{
    api_chunks, api_json, counter, generate_plain_with, greedy_request, grpc_client, model_name,
    prompts, rt, MAX_TOKENS,
};

/// Writes a seeded adapter for the default model with `tandem model synth-lora`.
fn synth_adapter(dir: &Path, targets: &str, b_std: &str, seed: u64) {
    let out = Command::new(tandem_bin())
        .args(["model", "synth-lora", "--rank", "8", "--alpha", "16"])
        .args(["--targets", targets, "--b-std", b_std])
        .arg("--seed")
        .arg(seed.to_string())
        .arg("--model")
        .arg(model_path())
        .arg("--out")
        .arg(dir)
        .output()
        .expect("running tandem model synth-lora");
    assert!(
        out.status.success(),
        "synth-lora: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two adapters: one on every projection, one on q and v only.
fn adapters(tmp: &Path) -> [(&'static str, PathBuf); 2] {
    let all = tmp.join("all");
    let qv = tmp.join("qv");
    synth_adapter(&all, "all", "0.1", 3);
    synth_adapter(&qv, "q_proj,v_proj", "0.3", 4);
    [("sql", all), ("chat", qv)]
}

fn lora_flags(adapters: &[(&str, PathBuf)]) -> Vec<String> {
    adapters
        .iter()
        .flat_map(|(name, dir)| ["--lora".to_string(), format!("{name}={}", dir.display())])
        .collect()
}

/// The plain path's greedy text for `prompt`, with the adapter in `dir`.
fn plain(prompt: &str, dir: Option<&Path>) -> String {
    let extra: Vec<String> = match dir {
        Some(d) => vec!["--lora".into(), d.display().to_string()],
        None => vec![],
    };
    generate_plain_with(prompt, false, MAX_TOKENS, &extra).0
}

#[test]
fn adapters_are_served_by_name_on_both_tiers_as_on_the_plain_path() {
    let tmp = tempfile::tempdir().unwrap();
    let adapters = adapters(tmp.path());
    let prompts: Vec<String> = prompts()[1..].to_vec();
    // (model, prompt) → the plain path's text.
    let mut cases: Vec<(String, String, String)> = Vec::new();
    for p in &prompts {
        cases.push((model_name(), p.clone(), plain(p, None)));
        for (name, dir) in &adapters {
            cases.push((name.to_string(), p.clone(), plain(p, Some(dir))));
        }
    }
    for c in cases.chunks(3) {
        assert!(
            c[0].2 != c[1].2 && c[0].2 != c[2].2,
            "an adapter leaves {:?} unchanged",
            c[0].1
        );
    }

    let cluster = Cluster::start_spec(ClusterSpec {
        prefill: 1,
        decode: 1,
        threads: 1,
        worker_args: lora_flags(&adapters),
        ..Default::default()
    });
    let cluster = &cluster;
    rt().block_on(async {
        let http = reqwest::Client::new();
        let models: Value = http
            .get(format!("{}/models", cluster.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ids: Vec<&str> = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [model_name().as_str(), "chat", "sql"], "{models}");
        assert_eq!(models["data"][2]["parent"], model_name().as_str());

        // All at once: base and adapter requests share the decode batch.
        let answers = futures_util::future::join_all(cases.iter().map(|(model, prompt, _)| {
            let body = json!({
                "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            });
            async move { api_json(cluster, "completions", &body).await }
        }))
        .await;
        for ((model, prompt, want), v) in cases.iter().zip(&answers) {
            assert_eq!(v["model"], model.as_str());
            assert_eq!(
                v["choices"][0]["text"],
                want.as_str(),
                "{model} on {prompt:?}"
            );
        }
        let remote = r#"tandem_router_dispatched_total{prefill="remote"}"#;
        assert_eq!(
            counter(&cluster.router, remote).await,
            cases.len() as f64,
            "every prompt was prefilled on the prefill tier"
        );

        let per_adapter = r#"tandem_router_lora_requests_total{adapter="sql"}"#;
        assert_eq!(
            counter(&cluster.router, per_adapter).await,
            prompts.len() as f64
        );

        // The same prompt again per model: from each adapter's own cache.
        for (model, prompt, want) in &cases[..3] {
            let body = json!({
                "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            });
            let v = api_json(cluster, "completions", &body).await;
            assert_eq!(v["choices"][0]["text"], want.as_str(), "{model}, again");
        }

        // Chat, streamed or not, and Anthropic's Messages API name it too.
        let chat = json!({
            "model": "chat", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Name a colour."}],
        });
        let whole = api_json(cluster, "chat/completions", &chat).await;
        assert_eq!(whole["model"], "chat");
        let mut streamed = chat.clone();
        streamed["stream"] = json!(true);
        let chunks = api_chunks(cluster, "chat/completions", &streamed).await;
        assert!(chunks.iter().all(|c| c["model"] == "chat"));
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(
            text,
            whole["choices"][0]["message"]["content"].as_str().unwrap()
        );
        let msg = api_json(cluster, "messages", &chat).await;
        assert_eq!(msg["model"], "chat", "{msg}");
        assert_eq!(
            msg["content"][0]["text"],
            whole["choices"][0]["message"]["content"]
        );

        // gRPC names the adapter the same way.
        let mut client = grpc_client(cluster).await;
        let mut req = greedy_request(&cases[1].1);
        req.model = cases[1].0.clone();
        let r = client.generate(req).await.expect("Generate").into_inner();
        assert_eq!(r.text, cases[1].2);

        // An adapter nobody serves is an unknown model.
        let r = http
            .post(format!("{}/chat/completions", cluster.base_url()))
            .json(&json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");

        // A worker asked directly for an adapter it lacks says so.
        let mut c = w::WorkerClient::connect(format!("http://{}", cluster.decode[0].addr()))
            .await
            .unwrap();
        let mut req = tonic::Request::new(w::CachedPrefixRequest {
            tokens: vec![1, 2, 3],
            adapter: "nope".into(),
        });
        req.metadata_mut()
            .insert(w::SECRET_METADATA, SECRET.parse().unwrap());
        let e = c.cached_prefix(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("served: sql, chat"), "{}", e.message());
    });
}

/// A prefill worker without the adapter is not given its prompts: the
/// decode worker that has it prefills them itself, and the answer is the
/// plain path's.
#[test]
fn an_adapter_only_the_decode_tier_has_is_prefilled_there() {
    let tmp = tempfile::tempdir().unwrap();
    let adapters = adapters(tmp.path());
    let prompt = prompts()[1].clone();
    let want = plain(&prompt, Some(&adapters[0].1));
    let cluster = Cluster::start_spec(ClusterSpec {
        prefill: 1,
        decode: 1,
        threads: 1,
        decode_args: lora_flags(&adapters[..1]),
        ..Default::default()
    });
    rt().block_on(async {
        let body = json!({
            "model": "sql", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
        });
        let v = api_json(&cluster, "completions", &body).await;
        assert_eq!(v["choices"][0]["text"], want.as_str());
        let local = r#"tandem_router_dispatched_total{prefill="local"}"#;
        assert_eq!(counter(&cluster.router, local).await, 1.0);
        // The base model still goes to the prefill tier.
        let body = json!({"prompt": prompt, "max_tokens": 2});
        api_json(&cluster, "completions", &body).await;
        let remote = r#"tandem_router_dispatched_total{prefill="remote"}"#;
        assert_eq!(counter(&cluster.router, remote).await, 1.0);
    });
}

/// `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (vLLM's): an
/// adapter loaded while the cluster serves runs on both tiers with the
/// plain path's output; one loaded while a worker is down, and those
/// loaded before, reach that worker when it restarts without them; once
/// unloaded an adapter is an unknown model. Bad loads change nothing.
#[test]
fn adapters_load_and_unload_while_the_cluster_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("all");
    synth_adapter(&dir, "all", "0.1", 3);
    let qv_dir = tmp.path().join("qv");
    synth_adapter(&qv_dir, "q_proj,v_proj", "0.3", 4);
    let prompt = prompts()[1].clone();
    let want = plain(&prompt, Some(&dir));
    let want_qv = plain(&prompt, Some(&qv_dir));
    assert_ne!(want, plain(&prompt, None), "the adapter changes the answer");
    let spec = ClusterSpec {
        prefill: 1,
        decode: 1,
        threads: 1,
        router_args: vec!["--allow-runtime-lora".into()],
        ..Default::default()
    };
    let mut cluster = Cluster::start_spec(spec.clone());
    let base = cluster.base_url();
    let http = reqwest::Client::new();
    let post = |route: &str, body: Value| {
        let req = http.post(format!("{base}/{route}")).json(&body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let models = || {
        let req = http.get(format!("{base}/models"));
        async move {
            let v: Value = req.send().await.unwrap().json().await.unwrap();
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    let sql = json!({"model": "sql", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0});
    let load = json!({"lora_name": "sql", "lora_path": dir.display().to_string()});
    rt().block_on(async {
        assert_eq!(models().await, [model_name()]);
        assert_eq!(
            post("load_lora_adapter", load.clone()).await,
            (200, "Success: LoRA adapter 'sql' added successfully.".to_string())
        );
        assert_eq!(models().await, [model_name(), "sql".to_string()]);
        let (status, body) = post("completions", sql.clone()).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["choices"][0]["text"], want.as_str());
        let remote = r#"tandem_router_dispatched_total{prefill="remote"}"#;
        assert_eq!(counter(&cluster.router, remote).await, 1.0, "prefilled on the prefill tier");

        // Refused, and nothing changes: a name in use, a directory
        // without an adapter, the served model's name, a field not read.
        let (status, body) = post("load_lora_adapter", load.clone()).await;
        assert_eq!(status, 400);
        assert!(body.contains("loaded already"), "{body}");
        let missing = json!({"lora_name": "other", "lora_path": tmp.path().join("none").display().to_string()});
        let (status, body) = post("load_lora_adapter", missing).await;
        assert_eq!(status, 400);
        assert!(body.contains("adapter_config.json"), "{body}");
        let shadow = json!({"lora_name": model_name(), "lora_path": dir.display().to_string()});
        assert_eq!(post("load_lora_adapter", shadow).await.0, 400);
        let mut extra = load.clone();
        extra["load_inplace"] = json!(true);
        assert_eq!(post("load_lora_adapter", extra).await.0, 400);
        assert_eq!(models().await, [model_name(), "sql".to_string()]);
    });

    // The decode worker dies. While it is down a second adapter loads
    // (on the prefill worker); the worker restarts at its address without
    // either, and the router loads both there.
    let port = cluster.decode[0].addr().port();
    cluster.decode[0].kill();
    rt().block_on(async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let healthy = r#"tandem_router_workers_healthy{worker_role="decode"}"#;
        while counter(&cluster.router, healthy).await > 0.0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the router never saw the worker go"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let load_qv = json!({"lora_name": "qv", "lora_path": qv_dir.display().to_string()});
        let (status, body) = post("load_lora_adapter", load_qv).await;
        assert_eq!(
            status, 200,
            "a worker that is down does not stop a load: {body}"
        );
    });
    cluster.decode[0] = Cluster::worker_at(&spec, Role::Decode, port);
    rt().block_on(async {
        let qv =
            json!({"model": "qv", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0});
        for (body, want, name) in [(&sql, &want, "sql"), (&qv, &want_qv, "qv")] {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            let answer = loop {
                let (status, answer) = post("completions", body.clone()).await;
                if status == 200 {
                    break answer;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the restarted worker never served {name}: {status} {answer}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            };
            let v: Value = serde_json::from_str(&answer).unwrap();
            assert_eq!(
                v["choices"][0]["text"],
                want.as_str(),
                "{name} after the restart"
            );
        }

        let unload = json!({"lora_name": "sql"});
        assert_eq!(
            post("unload_lora_adapter", unload.clone()).await,
            (
                200,
                "Success: LoRA adapter 'sql' removed successfully.".to_string()
            )
        );
        assert_eq!(models().await, [model_name(), "qv".to_string()]);
        let (status, body) = post("completions", sql.clone()).await;
        assert_eq!(status, 404, "{body}");
        assert!(body.contains("model_not_found"), "{body}");
        assert_eq!(post("unload_lora_adapter", unload).await.0, 404);
        // Loaded again, the same answer.
        assert_eq!(post("load_lora_adapter", load).await.0, 200);
        let (_, body) = post("completions", sql).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["choices"][0]["text"], want.as_str(), "loaded again");
    });
}

/// An adapter a worker serves from its `--lora` flag, unloaded through the
/// API, stays unloaded when that worker restarts (the flag loads it
/// again, and the router unloads it there).
#[test]
fn an_adapter_unloaded_at_run_time_stays_unloaded_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("qv");
    synth_adapter(&dir, "q_proj,v_proj", "0.3", 4);
    let spec = ClusterSpec {
        prefill: 1,
        decode: 1,
        threads: 1,
        worker_args: lora_flags(&[("chat", dir)]),
        router_args: vec!["--allow-runtime-lora".into()],
        ..Default::default()
    };
    let mut cluster = Cluster::start_spec(spec.clone());
    let base = cluster.base_url();
    rt().block_on(async {
        let r = reqwest::Client::new()
            .post(format!("{base}/unload_lora_adapter"))
            .json(&json!({"lora_name": "chat"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    });
    let port = cluster.decode[0].addr().port();
    cluster.decode[0].kill();
    cluster.decode[0] = Cluster::worker_at(&spec, Role::Decode, port);
    rt().block_on(async {
        // The restarted worker loads `chat` from its flag; the router,
        // seeing it back, unloads it there.
        let mut c = w::WorkerClient::connect(format!("http://{}", cluster.decode[0].addr()))
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let mut req = tonic::Request::new(w::LoadRequest {});
            req.metadata_mut()
                .insert(w::SECRET_METADATA, SECRET.parse().unwrap());
            let report = c.load(req).await.unwrap().into_inner();
            if report.adapters.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the restarted worker still serves {:?}",
                report.adapters
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        // The router takes the worker's answer to its unload a moment
        // after the worker has acted on it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let r = reqwest::Client::new()
                .post(format!("{base}/completions"))
                .json(&json!({"model": "chat", "prompt": "Hi", "max_tokens": 2}))
                .send()
                .await
                .unwrap();
            if r.status() == 404 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the router still routes to chat: {}",
                r.status()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
}
