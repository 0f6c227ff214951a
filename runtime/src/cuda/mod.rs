//! The CUDA runtime (feature `cuda`): device, buffers, PTX modules, launches, cuBLAS GEMMs,
//! a compute and a copy stream, and events for timing.
//!
//! cudarc loads the CUDA libraries at run time (`dynamic-loading`), so building needs no CUDA.
//! cudarc panics when a library is missing, so [`Device::new`] first checks that the driver
//! (`libcuda.so`) and cuBLAS are loadable and answers [`CudaError::NoDriver`] otherwise;
//! NVRTC (only for compiling CUDA C in tests and benchmarks) is checked by [`compile_cuda_c`].

use std::sync::Arc;

use cleave_ir::{DType, Tensor, TensorData};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
    LaunchConfig, PushKernelArg,
};

use crate::gpu_kernel::GpuKernel;

mod function;
pub use function::{GemmMode, GpuRunner};
#[cfg(feature = "nccl")]
pub mod nccl;

/// A failure of the CUDA runtime.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library could not be loaded.
    #[error("no CUDA {what} found: could not load {lib} (is the NVIDIA driver installed and on the library path?)")]
    NoDriver {
        /// Which part is missing (`driver`, `cuBLAS`, `NVRTC`).
        what: &'static str,
        /// The library looked for.
        lib: &'static str,
    },
    /// A driver call failed.
    #[error("CUDA driver: {context}: {message}")]
    Driver {
        /// What was being done.
        context: String,
        /// The driver's error.
        message: String,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0}")]
    Blas(String),
    /// NVRTC failed to compile CUDA C.
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    /// Bad input: a shape, type or argument mismatch.
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, CudaError>;

fn drv<T>(context: &str, r: std::result::Result<T, cudarc::driver::DriverError>) -> Result<T> {
    r.map_err(|e| CudaError::Driver {
        context: context.to_string(),
        message: format!("{e:?}"),
    })
}

/// Whether the CUDA driver library can be loaded (no CUDA call is made).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether cuBLAS can be loaded.
pub fn cublas_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// Whether NVRTC can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The number of GPUs the driver sees.
pub fn device_count() -> Result<usize> {
    check_driver()?;
    drv("count devices", CudaContext::device_count()).map(|n| n.max(0) as usize)
}

/// Checks that the driver is loadable; the error says what is missing.
pub fn check_driver() -> Result<()> {
    if !driver_present() {
        return Err(CudaError::NoDriver {
            what: "driver",
            lib: "libcuda.so",
        });
    }
    Ok(())
}

/// Compiles CUDA C source to PTX with NVRTC (checks that NVRTC is present first).
pub fn compile_cuda_c(src: &str) -> Result<String> {
    if !nvrtc_present() {
        return Err(CudaError::NoDriver {
            what: "NVRTC",
            lib: "libnvrtc.so",
        });
    }
    cudarc::nvrtc::compile_ptx(src)
        .map(|p| p.to_src())
        .map_err(|e| CudaError::Nvrtc(format!("{e:?}")))
}

/// One GPU: its context, a compute stream, a copy stream and a cuBLAS handle on the compute stream.
pub struct Device {
    ctx: Arc<CudaContext>,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    blas: CudaBlas,
}

/// A device buffer holding one tensor (`f32`, `bf16`, `f16`, `i32`, `i8`, or `bool` as one
/// byte).
pub struct DeviceTensor {
    /// Element type.
    pub dtype: DType,
    /// Extents.
    pub shape: Vec<usize>,
    /// The bytes.
    pub buf: CudaSlice<u8>,
}

impl DeviceTensor {
    /// The device address of the first element.
    pub fn ptr(&self, stream: &CudaStream) -> u64 {
        let (p, _sync) = self.buf.device_ptr(stream);
        p
    }
}

/// A loaded kernel: its module (kept alive), function and launch geometry.
pub struct LoadedKernel {
    _module: Arc<CudaModule>,
    func: CudaFunction,
    /// The descriptor it came from.
    pub desc: GpuKernel,
}

