//! Collectives between the ranks of one sharded worker (tensor and pipeline
//! parallelism): all-reduce, all-gather, point-to-point send/recv, barrier.
//!
//! Exactness is part of the contract. [`Communicator::all_reduce_sum`]
//! gathers every rank's partial sums and adds them in rank order,
//! `((p0 + p1) + p2) + …`, on every rank: all ranks hold the same bits, and
//! a single process that adds the same partials in the same order gets them
//! too. That is what lets a tensor-parallel worker give bit-identical logits
//! to the single-process engine (the split follows the engine's fixed
//! reduction chunks). Ring or tree reductions would be faster for many
//! ranks but add in an order that depends on the world size.
//!
//! [`TcpCommunicator`] connects processes on one or more hosts with one TCP
//! connection per pair of ranks. It blocks in the kernel while it waits (no
//! spinning: ranks may share two cores), every wait has a deadline, and a
//! rank that dies closes its sockets, so its peers fail at once with
//! [`CommError::PeerGone`] instead of hanging. The NCCL implementation,
//! `comm_nccl::NcclCommunicator`, is behind the `cuda` feature.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Why a collective failed. Any failure leaves the group unusable: the
/// worker is taken down as a whole.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("rank {peer} is gone: {detail}")]
    PeerGone { peer: usize, detail: String },
    #[error("rank {peer} did not answer within {after:?}")]
    Timeout { peer: usize, after: Duration },
    #[error("setting up the group: {0}")]
    Setup(String),
    #[error("protocol error with rank {peer}: {detail}")]
    Protocol { peer: usize, detail: String },
    #[error("bad call: {0}")]
    Usage(String),
}

pub type Result<T, E = CommError> = std::result::Result<T, E>;

/// Collective operations over `world_size()` ranks. Every rank must make
/// the same calls in the same order with the same lengths.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// `out` = every rank's `local` (all of the same length), concatenated
    /// in rank order.
    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()>;

    /// Sends `data` to rank `to` (which calls [`Communicator::recv`] with
    /// the same length).
    fn send(&mut self, to: usize, data: &[f32]) -> Result<()>;

    /// Receives exactly `out.len()` floats from rank `from`.
    fn recv(&mut self, from: usize, out: &mut [f32]) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()> {
        let mut all = vec![0.0; self.world_size()];
        self.all_gather(&[0.0], &mut all)
    }

    /// Element-wise sum of every rank's `buf`, added in rank order, left in
    /// `buf` on every rank (see the module docs on why the order is fixed).
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let (n, w) = (buf.len(), self.world_size());
        if w == 1 {
            return Ok(());
        }
        let mut all = vec![0.0; n * w];
        self.all_gather(buf, &mut all)?;
        sum_in_rank_order(&all, buf);
        Ok(())
    }
}

/// `out[i] = ((parts[0][i] + parts[1][i]) + parts[2][i]) + …` where
/// `parts` is `out.len()`-long slices of `all` in rank order.
pub fn sum_in_rank_order(all: &[f32], out: &mut [f32]) {
    let n = out.len();
    out.copy_from_slice(&all[..n]);
    for part in all[n..].chunks_exact(n) {
        for (o, p) in out.iter_mut().zip(part) {
            *o += p;
        }
    }
}

/// A group of one: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SoloCommunicator;

impl Communicator for SoloCommunicator {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        if out.len() != local.len() {
            return Err(CommError::Usage(format!(
                "all_gather of {} floats into {}",
                local.len(),
                out.len()
            )));
        }
        out.copy_from_slice(local);
        Ok(())
    }
    fn send(&mut self, to: usize, _: &[f32]) -> Result<()> {
        Err(CommError::Usage(format!(
            "send to rank {to} in a group of one"
        )))
    }
    fn recv(&mut self, from: usize, _: &mut [f32]) -> Result<()> {
        Err(CommError::Usage(format!(
            "recv from rank {from} in a group of one"
        )))
    }
}

