//! `tandem bench kv-transfer`: KV of a 2,048-token prompt over loopback,
//! each transport against its ceiling measured in the same run: raw TCP
//! (same socket buffers, same receive pattern: straight into the
//! destination blocks, but no framing or checksums) for the TCP and gRPC
//! transports, one plain copy of every region for the shared-memory ring.
//! The receiving side runs on a thread of its own, as a decode worker is a
//! process of its own; gRPC is received on a node server's one port, as a
//! decode worker with `--kv-transport grpc` takes it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use tandem_cluster::server::{NodeServer, Readiness};
use tandem_engine::kv::{KvDtype, KvLayout, KvPool, SeqKv};
use tandem_kv_transfer::{
    grpc, BlockRegion, CancellationToken, ClusterSecret, DataPlane, GrpcTransport, Handshake,
    KvSender, KvTransport, LayoutDescriptor, PoolSink, ReceiverConfig, TcpKvListener, TcpTransport,
    TransferConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// The TCP transport, payload on the socket.
    Tcp,
    /// The TCP transport, payload through its shared-memory ring (sender
    /// and receiver on one host).
    Shm,
    /// The gRPC transport (`tandem.v1.KvTransfer` over HTTP/2).
    Grpc,
}

#[derive(clap::Args)]
pub struct KvArgs {
    /// Transport to measure (all when omitted), with its ceiling measured in
    /// the same run: raw TCP for tcp and grpc, one memcpy for shm.
    #[arg(long)]
    pub transport: Option<Transport>,
    /// Prompt tokens whose KV is sent.
    #[arg(long, default_value_t = 2048, value_parser = crate::positive)]
    pub tokens: usize,
    /// Transfers per measurement; the best is reported.
    #[arg(long, default_value_t = 5, value_parser = crate::positive)]
    pub runs: usize,
    /// Also write the figures as JSON here.
    #[arg(long, value_parser = crate::output_file)]
    pub json: Option<PathBuf>,
}

/// Buffer of the raw receiver, the same as the TCP transport's.
const READ_BUFFER: usize = 256 * 1024;

struct Case {
    name: &'static str,
    layout: KvLayout,
}

fn cases() -> [Case; 2] {
    let l = |n_layers, n_kv_heads, head_dim| KvLayout {
        dtype: KvDtype::F32,
        n_layers,
        n_kv_heads,
        head_dim,
        block_size: 16,
    };
    [
        Case {
            name: "default (SmolLM2-135M)",
            layout: l(30, 3, 64),
        },
        Case {
            name: "7B-shaped",
            layout: l(32, 8, 128),
        },
    ]
}

pub fn run(a: KvArgs) -> Result<()> {
    let mut out = Vec::new();
    for case in cases() {
        let l = case.layout;
        let bytes = (a.tokens * l.token_bytes()) as f64;
        let n_blocks = l.blocks_for(a.tokens);
        let mut src = KvPool::new(l, n_blocks);
        let mut skv = SeqKv::default();
        src.reserve(&mut skv, a.tokens)?;
        for layer in 0..l.n_layers {
            for (i, &b) in skv.blocks.iter().enumerate() {
                for (j, x) in src.region_mut(layer, b).iter_mut().enumerate() {
                    *x = (layer * 31 + i * 7 + j) as f32 * 1e-3;
                }
            }
        }
        skv.len = a.tokens;
        let mut dst = KvPool::new(l, n_blocks);
        let mut dkv = SeqKv::default();
        dst.reserve(&mut dkv, a.tokens)?;
        println!(
            "{}: {} layers x {} KV heads x {} dims, f32, block {}: {} bytes/token, {:.1} MB for {} tokens",
            case.name, l.n_layers, l.n_kv_heads, l.head_dim, l.block_size, l.token_bytes(), bytes / 1e6, a.tokens
        );
        let gbps = |s: f64| bytes / s / 1e9;
        let mut row = serde_json::json!({
            "layout": case.name, "dtype": "f32", "bytes_per_token": l.token_bytes(), "tokens": a.tokens,
            "bytes": bytes,
        });
        let wants = |t: Transport| a.transport.is_none() || a.transport == Some(t);
        if wants(Transport::Tcp) || wants(Transport::Grpc) {
            let raw = raw_tcp(&src, &skv, &mut dst, &dkv, a.runs)?;
            println!("  raw TCP           {:7.2} GB/s", gbps(raw));
            row["raw_tcp_gbps"] = gbps(raw).into();
            for (t, name, key) in [
                (Transport::Tcp, "tcp transport ", "tcp"),
                (Transport::Grpc, "gRPC transport", "grpc"),
            ] {
                if !wants(t) {
                    continue;
                }
                let took = transfer(t, &src, &skv, &mut dst, &dkv, a.runs)?;
                println!(
                    "  {name}    {:7.2} GB/s  ({:.0}% of raw TCP)",
                    gbps(took),
                    100.0 * raw / took
                );
                row[format!("{key}_gbps")] = gbps(took).into();
                row[format!("{key}_vs_raw")] = (raw / took).into();
            }
        }
        if wants(Transport::Shm) {
            let copy = (0..a.runs.max(1))
                .map(|_| memcpy(&src, &skv, &mut dst, &dkv))
                .fold(f64::INFINITY, f64::min);
            println!("  one memcpy        {:7.2} GB/s", gbps(copy));
            let took = transfer(Transport::Shm, &src, &skv, &mut dst, &dkv, a.runs)?;
            println!(
                "  shm transport     {:7.2} GB/s  ({:.0}% of one memcpy)",
                gbps(took),
                100.0 * copy / took
            );
            row["memcpy_gbps"] = gbps(copy).into();
            row["shm_gbps"] = gbps(took).into();
            row["shm_vs_memcpy"] = (copy / took).into();
        }
        out.push(row);
    }
    if let Some(p) = a.json {
        std::fs::write(&p, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Runs the receiving side on a thread and runtime of its own (a decode
/// worker is a process of its own) and the sending side here; `recv` hands
/// over where to connect once it listens, and may wait for `SenderDone`
/// before it stops serving. Returns what the sending side measured.
fn two_sides<A: Send>(
    recv: impl FnOnce(std::sync::mpsc::Sender<A>, SenderDone) -> Result<()> + Send,
    send: impl FnOnce(A) -> Result<f64>,
) -> Result<f64> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done, sender_done) = tokio::sync::oneshot::channel();
        let receiver = std::thread::Builder::new()
            .name("kv-receiver".into())
            .spawn_scoped(scope, move || recv(tx, sender_done))?;
        let Ok(to) = rx.recv() else {
            return Err(receiver
                .join()
                .expect("receiver thread")
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("receiver ended before listening")));
        };
        let sent = send(to);
        let _ = done.send(());
        let received = receiver.join().expect("receiver thread");
        let took = sent.context("sending side")?;
        received.context("receiving side")?;
        Ok(took)
    })
}

