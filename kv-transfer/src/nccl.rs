//! NCCL transport (feature `cuda`): the control plane is the TCP transport's
//! connection (handshake, block headers, heartbeats, replies, all as in
//! [`crate::tcp`]); the KV payload itself moves by NCCL send/recv.
//!
//! NCCL needs a side channel to hand its communicator id to the peer anyway,
//! and keeping every control frame on the socket means the layout and
//! cluster-secret check before anything moves, the transfer lease and the
//! typed refusals are the same whichever transport carries the bytes.
//!
//! One connection carries one transfer:
//!
//! 1. TCP connect and handshake exactly as [`crate::TcpTransport`]; a
//!    refusal is the same typed error.
//! 2. The sender sends a [`FrameKind::DataPlane`] frame (data-plane version,
//!    its GPU's UUID). The receiver refuses a sender on its own GPU (NCCL
//!    will not put two ranks on one device) with a Reply of class `cuda`;
//!    otherwise it creates an NCCL unique id and returns its 128 bytes in a
//!    DataPlane frame.
//! 3. Both join a two-rank communicator (sender rank 0, receiver rank 1).
//!    The communicator is non-blocking, so joining, and every later wait,
//!    is polled under the I/O deadline instead of parking a thread in NCCL.
//! 4. Per layer the sender packs each block as the TCP path does (the CRC-32C
//!    is computed on the host while packing), writes one Block header per
//!    block (its `byte_len` and CRC, no payload) to the socket, uploads the
//!    packed layer once and `ncclSend`s each block's bytes. The receiver,
//!    per header, `ncclRecv`s `byte_len` bytes, copies them to pinned host
//!    memory and feeds them to the same assembler as TCP: checksum,
//!    partial-block and missing-block handling are identical.
//! 5. End frame and final Reply as in TCP.
//!
//! The payload is staged through host memory on both sides because the KV
//! pool lives in host memory today; a device-resident pool would pack on
//! the device and skip the copies. A peer that dies mid-transfer is seen as
//! a stalled GPU wait (or a communicator error, or the socket's lease) and
//! fails the transfer; dropping either side aborts its communicator.
//!
//! Placement: one GPU per side, on distinct devices (a multi-GPU host, or
//! hosts NCCL can connect). Two processes sharing one GPU need another data
//! plane (CUDA IPC or pinned-host staging) behind the same trait; until then
//! such a pair is refused at step 2 with a clear error.
//!
//! The CUDA driver and NCCL are loaded at run time (cudarc's dynamic
//! loading): this module builds without CUDA, and every entry point first
//! checks that the libraries load, turning their absence into an error
//! instead of cudarc's panic. NCCL is looked up as `libnccl.so` on the
//! library path (pip wheels ship only `libnccl.so.2`: link it).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError,
    PinnedHostSlice,
};
use cudarc::nccl::{result as nccl_result, sys as nccl_sys};
use prost::Message;
use tandem_engine::kv::KvLayout;
use tandem_proto::kv as pb;
use tokio::io::BufReader;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{oneshot, Mutex};

use crate::error::{KvTransferError, Result};
use crate::frame::{encode_payload_vec, frame_seed, payload_len, FrameHeader, FrameKind};
use crate::layout::{self, Handshake, TransferSummary};
use crate::sink::{Assembler, KvSink};
use crate::tcp::{
    check_region, io_err, listen_to_receiver, next_header, read_control, read_control_payload,
    read_header, socket_for, tell_sender, write_control, AbortOnDrop, Heartbeats, PendingKv,
    TcpIncoming, TcpKvListener, Writer,
};
use crate::transport::{
    with_deadline, BlockRegion, KvReceiver, KvSender, KvTransport, ReceiverConfig, ReceiverInner,
    TransferConfig,
};

/// Version of the DataPlane frames' contents (first payload byte).
const PLANE_VERSION: u8 = 1;
const UUID_LEN: usize = 16;
const NCCL_ID_LEN: usize = 128;
const SENDER_RANK: c_int = 0;
const RECEIVER_RANK: c_int = 1;
/// Smallest device staging buffer, so small layers do not reallocate.
const MIN_STAGING: usize = 1 << 20;

/// Where the sending side's KV goes through: which GPU, and the deadlines
/// and socket sizes of the control connection.
#[derive(Debug, Clone)]
pub struct NcclConfig {
    /// CUDA device ordinal of this side's GPU.
    pub device: usize,
    pub transfer: TransferConfig,
}