fn elem_bytes(dtype: DType) -> Result<usize> {
    match dtype {
        DType::F32 | DType::I32 => Ok(4),
        DType::BF16 | DType::F16 => Ok(2),
        DType::Bool | DType::I8 => Ok(1),
        d => Err(CudaError::Invalid(format!(
            "element type {d} is not supported on the GPU (f32, bf16, f16, i32, i8 and bool are)"
        ))),
    }
}

/// A host tensor's device bytes: little-endian in its element type, `bool` as one byte.
pub(crate) fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    elem_bytes(t.dtype)?;
    let n: usize = t.shape.iter().product();
    let matches = match &t.data {
        TensorData::Float(v) => t.dtype.is_float() && v.len() == n,
        TensorData::Int(v) => matches!(t.dtype, DType::I32 | DType::I8) && v.len() == n,
        TensorData::Bool(v) => t.dtype == DType::Bool && v.len() == n,
    };
    if !matches {
        return Err(CudaError::Invalid(format!(
            "tensor data does not match its element type {}{:?}",
            t.dtype, t.shape
        )));
    }
    Ok(t.to_le_bytes())
}

/// Where a GEMM operand lives and how it is strided (row-major view: element `(i, p)` at
/// `ptr + 4·(i·rs + p·cs)`); one of the strides must be 1 (cuBLAS needs a unit stride).
#[derive(Clone, Copy, Debug)]
pub struct GemmOperand {
    /// Device address.
    pub ptr: u64,
    /// Row stride in elements.
    pub rs: usize,
    /// Column stride in elements.
    pub cs: usize,
}

impl Device {
    /// Opens GPU `ordinal`: checks the driver and cuBLAS first, then creates the context, the two
    /// streams and the cuBLAS handle.
    pub fn new(ordinal: usize) -> Result<Device> {
        check_driver()?;
        if !cublas_present() {
            return Err(CudaError::NoDriver {
                what: "cuBLAS",
                lib: "libcublas.so",
            });
        }
        let ctx = drv("create context", CudaContext::new(ordinal))?;
        let compute = drv("create compute stream", ctx.new_stream())?;
        let copy = drv("create copy stream", ctx.new_stream())?;
        let blas = CudaBlas::new(compute.clone()).map_err(|e| CudaError::Blas(format!("{e:?}")))?;
        Ok(Device {
            ctx,
            compute,
            copy,
            blas,
        })
    }

    /// Another handle on the same GPU and context with a compute stream, a copy stream and a
    /// cuBLAS handle of its own: what one pipeline stage runs on, so that the kernels of
    /// different stages are ordered only by the values they exchange.
    pub fn fork(&self) -> Result<Device> {
        let compute = drv("create compute stream", self.ctx.new_stream())?;
        let copy = drv("create copy stream", self.ctx.new_stream())?;
        let blas = CudaBlas::new(compute.clone()).map_err(|e| CudaError::Blas(format!("{e:?}")))?;
        Ok(Device {
            ctx: self.ctx.clone(),
            compute,
            copy,
            blas,
        })
    }

    /// The GPU's name.
    pub fn name(&self) -> Result<String> {
        drv("device name", self.ctx.name())
    }

    /// The compute stream (kernels and GEMMs).
    pub fn compute_stream(&self) -> &Arc<CudaStream> {
        &self.compute
    }

    /// The copy stream (uploads, downloads, offload).
    pub fn copy_stream(&self) -> &Arc<CudaStream> {
        &self.copy
    }

    /// A zeroed device buffer of `bytes` bytes.
    pub fn alloc_bytes(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        drv("allocate", self.compute.alloc_zeros::<u8>(bytes.max(1)))
    }

    /// A zeroed device tensor.
    pub fn zeros(&self, dtype: DType, shape: &[usize]) -> Result<DeviceTensor> {
        let n: usize = shape.iter().product();
        Ok(DeviceTensor {
            dtype,
            shape: shape.to_vec(),
            buf: self.alloc_bytes(n * elem_bytes(dtype)?)?,
        })
    }

    /// Copies a tensor to the device (on the copy stream, then waits for it).
    pub fn upload(&self, t: &Tensor) -> Result<DeviceTensor> {
        let bytes = tensor_bytes(t)?;
        let mut buf = drv("allocate", self.copy.alloc_zeros::<u8>(bytes.len().max(1)))?;
        if !bytes.is_empty() {
            let mut view = buf.slice_mut(0..bytes.len());
            drv("upload", self.copy.memcpy_htod(&bytes, &mut view))?;
        }
        drv("upload", self.copy.synchronize())?;
        Ok(DeviceTensor {
            dtype: t.dtype,
            shape: t.shape.clone(),
            buf,
        })
    }

