//! NCCL implementation of [`Communicator`] (feature `cuda`): one GPU per
//! rank, the group bootstrapped over the TCP communicator (rank 0 makes the
//! NCCL unique id and hands it to the others), collectives run by NCCL.
//!
//! Buffers are staged through device memory on every call because the
//! engine's activations live in host memory today; the CUDA backend will
//! pass device buffers straight through. Unlike the CPU communicator's
//! rank-order sum, NCCL's all-reduce adds in an order that depends on its
//! algorithm, so sharded logits on GPUs are compared within a tolerance,
//! not bit for bit. NCCL waits are blocking stream synchronisations; a
//! peer that dies is noticed by NCCL itself or by the TCP bootstrap
//! connections, which stay open for the group's life.
//!
//! NCCL refuses two ranks on one GPU: a single-GPU machine can test one
//! rank only.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id};

use crate::comm::{CommConfig, CommError, Communicator, Result, TcpCommunicator};

/// A rank of an NCCL group.
pub struct NcclCommunicator {
    comm: Comm,
    stream: Arc<CudaStream>,
    /// Kept for liveness and for the id exchange.
    _bootstrap: TcpCommunicator,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls
// on it do not overlap; every call here takes `&mut self` (or `&self` for
// plain getters), and the type is not `Sync`.
unsafe impl Send for NcclCommunicator {}

fn cuda(what: &str, e: impl std::fmt::Debug) -> CommError {
    CommError::Setup(format!("{what}: {e:?}"))
}

/// Whether the CUDA driver and NCCL libraries load on this machine.
pub fn available() -> bool {
    // SAFETY: only tries to open the shared libraries.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
}

impl NcclCommunicator {
    /// Forms the group on GPU `device`: the TCP group first (rendezvous,
    /// session check), then NCCL with the id rank 0 made.
    pub fn connect(cfg: &CommConfig, device: usize) -> Result<Self> {
        if !available() {
            return Err(CommError::Setup(
                "the CUDA driver or NCCL library could not be loaded".into(),
            ));
        }
        let mut bootstrap = TcpCommunicator::connect(cfg)?;
        // The 128-byte unique id travels as 32 floats' worth of bytes.
        let mut words = [0f32; 32];
        let id = if cfg.rank == 0 {
            let id = Id::new().map_err(|e| cuda("creating the NCCL id", e))?;
            for (w, c) in words.iter_mut().zip(id.internal().chunks_exact(4)) {
                *w = f32::from_bits(u32::from_le_bytes([
                    c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8,
                ]));
            }
            for r in 1..cfg.world_size {
                bootstrap.send(r, &words)?;
            }
            id
        } else {
            bootstrap.recv(0, &mut words)?;
            let mut raw = [0 as std::ffi::c_char; 128];
            for (c, w) in raw.chunks_exact_mut(4).zip(words) {
                for (d, b) in c.iter_mut().zip(w.to_bits().to_le_bytes()) {
                    *d = b as std::ffi::c_char;
                }
            }
            Id::uninit(raw)
        };
        let ctx = CudaContext::new(device).map_err(|e| cuda("opening the CUDA device", e))?;
        let stream = ctx.default_stream();
        let comm = Comm::from_rank(stream.clone(), cfg.rank, cfg.world_size, id)
            .map_err(|e| cuda("joining the NCCL group", e))?;
        Ok(Self {
            comm,
            stream,
            _bootstrap: bootstrap,
        })
    }

    fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream
            .clone_htod(data)
            .map_err(|e| cuda("copying to the device", e))
    }

    fn download(&self, src: &CudaSlice<f32>, out: &mut [f32]) -> Result<()> {
        self.stream
            .memcpy_dtoh(src, out)
            .map_err(|e| cuda("copying to the host", e))?;
        self.stream
            .synchronize()
            .map_err(|e| cuda("waiting for the device", e))
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream
            .alloc_zeros(n)
            .map_err(|e| cuda("allocating device memory", e))
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        if out.len() != local.len() * self.world_size() {
            return Err(CommError::Usage(format!(
                "all_gather of {} floats over {} ranks into {}",
                local.len(),
                self.world_size(),
                out.len()
            )));
        }
        let send = self.upload(local)?;
        let mut recv = self.zeros(out.len())?;
        self.comm
            .all_gather(&send, &mut recv)
            .map_err(|e| cuda("ncclAllGather", e))?;
        self.download(&recv, out)
    }

    fn send(&mut self, to: usize, data: &[f32]) -> Result<()> {
        let buf = self.upload(data)?;
        self.comm
            .send(&buf, to as i32)
            .map_err(|e| cuda("ncclSend", e))?;
        self.stream
            .synchronize()
            .map_err(|e| cuda("waiting for the device", e))
    }

    fn recv(&mut self, from: usize, out: &mut [f32]) -> Result<()> {
        let mut buf = self.zeros(out.len())?;
        self.comm
            .recv(&mut buf, from as i32)
            .map_err(|e| cuda("ncclRecv", e))?;
        self.download(&buf, out)
    }
}
