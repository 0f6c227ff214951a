//! Pipeline devices in other processes: the transport a [`crate::pipeline::Pipeline`] step uses
//! when each device is its own process ([`Remote`]), and the wire format of what crosses it.
//!
//! One process runs one device's worker. Values for a device in another process leave through
//! [`Remote::send`] (from a forwarding thread per destination, in the order the worker produced
//! them) and arrive through [`Remote::recv`] (a receiving thread that feeds the worker's own
//! channel), so the worker is the same code as with threads. After the step, every process
//! hands its results to all the others ([`Remote::all_gather`]), so each holds the whole step
//! result, as one process running every device would.
//!
//! `cleave-runtime`'s `mpi` feature implements it over MPI (`mpi_remote`).

use crate::HostData;

/// The transport between the processes of a pipeline (one device each).
pub trait Remote: Sync {
    /// The device this process runs.
    fn device(&self) -> usize;
    /// The number of processes (devices).
    fn devices(&self) -> usize;
    /// Sends one encoded message to `device`'s process.
    fn send(&self, device: usize, bytes: Vec<u8>) -> Result<(), String>;
    /// Blocks for the next message sent to this process; `None` is the end marker that
    /// [`Remote::end`] sends.
    fn recv(&self) -> Result<Option<Vec<u8>>, String>;
    /// Sends this process the end marker (its receiving thread stops on it).
    fn end(&self) -> Result<(), String>;
    /// Every process's `bytes`, by device (a collective: every process calls it).
    fn all_gather(&self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>, String>;
    /// Waits for every process (so that their step clocks start together).
    fn barrier(&self);
    /// Ends every process of the job at once (after this one's error is printed): the others
    /// may be waiting for values this one will never send.
    fn abort(&self, code: i32) -> !;
}

/// Appends a length-prefixed string.
pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends a tensor: its element type, length and little-endian elements.
pub(crate) fn put_data(out: &mut Vec<u8>, d: &HostData) {
    match d {
        HostData::F32(v) => {
            out.push(0);
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for x in v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        HostData::I32(v) => {
            out.push(1);
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for x in v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        HostData::Bool(v) => {
            out.push(2);
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            out.extend(v.iter().map(|&b| b as u8));
        }
        HostData::BF16(v) => {
            out.push(3);
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for x in v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        HostData::I8(v) => {
            out.push(4);
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            out.extend(v.iter().map(|&x| x as u8));
        }
        HostData::F16(v) => {
            out.push(5);
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for x in v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

pub(crate) fn put_u64(out: &mut Vec<u8>, x: u64) {
    out.extend_from_slice(&x.to_le_bytes());
}

/// Reads what the `put_*` functions wrote, in order.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("a message of {} bytes ends early", self.bytes.len()))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    pub(crate) fn done(&self) -> bool {
        self.at == self.bytes.len()
    }

    pub(crate) fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    pub(crate) fn str(&mut self) -> Result<String, String> {
        let n = self.u64()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|e| e.to_string())
    }

    pub(crate) fn data(&mut self) -> Result<HostData, String> {
        let kind = self.take(1)?[0];
        let n = self.u64()? as usize;
        Ok(match kind {
            0 => HostData::F32(
                self.take(n.checked_mul(4).ok_or("too long")?)?
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect(),
            ),
            1 => HostData::I32(
                self.take(n.checked_mul(4).ok_or("too long")?)?
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect(),
            ),
            2 => HostData::Bool(self.take(n)?.iter().map(|&b| b != 0).collect()),
            3 => HostData::BF16(
                self.take(n.checked_mul(2).ok_or("too long")?)?
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            4 => HostData::I8(self.take(n)?.iter().map(|&b| b as i8).collect()),
            5 => HostData::F16(
                self.take(n.checked_mul(2).ok_or("too long")?)?
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            other => return Err(format!("unknown element type {other} in a message")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut out = Vec::new();
        put_u64(&mut out, 7);
        put_str(&mut out, "act.x");
        put_data(&mut out, &HostData::F32(vec![1.5, -2.0]));
        put_data(&mut out, &HostData::I32(vec![3]));
        put_data(&mut out, &HostData::Bool(vec![true, false]));
        put_data(&mut out, &HostData::BF16(vec![0x3fc0, 0xffff]));
        put_data(&mut out, &HostData::I8(vec![-128, 0, 127]));
        put_data(&mut out, &HostData::F16(vec![0x3c00, 0x7e00]));
        let mut r = Reader::new(&out);
        assert_eq!(r.u64().unwrap(), 7);
        assert_eq!(r.str().unwrap(), "act.x");
        assert_eq!(r.data().unwrap(), HostData::F32(vec![1.5, -2.0]));
        assert_eq!(r.data().unwrap(), HostData::I32(vec![3]));
        assert_eq!(r.data().unwrap(), HostData::Bool(vec![true, false]));
        assert_eq!(r.data().unwrap(), HostData::BF16(vec![0x3fc0, 0xffff]));
        assert_eq!(r.data().unwrap(), HostData::I8(vec![-128, 0, 127]));
        assert_eq!(r.data().unwrap(), HostData::F16(vec![0x3c00, 0x7e00]));
        assert!(r.done());
        assert!(Reader::new(&out[..5]).u64().is_err());
    }
}
