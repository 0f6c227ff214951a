//! NCCL between the processes of a GPU pipeline (feature `nccl`; cudarc loads `libnccl.so` at
//! run time, so building needs no NCCL).
//!
//! One two-rank communicator per **ordered pair** of devices, each on a stream of its own. NCCL
//! matches a pair's sends and receives in the order each side posts them, and operations on one
//! communicator run in order on its stream; with one communicator for all traffic, a send from
//! A to B posted before A's receive from B, and the same on B, would wait for each other forever.
//! With one communicator per direction each stream carries one direction between two devices:
//! the sender posts its sends in order, the receiver its receives in the same order (the order of
//! the headers the caller sends beside them), and nothing else queues in between.
//!
//! Set-up ([`PairLinks::connect`]): rank 0 draws one unique id per ordered pair, the caller hands
//! rank 0's bytes to every rank (an MPI broadcast), and every rank joins its pairs' communicators
//! in one global order, so that the blocking joins cannot wait on each other in a cycle.

use std::collections::BTreeMap;

use cudarc::nccl::safe::{Comm, Id};

use super::{CudaError, Device, DeviceTensor, Result};

/// Whether NCCL can be loaded.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn nccl(context: &str, e: cudarc::nccl::result::NcclError) -> CudaError {
    CudaError::Driver {
        context: format!("NCCL: {context}"),
        message: format!("{e:?}"),
    }
}

/// Bytes of one NCCL unique id.
const ID_BYTES: usize = 128;

/// This process's NCCL communicators with every other device, one per direction.
pub struct PairLinks {
    me: usize,
    /// `(from, to)` → its communicator (rank 0 is `from`).
    comms: BTreeMap<(usize, usize), Comm>,
}

impl PairLinks {
    /// Joins the communicators of device `me` of `devices` on `dev`; `share` gives every rank
    /// the bytes rank 0 passes it (rank 0's unique ids; the others pass nothing).
    pub fn connect(
        dev: &Device,
        me: usize,
        devices: usize,
        share: impl FnOnce(Vec<u8>) -> std::result::Result<Vec<u8>, String>,
    ) -> Result<PairLinks> {
        if !nccl_present() {
            return Err(CudaError::NoDriver {
                what: "NCCL",
                lib: "libnccl.so",
            });
        }
        let pairs: Vec<(usize, usize)> = (0..devices)
            .flat_map(|a| (0..devices).filter(move |&b| b != a).map(move |b| (a, b)))
            .collect();
        let mut mine = Vec::new();
        if me == 0 {
            for _ in &pairs {
                let id = Id::new().map_err(|e| nccl("unique id", e))?;
                mine.extend(id.internal().iter().map(|&c| c as u8));
            }
        }
        let ids = share(mine).map_err(|e| CudaError::Invalid(format!("sharing NCCL ids: {e}")))?;
        if ids.len() != ID_BYTES * pairs.len() {
            return Err(CudaError::Invalid(format!(
                "{} bytes of NCCL ids for {} device pairs",
                ids.len(),
                pairs.len()
            )));
        }
        let mut comms = BTreeMap::new();
        for (i, &(a, b)) in pairs.iter().enumerate() {
            if me != a && me != b {
                continue;
            }
            let mut internal = [0 as std::ffi::c_char; ID_BYTES];
            for (c, &x) in internal
                .iter_mut()
                .zip(&ids[i * ID_BYTES..(i + 1) * ID_BYTES])
            {
                *c = x as std::ffi::c_char;
            }
            let stream = super::drv("create NCCL stream", dev.ctx.new_stream())?;
            let rank = usize::from(me == b);
            let comm = Comm::from_rank(stream, rank, 2, Id::uninit(internal))
                .map_err(|e| nccl(&format!("join the communicator {a}→{b}"), e))?;
            comms.insert((a, b), comm);
        }
        Ok(PairLinks { me, comms })
    }

    fn comm(&self, pair: (usize, usize)) -> Result<&Comm> {
        self.comms.get(&pair).ok_or_else(|| {
            CudaError::Invalid(format!("no NCCL communicator {}→{}", pair.0, pair.1))
        })
    }

    /// Posts the send of `t` to device `to` on that direction's stream (returns at once; `t` must
    /// stay alive until [`PairLinks::wait_sends`]).
    pub fn send(&self, to: usize, t: &DeviceTensor) -> Result<()> {
        self.comm((self.me, to))?
            .send(&t.buf, 1)
            .map_err(|e| nccl(&format!("send to device {to}"), e))
    }

    /// Receives the next value device `from` sent into `t` (as large as what was sent) and waits
    /// for it.
    pub fn recv(&self, from: usize, t: &mut DeviceTensor) -> Result<()> {
        let c = self.comm((from, self.me))?;
        c.recv(&mut t.buf, 0)
            .map_err(|e| nccl(&format!("receive from device {from}"), e))?;
        super::drv("wait for an NCCL receive", c.stream().synchronize())
    }

    /// Waits until every send this process posted has completed.
    pub fn wait_sends(&self) -> Result<()> {
        for (_, c) in self.comms.iter().filter(|((a, _), _)| *a == self.me) {
            super::drv("wait for NCCL sends", c.stream().synchronize())?;
        }
        Ok(())
    }
}
