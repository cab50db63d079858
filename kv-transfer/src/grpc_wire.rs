//! gRPC messages of `tandem.v1.KvTransfer`, written and read by hand on
//! both sides of a transfer, so that a block's payload is copied once on
//! each: from the KV into the bytes handed to HTTP/2, and from HTTP/2's
//! receive buffers into the reserved blocks. Through tonic's codec every
//! message is gathered into a buffer of its own first (and, sending, into a
//! message before that).
//!
//! The bytes are exactly what prost writes, and anything prost writes is
//! read: the service stays plain gRPC for any other client.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;
use tandem_engine::kv::KvLayout;
use tandem_proto::kv as pb;
use tonic::Status;

use crate::error::{KvTransferError, Result};
use crate::frame::{encode_payload_into, frame_seed, payload_len};
use crate::transport::BlockRegion;

/// A gRPC message's prefix: a compression flag (0: none) and the length,
/// big-endian.
pub(crate) const GRPC_PREFIX: usize = 5;

/// `msg` as one framed gRPC message.
pub(crate) fn grpc_message(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(GRPC_PREFIX + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    msg.encode(&mut buf).expect("the buffer has room");
    buf.freeze()
}

/// Field numbers of the messages [`blocks_message`] writes by hand.
const FRAME_BLOCKS: u32 = 2;
const BLOCKS_REQUEST_ID: u32 = 1;
const BLOCKS_BLOCK: u32 = 2;
const BLOCK_LAYER: u32 = 1;
const BLOCK_BLOCK: u32 = 2;
const BLOCK_SLOTS: u32 = 3;
const BLOCK_CRC32C: u32 = 4;
const BLOCK_PAYLOAD: u32 = 5;

/// Bytes of a varint field `tag` holding `v`, left out (as proto3 does)
/// when zero.
fn uint32_len(tag: u32, v: u32) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(u64::from(v))
    }
}

/// Writes a varint field `tag` holding `v`, unless zero.
fn put_uint32(tag: u32, v: u32, buf: &mut BytesMut) {
    if v != 0 {
        prost::encoding::uint32::encode(tag, &v, buf);
    }
}