/// The shortest of `runs` timings.
async fn best_of<F: std::future::Future<Output = Result<()>>>(
    runs: usize,
    mut once: impl FnMut() -> F,
) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        once().await?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Fires when the sending side has returned.
type SenderDone = tokio::sync::oneshot::Receiver<()>;

fn current_thread() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// The fastest of `runs` transfers of the whole prompt's KV through
/// transport `t`, each timed by the sender from connect to the receiver's
/// confirmation. The receiver listens throughout and gRPC keeps one
/// connection, as between long-running workers.
fn transfer(
    t: Transport,
    src: &KvPool,
    skv: &SeqKv,
    dst: &mut KvPool,
    dkv: &SeqKv,
    runs: usize,
) -> Result<f64> {
    let l = *src.layout();
    let tokens = skv.len;
    let runs = runs.max(1);
    // The TCP transport's payload on the socket, or through its ring.
    let cfg = TransferConfig {
        shared_memory: t == Transport::Shm,
        ..TransferConfig::default()
    };
    let recv = |to: std::sync::mpsc::Sender<std::net::SocketAddr>, sent: SenderDone| {
        current_thread()?.block_on(async {
            let cancel = CancellationToken::new();
            if t == Transport::Grpc {
                // As a decode worker takes it: on its node's one port.
                let (svc, mut incoming) = grpc::kv_service(receiver(l));
                let node = NodeServer::bind("127.0.0.1:0".parse()?).await?;
                let addr = node.local_addr();
                let readiness = Readiness::default();
                readiness.set(true);
                tokio::spawn(node.serve(
                    tonic::service::Routes::new(svc),
                    vec![tandem_proto::kv::SERVICE],
                    axum::Router::new(),
                    readiness,
                    cancel.clone(),
                ));
                to.send(addr)?;
                for _ in 0..runs {
                    let r = incoming.recv().await.context("gRPC server stopped")?;
                    r.receive_into(&mut PoolSink::new(dst, dkv), &cancel)
                        .await?;
                }
                // The server's tasks carry the final reply: serve until the
                // sender has it.
                let _ = sent.await;
                cancel.cancel();
            } else {
                let listener = TcpKvListener::bind("127.0.0.1:0".parse()?, receiver(l)).await?;
                to.send(listener.local_addr()?)?;
                for _ in 0..runs {
                    let r = listener.accept().await?;
                    r.receive_into(&mut PoolSink::new(dst, dkv), &cancel)
                        .await?;
                }
            }
            Ok(())
        })
    };
    let send = |addr: std::net::SocketAddr| {
        current_thread()?.block_on(async {
            if t == Transport::Grpc {
                let client = GrpcTransport::connect_to(addr, cfg).await?;
                best_of(runs, || async {
                    let mut s = client.connect(handshake(l, tokens)).await?;
                    send_all(&mut s, src, skv).await?;
                    s.finish().await?;
                    Ok(())
                })
                .await
            } else {
                let want = match t {
                    Transport::Shm => DataPlane::SharedMemory,
                    _ => DataPlane::Socket,
                };
                let tcp = TcpTransport::new(addr, cfg);
                best_of(runs, || async {
                    let mut s = tcp.connect(handshake(l, tokens)).await?;
                    anyhow::ensure!(
                        s.data_plane() == want,
                        "payload went by {:?}",
                        s.data_plane()
                    );
                    send_all(&mut s, src, skv).await?;
                    s.finish().await?;
                    Ok(())
                })
                .await
            }
        })
    };
    two_sides(recv, send)
}