    /// Copies raw bytes into the start of a device buffer (copy stream, synchronous).
    pub fn upload_bytes(&self, dst: &mut CudaSlice<u8>, offset: usize, bytes: &[u8]) -> Result<()> {
        if offset + bytes.len() > dst.len() {
            return Err(CudaError::Invalid(format!(
                "upload of {} bytes at offset {offset} overruns a {}-byte buffer",
                bytes.len(),
                dst.len()
            )));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        drv("wait for compute", self.compute.synchronize())?;
        let mut view = dst.slice_mut(offset..offset + bytes.len());
        drv("upload", self.copy.memcpy_htod(bytes, &mut view))?;
        drv("upload", self.copy.synchronize())
    }

    /// Copies `len` bytes at `offset` of a device buffer back to the host (after the compute
    /// stream's work has finished).
    pub fn download_bytes(
        &self,
        src: &CudaSlice<u8>,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>> {
        if offset + len > src.len() {
            return Err(CudaError::Invalid(format!(
                "download of {len} bytes at offset {offset} overruns a {}-byte buffer",
                src.len()
            )));
        }
        drv("wait for compute", self.compute.synchronize())?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let view = src.slice(offset..offset + len);
        drv("download", self.copy.clone_dtoh(&view))
    }

    /// Copies a device tensor back to the host.
    pub fn download(&self, t: &DeviceTensor) -> Result<Tensor> {
        let n: usize = t.shape.iter().product();
        let bytes = self.download_bytes(&t.buf, 0, n * elem_bytes(t.dtype)?)?;
        bytes_to_tensor(t.dtype, &t.shape, &bytes)
    }

    /// Loads a kernel's PTX and finds its entry.
    pub fn load(&self, k: &GpuKernel) -> Result<LoadedKernel> {
        let module = drv(
            &format!("load PTX of kernel `{}`", k.name),
            self.ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(k.ptx.clone())),
        )?;
        let func = drv(
            &format!("find entry `{}` of kernel `{}`", k.entry, k.name),
            module.load_function(&k.entry),
        )?;
        Ok(LoadedKernel {
            _module: module,
            func,
            desc: k.clone(),
        })
    }

    /// Launches a loaded kernel on the compute stream with one device pointer per argument.
    ///
    /// # Safety
    /// Each pointer must address a buffer at least as large as the descriptor's argument says.
    pub unsafe fn launch_ptrs(&self, k: &LoadedKernel, ptrs: &[u64]) -> Result<()> {
        if ptrs.len() != k.desc.args.len() {
            return Err(CudaError::Invalid(format!(
                "kernel `{}` takes {} buffer(s), got {}",
                k.desc.name,
                k.desc.args.len(),
                ptrs.len()
            )));
        }
        let cfg = LaunchConfig {
            grid_dim: (k.desc.grid[0], k.desc.grid[1], k.desc.grid[2]),
            block_dim: (k.desc.block[0], k.desc.block[1], k.desc.block[2]),
            shared_mem_bytes: 0,
        };
        let mut b = self.compute.launch_builder(&k.func);
        for p in ptrs {
            b.arg(p);
        }
        drv(&format!("launch kernel `{}`", k.desc.name), b.launch(cfg)).map(|_| ())
    }

    /// Launches a loaded kernel on device tensors, checking them against the descriptor.
    pub fn launch(&self, k: &LoadedKernel, args: &[&DeviceTensor]) -> Result<()> {
        for (i, (t, a)) in args.iter().zip(&k.desc.args).enumerate() {
            let (name, dtype, shape) = (&a.name, &a.dtype, &a.shape);
            // Buffers are dense and row-major, so a kernel may view one under another shape of
            // the same size (a `reshape` is the same bytes).
            let numel = |s: &[usize]| s.iter().product::<usize>();
            if t.dtype.name() != dtype || numel(&t.shape) != numel(shape) {
                return Err(CudaError::Invalid(format!(
                    "kernel `{}` argument {i} (`{name}`) wants {dtype}{shape:?}, got {}{:?}",
                    k.desc.name, t.dtype, t.shape
                )));
            }
        }
        let ptrs: Vec<u64> = args.iter().map(|t| t.ptr(&self.compute)).collect();
        // SAFETY: every buffer matches the descriptor's type and shape.
        unsafe { self.launch_ptrs(k, &ptrs) }
    }

    /// Row-major `c = a·b` (or `c += a·b`) in f32: [`Device::gemm`] with [`DType::F32`].
    ///
    /// # Safety
    /// As [`Device::gemm`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sgemm(
        &self,
        mkn: (usize, usize, usize),
        a: GemmOperand,
        b: GemmOperand,
        c: u64,
        ldc: usize,
        accumulate: bool,
        batches: (usize, usize, usize, usize),
    ) -> Result<()> {
        self.gemm(DType::F32, mkn, a, b, c, ldc, accumulate, batches)
    }

