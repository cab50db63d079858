//! Shared-memory data plane of the TCP transport: when the prefill and the
//! decode worker run on one host (a local cluster, or two processes sharing
//! one GPU, whose KV is staged through host memory on both sides), the
//! payload moves through a ring in shared memory instead of through the
//! kernel's socket buffers. Everything else stays on the socket: the
//! handshake with its layout and secret check, one block header per frame
//! (with its CRC-32C), heartbeats, the end frame and the replies, so
//! deadlines, leases, typed refusals and a peer dying mid-transfer behave
//! exactly as over plain TCP.
//!
//! - The sender creates the ring as a sealed Linux memfd (it cannot shrink,
//!   so a mapping never faults) and offers it in the handshake; a receiver
//!   on the same host opens it through `/proc/<pid>/fd/<fd>` and checks the
//!   nonce in its first page. A receiver elsewhere (another host, another
//!   PID namespace), or one that does not want it, declines, and the
//!   payload follows each header on the socket as usual.
//! - The sender packs each region into the ring, computing the checksum
//!   while copying, publishes how far it wrote (`written`) and only then
//!   sends the block's header. The receiver, per header, copies the payload
//!   out of the ring into its reserved block, verifies the copy, and
//!   publishes how far it read (`consumed`).
//! - Frames never straddle the ring's end: one that would starts at the
//!   beginning instead. Both sides apply the same rule, so headers need no
//!   offsets. The receiver sends a Credit frame each time it frees a quarter
//!   of the ring; a sender that finds the ring full waits for one.
//!
//! Nothing is left behind: the memfd has no name in any file system and is
//! freed when both processes have unmapped it, whichever way they end.
//!
//! Making a ring costs more than sending a few MB through it (the kernel
//! allocates and clears every page), so a sender keeps the rings of
//! transfers its receiver confirmed, a few at most, and offers them again
//! with a fresh nonce. Mapping one costs the receiver 0.3–0.5 ms (the kernel
//! fills the page tables), as much as moving a short prompt's KV, so a
//! receiver keeps its mappings too, a few MB of them at most, and maps a
//! ring again only when the sender's descriptor names another file.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tandem_proto::kv as pb;

use crate::error::{KvTransferError, Result};

/// The ring's first page: `magic u64 | capacity u64 | nonce [u8; 16]`,
/// then the sender's `written` and the receiver's `consumed` byte counts on
/// cache lines of their own. The data follows the page.
const HEADER_PAGE: usize = 4096;
const MAGIC: u64 = u64::from_le_bytes(*b"TNDMKVR1");
const CAPACITY_AT: usize = 8;
const NONCE_AT: usize = 16;
const NONCE_LEN: usize = 16;
const WRITTEN_AT: usize = 64;
const CONSUMED_AT: usize = 128;
/// Largest ring a receiver maps.
const MAX_CAPACITY: u64 = 1 << 30;
/// Rings a process keeps for later transfers.
const MAX_IDLE: usize = 4;

/// This process's idle rings.
static IDLE: Mutex<Vec<SendRing>> = Mutex::new(Vec::new());
/// Senders' rings this process has mapped, least recently used first.
static MAPPED: Mutex<Vec<Arc<MappedRing>>> = Mutex::new(Vec::new());
/// Mappings kept, and bytes of them at most: a sender that dies leaves its
/// rings alive in memory until they are dropped from here.
const MAX_MAPPED: usize = 8;
const MAX_MAPPED_BYTES: usize = 64 << 20;

/// Which way a transfer's payload travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPlane {
    /// After each block header on the socket.
    Socket,
    /// Through a ring in memory shared by the two processes.
    SharedMemory,
}

/// Where a frame of `n` bytes starts when the stream is at byte `pos` of a
/// ring of `cap` bytes: frames never straddle the end, so one that would
/// skips to the start of the next lap.
fn place(pos: u64, n: u64, cap: u64) -> u64 {
    let off = pos % cap;
    if off + n > cap {
        pos + (cap - off)
    } else {
        pos
    }
}

/// A mapping of the ring; unmapped on drop.
struct Mapping {
    base: *mut u8,
    len: usize,
    capacity: u64,
}