impl NcclConfig {
    pub fn new(device: usize, transfer: TransferConfig) -> Self {
        Self { device, transfer }
    }
}

fn cuda_err(what: &str, e: DriverError) -> KvTransferError {
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    KvTransferError::Cuda(format!("{what}: {:?} {text}", e.0))
}

trait OrCuda<T> {
    fn or_cuda(self, what: &str) -> Result<T>;
}

impl<T> OrCuda<T> for std::result::Result<T, DriverError> {
    fn or_cuda(self, what: &str) -> Result<T> {
        self.map_err(|e| cuda_err(what, e))
    }
}

/// # Safety
/// `p` is null or a NUL-terminated string that outlives the call.
unsafe fn c_string(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

fn nccl_err(what: &str, r: nccl_sys::ncclResult_t, comm: nccl_sys::ncclComm_t) -> KvTransferError {
    // SAFETY: NCCL returns static (or per-communicator) NUL-terminated strings.
    let (text, last) = unsafe {
        (
            c_string(nccl_sys::ncclGetErrorString(r)),
            if comm.is_null() {
                String::new()
            } else {
                c_string(nccl_sys::ncclGetLastError(comm))
            },
        )
    };
    let last = if last.is_empty() {
        String::new()
    } else {
        format!(" ({last})")
    };
    KvTransferError::Cuda(format!("{what}: {r:?}: {text}{last}"))
}

/// Accepts NCCL's "done" and "still going" (non-blocking communicators).
fn nccl_ok(what: &str, r: nccl_sys::ncclResult_t, comm: nccl_sys::ncclComm_t) -> Result<()> {
    match r {
        nccl_sys::ncclResult_t::ncclSuccess | nccl_sys::ncclResult_t::ncclInProgress => Ok(()),
        e => Err(nccl_err(what, e, comm)),
    }
}

/// Checks that the CUDA driver and NCCL libraries can be loaded, so a
/// machine without them gets this error rather than a panic on first use.
pub fn cuda_available() -> Result<()> {
    // SAFETY: only tries to open the shared libraries.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(KvTransferError::Cuda(
            "the CUDA driver library (libcuda) could not be loaded: the NCCL KV transport needs \
             an NVIDIA GPU and its driver"
                .into(),
        ));
    }
    // SAFETY: as above.
    if !unsafe { nccl_sys::is_culib_present() } {
        return Err(KvTransferError::Cuda(
            "the NCCL library could not be loaded: put the folder holding libnccl.so on \
             LD_LIBRARY_PATH (pip's nvidia-nccl wheels ship only libnccl.so.2; link \
             libnccl.so to it)"
                .into(),
        ));
    }
    Ok(())
}

/// Number of CUDA devices visible to this process.
pub fn device_count() -> Result<usize> {
    cuda_available()?;
    let n = CudaContext::device_count().or_cuda("counting CUDA devices")?;
    Ok(n.max(0) as usize)
}

/// The NCCL library's version code (e.g. 22703 for 2.27.3).
pub fn nccl_version() -> Result<i32> {
    cuda_available()?;
    nccl_result::get_nccl_version()
        .map_err(|e| nccl_err("reading the NCCL version", e.0, std::ptr::null_mut()))
}

/// One side's GPU.
#[derive(Clone)]
struct Gpu {
    ctx: Arc<CudaContext>,
    /// Identifies the physical device across processes (ordinals do not).
    uuid: [u8; UUID_LEN],
}

impl Gpu {
    fn open(device: usize) -> Result<Self> {
        let n = device_count()?;
        if device >= n {
            return Err(KvTransferError::Cuda(format!(
                "CUDA device {device} requested, {n} visible"
            )));
        }
        let ctx = CudaContext::new(device).or_cuda("opening the CUDA device")?;
        let uuid = ctx.uuid().or_cuda("reading the device UUID")?;
        Ok(Self {
            ctx,
            uuid: uuid.bytes.map(|b| b as u8),
        })
    }
}

/// The leading fields of NCCL's `ncclConfig_t` as of NCCL 2.14. NCCL reads
/// `size` bytes of a config and defaults every field newer than `version`,
/// so this prefix is understood by every NCCL since 2.14, whichever NCCL
/// headers cudarc's bindings were generated from.
#[repr(C)]
struct ConfigV2_14 {
    size: usize,
    magic: c_uint,
    version: c_uint,
    blocking: c_int,
}