    /// Row-major `c = a·b` (or `c += a·b`), `batch` times with element strides between the
    /// batches, matching the CPU GEMM's strided semantics (`gemm.rs`): `a` is `m×k`, `b` `k×n`,
    /// `c` row-major `m×n` with row stride `ldc`, all three of element type `dtype`. Runs on the
    /// compute stream. `f32` runs cuBLAS's SGEMM; `bf16` and `f16` run `cublasGemmEx` with f32
    /// accumulation and one rounding of each result, the CPU runtime's 16-bit GEMM semantics.
    ///
    /// Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ, so cuBLAS gets (n, m, k) with B first; an
    /// operand with unit column stride is "not transposed" in that view, one with unit row stride
    /// is transposed.
    ///
    /// # Safety
    /// The pointers must be valid device buffers of `dtype` for every position the strides reach.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        &self,
        dtype: DType,
        (m, k, n): (usize, usize, usize),
        a: GemmOperand,
        b: GemmOperand,
        c: u64,
        ldc: usize,
        accumulate: bool,
        (batch, sa, sb, sc): (usize, usize, usize, usize),
    ) -> Result<()> {
        let narrow = match dtype {
            DType::F32 => None,
            DType::BF16 => Some(blas_sys::cudaDataType::CUDA_R_16BF),
            DType::F16 => Some(blas_sys::cudaDataType::CUDA_R_16F),
            d => {
                return Err(CudaError::Invalid(format!(
                    "GEMM in {d}: cuBLAS runs f32, bf16 and f16 products here"
                )))
            }
        };
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let op = |o: GemmOperand, rows: usize, cols: usize, what: &str| {
            // The column-major view of the row-major operand is its transpose.
            if o.cs == 1 && (o.rs >= cols.max(1) || rows <= 1) {
                Ok((
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    o.rs.max(cols).max(1),
                ))
            } else if o.rs == 1 && (o.cs >= rows.max(1) || cols <= 1) {
                Ok((
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    o.cs.max(rows).max(1),
                ))
            } else {
                Err(CudaError::Invalid(format!(
                    "GEMM operand {what} ({rows}×{cols}, strides {}·{}) has no unit stride",
                    o.rs, o.cs
                )))
            }
        };
        let (opb, ldb) = op(b, k, n, "B")?;
        let (opa, lda) = op(a, m, k, "A")?;
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0 };
        let h = *self.blas.handle();
        let to_i = |x: usize| -> Result<i32> {
            i32::try_from(x).map_err(|_| CudaError::Invalid(format!("GEMM extent {x} exceeds i32")))
        };
        let (ni, mi, ki) = (to_i(n)?, to_i(m)?, to_i(k)?);
        let (lda, ldb, ldc) = (to_i(lda)?, to_i(ldb)?, to_i(ldc)?);
        let r = match (narrow, batch) {
            (None, 1) => blas::sgemm(
                h,
                opb,
                opa,
                ni,
                mi,
                ki,
                &alpha,
                b.ptr as *const f32,
                ldb,
                a.ptr as *const f32,
                lda,
                &beta,
                c as *mut f32,
                ldc,
            ),
            (None, _) => blas::sgemm_strided_batched(
                h,
                opb,
                opa,
                ni,
                mi,
                ki,
                &alpha,
                b.ptr as *const f32,
                ldb,
                sb as i64,
                a.ptr as *const f32,
                lda,
                sa as i64,
                &beta,
                c as *mut f32,
                ldc,
                sc as i64,
                to_i(batch)?,
            ),
            // 16-bit: one strided-batched call for every batch size (cuBLAS takes batch 1).
            (Some(t), _) => blas::gemm_strided_batched_ex(
                h,
                opb,
                opa,
                ni,
                mi,
                ki,
                &alpha as *const f32 as *const _,
                b.ptr as *const _,
                t,
                ldb,
                sb as i64,
                a.ptr as *const _,
                t,
                lda,
                sa as i64,
                &beta as *const f32 as *const _,
                c as *mut _,
                t,
                ldc,
                sc as i64,
                to_i(batch)?,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            ),
        };
        r.map_err(|e| CudaError::Blas(format!("{dtype} GEMM {m}×{k}×{n} (batch {batch}): {e:?}")))
    }

    /// A timing event.
    pub fn event(&self) -> Result<CudaEvent> {
        drv(
            "create event",
            self.ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)),
        )
    }

    /// Records `ev` on the compute stream.
    pub fn record(&self, ev: &CudaEvent) -> Result<()> {
        drv("record event", ev.record(&self.compute))
    }

    /// Milliseconds between two recorded events (waits for the second).
    pub fn elapsed_ms(&self, start: &CudaEvent, end: &CudaEvent) -> Result<f32> {
        drv("wait for event", end.synchronize())?;
        drv("event time", start.elapsed_ms(end))
    }

    /// Waits for the compute and copy streams.
    pub fn synchronize(&self) -> Result<()> {
        drv("synchronize", self.compute.synchronize())?;
        drv("synchronize", self.copy.synchronize())
    }

    /// Device-to-device copy of `bytes` bytes on the compute stream.
    pub fn copy_d2d(&self, src: &CudaSlice<u8>, dst: &mut CudaSlice<u8>) -> Result<()> {
        if src.len() != dst.len() {
            return Err(CudaError::Invalid(format!(
                "device copy of {} bytes into {} bytes",
                src.len(),
                dst.len()
            )));
        }
        drv("device copy", self.compute.memcpy_dtod(src, dst))
    }
}

