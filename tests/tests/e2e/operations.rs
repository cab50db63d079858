//! Operating a cluster: discovery through a real etcd (outage, workers
//! joining under load), graceful drain, overload.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tandem_cluster::Role;
use tandem_tests::etcd::Etcd;
use tandem_tests::ClusterSpec;

use super::*;

/// A small completion; `Err` carries the status or the error text.
async fn complete(
    http: &reqwest::Client,
    base: &str,
    prompt: &str,
    tokens: u32,
) -> Result<Value, String> {
    let r = http
        .post(format!("{base}/completions"))
        .json(&json!({"model": model_name(), "prompt": prompt, "max_tokens": tokens, "temperature": 0}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let v: Value = r.json().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(v)
    } else {
        Err(format!("HTTP {status}: {v}"))
    }
}

/// Requests `concurrency` at a time until `stop`; counts successes and
/// records every failure.
fn traffic(
    rt: &tokio::runtime::Runtime,
    base: String,
    concurrency: usize,
    stop: Arc<AtomicBool>,
) -> (tokio::task::JoinHandle<Vec<String>>, Arc<AtomicUsize>) {
    let ok = Arc::new(AtomicUsize::new(0));
    let ok2 = ok.clone();
    let h = rt.spawn(async move {
        let http = reqwest::Client::new();
        let mut tasks = Vec::new();
        for i in 0..concurrency {
            let (http, base, stop, ok) = (http.clone(), base.clone(), stop.clone(), ok2.clone());
            tasks.push(tokio::spawn(async move {
                let mut errors = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    let prompt =
                        format!("Request {i}-{n}: tell me about the weather in spring and");
                    match complete(&http, &base, &prompt, 8).await {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => errors.push(e),
                    }
                    n += 1;
                }
                errors
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    (h, ok)
}

/// Waits until `node` is serving a request; returns how long that took.
fn first_traffic(
    rt: &tokio::runtime::Runtime,
    node: &tandem_tests::Node,
    within: Duration,
) -> Duration {
    let t0 = Instant::now();
    rt.block_on(async {
        loop {
            let l = worker_load(node).await;
            if l.in_flight + l.running > 0 {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < within,
                "the new decode worker got no traffic within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// A real etcd, and one prefill and one decode worker of a thread each
/// that find each other and their router through it, under `prefix`.
fn etcd_cluster(prefix: &str, router_args: &[&str]) -> (Etcd, ClusterSpec, Cluster) {
    let etcd = {
        let _turn = tandem_tests::one_at_a_time();
        Etcd::start()
    };
    let spec = ClusterSpec {
        prefill: 1,
        decode: 1,
        threads: 1,
        etcd: Some((etcd.endpoint(), prefix.into())),
        router_args: router_args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    let cluster = Cluster::start_spec(spec.clone());
    (etcd, spec, cluster)
}

/// Waits until the router at `base`, which learns its workers from etcd,
/// serves a request.
async fn until_served(base: &str) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while complete(&http, base, "Hello", 2).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the router never saw its workers"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn etcd_outage_loses_no_request_and_new_workers_get_traffic_within_2s() {
    let (mut etcd, spec, cluster) = etcd_cluster("/e2e-outage", &[]);
    let rt = rt();
    let base = cluster.base_url();
    rt.block_on(until_served(&base));
    let stop = Arc::new(AtomicBool::new(false));
    let (load, ok) = traffic(&rt, base.clone(), 3, stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    // A decode worker joining under load gets traffic within 2 s of being ready.
    let joiner = Cluster::worker(&spec, Role::Decode);
    let took = first_traffic(&rt, &joiner, Duration::from_secs(2));
    println!(
        "a decode worker joining under load served its first request {took:?} after it was ready"
    );
    // etcd down for 10 s: serving goes on with the membership known.
    etcd.stop();
    let during = ok.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(10));
    let served_in_outage = ok.load(Ordering::SeqCst) - during;
    etcd.restart();
    // Membership converges once etcd is back: a worker that joins now is
    // found once the watch has reconnected (its backoff is capped at 5 s).
    let late = Cluster::worker(&spec, Role::Decode);
    let took = first_traffic(&rt, &late, Duration::from_secs(15));
    println!("after the outage, a new decode worker served its first request {took:?} after it was ready");
    stop.store(true, Ordering::SeqCst);
    let errors = rt.block_on(load).unwrap();
    assert!(errors.is_empty(), "requests failed: {errors:?}");
    assert!(
        served_in_outage > 0,
        "nothing was served while etcd was down"
    );
    println!(
        "served {} requests, {served_in_outage} of them while etcd was down",
        ok.load(Ordering::SeqCst)
    );
}

/// The only decode worker dies mid-stream and a new process takes its
/// address, announcing itself through etcd (its record differs: the KV
/// port is new), so the router connects to it afresh: the stream resumes
/// there, where before the router took the new connection for the one
/// that had failed the request and gave up after `--worker-wait-secs`.
#[test]
fn a_stream_resumes_on_a_decode_worker_restarted_through_etcd() {
    let (_etcd, spec, mut cluster) = etcd_cluster("/e2e-restart", &[]);
    rt().block_on(until_served(&cluster.base_url()));
    super::stream_across_a_restart(&mut cluster, |c| {
        let port = c.decode[0].addr().port();
        c.decode[0].kill();
        c.decode[0] = Cluster::worker_at(&spec, Role::Decode, port);
    });
}

/// Decode workers that join through etcd but could not serve every
/// request: one whose KV pool holds fewer tokens than a request needs
/// gets no such request while another can hold it (before, the least
/// loaded was picked and the client got its 400), though it still serves
/// those it can hold; one whose KV blocks differ in size from the
/// cluster's is refused at join (before, it was routed to, and its
/// refused hand-overs marked the healthy prefill worker down).
#[test]
fn decode_workers_get_only_requests_they_can_serve() {
    let (_etcd, spec, cluster) = etcd_cluster("/e2e-fit", &["--disagg-min-tokens", "16"]);
    let tiny_spec = ClusterSpec {
        decode_args: vec!["--kv-cache-memory".into(), "3MiB".into()],
        ..spec.clone()
    };
    let tiny = Cluster::worker(&tiny_spec, Role::Decode);
    let odd_spec = ClusterSpec {
        decode_args: vec!["--block-size".into(), "32".into()],
        ..spec.clone()
    };
    let odd = Cluster::worker(&odd_spec, Role::Decode);
    let rt = rt();
    let tiny_tokens = rt.block_on(worker_load(&tiny)).total_blocks * 16;
    assert!(
        tiny_tokens < 100,
        "the small pool holds {tiny_tokens} tokens"
    );
    let router = cluster.router.addr();
    let decode_members = r#"tandem_router_workers{worker_role="decode"}"#;
    rt.block_on(async {
        // The router has seen both joins: the small one is in, the odd one out.
        let deadline = Instant::now() + Duration::from_secs(20);
        while super::counter_at(router, decode_members).await != 2.0 {
            assert!(Instant::now() < deadline, "the small worker never joined");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(super::counter_at(router, decode_members).await, 2.0);

        let http = reqwest::Client::new();
        let base = cluster.base_url();
        // Long enough for the prefill tier, too long for the small pool;
        // sent together, so the idle small worker is the least loaded.
        let prompt = "Tell me a long story about a lighthouse keeper and the ships \
                      that pass by the rocks at night, with the storms of winter.";
        let mut tasks = Vec::new();
        for i in 0..6 {
            let (http, base) = (http.clone(), base.clone());
            let p = format!("{i}. {prompt}");
            tasks.push(tokio::spawn(async move {
                let body = json!({"model": model_name(), "prompt": p, "max_tokens": 80,
                                  "temperature": 0, "ignore_eos": true});
                let r = http
                    .post(format!("{base}/completions"))
                    .json(&body)
                    .send()
                    .await;
                let r = r.unwrap();
                (r.status(), r.json::<Value>().await.unwrap())
            }));
        }
        for t in tasks {
            let (status, v) = t.await.unwrap();
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["usage"]["completion_tokens"], 80, "{v}");
        }
        // Short ones still go to the small worker too.
        let mut tasks = Vec::new();
        for i in 0..4 {
            let (http, base) = (http.clone(), base.clone());
            tasks.push(tokio::spawn(async move {
                complete(&http, &base, &format!("Hi {i}"), 8).await
            }));
        }
        for t in tasks {
            t.await
                .unwrap()
                .unwrap_or_else(|e| panic!("a short request failed: {e}"));
        }
        // Workers publish their engine's counters once a second.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let served =
            |n: &tandem_tests::Node| super::counter_at(n.addr(), "tandem_generated_tokens_total");
        assert!(
            served(&tiny).await >= 1.0,
            "the small worker served nothing"
        );
        assert_eq!(served(&odd).await, 0.0, "the odd worker was routed to");
        let down = super::counter_at(router, "tandem_router_workers_marked_down_total").await;
        assert_eq!(down, 0.0, "a worker was marked down");
    });
}

#[test]
fn sigterm_drains_a_worker_without_losing_its_requests() {
    let cluster = Cluster::start(0, 2, 1, &[]);
    let rt = rt();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let base = cluster.base_url();
        // Long generations on both workers.
        let long = |p: &'static str| {
            let (http, base) = (http.clone(), base.clone());
            tokio::spawn(async move { complete(&http, &base, p, 160).await })
        };
        let a = long("Write a long story about a dragon who loves books:");
        let b = long("Write a long story about a cat who sails the sea:");
        wait_load(&cluster.decode[0], Duration::from_secs(10), |l| {
            l.running == 1
        })
        .await;
        wait_load(&cluster.decode[1], Duration::from_secs(10), |l| {
            l.running == 1
        })
        .await;
        let pid = cluster.decode[0].child.id() as i32;
        unsafe {
            libc_kill(pid, 15);
        }
        // New work goes to the other worker while this one drains.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let c = complete(&http, &base, "Say hi.", 4).await;
        assert!(c.is_ok(), "a request during the drain failed: {c:?}");
        for (name, h) in [("a", a), ("b", b)] {
            let v = h
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("request {name} failed: {e}"));
            assert_eq!(
                v["usage"]["completion_tokens"], 160,
                "request {name} was cut short"
            );
        }
    });
    // The drained worker exits on its own, with success.
    let child = &mut { cluster }.decode[0].child;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the drained worker did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "drained worker exited with {status}");
}

/// With its only decode worker draining, a new request is refused once the
/// router's wait for another runs out: 503 with `Retry-After`, saying the
/// worker is draining (being stopped or restarted), while the request in
/// flight finishes.
#[test]
fn a_request_while_the_only_decode_worker_drains_is_told_to_retry() {
    let cluster = Cluster::start(0, 1, 1, &["--worker-wait-secs", "0.5"]);
    rt().block_on(async {
        let http = reqwest::Client::new();
        let url = format!("{}/completions", cluster.base_url());
        let long = json!({"model": model_name(), "prompt": "Once upon a time",
            "max_tokens": 600, "ignore_eos": true, "temperature": 0});
        let running = tokio::spawn({
            let (http, url) = (http.clone(), url.clone());
            async move {
                http.post(url)
                    .json(&long)
                    .send()
                    .await
                    .unwrap()
                    .json::<Value>()
                    .await
                    .unwrap()
            }
        });
        wait_load(&cluster.decode[0], Duration::from_secs(10), |l| {
            l.running == 1
        })
        .await;
        unsafe {
            libc_kill(cluster.decode[0].child.id() as i32, 15);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = http
            .post(&url)
            .json(&json!({"model": model_name(), "prompt": "Hi", "max_tokens": 4}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "1");
        let v: Value = r.json().await.unwrap();
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("draining") && message.contains("retry"),
            "{v}"
        );
        let v = running.await.unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 600, "{v}");
    });
}

#[test]
fn overload_gets_503_with_retry_after_not_unbounded_queues() {
    let cluster = Cluster::start_spec(ClusterSpec {
        prefill: 0,
        decode: 1,
        threads: 1,
        worker_args: ["--max-running", "1", "--max-waiting", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ..Default::default()
    });
    let rt = rt();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let base = cluster.base_url();
        let mut tasks = Vec::new();
        for i in 0..6 {
            let (http, base) = (http.clone(), base.clone());
            tasks.push(tokio::spawn(async move {
                let r = http
                    .post(format!("{base}/completions"))
                    .json(&json!({"model": model_name(), "prompt": format!("Story {i}:"), "max_tokens": 48, "temperature": 0}))
                    .send()
                    .await
                    .unwrap();
                let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                (r.status().as_u16(), retry, r.json::<Value>().await.unwrap())
            }));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let (mut ok, mut busy) = (0, 0);
        for t in tasks {
            let (status, retry, body) = t.await.unwrap();
            match status {
                200 => ok += 1,
                503 => {
                    busy += 1;
                    assert!(retry.is_some(), "503 without Retry-After: {body}");
                    assert!(body["error"]["message"].is_string(), "{body}");
                }
                s => panic!("unexpected status {s}: {body}"),
            }
        }
        assert!(ok >= 1, "nothing was served");
        assert!(busy >= 1, "six requests on a worker that holds two were all accepted");
    });
}

/// A decode worker whose KV pool cannot hold every prompt sent to it at
/// once makes the transfers wait for blocks instead of failing them: all
/// requests complete, each with the tokens it gets alone.
#[test]
fn a_full_decode_pool_queues_transfers_instead_of_failing_them() {
    let cluster = Cluster::start_spec(ClusterSpec {
        prefill: 1,
        decode: 1,
        threads: 1,
        // About 34 blocks of 16 tokens: two of these prompts at a time.
        decode_args: ["--kv-cache-memory", "24MiB"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ..Default::default()
    });
    let prompts: Vec<String> = (0..6)
        .map(|i| {
            let words: Vec<String> = (0..85)
                .map(|j| format!("w{}", (i * 31 + j * 7) % 89))
                .collect();
            format!("List {i}: {}", words.join(" "))
        })
        .collect();
    let rt = rt();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let base = cluster.base_url();
        let together: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (http, base, p) = (http.clone(), base.clone(), p.clone());
                tokio::spawn(async move { complete(&http, &base, &p, 12).await })
            })
            .collect();
        let mut texts = Vec::new();
        for (i, t) in together.into_iter().enumerate() {
            let v = t
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("request {i} failed: {e}"));
            assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 200, "{v}");
            texts.push(v["choices"][0]["text"].as_str().unwrap().to_string());
        }
        for (i, p) in prompts.iter().enumerate() {
            let alone = complete(&http, &base, p, 12).await.unwrap();
            assert_eq!(
                alone["choices"][0]["text"].as_str().unwrap(),
                texts[i],
                "request {i}"
            );
        }
        // Every block is back once all is done (cached prefixes aside).
        let decode = &cluster.decode[0];
        let gauges = || async {
            [
                counter(decode, "tandem_kv_blocks_used").await,
                counter(decode, "tandem_kv_blocks_cached").await,
                counter(decode, "tandem_waiting_sequences").await,
            ]
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let [used, cached, waiting] = gauges().await;
            if used == cached && waiting == 0.0 {
                assert!(cached > 0.0, "the decode worker reports no KV blocks");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "decode worker idle with {used} blocks used, {cached} cached, {waiting} waiting"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}
