//! [`Remote`] over MPI (the `mpi` feature: rsmpi over the system's MPI library, e.g. Open MPI).
//!
//! One rank per pipeline device (rank `d` runs device `d`). Values travel as byte messages with
//! tag `DATA` (standard-mode sends from each destination's forwarding thread, in order), the
//! end marker is an empty `DATA` message a rank sends itself, and the step's results are
//! exchanged by one broadcast per rank. MPI must be initialised with `MPI_THREAD_MULTIPLE`
//! ([`init`]): the worker's forwarding threads, its receiving thread and the main thread all
//! call MPI.

use mpi::collective::CommunicatorCollectives;
use mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::Root;

use crate::remote::Remote;

/// The tag of pipeline values.
const DATA: i32 = 7;

/// An initialised MPI environment; MPI is finalised when it is dropped.
pub struct MpiWorld {
    _universe: mpi::environment::Universe,
    world: SimpleCommunicator,
}

// SAFETY: MPI runs with MPI_THREAD_MULTIPLE (checked in `init`), so the communicator's calls
// may come from any thread at once; the handle itself is never mutated.
unsafe impl Sync for MpiWorld {}
unsafe impl Send for MpiWorld {}

/// Initialises MPI for a pipeline (`None` when this process was not launched by an MPI
/// launcher with more than one rank); an error when the library cannot give
/// `MPI_THREAD_MULTIPLE`.
pub fn init() -> Result<Option<MpiWorld>, String> {
    let launched = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
        .iter()
        .any(|v| std::env::var(v).is_ok());
    if !launched {
        return Ok(None);
    }
    let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Multiple)
        .ok_or("MPI was already initialised")?;
    if threading != mpi::Threading::Multiple {
        return Err(format!(
            "the MPI library gives {threading:?} threading; the pipeline needs Multiple"
        ));
    }
    let world = universe.world();
    if world.size() < 2 {
        return Ok(None);
    }
    Ok(Some(MpiWorld {
        _universe: universe,
        world,
    }))
}

impl Remote for MpiWorld {
    fn device(&self) -> usize {
        self.world.rank() as usize
    }

    fn devices(&self) -> usize {
        self.world.size() as usize
    }

    fn send(&self, device: usize, bytes: Vec<u8>) -> Result<(), String> {
        self.world
            .process_at_rank(device as i32)
            .send_with_tag(&bytes[..], DATA);
        Ok(())
    }

    fn recv(&self) -> Result<Option<Vec<u8>>, String> {
        // Polls instead of blocking in MPI_Recv, which spins a core: on a machine with as many
        // ranks as cores the spinning receiver would take the worker's core.
        loop {
            if let Some(probed) = self
                .world
                .any_process()
                .immediate_matched_probe_with_tag(DATA)
            {
                let (bytes, _) = probed.matched_receive_vec::<u8>();
                return Ok((!bytes.is_empty()).then_some(bytes));
            }
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
    }

    fn end(&self) -> Result<(), String> {
        let empty: [u8; 0] = [];
        self.world
            .process_at_rank(self.world.rank())
            .send_with_tag(&empty[..], DATA);
        Ok(())
    }

    fn barrier(&self) {
        self.world.barrier();
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    fn all_gather(&self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>, String> {
        let mut out = Vec::with_capacity(self.devices());
        for root in 0..self.world.size() {
            let p = self.world.process_at_rank(root);
            let mut len = if root == self.world.rank() {
                bytes.len() as u64
            } else {
                0
            };
            p.broadcast_into(&mut len);
            let mut buf = if root == self.world.rank() {
                bytes.clone()
            } else {
                vec![0u8; len as usize]
            };
            p.broadcast_into(&mut buf[..]);
            out.push(buf);
        }
        Ok(out)
    }
}