/// The shared-memory ceiling: every region copied once into its
/// destination block, by one thread, with no framing or checksums.
fn memcpy(src: &KvPool, skv: &SeqKv, dst: &mut KvPool, dkv: &SeqKv) -> f64 {
    let l = *src.layout();
    let t0 = Instant::now();
    for layer in 0..l.n_layers {
        for (&s, &d) in skv.blocks.iter().zip(&dkv.blocks) {
            dst.region_mut(layer, d)
                .copy_from_slice(src.region(layer, s));
        }
    }
    std::hint::black_box(&*dst);
    t0.elapsed().as_secs_f64()
}

fn desc(l: KvLayout) -> LayoutDescriptor {
    LayoutDescriptor::new("bench", l)
}

fn receiver(l: KvLayout) -> ReceiverConfig {
    ReceiverConfig {
        expected: desc(l),
        secret: ClusterSecret::new("bench"),
        transfer: TransferConfig::default(),
    }
}

fn handshake(l: KvLayout, tokens: usize) -> Handshake {
    Handshake {
        layout: desc(l),
        secret: ClusterSecret::new("bench"),
        request_id: 1,
        tokens: tokens as u64,
    }
}

/// Layer by layer, every block, as a prefill worker streams them.
async fn send_all<S: KvSender>(
    s: &mut S,
    pool: &KvPool,
    kv: &SeqKv,
) -> tandem_kv_transfer::Result<()> {
    let l = *pool.layout();
    for layer in 0..l.n_layers {
        let regions: Vec<BlockRegion<'_>> = kv
            .blocks
            .iter()
            .enumerate()
            .map(|(i, &b)| BlockRegion {
                block: i as u32,
                slots: (kv.len - i * l.block_size).min(l.block_size) as u32,
                data: pool.region(layer, b),
            })
            .collect();
        s.send_layer_blocks(layer as u32, &regions).await?;
    }
    Ok(())
}

/// The TCP ceiling: the same regions over a socket with the same buffers,
/// each read straight into its destination block; no headers, no checksums.
/// A connection per run, as the TCP transport makes.
fn raw_tcp(src: &KvPool, skv: &SeqKv, dst: &mut KvPool, dkv: &SeqKv, runs: usize) -> Result<f64> {
    let l = *src.layout();
    let runs = runs.max(1);
    let buf = TransferConfig::default().socket_buffer as u32;
    let recv = |to: std::sync::mpsc::Sender<std::net::SocketAddr>, _: SenderDone| {
        current_thread()?.block_on(async {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.set_recv_buffer_size(buf)?;
            sock.set_send_buffer_size(buf)?;
            sock.bind("127.0.0.1:0".parse()?)?;
            let listener = sock.listen(16)?;
            to.send(listener.local_addr()?)?;
            for _ in 0..runs {
                let (mut stream, _) = listener.accept().await?;
                let mut r = BufReader::with_capacity(READ_BUFFER, &mut stream);
                for layer in 0..l.n_layers {
                    for &b in &dkv.blocks {
                        r.read_exact(bytemuck_bytes_mut(dst.region_mut(layer, b)))
                            .await?;
                    }
                }
                // The sender's clock stops at this confirmation.
                stream.write_all(&[1]).await?;
            }
            Ok(())
        })
    };
    let send = |addr: std::net::SocketAddr| {
        current_thread()?.block_on(best_of(runs, || async move {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.set_send_buffer_size(buf)?;
            s.set_recv_buffer_size(buf)?;
            let mut stream = s.connect(addr).await?;
            stream.set_nodelay(true)?;
            // Writes of about `batch_bytes`, as the transport makes.
            let batch = TransferConfig::default().batch_bytes;
            let mut out = Vec::with_capacity(batch + l.block_floats() * 4);
            for layer in 0..l.n_layers {
                for &b in &skv.blocks {
                    out.extend_from_slice(bytemuck_bytes(src.region(layer, b)));
                    if out.len() >= batch {
                        stream.write_all(&out).await?;
                        out.clear();
                    }
                }
            }
            stream.write_all(&out).await?;
            let mut ack = [0u8; 1];
            stream.read_exact(&mut ack).await?;
            Ok(())
        }))
    };
    two_sides(recv, send)
}

fn bytemuck_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), std::mem::size_of_val(x)) }
}

fn bytemuck_bytes_mut(x: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above, and every byte pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), std::mem::size_of_val(x)) }
}