/// An NCCL communicator, aborted on drop (abort never waits for a peer,
/// which may be gone).
struct Comm(nccl_sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as calls
// on it do not overlap; `Comm` is not `Sync` and every call takes `&mut`.
unsafe impl Send for Comm {}

impl Drop for Comm {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the handle came from ncclCommInitRankConfig and is
            // released exactly once.
            unsafe {
                let _ = nccl_result::comm_abort(self.0);
            }
        }
    }
}

impl Comm {
    /// Joins communicator `id` as `rank` of `nranks`, without blocking:
    /// NCCL connects in the background and this polls until it is done.
    async fn join(
        gpu: &Gpu,
        id: nccl_sys::ncclUniqueId,
        rank: c_int,
        nranks: c_int,
        after: Duration,
    ) -> Result<Self> {
        let mut comm = Self::start_join(gpu, id, rank, nranks)?;
        comm.settle("joining the NCCL communicator", after).await?;
        Ok(comm)
    }

    fn start_join(
        gpu: &Gpu,
        id: nccl_sys::ncclUniqueId,
        rank: c_int,
        nranks: c_int,
    ) -> Result<Self> {
        // NCCL takes the device from the calling thread's current context.
        gpu.ctx
            .bind_to_thread()
            .or_cuda("binding the CUDA context")?;
        let mut cfg = ConfigV2_14 {
            size: std::mem::size_of::<ConfigV2_14>(),
            magic: 0xcafe_beef,
            version: 2 * 10000 + 14 * 100,
            blocking: 0,
        };
        let mut raw: nccl_sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `raw` and `cfg` outlive the call; `cfg` is a valid prefix
        // of ncclConfig_t (see ConfigV2_14).
        let r = unsafe {
            nccl_sys::ncclCommInitRankConfig(
                &mut raw,
                nranks,
                id,
                rank,
                (&mut cfg as *mut ConfigV2_14).cast(),
            )
        };
        let comm = Comm(raw);
        nccl_ok("joining the NCCL communicator", r, raw)?;
        Ok(comm)
    }

    /// `Ok(true)` once the last call is done, `Ok(false)` while NCCL is
    /// still working on it, or the communicator's error.
    fn ready(&mut self, what: &str) -> Result<bool> {
        let mut state = nccl_sys::ncclResult_t::ncclSuccess;
        // SAFETY: valid communicator and out-pointer.
        let r = unsafe { nccl_sys::ncclCommGetAsyncError(self.0, &mut state) };
        if r != nccl_sys::ncclResult_t::ncclSuccess {
            return Err(nccl_err(what, r, self.0));
        }
        match state {
            nccl_sys::ncclResult_t::ncclSuccess => Ok(true),
            nccl_sys::ncclResult_t::ncclInProgress => Ok(false),
            e => Err(nccl_err(what, e, self.0)),
        }
    }

    /// Waits (polling, under `after`) until NCCL has finished the last call:
    /// a non-blocking communicator must settle before the next call.
    async fn settle(&mut self, what: &'static str, after: Duration) -> Result<()> {
        poll_until(what, after, || self.ready(what)).await
    }
}

/// Polls `ready` until it says yes, fails, or `after` passes. Yields to the
/// runtime between polls; after a short spin it sleeps briefly, so a long
/// wait for a slow peer does not burn a core.
async fn poll_until(
    what: &'static str,
    after: Duration,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        if ready()? {
            return Ok(());
        }
        if start.elapsed() >= after {
            return Err(KvTransferError::Timeout { what, after });
        }
        if spins < 64 {
            spins += 1;
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_micros(250)).await;
        }
    }
}

/// One side's data plane: the communicator, a stream, and the staging
/// buffers the payload passes through.
struct Plane {
    /// First, so it is aborted before the buffers it may still use are freed.
    comm: Comm,
    gpu: Gpu,
    stream: Arc<CudaStream>,
    staging: Option<CudaSlice<u8>>,
    pinned: Option<PinnedHostSlice<u8>>,
    done: CudaEvent,
    peer: c_int,
}

impl Plane {
    async fn join(
        gpu: &Gpu,
        id: nccl_sys::ncclUniqueId,
        rank: c_int,
        peer: c_int,
        after: Duration,
    ) -> Result<Self> {
        let stream = gpu.ctx.new_stream().or_cuda("creating a CUDA stream")?;
        let done = gpu.ctx.new_event(None).or_cuda("creating a CUDA event")?;
        let comm = Comm::join(gpu, id, rank, 2, after).await?;
        Ok(Self {
            comm,
            gpu: gpu.clone(),
            stream,
            staging: None,
            pinned: None,
            done,
            peer,
        })
    }