// SAFETY: the mapping is plain memory; every access to the data goes
// through raw-pointer copies at offsets the ring protocol hands to one side
// at a time, and the two counters are atomics.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn map(file: &File, len: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh shared mapping of a file we hold open; the file is
        // sealed against shrinking, so no access within `len` can fault.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            base: p.cast(),
            len,
            capacity: (len - HEADER_PAGE) as u64,
        })
    }

    fn counter(&self, at: usize) -> &AtomicU64 {
        // SAFETY: `at` is an 8-aligned offset inside the header page of a
        // page-aligned mapping that lives as long as `self`.
        unsafe { &*self.base.add(at).cast::<AtomicU64>() }
    }

    fn read_header(&self, at: usize, out: &mut [u8]) {
        // SAFETY: inside the header page.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(at), out.as_mut_ptr(), out.len()) }
    }

    /// Pointer to data byte `pos % capacity`; the caller keeps its frame
    /// inside the ring (see [`place`]).
    fn data(&self, pos: u64) -> *mut u8 {
        // SAFETY: the offset is below the capacity, inside the mapping.
        unsafe { self.base.add(HEADER_PAGE + (pos % self.capacity) as usize) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped by `map` with this length, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

fn random_nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    // SAFETY: writes at most `n.len()` bytes into `n`.
    let got = unsafe { libc::getrandom(n.as_mut_ptr().cast(), n.len(), 0) };
    if got != n.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n)
}

/// The sender's ring.
pub(crate) struct SendRing {
    map: Mapping,
    /// Kept open so that the receiver can open it through /proc.
    file: File,
    written: u64,
}

impl SendRing {
    /// A ring of at least `capacity` data bytes (an idle one of this
    /// process if there is one, else a new one) and the offer that lets a
    /// receiver on this host map it.
    pub(crate) fn take(capacity: usize) -> std::io::Result<(Self, pb::SharedMemoryOffer)> {
        let idle = {
            let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
            // The smallest that is large enough.
            let fit = (0..idle.len())
                .filter(|&i| idle[i].map.capacity >= capacity as u64)
                .min_by_key(|&i| idle[i].map.capacity);
            fit.map(|i| idle.swap_remove(i))
        };
        match idle {
            Some(mut ring) => {
                let offer = ring.reset()?;
                Ok((ring, offer))
            }
            None => Self::create(capacity),
        }
    }

