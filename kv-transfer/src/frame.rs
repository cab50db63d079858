//! The wire format of one (layer, block) region, and the TCP frame header.
//!
//! A region holding `slots` tokens travels packed: K `[kv_head][dim][slot <
//! slots]` then V `[kv_head][slot < slots][dim]`, f32 little-endian. A full
//! block is the pool's region byte for byte, so it is one contiguous copy; a
//! partial block (the end of a prefill chunk) sends only its written slots,
//! and the receiver writes only those, leaving the rest of the block alone.
//!
//! Every payload carries a CRC-32C computed chunk by chunk *while* copying
//! (the chunk is still in L1), not in a separate pass over the data.

use std::ops::Range;

use tandem_engine::kv::KvLayout;

use crate::error::{KvTransferError, Result};

#[cfg(not(target_endian = "little"))]
compile_error!("the KV wire format is little-endian f32 and is copied without byte swaps");

/// Bytes checksummed per step while copying: small enough to stay in L1.
const CRC_CHUNK: usize = 16 * 1024;

/// Calls `f` with each contiguous run (in floats) of a region holding
/// `slots` tokens, in wire order.
pub(crate) fn for_each_run(
    l: &KvLayout,
    slots: usize,
    mut f: impl FnMut(Range<usize>) -> Result<()>,
) -> Result<()> {
    let (bs, hd) = (l.block_size, l.head_dim);
    if slots == bs {
        return f(0..l.block_floats());
    }
    for h in 0..l.n_kv_heads {
        for d in 0..hd {
            let s = l.k_offset(h) + d * bs;
            f(s..s + slots)?;
        }
    }
    for h in 0..l.n_kv_heads {
        let s = l.v_offset(h);
        f(s..s + slots * hd)?;
    }
    Ok(())
}

/// CRC-32C (Castagnoli) of `data`, continuing from `crc`, the CRC of what
/// came before (0 to start): `crc32c(a ++ b) == crc32c_append(crc32c(a), b)`.
///
/// Computed by folding with carry-less multiplies (`crc-fast`; VPCLMULQDQ
/// on AVX-512 machines), several times the speed of the one-word-at-a-time
/// CRC32 instruction. It matters: each side checksums every byte it moves,
/// and the checksum is most of what a transfer costs beyond the copy.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    let mut d =
        crc_fast::Digest::new_with_init_state(crc_fast::CrcAlgorithm::Crc32Iscsi, u64::from(!crc));
    d.update(data);
    d.finalize() as u32
}

/// CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

/// The CRC seed of a block frame: its identity, so a payload delivered
/// under a corrupted header (another layer or block) fails the check too.
pub fn frame_seed(layer: u32, block: u32, slots: u32) -> u32 {
    let mut id = [0u8; 12];
    id[0..4].copy_from_slice(&layer.to_le_bytes());
    id[4..8].copy_from_slice(&block.to_le_bytes());
    id[8..12].copy_from_slice(&slots.to_le_bytes());
    crc32c(&id)
}

/// Payload bytes of a region holding `slots` tokens.
pub fn payload_len(l: &KvLayout, slots: usize) -> usize {
    2 * l.n_kv_heads * l.head_dim * slots * 4
}

/// Appends the packed payload of `region` (`slots` tokens) to `out` and
/// returns its CRC-32C.
pub fn encode_payload_vec(
    l: &KvLayout,
    region: &[f32],
    slots: usize,
    seed: u32,
    out: &mut Vec<u8>,
) -> u32 {
    out.reserve(payload_len(l, slots));
    encode_payload_into(l, region, slots, seed, |c| out.extend_from_slice(c))
}

/// Hands the payload to `push` in pieces, computing the checksum over each
/// piece as it goes (one pass over the data).
pub(crate) fn encode_payload_into(
    l: &KvLayout,
    region: &[f32],
    slots: usize,
    seed: u32,
    mut push: impl FnMut(&[u8]),
) -> u32 {
    let mut crc = seed;
    for_each_run(l, slots, |r| {
        for c in bytemuck::cast_slice::<f32, u8>(&region[r]).chunks(CRC_CHUNK) {
            push(c);
            crc = crc32c_append(crc, c);
        }
        Ok(())
    })
    .expect("encoding cannot fail");
    crc
}

