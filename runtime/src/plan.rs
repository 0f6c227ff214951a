//! Executable plans: buffers, kernels and the run loop.

use cleave_ir::{ArgRole, DType, TensorType};

use crate::fused::{FusedKernel, Regs};
use crate::kernels::OpKernel;
use crate::{HostData, HostSlice, RunError};

/// A planned buffer as one kernel sees it: which storage, how many elements, of which type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BufRef {
    pub id: usize,
    pub len: usize,
    pub dtype: DType,
}

/// Raw base pointers of every buffer for the duration of one run. Buffers are `Vec<f32>` words;
/// `i32` and `bool` (one byte, 0 or 1) buffers are the same words reinterpreted.
pub(crate) struct Mem {
    ptrs: Vec<*mut f32>,
}

impl Mem {
    /// The base pointers, indexed by buffer id (what compiled loops take).
    pub fn table(&self) -> *const *mut f32 {
        self.ptrs.as_ptr()
    }
    pub fn ptr_f(&self, b: BufRef) -> *mut f32 {
        self.ptrs[b.id]
    }
    pub fn ptr_i(&self, b: BufRef) -> *mut i32 {
        self.ptrs[b.id] as *mut i32
    }
    pub fn ptr_b(&self, b: BufRef) -> *mut u8 {
        self.ptrs[b.id] as *mut u8
    }
    /// # Safety
    /// No mutable slice of the same buffer may be alive.
    pub unsafe fn f(&self, b: BufRef) -> &[f32] {
        std::slice::from_raw_parts(self.ptr_f(b), b.len)
    }
    /// # Safety
    /// No other slice of the same buffer may be alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn f_mut(&self, b: BufRef) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.ptr_f(b), b.len)
    }
    /// # Safety
    /// As [`Mem::f`].
    pub unsafe fn i(&self, b: BufRef) -> &[i32] {
        std::slice::from_raw_parts(self.ptr_i(b), b.len)
    }
    /// # Safety
    /// As [`Mem::f_mut`].
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn i_mut(&self, b: BufRef) -> &mut [i32] {
        std::slice::from_raw_parts_mut(self.ptr_i(b), b.len)
    }
    /// # Safety
    /// As [`Mem::f`].
    pub unsafe fn b(&self, b: BufRef) -> &[u8] {
        std::slice::from_raw_parts(self.ptr_b(b), b.len)
    }
    /// # Safety
    /// As [`Mem::f_mut`].
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn b_mut(&self, b: BufRef) -> &mut [u8] {
        std::slice::from_raw_parts_mut(self.ptr_b(b), b.len)
    }
}

/// One step of a plan.
#[derive(Debug)]
pub(crate) enum Kernel {
    Fused(FusedKernel),
    Op(OpKernel),
}

impl Kernel {
    /// The kernel's kind (`matmul`, `fused`, `softmax`, …) and its sizes, for profiles.
    fn describe(&self) -> (&'static str, String) {
        match self {
            Kernel::Fused(k) => (
                if k.jit.is_some() {
                    "fused"
                } else {
                    "fused (interpreted)"
                },
                format!("{} elements, {} instructions", k.n, k.prog.len()),
            ),
            Kernel::Op(k) => k.describe(),
        }
    }
}

/// One kernel's time in [`Plan::run_profiled`].
#[derive(Clone, Debug)]
pub struct KernelTime {
    /// `matmul`, `fused`, `reduce`, `softmax`, …
    pub kind: &'static str,
    /// Its sizes (a matmul's `batch×m×k×n`, a fused loop's elements).
    pub detail: String,
    /// The node it reports as (op name, printed value).
    pub op: &'static str,
    /// See `op`.
    pub value: String,
    /// Milliseconds.
    pub ms: f64,
}

