//! `tandem bench comm`: what tensor parallelism costs on this machine's
//! CPU communicator.
//!
//! - all-reduce latency of [`TcpCommunicator`] versus message size, with
//!   `--world` ranks (threads of this process, each with its own real
//!   loopback sockets, as separate processes would have);
//! - in the same run, a raw loopback socket pair exchanging the same bytes
//!   both ways (no framing, no reduction): the floor the communicator is
//!   measured against;
//! - the bytes a rank sends per token per layer under tensor parallelism
//!   on the model: with the exact reduction the engine uses (one partial
//!   per reduction chunk, see `tandem_engine::shard`) and with a plain
//!   all-reduce of the hidden state, and between pipeline stages;
//! - with `--shapes`, decode speed of whole sharded workers (one process
//!   per rank, as `--tp/--pp` start them) on this machine.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use std::sync::Arc;

use tandem_engine::comm::{CommConfig, Communicator, TcpCommunicator};
use tandem_engine::cpu::{ExpandWeights, REDUCTION_CHUNK};
use tandem_engine::executor::Executor;
use tandem_engine::model::Model;
use tandem_model::weights::ModelSource;

#[derive(clap::Args)]
pub struct CommArgs {
    /// Ranks in the group.
    #[arg(long, default_value_t = 2)]
    pub world: usize,
    /// Message sizes in floats: one token's hidden state of the default
    /// model (576), then batches of 8, 32 and 256 tokens, then 4 MiB.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "576,4608,18432,147456,1048576"
    )]
    pub floats: Vec<usize>,
    /// Calls per size (the median is reported).
    #[arg(long, default_value_t = 200)]
    pub iters: usize,
    /// The model whose shapes give the bytes-per-token figures and that
    /// `--shapes` runs (default: the installed default model).
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<PathBuf>,
    /// Sharded worker shapes `TPxPP` to time decode on (e.g. `1x1,3x1,1x2,3x2`).
    #[arg(long, value_delimiter = ',')]
    pub shapes: Vec<String>,
    /// Sequences decoded together for `--shapes`.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Tokens generated per sequence for `--shapes` (after a 128-token prompt).
    #[arg(long, default_value_t = 32)]
    pub gen: usize,
    /// Threads of a whole worker for `--shapes` (shared among its ranks).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Also write the figures as JSON here.
    #[arg(long, value_parser = crate::output_file)]
    pub json: Option<PathBuf>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds per all-reduce of `n` floats, as rank 0 sees it.
fn communicator(world: usize, sizes: &[usize], iters: usize) -> Result<Vec<f64>> {
    let rendezvous = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let ranks: Vec<_> = (0..world)
        .map(|rank| {
            let sizes = sizes.to_vec();
            std::thread::spawn(move || -> Result<Vec<f64>> {
                let mut c = TcpCommunicator::connect(&CommConfig {
                    rank,
                    world_size: world,
                    rendezvous,
                    session: 0x7A4D,
                    timeout: Duration::from_secs(30),
                })?;
                let mut out = Vec::new();
                for &n in &sizes {
                    let mut buf = vec![1.0f32; n];
                    c.barrier()?;
                    let mut t = Vec::with_capacity(iters);
                    for _ in 0..iters {
                        let t0 = Instant::now();
                        c.all_reduce_sum(&mut buf)?;
                        t.push(t0.elapsed().as_secs_f64());
                        buf.fill(1.0);
                    }
                    out.push(median(t));
                }
                Ok(out)
            })
        })
        .collect();
    let mut first = None;
    for h in ranks {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("a rank panicked"))?
            .context("a rank failed")?;
        first.get_or_insert(r);
    }
    first.context("no ranks")
}

/// Median seconds for two raw sockets to exchange `n` floats each way:
/// small messages written then read on each side, large ones written by a
/// helper thread while the side reads (what the kernel allows at best).
fn raw_exchange(sizes: &[usize], iters: usize) -> Result<Vec<f64>> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr: SocketAddr = l.local_addr()?;
    let peer = std::thread::spawn(move || -> Result<()> {
        let (s, _) = l.accept()?;
        side(s, false, &[], 0).map(|_| ())
    });
    let s = TcpStream::connect(addr)?;
    let times = side(s, true, sizes, iters)?;
    peer.join()
        .map_err(|_| anyhow::anyhow!("the raw peer panicked"))??;
    Ok(times)
}

/// One end of the raw exchange. The leader sends each size and count first
/// so the other end follows without knowing the plan.
fn side(mut s: TcpStream, leader: bool, sizes: &[usize], iters: usize) -> Result<Vec<f64>> {
    s.set_nodelay(true)?;
    let sock = socket2::SockRef::from(&s);
    sock.set_send_buffer_size(1 << 20)?;
    sock.set_recv_buffer_size(1 << 20)?;
    let mut out = Vec::new();
    let mut plan = sizes.iter().map(|&n| (n, iters));
    loop {
        let (n, iters) = if leader {
            let Some((n, it)) = plan.next() else {
                s.write_all(&[0u8; 16])?;
                return Ok(out);
            };
            let mut m = (n as u64).to_le_bytes().to_vec();
            m.extend_from_slice(&(it as u64).to_le_bytes());
            s.write_all(&m)?;
            (n, it)
        } else {
            let mut m = [0u8; 16];
            s.read_exact(&mut m)?;
            let n = u64::from_le_bytes(m[..8].try_into()?) as usize;
            let it = u64::from_le_bytes(m[8..].try_into()?) as usize;
            if n == 0 {
                return Ok(out);
            }
            (n, it)
        };
        let send = vec![1u8; n * 4];
        let mut recv = vec![0u8; n * 4];
        let mut t = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t0 = Instant::now();
            if n * 4 <= 128 << 10 {
                s.write_all(&send)?;
                s.read_exact(&mut recv)?;
            } else {
                let mut w = s.try_clone()?;
                let send = &send;
                std::thread::scope(|sc| -> Result<()> {
                    let h = sc.spawn(move || w.write_all(send));
                    s.read_exact(&mut recv)?;
                    h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
                    Ok(())
                })?;
            }
            t.push(t0.elapsed().as_secs_f64());
        }
        out.push(median(t));
    }
}