    fn bind(&self) -> Result<()> {
        self.gpu
            .ctx
            .bind_to_thread()
            .or_cuda("binding the CUDA context")
    }

    /// A device buffer of at least `len` bytes.
    fn staging(&mut self, len: usize) -> Result<&mut CudaSlice<u8>> {
        if self.staging.as_ref().is_none_or(|s| s.len() < len) {
            self.staging = None;
            let cap = len.next_power_of_two().max(MIN_STAGING);
            // SAFETY: every byte read from it is written first (by a copy or
            // a receive) in stream order.
            self.staging =
                Some(unsafe { self.stream.alloc::<u8>(cap) }.or_cuda("allocating device staging")?);
        }
        Ok(self.staging.as_mut().expect("allocated above"))
    }

    /// A pinned host buffer of at least `len` bytes (cached, not
    /// write-combined: the CPU reads it).
    fn pinned(&mut self, len: usize) -> Result<&mut PinnedHostSlice<u8>> {
        if self.pinned.as_ref().is_none_or(|p| p.len() < len) {
            self.pinned = None;
            let cap = len.next_power_of_two().max(MIN_STAGING);
            // SAFETY: every byte read from it is written first by a copy.
            self.pinned = Some(
                unsafe { self.gpu.ctx.alloc_pinned_with_flags::<u8>(cap, 0) }
                    .or_cuda("allocating pinned host staging")?,
            );
        }
        Ok(self.pinned.as_mut().expect("allocated above"))
    }

    /// Sends `host[span]` for each span, in order, and waits until the peer
    /// has received them all. `peer_ok` is polled meanwhile: it fails the
    /// wait as soon as the peer reports a failure on the control plane.
    async fn send(
        &mut self,
        host: &[u8],
        spans: &[(usize, usize)],
        after: Duration,
        mut peer_ok: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        self.bind()?;
        self.staging(host.len())?;
        let Plane {
            comm,
            gpu,
            stream,
            staging,
            done,
            peer,
            ..
        } = self;
        let staging = staging.as_mut().expect("allocated above");
        stream
            .memcpy_htod(host, &mut staging.slice_mut(..host.len()))
            .or_cuda("copying KV to the device")?;
        for &(at, len) in spans {
            // The task may have moved to another thread at the last await.
            gpu.ctx
                .bind_to_thread()
                .or_cuda("binding the CUDA context")?;
            let r = {
                let view = staging.slice(at..at + len);
                let (ptr, _read) = view.device_ptr(stream);
                // SAFETY: `ptr` holds `len` bytes written by the copy above
                // (same stream); the buffer lives until the wait below.
                unsafe {
                    nccl_sys::ncclSend(
                        ptr as *const c_void,
                        len,
                        nccl_sys::ncclDataType_t::ncclUint8,
                        *peer,
                        comm.0,
                        stream.cu_stream() as nccl_sys::cudaStream_t,
                    )
                }
            };
            nccl_ok("ncclSend", r, comm.0)?;
            comm.settle("ncclSend", after).await?;
        }
        done.record(stream).or_cuda("recording a CUDA event")?;
        poll_until("NCCL send of a layer", after, || {
            peer_ok()?;
            comm.ready("NCCL send")?;
            done.try_is_complete().or_cuda("waiting for the NCCL send")
        })
        .await
    }

    /// Receives `len` bytes from the peer into host memory.
    async fn recv(&mut self, len: usize, after: Duration) -> Result<&[u8]> {
        self.bind()?;
        self.staging(len)?;
        self.pinned(len)?;
        let Plane {
            comm,
            stream,
            staging,
            pinned,
            done,
            peer,
            ..
        } = self;
        let (staging, pinned) = (
            staging.as_mut().expect("allocated above"),
            pinned.as_mut().expect("allocated above"),
        );
        let r = {
            let mut view = staging.slice_mut(..len);
            let (ptr, _write) = view.device_ptr_mut(stream);
            // SAFETY: `ptr` has room for `len` bytes and outlives the wait below.
            unsafe {
                nccl_sys::ncclRecv(
                    ptr as *mut c_void,
                    len,
                    nccl_sys::ncclDataType_t::ncclUint8,
                    *peer,
                    comm.0,
                    stream.cu_stream() as nccl_sys::cudaStream_t,
                )
            }
        };
        nccl_ok("ncclRecv", r, comm.0)?;
        comm.settle("ncclRecv", after).await?;
        stream
            .memcpy_dtoh(&staging.slice(..len), pinned)
            .or_cuda("copying KV to the host")?;
        done.record(stream).or_cuda("recording a CUDA event")?;
        poll_until("NCCL receive of a block", after, || {
            comm.ready("NCCL receive")?;
            done.try_is_complete()
                .or_cuda("waiting for the NCCL receive")
        })
        .await?;
        let host = pinned.as_slice().or_cuda("reading pinned staging")?;
        Ok(&host[..len])
    }
}

