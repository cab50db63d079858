//! Parallel sampling (`n > 1`) through the router's OpenAI API: the choices
//! of one request share the prompt's KV on the decode worker (one decode
//! call, forked blocks), and each choice gives exactly the tokens of a
//! single-choice request with its key: choice `i` of a request with seed
//! `S` samples with `(S, key i)`. Choice 0 is checked against the public API
//! (`n = 1` with the same seed); every choice against single-choice `Decode`
//! calls made directly to the decode worker with that choice's key.

use futures_util::StreamExt;
use serde_json::{json, Value};
use tandem_proto::worker as w;
use tandem_tests::{model_path, Cluster, SECRET};

use super::{model_name, sse_events, wait_load, worker_load};

const N: usize = 3;
const SEED: u64 = 1234;
const MAX: u32 = 14;
const TEMPERATURE: f32 = 0.8;

/// The prompt (token ids) and the tokenizer, to read the reference tokens.
fn setup() -> (Vec<u32>, tandem_model::tokenizer::Tokenizer) {
    let src = tandem_model::weights::ModelSource::open(&model_path()).expect("opening the model");
    let tok = src.tokenizer().expect("tokenizer");
    let prompt = tok
        .encode("Three things I would take to a desert island are", false)
        .expect("encode");
    (prompt, tok)
}

/// The ids the router stops on: the model's EOS and end-of-turn tokens.
fn stop_ids(tok: &tandem_model::tokenizer::Tokenizer) -> Vec<u32> {
    let mut ids = tok.eos_ids().to_vec();
    if let Some(id) = tok.token_to_id("<|im_end|>") {
        if tok.is_special(id) && !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// One choice with key `key`, run as its own request on the decode worker.
async fn reference(cluster: &Cluster, prompt: &[u32], stops: &[u32], key: u64) -> Vec<u32> {
    let mut c = w::WorkerClient::connect(format!("http://{}", cluster.decode[0].addr()))
        .await
        .unwrap();
    let mut req = tonic::Request::new(w::DecodeRequest {
        request_id: format!("reference-{key}"),
        prompt: prompt.to_vec(),
        sampling: Some(w::WorkerSampling {
            temperature: TEMPERATURE,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: SEED,
            request_key: key,
            logprobs: false,
            top_logprobs: 0,
            min_tokens: 0,
            min_tokens_masked: Vec::new(),
            logit_bias: Vec::new(),
            json_object: false,
            json_schema: String::new(),
            regex: String::new(),
            choice: Vec::new(),
            prompt_logprobs: None,
        }),
        max_tokens: Some(MAX),
        stop_token_ids: stops.to_vec(),
        priority: 0,
        prefill_address: String::new(),
        generated: Vec::new(),
        n: 1,
        adapter: String::new(),
    });
    req.metadata_mut()
        .insert(w::SECRET_METADATA, SECRET.parse().unwrap());
    let mut stream = c.decode(req).await.expect("Decode").into_inner();
    let mut ids = Vec::new();
    while let Some(ev) = stream.message().await.expect("decode stream") {
        assert_eq!(ev.index, 0);
        match ev.kind {
            Some(w::DecodeEventKind::Token(t)) => ids.push(t.token_id),
            Some(w::DecodeEventKind::Finished(_)) => return ids,
            Some(w::DecodeEventKind::Error(e)) => panic!("reference failed: {e:?}"),
            _ => {}
        }
    }
    panic!("reference stream ended without finishing");
}

/// Decode calls the router made, with the prompt prefilled `where`
/// ("local" or "remote"), whatever other labels the series carries.
async fn dispatched(cluster: &Cluster, place: &str) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", cluster.router.addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let label = format!("prefill=\"{place}\"");
    text.lines()
        .filter(|l| l.starts_with(tandem_cluster::metrics::ROUTER_DISPATCHED) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn body(prompt: &[u32], n: usize, stream: bool) -> Value {
    json!({
        "model": model_name(),
        "prompt": prompt,
        "max_tokens": MAX,
        "temperature": TEMPERATURE,
        "seed": SEED,
        "n": n,
        "stream": stream,
    })
}

/// Texts of the choices and the completion tokens of a non-streamed request.
async fn complete(cluster: &Cluster, prompt: &[u32], n: usize) -> (Vec<String>, u64) {
    let r = reqwest::Client::new()
        .post(format!("{}/completions", cluster.base_url()))
        .json(&body(prompt, n, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), n);
    let texts = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i);
            c["text"].as_str().unwrap().to_string()
        })
        .collect();
    (texts, v["usage"]["completion_tokens"].as_u64().unwrap())
}

