//! KV transfer over real sockets: bit-exact round trips (in-process and
//! across two OS processes), corrupted frames, refused handshakes, a sender
//! process killed mid-transfer, and the transfer lease: heartbeats keep an
//! idle transfer alive, a hung peer (a stopped process, a receiver that
//! never answers) fails it on the other side within a lease.
//!
//! "tcp" is the TCP transport with the payload on the socket, "shm" the
//! same transport with its shared-memory ring (a ring of a few blocks, so
//! every transfer laps it and waits for the receiver's credits).
//!
//! The peer process is this test binary itself, re-run with
//! `TANDEM_KV_PEER` set: `peer_process` then acts as the prefill side.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tandem_engine::kv::{KvPool, SeqKv};
use tandem_kv_transfer::grpc;
use tandem_kv_transfer::{
    CancellationToken, ClusterSecret, DataPlane, GrpcTransport, KvReceiver, KvSender,
    KvTransferError, KvTransport, PoolSink, ReceiverConfig, TcpKvListener, TcpTransport,
    TransferConfig,
};

mod common;
use common::*;

/// Short enough that a lease test takes seconds, long enough that two busy
/// cores never starve a heartbeat (sent every third of it) past it.
const LEASE: Duration = Duration::from_secs(2);

fn cfg() -> TransferConfig {
    TransferConfig {
        io_timeout: Duration::from_secs(5),
        transfer_timeout: Duration::from_secs(20),
        lease: LEASE,
        ..Default::default()
    }
}

/// The TCP transport with the payload on the socket.
fn socket_cfg() -> TransferConfig {
    TransferConfig {
        shared_memory: false,
        ..cfg()
    }
}

/// The TCP transport through a shared-memory ring of four full blocks.
fn shm_cfg() -> TransferConfig {
    TransferConfig {
        shared_memory: true,
        shared_memory_ring: 4 * 2 * 2 * 8 * 16 * 4,
        ..cfg()
    }
}

fn sender_cfg(transport: &str) -> TransferConfig {
    match transport {
        "shm" => shm_cfg(),
        _ => socket_cfg(),
    }
}

fn receiver_cfg() -> ReceiverConfig {
    ReceiverConfig {
        expected: desc(),
        secret: secret(),
        transfer: cfg(),
    }
}

async fn tcp_listener() -> TcpKvListener {
    TcpKvListener::bind("127.0.0.1:0".parse().unwrap(), receiver_cfg())
        .await
        .unwrap()
}

async fn grpc_server(
    cancel: &CancellationToken,
) -> (SocketAddr, tokio::sync::mpsc::Receiver<KvReceiver>) {
    let (addr, _task, rx) = grpc::serve(
        "127.0.0.1:0".parse().unwrap(),
        receiver_cfg(),
        cancel.clone(),
    )
    .await
    .unwrap();
    (addr, rx)
}

