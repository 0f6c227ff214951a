//! Running a whole [`GpuFunction`] (what `cleave compile --target cuda` writes as `kernels.json`)
//! on one device: one buffer per named value, the groups' launches in order on the compute stream,
//! then their device-to-device copies. Constants are uploaded once; function arguments are
//! uploaded on every run; outputs are read back by name.
//!
//! GEMM groups run their MLIR kernel here; calling cuBLAS with [`GpuKernelGroup::gemm`] instead
//! (the design's default) is not wired into this runner yet.

use std::collections::{BTreeMap, HashMap};

use cleave_ir::{DType, Tensor};

use super::{CudaError, Device, DeviceTensor, LoadedKernel, Result};
use crate::gpu_kernel::{ArgRole, GpuFunction, KernelArg};

fn dtype_of(a: &KernelArg) -> Result<DType> {
    DType::from_name(&a.dtype).ok_or_else(|| {
        CudaError::Invalid(format!(
            "buffer `{}`: unknown element type `{}`",
            a.name, a.dtype
        ))
    })
}

fn constant(a: &KernelArg, dtype: DType) -> Tensor {
    let shape = a.shape.clone();
    match dtype {
        DType::Bool => Tensor::from_bool(shape, a.data.iter().map(|&x| x != 0.0).collect()),
        d if d.is_float() => Tensor::from_float(d, shape, a.data.clone()),
        d => Tensor::from_i64(d, shape, a.data.iter().map(|&x| x as i64).collect()),
    }
}

/// A [`GpuFunction`] loaded on a device, with its buffers.
pub struct GpuRunner<'d> {
    dev: &'d Device,
    func: GpuFunction,
    /// Per group, its loaded launches.
    kernels: Vec<Vec<LoadedKernel>>,
    /// Buffers by name; scratch buffers are keyed `g<group>/<name>`.
    bufs: HashMap<String, DeviceTensor>,
}

impl<'d> GpuRunner<'d> {
    /// Loads every kernel and allocates every buffer (constants uploaded).
    pub fn new(dev: &'d Device, func: GpuFunction) -> Result<GpuRunner<'d>> {
        let mut bufs: HashMap<String, DeviceTensor> = HashMap::new();
        let mut kernels = Vec::new();
        for a in &func.args {
            bufs.insert(a.name.clone(), dev.zeros(dtype_of(a)?, &a.shape)?);
        }
        for (g, group) in func.groups.iter().enumerate() {
            let mut loaded = Vec::new();
            for k in &group.launches {
                for a in &k.args {
                    let key = Self::key(g, a);
                    if bufs.contains_key(&key) {
                        continue;
                    }
                    let dtype = dtype_of(a)?;
                    let t = if a.role == ArgRole::Constant {
                        dev.upload(&constant(a, dtype))?
                    } else {
                        dev.zeros(dtype, &a.shape)?
                    };
                    bufs.insert(key, t);
                }
                loaded.push(dev.load(k)?);
            }
            for (from, to) in &group.copies {
                let Some(src) = bufs.get(from) else {
                    return Err(CudaError::Invalid(format!(
                        "group `{}` copies `{from}` to `{to}`, but no kernel or argument defines \
                         `{from}`",
                        group.name
                    )));
                };
                // A value that is a plain copy of another has no kernel: its buffer is made here.
                if !bufs.contains_key(to) {
                    let (dtype, shape) = (src.dtype, src.shape.clone());
                    bufs.insert(to.clone(), dev.zeros(dtype, &shape)?);
                }
            }
            kernels.push(loaded);
        }
        for (out, buf) in &func.outputs {
            if !bufs.contains_key(buf) {
                return Err(CudaError::Invalid(format!(
                    "output `{out}` reads buffer `{buf}`, which nothing defines"
                )));
            }
        }
        Ok(GpuRunner {
            dev,
            func,
            kernels,
            bufs,
        })
    }

    fn key(group: usize, a: &KernelArg) -> String {
        if a.role == ArgRole::Scratch {
            format!("g{group}/{}", a.name)
        } else {
            a.name.clone()
        }
    }

    /// The function's outputs, in order: `(output name, buffer name)`.
    pub fn outputs(&self) -> &[(String, String)] {
        &self.func.outputs
    }

    /// Uploads `inputs` (every argument of the function, by name), runs every group and returns
    /// the outputs by name.
    pub fn run(&mut self, inputs: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
        for a in &self.func.args {
            let t = inputs
                .get(&a.name)
                .ok_or_else(|| CudaError::Invalid(format!("no value for argument `{}`", a.name)))?;
            if t.shape != a.shape || t.dtype.name() != a.dtype {
                return Err(CudaError::Invalid(format!(
                    "argument `{}`: expected {}{:?}, got {}{:?}",
                    a.name, a.dtype, a.shape, t.dtype, t.shape
                )));
            }
            let fresh = self.dev.upload(t)?;
            self.bufs.insert(a.name.clone(), fresh);
        }
        for (g, group) in self.func.groups.iter().enumerate() {
            for (k, loaded) in group.launches.iter().zip(&self.kernels[g]) {
                let args: Vec<&DeviceTensor> = k
                    .args
                    .iter()
                    .map(|a| &self.bufs[&Self::key(g, a)])
                    .collect();
                self.dev.launch(loaded, &args)?;
            }
            for (from, to) in &group.copies {
                let mut dst = self.bufs.remove(to).expect("checked in new");
                let r = self.dev.copy_d2d(&self.bufs[from].buf, &mut dst.buf);
                self.bufs.insert(to.clone(), dst);
                r?;
            }
        }
        self.dev.synchronize()?;
        let mut out = BTreeMap::new();
        for (name, buf) in &self.func.outputs {
            out.insert(name.clone(), self.dev.download(&self.bufs[buf])?);
        }
        Ok(out)
    }
}