/// Texts of the choices of a streamed request, put together by index.
async fn streamed(cluster: &Cluster, prompt: &[u32], n: usize) -> Vec<String> {
    let r = reqwest::Client::new()
        .post(format!("{}/completions", cluster.base_url()))
        .json(&body(prompt, n, true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut texts = vec![String::new(); n];
    let mut finished = vec![false; n];
    for e in sse_events(r).await {
        if e == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&e).unwrap();
        for c in v["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            texts[i].push_str(c["text"].as_str().unwrap_or(""));
            finished[i] |= !c["finish_reason"].is_null();
        }
    }
    assert!(
        finished.iter().all(|f| *f),
        "every choice finishes: {finished:?}"
    );
    texts
}

fn check(cluster: Cluster) {
    let (prompt, tok) = setup();
    let stops = stop_ids(&tok);
    super::rt().block_on(async {
        let mut want_ids = Vec::new();
        for i in 0..N {
            want_ids.push(reference(&cluster, &prompt, &stops, i as u64).await);
        }
        let want: Vec<String> = want_ids
            .iter()
            .map(|ids| tok.decode(ids, true).unwrap())
            .collect();
        assert!(
            want.iter().any(|t| t != &want[0]),
            "the seeds should give different choices: {want:?}"
        );

        // One decode call (prefilled once) carries every choice.
        let calls = || async {
            (
                dispatched(&cluster, "local").await,
                dispatched(&cluster, "remote").await,
            )
        };
        let before = calls().await;
        let (got, completion) = complete(&cluster, &prompt, N).await;
        let after = calls().await;
        let (local, remote) = (after.0 - before.0, after.1 - before.1);
        assert_eq!(local + remote, 1.0, "one decode call for {N} choices");
        assert_eq!(remote, if cluster.prefill.is_empty() { 0.0 } else { 1.0 });
        assert_eq!(got, want, "non-streamed choices");
        let total: usize = want_ids.iter().map(Vec::len).sum();
        assert!(completion as usize >= total, "usage counts every choice");
        assert_eq!(
            streamed(&cluster, &prompt, N).await,
            want,
            "streamed choices"
        );

        // Choice 0 is the single-choice request with the same seed.
        let (one, _) = complete(&cluster, &prompt, 1).await;
        assert_eq!(one[0], want[0]);

        // Nothing but the prefix cache keeps blocks afterwards.
        let idle = wait_load(
            &cluster.decode[0],
            std::time::Duration::from_secs(10),
            |l| l.running == 0 && l.waiting == 0 && l.in_flight == 0,
        )
        .await;
        assert_eq!(
            idle.free_blocks + idle.cached_blocks,
            idle.total_blocks,
            "blocks leaked: {idle:?}"
        );
        for p in &cluster.prefill {
            let l = worker_load(p).await;
            assert_eq!(
                l.free_blocks + l.cached_blocks,
                l.total_blocks,
                "prefill: {l:?}"
            );
        }
    });
}

#[test]
fn parallel_choices_disaggregated_equal_single_choice_requests() {
    check(Cluster::start(1, 1, 1, &[]));
}

#[test]
fn parallel_choices_colocated_equal_single_choice_requests() {
    check(Cluster::start(0, 1, 1, &[]));
}

/// A choice ended early by a stop string is cancelled on the worker alone;
/// the others finish, and no block leaks.
#[test]
fn a_choice_cut_by_a_stop_string_leaves_the_others_running() {
    let (prompt, _) = setup();
    let cluster = Cluster::start(1, 1, 1, &[]);
    super::rt().block_on(async {
        // Without a stop string first, to pick one that ends one choice early.
        let (full, _) = complete(&cluster, &prompt, N).await;
        let (cut_at, stop) = full
            .iter()
            .enumerate()
            .find_map(|(i, t)| {
                let words: Vec<&str> = t.split_whitespace().collect();
                (words.len() > 3
                    && !full
                        .iter()
                        .enumerate()
                        .any(|(j, o)| j != i && o.contains(words[1])))
                .then(|| (i, words[1].to_string()))
            })
            .unwrap_or((usize::MAX, String::new()));
        if cut_at == usize::MAX {
            eprintln!("no stop string unique to one choice in {full:?}; skipping the cut");
            return;
        }
        let mut b = body(&prompt, N, true);
        b["stop"] = json!([stop]);
        let r = reqwest::Client::new()
            .post(format!("{}/completions", cluster.base_url()))
            .json(&b)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut texts = vec![String::new(); N];
        let mut stream = r.bytes_stream();
        let mut raw = String::new();
        while let Some(chunk) = stream.next().await {
            raw.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        }
        for e in raw
            .split("\n\n")
            .filter_map(|e| e.trim().strip_prefix("data:"))
        {
            let e = e.trim();
            if e == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(e).unwrap();
            for c in v["choices"].as_array().unwrap() {
                let i = c["index"].as_u64().unwrap() as usize;
                texts[i].push_str(c["text"].as_str().unwrap_or(""));
            }
        }
        for (i, t) in texts.iter().enumerate() {
            if i == cut_at {
                assert!(
                    full[i].starts_with(t.as_str()) && t.len() < full[i].len(),
                    "choice {i} cut: {t:?} of {:?}",
                    full[i]
                );
            } else {
                assert_eq!(t, &full[i], "choice {i} unaffected");
            }
        }
        let idle = wait_load(
            &cluster.decode[0],
            std::time::Duration::from_secs(10),
            |l| l.running == 0 && l.waiting == 0 && l.in_flight == 0,
        )
        .await;
        assert_eq!(
            idle.free_blocks + idle.cached_blocks,
            idle.total_blocks,
            "blocks leaked: {idle:?}"
        );
    });
}

/// Completion of `prompt` (greedy) with `extra` fields: the text, each
/// token's string (from `logprobs`), the completion tokens and why it ended.
async fn greedy(
    cluster: &Cluster,
    prompt: &str,
    extra: Value,
) -> (String, Vec<String>, u64, String) {
    let mut body = json!({
        "model": model_name(),
        "prompt": prompt,
        "temperature": 0,
        "logprobs": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = reqwest::Client::new()
        .post(format!("{}/completions", cluster.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{body}");
    let v: Value = r.json().await.unwrap();
    let c = &v["choices"][0];
    let tokens = c["logprobs"]["tokens"]
        .as_array()
        .expect("logprobs.tokens")
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    (
        c["text"].as_str().unwrap().to_string(),
        tokens,
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        c["finish_reason"].as_str().unwrap().to_string(),
    )
}

/// `ignore_eos` and `min_tokens` (vLLM's extensions, sent by load
/// generators such as guidellm) on the real model, disaggregated: the first
/// token is sampled on the prefill worker, so the stop tokens must be
/// masked there too.
#[test]
fn ignore_eos_and_min_tokens_hold_the_sequence_open() {
    let cluster = Cluster::start(1, 1, 1, &[]);
    super::rt().block_on(async {
        // A completion that ends on the model's end-of-text token early.
        let prompt = "<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\n";
        let (text, tokens, _, finish) = greedy(&cluster, prompt, json!({"max_tokens": 40})).await;
        assert_eq!(finish, "stop", "the model should end by itself: {text:?}");
        let k = tokens.len();
        assert!(k < 30, "{tokens:?}");

        // ignore_eos: runs to max_tokens, through the end-of-text token.
        let max = k + 6;
        let (t, toks, n, f) = greedy(
            &cluster,
            prompt,
            json!({"max_tokens": max, "ignore_eos": true}),
        )
        .await;
        assert_eq!((f.as_str(), n as usize, toks.len()), ("length", max, max));
        assert_eq!(toks[..k], tokens[..], "same tokens up to the end of text");
        assert!(t.starts_with(&text), "{t:?} vs {text:?}");

        // min_tokens: the end-of-text token is masked until then, so the
        // completion goes on past it; the tokens before it do not change.
        let min = k + 3;
        let (_, toks, n, _) = greedy(
            &cluster,
            prompt,
            json!({"max_tokens": 40, "min_tokens": min}),
        )
        .await;
        assert!(toks.len() >= min && n as usize >= min, "{toks:?}");
        assert_eq!(toks[..k], tokens[..]);

        // The first token, sampled by the prefill worker.
        let before = dispatched(&cluster, "remote").await;
        let p = "The capital of France is";
        let (_, first, _, _) = greedy(&cluster, p, json!({"max_tokens": 3})).await;
        let ids = setup().1.encode(&first[0], false).expect("encode");
        assert_eq!(ids.len(), 1, "{:?} should be one token", first[0]);
        let t0 = ids[0];
        let (t, toks, _, f) = greedy(
            &cluster,
            p,
            json!({"max_tokens": 3, "stop_token_ids": [t0]}),
        )
        .await;
        assert_eq!((t.as_str(), toks.len(), f.as_str()), ("", 0, "stop"));
        let (_, toks, _, _) = greedy(
            &cluster,
            p,
            json!({"max_tokens": 3, "stop_token_ids": [t0], "min_tokens": 1}),
        )
        .await;
        assert!(
            !toks.is_empty() && toks[0] != first[0],
            "{toks:?} vs {first:?}"
        );
        let remote = dispatched(&cluster, "remote").await - before;
        assert_eq!(remote, 3.0, "all prefilled remotely");

        // Bad values are refused before any work.
        let r = reqwest::Client::new()
            .post(format!("{}/completions", cluster.base_url()))
            .json(&json!({"model": model_name(), "prompt": p, "max_tokens": 2, "min_tokens": 3}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], "min_tokens", "{v}");
    });
}