/// Bytes of a length-delimited field `tag` holding `len` bytes.
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// A `KvFrame` holding `blocks` of `layer` as one framed gRPC message, the
/// same bytes prost would encode (but for a checksum that happens to be 0,
/// which prost leaves out and this writes). Each payload is copied once,
/// from the KV into the message, its checksum computed on the way; the
/// checksum's fixed-width field, before the payload, is filled in after.
/// With `corrupt`, the first payload has a bit flipped after its checksum
/// (a test hook).
pub(crate) fn blocks_message(
    l: &KvLayout,
    request_id: u64,
    layer: u32,
    blocks: &[BlockRegion<'_>],
    corrupt: bool,
) -> Bytes {
    // Each block's length: its varint fields, the checksum (key and four
    // bytes) and the payload.
    let lens: Vec<usize> = blocks
        .iter()
        .map(|b| {
            uint32_len(BLOCK_LAYER, layer)
                + uint32_len(BLOCK_BLOCK, b.block)
                + uint32_len(BLOCK_SLOTS, b.slots)
                + key_len(BLOCK_CRC32C)
                + 4
                + delimited_len(BLOCK_PAYLOAD, payload_len(l, b.slots as usize))
        })
        .collect();
    let id_len = if request_id != 0 {
        key_len(BLOCKS_REQUEST_ID) + encoded_len_varint(request_id)
    } else {
        0
    };
    let blocks_len = id_len
        + lens
            .iter()
            .map(|&len| delimited_len(BLOCKS_BLOCK, len))
            .sum::<usize>();
    let frame_len = delimited_len(FRAME_BLOCKS, blocks_len);
    let mut buf = BytesMut::with_capacity(GRPC_PREFIX + frame_len);
    buf.put_u8(0);
    buf.put_u32(frame_len as u32);
    encode_key(FRAME_BLOCKS, WireType::LengthDelimited, &mut buf);
    encode_varint(blocks_len as u64, &mut buf);
    if request_id != 0 {
        prost::encoding::uint64::encode(BLOCKS_REQUEST_ID, &request_id, &mut buf);
    }
    for (i, (b, &len)) in blocks.iter().zip(&lens).enumerate() {
        encode_key(BLOCKS_BLOCK, WireType::LengthDelimited, &mut buf);
        encode_varint(len as u64, &mut buf);
        put_uint32(BLOCK_LAYER, layer, &mut buf);
        put_uint32(BLOCK_BLOCK, b.block, &mut buf);
        put_uint32(BLOCK_SLOTS, b.slots, &mut buf);
        encode_key(BLOCK_CRC32C, WireType::ThirtyTwoBit, &mut buf);
        let crc_at = buf.len();
        buf.put_u32_le(0);
        let slots = b.slots as usize;
        encode_key(BLOCK_PAYLOAD, WireType::LengthDelimited, &mut buf);
        encode_varint(payload_len(l, slots) as u64, &mut buf);
        let at = buf.len();
        let seed = frame_seed(layer, b.block, b.slots);
        let crc = encode_payload_into(l, b.data, slots, seed, |c| buf.extend_from_slice(c));
        buf[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        if corrupt && i == 0 {
            buf[at] ^= 0x01;
        }
    }
    debug_assert_eq!(buf.len(), GRPC_PREFIX + frame_len);
    buf.freeze()
}

/// The first byte of a `KvFrame` of blocks: the key of its one field.
const BLOCKS_KEY: u8 = ((FRAME_BLOCKS << 3) | WireType::LengthDelimited as u32) as u8;

/// Reads the gRPC messages of a request body in place: a message is a run
/// of the body's own chunks (HTTP/2 DATA frames), a block inside it a slice
/// of one, copied only when it straddles two.
pub(crate) struct BodyReader {
    body: tonic::body::Body,
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    len: usize,
    /// Longest wait for the next chunk: the sender's heartbeats come every
    /// third of it.
    lease: Duration,
    max_message: usize,
}

impl BodyReader {
    pub(crate) fn new(body: tonic::body::Body, lease: Duration, max_message: usize) -> Self {
        Self {
            body,
            chunks: VecDeque::new(),
            len: 0,
            lease,
            max_message,
        }
    }

    /// Buffers at least `n` bytes; false if the body ends first.
    async fn fill(&mut self, n: usize) -> Result<bool> {
        while self.len < n {
            let frame = match tokio::time::timeout(self.lease, self.body.frame()).await {
                Err(_) => {
                    return Err(KvTransferError::LeaseExpired {
                        peer: "sender",
                        after: self.lease,
                    })
                }
                Ok(None) => return Ok(false),
                Ok(Some(f)) => f.map_err(inbound_error)?,
            };
            // Trailers (none are expected of a request) carry nothing to read.
            if let Ok(data) = frame.into_data() {
                if !data.is_empty() {
                    self.len += data.len();
                    self.chunks.push_back(data);
                }
            }
        }
        Ok(true)
    }

    /// Buffers `n` bytes of a message that must hold them.
    async fn need(&mut self, n: usize) -> Result<()> {
        if self.fill(n).await? {
            Ok(())
        } else {
            Err(KvTransferError::PeerGone(
                "the stream ended inside a message".into(),
            ))
        }
    }

    /// The next `n` buffered bytes: a slice of one chunk when they lie in
    /// one, else a copy.
    fn take(&mut self, n: usize) -> Bytes {
        debug_assert!(n <= self.len);
        self.len -= n;
        if let Some(front) = self.chunks.front_mut() {
            if front.len() >= n {
                let out = front.split_to(n);
                if front.is_empty() {
                    self.chunks.pop_front();
                }
                return out;
            }
        }
        let mut out = BytesMut::with_capacity(n);
        while out.len() < n {
            let front = self.chunks.front_mut().expect("n bytes are buffered");
            let k = front.len().min(n - out.len());
            out.extend_from_slice(&front[..k]);
            front.advance(k);
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
        out.freeze()
    }

    /// A varint among the next `limit` bytes (what is left of the message
    /// holding it), and the bytes it took.
    async fn varint(&mut self, limit: usize) -> Result<(u64, usize)> {
        let n = limit.min(10);
        self.need(n).await?;
        let mut peek = [0u8; 10];
        let mut at = 0;
        for c in &self.chunks {
            let k = c.len().min(n - at);
            peek[at..at + k].copy_from_slice(&c[..k]);
            at += k;
            if at == n {
                break;
            }
        }
        let mut rest = &peek[..n];
        let v = prost::encoding::decode_varint(&mut rest).map_err(malformed)?;
        let used = n - rest.len();
        self.take(used);
        Ok((v, used))
    }

    /// The length of the next message, or `None` where the body ends
    /// between messages.
    pub(crate) async fn next_message(&mut self) -> Result<Option<usize>> {
        if !self.fill(1).await? {
            return Ok(None);
        }
        self.need(GRPC_PREFIX).await?;
        let mut prefix = self.take(GRPC_PREFIX);
        if prefix.get_u8() != 0 {
            return Err(KvTransferError::Protocol(
                "a compressed KV message (the transfer sends them uncompressed)".into(),
            ));
        }
        let len = prefix.get_u32() as usize;
        if len > self.max_message {
            return Err(KvTransferError::Protocol(format!(
                "a KV message of {len} bytes (at most {} taken)",
                self.max_message
            )));
        }
        Ok(Some(len))
    }

    /// Reads a `KvFrame` of `len` bytes (after [`Self::next_message`]). A
    /// frame of blocks is read block by block, each handed to `on_block`
    /// once it is in, and `None` returned; any other frame is decoded whole.
    pub(crate) async fn frame(
        &mut self,
        len: usize,
        mut on_block: impl FnMut(pb::KvBlock) -> Result<()>,
    ) -> Result<Option<pb::KvFrame>> {
        if len > 0 {
            self.need(1).await?;
        }
        let starts_with_blocks = len > 0 && self.chunks.front().is_some_and(|c| c[0] == BLOCKS_KEY);
        if !starts_with_blocks {
            self.need(len).await?;
            return pb::KvFrame::decode(self.take(len))
                .map(Some)
                .map_err(malformed);
        }
        self.take(1);
        let (blocks_len, used) = self.varint(len - 1).await?;
        if 1 + used + blocks_len as usize != len {
            // The blocks field and nothing else, as every encoder writes it.
            return Err(KvTransferError::Protocol(
                "a KV frame with fields besides its blocks".into(),
            ));
        }
        let mut left = blocks_len as usize;
        while left > 0 {
            let (key, used) = self.varint(left).await?;
            left -= used;
            let (field, wire) = (key >> 3, key & 7);
            let size = match wire {
                0 => self.varint(left).await?.1,
                1 => 8,
                5 => 4,
                2 => {
                    let (n, used) = self.varint(left).await?;
                    left -= used;
                    let n = usize::try_from(n).unwrap_or(usize::MAX);
                    if n > left {
                        return Err(malformed("a field longer than its message"));
                    }
                    if field == u64::from(BLOCKS_BLOCK) {
                        self.need(n).await?;
                        on_block(pb::KvBlock::decode(self.take(n)).map_err(malformed)?)?;
                        left -= n;
                        continue;
                    }
                    n
                }
                _ => return Err(malformed(format!("wire type {wire}"))),
            };
            // The request id and any field this reader does not know.
            if size > left {
                return Err(malformed("a field longer than its message"));
            }
            if wire != 0 {
                self.need(size).await?;
                self.take(size);
            }
            left -= size;
        }
        Ok(None)
    }
}

fn malformed(e: impl std::fmt::Display) -> KvTransferError {
    KvTransferError::Protocol(format!("malformed KV message: {e}"))
}

/// An error reading the sender's stream: a broken body (the sender died or
/// reset the stream) is the peer gone; a message we cannot decode is theirs.
pub(crate) fn inbound_error(s: Status) -> KvTransferError {
    match s.code() {
        tonic::Code::Unknown
        | tonic::Code::Cancelled
        | tonic::Code::Unavailable
        | tonic::Code::Aborted => {
            KvTransferError::PeerGone(format!("{}: {}", s.code(), s.message()))
        }
        _ => KvTransferError::Protocol(format!("{}: {}", s.code(), s.message())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_payload_vec;
    use tandem_engine::kv::KvDtype;

    /// What prost encodes for the same blocks, framed.
    fn prost_message(
        l: &KvLayout,
        request_id: u64,
        layer: u32,
        blocks: &[BlockRegion<'_>],
    ) -> Bytes {
        let blocks = blocks
            .iter()
            .map(|b| {
                let mut payload = Vec::new();
                let crc32c = encode_payload_vec(
                    l,
                    b.data,
                    b.slots as usize,
                    frame_seed(layer, b.block, b.slots),
                    &mut payload,
                );
                pb::KvBlock {
                    layer,
                    block: b.block,
                    slots: b.slots,
                    crc32c,
                    payload: payload.into(),
                }
            })
            .collect();
        grpc_message(&pb::KvFrame {
            kind: Some(pb::FrameKind::Blocks(pb::KvBlocks { request_id, blocks })),
        })
    }

    #[test]
    fn hand_written_blocks_are_the_bytes_prost_writes() {
        // Lengths, ids and layers of one and of several varint bytes.
        let l = KvLayout {
            dtype: KvDtype::F32,
            n_layers: 3,
            n_kv_heads: 2,
            head_dim: 16,
            block_size: 8,
        };
        let data: Vec<Vec<f32>> = (0..4)
            .map(|b| {
                (0..l.block_floats())
                    .map(|i| (b * 1000 + i) as f32 * 0.37)
                    .collect()
            })
            .collect();
        let regions = |slots: &[u32]| -> Vec<BlockRegion<'_>> {
            slots
                .iter()
                .enumerate()
                .map(|(i, &s)| BlockRegion {
                    block: i as u32 * 300,
                    slots: s,
                    data: &data[i],
                })
                .collect()
        };
        for (request_id, layer, slots) in [
            (0u64, 0u32, vec![8u32]),
            (1, 2, vec![8, 8, 8, 1]),
            (u64::MAX, 1, vec![3]),
            (77, 200, vec![]),
        ] {
            let r = regions(&slots);
            let ours = blocks_message(&l, request_id, layer, &r, false);
            assert_eq!(ours, prost_message(&l, request_id, layer, &r), "{slots:?}");
            // And it decodes to the same blocks.
            let frame = pb::KvFrame::decode(&ours[GRPC_PREFIX..]).unwrap();
            let Some(pb::FrameKind::Blocks(b)) = frame.kind else {
                panic!("not a blocks frame")
            };
            assert_eq!(b.blocks.len(), slots.len());
        }
        // The corruption hook flips one payload bit and nothing else.
        let r = regions(&[8, 8]);
        let good = blocks_message(&l, 5, 1, &r, false);
        let bad = blocks_message(&l, 5, 1, &r, true);
        let differ: Vec<usize> = (0..good.len()).filter(|&i| good[i] != bad[i]).collect();
        assert_eq!(differ.len(), 1);
        assert_eq!(good[differ[0]] ^ bad[differ[0]], 1);
    }

    /// A request body delivering `chunks` as its DATA frames.
    fn body(chunks: Vec<Bytes>) -> tonic::body::Body {
        let frames = tokio_stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, Status>(http_body::Frame::data(c))),
        );
        tonic::body::Body::new(http_body_util::StreamBody::new(frames))
    }

    /// `bytes` cut at pseudo-random points, pieces of 1 to `max` bytes.
    fn chunked(bytes: &[u8], seed: u64, max: usize) -> Vec<Bytes> {
        let mut x = seed | 1;
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = (1 + (x as usize) % max).min(bytes.len() - at);
            out.push(Bytes::copy_from_slice(&bytes[at..at + n]));
            at += n;
        }
        out
    }

    /// What a reader makes of a body: each frame read whole, or the blocks
    /// it handed over one by one.
    #[derive(Debug, PartialEq)]
    enum Read {
        Frame(pb::KvFrame),
        Blocks(Vec<pb::KvBlock>),
    }

    async fn read_all(chunks: Vec<Bytes>) -> Result<Vec<Read>> {
        let mut r = BodyReader::new(body(chunks), Duration::from_secs(5), 1 << 20);
        let mut out = Vec::new();
        while let Some(len) = r.next_message().await? {
            let mut blocks = Vec::new();
            let take = |b| {
                blocks.push(b);
                Ok(())
            };
            match r.frame(len, take).await? {
                Some(f) => out.push(Read::Frame(f)),
                None => out.push(Read::Blocks(blocks)),
            }
        }
        Ok(out)
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8];
        v.extend_from_slice(&(message.len() as u32).to_be_bytes());
        v.extend_from_slice(message);
        v
    }

    #[tokio::test]
    async fn the_reader_takes_every_chunking_of_what_prost_and_others_write() {
        let l = KvLayout {
            dtype: KvDtype::F32,
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 8,
            block_size: 4,
        };
        let data: Vec<Vec<f32>> = (0..3)
            .map(|b| {
                (0..l.block_floats())
                    .map(|i| (b * 100 + i) as f32)
                    .collect()
            })
            .collect();
        let regions: Vec<BlockRegion<'_>> = data
            .iter()
            .enumerate()
            .map(|(i, d)| BlockRegion {
                block: i as u32,
                slots: if i == 2 { 3 } else { 4 },
                data: d,
            })
            .collect();
        let hs = pb::KvFrame {
            kind: Some(pb::FrameKind::Handshake(pb::KvHandshake {
                request_id: 9,
                tokens: 11,
                ..Default::default()
            })),
        };
        let end = pb::KvFrame {
            kind: Some(pb::FrameKind::End(pb::KvEnd {
                request_id: 9,
                frames: 6,
            })),
        };
        let heartbeat = pb::KvFrame {
            kind: Some(pb::FrameKind::Blocks(pb::KvBlocks {
                request_id: 9,
                blocks: vec![],
            })),
        };
        let theirs = prost_message(&l, 0, 1, &regions);
        // Another encoder's blocks: fields this reader does not know, of
        // every wire type, around the blocks.
        let mut inner = Vec::new();
        encode_key(9, WireType::Varint, &mut inner);
        encode_varint(300, &mut inner);
        let Some(pb::FrameKind::Blocks(b)) =
            pb::KvFrame::decode(&theirs[GRPC_PREFIX..]).unwrap().kind
        else {
            unreachable!()
        };
        inner.extend_from_slice(&b.encode_to_vec());
        encode_key(10, WireType::LengthDelimited, &mut inner);
        encode_varint(3, &mut inner);
        inner.extend_from_slice(&[1, 2, 3]);
        encode_key(11, WireType::ThirtyTwoBit, &mut inner);
        inner.extend_from_slice(&[1, 2, 3, 4]);
        encode_key(12, WireType::SixtyFourBit, &mut inner);
        inner.extend_from_slice(&[1; 8]);
        let mut odd = Vec::new();
        encode_key(FRAME_BLOCKS, WireType::LengthDelimited, &mut odd);
        encode_varint(inner.len() as u64, &mut odd);
        odd.extend_from_slice(&inner);

        let ours = blocks_message(&l, 9, 0, &regions, false);
        let mut stream = Vec::new();
        for m in [
            grpc_message(&hs),
            ours.clone(),
            grpc_message(&heartbeat),
            theirs.clone(),
            Bytes::from(framed(&odd)),
            grpc_message(&pb::KvFrame::default()),
            grpc_message(&end),
        ] {
            stream.extend_from_slice(&m);
        }
        let blocks_of = |m: &Bytes| match pb::KvFrame::decode(&m[GRPC_PREFIX..]).unwrap().kind {
            Some(pb::FrameKind::Blocks(b)) => b.blocks,
            _ => unreachable!(),
        };
        let want = vec![
            Read::Frame(hs.clone()),
            Read::Blocks(blocks_of(&ours)),
            Read::Blocks(vec![]),
            Read::Blocks(blocks_of(&theirs)),
            Read::Blocks(blocks_of(&theirs)),
            Read::Frame(pb::KvFrame::default()),
            Read::Frame(end.clone()),
        ];
        for max in [1, 2, 5, 13, 100, 700, 4096, 1 << 20] {
            for seed in 1..6 {
                let got = read_all(chunked(&stream, seed, max)).await.unwrap();
                assert_eq!(got, want, "chunks of at most {max}, seed {seed}");
            }
        }
    }

    #[tokio::test]
    async fn the_reader_refuses_what_it_cannot_read() {
        let end = grpc_message(&pb::KvFrame {
            kind: Some(pb::FrameKind::End(pb::KvEnd::default())),
        });
        // The body ends inside a message: the sender is gone.
        let cut = end.slice(..end.len() - 1);
        assert!(matches!(
            read_all(vec![cut]).await,
            Err(KvTransferError::PeerGone(_))
        ));
        // Compressed, or longer than allowed.
        let mut compressed = end.to_vec();
        compressed[0] = 1;
        assert!(matches!(
            read_all(vec![compressed.into()]).await,
            Err(KvTransferError::Protocol(_))
        ));
        let huge = Bytes::from(framed(&vec![0u8; (1 << 20) + 1]));
        assert!(matches!(
            read_all(vec![huge]).await,
            Err(KvTransferError::Protocol(m)) if m.contains("bytes")
        ));
        // A block that claims more than its message holds.
        let mut lying = Vec::new();
        encode_key(FRAME_BLOCKS, WireType::LengthDelimited, &mut lying);
        encode_varint(3, &mut lying);
        encode_key(BLOCKS_BLOCK, WireType::LengthDelimited, &mut lying);
        encode_varint(100, &mut lying);
        lying.push(0);
        let mut stream = framed(&lying);
        stream.extend_from_slice(&[0u8; 200]);
        assert!(matches!(
            read_all(vec![stream.into()]).await,
            Err(KvTransferError::Protocol(m)) if m.contains("longer")
        ));
    }
}
