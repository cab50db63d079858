//! The NCCL KV transport on a real GPU. Run explicitly on a GPU machine:
//! `cargo test --release -p tandem-kv-transfer --features cuda --test nccl`
//! (or `bench/gpu_kv_check.sh` from a prebuilt binary). Without a loadable
//! CUDA driver and NCCL every test here fails, saying so: none passes
//! without having moved bytes through a GPU.
//!
//! With two or more GPUs the sender (device 0, a separate OS process) and
//! the receiver (device 1) run the whole transport. With one GPU, NCCL
//! cannot put both ranks on it: the tests then check that such a pair is
//! refused on both sides with a typed `cuda` error before NCCL is involved,
//! and that a one-rank communicator moves KV bytes exactly; they print
//! which case ran.
#![cfg(feature = "cuda")]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use tandem_kv_transfer::nccl::{self, NcclConfig, NcclKvListener, NcclTransport};
use tandem_kv_transfer::{
    KvReceiver, KvSender, KvTransferError, KvTransport, ReceiverConfig, TransferConfig,
};

mod common;
use common::*;

fn cfg() -> TransferConfig {
    TransferConfig {
        io_timeout: Duration::from_secs(30),
        transfer_timeout: Duration::from_secs(60),
        lease: Duration::from_secs(10),
        ..Default::default()
    }
}

fn receiver_cfg() -> ReceiverConfig {
    ReceiverConfig {
        expected: desc(),
        secret: secret(),
        transfer: cfg(),
    }
}

/// GPUs visible here; fails the test, saying why, when there is no usable
/// CUDA driver or NCCL.
fn gpus() -> usize {
    match nccl::device_count() {
        Ok(0) => panic!("this test needs an NVIDIA GPU: the CUDA driver loaded but sees no device"),
        Ok(n) => n,
        Err(e) => panic!(
            "this test needs an NVIDIA GPU with its driver and NCCL (run it on a GPU machine): {e}"
        ),
    }
}

/// Receiver device: a second GPU when there is one, else the only one.
fn receiver_device(n: usize) -> usize {
    if n >= 2 {
        1
    } else {
        0
    }
}

/// The one-GPU outcome of a pair: both sides refused with a `cuda` error.
fn assert_same_gpu_refusal(receiver: &tandem_kv_transfer::Result<KvReceiver>, sender_error: &str) {
    match receiver {
        Err(e @ KvTransferError::Cuda(m)) => {
            assert!(m.contains("one device"), "{e}");
            assert_eq!(e.class(), "cuda");
        }
        Err(e) => panic!("receiver: expected the same-GPU refusal, got {e}"),
        Ok(_) => panic!("receiver: accepted a sender on its own GPU"),
    }
    assert!(
        sender_error.contains("cuda") && sender_error.contains("one device"),
        "sender: expected the receiver's same-GPU refusal, got {sender_error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_rank_communicator_moves_kv_bytes() {
    let n = gpus();
    let version = nccl::nccl_version().unwrap();
    let (pool, kv) = source(3);
    let mut payload = Vec::new();
    for layer in 0..layout().n_layers {
        for &b in &kv.blocks {
            payload.extend_from_slice(bytemuck_bytes(pool.region(layer, b)));
        }
    }
    let back = nccl::single_rank_round_trip(0, &payload, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        back == payload,
        "single-rank NCCL round trip changed the bytes"
    );
    println!(
        "NCCL {version}: one-rank communicator on device 0 moved {} bytes exactly ({n} GPU(s) visible)",
        payload.len()
    );
}

fn bytemuck_bytes(f: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(f.as_ptr().cast(), std::mem::size_of_val(f)) }
}

// ---- two OS processes ----

