//! What the transport tests share: a small layout, seeded source KV, a
//! sender that sends like a chunked prefill, a decode side that reserves,
//! receives and releases, and the bit-for-bit comparison.
#![allow(dead_code)] // each test binary uses its own part

use tandem_engine::kv::{KvDtype, KvLayout, KvPool, SeqKv};
use tandem_engine::scheduler::{Scheduler, SchedulerConfig};
use tandem_kv_transfer::{
    BlockRegion, CancellationToken, ClusterSecret, Handshake, KvReceiver, KvSender,
    LayoutDescriptor, PoolSink, TransferSummary,
};

/// Not a multiple of the block size: the last block is partial.
pub const TOKENS: usize = 100;
/// Prefill chunk edges: the block holding token 37 is sent twice.
pub const CHUNKS: [std::ops::Range<usize>; 2] = [0..37, 37..TOKENS];

pub fn layout() -> KvLayout {
    KvLayout {
        dtype: KvDtype::F32,
        n_layers: 4,
        n_kv_heads: 2,
        head_dim: 8,
        block_size: 16,
    }
}

pub fn desc() -> LayoutDescriptor {
    LayoutDescriptor::new("fingerprint-of-the-test-model", layout())
}

pub fn secret() -> ClusterSecret {
    ClusterSecret::new("test-cluster-secret")
}

pub fn handshake(request_id: u64) -> Handshake {
    Handshake {
        layout: desc(),
        secret: secret(),
        request_id,
        tokens: TOKENS as u64,
    }
}

/// A prefill worker's pool after the prompt: every float distinct and
/// seeded, including bit patterns a lossy path would change (NaN payloads,
/// negative zero, subnormals).
pub fn source(seed: u64) -> (KvPool, SeqKv) {
    let l = layout();
    let mut pool = KvPool::new(l, l.blocks_for(TOKENS) + 3);
    let mut kv = SeqKv::default();
    pool.reserve(&mut kv, TOKENS).unwrap();
    let mut z = seed;
    for layer in 0..l.n_layers {
        for &b in &kv.blocks {
            for x in pool.region_mut(layer, b) {
                z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut v = z;
                v = (v ^ (v >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                v = (v ^ (v >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                *x = f32::from_bits((v ^ (v >> 31)) as u32);
            }
        }
    }
    kv.len = TOKENS;
    (pool, kv)
}

/// Sends like a chunked prefill does: per chunk, each layer's blocks as the
/// layer finishes (the partial block at a chunk edge is sent again, whole).
pub async fn send_chunks<S: KvSender>(
    s: &mut S,
    pool: &KvPool,
    kv: &SeqKv,
    chunks: &[std::ops::Range<usize>],
) -> tandem_kv_transfer::Result<()> {
    let bs = layout().block_size;
    for c in chunks {
        for layer in 0..layout().n_layers {
            let regions: Vec<BlockRegion<'_>> = (c.start / bs..=(c.end - 1) / bs)
                .map(|bi| BlockRegion {
                    block: bi as u32,
                    slots: (c.end - bi * bs).min(bs) as u32,
                    data: pool.region(layer, kv.blocks[bi]),
                })
                .collect();
            s.send_layer_blocks(layer as u32, &regions).await?;
        }
    }
    Ok(())
}

/// Every written slot of every (layer, block) equal, bit for bit.
pub fn assert_same(src: &KvPool, skv: &SeqKv, dst: &KvPool, dkv: &SeqKv) {
    let l = layout();
    let bs = l.block_size;
    for layer in 0..l.n_layers {
        for bi in 0..l.blocks_for(TOKENS) {
            let (a, b) = (
                src.region(layer, skv.blocks[bi]),
                dst.region(layer, dkv.blocks[bi]),
            );
            let valid = (TOKENS - bi * bs).min(bs);
            for h in 0..l.n_kv_heads {
                for d in 0..l.head_dim {
                    for s in 0..valid {
                        let k = l.k_offset(h) + d * bs + s;
                        let v = l.v_offset(h) + s * l.head_dim + d;
                        assert_eq!(
                            a[k].to_bits(),
                            b[k].to_bits(),
                            "K layer {layer} block {bi} head {h} dim {d} slot {s}"
                        );
                        assert_eq!(
                            a[v].to_bits(),
                            b[v].to_bits(),
                            "V layer {layer} block {bi} head {h} dim {d} slot {s}"
                        );
                    }
                }
            }
        }
    }
}

/// A decode worker's scheduler with room for a few prompts.
pub fn decode_side() -> Scheduler {
    let l = layout();
    Scheduler::new(
        SchedulerConfig::default(),
        KvPool::new(l, 4 * l.blocks_for(TOKENS)),
        4096,
    )
}

/// What a decode worker does with an accepted transfer: reserve, receive
/// into the reserved blocks, and release them if the transfer fails.
pub async fn receive(
    sched: &mut Scheduler,
    r: KvReceiver,
) -> (tandem_kv_transfer::Result<TransferSummary>, Option<SeqKv>) {
    let tokens = r.handshake().tokens as usize;
    let kv = sched
        .reserve_for_transfer(tokens)
        .unwrap()
        .expect("the pool holds the transfer");
    let res = {
        let mut sink = PoolSink::new(sched.pool_mut(), &kv);
        r.receive_into(&mut sink, &CancellationToken::new()).await
    };
    match res {
        Ok(s) => {
            let mut kv = kv;
            kv.len = tokens;
            (Ok(s), Some(kv))
        }
        Err(e) => {
            sched.release(kv);
            assert_eq!(
                sched.pool().free_blocks(),
                sched.pool().n_blocks(),
                "reserved blocks released"
            );
            (Err(e), None)
        }
    }
}
