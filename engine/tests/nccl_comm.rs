//! The NCCL communicator on a real GPU. Run explicitly on a GPU machine:
//! `cargo test --release -p tandem-engine --features cuda --test nccl_comm`.
//! Without a loadable CUDA driver and NCCL the test fails, saying so.
//! NCCL puts one rank per GPU, so a one-GPU machine checks a group of one
//! (the bootstrap over TCP, the id hand-over, device staging, all-gather
//! and the rank-order sum on top of it); more GPUs check two ranks.
#![cfg(feature = "cuda")]

use std::net::TcpListener;
use std::time::Duration;

use tandem_engine::comm::{CommConfig, Communicator};
use tandem_engine::comm_nccl::{available, NcclCommunicator};

#[test]
fn nccl_group_gathers_and_reduces_exactly() {
    assert!(
        available(),
        "no CUDA driver or NCCL library on this machine"
    );
    let gpus = cudarc::driver::CudaContext::device_count().expect("counting GPUs") as usize;
    let world = gpus.clamp(1, 2);
    let rendezvous = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let ranks: Vec<_> = (0..world)
        .map(|rank| {
            std::thread::spawn(move || {
                let mut c = NcclCommunicator::connect(
                    &CommConfig {
                        rank,
                        world_size: world,
                        rendezvous,
                        session: 5,
                        timeout: Duration::from_secs(60),
                    },
                    rank,
                )
                .expect("joining the NCCL group");
                let local: Vec<f32> = (0..1000).map(|i| (i * (rank + 1)) as f32 * 0.25).collect();
                let mut all = vec![0f32; 1000 * world];
                c.all_gather(&local, &mut all).unwrap();
                let mut sum = local.clone();
                c.all_reduce_sum(&mut sum).unwrap();
                (all, sum)
            })
        })
        .collect();
    let mut want_all = Vec::new();
    for r in 0..world {
        want_all.extend((0..1000).map(|i| (i * (r + 1)) as f32 * 0.25));
    }
    for h in ranks {
        let (all, sum) = h.join().unwrap();
        assert_eq!(all, want_all, "all-gather concatenates in rank order");
        for (i, s) in sum.iter().enumerate() {
            let want: f32 = (0..world).map(|r| (i * (r + 1)) as f32 * 0.25).sum();
            assert_eq!(*s, want);
        }
    }
    println!("NCCL group of {world} rank(s) on {gpus} GPU(s): ok");
}
