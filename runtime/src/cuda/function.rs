//! Running a whole [`GpuFunction`] (what `cleave compile --target cuda` writes as `kernels.json`)
//! on one device: one buffer per named value, the groups' launches in order on the compute stream,
//! then their device-to-device copies. Constants are uploaded once; function arguments are
//! uploaded on every run; outputs are read back by name.
//!
//! A group that carries a [`crate::gpu_kernel::GemmSpec`] (one f32 `matmul`) runs as one cuBLAS
//! SGEMM by default ([`GemmMode::Cublas`]); [`GemmMode::Mlir`] runs its MLIR kernel instead.
//!
//! For training, the arguments can stay resident: [`GpuRunner::set_arg`] uploads one argument
//! into its buffer, [`GpuRunner::run_resident`] runs the groups without uploading anything,
//! [`GpuRunner::output`] downloads one output, and [`GpuRunner::carry`] makes every output named
//! like an argument (updated parameters, optimizer state) that argument's value for the next run,
//! on the device (a buffer swap, or a device copy where the output's buffer is another argument).

use std::collections::{BTreeMap, HashMap};

use cleave_ir::{DType, Tensor};

use super::{CudaError, Device, DeviceTensor, LoadedKernel, Result};
use crate::gpu_kernel::{ArgRole, GemmSpec, GpuFunction, KernelArg};

/// How groups with a [`GemmSpec`] run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GemmMode {
    /// One cuBLAS SGEMM (strided-batched for batched products); other element types run the
    /// MLIR kernel.
    #[default]
    Cublas,
    /// The group's MLIR kernel.
    Mlir,
}

/// A GEMM group resolved to buffer names (a constant operand is read from its `.const` buffer).
#[derive(Clone, Debug)]
struct Gemm {
    spec: GemmSpec,
    /// The spec's element type (every buffer's, checked).
    dtype: DType,
    lhs: String,
    rhs: String,
}

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
    /// Per group, the cuBLAS GEMM that replaces its launches.
    gemms: Vec<Option<Gemm>>,
    /// `(output buffer, argument, copy)` of [`GpuRunner::carry`]: `copy` where the buffers
    /// cannot be swapped.
    carries: Vec<(String, String, bool)>,
}