/// Median seconds per decode step of `batch` sequences on a `tp × pp`
/// worker (ranks as processes, like a served worker's).
fn sharded_decode(
    path: &std::path::Path,
    src: &ModelSource,
    tp: usize,
    pp: usize,
    threads: usize,
    batch: usize,
    gen: usize,
) -> Result<f64> {
    let (exec, ranks): (Arc<dyn Executor>, _) = if tp * pp == 1 {
        let m = Model::load_with(src, threads, ExpandWeights::Auto)?;
        (Arc::new(m), None)
    } else {
        let (m, r) = crate::shard::start(path, src, tp, pp, threads, ExpandWeights::Auto)?;
        (m, Some(r))
    };
    let times = super::decode_steps(exec.as_ref(), batch, 128, gen, 0)?;
    // Rank 0 first: it tells the other ranks to stop.
    drop(exec);
    drop(ranks);
    Ok(median(times))
}

pub fn run(a: CommArgs) -> Result<()> {
    if a.world < 2 || a.iters == 0 || a.floats.contains(&0) {
        bail!("--world must be at least 2, --iters and every --floats positive");
    }
    let path = crate::model_path(a.model.clone())?;
    let src = ModelSource::open(&path).with_context(|| format!("loading {}", path.display()))?;
    let cfg = &src.config;
    let tp = a.world;
    // Each rank sends what it reduces to every other rank (all-gather form).
    let plain = 2 * cfg.hidden * 4 * (tp - 1);
    let chunks = (cfg.q_dim() + cfg.ffn) / tp / REDUCTION_CHUNK;
    let exact = chunks * cfg.hidden * 4 * (tp - 1);
    println!(
        "tensor parallelism over {tp} ranks, {}: bytes a rank sends per token per layer: \
         {exact} exact ({chunks} chunk partials of {} floats to each of {} peers), \
         {plain} with a plain all-reduce (2 × {} floats)",
        path.file_name().unwrap_or_default().to_string_lossy(),
        cfg.hidden,
        tp - 1,
        cfg.hidden
    );
    println!(
        "pipeline parallelism: {} bytes per token per stage boundary (the hidden state)",
        cfg.hidden * 4
    );
    let comm = communicator(a.world, &a.floats, a.iters)?;
    let raw = raw_exchange(&a.floats, a.iters)?;
    println!(
        "{:>10} {:>10} {:>14} {:>14} {:>8}",
        "floats", "bytes", "all-reduce µs", "raw 2-way µs", "ratio"
    );
    let mut rows = Vec::new();
    for ((&n, c), r) in a.floats.iter().zip(&comm).zip(&raw) {
        println!(
            "{:>10} {:>10} {:>14.1} {:>14.1} {:>7.2}×",
            n,
            n * 4,
            c * 1e6,
            r * 1e6,
            c / r
        );
        rows.push(json!({
            "floats": n,
            "bytes": n * 4,
            "all_reduce_us": c * 1e6,
            "raw_exchange_us": r * 1e6,
            "ratio": c / r,
        }));
    }
    let mut shapes = Vec::new();
    if !a.shapes.is_empty() {
        println!(
            "decode, {} sequence(s) × {} tokens after a 128-token prompt, {} threads per worker:",
            a.batch, a.gen, a.threads
        );
        println!(
            "{:>6} {:>6} {:>12} {:>14}",
            "tp", "pp", "tok/s", "ms per step"
        );
        for shape in &a.shapes {
            let (t, p) = shape
                .split_once('x')
                .and_then(|(t, p)| Some((t.parse().ok()?, p.parse().ok()?)))
                .with_context(|| format!("bad shape {shape:?} (want TPxPP, e.g. 3x1)"))?;
            let step = sharded_decode(&path, &src, t, p, a.threads, a.batch, a.gen)?;
            println!(
                "{:>6} {:>6} {:>12.1} {:>14.2}",
                t,
                p,
                a.batch as f64 / step,
                step * 1e3
            );
            shapes.push(json!({
                "tp": t, "pp": p, "batch": a.batch,
                "tok_s": a.batch as f64 / step, "step_ms": step * 1e3,
            }));
        }
    }
    if let Some(p) = &a.json {
        let v = json!({
            "world": a.world,
            "iters": a.iters,
            "bytes_per_token_per_layer_exact": exact,
            "bytes_per_token_per_layer_plain": plain,
            "bytes_per_token_per_stage_boundary": cfg.hidden * 4,
            "sizes": rows,
            "shapes": shapes,
        });
        std::fs::write(p, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