fn plane_hello(gpu: &Gpu) -> Vec<u8> {
    let mut b = vec![PLANE_VERSION];
    b.extend_from_slice(&gpu.uuid);
    b
}

fn check_plane_version(b: &[u8], want_len: usize) -> Result<()> {
    match b.first() {
        Some(&PLANE_VERSION) if b.len() == want_len => Ok(()),
        Some(&v) if v != PLANE_VERSION => Err(KvTransferError::Mismatch {
            field: "nccl_data_plane_version",
            local: PLANE_VERSION.to_string(),
            remote: v.to_string(),
        }),
        _ => Err(KvTransferError::Protocol(format!(
            "DataPlane frame of {} bytes (want {want_len})",
            b.len()
        ))),
    }
}

fn id_from_bytes(b: &[u8]) -> Result<nccl_sys::ncclUniqueId> {
    check_plane_version(b, 1 + NCCL_ID_LEN)?;
    let mut internal = [0 as c_char; NCCL_ID_LEN];
    for (d, &s) in internal.iter_mut().zip(&b[1..]) {
        *d = s as c_char;
    }
    Ok(nccl_sys::ncclUniqueId { internal })
}

/// Client side: where to send KV over NCCL (the address is the receiver's
/// control port, an [`NcclKvListener`]).
pub struct NcclTransport {
    pub addr: SocketAddr,
    pub cfg: NcclConfig,
    gpu: Gpu,
}

impl NcclTransport {
    /// Opens the GPU now, so a machine without one fails here, not at the
    /// first transfer.
    pub fn new(addr: SocketAddr, cfg: NcclConfig) -> Result<Self> {
        let gpu = Gpu::open(cfg.device)?;
        Ok(Self { addr, cfg, gpu })
    }
}

impl KvTransport for NcclTransport {
    type Sender = NcclSender;

    async fn connect(&self, handshake: Handshake) -> Result<NcclSender> {
        let cfg = self.cfg.transfer.clone();
        let rid = handshake.request_id;
        let sock = socket_for(&self.addr, cfg.socket_buffer)?;
        let mut stream = with_deadline("connect", cfg.io_timeout, async {
            sock.connect(self.addr).await.map_err(io_err)
        })
        .await?;
        stream.set_nodelay(true)?;
        let hs = handshake.to_proto().encode_to_vec();
        write_control(&mut stream, FrameKind::Handshake, rid, &hs, &cfg).await?;
        let (_, reply) = read_control(&mut stream, FrameKind::Reply, &cfg).await?;
        layout::accepted(pb::KvReply::decode(reply.as_slice()).ok())?;

        let hello = plane_hello(&self.gpu);
        write_control(&mut stream, FrameKind::DataPlane, rid, &hello, &cfg).await?;
        let h = read_header(&mut stream, &cfg).await?;
        let body = read_control_payload(&mut stream, &h, &cfg).await?;
        let id = match h.kind {
            FrameKind::DataPlane => id_from_bytes(&body)?,
            FrameKind::Reply => {
                layout::accepted(pb::KvReply::decode(body.as_slice()).ok())?;
                return Err(KvTransferError::Protocol(
                    "the receiver accepted the handshake twice".into(),
                ));
            }
            k => {
                return Err(KvTransferError::Protocol(format!(
                    "expected a DataPlane frame, got {k:?}"
                )))
            }
        };
        let plane = Plane::join(&self.gpu, id, SENDER_RANK, RECEIVER_RANK, cfg.io_timeout).await?;

        let (reader, writer) = stream.into_split();
        let writer = Arc::new(Mutex::new(writer));
        let (tx, outcome) = oneshot::channel();
        let credits = Arc::new(tokio::sync::Notify::new());
        let listen = tokio::spawn(listen_to_receiver(reader, cfg.clone(), tx, credits));
        Ok(NcclSender {
            plane,
            heartbeats: Heartbeats::start(writer.clone(), rid, cfg.clone()),
            writer,
            outcome,
            _listen: AbortOnDrop(listen),
            host: Vec::new(),
            spans: Vec::new(),
            headers: Vec::new(),
            layout: handshake.layout.layout,
            request_id: rid,
            frames: 0,
            cfg,
            corrupt: false,
        })
    }
}