impl<'d> GpuRunner<'d> {
    /// Loads every kernel and allocates every buffer (constants uploaded); GEMM groups run on
    /// cuBLAS.
    pub fn new(dev: &'d Device, func: GpuFunction) -> Result<GpuRunner<'d>> {
        Self::with_gemm(dev, func, GemmMode::Cublas)
    }

    /// [`GpuRunner::new`] with a choice of how GEMM groups run.
    pub fn with_gemm(dev: &'d Device, func: GpuFunction, mode: GemmMode) -> Result<GpuRunner<'d>> {
        let mut bufs: HashMap<String, DeviceTensor> = HashMap::new();
        let mut kernels = Vec::new();
        let mut gemms = Vec::new();
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
            }
            let gemm = match (&group.gemm, mode) {
                (Some(spec), GemmMode::Cublas)
                    if matches!(spec.dtype.as_str(), "f32" | "bf16" | "f16") =>
                {
                    Some(Self::resolve_gemm(&group.name, spec, &bufs)?)
                }
                _ => None,
            };
            if gemm.is_none() {
                for k in &group.launches {
                    loaded.push(dev.load(k)?);
                }
            }
            gemms.push(gemm);
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
        // Carries: outputs named like an argument.
        let mut carries = Vec::new();
        for (out, buf) in &func.outputs {
            let Some(arg) = func.args.iter().find(|a| &a.name == out) else {
                continue;
            };
            if buf == &arg.name {
                continue;
            }
            let (src, dst) = (&bufs[buf], &bufs[&arg.name]);
            if src.dtype != dst.dtype || src.buf.len() != dst.buf.len() {
                return Err(CudaError::Invalid(format!(
                    "output `{out}` ({}{:?}) cannot carry into argument `{out}` ({}{:?})",
                    src.dtype, src.shape, dst.dtype, dst.shape
                )));
            }
            // A buffer that is another argument, a constant, or carried twice is copied.
            let copy = func.args.iter().any(|a| &a.name == buf)
                || buf.ends_with(".const")
                || carries.iter().any(|(b, _, _)| b == buf);
            carries.push((buf.clone(), arg.name.clone(), copy));
        }
        Ok(GpuRunner {
            dev,
            func,
            kernels,
            bufs,
            gemms,
            carries,
        })
    }

    /// Checks a GEMM's buffers: names, element type and sizes.
    fn resolve_gemm(
        group: &str,
        spec: &GemmSpec,
        bufs: &HashMap<String, DeviceTensor>,
    ) -> Result<Gemm> {
        let dtype = DType::from_name(&spec.dtype).ok_or_else(|| {
            CudaError::Invalid(format!(
                "GEMM of group `{group}`: unknown element type `{}`",
                spec.dtype
            ))
        })?;
        let find = |name: &str, numel: usize, what: &str| -> Result<String> {
            let key = [name.to_string(), format!("{name}.const")]
                .into_iter()
                .find(|k| bufs.contains_key(k))
                .ok_or_else(|| {
                    CudaError::Invalid(format!(
                        "GEMM of group `{group}`: its {what} `{name}` has no buffer"
                    ))
                })?;
            let t = &bufs[&key];
            let n: usize = t.shape.iter().product();
            if t.dtype != dtype || n != numel {
                return Err(CudaError::Invalid(format!(
                    "GEMM of group `{group}`: its {what} `{name}` is {}{:?}, expected {numel} \
                     {dtype} elements",
                    t.dtype, t.shape
                )));
            }
            Ok(key)
        };
        let (b, m, n, k) = (spec.batch, spec.m, spec.n, spec.k);
        let lhs = find(&spec.lhs, b * m * k, "left operand")?;
        let rhs = find(&spec.rhs, b * k * n, "right operand")?;
        let out = find(&spec.out, b * m * n, "result")?;
        if out != spec.out {
            return Err(CudaError::Invalid(format!(
                "GEMM of group `{group}`: its result `{}` is a constant",
                spec.out
            )));
        }
        Ok(Gemm {
            spec: spec.clone(),
            dtype,
            lhs,
            rhs,
        })
    }

    /// Runs a GEMM group on cuBLAS.
    fn run_gemm(&self, g: &Gemm) -> Result<()> {
        let s = &g.spec;
        let (m, n, k) = (s.m, s.n, s.k);
        let stream = self.dev.compute_stream();
        // Row-major views of the stored operands (see `Device::sgemm`).
        let a = super::GemmOperand {
            ptr: self.bufs[&g.lhs].ptr(stream),
            rs: if s.transpose_lhs { 1 } else { k },
            cs: if s.transpose_lhs { m } else { 1 },
        };
        let b = super::GemmOperand {
            ptr: self.bufs[&g.rhs].ptr(stream),
            rs: if s.transpose_rhs { 1 } else { n },
            cs: if s.transpose_rhs { k } else { 1 },
        };
        let c = self.bufs[&s.out].ptr(stream);
        // SAFETY: `resolve_gemm` checked every buffer holds exactly the elements of the GEMM's
        // type that the product reads or writes.
        unsafe {
            self.dev.gemm(
                g.dtype,
                (m, k, n),
                a,
                b,
                c,
                n,
                false,
                (s.batch, m * k, k * n, m * n),
            )
        }
    }

    /// How many groups run on cuBLAS.
    pub fn cublas_groups(&self) -> usize {
        self.gemms.iter().filter(|g| g.is_some()).count()
    }

    /// Kernel groups, and PTX launches per run (groups on cuBLAS launch none).
    pub fn counts(&self) -> (usize, usize) {
        let launches = self.kernels.iter().map(|k| k.len()).sum();
        (self.func.groups.len(), launches)
    }

    /// Bytes of device memory the runner's buffers hold.
    pub fn device_bytes(&self) -> usize {
        self.bufs.values().map(|t| t.buf.len()).sum()
    }

    /// Uploads one argument into its (resident) buffer.
    pub fn set_arg(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let a = self
            .func
            .args
            .iter()
            .find(|a| a.name == name)
            .ok_or_else(|| CudaError::Invalid(format!("the function has no argument `{name}`")))?;
        if t.shape != a.shape || t.dtype.name() != a.dtype {
            return Err(CudaError::Invalid(format!(
                "argument `{}`: expected {}{:?}, got {}{:?}",
                a.name, a.dtype, a.shape, t.dtype, t.shape
            )));
        }
        let bytes = super::tensor_bytes(t)?;
        let dst = self
            .bufs
            .get_mut(name)
            .expect("every argument has a buffer");
        self.dev.upload_bytes(&mut dst.buf, 0, &bytes)
    }

    /// Runs every group on the compute stream with the arguments' current (resident) values;
    /// does not wait for the GPU.
    pub fn run_resident(&mut self) -> Result<()> {
        for g in 0..self.func.groups.len() {
            self.run_group(g)?;
        }
        Ok(())
    }

    /// Runs group `g`'s GEMM or launches, then its copies.
    fn run_group(&mut self, g: usize) -> Result<()> {
        let group = &self.func.groups[g];
        if let Some(gemm) = &self.gemms[g] {
            self.run_gemm(gemm)?;
        } else {
            for (k, loaded) in group.launches.iter().zip(&self.kernels[g]) {
                let args: Vec<&DeviceTensor> = k
                    .args
                    .iter()
                    .map(|a| &self.bufs[&Self::key(g, a)])
                    .collect();
                self.dev.launch(loaded, &args)?;
            }
        }
        for (from, to) in &group.copies {
            let mut dst = self.bufs.remove(to).expect("checked in new");
            let r = self.dev.copy_d2d(&self.bufs[from].buf, &mut dst.buf);
            self.bufs.insert(to.clone(), dst);
            r?;
        }
        Ok(())
    }

    /// Runs every group like [`GpuRunner::run_resident`], timing each with CUDA events:
    /// `(group name, its ops, milliseconds, whether it ran on cuBLAS)` in execution order.
    pub fn run_profiled(&mut self) -> Result<Vec<(String, String, f32, bool)>> {
        let mut events = Vec::new();
        for _ in 0..=self.func.groups.len() {
            events.push(self.dev.event()?);
        }
        self.dev.record(&events[0])?;
        for g in 0..self.func.groups.len() {
            self.run_group(g)?;
            self.dev.record(&events[g + 1])?;
        }
        let mut out = Vec::new();
        for (g, group) in self.func.groups.iter().enumerate() {
            let ms = self.dev.elapsed_ms(&events[g], &events[g + 1])?;
            out.push((
                group.name.clone(),
                group.ops.join(","),
                ms,
                self.gemms[g].is_some(),
            ));
        }
        Ok(out)
    }

    /// Downloads output `name` (waits for the compute stream).
    pub fn output(&self, name: &str) -> Result<Tensor> {
        let (_, buf) = self
            .func
            .outputs
            .iter()
            .find(|(o, _)| o == name)
            .ok_or_else(|| CudaError::Invalid(format!("the function has no output `{name}`")))?;
        self.dev.download(&self.bufs[buf])
    }

    /// Downloads argument `name`'s current value (waits for the compute stream).
    pub fn arg(&self, name: &str) -> Result<Tensor> {
        if !self.func.args.iter().any(|a| a.name == name) {
            return Err(CudaError::Invalid(format!(
                "the function has no argument `{name}`"
            )));
        }
        self.dev.download(&self.bufs[name])
    }

    /// Makes every output named like an argument that argument's value, on the device: the
    /// buffers are swapped (an intermediate's buffer is rewritten before it is read on the next
    /// run), or copied where the output's buffer is another argument or a constant.
    pub fn carry(&mut self) -> Result<()> {
        // Copies first: they read buffers a swap would change.
        let order = self
            .carries
            .iter()
            .filter(|c| c.2)
            .chain(self.carries.iter().filter(|c| !c.2));
        for (buf, arg, copy) in order {
            if *copy {
                let mut dst = self.bufs.remove(arg).expect("checked in new");
                let r = self.dev.copy_d2d(&self.bufs[buf].buf, &mut dst.buf);
                self.bufs.insert(arg.clone(), dst);
                r?;
            } else {
                let mut a = self.bufs.remove(arg).expect("checked in new");
                let b = self.bufs.get_mut(buf).expect("checked in new");
                std::mem::swap(&mut a.buf, &mut b.buf);
                self.bufs.insert(arg.clone(), a);
            }
        }
        Ok(())
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
        for a in self.func.args.clone() {
            let t = inputs
                .get(&a.name)
                .ok_or_else(|| CudaError::Invalid(format!("no value for argument `{}`", a.name)))?;
            if t.shape != a.shape || t.dtype.name() != a.dtype {
                return Err(CudaError::Invalid(format!(
                    "argument `{}`: expected {}{:?}, got {}{:?}",
                    a.name, a.dtype, a.shape, t.dtype, t.shape
                )));
            }
            self.set_arg(&a.name, t)?;
        }
        self.run_resident()?;
        self.dev.synchronize()?;
        let mut out = BTreeMap::new();
        for (name, buf) in &self.func.outputs {
            out.insert(name.clone(), self.dev.download(&self.bufs[buf])?);
        }
        Ok(out)
    }
}