/// How a rank finds its group.
#[derive(Debug, Clone)]
pub struct CommConfig {
    pub rank: usize,
    pub world_size: usize,
    /// Rank 0 listens here; the others dial it to learn each other's
    /// addresses. Port 0 is not allowed (the others must know it).
    pub rendezvous: SocketAddr,
    /// Shared by the ranks of one group, so a stray process (another
    /// worker's rank, a restarted one) is refused at connect.
    pub session: u64,
    /// Longest wait for any peer in any call, and for the group to form.
    pub timeout: Duration,
}

/// Frames on the wire: a 16-byte header (magic, kind, element count) and
/// the floats, little-endian as in memory.
const MAGIC: u32 = 0x544E_4343; // "CCNT"
const HELLO: u32 = 1;
const TABLE: u32 = 2;
const DATA: u32 = 3;
/// Messages up to this size are written before reading (the kernel's
/// socket buffers, raised at connect, hold them); larger ones are written
/// by one thread per peer while this thread reads, so two ranks writing to
/// each other can never block each other.
const INLINE_BYTES: usize = 128 << 10;
const SOCKET_BUFFER: usize = 1 << 20;

/// One TCP connection per pair of ranks.
pub struct TcpCommunicator {
    rank: usize,
    world: usize,
    /// `peers[r]`: the connection to rank `r` (`None` for this rank).
    peers: Vec<Option<TcpStream>>,
    timeout: Duration,
    /// Reused by `all_reduce_sum` for the gathered partials.
    scratch: Vec<f32>,
    /// Reused to write a small message's header and payload at once.
    stage: Vec<u8>,
}

impl std::fmt::Debug for TcpCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpCommunicator")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

fn header(kind: u32, a: u64, b: u64) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&a.to_le_bytes());
    h[16..24].copy_from_slice(&b.to_le_bytes());
    h
}

fn io_error(peer: usize, timeout: Duration, e: std::io::Error) -> CommError {
    use std::io::ErrorKind::*;
    match e.kind() {
        WouldBlock | TimedOut => CommError::Timeout {
            peer,
            after: timeout,
        },
        _ => CommError::PeerGone {
            peer,
            detail: e.to_string(),
        },
    }
}

fn read_header(s: &mut TcpStream, peer: usize, timeout: Duration, kind: u32) -> Result<(u64, u64)> {
    let mut h = [0u8; 24];
    s.read_exact(&mut h)
        .map_err(|e| io_error(peer, timeout, e))?;
    let magic = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    let got = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    if magic != MAGIC || got != kind {
        return Err(CommError::Protocol {
            peer,
            detail: format!("expected frame kind {kind}, got magic {magic:#x} kind {got}"),
        });
    }
    Ok((
        u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")),
        u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")),
    ))
}

fn tune(s: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let sock = socket2::SockRef::from(s);
    sock.set_send_buffer_size(SOCKET_BUFFER)?;
    sock.set_recv_buffer_size(SOCKET_BUFFER)
}

fn encode_addr(a: SocketAddr) -> Vec<u8> {
    a.to_string().into_bytes()
}