/// The sending peer: this binary re-run with `TANDEM_NCCL_PEER="addr device"`.
/// Prints `PEER_DONE` after a confirmed transfer, or `PEER_ERROR <class>
/// <message>` when the transport fails.
#[test]
fn peer_process() {
    let Ok(spec) = std::env::var("TANDEM_NCCL_PEER") else {
        return;
    };
    let mut it = spec.split(' ');
    let addr: SocketAddr = it.next().unwrap().parse().unwrap();
    let device: usize = it.next().unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let (pool, kv) = source(5);
        let r = async {
            let t = NcclTransport::new(addr, NcclConfig::new(device, cfg()))?;
            let mut s = t.connect(handshake(42)).await?;
            send_chunks(&mut s, &pool, &kv, &CHUNKS).await?;
            s.finish().await
        }
        .await;
        match r {
            Ok(_) => println!("PEER_DONE"),
            Err(e) => println!("PEER_ERROR {} {e}", e.class()),
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_process_transfer_is_bit_exact_or_refused_on_one_gpu() {
    let n = gpus();
    let listener = NcclKvListener::bind(
        "127.0.0.1:0".parse().unwrap(),
        receiver_cfg(),
        receiver_device(n),
    )
    .await
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["peer_process", "--exact", "--nocapture", "--test-threads=1"])
        .env("TANDEM_NCCL_PEER", format!("{addr} 0"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the peer process");
    let out = child.stdout.take().unwrap();
    // Reads to the end, so the peer never writes into a closed pipe.
    let peer = std::thread::spawn(move || {
        let lines: Vec<String> = BufReader::new(out).lines().map_while(|l| l.ok()).collect();
        // libtest prints `test peer_process ... ` before the test's own
        // output, on the same line.
        lines
            .into_iter()
            .find_map(|l| l.find("PEER_").map(|i| l[i..].to_string()))
            .unwrap_or_else(|| "PEER_SILENT".into())
    });
    let accepted = tokio::time::timeout(Duration::from_secs(60), listener.accept())
        .await
        .expect("the peer connected");
    if n < 2 {
        let said = tokio::task::spawn_blocking(move || peer.join().unwrap())
            .await
            .unwrap();
        assert!(child.wait().unwrap().success());
        assert_same_gpu_refusal(&accepted, &said);
        println!(
            "one GPU: the two-process pair was refused on both sides as expected; \
             NCCL peer-to-peer between processes needs a machine with two GPUs"
        );
        return;
    }
    let mut sched = decode_side();
    let (res, kv) = receive(&mut sched, accepted.unwrap()).await;
    let summary = res.unwrap();
    let said = tokio::task::spawn_blocking(move || peer.join().unwrap())
        .await
        .unwrap();
    assert_eq!(said, "PEER_DONE");
    assert!(child.wait().unwrap().success());
    let (src, skv) = source(5);
    assert_same(&src, &skv, sched.pool(), &kv.unwrap());
    println!(
        "{n} GPUs: NCCL moved {} frames / {} bytes between two processes, bit-exact",
        summary.frames, summary.bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_block_fails_its_checksum_or_one_gpu_pair_is_refused() {
    let n = gpus();
    let listener = NcclKvListener::bind(
        "127.0.0.1:0".parse().unwrap(),
        receiver_cfg(),
        receiver_device(n),
    )
    .await
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let sender = tokio::spawn(async move {
        let (pool, kv) = source(1);
        let t = NcclTransport::new(addr, NcclConfig::new(0, cfg()))?;
        let mut s = t.connect(handshake(7)).await?;
        s.corrupt_next_frame();
        send_chunks(&mut s, &pool, &kv, &CHUNKS).await?;
        s.finish().await
    });
    let accepted = listener.accept().await;
    if n < 2 {
        let e = sender.await.unwrap().unwrap_err();
        assert_same_gpu_refusal(&accepted, &format!("{} {e}", e.class()));
        println!("one GPU: the in-process pair was refused on both sides as expected");
        return;
    }
    let mut sched = decode_side();
    let (res, _) = receive(&mut sched, accepted.unwrap()).await;
    let e = res.unwrap_err();
    assert!(
        matches!(
            e,
            KvTransferError::Checksum {
                layer: 0,
                block: 0,
                ..
            }
        ),
        "{e}"
    );
    let se = sender.await.unwrap().unwrap_err();
    assert!(
        matches!(&se, KvTransferError::Remote { class, .. } if class == "checksum"),
        "sender: {se}"
    );
    println!("{n} GPUs: a corrupted block over NCCL failed its checksum on both sides");
}
