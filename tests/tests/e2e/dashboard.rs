//! The router's ops dashboard: its JSON, and the page as headless Chromium
//! renders it (node rows, charts drawn with data, a screenshot kept as an
//! artifact).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::*;

/// Chromium's binary on PATH (Debian's `chromium`, or `chromium-browser`).
fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "chromium is not installed (neither `chromium` nor `chromium-browser` is on PATH); \
         the setup script (scripts/common.sh) installs the Debian package `chromium`: \
         apt-get install chromium"
    );
}

/// Runs headless Chromium on `url` with `args`, killed after 60 s; returns stdout.
fn headless(url: &str, args: &[&str], out_dir: &Path) -> String {
    let profile = tempfile::tempdir().expect("a chromium profile dir");
    let stdout_path = out_dir.join("chromium.stdout");
    let stderr_path = out_dir.join("chromium.stderr");
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("starting chromium");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for chromium") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish within 60 s on {url}; stderr: {}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "chromium failed ({status}) on {url}; stderr: {}",
        std::fs::read_to_string(&stderr_path).unwrap_or_default()
    );
    std::fs::read_to_string(&stdout_path).expect("chromium's output")
}

/// The `<tag ...>` start tag containing `needle`, if any.
fn tag_with<'a>(dom: &'a str, needle: &str) -> Option<&'a str> {
    let i = dom.find(needle)?;
    let start = dom[..i].rfind('<')?;
    let end = i + dom[i..].find('>')?;
    Some(&dom[start..=end])
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let i = tag.find(&key)? + key.len();
    Some(&tag[i..i + tag[i..].find('"')?])
}

#[test]
fn dashboard_shows_the_nodes_and_draws_the_charts() {
    let chromium_bin = chromium(); // fail before starting anything
    let c = Cluster::start(0, 1, 1, &[]);
    let decode_addr = c.decode[0].addr().to_string();
    let root = format!("http://{}", c.router.addr());
    let rt = rt();
    let state: Value = rt.block_on(async {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        for p in ["The capital of France is", "Once upon a time, a robot", "Water boils at"] {
            let r = http
                .post(format!("{}/completions", c.base_url()))
                .json(&json!({"model": model_name(), "prompt": p, "max_tokens": 12, "temperature": 0}))
                .send()
                .await
                .expect("completion");
            assert!(r.status().is_success(), "completion: {}", r.status());
        }
        // The sampler ticks once a second: wait for a sample with the tokens.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = http
                .get(format!("{root}/dashboard/api/state"))
                .send()
                .await
                .expect("dashboard state");
            assert!(r.status().is_success(), "state: {}", r.status());
            let v: Value = r.json().await.expect("state JSON");
            let series = v["series"].as_array().expect("series").clone();
            if series.iter().any(|s| s["tokens_per_s"].as_f64() > Some(0.0)) {
                break v;
            }
            assert!(
                Instant::now() < deadline,
                "no sample with generated tokens after 15 s: {v}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });

    // The JSON: the decode worker, with its KV pool.
    let nodes = state["nodes"].as_array().expect("nodes");
    let node = nodes
        .iter()
        .find(|n| n["addr"] == decode_addr.as_str())
        .unwrap_or_else(|| panic!("decode worker {decode_addr} missing from {state}"));
    assert_eq!(node["role"], "decode");
    assert_eq!(node["healthy"], true);
    assert!(node["total_blocks"].as_u64() > Some(0), "{node}");
    for k in [
        "in_flight",
        "running",
        "waiting",
        "free_blocks",
        "cached_blocks",
    ] {
        assert!(node[k].is_u64(), "{k} in {node}");
    }
    let sample = state["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["tokens_per_s"].as_f64() > Some(0.0))
        .unwrap();
    assert!(sample["requests_per_s"].as_f64() > Some(0.0), "{sample}");
    assert!(sample["ttft_p50_s"].as_f64() > Some(0.0), "{sample}");
    assert!(sample["t_ms"].as_u64() > Some(0), "{sample}");

    // The page as a browser renders it.
    let out_dir = tandem_bin().parent().unwrap().join("dashboard-artifacts");
    std::fs::create_dir_all(&out_dir).unwrap();
    let url = format!("{root}/dashboard");
    println!("chromium: {}", chromium_bin.display());
    let dom = headless(&url, &["--dump-dom"], &out_dir);
    std::fs::write(out_dir.join("dashboard.dom.html"), &dom).unwrap();
    assert!(
        dom.contains(&decode_addr),
        "the DOM does not show the decode worker {decode_addr}:\n{dom}"
    );
    let row = tag_with(&dom, &format!("data-addr=\"{decode_addr}\"")).expect("a node row");
    assert!(row.starts_with("<tr"), "{row}");
    assert_eq!(attr(row, "data-role"), Some("decode"), "{row}");
    assert_eq!(attr(row, "data-healthy"), Some("true"), "{row}");
    for id in ["chart-throughput", "chart-ttft", "chart-tpot"] {
        let canvas = tag_with(&dom, &format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no canvas {id} in:\n{dom}"));
        assert_eq!(
            attr(canvas, "data-rendered"),
            Some("true"),
            "{id} not drawn: {canvas}"
        );
    }
    let throughput = tag_with(&dom, "id=\"chart-throughput\"").unwrap();
    let points: u64 = attr(throughput, "data-points").unwrap().parse().unwrap();
    assert!(points > 0, "{throughput}");

    let png = out_dir.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    headless(
        &url,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,900",
            "--hide-scrollbars",
        ],
        &out_dir,
    );
    let bytes = std::fs::read(&png).expect("the screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG"),
        "not a PNG: {}",
        png.display()
    );
    assert!(
        bytes.len() > 10_000,
        "screenshot too small ({} bytes): {}",
        bytes.len(),
        png.display()
    );
    println!("dashboard screenshot: {}", png.display());
    drop(c);
}