impl TcpCommunicator {
    /// Forms the group: blocks until every rank has joined (or the
    /// timeout passes). Rank 0 must be able to bind `rendezvous`.
    pub fn connect(cfg: &CommConfig) -> Result<Self> {
        let CommConfig {
            rank,
            world_size: world,
            rendezvous,
            session,
            timeout,
        } = *cfg;
        if world == 0 || rank >= world {
            return Err(CommError::Usage(format!("rank {rank} of {world}")));
        }
        if rendezvous.port() == 0 {
            return Err(CommError::Usage(
                "the rendezvous address needs a fixed port".into(),
            ));
        }
        let deadline = Instant::now() + timeout;
        let setup = |what: &str, e: std::io::Error| CommError::Setup(format!("{what}: {e}"));
        let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        if world == 1 {
            return Ok(Self {
                rank,
                world,
                peers,
                timeout,
                scratch: Vec::new(),
                stage: Vec::new(),
            });
        }
        // Everyone but rank 0 listens on an ephemeral port for the ranks
        // above it; rank 0 listens on the rendezvous address.
        let listener = if rank == 0 {
            TcpListener::bind(rendezvous).map_err(|e| setup("binding the rendezvous", e))?
        } else {
            TcpListener::bind(SocketAddr::new(rendezvous.ip(), 0))
                .map_err(|e| setup("binding", e))?
        };
        let me = if rank == 0 {
            rendezvous
        } else {
            listener
                .local_addr()
                .map_err(|e| setup("local address", e))?
        };
        let hello = |s: &mut TcpStream, addr: SocketAddr| -> std::io::Result<()> {
            let a = encode_addr(addr);
            let mut m = header(HELLO, session, ((rank as u64) << 32) | world as u64).to_vec();
            m.extend_from_slice(&(a.len() as u32).to_le_bytes());
            m.extend_from_slice(&a);
            s.write_all(&m)
        };
        let accept = |expect_from: std::ops::Range<usize>,
                      peers: &mut Vec<Option<TcpStream>>|
         -> Result<Vec<(usize, SocketAddr)>> {
            let mut joined = Vec::new();
            listener
                .set_nonblocking(true)
                .map_err(|e| setup("listener", e))?;
            while joined.len() < expect_from.len() {
                let (mut s, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return Err(CommError::Setup(format!(
                                "rank {rank}: {} of ranks {expect_from:?} joined within {timeout:?}",
                                joined.len()
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(e) => return Err(setup("accept", e)),
                };
                s.set_nonblocking(false).map_err(|e| setup("accept", e))?;
                tune(&s, timeout).map_err(|e| setup("socket options", e))?;
                // A stranger is dropped; the group keeps waiting for its own.
                let Ok((sess, rw)) = read_header(&mut s, usize::MAX, timeout, HELLO) else {
                    continue;
                };
                let (r, w) = ((rw >> 32) as usize, (rw & 0xFFFF_FFFF) as usize);
                let mut len = [0u8; 4];
                if sess != session
                    || w != world
                    || !expect_from.contains(&r)
                    || peers[r].is_some()
                    || s.read_exact(&mut len).is_err()
                {
                    continue;
                }
                let mut a = vec![0u8; u32::from_le_bytes(len) as usize];
                if a.len() > 256 || s.read_exact(&mut a).is_err() {
                    continue;
                }
                let Some(addr) = std::str::from_utf8(&a).ok().and_then(|a| a.parse().ok()) else {
                    continue;
                };
                peers[r] = Some(s);
                joined.push((r, addr));
            }
            Ok(joined)
        };
        let dial = |addr: SocketAddr| -> Result<TcpStream> {
            loop {
                match TcpStream::connect_timeout(&addr, timeout) {
                    Ok(s) => {
                        tune(&s, timeout).map_err(|e| setup("socket options", e))?;
                        return Ok(s);
                    }
                    Err(e) if Instant::now() < deadline => {
                        tracing::trace!(%addr, error = %e, "rank not listening yet");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(setup(&format!("connecting to {addr}"), e)),
                }
            }
        };
        let mut table = vec![rendezvous; world];
        if rank == 0 {
            for (r, addr) in accept(1..world, &mut peers)? {
                table[r] = addr;
            }
            let body: Vec<u8> = table
                .iter()
                .flat_map(|a| {
                    let a = encode_addr(*a);
                    let mut v = (a.len() as u32).to_le_bytes().to_vec();
                    v.extend_from_slice(&a);
                    v
                })
                .collect();
            let mut m = header(TABLE, session, body.len() as u64).to_vec();
            m.extend_from_slice(&body);
            for (r, p) in peers.iter_mut().enumerate().skip(1) {
                let p = p.as_mut().expect("every rank joined");
                p.write_all(&m).map_err(|e| io_error(r, timeout, e))?;
            }
        } else {
            let mut s = dial(rendezvous)?;
            hello(&mut s, me).map_err(|e| io_error(0, timeout, e))?;
            let (sess, len) = read_header(&mut s, 0, timeout, TABLE)?;
            if sess != session || len > 64 << 10 {
                return Err(CommError::Protocol {
                    peer: 0,
                    detail: "bad address table".into(),
                });
            }
            let mut body = vec![0u8; len as usize];
            s.read_exact(&mut body)
                .map_err(|e| io_error(0, timeout, e))?;
            let mut at = 0;
            for slot in table.iter_mut() {
                let bad = || CommError::Protocol {
                    peer: 0,
                    detail: "bad address table".into(),
                };
                let n = body
                    .get(at..at + 4)
                    .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
                    .ok_or_else(bad)?;
                let a = body.get(at + 4..at + 4 + n).ok_or_else(bad)?;
                *slot = std::str::from_utf8(a)
                    .ok()
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(bad)?;
                at += 4 + n;
            }
            peers[0] = Some(s);
            // Dial the ranks below, accept the ones above.
            for (r, addr) in table.iter().enumerate().take(rank).skip(1) {
                let mut s = dial(*addr)?;
                hello(&mut s, me).map_err(|e| io_error(r, timeout, e))?;
                peers[r] = Some(s);
            }
            accept(rank + 1..world, &mut peers)?;
        }
        let mut c = Self {
            rank,
            world,
            peers,
            timeout,
            scratch: Vec::new(),
            stage: Vec::new(),
        };
        // Nobody returns before the whole mesh stands.
        c.barrier()?;
        Ok(c)
    }

    /// A second handle on each peer's connection (rank, stream), for a
    /// watcher that only waits for the peer to hang up
    /// ([`wait_for_hangup`]); it must not read or write.
    pub fn peer_handles(&self) -> Result<Vec<(usize, TcpStream)>> {
        self.peers
            .iter()
            .enumerate()
            .filter_map(|(r, p)| p.as_ref().map(|p| (r, p)))
            .map(|(r, p)| {
                p.try_clone().map(|c| (r, c)).map_err(|e| {
                    CommError::Setup(format!("cloning the connection to rank {r}: {e}"))
                })
            })
            .collect()
    }

    fn peer(&mut self, r: usize) -> Result<&mut TcpStream> {
        if r == self.rank || r >= self.world {
            return Err(CommError::Usage(format!(
                "rank {} cannot talk to rank {r} of {}",
                self.rank, self.world
            )));
        }
        Ok(self.peers[r]
            .as_mut()
            .expect("connected to every other rank"))
    }
}

fn as_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

fn as_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above; every bit pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), std::mem::size_of_val(v)) }
}