/// One NCCL transfer, sender side.
pub struct NcclSender {
    /// First, so its communicator is aborted before anything else goes.
    plane: Plane,
    writer: Writer,
    outcome: oneshot::Receiver<Result<pb::KvReply>>,
    _listen: AbortOnDrop,
    heartbeats: Heartbeats,
    /// The packed layer, its per-block spans, and its Block headers.
    host: Vec<u8>,
    spans: Vec<(usize, usize)>,
    headers: Vec<u8>,
    layout: KvLayout,
    request_id: u64,
    frames: u64,
    cfg: TransferConfig,
    corrupt: bool,
}

/// Fails fast when the receiver already gave up (it replies early only to
/// refuse) or went silent for a lease.
fn check_receiver(outcome: &mut oneshot::Receiver<Result<pb::KvReply>>) -> Result<()> {
    use oneshot::error::TryRecvError;
    match outcome.try_recv() {
        Err(TryRecvError::Empty) => Ok(()),
        Ok(Ok(reply)) => match layout::done(Some(reply)) {
            Err(e) => Err(e),
            Ok(_) => Err(KvTransferError::Protocol(
                "the receiver confirmed before the end".into(),
            )),
        },
        Ok(Err(e)) => Err(e),
        Err(TryRecvError::Closed) => Err(KvTransferError::PeerGone(
            "the receiver already ended the transfer".into(),
        )),
    }
}

impl NcclSender {
    /// Test hook: the next block's payload gets one bit flipped after its
    /// checksum is computed (what a bad link or memory would do).
    #[doc(hidden)]
    pub fn corrupt_next_frame(&mut self) {
        self.corrupt = true;
    }
}

