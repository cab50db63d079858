//! `tandem bench kv-transfer`: KV of a 2,048-token prompt over loopback,
//! with raw TCP throughput (same socket buffers, same receive pattern:
//! straight into the destination blocks, but no framing or checksums)
//! measured in the same run as the ceiling.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use tandem_engine::kv::{KvDtype, KvLayout, KvPool, SeqKv};
use tandem_kv_transfer::{
    grpc, BlockRegion, CancellationToken, ClusterSecret, GrpcTransport, Handshake, KvSender,
    KvTransport, LayoutDescriptor, PoolSink, ReceiverConfig, TcpKvListener, TcpTransport,
    TransferConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Tcp,
    Grpc,
}

#[derive(clap::Args)]
pub struct KvArgs {
    /// Transport to measure (both when omitted); raw TCP is always measured.
    #[arg(long)]
    pub transport: Option<Transport>,
    /// Prompt tokens whose KV is sent.
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Transfers per measurement; the best is reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Also write the figures as JSON here.
    #[arg(long)]
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(a))
}

async fn run_async(a: KvArgs) -> Result<()> {
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
        let mut raw = f64::INFINITY;
        for _ in 0..a.runs.max(1) {
            raw = raw.min(raw_tcp(&src, &skv, &mut dst, &dkv).await?);
        }
        println!("  raw TCP        {:7.2} GB/s", gbps(raw));
        let mut row = serde_json::json!({
            "layout": case.name, "dtype": "f32", "bytes_per_token": l.token_bytes(), "tokens": a.tokens,
            "bytes": bytes, "raw_tcp_gbps": gbps(raw),
        });
        if a.transport != Some(Transport::Grpc) {
            let mut t = f64::INFINITY;
            for _ in 0..a.runs.max(1) {
                t = t.min(tcp(&src, &skv, &mut dst, &dkv, a.tokens).await?);
            }
            println!(
                "  tcp transport  {:7.2} GB/s  ({:.0}% of raw)",
                gbps(t),
                100.0 * raw / t
            );
            row["tcp_gbps"] = gbps(t).into();
            row["tcp_vs_raw"] = (raw / t).into();
        }
        if a.transport != Some(Transport::Tcp) {
            let cancel = CancellationToken::new();
            let (addr, _task, mut incoming) =
                grpc::serve("127.0.0.1:0".parse()?, receiver(l), cancel.clone()).await?;
            let client = GrpcTransport::connect_to(addr, TransferConfig::default()).await?;
            let mut t = f64::INFINITY;
            for _ in 0..a.runs.max(1) {
                let send = async {
                    let mut s = client.connect(handshake(l, a.tokens)).await?;
                    send_all(&mut s, &src, &skv).await?;
                    s.finish().await
                };
                let recv = async {
                    let r = incoming.recv().await.context("gRPC server stopped")?;
                    Ok::<_, anyhow::Error>(
                        r.receive_into(
                            &mut PoolSink::new(&mut dst, &dkv),
                            &CancellationToken::new(),
                        )
                        .await?,
                    )
                };
                let t0 = Instant::now();
                let (s, r) = tokio::join!(send, recv);
                s?;
                r?;
                t = t.min(t0.elapsed().as_secs_f64());
            }
            cancel.cancel();
            println!(
                "  gRPC transport {:7.2} GB/s  ({:.0}% of raw)",
                gbps(t),
                100.0 * raw / t
            );
            row["grpc_gbps"] = gbps(t).into();
            row["grpc_vs_raw"] = (raw / t).into();
        }
        out.push(row);
    }
    if let Some(p) = a.json {
        std::fs::write(&p, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
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

async fn tcp(
    src: &KvPool,
    skv: &SeqKv,
    dst: &mut KvPool,
    dkv: &SeqKv,
    tokens: usize,
) -> Result<f64> {
    let l = *src.layout();
    let listener = TcpKvListener::bind("127.0.0.1:0".parse()?, receiver(l)).await?;
    let t = TcpTransport::new(listener.local_addr()?, TransferConfig::default());
    let t0 = Instant::now();
    let send = async {
        let mut s = t.connect(handshake(l, tokens)).await?;
        send_all(&mut s, src, skv).await?;
        s.finish().await
    };
    let recv = async {
        let r = listener.accept().await?;
        r.receive_into(&mut PoolSink::new(dst, dkv), &CancellationToken::new())
            .await
    };
    let (s, r) = tokio::join!(send, recv);
    s?;
    r?;
    Ok(t0.elapsed().as_secs_f64())
}

/// The ceiling: the same regions over a socket with the same buffers, each
/// read straight into its destination block; no headers, no checksums.
async fn raw_tcp(src: &KvPool, skv: &SeqKv, dst: &mut KvPool, dkv: &SeqKv) -> Result<f64> {
    let l = *src.layout();
    let buf = TransferConfig::default().socket_buffer as u32;
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_recv_buffer_size(buf)?;
    sock.set_send_buffer_size(buf)?;
    sock.bind("127.0.0.1:0".parse()?)?;
    let listener = sock.listen(16)?;
    let addr = listener.local_addr()?;
    let t0 = Instant::now();
    let send = async {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.set_send_buffer_size(buf)?;
        s.set_recv_buffer_size(buf)?;
        let mut stream = s.connect(addr).await?;
        stream.set_nodelay(true)?;
        for layer in 0..l.n_layers {
            for &b in &skv.blocks {
                stream
                    .write_all(bytemuck_bytes(src.region(layer, b)))
                    .await?;
            }
        }
        stream.flush().await?;
        Ok::<_, anyhow::Error>(())
    };
    let recv = async {
        let (stream, _) = listener.accept().await?;
        let mut r = BufReader::with_capacity(READ_BUFFER, stream);
        for layer in 0..l.n_layers {
            for &b in &dkv.blocks {
                r.read_exact(bytemuck_bytes_mut(dst.region_mut(layer, b)))
                    .await?;
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    let (s, r) = tokio::join!(send, recv);
    s?;
    r?;
    Ok(t0.elapsed().as_secs_f64())
}

fn bytemuck_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), std::mem::size_of_val(x)) }
}

fn bytemuck_bytes_mut(x: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above, and every byte pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), std::mem::size_of_val(x)) }
}