/// Header and payload: staged in `stage` and written at once when given
/// (small messages: one segment, one wake-up of the reader), else two
/// writes (large ones, where a copy would cost more than the syscall).
fn write_msg(s: &mut TcpStream, data: &[f32], stage: Option<&mut Vec<u8>>) -> std::io::Result<()> {
    let h = header(DATA, data.len() as u64, 0);
    match stage {
        Some(buf) => {
            buf.clear();
            buf.extend_from_slice(&h);
            buf.extend_from_slice(as_bytes(data));
            s.write_all(buf)
        }
        None => {
            s.write_all(&h)?;
            s.write_all(as_bytes(data))
        }
    }
}

fn read_msg(s: &mut TcpStream, peer: usize, timeout: Duration, out: &mut [f32]) -> Result<()> {
    let (n, _) = read_header(s, peer, timeout, DATA)?;
    if n as usize != out.len() {
        return Err(CommError::Protocol {
            peer,
            detail: format!("sent {n} floats, {} expected", out.len()),
        });
    }
    s.read_exact(as_bytes_mut(out))
        .map_err(|e| io_error(peer, timeout, e))
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        let n = local.len();
        if out.len() != n * self.world {
            return Err(CommError::Usage(format!(
                "all_gather of {n} floats over {} ranks into {}",
                self.world,
                out.len()
            )));
        }
        let (rank, timeout) = (self.rank, self.timeout);
        out[rank * n..(rank + 1) * n].copy_from_slice(local);
        if std::mem::size_of_val(local) + 24 <= INLINE_BYTES {
            for r in (0..self.world).filter(|&r| r != rank) {
                let mut stage = std::mem::take(&mut self.stage);
                let w = write_msg(self.peer(r)?, local, Some(&mut stage));
                self.stage = stage;
                w.map_err(|e| io_error(r, timeout, e))?;
            }
            for (r, part) in out.chunks_exact_mut(n).enumerate() {
                if r != rank {
                    read_msg(self.peer(r)?, r, timeout, part)?;
                }
            }
            return Ok(());
        }
        // Large: one writer thread per peer, reads here.
        let mut writers = Vec::new();
        let mut readers = Vec::new();
        for (r, p) in self.peers.iter_mut().enumerate() {
            if let Some(p) = p {
                let w = p.try_clone().map_err(|e| io_error(r, timeout, e))?;
                writers.push((r, w));
                readers.push((r, p));
            }
        }
        std::thread::scope(|sc| {
            let handles: Vec<_> = writers
                .into_iter()
                .map(|(r, mut w)| {
                    sc.spawn(move || {
                        write_msg(&mut w, local, None).map_err(|e| io_error(r, timeout, e))
                    })
                })
                .collect();
            let mut parts: Vec<(usize, &mut [f32])> = out.chunks_exact_mut(n).enumerate().collect();
            let mut read = Ok(());
            for (r, p) in readers {
                let part = &mut parts[r].1;
                if let Err(e) = read_msg(p, r, timeout, part) {
                    read = Err(e);
                    // Unblock our writers: the group is broken anyway.
                    let _ = p.shutdown(std::net::Shutdown::Both);
                    break;
                }
            }
            for h in handles {
                match h.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => read = read.and(Err(e)),
                    Err(_) => {
                        read = read.and(Err(CommError::Usage("writer thread panicked".into())))
                    }
                }
            }
            read
        })
    }

    fn send(&mut self, to: usize, data: &[f32]) -> Result<()> {
        let timeout = self.timeout;
        let mut stage = std::mem::take(&mut self.stage);
        let small = std::mem::size_of_val(data) + 24 <= INLINE_BYTES;
        let w = write_msg(self.peer(to)?, data, small.then_some(&mut stage));
        self.stage = stage;
        w.map_err(|e| io_error(to, timeout, e))
    }

    fn recv(&mut self, from: usize, out: &mut [f32]) -> Result<()> {
        let timeout = self.timeout;
        read_msg(self.peer(from)?, from, timeout, out)
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let (n, w) = (buf.len(), self.world);
        if w == 1 {
            return Ok(());
        }
        let mut all = std::mem::take(&mut self.scratch);
        all.clear();
        all.resize(n * w, 0.0);
        let r = self.all_gather(buf, &mut all);
        if r.is_ok() {
            sum_in_rank_order(&all, buf);
        }
        self.scratch = all;
        r
    }
}