impl KvSender for NcclSender {
    async fn send_layer_blocks(&mut self, layer: u32, blocks: &[BlockRegion<'_>]) -> Result<()> {
        check_receiver(&mut self.outcome)?;
        self.host.clear();
        self.spans.clear();
        self.headers.clear();
        for b in blocks {
            check_region(&self.layout, b)?;
            let at = self.host.len();
            let crc = encode_payload_vec(
                &self.layout,
                b.data,
                b.slots as usize,
                frame_seed(layer, b.block, b.slots),
                &mut self.host,
            );
            let len = self.host.len() - at;
            if std::mem::take(&mut self.corrupt) {
                self.host[at + len - 1] ^= 0x01;
            }
            let h = FrameHeader::block(layer, b.block, b.slots, self.request_id, len as u32, crc);
            self.headers.extend_from_slice(&h.encode());
            self.spans.push((at, len));
            self.frames += 1;
        }
        if self.spans.is_empty() {
            return Ok(());
        }
        // Headers first: the receiver posts each receive when it reads the
        // block's header.
        {
            use tokio::io::AsyncWriteExt;
            let mut w = self.writer.lock().await;
            let headers = &self.headers;
            with_deadline("frame write", self.cfg.io_timeout, async {
                w.write_all(headers).await.map_err(io_err)
            })
            .await?;
        }
        let outcome = &mut self.outcome;
        self.plane
            .send(&self.host, &self.spans, self.cfg.io_timeout, || {
                check_receiver(outcome)
            })
            .await
    }

    async fn finish(mut self) -> Result<TransferSummary> {
        let end = self.frames.to_le_bytes();
        {
            let mut w = self.writer.lock().await;
            write_control(&mut *w, FrameKind::End, self.request_id, &end, &self.cfg).await?;
        }
        // The listening task bounds this wait: every read has the lease.
        let reply = (&mut self.outcome)
            .await
            .map_err(|_| KvTransferError::PeerGone("no final reply".into()))??;
        drop(self.heartbeats);
        layout::done(Some(reply))
    }
}

/// Server side: accepts NCCL transfers. The control connection is a
/// [`TcpKvListener`]'s (same handshake and refusals); each accepted
/// transfer then joins its own two-rank communicator on this listener's GPU.
pub struct NcclKvListener {
    tcp: TcpKvListener,
    gpu: Gpu,
}

impl NcclKvListener {
    /// Binds the control port and opens GPU `device` (a machine without a
    /// usable GPU or NCCL fails here).
    pub async fn bind(addr: SocketAddr, cfg: ReceiverConfig, device: usize) -> Result<Self> {
        let gpu = Gpu::open(device)?;
        Ok(Self {
            tcp: TcpKvListener::bind(addr, cfg).await?,
            gpu,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Waits for a connection, runs its handshake and joins its
    /// communicator. As with TCP, servers with many peers should use
    /// [`NcclKvListener::accept_connection`] and finish on a task of their own.
    pub async fn accept(&self) -> Result<KvReceiver> {
        self.accept_connection().await?.handshake().await
    }

    /// Waits for a connection only; the rest is [`NcclPendingKv::handshake`].
    pub async fn accept_connection(&self) -> Result<NcclPendingKv> {
        Ok(NcclPendingKv {
            tcp: self.tcp.accept_connection().await?,
            gpu: self.gpu.clone(),
        })
    }
}

/// An accepted connection whose handshake and communicator are not set up yet.
pub struct NcclPendingKv {
    tcp: PendingKv,
    gpu: Gpu,
}

impl NcclPendingKv {
    /// Verifies the handshake (as TCP does), then negotiates the data plane
    /// and joins the communicator, each under the I/O deadline. A peer this
    /// side cannot serve (same GPU, NCCL failure) is told why.
    pub async fn handshake(self) -> Result<KvReceiver> {
        let KvReceiver {
            handshake,
            cfg,
            inner,
        } = self.tcp.handshake().await?;
        let ReceiverInner::Tcp(TcpIncoming {
            mut reader,
            writer,
            request_id,
            ..
        }) = inner
        else {
            return Err(KvTransferError::Protocol(
                "the control connection is not TCP".into(),
            ));
        };
        let gpu = self.gpu;
        let plane = async {
            let (_, hello) = read_control(&mut reader, FrameKind::DataPlane, &cfg).await?;
            check_plane_version(&hello, 1 + UUID_LEN)?;
            if hello[1..] == gpu.uuid {
                return Err(KvTransferError::Cuda(format!(
                    "the sender uses this receiver's GPU (device {}): NCCL cannot put both \
                     ranks on one device; use distinct GPUs, or the TCP transport",
                    gpu.ctx.ordinal()
                )));
            }
            let id = nccl_result::get_uniqueid()
                .map_err(|e| nccl_err("creating the NCCL unique id", e.0, std::ptr::null_mut()))?;
            let mut msg = vec![PLANE_VERSION];
            msg.extend(id.internal.iter().map(|&c| c as u8));
            {
                let mut w = writer.lock().await;
                write_control(&mut *w, FrameKind::DataPlane, request_id, &msg, &cfg).await?;
            }
            Plane::join(&gpu, id, RECEIVER_RANK, SENDER_RANK, cfg.io_timeout).await
        }
        .await;
        match plane {
            Ok(plane) => Ok(KvReceiver {
                handshake,
                cfg,
                inner: ReceiverInner::Nccl(NcclIncoming {
                    reader,
                    writer,
                    request_id,
                    plane,
                }),
            }),
            Err(e) => {
                // Best effort: the sender may already be waiting on NCCL.
                let mut w = writer.lock().await;
                let reply = layout::refusal(&e).encode_to_vec();
                let _ = write_control(&mut *w, FrameKind::Reply, request_id, &reply, &cfg).await;
                Err(e)
            }
        }
    }
}

pub(crate) struct NcclIncoming {
    reader: BufReader<OwnedReadHalf>,
    writer: Writer,
    request_id: u64,
    plane: Plane,
}

impl NcclIncoming {
    pub(crate) async fn receive<S: KvSink + ?Sized>(
        mut self,
        layout: KvLayout,
        tokens: u64,
        cfg: &TransferConfig,
        sink: &mut S,
    ) -> Result<TransferSummary> {
        let mut asm = Assembler::new(layout, tokens, sink);
        let heartbeats = Heartbeats::start(self.writer.clone(), self.request_id, cfg.clone());
        let r = Self::frames(&mut self.reader, &mut self.plane, &mut asm, cfg).await;
        drop(heartbeats);
        tell_sender(&self.writer, &r, cfg).await;
        r
    }

    async fn frames<S: KvSink + ?Sized>(
        r: &mut BufReader<OwnedReadHalf>,
        plane: &mut Plane,
        asm: &mut Assembler<'_, S>,
        cfg: &TransferConfig,
    ) -> Result<TransferSummary> {
        let l = *asm.layout();
        loop {
            let h = next_header(r, cfg.lease, "sender").await?;
            match h.kind {
                FrameKind::Block => {
                    let slots = h.slots as usize;
                    if slots == 0
                        || slots > l.block_size
                        || h.byte_len as usize != payload_len(&l, slots)
                    {
                        return Err(KvTransferError::Protocol(format!(
                            "block header of {} bytes for {slots} slots",
                            h.byte_len
                        )));
                    }
                    // Refuse a block we have no room for before receiving it.
                    asm.dest(h.layer, h.block, h.slots)?;
                    let bytes = plane.recv(h.byte_len as usize, cfg.io_timeout).await?;
                    asm.block(h.layer, h.block, h.slots, h.crc, bytes)?;
                }
                FrameKind::End => {
                    if h.byte_len != 8 {
                        return Err(KvTransferError::Protocol("bad End frame".into()));
                    }
                    let n = read_control_payload(r, &h, cfg).await?;
                    let n: [u8; 8] = n.as_slice().try_into().expect("length checked");
                    return asm.finish(u64::from_le_bytes(n));
                }
                k => {
                    return Err(KvTransferError::Protocol(format!(
                        "unexpected {k:?} frame during a transfer"
                    )))
                }
            }
        }
    }
}

/// Runs a one-rank NCCL communicator on `device` and sends `payload` to
/// itself through it (send and receive in one group), returning what
/// arrived. The check a single-GPU machine can make of the NCCL data path:
/// library, communicator, device buffers and the send/recv kernels.
pub async fn single_rank_round_trip(
    device: usize,
    payload: &[u8],
    after: Duration,
) -> Result<Vec<u8>> {
    if payload.is_empty() {
        return Ok(Vec::new());
    }
    let gpu = Gpu::open(device)?;
    let id = nccl_result::get_uniqueid()
        .map_err(|e| nccl_err("creating the NCCL unique id", e.0, std::ptr::null_mut()))?;
    let mut comm = Comm::join(&gpu, id, 0, 1, after).await?;
    let stream = gpu.ctx.new_stream().or_cuda("creating a CUDA stream")?;
    let src = stream
        .clone_htod(payload)
        .or_cuda("copying to the device")?;
    // SAFETY: fully written by the receive before it is read.
    let mut dst = unsafe { stream.alloc::<u8>(payload.len()) }.or_cuda("allocating")?;
    let len = payload.len();
    let cu_stream = stream.cu_stream() as nccl_sys::cudaStream_t;
    gpu.ctx
        .bind_to_thread()
        .or_cuda("binding the CUDA context")?;
    nccl_result::group_start().map_err(|e| nccl_err("ncclGroupStart", e.0, comm.0))?;
    let (send, recv) = {
        let (sp, _read) = src.device_ptr(&stream);
        let (dp, _write) = dst.device_ptr_mut(&stream);
        // SAFETY: both buffers hold `len` bytes and outlive the wait below.
        unsafe {
            (
                nccl_sys::ncclSend(
                    sp as *const c_void,
                    len,
                    nccl_sys::ncclDataType_t::ncclUint8,
                    0,
                    comm.0,
                    cu_stream,
                ),
                nccl_sys::ncclRecv(
                    dp as *mut c_void,
                    len,
                    nccl_sys::ncclDataType_t::ncclUint8,
                    0,
                    comm.0,
                    cu_stream,
                ),
            )
        }
    };
    let end = nccl_result::group_end();
    nccl_ok("ncclSend", send, comm.0)?;
    nccl_ok("ncclRecv", recv, comm.0)?;
    end.map_err(|e| nccl_err("ncclGroupEnd", e.0, comm.0))?;
    comm.settle("ncclGroupEnd", after).await?;
    let done = gpu.ctx.new_event(None).or_cuda("creating a CUDA event")?;
    done.record(&stream).or_cuda("recording a CUDA event")?;
    poll_until("single-rank NCCL round trip", after, || {
        comm.ready("single-rank NCCL round trip")?;
        done.try_is_complete().or_cuda("waiting for NCCL")
    })
    .await?;
    stream.clone_dtoh(&dst).or_cuda("copying to the host")
}
