//! End to end: real `tandem` processes (router, prefill and decode workers)
//! on loopback, driven by a real HTTP client and a real gRPC client.

use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tandem_proto::generate as g;
use tandem_proto::worker as w;
use tandem_tests::{model_path, tandem_bin, Cluster, ClusterSpec, Node, SECRET};

#[path = "e2e/bench.rs"]
mod bench;
#[path = "e2e/dashboard.rs"]
mod dashboard;
#[path = "e2e/lora.rs"]
mod lora;
#[path = "e2e/membership.rs"]
mod membership;
#[path = "e2e/moe.rs"]
mod moe;
#[path = "e2e/operations.rs"]
mod operations;
#[path = "e2e/sampling.rs"]
mod sampling;
#[path = "e2e/sharding.rs"]
mod sharding;

const MAX_TOKENS: u32 = 20;

/// Prompts of several shapes: shorter than a block, several blocks, and
/// two sharing a multi-block prefix.
fn prompts() -> Vec<String> {
    let shared = "You are a careful assistant. Answer briefly and precisely, using plain words, \
                  and never invent facts you are not sure of.";
    vec![
        "The capital of France is".to_string(),
        "Here is a short story about a robot who learns to paint. Once upon a time, in a small \
         workshop at the edge of a busy harbour town, there lived a robot named"
            .to_string(),
        format!("{shared} Question: What is the boiling point of water at sea level? Answer:"),
        format!("{shared} Question: Why is the sky blue? Answer:"),
    ]
}

/// `tandem generate --json` on the same model: the plain path.
fn generate_plain(prompt: &str, chat: bool) -> (String, Vec<u32>, u64) {
    generate_plain_with(prompt, chat, MAX_TOKENS, &[])
}

/// [`generate_plain`] with up to `max_tokens` and more `tandem generate`
/// arguments.
fn generate_plain_with(
    prompt: &str,
    chat: bool,
    max_tokens: u32,
    extra: &[String],
) -> (String, Vec<u32>, u64) {
    let v = generate_json(prompt, chat, max_tokens, extra);
    let ids = token_ids(&v);
    (
        v["text"].as_str().unwrap().to_string(),
        ids,
        v["prompt_tokens"].as_u64().unwrap(),
    )
}