/// Blocks until one of `peers` hangs up (its process died or closed the
/// connection) and returns its rank, or returns `None` after `within`.
/// Reads nothing: the connections stay usable by their owner. Linux only
/// (`POLLRDHUP`); elsewhere it just waits `within` and the peers' death is
/// noticed by the next collective instead.
pub fn wait_for_hangup(peers: &[(usize, TcpStream)], within: Duration) -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let mut fds: Vec<libc::pollfd> = peers
            .iter()
            .map(|(_, s)| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            })
            .collect();
        let ms = within.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n <= 0 {
            return None;
        }
        fds.iter()
            .zip(peers)
            .find(|(f, _)| f.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
            .map(|(_, (r, _))| *r)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = peers;
        std::thread::sleep(within);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    fn group(world: usize) -> Vec<TcpCommunicator> {
        let rendezvous = free_port();
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                std::thread::spawn(move || {
                    TcpCommunicator::connect(&CommConfig {
                        rank,
                        world_size: world,
                        rendezvous,
                        session: 7,
                        timeout: Duration::from_secs(10),
                    })
                    .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Runs `f` on every rank at once.
    fn on_all<T: Send>(
        g: Vec<TcpCommunicator>,
        f: impl Fn(&mut TcpCommunicator) -> T + Sync,
    ) -> Vec<T> {
        std::thread::scope(|s| {
            let hs: Vec<_> = g
                .into_iter()
                .map(|mut c| {
                    let f = &f;
                    s.spawn(move || f(&mut c))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn data(rank: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + rank * 104_729) % 1000) as f32 * 1e-3 - 0.37 + rank as f32 * 1e7)
            .collect()
    }

    #[test]
    fn all_reduce_adds_in_rank_order_bit_for_bit_on_every_rank() {
        // Small (inline) and large (threaded) messages, 2 to 4 ranks.
        for world in 2..=4 {
            for n in [1, 577, 100_000] {
                let got = on_all(group(world), |c| {
                    let mut b = data(c.rank(), n);
                    c.all_reduce_sum(&mut b).unwrap();
                    b
                });
                let mut want = data(0, n);
                for r in 1..world {
                    for (w, x) in want.iter_mut().zip(data(r, n)) {
                        *w += x;
                    }
                }
                for (r, g) in got.iter().enumerate() {
                    assert!(
                        g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "world {world}, n {n}, rank {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn all_gather_concatenates_and_send_recv_pair_up() {
        let got = on_all(group(3), |c| {
            let mut all = vec![0.0; 3 * 5];
            c.all_gather(&data(c.rank(), 5), &mut all).unwrap();
            // A pipeline: 0 → 1 → 2.
            let mut x = vec![c.rank() as f32; 4];
            if c.rank() > 0 {
                c.recv(c.rank() - 1, &mut x).unwrap();
                x.iter_mut().for_each(|v| *v += 1.0);
            }
            if c.rank() < 2 {
                c.send(c.rank() + 1, &x).unwrap();
            }
            c.barrier().unwrap();
            (all, x)
        });
        let want: Vec<f32> = (0..3).flat_map(|r| data(r, 5)).collect();
        for (all, _) in &got {
            assert_eq!(all, &want);
        }
        assert_eq!(got[2].1, vec![2.0; 4]);
    }

    #[test]
    fn a_rank_that_dies_fails_its_peers_promptly() {
        let mut g = group(3);
        let dead = g.pop().unwrap();
        drop(dead);
        let t0 = Instant::now();
        let errs = on_all(g, |c| {
            let mut b = vec![1.0; 8];
            c.all_reduce_sum(&mut b)
        });
        assert!(
            errs.iter()
                .all(|e| matches!(e, Err(CommError::PeerGone { .. }))),
            "{errs:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn mismatched_calls_and_strangers_are_refused() {
        let errs = on_all(group(2), |c| {
            let mut b = vec![1.0; 3 + c.rank()];
            c.all_reduce_sum(&mut b)
        });
        assert!(
            errs.iter()
                .any(|e| matches!(e, Err(CommError::Protocol { .. }))),
            "{errs:?}"
        );
        // A rank of another session never joins: the group times out.
        let rendezvous = free_port();
        let h = std::thread::spawn(move || {
            TcpCommunicator::connect(&CommConfig {
                rank: 0,
                world_size: 2,
                rendezvous,
                session: 1,
                timeout: Duration::from_millis(800),
            })
        });
        std::thread::sleep(Duration::from_millis(100));
        let stranger = TcpCommunicator::connect(&CommConfig {
            rank: 1,
            world_size: 2,
            rendezvous,
            session: 2,
            timeout: Duration::from_millis(800),
        });
        assert!(stranger.is_err());
        assert!(matches!(h.join().unwrap(), Err(CommError::Setup(_))));
        assert!(SoloCommunicator.send(0, &[1.0]).is_err());
    }
}