/// A bit-exact round trip over the TCP transport: the sender with `send`,
/// the receiver with `recv`; the payload must have gone by `plane`.
async fn tcp_round_trip(send: TransferConfig, recv: ReceiverConfig, plane: DataPlane, seed: u64) {
    let listener = TcpKvListener::bind("127.0.0.1:0".parse().unwrap(), recv)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let sender = tokio::spawn(async move {
        let (pool, kv) = source(seed);
        let mut s = TcpTransport::new(addr, send)
            .connect(handshake(seed))
            .await?;
        assert_eq!(s.data_plane(), plane);
        send_chunks(&mut s, &pool, &kv, &CHUNKS).await?;
        s.finish().await
    });
    let r = listener.accept().await.unwrap();
    assert_eq!(r.handshake().request_id, seed);
    let mut sched = decode_side();
    let (res, kv) = receive(&mut sched, r).await;
    let summary = res.unwrap();
    assert_eq!(sender.await.unwrap().unwrap(), summary);
    let (src, skv) = source(seed);
    assert_same(&src, &skv, sched.pool(), &kv.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_round_trip_is_bit_exact() {
    tcp_round_trip(socket_cfg(), receiver_cfg(), DataPlane::Socket, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_round_trip_is_bit_exact_across_ring_laps() {
    tcp_round_trip(shm_cfg(), receiver_cfg(), DataPlane::SharedMemory, 11).await;
}

/// A receiver that does not map rings (turned off here; on another host it
/// could not) declines the offer, and the same sender sends on the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_ring_sends_the_payload_on_the_socket() {
    let mut rc = receiver_cfg();
    rc.transfer.shared_memory = false;
    tcp_round_trip(shm_cfg(), rc, DataPlane::Socket, 12).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_round_trip_is_bit_exact() {
    let cancel = CancellationToken::new();
    let (addr, mut incoming) = grpc_server(&cancel).await;
    let sender = tokio::spawn(async move {
        let (pool, kv) = source(2);
        let t = GrpcTransport::connect_to(addr, cfg()).await?;
        let mut s = t.connect(handshake(8)).await?;
        send_chunks(&mut s, &pool, &kv, &CHUNKS).await?;
        s.finish().await
    });
    let r = incoming.recv().await.unwrap();
    assert_eq!(r.handshake().request_id, 8);
    let mut sched = decode_side();
    let (res, kv) = receive(&mut sched, r).await;
    let summary = res.unwrap();
    assert_eq!(sender.await.unwrap().unwrap(), summary);
    let (src, skv) = source(2);
    assert_same(&src, &skv, sched.pool(), &kv.unwrap());
    cancel.cancel();
}

/// The service is plain gRPC: tonic's generated client, with prost
/// encoding every message (the transport's own sender writes them by hand),
/// transfers bit-exact and reads the replies to their OK status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_grpc_client_transfers_bit_exact() {
    use tandem_kv_transfer::frame::{encode_payload_vec, frame_seed};
    use tandem_proto::kv as pb;
    let cancel = CancellationToken::new();
    let (addr, mut incoming) = grpc_server(&cancel).await;
    let sender = tokio::spawn(async move {
        let (pool, kv) = source(3);
        let l = layout();
        let mut frames = vec![pb::KvFrame {
            kind: Some(pb::FrameKind::Handshake(handshake(5).to_proto())),
        }];
        let mut sent = 0;
        for layer in 0..l.n_layers {
            let blocks: Vec<pb::KvBlock> = kv
                .blocks
                .iter()
                .enumerate()
                .map(|(i, &b)| {
                    let slots = (kv.len - i * l.block_size).min(l.block_size) as u32;
                    let mut payload = Vec::new();
                    let crc32c = encode_payload_vec(
                        &l,
                        pool.region(layer, b),
                        slots as usize,
                        frame_seed(layer as u32, i as u32, slots),
                        &mut payload,
                    );
                    pb::KvBlock {
                        layer: layer as u32,
                        block: i as u32,
                        slots,
                        crc32c,
                        payload: payload.into(),
                    }
                })
                .collect();
            sent += blocks.len() as u64;
            frames.push(pb::KvFrame {
                kind: Some(pb::FrameKind::Blocks(pb::KvBlocks {
                    request_id: 5,
                    blocks,
                })),
            });
        }
        frames.push(pb::KvFrame {
            kind: Some(pb::FrameKind::End(pb::KvEnd {
                request_id: 5,
                frames: sent,
            })),
        });
        let mut client = pb::KvTransferClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut replies = client
            .transfer(tokio_stream::iter(frames))
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        while let Some(r) = replies.message().await.unwrap() {
            got.extend(r.kind);
        }
        got
    });
    let r = incoming.recv().await.unwrap();
    let mut sched = decode_side();
    let (res, kv) = receive(&mut sched, r).await;
    res.unwrap();
    let replies = sender.await.unwrap();
    assert!(
        matches!(replies.first(), Some(pb::ReplyKind::Accepted(true))),
        "{replies:?}"
    );
    assert!(
        matches!(replies.last(), Some(pb::ReplyKind::Done(_))),
        "{replies:?}"
    );
    let (src, skv) = source(3);
    assert_same(&src, &skv, sched.pool(), &kv.unwrap());
    cancel.cancel();
}

/// A caller not yet checked gets no more than a handshake's worth of
/// buffering: an oversized first message ends the call before any of the
/// rest is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_first_grpc_message_is_refused() {
    use tandem_proto::kv as pb;
    let cancel = CancellationToken::new();
    let (addr, mut incoming) = grpc_server(&cancel).await;
    let mut hs = handshake(4).to_proto();
    hs.cluster_secret = vec![7; 100 << 10];
    let mut client = pb::KvTransferClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let frames = vec![pb::KvFrame {
        kind: Some(pb::FrameKind::Handshake(hs)),
    }];
    let e = client
        .transfer(tokio_stream::iter(frames))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("handshake"), "{e}");
    assert!(incoming.try_recv().is_err());
    cancel.cancel();
}

/// One bit flipped after its checksum, over the TCP transport with `send`.
async fn corrupted_frame_over_tcp(send: TransferConfig, seed: u64) {
    let listener = tcp_listener().await;
    let addr = listener.local_addr().unwrap();
    let sender = tokio::spawn(async move {
        let (pool, kv) = source(seed);
        let mut s = TcpTransport::new(addr, send)
            .connect(handshake(seed))
            .await?;
        send_chunks(&mut s, &pool, &kv, &CHUNKS[..1]).await?;
        s.corrupt_next_frame();
        send_chunks(&mut s, &pool, &kv, &CHUNKS[1..]).await?;
        s.finish().await
    });
    let mut sched = decode_side();
    let (res, _) = receive(&mut sched, listener.accept().await.unwrap()).await;
    let e = res.unwrap_err();
    assert!(matches!(e, KvTransferError::Checksum { .. }), "{e}");
    // The sender learns it failed (as a checksum failure, or as the
    // connection closing under it if it was still writing).
    assert!(sender.await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_frame_is_detected_tcp() {
    corrupted_frame_over_tcp(socket_cfg(), 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_frame_is_detected_shm() {
    corrupted_frame_over_tcp(shm_cfg(), 13).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_frame_is_detected_grpc() {
    let cancel = CancellationToken::new();
    let (addr, mut incoming) = grpc_server(&cancel).await;
    let sender = tokio::spawn(async move {
        let (pool, kv) = source(4);
        let mut s = GrpcTransport::connect_to(addr, cfg())
            .await?
            .connect(handshake(10))
            .await?;
        s.corrupt_next_frame();
        send_chunks(&mut s, &pool, &kv, &CHUNKS).await?;
        s.finish().await
    });
    let mut sched = decode_side();
    let (res, _) = receive(&mut sched, incoming.recv().await.unwrap()).await;
    assert!(
        matches!(res, Err(KvTransferError::Checksum { .. })),
        "{res:?}"
    );
    let e = sender.await.unwrap().unwrap_err();
    assert!(
        matches!(&e, KvTransferError::Remote { class, .. } if class == "checksum"),
        "{e}"
    );
    cancel.cancel();
}

/// The receiver goes away while the sender waits for ring space: the sender
/// hears it at once (not after its 5 s I/O deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_receiver_fails_a_sender_waiting_for_ring_space() {
    let listener = tcp_listener().await;
    let t = TcpTransport::new(listener.local_addr().unwrap(), shm_cfg());
    let (s, r) = tokio::join!(t.connect(handshake(20)), listener.accept());
    let mut s = s.unwrap();
    assert_eq!(s.data_plane(), DataPlane::SharedMemory);
    let r = r.unwrap();
    let gone = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(r);
        Instant::now()
    };
    let (src, skv) = source(14);
    let send = async {
        let e = send_chunks(&mut s, &src, &skv, &CHUNKS).await.unwrap_err();
        (e, Instant::now())
    };
    let (dropped_at, (e, failed_at)) = tokio::join!(gone, send);
    assert!(
        matches!(e, KvTransferError::PeerGone(_) | KvTransferError::Io(_)),
        "{e}"
    );
    let took = failed_at.saturating_duration_since(dropped_at);
    assert!(took < Duration::from_secs(2), "noticed after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_handshakes_are_refused_tcp() {
    let listener = tcp_listener().await;
    let addr = listener.local_addr().unwrap();
    let t = TcpTransport::new(addr, shm_cfg());

    let mut hs = handshake(1);
    hs.layout.model_fingerprint = "another-model".into();
    let (sent, accepted) = tokio::join!(t.connect(hs), listener.accept());
    assert!(matches!(
        accepted,
        Err(KvTransferError::Mismatch {
            field: "model_fingerprint",
            ..
        })
    ));
    match sent {
        Err(KvTransferError::Refused { field, class, .. }) => {
            assert_eq!(field, "model_fingerprint");
            assert_eq!(class, "layout_mismatch");
        }
        other => panic!("{:?}", other.err()),
    }

    let mut hs = handshake(2);
    hs.layout.layout.head_dim = 16;
    let (sent, accepted) = tokio::join!(t.connect(hs), listener.accept());
    assert!(matches!(
        accepted,
        Err(KvTransferError::Mismatch {
            field: "head_dim",
            ..
        })
    ));
    assert!(matches!(sent, Err(KvTransferError::Refused { ref field, .. }) if field == "head_dim"));

    let mut hs = handshake(3);
    hs.secret = ClusterSecret::new("guess");
    let (sent, accepted) = tokio::join!(t.connect(hs), listener.accept());
    assert!(matches!(accepted, Err(KvTransferError::BadSecret)));
    assert!(matches!(sent, Err(KvTransferError::BadSecret)));
    assert_eq!(sent.err().unwrap().class(), "unauthenticated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_handshakes_are_refused_grpc() {
    let cancel = CancellationToken::new();
    let (addr, mut incoming) = grpc_server(&cancel).await;
    let t = GrpcTransport::connect_to(addr, cfg()).await.unwrap();
    let mut hs = handshake(1);
    hs.layout.layout.block_size = 32;
    let e = t.connect(hs).await.err().unwrap();
    assert!(
        matches!(&e, KvTransferError::Refused { field, .. } if field == "block_size"),
        "{e}"
    );
    let mut hs = handshake(2);
    hs.layout.tp_size = 2;
    let e = t.connect(hs).await.err().unwrap();
    assert!(
        matches!(&e, KvTransferError::Refused { field, .. } if field == "tp_size"),
        "{e}"
    );
    let mut hs = handshake(3);
    hs.secret = ClusterSecret::new("");
    assert!(matches!(
        t.connect(hs).await,
        Err(KvTransferError::BadSecret)
    ));
    assert!(
        incoming.try_recv().is_err(),
        "refused transfers never reach the application"
    );
    cancel.cancel();
}

/// A gRPC peer that does not serve `KvTransfer` (a misconfigured address:
/// another node's health endpoint) fails the connect with the server's
/// status, never a hang or a transfer into nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_peer_without_the_kv_service_fails_the_connect() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                cancel.clone().cancelled_owned(),
            ),
    );
    let t = GrpcTransport::connect_to(addr, cfg()).await.unwrap();
    let t0 = Instant::now();
    let e = t.connect(handshake(1)).await.err().unwrap();
    assert!(
        matches!(&e, KvTransferError::Grpc(m) if m.contains("not implemented")),
        "{e}"
    );
    assert!(t0.elapsed() < cfg().io_timeout, "failed at once");
    cancel.cancel();
    server.await.unwrap().unwrap();
}

/// A sender with nothing to send yet (its prompt waits in a busy prefill
/// queue) keeps the transfer alive with heartbeats for twice the lease (and
/// many times the receiver's per-read I/O deadline), then completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tcp_sender_keeps_its_transfer_alive_with_heartbeats() {
    let mut rc = receiver_cfg();
    rc.transfer.io_timeout = Duration::from_millis(300);
    let listener = TcpKvListener::bind("127.0.0.1:0".parse().unwrap(), rc)
        .await
        .unwrap();
    let t = TcpTransport::new(listener.local_addr().unwrap(), socket_cfg());
    let (s, r) = tokio::join!(t.connect(handshake(1)), listener.accept());
    idle_then_send(s.unwrap(), r.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_grpc_sender_keeps_its_transfer_alive_with_heartbeats() {
    let cancel = CancellationToken::new();
    let (addr, mut incoming) = grpc_server(&cancel).await;
    let t = GrpcTransport::connect_to(addr, cfg()).await.unwrap();
    let (s, r) = tokio::join!(t.connect(handshake(1)), incoming.recv());
    idle_then_send(s.unwrap(), r.unwrap()).await;
    cancel.cancel();
}

async fn idle_then_send<S: KvSender>(mut s: S, r: KvReceiver) {
    let (src, skv) = source(3);
    let send = async {
        tokio::time::sleep(LEASE * 2).await;
        send_chunks(&mut s, &src, &skv, &CHUNKS).await.unwrap();
        s.finish().await
    };
    let mut sched = decode_side();
    let ((res, kv), sent) = tokio::join!(receive(&mut sched, r), send);
    res.unwrap();
    sent.unwrap();
    assert_same(&src, &skv, sched.pool(), &kv.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_a_transfer_and_frees_its_blocks() {
    let listener = tcp_listener().await;
    let t = TcpTransport::new(listener.local_addr().unwrap(), shm_cfg());
    let (s, r) = tokio::join!(t.connect(handshake(2)), listener.accept());
    let _stalled = s.unwrap();
    let r = r.unwrap();
    let mut sched = decode_side();
    let kv = sched
        .reserve_for_transfer(TOKENS)
        .unwrap()
        .expect("the pool holds the transfer");
    let cancel = CancellationToken::new();
    cancel.cancel();
    let res = r
        .receive_into(&mut PoolSink::new(sched.pool_mut(), &kv), &cancel)
        .await;
    assert!(matches!(res, Err(KvTransferError::Cancelled)));
    sched.release(kv);
    assert_eq!(sched.pool().free_blocks(), sched.pool().n_blocks());
}

/// A receiver that accepts the handshake and then never says anything
/// again (hung, not dead: its socket stays open). The sender's lease runs
/// out and `finish` fails explicitly instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_receiver_expires_the_senders_lease() {
    use prost::Message;
    use tandem_kv_transfer::frame::{FrameHeader, FrameKind, HEADER_LEN};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hung = tokio::spawn(async move {
        let (mut sock, _) = l.accept().await.unwrap();
        let mut h = [0u8; HEADER_LEN];
        sock.read_exact(&mut h).await.unwrap();
        let h = FrameHeader::decode(&h).unwrap();
        let mut hs = vec![0u8; h.byte_len as usize];
        sock.read_exact(&mut hs).await.unwrap();
        let ok = tandem_proto::kv::KvReply {
            kind: Some(tandem_proto::kv::ReplyKind::Accepted(true)),
            shared_memory: false,
        }
        .encode_to_vec();
        let mut reply = FrameHeader::control(FrameKind::Reply, h.request_id, &ok)
            .encode()
            .to_vec();
        reply.extend_from_slice(&ok);
        sock.write_all(&reply).await.unwrap();
        // Hold the socket open, read nothing more, send nothing more.
        tokio::time::sleep(LEASE * 10).await;
        drop(sock);
    });
    let mut s = TcpTransport::new(addr, cfg())
        .connect(handshake(7))
        .await
        .unwrap();
    let (src, skv) = source(1);
    send_chunks(&mut s, &src, &skv, &CHUNKS).await.unwrap();
    let t0 = Instant::now();
    let e = s.finish().await.unwrap_err();
    let took = t0.elapsed();
    assert!(
        matches!(
            e,
            KvTransferError::LeaseExpired {
                peer: "receiver",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.class(), "lease_expired");
    assert!(
        took < LEASE + Duration::from_secs(2),
        "expired after {took:?}"
    );
    hung.abort();
}

// ---- two OS processes ----

/// Starts this test binary as the sending peer.
fn spawn_peer(transport: &str, addr: SocketAddr, mode: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["peer_process", "--exact", "--nocapture", "--test-threads=1"])
        .env("TANDEM_KV_PEER", format!("{transport} {addr} {mode}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the peer process")
}

/// Waits (in a blocking thread) for the peer to print `line`; the thread
/// keeps draining the pipe so the peer never writes into a closed one.
fn wait_for_line(child: &mut Child, line: &'static str) -> std::thread::JoinHandle<bool> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if l.contains(line) {
                let _ = tx.send(());
            }
        }
    });
    std::thread::spawn(move || rx.recv_timeout(Duration::from_secs(60)).is_ok())
}

/// The peer side: sends seed-5 KV (`full`) or half of it then hangs until killed (`half`).
#[test]
fn peer_process() {
    let Ok(spec) = std::env::var("TANDEM_KV_PEER") else {
        return;
    };
    let mut it = spec.split(' ');
    let (transport, addr, mode) = (
        it.next().unwrap(),
        it.next().unwrap().parse().unwrap(),
        it.next().unwrap(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let (pool, kv) = source(5);
        let chunks: &[_] = if mode == "half" {
            &CHUNKS[..1]
        } else {
            &CHUNKS
        };
        async fn go<S: KvSender>(
            mut s: S,
            pool: &KvPool,
            kv: &SeqKv,
            chunks: &[std::ops::Range<usize>],
            half: bool,
        ) {
            send_chunks(&mut s, pool, kv, chunks).await.unwrap();
            if half {
                println!("HALF_SENT");
                tokio::time::sleep(Duration::from_secs(60)).await;
                unreachable!("the parent kills us");
            }
            s.finish().await.unwrap();
            println!("PEER_DONE");
        }
        let half = mode == "half";
        match transport {
            "tcp" | "shm" => {
                let s = TcpTransport::new(addr, sender_cfg(transport))
                    .connect(handshake(42))
                    .await
                    .unwrap();
                let plane = match transport {
                    "shm" => DataPlane::SharedMemory,
                    _ => DataPlane::Socket,
                };
                assert_eq!(s.data_plane(), plane);
                go(s, &pool, &kv, chunks, half).await
            }
            _ => {
                let t = GrpcTransport::connect_to(addr, cfg()).await.unwrap();
                go(
                    t.connect(handshake(42)).await.unwrap(),
                    &pool,
                    &kv,
                    chunks,
                    half,
                )
                .await
            }
        }
    });
}

async fn accept_one(
    transport: &str,
) -> (
    SocketAddr,
    Box<dyn FnOnce() -> tokio::task::JoinHandle<KvReceiver> + Send>,
    CancellationToken,
) {
    let cancel = CancellationToken::new();
    if transport != "grpc" {
        let l = tcp_listener().await;
        let addr = l.local_addr().unwrap();
        (
            addr,
            Box::new(move || tokio::spawn(async move { l.accept().await.unwrap() })),
            cancel,
        )
    } else {
        let (addr, mut rx) = grpc_server(&cancel).await;
        (
            addr,
            Box::new(move || tokio::spawn(async move { rx.recv().await.unwrap() })),
            cancel,
        )
    }
}

async fn cross_process_round_trip(transport: &str) {
    let (addr, accept, cancel) = accept_one(transport).await;
    let accepted = accept();
    let mut child = spawn_peer(transport, addr, "full");
    let done = wait_for_line(&mut child, "PEER_DONE");
    let r = tokio::time::timeout(Duration::from_secs(30), accepted)
        .await
        .unwrap()
        .unwrap();
    let mut sched = decode_side();
    let (res, kv) = receive(&mut sched, r).await;
    res.unwrap();
    assert!(
        tokio::task::spawn_blocking(move || done.join().unwrap())
            .await
            .unwrap(),
        "peer finished"
    );
    assert!(child.wait().unwrap().success());
    let (src, skv) = source(5);
    assert_same(&src, &skv, sched.pool(), &kv.unwrap());
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_process_round_trip_tcp() {
    cross_process_round_trip("tcp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_process_round_trip_shm() {
    cross_process_round_trip("shm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_process_round_trip_grpc() {
    cross_process_round_trip("grpc").await;
}

/// SIGKILL the sender mid-transfer: the receiver fails promptly (well
/// inside its 5 s I/O deadline, since the kernel closes the socket) and
/// the reserved blocks go back to the pool.
async fn killed_sender_frees_reserved_blocks(transport: &str) {
    let (addr, accept, cancel) = accept_one(transport).await;
    let accepted = accept();
    let mut child = spawn_peer(transport, addr, "half");
    let half = wait_for_line(&mut child, "HALF_SENT");
    let r = tokio::time::timeout(Duration::from_secs(30), accepted)
        .await
        .unwrap()
        .unwrap();
    let mut sched = decode_side();
    let receiving = async {
        let (res, _) = receive(&mut sched, r).await;
        (res, Instant::now())
    };
    let killer = async {
        assert!(
            tokio::task::spawn_blocking(move || half.join().unwrap())
                .await
                .unwrap(),
            "peer sent half"
        );
        child.kill().unwrap(); // SIGKILL
        let at = Instant::now();
        let _ = child.wait();
        at
    };
    let ((res, failed_at), killed_at) = tokio::join!(receiving, killer);
    let e = res.unwrap_err();
    assert!(
        matches!(e, KvTransferError::PeerGone(_)),
        "{transport}: {e}"
    );
    let took = failed_at.saturating_duration_since(killed_at);
    assert!(
        took < Duration::from_secs(2),
        "{transport}: noticed after {took:?}"
    );
    assert_eq!(sched.pool().free_blocks(), sched.pool().n_blocks());
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sender_process_frees_reserved_blocks_tcp() {
    killed_sender_frees_reserved_blocks("tcp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sender_process_frees_reserved_blocks_shm() {
    killed_sender_frees_reserved_blocks("shm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sender_process_frees_reserved_blocks_grpc() {
    killed_sender_frees_reserved_blocks("grpc").await;
}

/// SIGSTOP the sender mid-transfer: the process is hung, its socket open,
/// so nothing tells the receiver it is gone but the silence. While it runs
/// (half sent, waiting), its heartbeats keep the transfer alive past the
/// lease; once stopped, the receiver fails with an expired lease within
/// about one lease and frees the reserved blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_sender_process_expires_the_receivers_lease() {
    let (addr, accept, cancel) = accept_one("tcp").await;
    let accepted = accept();
    let mut child = spawn_peer("tcp", addr, "half");
    let half = wait_for_line(&mut child, "HALF_SENT");
    let r = tokio::time::timeout(Duration::from_secs(30), accepted)
        .await
        .unwrap()
        .unwrap();
    let mut sched = decode_side();
    let pid = child.id() as i32;
    let receiving = async {
        let (res, _) = receive(&mut sched, r).await;
        (res, Instant::now())
    };
    let stopper = async {
        assert!(
            tokio::task::spawn_blocking(move || half.join().unwrap())
                .await
                .unwrap(),
            "peer sent half"
        );
        // Alive and idle for two leases: heartbeats must carry it.
        tokio::time::sleep(LEASE * 2).await;
        // SAFETY: plain signal to our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        Instant::now()
    };
    let ((res, failed_at), stopped_at) = tokio::join!(receiving, stopper);
    let _ = child.kill();
    let _ = child.wait();
    let e = res.unwrap_err();
    assert!(
        matches!(e, KvTransferError::LeaseExpired { peer: "sender", .. }),
        "{e}"
    );
    let took = failed_at.saturating_duration_since(stopped_at);
    assert!(
        failed_at > stopped_at && took < LEASE + Duration::from_secs(2),
        "failed {took:?} after the stop (before it: {})",
        failed_at <= stopped_at
    );
    assert_eq!(sched.pool().free_blocks(), sched.pool().n_blocks());
    cancel.cancel();
}
