//! Sharded workers (`--tp N --pp M`): this process is rank 0 and speaks for
//! the worker; it starts the other ranks as child processes of the same
//! binary (`tandem rank`, hidden), which find it on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tandem_engine::cpu::ExpandWeights;
use tandem_engine::shard::{run_follower, ShardOptions, ShardSpec, ShardedModel};
use tandem_model::weights::ModelSource;

/// One rank of a sharded worker (started by rank 0; not for people).
#[derive(clap::Args, Debug)]
pub struct RankArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub tp: usize,
    #[arg(long)]
    pub pp: usize,
    #[arg(long)]
    pub rank: usize,
    /// The worker's rendezvous, then one per stage (comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    pub rendezvous: Vec<SocketAddr>,
    #[arg(long)]
    pub session: u64,
    #[arg(long)]
    pub threads: usize,
    #[arg(long, default_value = "auto")]
    pub expand_weights: ExpandWeights,
    #[arg(long)]
    pub timeout_secs: u64,
}

/// Test hook: the rank with this number fails at start, as a rank whose
/// model load or memory fails would (rank 0 must say so at once).
const FAIL_RANK_ENV: &str = "TANDEM_TEST_FAIL_RANK";

pub fn run_rank(a: RankArgs) -> Result<()> {
    if std::env::var(FAIL_RANK_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        == Some(a.rank)
    {
        bail!("rank {} fails at start ({FAIL_RANK_ENV})", a.rank);
    }
    let src = ModelSource::open(&a.model)
        .with_context(|| format!("loading model {}", a.model.display()))?;
    let o = ShardOptions {
        spec: ShardSpec {
            tp: a.tp,
            pp: a.pp,
            rank: a.rank,
        },
        rendezvous: a.rendezvous,
        session: a.session,
        timeout: Duration::from_secs(a.timeout_secs),
        threads: a.threads.max(1),
        expand: a.expand_weights,
    };
    run_follower(&src, &o).with_context(|| format!("rank {} of the sharded worker", a.rank))
}

/// How long a rank waits for any other (and rank 0 keeps idle ranks alive within it).
const RANK_TIMEOUT: Duration = Duration::from_secs(60);

/// The other ranks' processes: asked to stop by rank 0's shutdown message,
/// killed if they have not left shortly after.
pub struct Ranks {
    children: Vec<Child>,
}

impl Drop for Ranks {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(3);
        for c in &mut self.children {
            while Instant::now() < deadline {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts a `tp × pp` worker on `threads` cores in all: the other ranks as
/// child processes, then rank 0 here once they have all joined.
pub fn start(
    model: &Path,
    src: &ModelSource,
    tp: usize,
    pp: usize,
    threads: usize,
    expand: ExpandWeights,
) -> Result<(Arc<ShardedModel>, Ranks)> {
    if tp == 0 || pp == 0 {
        bail!("--tp and --pp must be at least 1");
    }
    let world = tp * pp;
    ShardSpec { tp, pp, rank: 0 }
        .validate(&src.config)
        .context("this model cannot be sharded that way")?;
    let per_rank = (threads / world).max(1);
    let rendezvous = ShardOptions::local_rendezvous(tp, pp).context("picking rendezvous ports")?;
    let session = {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 32)
    };
    let exe = std::env::current_exe().context("finding this binary")?;
    let list = rendezvous
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut ranks = Ranks {
        children: Vec::new(),
    };
    for rank in 1..world {
        let child = Command::new(&exe)
            .arg("rank")
            .arg("--model")
            .arg(model)
            .args(["--tp", &tp.to_string(), "--pp", &pp.to_string()])
            .args(["--rank", &rank.to_string(), "--rendezvous", &list])
            .args(["--session", &session.to_string()])
            .args(["--threads", &per_rank.to_string()])
            .args(["--expand-weights", expand.name()])
            .args(["--timeout-secs", &RANK_TIMEOUT.as_secs().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        ranks.children.push(child);
    }
    let o = ShardOptions {
        spec: ShardSpec { tp, pp, rank: 0 },
        rendezvous,
        session,
        timeout: RANK_TIMEOUT,
        threads: per_rank,
        expand,
    };
    let model = form(src, o, &mut ranks)?;
    tracing::info!(tp, pp, threads_per_rank = per_rank, "sharded worker formed");
    Ok((Arc::new(model), ranks))
}

/// Forms the group as rank 0 while watching the other ranks' processes: a
/// rank that exits before the group forms (its model failed to load, say)
/// fails the start at once, instead of when the group's timeout runs out.
fn form(src: &ModelSource, o: ShardOptions, ranks: &mut Ranks) -> Result<ShardedModel> {
    let path = src.path.clone();
    let (tx, formed) = std::sync::mpsc::channel();
    // Detached: if a rank fails, this thread gives up at the group's
    // timeout on its own, and its result goes nowhere. Being detached, it
    // cannot borrow `src` and opens the model again (the header only: the
    // weights are mapped, not read).
    std::thread::Builder::new()
        .name("shard-formation".into())
        .spawn(move || {
            let r = ModelSource::open(&path)
                .map_err(anyhow::Error::from)
                .and_then(|src| Ok(ShardedModel::start(&src, &o)?));
            let _ = tx.send(r);
        })
        .context("starting the formation thread")?;
    loop {
        match formed.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => return r.context("forming the sharded worker"),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("forming the sharded worker: the formation thread ended without a result")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        for (i, c) in ranks.children.iter_mut().enumerate() {
            if let Ok(Some(status)) = c.try_wait() {
                bail!(
                    "forming the sharded worker: rank {} exited ({status}) before the group formed; its error is above",
                    i + 1
                );
            }
        }
    }
}