/// The `token_ids` of `tandem generate --json`'s output.
fn token_ids(v: &Value) -> Vec<u32> {
    v["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

/// What `tandem generate --json` prints for `prompt` (one thread).
fn generate_json(prompt: &str, chat: bool, max_tokens: u32, extra: &[String]) -> Value {
    generate_json_on(&model_path(), prompt, chat, max_tokens, extra)
}

/// [`generate_json`] on the model at `model`.
fn generate_json_on(
    model: &std::path::Path,
    prompt: &str,
    chat: bool,
    max_tokens: u32,
    extra: &[String],
) -> Value {
    let mut cmd = Command::new(tandem_bin());
    cmd.args(["generate", "--json", "--threads", "1", "--max-tokens"])
        .arg(max_tokens.to_string())
        .arg("--model")
        .arg(model)
        .args(["--prompt", prompt]);
    if chat {
        cmd.arg("--chat");
    }
    cmd.args(extra);
    let out = cmd.output().expect("running tandem generate");
    assert!(
        out.status.success(),
        "tandem generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("generate --json output")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn grpc_client(c: &Cluster) -> g::GenerateClient<tonic::transport::Channel> {
    g::GenerateClient::connect(format!("http://{}", c.router.addr()))
        .await
        .expect("connecting to the router over gRPC")
}

fn greedy_request(prompt: &str) -> g::GenerateRequest {
    g::GenerateRequest {
        model: String::new(),
        input: Some(g::Input::Text(prompt.to_string())),
        sampling: Some(g::SamplingParams {
            max_tokens: Some(MAX_TOKENS),
            temperature: Some(0.0),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

/// Token ids and text of each prompt through the router's gRPC API.
async fn via_grpc(c: &Cluster, prompts: &[String]) -> Vec<(String, Vec<u32>, u32)> {
    let mut client = grpc_client(c).await;
    let mut out = Vec::new();
    for p in prompts {
        let r = client
            .generate(greedy_request(p))
            .await
            .expect("Generate")
            .into_inner();
        let usage = r.usage.expect("usage");
        assert_eq!(usage.completion_tokens as usize, r.token_ids.len());
        out.push((r.text, r.token_ids, usage.prompt_tokens));
    }
    out
}

#[test]
fn greedy_output_is_the_same_disaggregated_colocated_and_in_process() {
    let prompts = prompts();
    let plain: Vec<_> = prompts.iter().map(|p| generate_plain(p, false)).collect();
    let rt = rt();
    let disagg = Cluster::start(1, 1, 1, &[]);
    let d = rt.block_on(via_grpc(&disagg, &prompts));
    // Run them again: now the prefill worker's prefix cache holds them.
    let d2 = rt.block_on(via_grpc(&disagg, &prompts));
    // All of them as one batch of prompts over the OpenAI API, echoed.
    let batch = rt.block_on(api_json(
        &disagg,
        "completions",
        &json!({
            "model": model_name(),
            "prompt": prompts,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "echo": true,
        }),
    ));
    drop(disagg);
    // One prefill and one decode worker, the decode worker started with `args`.
    let disagg_with = |args: [&str; 2]| {
        Cluster::start_spec(ClusterSpec {
            prefill: 1,
            decode: 1,
            threads: 1,
            decode_args: args.map(String::from).to_vec(),
            ..Default::default()
        })
    };
    // The KV above moved through shared memory (both workers on one host);
    // a decode worker that declines it gets the payload on the socket.
    let on_socket = disagg_with(["--kv-shared-memory", "false"]);
    let s = rt.block_on(via_grpc(&on_socket, &prompts));
    drop(on_socket);
    // A decode worker that takes KV over gRPC, on its one port.
    let over_grpc = disagg_with(["--kv-transport", "grpc"]);
    assert_eq!(
        over_grpc.decode[0].ready.kv,
        Some(over_grpc.decode[0].addr()),
        "gRPC KV comes to the node's own port"
    );
    let g = rt.block_on(via_grpc(&over_grpc, &prompts));
    let received = rt.block_on(counter(
        &over_grpc.decode[0],
        "tandem_kv_transfer_bytes_total{direction=\"received\"}",
    ));
    drop(over_grpc);
    assert!(received > 0.0, "no KV came over gRPC");
    let colocated = Cluster::start(0, 1, 2, &[]);
    let c = rt.block_on(via_grpc(&colocated, &prompts));
    drop(colocated);
    for (i, p) in prompts.iter().enumerate() {
        let (text, ids, n_prompt) = &plain[i];
        assert!(!ids.is_empty(), "no tokens for {p:?}");
        assert_eq!(&d[i].1, ids, "disaggregated tokens differ for {p:?}");
        assert_eq!(
            &d2[i].1, ids,
            "disaggregated (cached) tokens differ for {p:?}"
        );
        assert_eq!(
            &s[i].1, ids,
            "tokens differ with KV on the socket for {p:?}"
        );
        assert_eq!(&g[i].1, ids, "tokens differ with KV over gRPC for {p:?}");
        assert_eq!(&c[i].1, ids, "colocated tokens differ for {p:?}");
        assert_eq!(&d[i].0, text, "disaggregated text differs for {p:?}");
        assert_eq!(batch["choices"][i]["index"], i);
        assert_eq!(
            batch["choices"][i]["text"],
            format!("{p}{text}"),
            "batched text differs for {p:?}"
        );
        assert_eq!(d[i].2 as u64, *n_prompt, "prompt token count for {p:?}");
    }
}

/// Speculative decoding on the decode worker changes no token: greedy
/// prompts over gRPC, a chat answer that repeats its prompt (where drafts
/// are kept), and a seeded sampled answer all equal `tandem generate`; the
/// decode worker reports the drafts it verified and kept.
#[test]
fn speculative_decoding_gives_the_plain_paths_tokens() {
    let prompts = prompts();
    let plain: Vec<_> = prompts.iter().map(|p| generate_plain(p, false)).collect();
    let echo = "Repeat this sentence three times, one per line: The river flows \
                quietly past the old stone mill.";
    let (echo_text, echo_ids, _) = generate_plain_with(echo, true, 64, &[]);
    let sampled_args = ["--temperature", "0.8", "--seed", "5"].map(String::from);
    let (sampled_text, _, _) = generate_plain_with(echo, true, 64, &sampled_args);
    let rt = rt();
    let cluster = Cluster::start_spec(ClusterSpec {
        prefill: 1,
        decode: 1,
        threads: 1,
        decode_args: ["--speculative-tokens", "5", "--speculative-ngram", "1..3"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    });
    let got = rt.block_on(via_grpc(&cluster, &prompts));
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(got[i].1, plain[i].1, "tokens differ for {p:?}");
    }
    rt.block_on(async {
        let chat = |extra: Value| {
            let mut body = json!({
                "model": model_name(),
                "messages": [{"role": "user", "content": echo}],
                "max_tokens": 64,
            });
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            body
        };
        let v = api_json(
            &cluster,
            "chat/completions",
            &chat(json!({"temperature": 0})),
        )
        .await;
        assert_eq!(v["choices"][0]["message"]["content"], echo_text.as_str());
        assert_eq!(v["usage"]["completion_tokens"], echo_ids.len());
        // Streamed, the pieces of a step with kept drafts still add up.
        let chunks = api_chunks(
            &cluster,
            "chat/completions",
            &chat(json!({"temperature": 0, "stream": true})),
        )
        .await;
        let streamed: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(streamed, echo_text);
        let v = api_json(
            &cluster,
            "chat/completions",
            &chat(json!({"temperature": 0.8, "seed": 5})),
        )
        .await;
        assert_eq!(v["choices"][0]["message"]["content"], sampled_text.as_str());
        // Workers publish engine counters once a second.
        let decode = &cluster.decode[0];
        let (mut drafted, mut kept) = (0.0, 0.0);
        for _ in 0..30 {
            drafted = counter(decode, "tandem_spec_decode_draft_tokens_total").await;
            kept = counter(decode, "tandem_spec_decode_accepted_tokens_total").await;
            if kept > 0.0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert!(
            drafted > 0.0 && kept > 0.0,
            "drafted {drafted}, kept {kept}"
        );
        assert!(kept <= drafted);
    });
}

#[test]
fn chat_over_http_matches_generate_and_streaming_matches_unary() {
    let q = "What is the tallest mountain on Earth?";
    let (plain_text, plain_ids, plain_prompt) = generate_plain(q, true);
    let cluster = Cluster::start(1, 1, 1, &[]);
    let url = format!("{}/chat/completions", cluster.base_url());
    let body = json!({
        "model": model_name(),
        "messages": [{"role": "user", "content": q}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    });
    rt().block_on(async {
        let http = reqwest::Client::new();
        let r = http.post(&url).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(text, plain_text.trim_start_matches(' '), "chat text");
        assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap(), plain_prompt);
        assert_eq!(
            v["usage"]["completion_tokens"].as_u64().unwrap(),
            plain_ids.len() as u64
        );
        assert_eq!(
            v["usage"]["total_tokens"].as_u64().unwrap(),
            plain_prompt + plain_ids.len() as u64
        );

        // The same request streamed.
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        sbody["stream_options"] = json!({"include_usage": true});
        let r = http.post(&url).json(&sbody).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let events = sse_events(r).await;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let mut streamed = String::new();
        let mut usage = None;
        let mut finish = None;
        for e in &events[..events.len() - 1] {
            let v: Value = serde_json::from_str(e).unwrap();
            assert_eq!(v["object"], "chat.completion.chunk");
            if let Some(c) = v["choices"].as_array().and_then(|c| c.first()) {
                if let Some(t) = c["delta"]["content"].as_str() {
                    streamed.push_str(t);
                }
                if !c["finish_reason"].is_null() {
                    finish = Some(c["finish_reason"].clone());
                }
            }
            if !v["usage"].is_null() {
                usage = Some(v["usage"].clone());
            }
        }
        assert_eq!(streamed, text, "streamed text differs from the unary reply");
        assert_eq!(finish, Some(v["choices"][0]["finish_reason"].clone()));
        let usage = usage.expect("a usage chunk");
        for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            assert_eq!(usage[k], v["usage"][k], "usage chunk: {k}");
        }
    });
}

/// The served model name: the model file's stem.
fn model_name() -> String {
    model_path()
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// A non-streamed answer of the OpenAI API at `route` (`completions` or
/// `chat/completions`), which must be 200.
async fn api_json(c: &Cluster, route: &str, body: &Value) -> Value {
    api_post(c, route, body).await.json().await.unwrap()
}

/// Posts `body` to the OpenAI API at `route`; the answer must be 200.
async fn api_post(c: &Cluster, route: &str, body: &Value) -> reqwest::Response {
    let r = reqwest::Client::new()
        .post(format!("{}/{route}", c.base_url()))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{body}");
    r
}

/// The chunks of a streamed answer of the OpenAI API at `route`, which
/// must be 200, parsed, without the closing `[DONE]`.
async fn api_chunks(c: &Cluster, route: &str, body: &Value) -> Vec<Value> {
    sse_events(api_post(c, route, body).await)
        .await
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

/// Checks JSON-mode output: an object's start, and a whole object when it
/// stopped (`finish`). Returns whether it was whole.
fn check_json_object(text: &str, finish: &Value) -> bool {
    assert!(text.trim_start().starts_with('{'), "{text:?}");
    if finish != "stop" {
        return false;
    }
    let parsed: Value = serde_json::from_str(text).expect("a whole JSON text");
    assert!(parsed.is_object(), "{text:?}");
    true
}

/// The `data:` payloads of an SSE response, in order.
async fn sse_events(r: reqwest::Response) -> Vec<String> {
    let mut buf = String::new();
    let mut stream = r.bytes_stream();
    while let Some(chunk) = stream.next().await {
        buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    buf.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data:").map(|d| d.trim().to_string()))
        .collect()
}

#[test]
fn grpc_streaming_and_unary_agree() {
    let cluster = Cluster::start(1, 1, 1, &[]);
    rt().block_on(async {
        let mut client = grpc_client(&cluster).await;
        let req = greedy_request("Write one sentence about the sea:");
        let unary = client.generate(req.clone()).await.unwrap().into_inner();
        let mut s = client.generate_stream(req).await.unwrap().into_inner();
        let (mut ids, mut text, mut last) = (Vec::new(), String::new(), None);
        while let Some(m) = s.message().await.unwrap() {
            ids.extend(m.token_ids.iter().copied());
            text.push_str(&m.text);
            if m.finish_reason != 0 {
                last = Some(m);
            }
        }
        let last = last.expect("a final message with the finish reason");
        assert_eq!(ids, unary.token_ids);
        assert_eq!(text, unary.text);
        assert_eq!(last.finish_reason, unary.finish_reason);
        assert_eq!(last.usage, unary.usage);
        assert_eq!(
            unary.usage.unwrap().completion_tokens as usize,
            unary.token_ids.len()
        );
        // Each call is counted once, under the status it ended with: a
        // refused one under its error, and one the client dropped halfway
        // under CANCELLED, not OK.
        let calls = |endpoint: &str, code: tonic::Code| {
            format!(
                "tandem_requests_total{{endpoint=\"{endpoint}\",status=\"grpc_{}\"}}",
                code as i32
            )
        };
        for endpoint in ["grpc_generate", "grpc_generate_stream"] {
            assert_eq!(
                counter(&cluster.router, &calls(endpoint, tonic::Code::Ok)).await,
                1.0
            );
        }
        let mut wrong_model = greedy_request("Hello");
        wrong_model.model = "no-such-model".into();
        let refused = client.generate_stream(wrong_model).await.unwrap_err();
        let refused_calls = calls("grpc_generate_stream", refused.code());
        assert_eq!(counter(&cluster.router, &refused_calls).await, 1.0);
        // A request beyond tonic's default 4 MiB is read (up to the HTTP
        // API's 32 MiB) and answered on its merits: here, too long a prompt.
        let mut big = greedy_request("");
        big.input = Some(g::Input::TokenIds(g::TokenIds {
            ids: vec![1; 5 << 20],
        }));
        let e = client.generate(big).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("context"), "{e:?}");
        let mut long = greedy_request("Count from one to a hundred:");
        long.sampling.as_mut().unwrap().max_tokens = Some(200);
        long.sampling.as_mut().unwrap().ignore_eos = true;
        let mut s = client.generate_stream(long).await.unwrap().into_inner();
        assert!(s.message().await.unwrap().is_some());
        drop(s);
        let cancelled = calls("grpc_generate_stream", tonic::Code::Cancelled);
        let deadline = Instant::now() + Duration::from_secs(10);
        while counter(&cluster.router, &cancelled).await < 1.0 {
            assert!(
                Instant::now() < deadline,
                "a dropped stream was never counted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            counter(
                &cluster.router,
                &calls("grpc_generate_stream", tonic::Code::Ok)
            )
            .await,
            1.0
        );
        // Server reflection, v1 and v1alpha (grpcurl, grpcio's client),
        // lists what each node serves: the API on the router, the worker
        // protocol on a worker; health checking and reflection on both.
        let common = [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ];
        for (node, own) in [
            (&cluster.router, "tandem.v1.Generate"),
            (&cluster.decode[0], "tandem.v1.Worker"),
        ] {
            let mut want: Vec<String> =
                common.iter().chain([&own]).map(|s| s.to_string()).collect();
            want.sort();
            for mut listed in reflected_services(&format!("http://{}", node.addr())).await {
                listed.sort();
                assert_eq!(listed, want);
            }
        }
    });
}

/// The services server reflection lists at `url`, as v1 and as v1alpha.
async fn reflected_services(url: &str) -> [Vec<String>; 2] {
    use tonic_reflection::pb::{v1, v1alpha};
    let ask = v1::ServerReflectionRequest {
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
        ..Default::default()
    };
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let mut r = c
        .server_reflection_info(futures_util::stream::iter([ask]))
        .await
        .unwrap()
        .into_inner();
    let names_v1 = match r.message().await.unwrap().unwrap().message_response {
        Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("v1 reflection answered {other:?}"),
    };
    let ask = v1alpha::ServerReflectionRequest {
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
        ..Default::default()
    };
    let mut c = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let mut r = c
        .server_reflection_info(futures_util::stream::iter([ask]))
        .await
        .unwrap()
        .into_inner();
    let names_v1alpha = match r.message().await.unwrap().unwrap().message_response {
        Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("v1alpha reflection answered {other:?}"),
    };
    [names_v1, names_v1alpha]
}

/// Load of a worker, asked directly with the cluster secret.
async fn worker_load(node: &Node) -> w::LoadReport {
    let mut c = w::WorkerClient::connect(format!("http://{}", node.addr()))
        .await
        .unwrap();
    let mut req = tonic::Request::new(w::LoadRequest {});
    req.metadata_mut()
        .insert(w::SECRET_METADATA, SECRET.parse().unwrap());
    c.load(req).await.unwrap().into_inner()
}

#[test]
fn client_disconnect_cancels_on_the_workers() {
    let cluster = Cluster::start(1, 1, 1, &[]);
    rt().block_on(async {
        let idle = worker_load(&cluster.decode[0]).await;
        let http = reqwest::Client::new();
        let body = json!({
            "model": model_name(),
            "prompt": "List every prime number, one per line, starting from 2:",
            "max_tokens": 3000,
            "temperature": 0,
            "stream": true,
        });
        let r = http
            .post(format!("{}/completions", cluster.base_url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut stream = r.bytes_stream();
        // Wait for a few tokens, then hang up.
        let mut seen = 0;
        while seen < 3 {
            stream.next().await.expect("stream ended early").unwrap();
            seen += 1;
        }
        let busy = worker_load(&cluster.decode[0]).await;
        assert_eq!(
            busy.running + busy.waiting,
            1,
            "the request should be running"
        );
        drop(stream);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let l = worker_load(&cluster.decode[0]).await;
            if l.running == 0 && l.waiting == 0 && l.in_flight == 0 {
                // Nothing but the prefix cache keeps blocks.
                assert_eq!(
                    l.free_blocks + l.cached_blocks,
                    l.total_blocks,
                    "blocks leaked: {idle:?} before, {l:?} after"
                );
                break;
            }
            assert!(Instant::now() < deadline, "request still running: {l:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A whole (not streamed) answer the client stops waiting for is
        // cancelled too, and counted as 499: the streamed one began as 200.
        let url = format!("{}/completions", cluster.base_url());
        let whole = tokio::spawn(async move {
            let mut body = body;
            body["stream"] = json!(false);
            http.post(url).json(&body).send().await
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while worker_load(&cluster.decode[0]).await.running == 0 {
            assert!(Instant::now() < deadline, "the whole answer never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        whole.abort();
        let counted = |status: &str| {
            format!("tandem_requests_total{{endpoint=\"completions\",status=\"{status}\"}}")
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let l = worker_load(&cluster.decode[0]).await;
            let left = counter(&cluster.router, &counted("499")).await;
            if l.running == 0 && l.waiting == 0 && l.in_flight == 0 && left == 1.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{left} counted as 499; worker {l:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(counter(&cluster.router, &counted("200")).await, 1.0);
    });
}

#[test]
fn bad_requests_get_openai_errors_not_500s() {
    let cluster = Cluster::start(0, 1, 1, &[]);
    let chat = format!("{}/chat/completions", cluster.base_url());
    let compl = format!("{}/completions", cluster.base_url());
    let m = model_name();
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let huge = "word ".repeat(9000);
    let cases: Vec<(&str, &str, Value, u16, Option<&str>)> = vec![
        (
            "invalid json",
            &chat,
            Value::String("{not json".into()),
            400,
            None,
        ),
        (
            "unknown model",
            &chat,
            json!({"model": "nope", "messages": msgs}),
            404,
            Some("model"),
        ),
        (
            "missing messages",
            &chat,
            json!({"model": m}),
            400,
            Some("messages"),
        ),
        (
            "empty messages",
            &chat,
            json!({"model": m, "messages": []}),
            400,
            Some("messages"),
        ),
        (
            "max_tokens 0",
            &chat,
            json!({"model": m, "messages": msgs, "max_tokens": 0}),
            400,
            Some("max_tokens"),
        ),
        (
            "max_tokens negative",
            &compl,
            json!({"model": m, "prompt": "a", "max_tokens": -5}),
            400,
            Some("max_tokens"),
        ),
        (
            "max_tokens over the context",
            &chat,
            json!({"model": m, "messages": msgs, "max_tokens": 100000}),
            400,
            Some("max_tokens"),
        ),
        (
            "prompt over the context",
            &compl,
            json!({"model": m, "prompt": huge}),
            400,
            None,
        ),
        (
            "temperature out of range",
            &chat,
            json!({"model": m, "messages": msgs, "temperature": 7}),
            400,
            Some("temperature"),
        ),
        (
            "top_p zero",
            &chat,
            json!({"model": m, "messages": msgs, "top_p": 0}),
            400,
            Some("top_p"),
        ),
        (
            "n zero",
            &chat,
            json!({"model": m, "messages": msgs, "n": 0}),
            400,
            Some("n"),
        ),
        (
            "wrong type",
            &chat,
            json!({"model": m, "messages": "hi"}),
            400,
            None,
        ),
        (
            "tool_choice auto refused",
            &chat,
            json!({"model": m, "messages": msgs, "tools": [{"type": "function", "function": {"name": "f"}}]}),
            400,
            Some("tool_choice"),
        ),
        (
            "logit_bias out of range",
            &chat,
            json!({"model": m, "messages": msgs, "logit_bias": {"1": 500}}),
            400,
            Some("logit_bias"),
        ),
        (
            "max_tokens 0 without the prompt's scores",
            &compl,
            json!({"model": m, "prompt": "a b", "max_tokens": 0, "logprobs": 1}),
            400,
            Some("max_tokens"),
        ),
        (
            "prompt_logprobs out of range",
            &compl,
            json!({"model": m, "prompt": "a b", "prompt_logprobs": 50}),
            400,
            Some("prompt_logprobs"),
        ),
    ];
    rt().block_on(async {
        let http = reqwest::Client::new();
        for (name, url, body, status, param) in cases {
            let req = http.post(url).header("content-type", "application/json");
            let req = match &body {
                Value::String(s) => req.body(s.clone()),
                v => req.body(v.to_string()),
            };
            let r = tokio::time::timeout(Duration::from_secs(30), req.send())
                .await
                .unwrap_or_else(|_| panic!("{name}: hung"))
                .unwrap();
            assert_eq!(r.status().as_u16(), status, "{name}");
            let v: Value = r.json().await.unwrap_or_else(|e| panic!("{name}: {e}"));
            let err = &v["error"];
            assert!(
                err["message"].as_str().is_some_and(|s| !s.is_empty()),
                "{name}: {v}"
            );
            assert!(err["type"].is_string(), "{name}: {v}");
            if let Some(p) = param {
                assert_eq!(err["param"], p, "{name}: {v}");
            }
        }
        // The server is still fine.
        let r = http
            .post(&chat)
            .json(&json!({"model": m, "messages": msgs, "max_tokens": 3}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = http
            .get(format!("{}/models", cluster.base_url()))
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["data"][0]["id"], m);

        // Prompts of megabytes (two, one per async worker of the router)
        // are refused as too long from their head, without tokenizing the
        // rest, and hold up nothing: a health check sent meanwhile answers.
        let mega = "word ".repeat(1_500_000);
        let bodies = [
            (
                &chat,
                json!({"model": m, "messages": [{"role": "user", "content": mega}]}),
            ),
            (&compl, json!({"model": m, "prompt": mega})),
        ];
        let mut big = Vec::new();
        for (url, body) in bodies {
            let (http, url) = (http.clone(), url.clone());
            big.push(tokio::spawn(async move {
                let r = http.post(&url).json(&body).send().await.unwrap();
                (r.status(), r.json::<Value>().await.unwrap())
            }));
        }
        let health = http
            .get(format!("http://{}/health", cluster.router.addr()))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        for b in big {
            let (status, v) = b.await.unwrap();
            assert_eq!(status, 400, "a prompt beyond the context: {v}");
            assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
            let message = v["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("its first"),
                "refused from its head: {message}"
            );
        }
    });
}

#[test]
fn api_key_guards_the_api_and_workers_refuse_strangers() {
    let cluster = Cluster::start(0, 1, 1, &["--api-key", "k-123"]);
    rt().block_on(async {
        let http = reqwest::Client::new();
        let url = format!("{}/models", cluster.base_url());
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["message"].is_string());
        let r = http.get(&url).bearer_auth("wrong").send().await.unwrap();
        assert_eq!(r.status(), 401);
        let r = http.get(&url).bearer_auth("k-123").send().await.unwrap();
        assert_eq!(r.status(), 200);
        // Health and metrics stay open for probes and scrapers.
        let base = format!("http://{}", cluster.router.addr());
        assert_eq!(
            http.get(format!("{base}/health"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(
            http.get(format!("{base}/ready"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        let metrics = http.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(metrics.status(), 200);

        // A worker refuses calls without the cluster secret.
        let mut c = w::WorkerClient::connect(format!("http://{}", cluster.decode[0].addr()))
            .await
            .unwrap();
        let e = c.load(w::LoadRequest {}).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut req = tonic::Request::new(w::LoadRequest {});
        req.metadata_mut()
            .insert(w::SECRET_METADATA, "guess".parse().unwrap());
        assert_eq!(
            c.load(req).await.unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    });
}

#[test]
fn tandem_up_serves_the_openai_api() {
    let _turn = tandem_tests::one_at_a_time();
    let model = model_path();
    // Run from a copy that is replaced while the cluster runs (an upgrade
    // in place): nodes must still start again, from the running binary.
    let installed = tempfile::tempdir().unwrap();
    let bin = installed.path().join("tandem");
    std::fs::copy(tandem_bin(), &bin).unwrap();
    let mut child = Command::new(&bin)
        .args([
            "up",
            "--port",
            "0",
            "--disagg-min-tokens",
            "0",
            "--kv-cache-memory",
            "256MiB",
        ])
        .arg("--model")
        .arg(&model)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(|l| l.ok())
        {
            if let Some(u) = line.strip_prefix("TANDEM_URL ") {
                let _ = tx.send(u.to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(180))
        .expect("tandem up printed no URL");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            unsafe {
                libc_kill(self.0.id() as i32, 15);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut up = Kill(child);
    let http = reqwest::Client::new();
    let say = |content: &str| {
        http.post(format!("{url}/chat/completions"))
            .json(&json!({
                "model": model_name(),
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 8,
            }))
            .send()
    };
    rt().block_on(async {
        let r = say("Say hello.").await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    });
    // A worker that dies is started again on its port, and serving goes on.
    let children = |pid: u32| -> Vec<(u32, String)> {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .map(|c: u32| {
                let cmd = std::fs::read(format!("/proc/{c}/cmdline")).unwrap_or_default();
                (c, String::from_utf8_lossy(&cmd).replace('\0', " "))
            })
            .collect()
    };
    let decode_pid = |up: u32| {
        children(up)
            .into_iter()
            .find(|(_, cmd)| cmd.contains(" decode "))
            .map(|(pid, _)| pid)
    };
    let first = decode_pid(up.0.id()).expect("tandem up runs a decode worker");
    let upgrade = installed.path().join("tandem.new");
    std::fs::write(&upgrade, "#!/bin/sh\nexit 3\n").unwrap();
    std::fs::rename(&upgrade, &bin).unwrap();
    unsafe {
        libc_kill(first as i32, 9);
    }
    // Its replacement dies too, before it is ready: one more death, and
    // started again (the fourth within a minute would stop the cluster).
    let deadline = Instant::now() + Duration::from_secs(30);
    let replacement = loop {
        match decode_pid(up.0.id()) {
            Some(p) if p != first => break p,
            _ => {
                assert!(Instant::now() < deadline, "no replacement decode worker");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    unsafe {
        libc_kill(replacement as i32, 9);
    }
    rt().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = say("Say hello again.").await.unwrap();
            if r.status() == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no answer after the decode worker was killed: {}",
                r.status()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let second = decode_pid(up.0.id()).expect("the decode worker started again");
    assert!(second != first && second != replacement);
    assert!(
        up.0.try_wait().unwrap().is_none(),
        "tandem up stopped when one worker died"
    );
    // SIGTERM stops the whole cluster, children included.
    unsafe {
        libc_kill(up.0.id() as i32, 15);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = up.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "tandem up did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "tandem up exited with {status}");
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn a_worker_without_the_secret_is_refused_and_a_router_without_workers_fails_clearly() {
    let model = model_path();
    let out = Command::new(tandem_bin())
        .args(["decode", "--port", "0"])
        .arg("--model")
        .arg(&model)
        .env_remove("TANDEM_CLUSTER_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cluster-secret"));

    // A port nobody listens on: bind one, note it, close it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = Command::new(tandem_bin())
        .args(["router", "--port", "0", "--connect-timeout-secs", "1"])
        .arg("--model")
        .arg(&model)
        .arg("--peers")
        .arg(format!("decode={dead}"))
        .env("TANDEM_CLUSTER_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("connecting to the workers") && err.contains(&dead.to_string()),
        "{err}"
    );
}

/// The venv with the official OpenAI and Anthropic clients
/// (`scripts/test.sh` installs them).
fn client_python() -> std::path::PathBuf {
    let dir = std::env::var_os("TANDEM_PYCLIENT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/tandem/pyclient")
        });
    let py = dir.join("bin/python");
    assert!(
        py.exists(),
        "the Python clients are not installed at {}; scripts/test.sh installs them (tests/python/requirements.txt)",
        dir.display()
    );
    py
}

/// The official OpenAI client (chat, completions, the Responses API) and
/// Anthropic's (the Messages API) drive one cluster, unmodified.
#[test]
fn the_official_openai_and_anthropic_python_clients_work_unmodified() {
    let py = client_python();
    let cluster = Cluster::start(1, 1, 1, &["--api-key", "sk-e2e"]);
    let root = format!("http://{}", cluster.router.addr());
    for (script, base) in [
        ("openai_client.py", cluster.base_url()),
        ("anthropic_client.py", root),
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("python")
            .join(script);
        let out = Command::new(&py)
            .arg(path)
            .arg(base)
            .arg(model_name())
            .arg("sk-e2e")
            .output()
            .expect("running a Python client script");
        assert!(
            out.status.success(),
            "{script} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The translated APIs count their own tokens, under their own names.
    rt().block_on(async {
        for endpoint in ["responses", "messages"] {
            let series = format!("tandem_generated_tokens_total{{endpoint=\"{endpoint}\"}}");
            let n = counter(&cluster.router, &series).await;
            assert!(n > 0.0, "{series} is {n}");
        }
    });
}

/// Kills a worker (SIGKILL, as a crash), waits `down`, and starts a new
/// one of `role` at its address, as an operator, `tandem up` or
/// Kubernetes would.
fn restart_worker(node: &mut Node, role: tandem_cluster::Role, down: Duration) {
    let port = node.addr().port();
    node.kill();
    std::thread::sleep(down);
    let model = model_path().to_string_lossy().into_owned();
    let args = [
        "--model",
        &model,
        "--threads",
        "1",
        "--kv-cache-memory",
        "256MiB",
    ];
    *node = Node::start_at(role, port, &args, &[]);
}

/// A prompt prefilled remotely joins the decode worker's prefix cache even
/// when its request ends with the first token (`max_tokens` 1), so the
/// router rightly serves the next one there without the prefill tier; a
/// decode worker restarted at the same address has lost that cache, and
/// the router, which sees the new process, sends the prompt back to the
/// prefill tier instead of having the decode worker recompute it.
#[test]
fn the_router_knows_what_a_decode_worker_caches_across_its_restarts() {
    let mut cluster = Cluster::start(1, 1, 1, &[]);
    let prompt: Vec<u32> = (0..200u32).map(|i| 1000 + (i * 7919) % 30000).collect();
    let url = format!("{}/completions", cluster.base_url());
    let rt = rt();
    let ask = || {
        rt.block_on(async {
            let v: Value = reqwest::Client::new()
                .post(&url)
                .json(&json!({
                    "model": model_name(), "prompt": prompt, "max_tokens": 1, "temperature": 0,
                }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let text = v["choices"][0]["text"]
                .as_str()
                .unwrap_or_else(|| panic!("{v}"));
            let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
            (text.to_string(), cached.unwrap())
        })
    };
    let router = cluster.router.addr();
    let dispatched = |how: &str| {
        let series = format!("tandem_router_dispatched_total{{prefill=\"{how}\"}}");
        rt.block_on(counter_at(router, &series))
    };
    let (first, _) = ask();
    assert_eq!(dispatched("remote"), 1.0);
    let (again, cached) = ask();
    assert_eq!(again, first);
    assert_eq!(
        dispatched("local"),
        1.0,
        "served where the prompt is cached"
    );
    assert_eq!(
        cached, 192,
        "12 whole blocks from the decode worker's cache"
    );

    restart_worker(
        &mut cluster.decode[0],
        tandem_cluster::Role::Decode,
        Duration::ZERO,
    );
    // Load polls (every 100 ms here) see the new process.
    std::thread::sleep(Duration::from_millis(600));
    let (after, _) = ask();
    assert_eq!(after, first, "after the restart");
    assert_eq!(dispatched("remote"), 2.0, "back to the prefill tier");
    assert_eq!(
        dispatched("local"),
        1.0,
        "not recomputed on the restarted worker"
    );
}

/// The only decode worker dies mid-stream and comes back at its address
/// (as `tandem up` or Kubernetes restarts it): the router waits for it and
/// resumes the stream there, and the client sees one unbroken answer, the
/// same as without the fault.
#[test]
fn a_stream_whose_only_decode_worker_restarts_resumes_on_it() {
    let mut cluster = Cluster::start(1, 1, 1, &[]);
    stream_across_a_restart(&mut cluster, |c| {
        restart_worker(
            &mut c.decode[0],
            tandem_cluster::Role::Decode,
            Duration::ZERO,
        )
    });
}

/// Streams a long greedy completion, calls `restart` (which kills and
/// starts again the only decode worker) after its first tokens, and checks
/// that the client saw one unbroken answer, the plain one.
fn stream_across_a_restart(cluster: &mut Cluster, restart: impl FnOnce(&mut Cluster)) {
    let rt = rt();
    let http = reqwest::Client::new();
    let url = format!("{}/completions", cluster.base_url());
    let body = json!({
        "model": model_name(), "prompt": "The history of the lighthouse begins",
        "max_tokens": 240, "temperature": 0, "ignore_eos": true,
    });
    let plain: Value = rt.block_on(async {
        let r = http.post(&url).json(&body).send().await.unwrap();
        r.json().await.unwrap()
    });
    let want = plain["choices"][0]["text"].as_str().unwrap().to_string();
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let mut stream = rt.block_on(async {
        let r = http.post(&url).json(&sb).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes_stream()
    });
    let mut raw = Vec::new();
    let mut read_until = |raw: &mut Vec<u8>, events: Option<usize>| {
        rt.block_on(async {
            while events.is_none_or(|n| raw.windows(2).filter(|w| w == b"\n\n").count() < n) {
                match stream.next().await {
                    Some(b) => raw.extend_from_slice(&b.unwrap()),
                    None => return,
                }
            }
        })
    };
    read_until(&mut raw, Some(10));
    restart(cluster);
    read_until(&mut raw, None);
    let raw = String::from_utf8(raw).unwrap();
    let events: Vec<&str> = raw
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{raw}");
    let mut got = String::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v.get("error").is_none(), "the stream failed: {v}");
        got.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
    }
    assert_eq!(
        got, want,
        "the resumed stream differs from the plain answer"
    );
    // The usage counts the prompt once, however often it was computed.
    let usage: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    let u = &usage["usage"];
    assert_eq!(
        u["prompt_tokens"], plain["usage"]["prompt_tokens"],
        "{usage}"
    );
    assert_eq!(u["completion_tokens"], 240, "{usage}");
    let cached = u["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached <= u["prompt_tokens"].as_u64().unwrap(), "{usage}");
    let resumed = rt.block_on(counter(&cluster.router, "tandem_router_resumed_total"));
    assert!(resumed >= 1.0, "the stream was never resumed ({resumed})");
}

/// A router with no decode worker that answers is not ready (a load
/// balancer sends its clients elsewhere), says why, and counts no healthy
/// decode worker; it is ready again once one answers. Failure counters
/// read 0 before any failure (dashboards plot them from the start).
#[test]
fn a_router_without_a_decode_worker_is_not_ready() {
    let mut cluster = Cluster::start(0, 1, 1, &[]);
    let rt = rt();
    let ready = |addr: std::net::SocketAddr| {
        rt.block_on(async {
            let r = reqwest::get(format!("http://{addr}/ready")).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    let healthy_decode = "tandem_router_workers_healthy{worker_role=\"decode\"}";
    let router = cluster.router.addr();
    assert_eq!(ready(router).0, 200);
    assert_eq!(rt.block_on(counter_at(router, healthy_decode)), 1.0);
    let decode = cluster.decode[0].addr();
    let metrics = rt.block_on(async {
        reqwest::get(format!("http://{decode}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    for series in [
        "tandem_kv_recomputed_total{",
        "tandem_kv_transfer_failures_total{",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }

    cluster.decode[0].kill();
    let deadline = Instant::now() + Duration::from_secs(15);
    let (code, why) = loop {
        let r = ready(router);
        if r.0 != 200 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, 503, "still ready without its decode worker");
    assert!(why.contains("no decode worker"), "{why}");
    assert_eq!(rt.block_on(counter_at(router, healthy_decode)), 0.0);

    restart_worker(
        &mut cluster.decode[0],
        tandem_cluster::Role::Decode,
        Duration::ZERO,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready(router).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready again after the worker came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(rt.block_on(counter_at(router, healthy_decode)), 1.0);
}

/// Polls a worker until `done(load)` holds, for at most `within`.
async fn wait_load(
    node: &Node,
    within: Duration,
    done: impl Fn(&w::LoadReport) -> bool,
) -> w::LoadReport {
    let deadline = Instant::now() + within;
    loop {
        let l = worker_load(node).await;
        if done(&l) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "worker state not reached within {within:?}: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn hanging_up_during_a_remote_prefill_cancels_it_and_frees_the_reserved_blocks() {
    let cluster = Cluster::start(1, 1, 1, &[]);
    rt().block_on(async {
        let idle = worker_load(&cluster.decode[0]).await;
        // ~3,000 prompt tokens: several seconds of prefill on one thread.
        let prompt: Vec<u32> = (0..3000u32).map(|i| 1000 + (i * 7919) % 30000).collect();
        let http = reqwest::Client::new();
        let r = http
            .post(format!("{}/completions", cluster.base_url()))
            .json(&json!({
                "model": model_name(), "prompt": prompt, "max_tokens": 4, "stream": true,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        // The prompt is on the prefill worker and its blocks are reserved on the decode worker.
        wait_load(&cluster.prefill[0], Duration::from_secs(10), |l| {
            l.running + l.waiting == 1
        })
        .await;
        let reserved = worker_load(&cluster.decode[0]).await;
        assert!(
            idle.free_blocks - reserved.free_blocks >= 3000 / 16,
            "no blocks reserved: {idle:?} then {reserved:?}"
        );
        drop(r);
        // Cancelled at the next step, far sooner than the prefill would take.
        wait_load(&cluster.prefill[0], Duration::from_secs(5), |l| {
            l.running == 0 && l.waiting == 0 && l.in_flight == 0
        })
        .await;
        wait_load(&cluster.decode[0], Duration::from_secs(5), |l| {
            l.in_flight == 0 && l.free_blocks == idle.free_blocks
        })
        .await;
    });
}

/// A prefill worker that dies while a prompt's KV is on its way, seen by a
/// decode worker started with `--on-kv-failure recompute`: it computes the
/// prompt itself (no retry through the router), says so in its counter,
/// and the tokens are the plain path's. (With the default, `fail`, the
/// router retries: `faults::a_prefill_worker_killed_mid_run_loses_no_request`.)
#[test]
fn a_decode_worker_told_to_recompute_computes_a_prompt_whose_kv_never_came() {
    let mut cluster = Cluster::start_spec(ClusterSpec {
        prefill: 1,
        decode: 1,
        threads: 1,
        decode_args: vec!["--on-kv-failure".into(), "recompute".into()],
        ..Default::default()
    });
    // ~1,800 prompt tokens: seconds of prefill on one thread.
    let prompt = "a long prompt about many things, ".repeat(250);
    let rt = rt();
    let idle = rt.block_on(worker_load(&cluster.decode[0]));
    let mut client = rt.block_on(grpc_client(&cluster));
    let request = greedy_request(&prompt);
    let call = rt.spawn(async move { client.generate(request).await });
    // The prompt is on the prefill worker, its blocks reserved on the
    // decode worker: the prefill worker goes away mid-prefill.
    rt.block_on(wait_load(
        &cluster.prefill[0],
        Duration::from_secs(20),
        |l| l.running + l.waiting == 1,
    ));
    cluster.prefill[0].kill();
    let reply = rt
        .block_on(call)
        .unwrap()
        .expect("the decode worker recomputes the prompt")
        .into_inner();
    let (text, ids, _) = generate_plain(&prompt, false);
    assert_eq!(reply.token_ids, ids);
    assert_eq!(reply.text, text);
    rt.block_on(async {
        let decode = &cluster.decode[0];
        assert_eq!(counter(decode, "tandem_kv_recomputed_total").await, 1.0);
        assert_eq!(
            counter(&cluster.router, "tandem_router_prefill_retries_total").await,
            0.0,
            "the decode worker recomputed; the router did not retry"
        );
        // Nothing left reserved: the prompt's blocks are free or cached.
        let l = wait_load(decode, Duration::from_secs(10), |l| l.in_flight == 0).await;
        assert_eq!(l.free_blocks + l.cached_blocks, idle.total_blocks, "{l:?}");
    });
}

/// A prefill worker that cannot hand KV to one decode worker (here the
/// decode worker announces a KV address nobody answers at, as a wrong
/// `--advertise-host` would) is kept apart from it. With the default `fail`, the first
/// request fails over to a prefill on the decode worker; with `recompute`,
/// the decode worker computes it and tells the router. Either way later
/// requests are prefilled there straight away, even after the prefill
/// worker is back in the router's list (load polls every 100 ms revive a
/// worker marked down), instead of failing over, or being recomputed, each
/// time. Every completion is the plain path's.
#[test]
fn a_prefill_worker_that_cannot_reach_a_decode_worker_is_not_paired_with_it_again() {
    let prompts = [
        "The three primary colours are",
        "A short story about a lighthouse keeper:",
        "The capital of France is",
    ];
    let plain: Vec<(String, Vec<u32>)> = prompts
        .iter()
        .map(|p| {
            let (text, ids, _) = generate_plain(p, false);
            (text, ids)
        })
        .collect();
    for policy in ["fail", "recompute"] {
        let cluster = Cluster::start_spec(ClusterSpec {
            prefill: 1,
            decode: 1,
            threads: 1,
            // Bound to 127.0.0.1, where the router reaches it; its KV
            // port announced at 127.0.0.2, where nothing listens.
            decode_args: ["--on-kv-failure", policy, "--advertise-host", "127.0.0.2"]
                .iter()
                .map(|a| a.to_string())
                .collect(),
            ..Default::default()
        });
        let rt = rt();
        let mut client = rt.block_on(grpc_client(&cluster));
        for (i, prompt) in prompts.iter().enumerate() {
            let reply = rt
                .block_on(client.generate(greedy_request(prompt)))
                .unwrap_or_else(|e| panic!("{policy}: request {i}: {e}"))
                .into_inner();
            assert_eq!(reply.token_ids, plain[i].1, "{policy}: request {i}");
            assert_eq!(reply.text, plain[i].0, "{policy}: request {i}");
            if i == 0 {
                // Long enough for the router to see the prefill worker alive again.
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        rt.block_on(async {
            let router = &cluster.router;
            let retries = counter(router, "tandem_router_prefill_retries_total").await;
            let recomputed = counter(&cluster.decode[0], "tandem_kv_recomputed_total").await;
            let (want_retries, want_recomputed) = if policy == "fail" {
                (1.0, 0.0)
            } else {
                (0.0, 1.0)
            };
            assert_eq!(retries, want_retries, "{policy}: router retries");
            assert_eq!(recomputed, want_recomputed, "{policy}: prompts recomputed");
            let remote = r#"tandem_router_dispatched_total{prefill="remote"}"#;
            assert_eq!(
                counter(router, remote).await,
                1.0,
                "{policy}: only the first tried the pair"
            );
        });
        if policy == "recompute" {
            continue;
        }
        // The operator fixes the decode worker's address and restarts it
        // where it was: the router sees it gone, then back, and pairs it
        // again.
        let mut cluster = cluster;
        let down = Duration::from_secs(1);
        restart_worker(&mut cluster.decode[0], tandem_cluster::Role::Decode, down);
        std::thread::sleep(Duration::from_secs(1));
        let reply = rt
            .block_on(client.generate(greedy_request(prompts[0])))
            .expect("after the restart")
            .into_inner();
        assert_eq!(reply.token_ids, plain[0].1, "after the restart");
        rt.block_on(async {
            let router = &cluster.router;
            let remote = r#"tandem_router_dispatched_total{prefill="remote"}"#;
            assert_eq!(
                counter(router, remote).await,
                2.0,
                "the restarted worker prefills again"
            );
            assert_eq!(
                counter(router, "tandem_router_prefill_retries_total").await,
                1.0,
                "and its hand-over works"
            );
        });
    }
}

/// A series from a node's /metrics, 0 when absent. `series` is `name` or
/// `name{k="v",...}`: lines of that name whose labels include the given
/// ones (the node labels `model`, `role`, `worker_id` and any others are
/// ignored) are summed.
async fn counter(node: &Node, series: &str) -> f64 {
    counter_at(node.addr(), series).await
}

/// [`counter`] of the node at `addr`.
async fn counter_at(addr: std::net::SocketAddr, series: &str) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    fn split(s: &str) -> (&str, Vec<&str>) {
        match s.split_once('{') {
            Some((name, rest)) => (
                name,
                rest.trim_end_matches('}')
                    .split(',')
                    .filter(|kv| !kv.is_empty())
                    .collect(),
            ),
            None => (s, Vec::new()),
        }
    }
    let (name, want) = split(series);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = split(series);
            (n == name && want.iter().all(|w| labels.contains(w)))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

#[test]
fn short_prompts_skip_the_prefill_tier_and_long_ones_use_it() {
    let cluster = Cluster::start(1, 1, 1, &["--disagg-min-tokens", "32"]);
    rt().block_on(async {
        let http = reqwest::Client::new();
        let ask = |prompt: String| {
            http.post(format!("{}/completions", cluster.base_url()))
                .json(&json!({"model": model_name(), "prompt": prompt, "max_tokens": 2}))
                .send()
        };
        assert_eq!(ask("Hello there".into()).await.unwrap().status(), 200);
        let local = r#"tandem_router_dispatched_total{prefill="local"}"#;
        let remote = r#"tandem_router_dispatched_total{prefill="remote"}"#;
        assert_eq!(counter(&cluster.router, local).await, 1.0);
        assert_eq!(counter(&cluster.router, remote).await, 0.0);
        let long = "a long prompt about many things ".repeat(12);
        assert_eq!(ask(long).await.unwrap().status(), 200);
        assert_eq!(counter(&cluster.router, remote).await, 1.0);
        assert_eq!(counter(&cluster.router, local).await, 1.0);
    });
}

/// `logit_bias` is applied where each token is sampled: by the prefill
/// worker for the first token, by the decode worker for the rest. Both
/// agree with the plain path given the same bias.
#[test]
fn logit_bias_steers_both_tiers_as_on_the_plain_path() {
    let prompt = prompts()[1].clone();
    let (_, greedy, _) = generate_plain(&prompt, false);
    assert!(greedy.len() > 2);
    // Ban the greedy first token; force a token the model never picked.
    let banned = greedy[0];
    let forced = (100..)
        .find(|t| !greedy.contains(t))
        .expect("a token outside the greedy output");
    let cases = [vec![(banned, -100.0f32)], vec![(forced, 100.0)]];
    let plain: Vec<_> = cases
        .iter()
        .map(|bias| {
            let args: Vec<String> = bias
                .iter()
                .flat_map(|(id, b)| ["--logit-bias".to_string(), format!("{id}={b}")])
                .collect();
            generate_plain_with(&prompt, false, MAX_TOKENS, &args)
        })
        .collect();
    assert!(!plain[0].1.contains(&banned), "{:?}", plain[0].1);
    assert_ne!(plain[0].1, greedy);
    assert_eq!(plain[1].1, vec![forced; MAX_TOKENS as usize]);

    // Every request goes to the prefill tier, even once the decode worker
    // caches the prompt.
    let cluster = Cluster::start(1, 1, 1, &["--disagg-max-cached-fraction", "1"]);
    rt().block_on(async {
        let mut client = grpc_client(&cluster).await;
        for (bias, (text, ids, _)) in cases.iter().zip(&plain) {
            let mut req = greedy_request(&prompt);
            req.sampling.as_mut().unwrap().logit_bias = bias
                .iter()
                .map(|&(token_id, bias)| g::TokenBias { token_id, bias })
                .collect();
            let r = client.generate(req).await.expect("Generate").into_inner();
            assert_eq!(&r.token_ids, ids, "gRPC with {bias:?}");
            // The same over the OpenAI API, where ids are the keys of an object.
            let body = json!({
                "model": model_name(),
                "prompt": prompt,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "logit_bias": bias.iter().map(|(id, b)| (id.to_string(), json!(b)))
                    .collect::<serde_json::Map<_, _>>(),
            });
            let v = api_json(&cluster, "completions", &body).await;
            assert_eq!(v["choices"][0]["text"], text.as_str(), "HTTP with {bias:?}");
        }
        // Every request's first token came from the prefill worker.
        let remote = r#"tandem_router_dispatched_total{prefill="remote"}"#;
        assert_eq!(counter(&cluster.router, remote).await, 4.0);
    });
}

/// One prompt token's score from `tandem generate --json`: its id, its
/// log-probability (`None` for the first) and the top alternatives.
type Score = (u32, Option<f64>, Value);

/// A named tool call through the cluster is the function's schema held on
/// both tiers: its arguments are what `tandem generate --chat
/// --json-schema <parameters>` writes (the default model's template does
/// not show tools to the model, so the prompt is the same), streamed or
/// not; `required` gives calls that parse, each of a defined function.
#[test]
fn tool_calls_are_the_plain_paths_schema_output() {
    let params = json!({
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
        "additionalProperties": false,
    });
    let tools = json!([
        {"type": "function", "function": {"name": "forecast", "parameters": params}},
        {"type": "function", "function": {"name": "get_time"}},
    ]);
    let ask = "What will the weather be in Paris for the next three days?";
    let (want, _, _) =
        generate_plain_with(ask, true, 96, &["--json-schema".into(), params.to_string()]);
    let args: Value = serde_json::from_str(&want).expect("the plain path wrote whole JSON");
    assert!(args["city"].is_string() && args["days"].is_i64(), "{want}");
    let cluster = Cluster::start(1, 1, 1, &[]);
    rt().block_on(async {
        let body = |choice: Value, stream: bool| {
            json!({
                "model": model_name(),
                "messages": [{"role": "user", "content": ask}],
                "tools": tools, "tool_choice": choice,
                "max_tokens": 96, "temperature": 0, "stream": stream,
            })
        };
        let named = json!({"type": "function", "function": {"name": "forecast"}});
        let v = api_json(&cluster, "chat/completions", &body(named.clone(), false)).await;
        let call = &v["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "forecast");
        assert_eq!(call["function"]["arguments"], want.as_str());
        // Streamed, the arguments arrive in pieces that add up to the same.
        let mut streamed = String::new();
        for ev in api_chunks(&cluster, "chat/completions", &body(named, true)).await {
            if let Some(a) =
                ev["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str()
            {
                streamed.push_str(a);
            }
        }
        assert_eq!(streamed, want);
        // Required: one or more calls of the defined functions.
        let v = api_json(
            &cluster,
            "chat/completions",
            &body(json!("required"), false),
        )
        .await;
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
        for call in v["choices"][0]["message"]["tool_calls"].as_array().unwrap() {
            let name = call["function"]["name"].as_str().unwrap();
            let args: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            match name {
                "forecast" => assert!(args["city"].is_string() && args["days"].is_i64(), "{args}"),
                "get_time" => assert!(args.is_object(), "{args}"),
                other => panic!("a call of an undefined function {other}"),
            }
        }
    });
}

/// `tandem generate --json --prompt-logprobs K` on `prompt`: the prompt's
/// scores, and the ids generated after it.
fn scores_plain(prompt: &str, k: u32, max_tokens: u32) -> (Vec<Score>, Vec<u32>) {
    let v = generate_json(
        prompt,
        false,
        max_tokens,
        &["--prompt-logprobs".into(), k.to_string()],
    );
    let scores = v["prompt_logprobs"]
        .as_array()
        .expect("prompt_logprobs")
        .iter()
        .map(|e| {
            (
                e["token_id"].as_u64().unwrap() as u32,
                e["logprob"].as_f64(),
                e["top"].clone(),
            )
        })
        .collect();
    (scores, token_ids(&v))
}

/// Scoring prompts (OpenAI's `echo` with `logprobs`, as
/// lm-evaluation-harness sends it; `prompt_logprobs` over gRPC) through
/// the cluster: a long prompt is scored on the prefill tier and its scores
/// travel with the KV to the decode worker, a short one is scored on the
/// decode worker; both are the plain path's, bit for bit, with or without
/// a completion after them, and the prefix cache (warm with these prompts)
/// changes nothing.
#[test]
fn prompt_scores_are_the_plain_paths_on_both_tiers() {
    let ps = [prompts()[1].clone(), prompts()[0].clone()];
    let plain: Vec<_> = ps.iter().map(|p| scores_plain(p, 1, 4)).collect();
    assert!(plain[0].0.len() > 16 && plain[1].0.len() < 16);
    let cluster = Cluster::start(1, 1, 1, &["--disagg-min-tokens", "16"]);
    rt().block_on(async {
        // Warm every cache with the prompts.
        for p in &ps {
            let body = json!({"model": model_name(), "prompt": p, "max_tokens": 1});
            api_json(&cluster, "completions", &body).await;
        }
        let remote = r#"tandem_router_dispatched_total{prefill="remote"}"#;
        let local = r#"tandem_router_dispatched_total{prefill="local"}"#;
        let before = (counter(&cluster.router, remote).await, counter(&cluster.router, local).await);
        for max_tokens in [0, 4] {
            for stream in [false, true] {
                // Both prompts in one request, as lm-evaluation-harness batches them.
                let body = json!({
                    "model": model_name(),
                    "prompt": ps,
                    "echo": true,
                    "logprobs": 1,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "stream": stream,
                });
                let choices: Vec<Value> = if stream {
                    // Per choice: the texts and the logprobs arrays joined.
                    let mut joined = vec![json!({"text": "", "logprobs": {"tokens": [], "token_logprobs": [], "top_logprobs": []}}); 2];
                    for ev in api_chunks(&cluster, "completions", &body).await {
                        let c = &ev["choices"][0];
                        let j = &mut joined[c["index"].as_u64().unwrap() as usize];
                        j["text"] = json!(format!("{}{}", j["text"].as_str().unwrap(), c["text"].as_str().unwrap()));
                        if c["logprobs"].is_object() {
                            for key in ["tokens", "token_logprobs", "top_logprobs"] {
                                let more = c["logprobs"][key].as_array().unwrap().clone();
                                j["logprobs"][key].as_array_mut().unwrap().extend(more);
                            }
                        }
                        if !c["finish_reason"].is_null() {
                            j["finish_reason"] = c["finish_reason"].clone();
                        }
                    }
                    joined
                } else {
                    let v = api_json(&cluster, "completions", &body).await;
                    let n: u64 = plain.iter().map(|p| p.0.len() as u64).sum();
                    assert_eq!(v["usage"]["prompt_tokens"], n);
                    assert_eq!(v["usage"]["completion_tokens"], 2 * max_tokens);
                    v["choices"].as_array().unwrap().clone()
                };
                for (i, (c, (scores, ids))) in choices.iter().zip(&plain).enumerate() {
                    let what = format!("prompt {i}, max_tokens {max_tokens}, stream {stream}");
                    let lp = &c["logprobs"];
                    let got = lp["token_logprobs"].as_array().unwrap();
                    assert_eq!(got.len(), scores.len() + max_tokens as usize, "{what}");
                    for (j, (_, want, top)) in scores.iter().enumerate() {
                        assert_eq!(got[j].as_f64(), *want, "{what}: position {j}");
                        // The one alternative asked for, as the plain path has
                        // it, and the prompt's own token when that is not it.
                        let t = &lp["top_logprobs"][j];
                        match top.as_array().and_then(|a| a.first()) {
                            None => assert!(t.is_null(), "{what}: position {j}"),
                            Some(best) => {
                                let vals: Vec<f64> = t.as_object().unwrap().values().map(|x| x.as_f64().unwrap()).collect();
                                let best = best[1].as_f64().unwrap();
                                let own = want.unwrap();
                                let ok = vals == [best] || (vals.len() == 2 && vals.contains(&best) && vals.contains(&own));
                                assert!(ok, "{what}: position {j}: {vals:?}, best {best}, own {own}");
                            }
                        }
                    }
                    let text = c["text"].as_str().unwrap();
                    assert!(text.starts_with(ps[i].as_str()), "{what}: {text:?}");
                    let tail = &text[ps[i].len()..];
                    let (want_tail, _, _) = generate_plain_with(&ps[i], false, 4, &[]);
                    if max_tokens == 0 {
                        assert_eq!(tail, "", "{what}");
                        assert_eq!(c["finish_reason"], "length", "{what}");
                    } else {
                        assert_eq!(tail, want_tail, "{what}");
                        assert_eq!(ids.len(), 4);
                    }
                }
            }
        }
        // The long prompt went to the prefill tier each time, cache or
        // not; the short one was scored on the decode worker.
        assert_eq!(counter(&cluster.router, remote).await - before.0, 4.0);
        assert_eq!(counter(&cluster.router, local).await - before.1, 4.0);

        // gRPC: every prompt token, the first unscored, two alternatives.
        let (scores, ids) = scores_plain(&ps[0], 2, 3);
        let mut client = grpc_client(&cluster).await;
        let mut req = greedy_request(&ps[0]);
        let s = req.sampling.as_mut().unwrap();
        s.prompt_logprobs = Some(2);
        s.max_tokens = Some(3);
        let r = client.generate(req).await.expect("Generate").into_inner();
        assert_eq!(r.token_ids, ids);
        assert_eq!(r.prompt_logprobs.len(), scores.len());
        for (j, (e, (id, want, top))) in r.prompt_logprobs.iter().zip(&scores).enumerate() {
            assert_eq!(e.token_id, *id, "position {j}");
            // JSON carries the f32 values as f64 text (parsed to the nearest
            // f32, they are exact).
            assert_eq!(e.logprob, want.map(|w| w as f32), "position {j}");
            let top: Vec<(u32, f32)> = top
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
                .collect();
            let got: Vec<(u32, f32)> = e.top.iter().map(|t| (t.token_id, t.logprob)).collect();
            assert_eq!(got, top, "position {j}");
            // The rank agrees with the alternatives: 1 + the likelier ones.
            if j > 0 {
                let rank = e.rank.expect("a rank") as usize;
                match top.iter().position(|t| t.0 == *id) {
                    Some(at) => assert_eq!(rank, at + 1, "position {j}"),
                    None => assert!(rank > top.len(), "position {j}"),
                }
            }
        }
        // vLLM's shape over HTTP: the same numbers, keyed by token id.
        let body = json!({
            "model": model_name(), "prompt": ps[0], "max_tokens": 3,
            "temperature": 0, "prompt_logprobs": 2,
        });
        let v = api_json(&cluster, "completions", &body).await;
        let pl = v["choices"][0]["prompt_logprobs"].as_array().unwrap();
        assert_eq!(pl.len(), scores.len());
        assert!(pl[0].is_null());
        for (j, (e, (id, want, _))) in pl.iter().zip(&scores).enumerate().skip(1) {
            let own = &e[id.to_string()];
            assert_eq!(own["logprob"].as_f64().map(|x| x as f32), want.map(|w| w as f32), "position {j}");
            assert_eq!(own["rank"], r.prompt_logprobs[j].rank.unwrap(), "position {j}");
        }
        // Streamed, the scores come on one message before the first token.
        let mut req = greedy_request(&ps[0]);
        let s = req.sampling.as_mut().unwrap();
        s.prompt_logprobs = Some(2);
        s.max_tokens = Some(3);
        let mut st = client.generate_stream(req).await.expect("GenerateStream").into_inner();
        let mut msgs = Vec::new();
        while let Some(m) = st.message().await.expect("stream message") {
            msgs.push(m);
        }
        let first = msgs.iter().position(|m| !m.prompt_logprobs.is_empty()).expect("scores sent");
        assert_eq!(msgs[first].prompt_logprobs, r.prompt_logprobs);
        assert!(msgs[..=first].iter().all(|m| m.token_ids.is_empty()), "scores before tokens");
        assert_eq!(msgs.iter().filter(|m| !m.prompt_logprobs.is_empty()).count(), 1);
        let streamed: Vec<u32> = msgs.iter().flat_map(|m| m.token_ids.clone()).collect();
        assert_eq!(streamed, ids);
    });
}

/// Structured output through the cluster: the prefill worker samples the
/// first token under the grammar's mask, the decode worker the rest; the
/// text is the plain path's, streamed or not, and whole JSON (matching the
/// schema) when it stops.
#[test]
fn structured_output_is_the_plain_paths_on_both_tiers() {
    const JSON_TOKENS: u32 = 64;
    // The first two complete their object; the last runs out of tokens.
    let asks = [
        "Give me a JSON object describing a cat with its name and age.",
        "Return a JSON object with the key \"city\" set to the capital of France.",
        "Give the capital cities of France and Spain in JSON.",
    ];
    let plain: Vec<_> = asks
        .iter()
        .map(|q| generate_plain_with(q, true, JSON_TOKENS, &["--json-object".to_string()]))
        .collect();
    let cluster = Cluster::start(1, 1, 1, &["--disagg-max-cached-fraction", "1"]);
    rt().block_on(async {
        let http = reqwest::Client::new();
        let url = format!("{}/chat/completions", cluster.base_url());
        let mut whole = 0;
        for (q, (text, _, _)) in asks.iter().zip(&plain) {
            let body = |stream: bool| {
                json!({
                    "model": model_name(),
                    "messages": [{"role": "user", "content": q}],
                    "max_tokens": JSON_TOKENS,
                    "temperature": 0,
                    "response_format": {"type": "json_object"},
                    "stream": stream,
                })
            };
            let v = api_json(&cluster, "chat/completions", &body(false)).await;
            let got = v["choices"][0]["message"]["content"].as_str().unwrap();
            assert_eq!(got, text.trim_start_matches(' '), "{q}");
            if check_json_object(got, &v["choices"][0]["finish_reason"]) {
                whole += 1;
            }
            // Streamed, the same text.
            let r = http.post(&url).json(&body(true)).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let mut streamed = String::new();
            for ev in sse_events(r).await {
                if ev == "[DONE]" {
                    continue;
                }
                let c: Value = serde_json::from_str(&ev).unwrap();
                if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
                    streamed += t;
                }
            }
            assert_eq!(streamed, got, "{q}");
        }
        assert_eq!(whole, 2, "JSON objects completed");
        // A schema, over gRPC: the plain path's tokens, valid against it.
        let schema = r#"{"type": "object", "properties": {"name": {"type": "string"},
            "age": {"type": "integer"}}, "required": ["name", "age"],
            "additionalProperties": false}"#;
        let (text, ids, _) = generate_plain_with(
            asks[0],
            true,
            JSON_TOKENS,
            &["--json-schema".to_string(), schema.to_string()],
        );
        let mut client = grpc_client(&cluster).await;
        let req = g::GenerateRequest {
            model: String::new(),
            input: Some(g::Input::Messages(g::ChatMessages {
                messages: vec![g::ChatMessage {
                    role: "user".into(),
                    content: asks[0].into(),
                }],
            })),
            sampling: Some(g::SamplingParams {
                max_tokens: Some(JSON_TOKENS),
                temperature: Some(0.0),
                json_schema: schema.into(),
                ..Default::default()
            }),
            request_id: String::new(),
        };
        let r = client.generate(req).await.expect("Generate").into_inner();
        assert_eq!(r.token_ids, ids);
        let v: Value = serde_json::from_str(&r.text).expect("whole JSON");
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 2, "{text}");
        assert!(o["name"].is_string() && o["age"].is_i64(), "{text}");
        let remote = r#"tandem_router_dispatched_total{prefill="remote"}"#;
        assert_eq!(counter(&cluster.router, remote).await, 7.0);

        // Parallel sampled choices each keep their own grammar: every one is
        // a JSON object's start (whole when it stops), and choice 0 is what
        // the same seed gives alone.
        let sampled = |n: usize| {
            json!({
                "model": model_name(),
                "messages": [{"role": "user", "content": asks[0]}],
                "max_tokens": JSON_TOKENS,
                "temperature": 1.0,
                "seed": 11,
                "n": n,
                "response_format": {"type": "json_object"},
            })
        };
        let v = api_json(&cluster, "chat/completions", &sampled(3)).await;
        let choices = v["choices"].as_array().expect("choices");
        assert_eq!(choices.len(), 3, "{v}");
        let texts: Vec<&str> = choices
            .iter()
            .map(|c| c["message"]["content"].as_str().unwrap())
            .collect();
        for (c, t) in choices.iter().zip(&texts) {
            check_json_object(t, &c["finish_reason"]);
        }
        assert!(texts[1..].iter().any(|t| t != &texts[0]), "{texts:?}");
        let alone = api_json(&cluster, "chat/completions", &sampled(1)).await;
        assert_eq!(
            alone["choices"][0]["message"]["content"].as_str().unwrap(),
            texts[0]
        );

        // vLLM's guided_choice (chat) and guided_regex (a short completion,
        // prefilled on the decode worker): the plain path's text, held to
        // the constraint.
        let yes_no = "Is the sky blue? Answer yes or no.";
        let (plain_choice, _, _) = generate_plain_with(
            yes_no,
            true,
            JSON_TOKENS,
            &["--choice", "yes", "--choice", "no"].map(String::from),
        );
        let body = json!({
            "model": model_name(),
            "messages": [{"role": "user", "content": yes_no}],
            "max_tokens": JSON_TOKENS,
            "temperature": 0,
            "guided_choice": ["yes", "no"],
        });
        let v = api_json(&cluster, "chat/completions", &body).await;
        let got = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(got == "yes" || got == "no", "{v}");
        assert_eq!(got, plain_choice);
        let rx = "[0-9]{3}-[0-9]{4}";
        let (plain_rx, _, _) = generate_plain_with(
            "My phone number is",
            false,
            JSON_TOKENS,
            &["--regex".into(), rx.into()],
        );
        let body = json!({
            "model": model_name(),
            "prompt": "My phone number is",
            "max_tokens": JSON_TOKENS,
            "temperature": 0,
            "structured_outputs": {"regex": rx},
        });
        let v = api_json(&cluster, "completions", &body).await;
        let got = v["choices"][0]["text"].as_str().unwrap();
        assert_eq!(got, plain_rx);
        let b = got.as_bytes();
        assert!(
            b.len() == 8
                && b[3] == b'-'
                && b.iter()
                    .enumerate()
                    .all(|(i, c)| i == 3 || c.is_ascii_digit()),
            "{got:?}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");

        // A schema the grammar compiler refuses is the client's error.
        let body = json!({
            "model": model_name(),
            "messages": [{"role": "user", "content": asks[0]}],
            "response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}},
        });
        let r = http.post(&url).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("no-such-type"),
            "{v}"
        );
    });
}

/// Workers killed under load: requests complete, with the right tokens.
mod faults {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    const REQUESTS: usize = 200;
    const CONCURRENCY: usize = 8;
    const TOKENS: u32 = 24;

    fn fault_prompts() -> Vec<String> {
        [
            "Once upon a time, in a quiet village by the sea,",
            "The three most important things about cooking rice are",
            "Dear diary, today I finally learned how to",
            "In the year 2150, the first city on Mars",
            "A good way to start learning the piano is",
            "The old lighthouse keeper looked at the storm and",
            "Here is a list of fruits that are rich in vitamin C:",
            "The train left the station at dawn, carrying",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// One streamed completion (sampled, seeded): its text, or the error.
    /// Odd seeds ask for JSON mode, so that a stream resumed on another
    /// worker resumes its grammar too; seeds 2 mod 4 for the prompt echoed
    /// with its scores, which a stream resumed before its first token must
    /// not send twice.
    async fn stream_text(
        http: &reqwest::Client,
        base: &str,
        prompt: &str,
        seed: u64,
    ) -> Result<String, String> {
        let mut body = json!({
            "model": model_name(), "prompt": prompt, "max_tokens": TOKENS,
            "temperature": 0.8, "seed": seed, "stream": true,
        });
        if seed % 2 == 1 {
            body["response_format"] = json!({"type": "json_object"});
        }
        if seed % 4 == 2 {
            body["echo"] = json!(true);
            body["logprobs"] = json!(1);
        }
        let r = http
            .post(format!("{base}/completions"))
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!(
                "HTTP {}: {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ));
        }
        let mut text = String::new();
        let mut done = false;
        for e in sse_events(r).await {
            if e == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(&e).map_err(|e| e.to_string())?;
            if let Some(err) = v.get("error") {
                return Err(err.to_string());
            }
            if let Some(t) = v["choices"][0]["text"].as_str() {
                text.push_str(t);
            }
            // The echoed prompt's scores start with the unscored first token.
            let first = &v["choices"][0]["logprobs"]["token_logprobs"][0];
            if first.is_null() && seed % 4 == 2 && v["choices"][0]["logprobs"].is_object() {
                text.push_str("<scored>");
            }
        }
        if seed % 4 == 2 && !text.starts_with(&format!("{prompt}<scored>")) {
            return Err(format!(
                "the prompt was not echoed once with its scores: {text:?}"
            ));
        }
        if !done {
            return Err("stream ended without [DONE]".into());
        }
        Ok(text)
    }

    /// Runs REQUESTS requests CONCURRENCY at a time; calls `fault` once
    /// `after` of them have completed. Returns (correct, failed) and panics
    /// on a wrong answer.
    fn load_with_fault(
        cluster: &mut Cluster,
        after: usize,
        fault: impl FnOnce(&mut Cluster),
    ) -> (usize, usize) {
        let rt = rt();
        let base = cluster.base_url();
        let prompts = fault_prompts();
        let http = reqwest::Client::new();
        // The expected text of each (prompt, seed), before any fault.
        let expected: Vec<String> = rt.block_on(async {
            let mut v = Vec::new();
            for (i, p) in prompts.iter().enumerate() {
                v.push(
                    stream_text(&http, &base, p, i as u64)
                        .await
                        .expect("fault-free request"),
                );
            }
            v
        });
        for json in expected.iter().skip(1).step_by(2) {
            assert!(
                json.trim_start().starts_with('{'),
                "JSON mode wrote {json:?}"
            );
        }
        let done = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let next = Arc::new(AtomicUsize::new(0));
        let runner = {
            let (done, failed, next) = (done.clone(), failed.clone(), next.clone());
            let (base, prompts, expected, http) = (
                base.clone(),
                prompts.clone(),
                expected.clone(),
                http.clone(),
            );
            rt.spawn(async move {
                let mut tasks = Vec::new();
                for _ in 0..CONCURRENCY {
                    let (done, failed, next) = (done.clone(), failed.clone(), next.clone());
                    let (base, prompts, expected, http) = (
                        base.clone(),
                        prompts.clone(),
                        expected.clone(),
                        http.clone(),
                    );
                    tasks.push(tokio::spawn(async move {
                        loop {
                            let i = next.fetch_add(1, Ordering::SeqCst);
                            if i >= REQUESTS {
                                return;
                            }
                            let k = i % prompts.len();
                            let r = tokio::time::timeout(
                                Duration::from_secs(120),
                                stream_text(&http, &base, &prompts[k], k as u64),
                            )
                            .await
                            .unwrap_or_else(|_| Err("timed out".into()));
                            match r {
                                Ok(text) => {
                                    assert_eq!(
                                        text, expected[k],
                                        "request {i} ({:?}) came back wrong",
                                        prompts[k]
                                    );
                                    done.fetch_add(1, Ordering::SeqCst);
                                }
                                Err(e) => {
                                    eprintln!("request {i} failed: {e}");
                                    failed.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                        }
                    }));
                }
                for t in tasks {
                    t.await.expect("a request task panicked");
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        while done.load(Ordering::SeqCst) + failed.load(Ordering::SeqCst) < after {
            assert!(Instant::now() < deadline, "load did not progress");
            std::thread::sleep(Duration::from_millis(20));
        }
        fault(cluster);
        rt.block_on(runner).expect("load runner");
        let (ok, bad) = (done.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
        println!("{REQUESTS} requests: {ok} completed correctly, {bad} failed");
        (ok, bad)
    }

    /// 1 router + 2 prefill + 2 decode workers found through a real etcd.
    /// (etcd first: locals drop in reverse, so the cluster stops before etcd.)
    fn etcd_cluster(prefix: &str) -> (tandem_tests::etcd::Etcd, Cluster) {
        let etcd = {
            let _turn = tandem_tests::one_at_a_time();
            tandem_tests::etcd::Etcd::start()
        };
        let cluster = Cluster::start_spec(tandem_tests::ClusterSpec {
            prefill: 2,
            decode: 2,
            threads: 1,
            etcd: Some((etcd.endpoint(), prefix.into())),
            ..Default::default()
        });
        rt().block_on(async {
            let deadline = Instant::now() + Duration::from_secs(20);
            for role in ["decode", "prefill"] {
                let line = format!("tandem_router_workers{{worker_role=\"{role}\"}}");
                while counter(&cluster.router, &line).await < 2.0 {
                    assert!(
                        Instant::now() < deadline,
                        "the router never saw 2 {role} workers"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        (etcd, cluster)
    }

    /// After the load: nothing left running or reserved on the decode workers.
    fn decode_workers_idle(cluster: &Cluster, alive: &[usize]) {
        rt().block_on(async {
            for &i in alive {
                let l = wait_load(&cluster.decode[i], Duration::from_secs(10), |l| {
                    l.in_flight == 0 && l.running == 0 && l.waiting == 0
                })
                .await;
                assert_eq!(
                    l.free_blocks + l.cached_blocks,
                    l.total_blocks,
                    "decode worker {i} leaked KV blocks: {l:?}"
                );
            }
        });
    }

    /// Runs the load with `fault` on a two-by-two cluster: every request
    /// completes with its fault-free answer, and the decode workers in
    /// `idle` end with nothing running and no KV block held.
    fn loses_no_request(
        prefix: &str,
        what: &str,
        fault: impl FnOnce(&mut Cluster),
        idle: &[usize],
    ) {
        let (_etcd, mut cluster) = etcd_cluster(prefix);
        let (ok, bad) = load_with_fault(&mut cluster, 40, fault);
        assert_eq!(ok + bad, REQUESTS);
        assert_eq!(bad, 0, "requests failed after {what}");
        decode_workers_idle(&cluster, idle);
    }

    #[test]
    fn a_decode_worker_killed_mid_run_loses_no_request() {
        let fault = |c: &mut Cluster| c.decode[1].kill();
        loses_no_request("/e2e-kill-decode", "a decode worker died", fault, &[0]);
    }

    /// Reservations for transfers that died with the worker are freed.
    #[test]
    fn a_prefill_worker_killed_mid_run_loses_no_request() {
        let fault = |c: &mut Cluster| c.prefill[1].kill();
        loses_no_request("/e2e-kill-prefill", "a prefill worker died", fault, &[0, 1]);
    }

    /// Stops a node's process (SIGSTOP): it keeps its sockets open and
    /// answers nothing, as a hung machine or a long GC pause would.
    fn freeze(node: &Node) {
        let pid = node.child.id() as i32;
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { super::libc_kill(pid, 19) }, 0, "SIGSTOP");
    }

    /// A decode worker that hangs without closing its connections: the
    /// router's HTTP/2 keep-alive finds it silent, and its streams resume
    /// on the other decode worker, exactly.
    #[test]
    fn a_frozen_decode_worker_loses_no_request() {
        let fault = |c: &mut Cluster| freeze(&c.decode[1]);
        loses_no_request("/e2e-freeze-decode", "a decode worker froze", fault, &[0]);
    }

    /// A prefill worker that hangs mid-transfer: the decode workers' calls
    /// to it time out on keep-alive, their reserved blocks are freed, and
    /// the router prefills those prompts elsewhere.
    #[test]
    fn a_frozen_prefill_worker_loses_no_request() {
        let fault = |c: &mut Cluster| freeze(&c.prefill[1]);
        loses_no_request(
            "/e2e-freeze-prefill",
            "a prefill worker froze",
            fault,
            &[0, 1],
        );
    }
}

/// Every role's /metrics passes `promtool check metrics` (Debian
/// `prometheus`, installed by the setup script): help text, units, naming.
#[test]
fn every_node_exposes_metrics_that_promtool_accepts() {
    let promtool = std::path::Path::new("/usr/bin/promtool");
    assert!(
        promtool.exists(),
        "promtool is missing; the setup script installs the Debian package `prometheus`"
    );
    let cluster = Cluster::start(1, 1, 1, &[]);
    rt().block_on(async {
        let http = reqwest::Client::new();
        let r = http
            .post(format!("{}/completions", cluster.base_url()))
            .json(
                &json!({"model": model_name(), "prompt": "Metrics, please:", "max_tokens": 4,
                "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body = r.text().await.unwrap();
        let completion: f64 = body
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l.strip_prefix("data: ")?).ok())
            .find_map(|v| v["usage"]["completion_tokens"].as_f64())
            .expect("usage in the stream");
        assert!(completion >= 1.0, "{body}");
        // Worker gauges are published once a second.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        // The field's names, as bucketed histograms, with the node labels.
        let nodes: [(&str, &Node, &[&str]); 3] = [
            (
                "router",
                &cluster.router,
                &[
                    "tandem_requests_total{",
                    "tandem_time_to_first_token_seconds_bucket{",
                    "tandem_inter_token_latency_seconds_bucket{",
                    "tandem_request_duration_seconds_bucket{",
                    "tandem_request_queue_time_seconds_bucket{",
                    "tandem_request_prefill_time_seconds_bucket{",
                    "tandem_request_decode_time_seconds_bucket{",
                    "tandem_router_dispatch_seconds_bucket{",
                    "tandem_router_relay_seconds_bucket{",
                    "tandem_router_workers{",
                ],
            ),
            (
                "prefill",
                &cluster.prefill[0],
                &[
                    "tandem_request_queue_time_seconds_bucket{",
                    "tandem_request_prefill_time_seconds_bucket{",
                    "tandem_kv_transfer_seconds_bucket{",
                    "tandem_kv_transfer_bytes_total{",
                    "tandem_stage_requests{",
                    "tandem_kv_blocks_used{",
                ],
            ),
            (
                "decode",
                &cluster.decode[0],
                &[
                    "tandem_time_to_first_token_seconds_bucket{",
                    "tandem_inter_token_latency_seconds_bucket{",
                    "tandem_request_duration_seconds_bucket{",
                    "tandem_request_queue_time_seconds_bucket{",
                    "tandem_request_prefill_time_seconds_bucket{",
                    "tandem_request_decode_time_seconds_bucket{",
                    "tandem_kv_transfer_seconds_bucket{",
                    "tandem_stage_requests{",
                    "tandem_kv_blocks_used{",
                    "tandem_generated_tokens_total{",
                ],
            ),
        ];
        for (role, node, must) in nodes {
            let text = http
                .get(format!("http://{}/metrics", node.addr()))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            for m in must {
                let line = text.lines().find(|l| l.starts_with(m));
                let line = line.unwrap_or_else(|| panic!("{role} /metrics lacks {m}:\n{text}"));
                let model = format!("model=\"{}\"", model_name());
                let role_label = format!("role=\"{role}\"");
                assert!(
                    line.contains(&model)
                        && line.contains(&role_label)
                        && line.contains("worker_id=\""),
                    "{role}: {line} lacks the node labels"
                );
            }
            assert!(
                !text.contains("quantile=\""),
                "{role} exports summaries:\n{text}"
            );
            if role != "prefill" {
                // One request: one first token, a gap before each other token.
                let count = |name: &str| -> f64 {
                    text.lines()
                        .filter(|l| l.starts_with(&format!("{name}_count{{")))
                        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                        .sum()
                };
                assert_eq!(count("tandem_time_to_first_token_seconds"), 1.0, "{role}");
                assert_eq!(
                    count("tandem_inter_token_latency_seconds"),
                    completion - 1.0,
                    "{role}"
                );
                assert_eq!(count("tandem_request_decode_time_seconds"), 1.0, "{role}");
            }
            use std::io::Write;
            let mut child = Command::new(promtool)
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool rejects the {role}'s metrics:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });
}

/// `--device cuda` on a machine or binary without CUDA is a clear error
/// before any work, for `generate` and for a worker; a device name that does
/// not exist is refused by the argument parser.
#[test]
fn an_unavailable_device_is_a_clear_error() {
    for args in [
        vec![
            "generate",
            "--device",
            "cuda",
            "--prompt",
            "hi",
            "--max-tokens",
            "1",
        ],
        vec![
            "decode",
            "--device",
            "cuda-bf16:1",
            "--port",
            "0",
            "--peers",
            "router=127.0.0.1:9",
        ],
        vec![
            "generate", "--device", "cuda", "--tp", "2", "--prompt", "hi",
        ],
    ] {
        let out = Command::new(tandem_bin())
            .args(&args)
            .env("TANDEM_MODEL", model_path())
            .env("TANDEM_CLUSTER_SECRET", SECRET)
            .output()
            .expect("running tandem");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            err.contains("CUDA") || err.contains("CPU only"),
            "{args:?}: {err}"
        );
    }
    let out = Command::new(tandem_bin())
        .args(["generate", "--device", "tpu", "--prompt", "hi"])
        .output()
        .expect("running tandem");
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected cpu, cuda"));
}