/// A kernel with what the run loop needs to report on it.
#[derive(Debug)]
pub(crate) struct Step {
    pub kernel: Kernel,
    /// The node named in errors (`op`, value as printed).
    pub op: &'static str,
    pub value: String,
    /// Values this kernel stores, for `--debug-nan`: (op, printed value, buffer).
    pub stores: Vec<(&'static str, String, BufRef)>,
}

/// A function argument of a plan.
#[derive(Clone, Debug)]
pub struct ArgInfo {
    /// Its name.
    pub name: String,
    /// Data input or parameter.
    pub role: ArgRole,
    /// Its type.
    pub ty: TensorType,
    pub(crate) buf: BufRef,
}

/// A function output of a plan.
#[derive(Clone, Debug)]
pub struct OutputInfo {
    /// Its name.
    pub name: String,
    /// Its type.
    pub ty: TensorType,
    pub(crate) buf: BufRef,
}

/// The first non-finite value a checked run found.
#[derive(Clone, Debug, PartialEq)]
pub struct NanReport {
    /// The op that produced it (or `input` for an argument).
    pub op: &'static str,
    /// The value as printed (`%7`), or the argument's name.
    pub value: String,
    /// Flat index of the first non-finite element.
    pub index: usize,
    /// That element.
    pub element: f32,
}

/// An executable plan; see the crate docs.
pub struct Plan {
    pub(crate) bufs: Vec<Vec<f32>>,
    pub(crate) steps: Vec<Step>,
    pub(crate) args: Vec<ArgInfo>,
    pub(crate) outputs: Vec<OutputInfo>,
    pub(crate) planned_bytes: usize,
    pub(crate) pinned_bytes: usize,
    pub(crate) regs: Regs,
    /// The compiled fused loops' code (dropped after `steps`, which point into it).
    pub(crate) jit_code: Option<crate::jit::JitCode>,
    /// The same for loops compiled by LLVM.
    #[cfg(feature = "llvm")]
    pub(crate) llvm_code: Option<crate::llvm::LlvmCode>,
    /// The code generator of the compiled loops (None: `jit` was off).
    pub(crate) codegen: Option<crate::Codegen>,
    /// (output index, argument index) pairs of [`Plan::carry`], and a scratch per pair.
    carry_pairs: Option<Vec<(usize, usize, Vec<f32>)>>,
    /// The table of buffer base pointers a run hands its kernels, kept between runs so that a
    /// run allocates nothing of its own.
    ptr_table: PtrTable,
}

/// Storage for [`Mem`]'s pointer table between runs: refilled at the start of every run and
/// never read outside one.
#[derive(Default)]
struct PtrTable(Vec<*mut f32>);

// SAFETY: the pointers are only dereferenced during a run, which refills the table from the
// plan's own buffers first (through `&mut Plan`); between runs the table is dead storage.
unsafe impl Send for PtrTable {}
// SAFETY: as above; nothing reads the table through a shared reference.
unsafe impl Sync for PtrTable {}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("kernels", &self.steps.len())
            .field("buffers", &self.bufs.len())
            .field("planned_bytes", &self.planned_bytes)
            .finish()
    }
}

fn words(len: usize, dtype: DType) -> usize {
    (len * dtype.size_bytes()).div_ceil(4)
}

impl Plan {
    pub(crate) fn new(
        bufs: Vec<Vec<f32>>,
        steps: Vec<Step>,
        args: Vec<ArgInfo>,
        outputs: Vec<OutputInfo>,
        planned_bytes: usize,
        pinned_bytes: usize,
    ) -> Plan {
        Plan {
            bufs,
            steps,
            args,
            outputs,
            planned_bytes,
            pinned_bytes,
            regs: Regs::default(),
            jit_code: None,
            #[cfg(feature = "llvm")]
            llvm_code: None,
            codegen: None,
            carry_pairs: None,
            ptr_table: PtrTable::default(),
        }
    }

    /// The arguments, in the function's argument order.
    pub fn args(&self) -> &[ArgInfo] {
        &self.args
    }

