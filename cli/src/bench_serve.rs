//! `tandem bench serve`: an open-loop load generator for any
//! OpenAI-compatible endpoint, and a disaggregated-versus-colocated
//! comparison on the same core budget.
//!
//! Load: Poisson arrivals at each `--rate` (open loop: a request is sent at
//! its time whatever is still in flight), or a fixed number in flight
//! (`--concurrency`). Prompts come from the data sets shipped in
//! `bench/data/` or are synthetic token ids of given lengths. An optional
//! second stream of long prompts (`--long-rate`) runs on top, for the
//! "long prompts while decodes run" question. Every run is bounded in
//! requests (`--requests`) and time (`--duration`, `--request-timeout`).
//!
//! Figures per run: TTFT, TPOT, ITL and end-to-end latency (mean, p50,
//! p90, p99), request and token throughput, and goodput (requests per
//! second within `--slo-ttft` and `--slo-tpot`); with tandem's router, also
//! its own dispatch and relay latency read from its `/metrics`.
//!
//! Without `--url` it starts clusters here on one core budget, in turn:
//! colocated (`--colocated-workers` plain workers) and disaggregated (one
//! prefill and one decode worker), each worker with `--threads` threads,
//! optionally pinned one per core (`--pin`), runs the same workload
//! against each and prints the ratio table.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tandem_cluster::Role;

use crate::up::{peers_of, random_secret, spawn, stop_all, Node};

#[path = "bench_serve/client.rs"]
mod client;
#[path = "bench_serve/plot.rs"]
mod plot;
#[path = "bench_serve/prom.rs"]
mod prom;
#[path = "bench_serve/report.rs"]
mod report;
#[path = "bench_serve/workload.rs"]
mod workload;

use client::{Endpoint, Record, Target};
use report::{summarise, Slo, Summary};
use workload::{Dataset, Prompt, Request, Spec};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// An OpenAI-compatible API base to load (`http://HOST:PORT/v1`); default: start clusters here and compare.
    #[arg(long)]
    pub url: Option<String>,
    /// Start a colocated and a disaggregated cluster on the same cores and compare them (the default without --url).
    #[arg(long)]
    pub compare: bool,
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<PathBuf>,
    /// Model name to send (default: the first of the endpoint's /v1/models, or the model file's stem).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Bearer key for --url.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Where text prompts go (synthetic token-id prompts always go to /v1/completions).
    #[arg(long, value_enum, default_value = "chat")]
    pub endpoint: Endpoint,
    /// Where prompts come from.
    #[arg(long, value_enum, default_value = "synthetic")]
    pub dataset: Dataset,
    /// Prompt length of synthetic requests, in tokens.
    #[arg(long, default_value_t = 256)]
    pub input_tokens: usize,
    /// Tokens wanted per synthetic request.
    #[arg(long, default_value_t = 64)]
    pub output_tokens: usize,
    /// Tokens wanted per request, overriding the data set's.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Sampling temperature sent with every request (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Send `ignore_eos: true` (vLLM's extension, which llama.cpp's server
    /// and tandem also take), so every request generates exactly the
    /// tokens it wants, as other load generators do.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Requests per run (per rate or concurrency), warm-up excluded.
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Poisson arrival rates to run, requests/s (e.g. 0.5,1,2).
    #[arg(long, value_delimiter = ',', conflicts_with = "concurrency")]
    pub rate: Vec<f64>,
    /// Requests in flight at once, for each run (e.g. 1,4); the default without --rate is 1.
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// A second stream of long prompts on top, Poisson at this rate (requests/s; 0: none).
    #[arg(long, default_value_t = 0.0)]
    pub long_rate: f64,
    /// Prompt length of the long stream's requests, in tokens.
    #[arg(long, default_value_t = 1500)]
    pub long_input_tokens: usize,
    /// Tokens wanted per long request.
    #[arg(long, default_value_t = 4)]
    pub long_output_tokens: usize,
    /// At most this many long requests per run (0: as many as arrive before the main requests are done).
    #[arg(long, default_value_t = 0)]
    pub long_requests: usize,
    /// With --long-rate and clusters of our own: also run each load without the long stream, as the idle baseline.
    #[arg(long)]
    pub idle_baseline: bool,
    /// SLO on time to first token, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub slo_ttft: f64,
    /// SLO on time per output token, seconds.
    #[arg(long, default_value_t = 0.1)]
    pub slo_tpot: f64,
    /// No new requests after this many seconds of a run.
    #[arg(long, default_value_t = 600.0)]
    pub duration: f64,
    /// A request that takes longer fails.
    #[arg(long, default_value_t = 300.0)]
    pub request_timeout: f64,
    /// Seed of prompt choice and arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Clusters of our own: threads per worker.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Clusters of our own: plain workers of the colocated side.
    #[arg(long, default_value_t = 2)]
    pub colocated_workers: usize,
    /// Clusters of our own: prompts shorter than this skip the prefill tier.
    #[arg(long, default_value_t = 32)]
    pub disagg_min_tokens: usize,
    /// Clusters of our own: KV cache per worker.
    #[arg(long, default_value = "512MiB")]
    pub kv_cache_memory: String,
    /// Clusters of our own: pin each worker to its own core (the router and this client are not pinned).
    #[arg(long)]
    pub pin: bool,
    /// Write the figures as JSON here.
    #[arg(long, value_parser = crate::output_file)]
    pub json: Option<PathBuf>,
    /// Write PNG plots here (latency CDFs; goodput against offered load).
    #[arg(long)]
    pub plot_dir: Option<PathBuf>,
}