/// Unpacks `payload` (`slots` tokens) into the destination region, checking
/// the CRC while copying. On a mismatch the region may hold part of the bad
/// payload: the transfer fails and the caller releases the blocks.
pub fn decode_payload(
    l: &KvLayout,
    layer: u32,
    block: u32,
    slots: usize,
    crc: u32,
    payload: &[u8],
    dest: &mut [f32],
) -> Result<()> {
    if payload.len() != payload_len(l, slots) {
        return Err(KvTransferError::Protocol(format!(
            "layer {layer} block {block}: payload of {} bytes for {slots} slots (want {})",
            payload.len(),
            payload_len(l, slots)
        )));
    }
    if dest.len() != l.block_floats() {
        return Err(KvTransferError::Protocol(format!(
            "destination region of {} floats",
            dest.len()
        )));
    }
    let mut actual = frame_seed(layer, block, slots as u32);
    let mut at = 0usize;
    for_each_run(l, slots, |r| {
        let d: &mut [u8] = bytemuck::cast_slice_mut(&mut dest[r]);
        let src = &payload[at..at + d.len()];
        at += d.len();
        for (dc, sc) in d.chunks_mut(CRC_CHUNK).zip(src.chunks(CRC_CHUNK)) {
            actual = crc32c_append(actual, sc);
            dc.copy_from_slice(sc);
        }
        Ok(())
    })?;
    if actual != crc {
        return Err(KvTransferError::Checksum {
            layer,
            block,
            expected: crc,
            actual,
        });
    }
    Ok(())
}

/// Checks a full region that was read straight into the destination (no
/// intermediate buffer: the socket read is the copy).
pub fn verify_in_place(
    l: &KvLayout,
    layer: u32,
    block: u32,
    crc: u32,
    region: &[f32],
) -> Result<()> {
    debug_assert_eq!(region.len(), l.block_floats());
    let actual = crc32c_append(
        frame_seed(layer, block, l.block_size as u32),
        bytemuck::cast_slice(region),
    );
    if actual != crc {
        return Err(KvTransferError::Checksum {
            layer,
            block,
            expected: crc,
            actual,
        });
    }
    Ok(())
}

/// Kinds of TCP frames. All share one 32-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Payload: protobuf `KvHandshake` (sender → receiver, first).
    Handshake = 1,
    /// Payload: one packed region (sender → receiver).
    Block = 2,
    /// Payload: u64 LE count of block frames sent (sender → receiver, last).
    End = 3,
    /// Payload: protobuf `KvReply` (receiver → sender).
    Reply = 4,
    /// Empty (either way): "still here", renewing the transfer's lease while
    /// the other side has nothing else to say (a prefill waiting in its
    /// queue, a receiver waiting for layers).
    Heartbeat = 5,
    /// Payload: data-plane negotiation of a transport whose KV bypasses the
    /// socket (NCCL, feature `cuda`): the sender's device identity, then the
    /// receiver's communicator id. Versioned by its own first byte, so the
    /// socket protocol's version does not change with it.
    DataPlane = 6,
    /// Empty (receiver → sender), on a transfer whose payload moves through
    /// a shared-memory ring ([`crate::shm`]): the receiver freed another
    /// quarter of the ring, so a sender waiting for room can go on.
    Credit = 7,
}

/// Marks every header, so a desynchronised stream fails loudly.
const MAGIC: u16 = 0x4B54; // "TK"
pub const HEADER_LEN: usize = 32;

/// The fixed header before every TCP frame (little-endian):
/// `magic u16 | version u8 | kind u8 | layer u32 | block u32 | slots u32 |
/// request_id u64 | byte_len u32 | crc32c u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub layer: u32,
    /// Block index within the sequence.
    pub block: u32,
    pub slots: u32,
    pub request_id: u64,
    pub byte_len: u32,
    pub crc: u32,
}

impl FrameHeader {
    /// The header of a block frame: `byte_len` payload bytes holding
    /// `slots` tokens of (`layer`, `block`), with their CRC-32C.
    pub fn block(
        layer: u32,
        block: u32,
        slots: u32,
        request_id: u64,
        byte_len: u32,
        crc: u32,
    ) -> Self {
        Self {
            kind: FrameKind::Block,
            layer,
            block,
            slots,
            request_id,
            byte_len,
            crc,
        }
    }

