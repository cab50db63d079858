//! Sharded workers as real processes: a prefill worker of one TP/PP shape
//! ships KV to a decode worker of another, and a rank that dies takes its
//! worker out of the cluster (one that fails at start, its worker at once).

use tandem_tests::etcd::Etcd;
use tandem_tests::ClusterSpec;

use super::*;

fn shape(tp: usize, pp: usize) -> Vec<String> {
    vec!["--tp".into(), tp.to_string(), "--pp".into(), pp.to_string()]
}

/// Every prompt is disaggregated; greedy tokens equal the in-process ones
/// for an unsharded prefill worker feeding a TP=3 decode worker, and a
/// TP=3 prefill worker feeding a PP=2 decode worker (twice: the second
/// time from the prefill worker's prefix cache).
#[test]
fn mismatched_prefill_and_decode_shapes_give_the_in_process_tokens() {
    let prompts = prompts();
    let plain: Vec<_> = prompts.iter().map(|p| generate_plain(p, false)).collect();
    let rt = rt();
    for ((ptp, ppp), (dtp, dpp), runs) in [((1, 1), (3, 1), 1), ((3, 1), (1, 2), 2)] {
        let cluster = Cluster::start_spec(ClusterSpec {
            prefill: 1,
            decode: 1,
            threads: 1,
            prefill_args: shape(ptp, ppp),
            decode_args: shape(dtp, dpp),
            ..Default::default()
        });
        for run in 0..runs {
            let got = rt.block_on(via_grpc(&cluster, &prompts));
            for (i, p) in prompts.iter().enumerate() {
                assert_eq!(
                    got[i].1, plain[i].1,
                    "prefill tp {ptp} pp {ppp} → decode tp {dtp} pp {dpp}, run {run}: {p:?}"
                );
            }
        }
        let received = rt.block_on(counter(
            &cluster.decode[0],
            "tandem_kv_transfer_bytes_total{direction=\"received\"}",
        ));
        assert!(received > 0.0, "the KV crossed from the prefill worker");
    }
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// SIGKILL one rank of a TP=3 decode worker: the worker leaves the
/// cluster (the router stops counting it) and exits with an error, its
/// other ranks exit too, and nothing hangs.
#[test]
fn a_killed_rank_takes_its_worker_out_of_the_cluster() {
    let etcd = {
        let _turn = tandem_tests::one_at_a_time();
        Etcd::start()
    };
    let mut cluster = Cluster::start_spec(ClusterSpec {
        prefill: 0,
        decode: 1,
        threads: 1,
        decode_args: shape(3, 1),
        etcd: Some((etcd.endpoint(), "/e2e-rank-death".into())),
        ..Default::default()
    });
    let rt = rt();
    let decode_line = "tandem_router_workers{worker_role=\"decode\"}";
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while counter(&cluster.router, decode_line).await < 1.0 {
            assert!(Instant::now() < deadline, "the router never saw the worker");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let r = via_grpc(&cluster, &prompts()[..1]).await;
        assert!(!r[0].1.is_empty(), "the sharded worker serves");
    });
    let worker = cluster.decode[0].child.id();
    let ranks = children_of(worker);
    assert_eq!(ranks.len(), 2, "ranks 1 and 2 run as children of rank 0");
    let t0 = Instant::now();
    let killed = Command::new("kill")
        .args(["-9", &ranks[1].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // The worker notices within its keep-alive period at the latest
    // (a quarter of the 60 s rank timeout), and leaves.
    let status = loop {
        if let Some(s) = cluster.decode[0].child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "the worker is still running after its rank died"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "a broken worker exits with an error");
    println!("worker left {:?} after its rank was killed", t0.elapsed());
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while counter(&cluster.router, decode_line).await > 0.0 {
            assert!(
                Instant::now() < deadline,
                "the router still counts the worker"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // Its surviving rank exits as well.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{}", ranks[0])).exists()
        && !std::fs::read_to_string(format!("/proc/{}/stat", ranks[0]))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "rank 1 outlived its worker");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A rank that fails at start (here by a test hook; a model that does not
/// load, or memory, in life) fails its worker's start at once and says
/// which rank, instead of when the group's 60 s formation timeout runs out.
#[test]
fn a_rank_that_fails_at_start_fails_the_worker_at_once() {
    let started = Instant::now();
    let out = Command::new(tandem_bin())
        .args([
            "generate",
            "--pp",
            "2",
            "--threads",
            "2",
            "--max-tokens",
            "1",
        ])
        .args(["--prompt", "Hi", "--model"])
        .arg(model_path())
        .env("TANDEM_TEST_FAIL_RANK", "1")
        .output()
        .expect("running tandem generate");
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("rank 1 exited"), "{err}");
    assert!(
        err.contains("rank 1 fails at start"),
        "the rank's own error: {err}"
    );
    assert!(took < Duration::from_secs(30), "failed after {took:?}");
}