/// How one run offers load.
#[derive(Clone, Copy, Debug)]
enum Load {
    Rate(f64),
    Concurrency(usize),
}

impl Load {
    fn x(&self) -> f64 {
        match *self {
            Load::Rate(r) => r,
            Load::Concurrency(c) => c as f64,
        }
    }
    fn label(&self) -> String {
        match *self {
            Load::Rate(r) => format!("{r} req/s"),
            Load::Concurrency(c) => format!("concurrency {c}"),
        }
    }
    fn json(&self) -> Value {
        match *self {
            Load::Rate(r) => json!({"rate": r}),
            Load::Concurrency(c) => json!({"concurrency": c}),
        }
    }
}

/// One run's outcome.
struct Run {
    setup: String,
    load: Load,
    long_rate: f64,
    records: Vec<Record>,
    summary: Summary,
    classes: Vec<(&'static str, Summary)>,
    router: Value,
}

impl Run {
    fn label(&self) -> String {
        let long = if self.long_rate > 0.0 {
            format!(" + long {}/s", self.long_rate)
        } else {
            String::new()
        };
        format!("{} @ {}{long}", self.setup, self.load.label())
    }
    fn class(&self, name: &str) -> Option<&Summary> {
        self.classes.iter().find(|c| c.0 == name).map(|c| &c.1)
    }
    fn json(&self) -> Value {
        let classes: serde_json::Map<String, Value> = self
            .classes
            .iter()
            .map(|(k, s)| (k.to_string(), json!(s)))
            .collect();
        let errors: Vec<&str> = self
            .records
            .iter()
            .filter_map(|r| r.error.as_deref())
            .take(5)
            .collect();
        json!({
            "setup": self.setup,
            "load": self.load.json(),
            "long_rate": self.long_rate,
            "summary": self.summary,
            "classes": classes,
            "router": self.router,
            "first_errors": errors,
        })
    }
}

struct Ctx {
    http: reqwest::Client,
    slo: Slo,
}

/// The router's own latency over a run, from two scrapes of its /metrics;
/// `null` for endpoints that do not expose tandem's series.
async fn scrape(http: &reqwest::Client, base: &str) -> Option<String> {
    let root = base.trim_end_matches('/').trim_end_matches("/v1");
    let r = http
        .get(format!("{root}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.text().await.ok()
}

fn router_latency(before: Option<&str>, after: Option<&str>) -> Value {
    let Some(after) = after else {
        return Value::Null;
    };
    let mut out = serde_json::Map::new();
    for (key, name) in [
        ("dispatch", "tandem_router_dispatch_seconds"),
        ("relay", "tandem_router_relay_seconds"),
    ] {
        let Some(a) = prom::read(after, name) else {
            continue;
        };
        let b = before.and_then(|t| prom::read(t, name));
        let d = a.since(b.as_ref());
        out.insert(
            key.into(),
            json!({
                "p50_ms": d.quantile(0.5).map(|s| s * 1e3),
                "p99_ms": d.quantile(0.99).map(|s| s * 1e3),
                "count": d.count,
                "from": if d.buckets.is_empty() { "summary (whole life of the router)" } else { "histogram (this run)" },
            }),
        );
    }
    if out.is_empty() {
        Value::Null
    } else {
        Value::Object(out)
    }
}

fn progress(n: usize, label: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(n as u64);
    let style = indicatif::ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_prefix(label.to_string());
    pb
}

/// Runs one load against `target`: the main requests at `load`, and the
/// long stream at `long_rate` until the main requests are done.
#[allow(clippy::too_many_arguments)]
async fn run_once(
    ctx: &Ctx,
    target: Arc<Target>,
    main: Vec<Request>,
    load: Load,
    long: Option<(f64, Vec<Request>)>,
    cap: Duration,
    seed: u64,
    pb: indicatif::ProgressBar,
) -> Result<(Vec<Record>, f64)> {
    let records = Arc::new(Mutex::new(Vec::<Record>::new()));
    let main_done = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let http = ctx.http.clone();

    let finish = {
        let (records, pb, errors) = (records.clone(), pb.clone(), errors.clone());
        move |rec: Record| {
            if rec.class == "main" {
                pb.inc(1);
            }
            if !rec.ok {
                let e = errors.fetch_add(1, Ordering::Relaxed) + 1;
                pb.set_message(format!("{e} error(s)"));
                tracing::warn!(error = rec.error.as_deref().unwrap_or(""), "request failed");
            }
            if let Ok(mut v) = records.lock() {
                v.push(rec);
            }
        }
    };

    // The long stream: Poisson arrivals until the main requests are done.
    let long_task = long.map(|(rate, reqs)| {
        let (target, http, main_done, finish) = (
            target.clone(),
            http.clone(),
            main_done.clone(),
            finish.clone(),
        );
        tokio::spawn(async move {
            let times = workload::poisson_arrivals(reqs.len(), rate, seed ^ 0x5EED)?;
            let mut tasks = tokio::task::JoinSet::new();
            for (r, t) in reqs.into_iter().zip(times) {
                // The first long prompt arrives after one gap, not at once.
                let at = start + Duration::from_secs_f64(t + 1.0 / rate);
                tokio::time::sleep_until(at.into()).await;
                if main_done.load(Ordering::Relaxed) || start.elapsed() > cap {
                    break;
                }
                let (target, http, finish) = (target.clone(), http.clone(), finish.clone());
                let sent = start.elapsed().as_secs_f64();
                tasks.spawn(async move { finish(client::send(&http, &target, &r, sent).await) });
            }
            while tasks.join_next().await.is_some() {}
            anyhow::Ok(())
        })
    });

    match load {
        Load::Rate(rate) => {
            let times = workload::poisson_arrivals(main.len(), rate, seed)?;
            let mut tasks = tokio::task::JoinSet::new();
            for (r, t) in main.into_iter().zip(times) {
                tokio::time::sleep_until((start + Duration::from_secs_f64(t)).into()).await;
                if start.elapsed() > cap {
                    break;
                }
                let (target, http, finish) = (target.clone(), http.clone(), finish.clone());
                let sent = start.elapsed().as_secs_f64();
                tasks.spawn(async move { finish(client::send(&http, &target, &r, sent).await) });
            }
            while tasks.join_next().await.is_some() {}
        }
        Load::Concurrency(c) => {
            let main = Arc::new(main);
            let next = Arc::new(AtomicUsize::new(0));
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..c.max(1) {
                let (target, http, finish, main, next) = (
                    target.clone(),
                    http.clone(),
                    finish.clone(),
                    main.clone(),
                    next.clone(),
                );
                tasks.spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= main.len() || start.elapsed() > cap {
                            return;
                        }
                        let sent = start.elapsed().as_secs_f64();
                        finish(client::send(&http, &target, &main[i], sent).await);
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        }
    }
    main_done.store(true, Ordering::Relaxed);
    if let Some(t) = long_task {
        t.await.context("the long-prompt stream")??;
    }
    pb.finish();
    let records = std::mem::take(&mut *records.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let first = records
        .iter()
        .map(|r| r.sent_s)
        .fold(f64::INFINITY, f64::min);
    let last = records
        .iter()
        .map(|r| r.sent_s + r.e2e_s)
        .fold(0.0f64, f64::max);
    let duration = if records.is_empty() {
        0.0
    } else {
        last - first
    };
    Ok((records, duration))
}

/// The requests of one run; `salt` keeps runs on one cluster from sharing
/// prompts (the prefix cache would answer repeats).
/// The main requests, and the long stream's rate and requests.
type Plan = (Vec<Request>, Option<(f64, Vec<Request>)>);

fn plan(a: &ServeArgs, salt: u64, cap_long: usize) -> Result<Plan> {
    let spec = Spec {
        dataset: a.dataset,
        input_tokens: a.input_tokens,
        output_tokens: a.output_tokens,
        max_tokens: a.max_tokens,
        seed: a.seed,
    };
    let mut main = workload::requests(&spec, a.requests, "main", salt)?;
    // Text prompts are drawn with replacement: a distinct first line keeps
    // repeats from hitting the prefix cache.
    for (i, r) in main.iter_mut().enumerate() {
        if let Prompt::Text(t) = &mut r.prompt {
            *t = format!("Request {salt}-{i}.\n{t}");
        }
    }
    let long = (a.long_rate > 0.0).then(|| {
        let spec = Spec {
            dataset: Dataset::Synthetic,
            input_tokens: a.long_input_tokens,
            output_tokens: a.long_output_tokens,
            max_tokens: None,
            seed: a.seed,
        };
        workload::requests(&spec, cap_long, "long", salt + 7_777).map(|r| (a.long_rate, r))
    });
    Ok((main, long.transpose()?))
}

async fn run_load(
    ctx: &Ctx,
    a: &ServeArgs,
    target: Arc<Target>,
    setup: &str,
    load: Load,
    with_long: bool,
    salt: u64,
) -> Result<Run> {
    let long_rate = if with_long { a.long_rate } else { 0.0 };
    // Enough long requests for the longest the main stream can take.
    let mut cap_long =
        ((a.duration.min(3600.0) + a.request_timeout) * long_rate).ceil() as usize + 1;
    if a.long_requests > 0 {
        cap_long = cap_long.min(a.long_requests);
    }
    let (main, long) = plan(a, salt, cap_long)?;
    let long = long.filter(|_| with_long);
    let run = Run {
        setup: setup.to_string(),
        load,
        long_rate,
        records: Vec::new(),
        summary: Summary::default(),
        classes: Vec::new(),
        router: Value::Null,
    };
    let pb = progress(main.len(), &run.label());
    let before = scrape(&ctx.http, &target.base).await;
    let (records, duration) = run_once(
        ctx,
        target.clone(),
        main,
        load,
        long,
        Duration::from_secs_f64(a.duration),
        a.seed.wrapping_add(salt),
        pb,
    )
    .await?;
    let after = scrape(&ctx.http, &target.base).await;
    let all: Vec<&Record> = records.iter().collect();
    let summary = summarise(&all, duration, ctx.slo);
    let mut classes = Vec::new();
    for class in ["main", "long"] {
        let rs: Vec<&Record> = records.iter().filter(|r| r.class == class).collect();
        if !rs.is_empty() {
            classes.push((class, summarise(&rs, duration, ctx.slo)));
        }
    }
    let run = Run {
        summary,
        classes,
        records,
        router: router_latency(before.as_deref(), after.as_deref()),
        ..run
    };
    print_run(&run);
    Ok(run)
}

fn print_run(r: &Run) {
    let s = &r.summary;
    println!(
        "{}: {} requests, {} ok, {} errors in {:.1} s; {:.2} req/s, goodput {:.2} req/s, {:.1} output tok/s",
        r.label(),
        s.requests,
        s.completed,
        s.errors,
        s.duration_s,
        s.request_throughput,
        s.goodput,
        s.output_token_throughput
    );
    for (class, s) in &r.classes {
        if r.classes.len() < 2 && *class == "main" {
            print_dists("  ", s);
        } else {
            println!("  [{class}] {} requests, {} ok", s.requests, s.completed);
            print_dists("    ", s);
        }
    }
    if let Some(d) = r.router.get("dispatch") {
        println!(
            "  router dispatch p99 {:.3} ms, relay p99 {:.3} ms",
            d["p99_ms"].as_f64().unwrap_or(f64::NAN),
            r.router["relay"]["p99_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
}

fn print_dists(indent: &str, s: &Summary) {
    for (name, d) in [
        ("TTFT", &s.ttft_ms),
        ("TPOT", &s.tpot_ms),
        ("ITL ", &s.itl_ms),
        ("E2E ", &s.e2e_ms),
    ] {
        println!(
            "{indent}{name} ms: mean {:9.1}  p50 {:9.1}  p90 {:9.1}  p99 {:9.1}  (n={})",
            d.mean, d.p50, d.p90, d.p99, d.n
        );
    }
}

/// Where each worker of a cluster runs.
fn cores() -> Vec<usize> {
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let ok =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) }
            == 0;
    let n = crate::thread_count(None);
    if !ok {
        return (0..n).collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

fn set_affinity(cpus: &[usize]) -> Result<()> {
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // This thread only: the child forked from it inherits the mask.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        bail!(
            "sched_setaffinity({cpus:?}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Spawns a node, pinned to `cpus` when given (as `taskset -c` would).
fn spawn_on(
    role: Role,
    args: &[String],
    secret: &str,
    name: &str,
    cpus: Option<&[usize]>,
) -> Result<Node> {
    let Some(cpus) = cpus else {
        return spawn(role, args, secret, name);
    };
    let all = cores();
    set_affinity(cpus)?;
    let node = spawn(role, args, secret, name);
    set_affinity(&all)?;
    node
}

/// Starts a cluster: `prefill` prefill workers (0: colocated) and `decode`
/// decode workers, each pinned to its own core with `--pin`. Returns the
/// nodes (router last), the API base and where each node runs.
fn start(
    a: &ServeArgs,
    model: &std::path::Path,
    prefill: usize,
    decode: usize,
) -> Result<(Vec<Node>, String, Vec<String>)> {
    let secret = random_secret();
    let m = model.display().to_string();
    let worker: Vec<String> = [
        "--model",
        &m,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--threads",
        &a.threads.to_string(),
        "--kv-cache-memory",
        &a.kv_cache_memory,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let all = cores();
    let per = a.threads.max(1);
    let mut next_core = 0;
    let mut placement = Vec::new();
    let mut nodes = Vec::new();
    let roles = std::iter::repeat_n(Role::Prefill, prefill)
        .chain(std::iter::repeat_n(Role::Decode, decode));
    for (i, role) in roles.enumerate() {
        let name = if prefill == 0 {
            format!("worker-{i}")
        } else {
            format!("{role}-{i}")
        };
        let cpus: Option<Vec<usize>> = a.pin.then(|| {
            (0..per)
                .map(|k| all[(next_core + k) % all.len().max(1)])
                .collect()
        });
        next_core += per;
        placement.push(match &cpus {
            Some(c) => format!("{name} ({} threads) on cores {c:?}", a.threads),
            None => format!("{name} ({} threads) unpinned", a.threads),
        });
        nodes.push(spawn_on(role, &worker, &secret, &name, cpus.as_deref())?);
    }
    if a.pin && next_core > all.len() {
        eprintln!(
            "bench serve: warning: {next_core} worker threads pinned on {} cores",
            all.len()
        );
    }
    let peers = peers_of(&nodes);
    let args: Vec<String> = [
        "--model",
        &m,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--peers",
        &peers.to_string(),
        "--disagg-min-tokens",
        &a.disagg_min_tokens.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let router = spawn(Role::Router, &args, &secret, "router")?;
    placement.push(format!("router and this client unpinned (cores {all:?})"));
    let base = format!("http://{}/v1", router.ready.addr);
    nodes.push(router);
    Ok((nodes, base, placement))
}

/// The model name the endpoint serves.
async fn served_model(http: &reqwest::Client, a: &ServeArgs, base: &str) -> Result<String> {
    if let Some(n) = &a.served_model_name {
        return Ok(n.clone());
    }
    let mut req = http.get(format!("{}/models", base.trim_end_matches('/')));
    if let Some(k) = &a.api_key {
        req = req.bearer_auth(k);
    }
    if let Ok(r) = req.send().await {
        if let Ok(v) = r.json::<Value>().await {
            if let Some(id) = v["data"][0]["id"].as_str() {
                return Ok(id.to_string());
            }
        }
    }
    let model = crate::model_path(a.model.clone())
        .context("the endpoint lists no model; pass --served-model-name")?;
    Ok(model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default())
}

/// One short request so that first-touch costs stay out of the figures.
async fn warm_up(ctx: &Ctx, target: &Target) -> Result<()> {
    let r = Request {
        class: "warmup",
        prompt: Prompt::Ids(workload::synthetic_ids(64, u64::MAX / 3)),
        max_tokens: 4,
    };
    let rec = client::send(&ctx.http, target, &r, 0.0).await;
    if !rec.ok {
        bail!(
            "the warm-up request failed: {}",
            rec.error.unwrap_or_default()
        );
    }
    Ok(())
}

/// All loads of the args, in order.
fn loads(a: &ServeArgs) -> Vec<Load> {
    if !a.rate.is_empty() {
        a.rate.iter().map(|&r| Load::Rate(r)).collect()
    } else if !a.concurrency.is_empty() {
        a.concurrency
            .iter()
            .map(|&c| Load::Concurrency(c))
            .collect()
    } else {
        vec![Load::Concurrency(1)]
    }
}

/// Every load against one endpoint (idle baseline first when asked).
async fn sweep(ctx: &Ctx, a: &ServeArgs, target: Arc<Target>, setup: &str) -> Result<Vec<Run>> {
    warm_up(ctx, &target).await?;
    let mut runs = Vec::new();
    for (i, load) in loads(a).into_iter().enumerate() {
        let salt = 1 + 2 * i as u64;
        if a.long_rate > 0.0 && a.idle_baseline {
            runs.push(run_load(ctx, a, target.clone(), setup, load, false, salt).await?);
        }
        runs.push(
            run_load(
                ctx,
                a,
                target.clone(),
                setup,
                load,
                a.long_rate > 0.0,
                salt + 1,
            )
            .await?,
        );
    }
    Ok(runs)
}

fn check(a: &ServeArgs) -> Result<()> {
    if a.requests == 0 || a.output_tokens == 0 || a.input_tokens == 0 {
        bail!("--requests, --input-tokens and --output-tokens must be positive");
    }
    if a.rate.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        bail!("--rate values must be positive");
    }
    if a.concurrency.contains(&0) {
        bail!("--concurrency values must be positive");
    }
    if !(a.temperature.is_finite() && (0.0..=2.0).contains(&a.temperature)) {
        bail!("--temperature must be within 0..=2");
    }
    if !(a.long_rate.is_finite() && a.long_rate >= 0.0) {
        bail!("--long-rate must be zero or positive");
    }
    if !(a.duration > 0.0 && a.request_timeout > 0.0 && a.slo_ttft > 0.0 && a.slo_tpot > 0.0) {
        bail!("--duration, --request-timeout, --slo-ttft and --slo-tpot must be positive");
    }
    if a.url.is_some() && a.compare {
        bail!("--compare starts its own clusters; it does not take --url");
    }
    if a.colocated_workers == 0 || a.threads == 0 {
        bail!("--colocated-workers and --threads must be positive");
    }
    Ok(())
}

/// The disaggregated / colocated table of matching runs.
fn ratio_table(runs: &[Run]) -> Value {
    type Figure = (&'static str, fn(&Summary) -> f64);
    let metrics: [Figure; 9] = [
        ("output tok/s", |s| s.output_token_throughput),
        ("requests/s", |s| s.request_throughput),
        ("goodput req/s", |s| s.goodput),
        ("TTFT p50 ms", |s| s.ttft_ms.p50),
        ("TTFT p99 ms", |s| s.ttft_ms.p99),
        ("TPOT p50 ms", |s| s.tpot_ms.p50),
        ("TPOT p99 ms", |s| s.tpot_ms.p99),
        ("ITL p99 ms", |s| s.itl_ms.p99),
        ("errors", |s| s.errors as f64),
    ];
    let mut rows = Vec::new();
    let colocated: Vec<&Run> = runs.iter().filter(|r| r.setup == "colocated").collect();
    for c in colocated {
        let Some(d) = runs.iter().find(|r| {
            r.setup == "disaggregated" && r.load.x() == c.load.x() && r.long_rate == c.long_rate
        }) else {
            continue;
        };
        let load = c.load.label()
            + &if c.long_rate > 0.0 {
                format!(" + long {}/s", c.long_rate)
            } else {
                String::new()
            };
        println!("\n{load}, main requests: disaggregated vs colocated");
        println!(
            "  {:<16} {:>12} {:>14} {:>8}",
            "figure", "colocated", "disaggregated", "ratio"
        );
        let (cs, ds) = (
            c.class("main").unwrap_or(&c.summary),
            d.class("main").unwrap_or(&d.summary),
        );
        let mut table = serde_json::Map::new();
        for (name, f) in metrics {
            let (x, y) = (f(cs), f(ds));
            let ratio = if x != 0.0 { y / x } else { f64::NAN };
            println!("  {name:<16} {x:>12.2} {y:>14.2} {ratio:>7.2}x");
            table.insert(
                name.into(),
                json!({"colocated": x, "disaggregated": y, "ratio": ratio}),
            );
        }
        rows.push(json!({"load": c.load.json(), "long_rate": c.long_rate, "figures": table}));
    }
    // Long prompts against the same decode load without them.
    let mut interference = Vec::new();
    for setup in ["colocated", "disaggregated"] {
        for mixed in runs
            .iter()
            .filter(|r| r.setup == setup && r.long_rate > 0.0)
        {
            let Some(idle) = runs
                .iter()
                .find(|r| r.setup == setup && r.long_rate == 0.0 && r.load.x() == mixed.load.x())
            else {
                continue;
            };
            let (i, m) = (
                idle.class("main").unwrap_or(&idle.summary),
                mixed.class("main").unwrap_or(&mixed.summary),
            );
            let r99 = m.tpot_ms.p99 / i.tpot_ms.p99;
            println!(
                "{setup} @ {}: TPOT p99 idle {:.1} ms, with long prompts {:.1} ms: {:.2}x (p50 {:.1} -> {:.1} ms); goodput {:.3} -> {:.3} req/s",
                mixed.load.label(),
                i.tpot_ms.p99,
                m.tpot_ms.p99,
                r99,
                i.tpot_ms.p50,
                m.tpot_ms.p50,
                i.goodput,
                m.goodput
            );
            interference.push(json!({
                "setup": setup,
                "load": mixed.load.json(),
                "long_rate": mixed.long_rate,
                "idle_tpot_p50_ms": i.tpot_ms.p50,
                "idle_tpot_p99_ms": i.tpot_ms.p99,
                "mixed_tpot_p50_ms": m.tpot_ms.p50,
                "mixed_tpot_p99_ms": m.tpot_ms.p99,
                "tpot_p99_over_idle_p99": r99,
                "idle_goodput": i.goodput,
                "mixed_goodput": m.goodput,
            }));
        }
    }
    json!({"ratios": rows, "interference": interference})
}

fn plots(a: &ServeArgs, runs: &[Run]) -> Result<Vec<PathBuf>> {
    let Some(dir) = &a.plot_dir else {
        return Ok(Vec::new());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let cdf = dir.join("latency_cdf.png");
    let series: Vec<plot::Series> = runs
        .iter()
        .map(|r| plot::Series {
            label: r.label(),
            records: r.records.iter().filter(|x| x.class == "main").collect(),
        })
        .collect();
    plot::latency_cdfs(&cdf, &series)?;
    written.push(cdf);
    let mut curves: Vec<plot::Curve> = Vec::new();
    for r in runs {
        let label = if r.long_rate > 0.0 {
            format!("{} + long prompts", r.setup)
        } else {
            r.setup.clone()
        };
        let s = r.class("main").unwrap_or(&r.summary);
        let p = (r.load.x(), s.goodput, s.request_throughput);
        match curves.iter_mut().find(|c| c.label == label) {
            Some(c) => c.points.push(p),
            None => curves.push(plot::Curve {
                label,
                points: vec![p],
            }),
        }
    }
    let x_desc = match loads(a)[0] {
        Load::Rate(_) => "offered load (requests/s, Poisson)",
        Load::Concurrency(_) => "requests in flight",
    };
    let gp = dir.join("goodput.png");
    plot::goodput(&gp, x_desc, &curves)?;
    written.push(gp);
    Ok(written)
}

pub fn run(a: ServeArgs) -> Result<()> {
    check(&a)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    let ctx = Ctx {
        http,
        slo: Slo {
            ttft_s: a.slo_ttft,
            tpot_s: a.slo_tpot,
        },
    };
    let timeout = Duration::from_secs_f64(a.request_timeout);
    let mut placement = serde_json::Map::new();
    let runs = if let Some(url) = &a.url {
        let model = rt.block_on(served_model(&ctx.http, &a, url))?;
        let target = Arc::new(Target {
            base: url.trim_end_matches('/').to_string(),
            model,
            endpoint: a.endpoint,
            api_key: a.api_key.clone(),
            temperature: a.temperature,
            ignore_eos: a.ignore_eos,
            timeout,
        });
        rt.block_on(sweep(&ctx, &a, target, "endpoint"))?
    } else {
        let model = crate::model_path(a.model.clone())?;
        let name = a.served_model_name.clone().unwrap_or_else(|| {
            model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let mut runs = Vec::new();
        for (setup, prefill, decode) in [
            ("colocated", 0, a.colocated_workers),
            ("disaggregated", 1, 1),
        ] {
            let (nodes, base, place) = start(&a, &model, prefill, decode)?;
            eprintln!("bench serve: {setup}: {}", place.join("; "));
            placement.insert(setup.into(), json!(place));
            let target = Arc::new(Target {
                base,
                model: name.clone(),
                endpoint: a.endpoint,
                api_key: None,
                temperature: a.temperature,
                ignore_eos: a.ignore_eos,
                timeout,
            });
            let r = rt.block_on(sweep(&ctx, &a, target, setup));
            stop_all(nodes);
            runs.extend(r?);
        }
        runs
    };
    let compare = if a.url.is_none() {
        ratio_table(&runs)
    } else {
        Value::Null
    };
    let written = plots(&a, &runs)?;
    for p in &written {
        eprintln!("bench serve: wrote {}", p.display());
    }
    if let Some(p) = &a.json {
        let out = json!({
            "config": {
                "url": a.url,
                "dataset": a.dataset,
                "endpoint": a.endpoint,
                "input_tokens": a.input_tokens,
                "output_tokens": a.output_tokens,
                "max_tokens": a.max_tokens,
                "requests": a.requests,
                "long_rate": a.long_rate,
                "long_input_tokens": a.long_input_tokens,
                "long_output_tokens": a.long_output_tokens,
                "long_requests": a.long_requests,
                "kv_cache_memory": a.kv_cache_memory,
                "threads": a.threads,
                "colocated_workers": a.colocated_workers,
                "disagg_min_tokens": a.disagg_min_tokens,
                "pin": a.pin,
                "seed": a.seed,
                "temperature": a.temperature,
                "ignore_eos": a.ignore_eos,
                "placement": placement,
                "load_average": std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.trim().to_string()),
            },
            "slo": ctx.slo,
            "runs": runs.iter().map(Run::json).collect::<Vec<_>>(),
            "compare": compare,
            "plots": written,
        });
        std::fs::write(p, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let failed: usize = runs.iter().map(|r| r.summary.errors).sum();
    if failed > 0 {
        eprintln!("bench serve: {failed} request(s) failed (see first_errors in the JSON)");
    }
    Ok(())
}