    pub fn control(kind: FrameKind, request_id: u64, payload: &[u8]) -> Self {
        Self {
            kind,
            layer: 0,
            block: 0,
            slots: 0,
            request_id,
            byte_len: payload.len() as u32,
            crc: crc32c(payload),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[2] = crate::layout::PROTOCOL_VERSION as u8;
        b[3] = self.kind as u8;
        b[4..8].copy_from_slice(&self.layer.to_le_bytes());
        b[8..12].copy_from_slice(&self.block.to_le_bytes());
        b[12..16].copy_from_slice(&self.slots.to_le_bytes());
        b[16..24].copy_from_slice(&self.request_id.to_le_bytes());
        b[24..28].copy_from_slice(&self.byte_len.to_le_bytes());
        b[28..32].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        if u16::from_le_bytes([b[0], b[1]]) != MAGIC {
            return Err(KvTransferError::Protocol(
                "bad frame magic (not a tandem KV stream, or desynchronised)".into(),
            ));
        }
        if b[2] as u32 != crate::layout::PROTOCOL_VERSION {
            return Err(KvTransferError::Mismatch {
                field: "protocol_version",
                local: crate::layout::PROTOCOL_VERSION.to_string(),
                remote: b[2].to_string(),
            });
        }
        let kind = match b[3] {
            1 => FrameKind::Handshake,
            2 => FrameKind::Block,
            3 => FrameKind::End,
            4 => FrameKind::Reply,
            5 => FrameKind::Heartbeat,
            6 => FrameKind::DataPlane,
            7 => FrameKind::Credit,
            k => return Err(KvTransferError::Protocol(format!("unknown frame kind {k}"))),
        };
        Ok(Self {
            kind,
            layer: u32_at(4),
            block: u32_at(8),
            slots: u32_at(12),
            request_id: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            byte_len: u32_at(24),
            crc: u32_at(28),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_engine::kv::KvDtype;

    fn layout() -> KvLayout {
        KvLayout {
            dtype: KvDtype::F32,
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 4,
            block_size: 4,
        }
    }

    #[test]
    fn partial_region_writes_only_its_slots() {
        let l = layout();
        let src: Vec<f32> = (0..l.block_floats()).map(|i| i as f32).collect();
        for slots in 1..=l.block_size {
            let mut buf = Vec::new();
            let crc = encode_payload_vec(&l, &src, slots, frame_seed(0, 0, slots as u32), &mut buf);
            assert_eq!(buf.len(), payload_len(&l, slots));
            let mut dst = vec![-1f32; l.block_floats()];
            decode_payload(&l, 0, 0, slots, crc, &buf, &mut dst).unwrap();
            for h in 0..l.n_kv_heads {
                for d in 0..l.head_dim {
                    for s in 0..l.block_size {
                        let k = l.k_offset(h) + d * l.block_size + s;
                        let v = l.v_offset(h) + s * l.head_dim + d;
                        let want = |i: usize| if s < slots { src[i] } else { -1.0 };
                        assert_eq!(dst[k], want(k));
                        assert_eq!(dst[v], want(v));
                    }
                }
            }
        }
    }

    #[test]
    fn flipped_bit_fails_the_checksum() {
        let l = layout();
        let src: Vec<f32> = (0..l.block_floats()).map(|i| i as f32 * 0.5).collect();
        let mut buf = Vec::new();
        let crc = encode_payload_vec(&l, &src, 4, frame_seed(1, 2, 4), &mut buf);
        let mut dst = vec![0f32; l.block_floats()];
        decode_payload(&l, 1, 2, 4, crc, &buf, &mut dst).unwrap();
        assert!(verify_in_place(&l, 1, 2, crc, &dst).is_ok());
        assert!(
            decode_payload(&l, 1, 3, 4, crc, &buf, &mut dst).is_err(),
            "same payload, other block"
        );
        buf[37] ^= 0x10;
        let e = decode_payload(&l, 1, 2, 4, crc, &buf, &mut dst).unwrap_err();
        assert!(
            matches!(
                e,
                KvTransferError::Checksum {
                    layer: 1,
                    block: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.class(), "checksum");
    }

    #[test]
    fn crc_is_crc32c() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        let data: Vec<u8> = (0..100_000u32)
            .map(|i| (i * 2_654_435_761) as u8 ^ (i >> 7) as u8)
            .collect();
        for (seed, cut) in [
            (0u32, 0usize),
            (7, 1),
            (0xdead_beef, 4095),
            (1, 65_537),
            (u32::MAX, 99_999),
        ] {
            let whole = crc32c_append(seed, &data);
            assert_eq!(
                whole,
                ::crc32c::crc32c_append(seed, &data),
                "seed {seed:#x}"
            );
            let (a, b) = data.split_at(cut);
            assert_eq!(
                crc32c_append(crc32c_append(seed, a), b),
                whole,
                "split at {cut}"
            );
        }
    }

    #[test]
    #[ignore = "a speed check: cargo test --release -p tandem-kv-transfer --lib crc_speed -- --ignored --nocapture"]
    fn crc_speed() {
        let buf = vec![1u8; 16 * 1024];
        let n = 40_000;
        for (name, f) in [
            ("crc-fast", crc32c_append as fn(u32, &[u8]) -> u32),
            ("crc32c", ::crc32c::crc32c_append),
        ] {
            let t = std::time::Instant::now();
            let mut c = 0;
            for _ in 0..n {
                c = f(c, std::hint::black_box(&buf));
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "{name}: {:.1} GB/s ({c:#x})",
                (n * buf.len()) as f64 / s / 1e9
            );
        }
    }

    #[test]
    fn header_round_trips() {
        let h = FrameHeader {
            kind: FrameKind::Block,
            layer: 3,
            block: 9,
            slots: 16,
            request_id: 1 << 40,
            byte_len: 1234,
            crc: 0xdead_beef,
        };
        assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] = 0;
        assert!(FrameHeader::decode(&bad).is_err());
    }
}