    /// The outputs, in the function's output order.
    pub fn outputs(&self) -> &[OutputInfo] {
        &self.outputs
    }

    /// Bytes of the planned buffers (arguments, intermediates and outputs, after reuse).
    pub fn peak_bytes(&self) -> usize {
        self.planned_bytes
    }

    /// Bytes the plan's buffers hold (planned buffers and constants, as allocated).
    pub fn buffer_bytes(&self) -> usize {
        self.bufs.iter().map(|b| b.capacity() * 4).sum::<usize>()
            + self
                .carry_pairs
                .iter()
                .flatten()
                .map(|p| p.2.capacity() * 4)
                .sum::<usize>()
    }

    /// Charges the plan's buffers to an allocator tag ([`crate::alloc`]).
    pub fn retag_buffers(&self, tag: u32) {
        for b in &self.bufs {
            crate::alloc::retag_vec(b, tag);
        }
        for p in self.carry_pairs.iter().flatten() {
            crate::alloc::retag_vec(&p.2, tag);
        }
    }

    /// Bytes of the constants materialised once at compile time.
    pub fn constant_bytes(&self) -> usize {
        self.pinned_bytes
    }

    /// Number of fused elementwise loops.
    pub fn fused_kernels(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s.kernel, Kernel::Fused(_)))
            .count()
    }

    /// Number of fused loops compiled to native code (the others are interpreted).
    pub fn jit_kernels(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(&s.kernel, Kernel::Fused(k) if k.jit.is_some()))
            .count()
    }

    /// The code generator that compiled the fused loops (None: they are interpreted).
    pub fn codegen(&self) -> Option<crate::Codegen> {
        self.codegen
    }

    /// Number of fused loops that the JIT left to the interpreter because they contain `exp`,
    /// `erf` or GELU, which the interpreter runs 8–16 lanes wide on CPUs with FMA (`jit.rs`).
    /// Every fused loop is JIT-compiled, counted here, or uses an op the JIT lacks.
    pub fn vector_math_kernels(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(&s.kernel, Kernel::Fused(k) if k.vector_math))
            .count()
    }

    /// Number of kernels.
    pub fn num_kernels(&self) -> usize {
        self.steps.len()
    }

    /// The index of the argument named `name`.
    pub fn arg_index(&self, name: &str) -> Option<usize> {
        self.args.iter().position(|a| a.name == name)
    }

    /// The index of the output named `name`.
    pub fn output_index(&self, name: &str) -> Option<usize> {
        self.outputs.iter().position(|a| a.name == name)
    }

    /// Copies data into argument `index`; the element type and count must match.
    pub fn set_input(&mut self, index: usize, data: HostSlice<'_>) -> Result<(), RunError> {
        let a = self
            .args
            .get(index)
            .ok_or_else(|| RunError::Argument(format!("no argument {index}")))?;
        let b = a.buf;
        let (dtype, len) = (data.dtype(), data.len());
        if dtype != a.ty.dtype || len != a.ty.num_elements() {
            return Err(RunError::Argument(format!(
                "argument `{}`: expected {}, got {} {dtype} elements",
                a.name, a.ty, len
            )));
        }
        let store = &mut self.bufs[b.id];
        match data {
            HostSlice::F32(v) => store[..len].copy_from_slice(v),
            HostSlice::I32(v) => {
                for (d, &x) in store.iter_mut().zip(v) {
                    *d = f32::from_bits(x as u32);
                }
            }
            HostSlice::BF16(v) | HostSlice::F16(v) => {
                let p = store.as_mut_ptr() as *mut u16;
                // SAFETY: the buffer holds at least `len` 16-bit elements.
                unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), p, len) };
            }
            HostSlice::I8(v) => {
                let p = store.as_mut_ptr() as *mut i8;
                // SAFETY: the buffer holds at least `len` bytes.
                unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), p, len) };
            }
            HostSlice::Bool(v) => {
                let p = store.as_mut_ptr() as *mut u8;
                for (j, &x) in v.iter().enumerate() {
                    // SAFETY: the buffer holds at least `len` bytes.
                    unsafe { *p.add(j) = x as u8 };
                }
            }
        }
        Ok(())
    }

    /// Copies data into the argument named `name`.
    pub fn set_input_named(&mut self, name: &str, data: HostSlice<'_>) -> Result<(), RunError> {
        let i = self.arg_index(name).ok_or_else(|| {
            RunError::Argument(format!(
                "unknown argument `{name}`; arguments: {}",
                self.args
                    .iter()
                    .map(|a| format!("`{}`", a.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        self.set_input(i, data)
    }

    /// The `f32` elements of output `index` (valid until the next run).
    pub fn output_f32(&self, index: usize) -> Option<&[f32]> {
        let o = &self.outputs[index];
        (o.ty.dtype == DType::F32).then(|| &self.bufs[o.buf.id][..o.buf.len])
    }

    /// A copy of output `index`.
    pub fn output(&self, index: usize) -> HostData {
        let o = &self.outputs[index];
        self.copy_of(o.buf, o.ty.dtype)
    }

    /// A copy of what argument `index` holds now (its value as set, or as carried; a plan
    /// compiled without `preserve_args` may have reused its buffer once a run has begun).
    pub fn arg(&self, index: usize) -> HostData {
        let a = &self.args[index];
        self.copy_of(a.buf, a.ty.dtype)
    }

    fn copy_of(&self, b: BufRef, dtype: DType) -> HostData {
        let store = &self.bufs[b.id];
        let n = b.len;
        match dtype {
            DType::F32 => HostData::F32(store[..n].to_vec()),
            DType::I32 => HostData::I32(store[..n].iter().map(|x| x.to_bits() as i32).collect()),
            DType::BF16 | DType::F16 => {
                let p = store.as_ptr() as *const u16;
                // SAFETY: the buffer holds at least `n` 16-bit elements.
                let v = unsafe { std::slice::from_raw_parts(p, n) }.to_vec();
                if dtype == DType::F16 {
                    HostData::F16(v)
                } else {
                    HostData::BF16(v)
                }
            }
            DType::I8 => {
                let p = store.as_ptr() as *const i8;
                // SAFETY: the buffer holds at least `n` bytes.
                HostData::I8(unsafe { std::slice::from_raw_parts(p, n) }.to_vec())
            }
            _ => {
                let p = store.as_ptr() as *const u8;
                // SAFETY: the buffer holds at least `n` bytes.
                HostData::Bool((0..n).map(|j| unsafe { *p.add(j) } != 0).collect())
            }
        }
    }

    /// Runs every kernel once.
    pub fn run(&mut self) -> Result<(), RunError> {
        self.run_inner(false, None).map(|_| ())
    }

    /// Runs every kernel once, checking each argument and each stored float value for NaN or
    /// infinity; returns the first non-finite value, by kernel order (compile without fusion so
    /// that every value is stored and checked).
    pub fn run_checked(&mut self) -> Result<Option<NanReport>, RunError> {
        self.run_inner(true, None)
    }

    /// Runs every kernel; with `profile`, pushes each kernel's time there.
    fn run_inner(
        &mut self,
        check: bool,
        profile: Option<&mut Vec<KernelTime>>,
    ) -> Result<Option<NanReport>, RunError> {
        let mut ptrs = std::mem::take(&mut self.ptr_table.0);
        ptrs.clear();
        ptrs.extend(self.bufs.iter_mut().map(|b| b.as_mut_ptr()));
        let mem = Mem { ptrs };
        let r = self.run_steps(&mem, check, profile);
        self.ptr_table.0 = mem.ptrs;
        r
    }

    fn run_steps(
        &mut self,
        mem: &Mem,
        check: bool,
        mut profile: Option<&mut Vec<KernelTime>>,
    ) -> Result<Option<NanReport>, RunError> {
        let mut first = None;
        if check {
            for a in &self.args {
                if a.ty.dtype == DType::F32 {
                    // SAFETY: nothing else borrows the buffers now.
                    let v = unsafe { mem.f(a.buf) };
                    if let Some(p) = v.iter().position(|x| !x.is_finite()) {
                        return Ok(Some(NanReport {
                            op: "input",
                            value: a.name.clone(),
                            index: p,
                            element: v[p],
                        }));
                    }
                }
            }
        }
        for step in &mut self.steps {
            let start = profile.is_some().then(std::time::Instant::now);
            // SAFETY: the planner gives every live value its own buffer (except in-place fused
            // results, which the fused loop supports), sized for its type.
            let r = unsafe {
                match &mut step.kernel {
                    Kernel::Fused(k) => k.run(mem, &mut self.regs),
                    Kernel::Op(k) => k.run(mem),
                }
            };
            r.map_err(|message| RunError::Node {
                op: step.op,
                value: step.value.clone(),
                message,
            })?;
            if let (Some(out), Some(start)) = (profile.as_deref_mut(), start) {
                let ms = start.elapsed().as_secs_f64() * 1e3;
                let (kind, detail) = step.kernel.describe();
                out.push(KernelTime {
                    kind,
                    detail,
                    op: step.op,
                    value: step.value.clone(),
                    ms,
                });
            }
            if check && first.is_none() {
                for (op, value, b) in &step.stores {
                    if b.dtype == DType::F32 {
                        // SAFETY: as above.
                        let v = unsafe { mem.f(*b) };
                        if let Some(p) = v.iter().position(|x| !x.is_finite()) {
                            first = Some(NanReport {
                                op,
                                value: value.clone(),
                                index: p,
                                element: v[p],
                            });
                            break;
                        }
                    }
                }
            }
        }
        Ok(first)
    }

    /// Runs every kernel once, timing each on its own, and returns one entry per kernel in plan
    /// order (`cleave bench --profile`). Like [`Plan::run`], a run may overwrite data inputs
    /// whose buffers are reused: set them again before the next run.
    pub fn run_profiled(&mut self) -> Result<Vec<KernelTime>, RunError> {
        let mut out = Vec::with_capacity(self.steps.len());
        self.run_inner(false, Some(&mut out))?;
        Ok(out)
    }

    /// Copies every output into the argument of the same name (skipping pairs that already share
    /// a buffer), so the next run continues from this one's results. Returns how many pairs exist.
    pub fn carry(&mut self) -> usize {
        if self.carry_pairs.is_none() {
            let mut pairs = Vec::new();
            for (oi, o) in self.outputs.iter().enumerate() {
                if let Some(ai) = self.args.iter().position(|a| a.name == o.name) {
                    if self.args[ai].ty == o.ty {
                        pairs.push((oi, ai, vec![0.0; words(o.buf.len, o.buf.dtype)]));
                    }
                }
            }
            self.carry_pairs = Some(pairs);
        }
        let pairs = self.carry_pairs.as_mut().expect("set above");
        // Two phases: an output may live in another argument's buffer.
        for (oi, ai, scratch) in pairs.iter_mut() {
            let (ob, ab) = (self.outputs[*oi].buf, self.args[*ai].buf);
            if ob.id != ab.id {
                let n = scratch.len();
                scratch.copy_from_slice(&self.bufs[ob.id][..n]);
            }
        }
        for (oi, ai, scratch) in pairs.iter() {
            let (ob, ab) = (self.outputs[*oi].buf, self.args[*ai].buf);
            if ob.id != ab.id {
                let n = scratch.len();
                self.bufs[ab.id][..n].copy_from_slice(scratch);
            }
        }
        pairs.len()
    }
}