    /// Keeps the ring for a later transfer. Only for a transfer whose
    /// receiver confirmed it: it reads nothing more. With the idle list
    /// full, a larger ring takes the place of the smallest (a large ring
    /// serves any transfer; a small one only small ones).
    pub(crate) fn recycle(self) {
        let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(self);
            return;
        }
        let smallest = (0..idle.len()).min_by_key(|&i| idle[i].map.capacity);
        if let Some(i) = smallest.filter(|&i| idle[i].map.capacity < self.map.capacity) {
            idle[i] = self;
        }
    }

    /// Empties the ring and gives it a fresh nonce, so that only the
    /// receiver of the offer returned recognises it.
    fn reset(&mut self) -> std::io::Result<pb::SharedMemoryOffer> {
        let nonce = random_nonce()?;
        self.written = 0;
        self.map.counter(WRITTEN_AT).store(0, Ordering::Release);
        self.map.counter(CONSUMED_AT).store(0, Ordering::Release);
        // SAFETY: inside the header page; no receiver holds this ring now.
        unsafe {
            std::ptr::copy_nonoverlapping(nonce.as_ptr(), self.map.base.add(NONCE_AT), NONCE_LEN)
        };
        Ok(pb::SharedMemoryOffer {
            pid: std::process::id(),
            fd: self.file.as_raw_fd() as u32,
            capacity: self.map.capacity,
            nonce: nonce.to_vec(),
        })
    }

    /// Creates a ring of `capacity` data bytes (rounded up to whole pages).
    fn create(capacity: usize) -> std::io::Result<(Self, pb::SharedMemoryOffer)> {
        let capacity = capacity.div_ceil(HEADER_PAGE) * HEADER_PAGE;
        // SAFETY: a NUL-terminated name; the returned descriptor is owned by
        // the File below.
        let fd = unsafe {
            libc::memfd_create(
                c"tandem-kv-ring".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len((HEADER_PAGE + capacity) as u64)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own.
        if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let map = Mapping::map(&file, HEADER_PAGE + capacity)?;
        // SAFETY: the header page is ours until the offer goes out.
        unsafe {
            std::ptr::copy_nonoverlapping(MAGIC.to_le_bytes().as_ptr(), map.base, 8);
            std::ptr::copy_nonoverlapping(
                (capacity as u64).to_le_bytes().as_ptr(),
                map.base.add(CAPACITY_AT),
                8,
            );
        }
        let mut ring = Self {
            map,
            file,
            written: 0,
        };
        let offer = ring.reset()?;
        Ok((ring, offer))
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.map.capacity
    }

    /// Where a frame of `n` bytes would start, if the receiver has freed
    /// enough of the ring for it.
    pub(crate) fn room_for(&self, n: usize) -> Option<u64> {
        let start = place(self.written, n as u64, self.map.capacity);
        let consumed = self.map.counter(CONSUMED_AT).load(Ordering::Acquire);
        (start + n as u64 - consumed <= self.map.capacity).then_some(start)
    }

    /// Copies a frame's pieces (from `fill`, which calls its argument with
    /// each piece in order) to `start` (from [`SendRing::room_for`]) and
    /// publishes it: the receiver may read it once it holds the header.
    pub(crate) fn write<R>(
        &mut self,
        start: u64,
        n: usize,
        fill: impl FnOnce(&mut dyn FnMut(&[u8])) -> R,
    ) -> R {
        let dest = self.map.data(start);
        let mut at = 0usize;
        let r = fill(&mut |piece: &[u8]| {
            assert!(at + piece.len() <= n, "frame larger than announced");
            // SAFETY: [start, start + n) lies inside the ring (`place`) and
            // the receiver has released it (`room_for`).
            unsafe { std::ptr::copy_nonoverlapping(piece.as_ptr(), dest.add(at), piece.len()) };
            at += piece.len();
        });
        assert_eq!(at, n, "frame smaller than announced");
        self.written = start + n as u64;
        self.map
            .counter(WRITTEN_AT)
            .store(self.written, Ordering::Release);
        r
    }

    /// Test hook: flips one bit of the last byte written (after its
    /// checksum was computed).
    pub(crate) fn flip_last_byte(&mut self) {
        // SAFETY: the byte just written, not yet announced to the receiver.
        unsafe { *self.map.data(self.written - 1) ^= 0x01 };
    }
}

/// An offer this receiver declines: not this host's, or not the ring offered.
fn bad(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

/// A sender's ring as this process mapped it: the file behind the
/// sender's descriptor `/proc/<pid>/fd/<fd>` (device and inode, which
/// stay the file's while the mapping holds it) and the mapping.
struct MappedRing {
    pid: u32,
    fd: u32,
    dev: u64,
    ino: u64,
    map: Mapping,
}

impl MappedRing {
    /// The mapping of the file at `path`, from the cache when it holds one
    /// of the same file, else made now (and kept).
    fn get(offer: &pb::SharedMemoryOffer, path: &str, len: usize) -> std::io::Result<Arc<Self>> {
        let meta = std::fs::metadata(path)?;
        if meta.len() != len as u64 {
            return Err(bad("ring of another size than offered"));
        }
        {
            let mut cache = MAPPED.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = cache
                .iter()
                .position(|m| m.pid == offer.pid && m.fd == offer.fd)
            {
                let m = cache.remove(i);
                if m.dev == meta.dev() && m.ino == meta.ino() && m.map.len == len {
                    cache.push(m.clone());
                    return Ok(m);
                }
                // The descriptor names another file now: the old mapping goes.
            }
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        // SAFETY: fcntl on a descriptor we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(bad("ring not sealed against shrinking"));
        }
        // Checked on the file opened (the path could have changed since).
        let meta = file.metadata()?;
        if meta.len() != len as u64 {
            return Err(bad("ring of another size than offered"));
        }
        let ring = Arc::new(Self {
            pid: offer.pid,
            fd: offer.fd,
            dev: meta.dev(),
            ino: meta.ino(),
            map: Mapping::map(&file, len)?,
        });
        if len <= MAX_MAPPED_BYTES {
            let mut cache = MAPPED.lock().unwrap_or_else(|e| e.into_inner());
            cache.push(ring.clone());
            while cache.len() > MAX_MAPPED
                || cache.iter().map(|m| m.map.len).sum::<usize>() > MAX_MAPPED_BYTES
            {
                cache.remove(0);
            }
        }
        Ok(ring)
    }
}

/// The receiver's mapping of a sender's ring.
pub(crate) struct RecvRing {
    ring: Arc<MappedRing>,
    consumed: u64,
    credited: u64,
}

impl RecvRing {
    /// Opens and checks the ring a sender offered; `min_capacity` is the
    /// largest frame this transfer can carry. Any failure means "not this
    /// host, or not this sender's ring": the caller declines the offer.
    pub(crate) fn open(
        offer: &pb::SharedMemoryOffer,
        min_capacity: usize,
    ) -> std::io::Result<Self> {
        if offer.capacity < min_capacity as u64 || offer.capacity > MAX_CAPACITY {
            return Err(bad(format!(
                "ring of {} bytes (want {min_capacity}..={MAX_CAPACITY})",
                offer.capacity
            )));
        }
        let path = format!("/proc/{}/fd/{}", offer.pid, offer.fd);
        let ring = MappedRing::get(offer, &path, HEADER_PAGE + offer.capacity as usize)?;
        let mut head = [0u8; NONCE_AT + NONCE_LEN];
        ring.map.read_header(0, &mut head);
        let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().unwrap());
        if word(0) != MAGIC
            || word(CAPACITY_AT) != offer.capacity
            || head[NONCE_AT..] != offer.nonce[..]
        {
            return Err(bad("not the offered ring"));
        }
        Ok(Self {
            ring,
            consumed: 0,
            credited: 0,
        })
    }

    fn map(&self) -> &Mapping {
        &self.ring.map
    }

    /// Copies the next frame of `dest.len()` bytes out of the ring. Fails if
    /// the sender announced bytes it has not published.
    pub(crate) fn read(&mut self, dest: &mut [u8]) -> Result<()> {
        let n = dest.len() as u64;
        let cap = self.map().capacity;
        if n > cap {
            return Err(KvTransferError::Protocol(format!(
                "frame of {n} bytes in a ring of {cap}"
            )));
        }
        let start = place(self.consumed, n, cap);
        let written = self.map().counter(WRITTEN_AT).load(Ordering::Acquire);
        if start + n > written {
            return Err(KvTransferError::Protocol(format!(
                "block header for ring bytes {start}..{} while the sender published {written}",
                start + n
            )));
        }
        // SAFETY: [start, start + n) lies inside the ring and is published
        // by the sender, which does not reuse it before we release it. The
        // copy is checked against the frame's CRC afterwards, so even a
        // sender that broke that promise could only fail the transfer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map().data(start), dest.as_mut_ptr(), dest.len())
        };
        self.consumed = start + n;
        self.map()
            .counter(CONSUMED_AT)
            .store(self.consumed, Ordering::Release);
        Ok(())
    }

    /// Whether the sender should hear that space was freed (every quarter
    /// of the ring).
    pub(crate) fn credit_due(&mut self) -> bool {
        if self.consumed - self.credited >= self.map().capacity / 4 {
            self.credited = self.consumed;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_never_straddle_the_end() {
        assert_eq!(place(0, 10, 16), 0);
        assert_eq!(place(10, 6, 16), 10);
        assert_eq!(place(10, 7, 16), 16);
        assert_eq!(place(16, 16, 16), 16);
        assert_eq!(place(35, 14, 16), 48);
    }

    #[test]
    fn a_ring_carries_frames_across_laps_and_refuses_unpublished_reads() {
        let (mut tx, offer) = SendRing::create(1).unwrap();
        let cap = tx.capacity() as usize;
        assert_eq!(cap, HEADER_PAGE);
        let mut rx = RecvRing::open(&offer, 1000).unwrap();
        let mut out = vec![0u8; 1000];
        assert!(rx.read(&mut out).is_err(), "nothing published yet");
        for lap in 0..20u8 {
            let frame: Vec<u8> = (0..1000).map(|i| (i as u8) ^ lap).collect();
            let start = tx.room_for(1000).expect("the receiver keeps up");
            tx.write(start, 1000, |push| push(&frame));
            rx.read(&mut out).unwrap();
            assert_eq!(out, frame);
        }
        let mut queued = 0;
        while let Some(start) = tx.room_for(1000) {
            tx.write(start, 1000, |push| push(&[7u8; 1000]));
            queued += 1;
        }
        assert!(
            (3..=4).contains(&queued),
            "{queued} frames of 1000 bytes in 4096"
        );
        rx.read(&mut out).unwrap();
        assert!(tx.room_for(1000).is_some(), "a read frees room");
    }

    /// The idle rings are the process's: tests that use them take turns,
    /// each starting from none.
    fn idle_rings() -> std::sync::MutexGuard<'static, ()> {
        static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        IDLE.lock().unwrap().clear();
        turn
    }

    #[test]
    fn a_full_idle_list_keeps_the_larger_rings() {
        let _turn = idle_rings();
        let small: Vec<_> = (0..MAX_IDLE)
            .map(|_| SendRing::take(1).unwrap().0)
            .collect();
        for r in small {
            r.recycle();
        }
        let (big, offer) = SendRing::take(8 * HEADER_PAGE).unwrap();
        assert_eq!(
            big.capacity(),
            8 * HEADER_PAGE as u64,
            "no idle ring fits: a new one"
        );
        big.recycle();
        let (again, reused) = SendRing::take(8 * HEADER_PAGE).unwrap();
        assert_eq!(reused.fd, offer.fd, "the large ring replaced a small one");
        again.recycle();
        let idle = IDLE.lock().unwrap();
        assert_eq!(idle.len(), MAX_IDLE);
        assert_eq!(
            idle.iter()
                .filter(|r| r.capacity() == HEADER_PAGE as u64)
                .count(),
            MAX_IDLE - 1
        );
    }

    #[test]
    fn a_recycled_ring_starts_empty_under_a_new_nonce() {
        let _turn = idle_rings();
        let (mut tx, first) = SendRing::take(3 * HEADER_PAGE).unwrap();
        let start = tx.room_for(1000).unwrap();
        tx.write(start, 1000, |push| push(&[1u8; 1000]));
        let fd = first.fd;
        tx.recycle();
        let (tx, again) = SendRing::take(2 * HEADER_PAGE).unwrap();
        assert_eq!(again.fd, fd, "the idle ring is reused");
        assert_ne!(again.nonce, first.nonce);
        assert!(
            RecvRing::open(&first, 16).is_err(),
            "the old offer is stale"
        );
        let mut rx = RecvRing::open(&again, 16).unwrap();
        assert!(rx.read(&mut [0u8; 1]).is_err(), "nothing published");
        assert_eq!(tx.room_for(1000), Some(0));
    }

    #[test]
    fn a_reoffered_ring_is_mapped_once_and_another_file_anew() {
        let _turn = idle_rings();
        let (tx, first) = SendRing::take(2 * HEADER_PAGE).unwrap();
        let mapped = RecvRing::open(&first, 16).unwrap().ring;
        tx.recycle();
        let (_tx, again) = SendRing::take(2 * HEADER_PAGE).unwrap();
        assert_eq!(again.fd, first.fd, "the sender offers its idle ring");
        let rx = RecvRing::open(&again, 16).unwrap();
        assert!(Arc::ptr_eq(&rx.ring, &mapped), "the mapping is reused");
        // The same descriptor naming another file (the sender closed the
        // ring and made another under the same number): mapped anew.
        let (other, mut offer) = SendRing::create(3 * HEADER_PAGE).unwrap();
        // SAFETY: dup2 between two descriptors this test owns.
        assert!(unsafe { libc::dup2(other.file.as_raw_fd(), again.fd as i32) } >= 0);
        offer.fd = again.fd;
        let rx = RecvRing::open(&offer, 16).unwrap();
        assert!(!Arc::ptr_eq(&rx.ring, &mapped));
        assert_eq!(rx.map().capacity, 3 * HEADER_PAGE as u64);
    }

    #[test]
    fn a_forged_offer_is_declined() {
        let (_tx, offer) = SendRing::create(8192).unwrap();
        let mut wrong = offer.clone();
        wrong.nonce[0] ^= 1;
        assert!(RecvRing::open(&wrong, 16).is_err());
        let mut wrong = offer.clone();
        wrong.capacity += 4096;
        assert!(RecvRing::open(&wrong, 16).is_err());
        assert!(RecvRing::open(&offer, 1 << 20).is_err(), "too small");
        assert!(RecvRing::open(&offer, 16).is_ok());
    }
}
