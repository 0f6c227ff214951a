//! The same kernel groups through MLIR's LLVM path, run with melior's ExecutionEngine.
//!
//! This is how CI checks the numbers of the GPU kernels without a GPU: the emitted linalg (and
//! its math expansions) is identical; only the back half of the pipeline differs (sequential
//! loops instead of `gpu.launch`). The kernels use the bare-pointer convention here too, so a
//! call passes one pointer per buffer.

use std::collections::{BTreeMap, HashMap};

use cleave_ir::{DType, Function, Tensor, Value};
use melior::ExecutionEngine;

use crate::context::{Mlir, MlirError};
use crate::emit::{constant_data, emit_function, module_text, EmitError, EmittedKernel};
use crate::pipeline::cpu_pipeline;

/// Why a function could not be compiled or run on the CPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// An op has no lowering.
    #[error(transparent)]
    Emit(#[from] EmitError),
    /// MLIR failed.
    #[error(transparent)]
    Mlir(#[from] MlirError),
    /// Wrong arguments for the function.
    #[error("function @{function}: {problem}")]
    Arguments {
        /// The function.
        function: String,
        /// What is wrong.
        problem: String,
    },
    /// The ExecutionEngine could not be built.
    #[error("ExecutionEngine: {0}")]
    Engine(String),
    /// A kernel call failed.
    #[error("kernel {0}: the ExecutionEngine could not invoke it")]
    Invoke(String),
}

/// A function compiled to native code through MLIR.
pub struct CpuProgram {
    // Declared first: dropped before the context.
    engine: ExecutionEngine,
    kernels: Vec<EmittedKernel>,
    func: Function,
    _mlir: Mlir,
}

/// Compiles every kernel group of `func` into one module and JIT-compiles it (LLVM -O2).
pub fn compile_cpu(func: &Function) -> Result<CpuProgram, CpuError> {
    let kernels = emit_function(func)?;
    let funcs: Vec<&str> = kernels.iter().map(|k| k.func.as_str()).collect();
    let text = module_text(&funcs);
    let mlir = Mlir::new();
    let engine = {
        let module = mlir.lower(&format!("function @{}", func.name), &text, &cpu_pipeline())?;
        ExecutionEngine::new(&module, 2, &[], false, false)
    };
    for k in &kernels {
        if engine.lookup(&packed_name(&k.group.name)).is_null() {
            return Err(CpuError::Engine(format!(
                "kernel {} is missing from the JIT-compiled module (LLVM translation or JIT failed)",
                k.group.name
            )));
        }
    }
    Ok(CpuProgram {
        engine,
        kernels,
        func: func.clone(),
        _mlir: mlir,
    })
}

/// The ExecutionEngine's packed wrapper of a function, `void _mlir_NAME(void **args)`.
/// (melior's `invoke_packed` goes through the C API, which calls the `_mlir_ciface_` wrapper
/// that only `llvm.emit_c_interface` functions have; the bare-pointer kernels need none.)
fn packed_name(name: &str) -> String {
    format!("_mlir_{name}")
}

/// A buffer with 8-byte alignment.
struct Buf {
    words: Vec<u64>,
    bytes: usize,
}

impl Buf {
    fn new(bytes: usize) -> Self {
        Buf {
            words: vec![0; bytes.div_ceil(8).max(1)],
            bytes,
        }
    }

    fn from_bytes(b: &[u8]) -> Self {
        let mut buf = Buf::new(b.len());
        let dst = buf.as_bytes_mut();
        dst.copy_from_slice(b);
        buf
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `words` holds at least `bytes` bytes; u8 has no alignment requirement.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.bytes) }
    }

    fn as_bytes(&self) -> &[u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.bytes) }
    }
}

fn constant_tensor(func: &Function, v: Value) -> Tensor {
    let ty = func.ty(v);
    let data = constant_data(func, v);
    match ty.dtype {
        DType::Bool => Tensor::from_bool(
            ty.shape.clone(),
            data.iter().map(|&x| x != 0.0).collect::<Vec<_>>(),
        ),
        DType::I32 | DType::I64 => Tensor::from_i64(
            ty.dtype,
            ty.shape.clone(),
            data.iter().map(|&x| x as i64).collect::<Vec<_>>(),
        ),
        d => Tensor::from_float(d, ty.shape.clone(), data),
    }
}

impl CpuProgram {
    /// The kernel groups, in execution order.
    pub fn kernels(&self) -> &[EmittedKernel] {
        &self.kernels
    }

    /// Runs the function on `args` (by argument name) and returns its outputs in order.
    pub fn run(&self, args: &BTreeMap<String, Tensor>) -> Result<Vec<Tensor>, CpuError> {
        let func = &self.func;
        let bad = |problem: String| CpuError::Arguments {
            function: func.name.clone(),
            problem,
        };
        let mut bufs: HashMap<Value, Buf> = HashMap::new();
        for a in func.args() {
            let t = args
                .get(a.name)
                .ok_or_else(|| bad(format!("missing argument `{}`", a.name)))?;
            if t.ty() != *a.ty {
                return Err(bad(format!(
                    "argument `{}` is {}, expected {}",
                    a.name,
                    t.ty(),
                    a.ty
                )));
            }
            bufs.insert(a.value, Buf::from_bytes(&t.to_le_bytes()));
        }
        for k in &self.kernels {
            for &v in &k.group.outputs {
                bufs.entry(v)
                    .or_insert_with(|| Buf::new(func.ty(v).size_bytes()));
            }
            // Constants get their own buffers: a constant that is also an output is written to
            // the output's buffer by the kernel.
            let mut consts: Vec<Buf> = k
                .constants
                .iter()
                .map(|&v| Buf::from_bytes(&constant_tensor(func, v).to_le_bytes()))
                .collect();
            let mut ptrs: Vec<*mut u64> = k
                .group
                .inputs
                .iter()
                .chain(&k.group.outputs)
                .map(|v| bufs.get_mut(v).expect("allocated above").words.as_mut_ptr())
                .collect();
            ptrs.extend(consts.iter_mut().map(|c| c.words.as_mut_ptr()));
            let mut packed: Vec<*mut ()> = ptrs
                .iter_mut()
                .map(|p| p as *mut *mut u64 as *mut ())
                .collect();
            let f = self.engine.lookup(&packed_name(&k.group.name));
            if f.is_null() {
                return Err(CpuError::Invoke(k.group.name.clone()));
            }
            // SAFETY: `f` is the packed wrapper the ExecutionEngine generated for the kernel: it
            // reads one argument per parameter from `packed`, each a pointer to a buffer pointer
            // (bare-pointer convention), in `order`; the kernel accesses at most numel elements
            // of each buffer, which the buffers hold.
            unsafe {
                let f: extern "C" fn(*mut *mut ()) = std::mem::transmute(f);
                f(packed.as_mut_ptr());
            }
        }
        func.outputs
            .iter()
            .map(|o| {
                let ty = func.ty(o.value);
                let buf = bufs
                    .get(&o.value)
                    .ok_or_else(|| bad(format!("output `{}` was not computed", o.name)))?;
                Tensor::from_le_bytes(ty.dtype, &ty.shape, buf.as_bytes())
                    .map_err(|e| bad(format!("output `{}`: {e}", o.name)))
            })
            .collect()
    }
}