/// Decodes device bytes into a tensor (`bytes` must hold exactly its elements).
pub fn bytes_to_tensor(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Tensor> {
    elem_bytes(dtype)?;
    Tensor::from_le_bytes(dtype, shape, bytes).map_err(|e| CudaError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Host tensors of every element type the GPU holds go to device bytes and back unchanged;
    /// an unsupported type and mismatched data are clear errors. (No driver needed.)
    #[test]
    fn every_device_type_round_trips_through_its_bytes() {
        let floats = vec![1.0, -2.5, 0.15625, 3.0e4];
        let cases = [
            Tensor::from_float(DType::F32, vec![2, 2], floats.clone()),
            Tensor::from_float(DType::BF16, vec![4], floats.clone()),
            Tensor::from_float(DType::F16, vec![4], floats),
            Tensor::from_i64(DType::I32, vec![3], vec![-7, 0, 1 << 20]),
            Tensor::from_i64(DType::I8, vec![3], vec![-128, 5, 127]),
            Tensor::from_bool(vec![2], vec![true, false]),
        ];
        for t in &cases {
            let bytes = tensor_bytes(t).unwrap();
            assert_eq!(bytes.len(), t.numel() * elem_bytes(t.dtype).unwrap());
            assert_eq!(&bytes_to_tensor(t.dtype, &t.shape, &bytes).unwrap(), t);
        }
        let f64t = Tensor::from_float(DType::F64, vec![1], vec![1.0]);
        let e = tensor_bytes(&f64t).unwrap_err().to_string();
        assert!(e.contains("f64") && e.contains("bf16"), "{e}");
        let bad = Tensor {
            dtype: DType::BF16,
            shape: vec![2],
            data: TensorData::Int(vec![1, 2]),
        };
        assert!(tensor_bytes(&bad).is_err());
        let e = bytes_to_tensor(DType::BF16, &[3], &[0; 4])
            .unwrap_err()
            .to_string();
        assert!(e.contains("4 bytes"), "{e}");
    }
}
