//! Native code for fused loops through LLVM (cargo feature `llvm`, `--codegen llvm`).
//!
//! The second code generator beside [`crate::jit`]'s Cranelift one, for the same fused loop
//! programs ([`FusedKernel`]) and the same function signature (`fn(bufs, start, end)`, see
//! there). Where Cranelift's SIMD is 128 bits, this one writes the loop for the host's full
//! vector width (16 lanes with AVX-512, 8 with AVX2, 4 otherwise), with the host's CPU name and
//! features on every function (`-march=native`), and runs LLVM's `default<O2>` pipeline over it.
//!
//! - The program is written as LLVM IR text, one function per loop, and parsed back by LLVM
//!   (inkwell's `create_module_from_ir`): the text is what [`module_text`] returns, readable
//!   and diffable, and LLVM's verifier checks it.
//! - Each loop is two loops over the elements: one vector per iteration, then a scalar tail.
//!   (Two vectors per iteration for loops with polynomial code, as the Cranelift loop does,
//!   measured no faster at 16 lanes: GPT-tiny 1.63–1.73 ms per step either way.)
//! - Loads and stores: contiguous operands are vector loads; views whose innermost dimension is
//!   a multiple of the width load whole vectors or splats; other views compute their positions
//!   as an index vector and load with one `llvm.masked.gather`; one-element views are loaded
//!   once, before the loop.
//! - Every op is one IEEE operation per lane in the interpreter's order (no fast-math flags, so
//!   LLVM neither contracts nor reassociates). `exp`, `erf` and GELU are [`crate::vmath`]'s
//!   polynomials written out as vector IR (with `llvm.fma` exactly where the interpreted loop
//!   fuses, [`vmath::has_fma`]); `rsqrt` is the helper's three IEEE operations in `double`
//!   lanes; the other transcendentals and `pow` call the runtime's Rust helpers once per lane.
//!   So the results are bit-identical to the interpreted loop's and to the Cranelift code's,
//!   with two exceptions shared with Cranelift: `max`/`min` are IEEE `maximum`/`minimum`, so a
//!   NaN keeps its payload and `max(-0, +0)` is `+0`, where the interpreter returns the
//!   canonical NaN and either zero. Unlike the Cranelift path, loops with `exp`, `erf` or GELU
//!   are compiled on CPUs with FMA too (here they run at the full width).
//! - The loops are compiled by MCJIT ([`inkwell::execution_engine`]) in modules of about
//!   [`LOOPS_PER_UNIT`] on parallel threads; the helpers are bound by address. [`LlvmCode`] owns
//!   the contexts and engines; dropping it frees the code.
//! - Not compiled (as with Cranelift, [`jit::supported`]): integer division, integer `sign`,
//!   dropout. Kernels written ahead of time for `cleave compile` stay Cranelift's
//!   ([`crate::aot`]).

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::OnceLock;

use inkwell::context::Context;
use inkwell::execution_engine::ExecutionEngine;
use inkwell::memory_buffer::MemoryBuffer;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{
    CodeModel, InitializationConfig, RelocMode, Target, TargetMachine, TargetTriple,
};
use inkwell::OptimizationLevel;

use cleave_ir::{BinaryOp, CompareOp, DType, UnaryOp};

use crate::fused::{FusedKernel, Ins, Source, View};
use crate::jit::{self, JitFn};
use crate::vmath::{self, Lanes};

use std::array::from_fn;

/// One LLVM module's compiled loops: its context and the execution engine that owns the module
/// and its machine code.
struct Unit {
    // Declared before `ctx`: the engine (and its module) must go before their context.
    engine: Option<ExecutionEngine<'static>>,
    ctx: Option<Box<Context>>,
}

impl Drop for Unit {
    fn drop(&mut self) {
        drop(self.engine.take());
        drop(self.ctx.take());
    }
}

// SAFETY: a unit is built on one thread and then only dropped; running the compiled functions
// touches neither the context nor the engine.
unsafe impl Send for Unit {}

/// The compiled loops of one plan (one or more modules); dropped after the plan's steps, which
/// point into the code.
pub(crate) struct LlvmCode {
    _units: Vec<Unit>,
}

/// The host as LLVM sees it: its target machine (for the optimisation pipeline) and the CPU name
/// and features every function is compiled for.
struct Host {
    triple: TargetTriple,
    cpu: String,
    features: String,
    /// Lanes per vector.
    width: usize,
}

fn init() -> Result<(), String> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        Target::initialize_native(&InitializationConfig::default())
            .map_err(|e| format!("LLVM has no backend for this host: {e}"))
    })
    .clone()
}

fn host() -> Result<Host, String> {
    init()?;
    let triple = TargetMachine::get_default_triple();
    let cpu = TargetMachine::get_host_cpu_name().to_string();
    let features = TargetMachine::get_host_cpu_features().to_string();
    let has = |f: &str| features.split(',').any(|x| x == format!("+{f}"));
    let width = if has("avx512f") {
        16
    } else if has("avx") {
        8
    } else {
        4
    };
    Ok(Host {
        triple,
        cpu,
        features,
        width,
    })
}

/// Loops per module: the modules are compiled on parallel threads.
const LOOPS_PER_UNIT: usize = 16;

/// Compiles every supported loop of `kernels` (including those with `exp`, `erf` or GELU) and
/// sets each one's `jit`. The loops are split into modules of about [`LOOPS_PER_UNIT`],
/// compiled on up to as many threads as the host has cores. Returns the code (None if nothing
/// was compiled), or LLVM's message if it rejected a module (a bug in this generator).
pub(crate) fn compile_all<'a>(
    kernels: impl Iterator<Item = &'a mut FusedKernel>,
) -> Result<Option<LlvmCode>, String> {
    let mut kernels: Vec<&mut FusedKernel> = kernels.filter(|k| jit::supported(k)).collect();
    if kernels.is_empty() {
        return Ok(None);
    }
    let host = host()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n_units = kernels.len().div_ceil(LOOPS_PER_UNIT).min(threads).max(1);
    let per_unit = kernels.len().div_ceil(n_units);
    let texts: Vec<String> = kernels
        .chunks(per_unit)
        .map(|c| {
            let refs: Vec<&FusedKernel> = c.iter().map(|k| &**k).collect();
            module_text(&refs, &host)
        })
        .collect();
    let results: Vec<Result<(Unit, Vec<usize>), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = texts
            .iter()
            .zip(kernels.chunks(per_unit).map(|c| c.len()))
            .map(|(text, n)| {
                let host = &host;
                s.spawn(move || compile_unit(text, n, host))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("LLVM panicked".to_string()))
            })
            .collect()
    });
    let mut units = Vec::with_capacity(results.len());
    let mut addrs = Vec::with_capacity(kernels.len());
    for r in results {
        let (unit, a) = r?;
        units.push(unit);
        addrs.extend(a);
    }
    for (k, addr) in kernels.iter_mut().zip(addrs) {
        // SAFETY: the function was defined with exactly this signature (`void (ptr, i64, i64)`).
        k.jit = Some(unsafe { std::mem::transmute::<usize, JitFn>(addr) });
        k.vector_math = false;
    }
    Ok(Some(LlvmCode { _units: units }))
}

/// Parses, verifies, optimises and compiles one module of `n` loops (`fused0` …); returns it
/// with the loops' addresses.
fn compile_unit(text: &str, n: usize, host: &Host) -> Result<(Unit, Vec<usize>), String> {
    let ctx = Box::new(Context::create());
    // SAFETY: `ctx` is boxed (its address is stable) and outlives the engine: `Unit` drops the
    // engine first.
    let ctx_ref: &'static Context = unsafe { &*(&*ctx as *const Context) };
    let buf = MemoryBuffer::create_from_memory_range_copy(text.as_bytes(), "cleave_fused");
    let module = ctx_ref
        .create_module_from_ir(buf)
        .map_err(|e| format!("LLVM rejected the fused loops' IR: {e}"))?;
    module
        .verify()
        .map_err(|e| format!("LLVM's verifier rejected the fused loops' IR: {e}"))?;
    let target = Target::from_triple(&host.triple).map_err(|e| format!("LLVM target: {e}"))?;
    let tm = target
        .create_target_machine(
            &host.triple,
            &host.cpu,
            &host.features,
            OptimizationLevel::Aggressive,
            RelocMode::Default,
            CodeModel::JITDefault,
        )
        .ok_or_else(|| format!("LLVM has no target machine for {}", host.cpu))?;
    module.set_triple(&host.triple);
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    module
        .run_passes("default<O2>", &tm, PassBuilderOptions::create())
        .map_err(|e| format!("LLVM's optimisation pipeline: {e}"))?;
    let engine = module
        .create_jit_execution_engine(OptimizationLevel::Aggressive)
        .map_err(|e| format!("LLVM's JIT: {e}"))?;
    for (name, addr) in jit::helper_symbols() {
        if let Some(f) = module.get_function(name) {
            engine.add_global_mapping(&f, addr as usize);
        }
    }
    // On an error here the engine, then the module, then the context are dropped, in that order.
    let addrs = (0..n)
        .map(|i| {
            engine
                .get_function_address(&format!("fused{i}"))
                .map_err(|e| format!("LLVM's JIT lost fused loop {i}: {e}"))
        })
        .collect::<Result<Vec<usize>, String>>()?;
    // The module's handle holds the engine too: it goes before the unit can drop the context.
    drop(module);
    Ok((
        Unit {
            engine: Some(engine),
            ctx: Some(ctx),
        },
        addrs,
    ))
}

/// The LLVM IR module for `kernels`, function `fused{i}` for kernel `i`, for `host`.
fn module_text(kernels: &[&FusedKernel], host: &Host) -> String {
    let mut decls = BTreeSet::new();
    let mut out = String::new();
    for (i, k) in kernels.iter().enumerate() {
        Func::emit(k, i, host.width, &mut out, &mut decls);
    }
    for d in &decls {
        out.push_str(d);
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "attributes #0 = {{ nounwind \"target-cpu\"=\"{}\" \"target-features\"=\"{}\" \
         \"min-legal-vector-width\"=\"{}\" }}",
        host.cpu,
        host.features,
        host.width * 32
    );
    out
}

/// The module for `kernels` as LLVM IR text, for this host (tests and debugging).
#[cfg(test)]
pub(crate) fn host_module_text(kernels: &[&FusedKernel]) -> Result<String, String> {
    Ok(module_text(kernels, &host()?))
}

/// An SSA value or constant of the function being written: an index into [`Func::names`].
#[derive(Clone, Copy, Debug)]
struct V(u32);

/// The writer of one function.
struct Func<'a> {
    out: &'a mut String,
    decls: &'a mut BTreeSet<String>,
    /// Each value's text (`%t7`, or a constant).
    names: Vec<String>,
    /// Each buffer's base pointer, by buffer id.
    bases: HashMap<usize, V>,
    /// One-element views loaded once, by instruction index.
    hoisted: HashMap<usize, V>,
}

/// `T` or `<w x T>`.
fn ty(w: usize, t: &str) -> String {
    if w == 1 {
        t.to_string()
    } else {
        format!("<{w} x {t}>")
    }
}

/// An intrinsic's type suffix: `f32` or `v16f32`.
fn suffix(w: usize, t: &str) -> String {
    if w == 1 {
        t.to_string()
    } else {
        format!("v{w}{t}")
    }
}

/// Whether a value of `dt` lives in a `float` register (bf16, f16 and i8 are held widened).
fn in_f32_register(dt: DType) -> bool {
    matches!(dt, DType::F32 | DType::BF16 | DType::F16 | DType::I8)
}

/// The register type of a dtype (`bool` values are `i1`).
fn reg_ty(dt: DType) -> &'static str {
    match dt {
        d if in_f32_register(d) => "float",
        DType::I32 => "i32",
        _ => "i1",
    }
}

/// The alignment of one element in memory.
fn elem_align(dt: DType) -> usize {
    match dt {
        DType::F32 | DType::I32 => 4,
        DType::BF16 | DType::F16 => 2,
        _ => 1,
    }
}

/// The memory type of a dtype (`bool` and `i8` elements are bytes, bf16 and f16 ones `i16`
/// bit patterns).
fn mem_ty(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "float",
        DType::I32 => "i32",
        DType::BF16 | DType::F16 => "i16",
        _ => "i8",
    }
}

/// An `f32` constant as LLVM writes it: the `double` with the same value, in hex.
fn float_lit(v: f32) -> String {
    format!("0x{:016X}", (v as f64).to_bits())
}

/// The `i32` constant with bits `v` at width `w`.
fn int_lit(w: usize, v: u32) -> String {
    splat_lit(w, "i32", &(v as i32).to_string())
}

/// `lit` (a scalar constant of type `t`) at width `w`.
fn splat_lit(w: usize, t: &str, lit: &str) -> String {
    if w == 1 {
        lit.to_string()
    } else {
        format!("splat ({t} {lit})")
    }
}

impl<'a> Func<'a> {
    fn emit(
        k: &FusedKernel,
        idx: usize,
        width: usize,
        out: &'a mut String,
        decls: &'a mut BTreeSet<String>,
    ) {
        let _ = writeln!(
            out,
            "define void @fused{idx}(ptr %table, i64 %start, i64 %n) #0 {{\nentry:"
        );
        let mut f = Func {
            out,
            decls,
            names: Vec::new(),
            bases: HashMap::new(),
            hoisted: HashMap::new(),
        };
        for (j, ins) in k.prog.iter().enumerate() {
            let buf = match ins {
                Ins::Load { src, .. } => src.buf,
                Ins::Store { buf, .. } => *buf,
                _ => continue,
            };
            if !f.bases.contains_key(&buf.id) {
                let p = f.ins(format!(
                    "getelementptr inbounds ptr, ptr %table, i64 {}",
                    buf.id
                ));
                let p = f.ins(format!("load ptr, ptr {}, align 8", f.n(p)));
                f.bases.insert(buf.id, p);
            }
            if let Ins::Load { dtype, src, .. } = ins {
                if let Some(v) = &src.view {
                    if v.shape.is_empty() {
                        let base = f.bases[&src.buf.id];
                        let off = f.konst(v.offset.to_string());
                        let x = f.load_contig(*dtype, base, off, 1);
                        f.hoisted.insert(j, x);
                    }
                }
            }
        }
        let loops = [width, 1];
        let _ = writeln!(f.out, "  br label %head0");
        for (l, &w) in loops.iter().enumerate() {
            let step = w;
            let (from, pred) = if l == 0 {
                ("%start".to_string(), "entry".to_string())
            } else {
                (format!("%i{}", l - 1), format!("exit{}", l - 1))
            };
            let _ = writeln!(
                f.out,
                "head{l}:\n  %i{l} = phi i64 [ {from}, %{pred} ], [ %next{l}, %body{l} ]\n  \
                 %end{l} = add i64 %i{l}, {step}\n  %c{l} = icmp ule i64 %end{l}, %n\n  \
                 br i1 %c{l}, label %body{l}, label %exit{l}\nbody{l}:"
            );
            let i = f.konst(format!("%i{l}"));
            f.body::<1>(k, i, w);
            let next = if l + 1 < loops.len() {
                format!("label %head{}", l + 1)
            } else {
                String::new()
            };
            let _ = writeln!(
                f.out,
                "  %next{l} = add i64 %i{l}, {step}\n  br label %head{l}\nexit{l}:"
            );
            if next.is_empty() {
                let _ = writeln!(f.out, "  ret void");
            } else {
                let _ = writeln!(f.out, "  br {next}");
            }
        }
        let _ = writeln!(f.out, "}}\n");
    }

    fn n(&self, v: V) -> &str {
        &self.names[v.0 as usize]
    }

    /// A constant (or a name defined outside [`Func::ins`]).
    fn konst(&mut self, text: String) -> V {
        self.names.push(text);
        V(self.names.len() as u32 - 1)
    }

    /// A new SSA value `%tN = rhs`.
    fn ins(&mut self, rhs: String) -> V {
        let id = self.names.len();
        let _ = writeln!(self.out, "  %t{id} = {rhs}");
        self.names.push(format!("%t{id}"));
        V(id as u32)
    }

    /// Declares a function (an intrinsic or a helper) once per module.
    fn declare(&mut self, decl: String) {
        self.decls.insert(decl);
    }

    /// Calls intrinsic `llvm.{name}.{suffix}` returning `ret` on `args` (typed operands).
    fn intrinsic(&mut self, name: &str, ret: &str, args: &[(String, V)]) -> V {
        let params: Vec<&str> = args.iter().map(|(t, _)| t.as_str()).collect();
        self.declare(format!("declare {ret} @llvm.{name}({})", params.join(", ")));
        let a: Vec<String> = args
            .iter()
            .map(|(t, v)| format!("{t} {}", self.n(*v)))
            .collect();
        self.ins(format!("call {ret} @llvm.{name}({})", a.join(", ")))
    }

    /// `width` elements read contiguously from element position `pos` of `base`.
    fn load_contig(&mut self, dt: DType, base: V, pos: V, width: usize) -> V {
        let m = mem_ty(dt);
        let p = self.ins(format!(
            "getelementptr inbounds {m}, ptr {}, i64 {}",
            self.n(base),
            self.n(pos)
        ));
        let t = ty(width, m);
        let align = elem_align(dt);
        let x = self.ins(format!("load {t}, ptr {}, align {align}", self.n(p)));
        self.register_form(dt, x, width)
    }

    /// The element position of view element `idx` (an `i64`).
    fn view_pos(&mut self, v: &View, idx: V) -> V {
        let r = v.shape.len();
        let mut rem = idx;
        let mut pos = self.konst(v.offset.to_string());
        for d in (0..r).rev() {
            let id = if d == 0 {
                rem
            } else {
                self.ins(format!("urem i64 {}, {}", self.n(rem), v.shape[d]))
            };
            let t = self.ins(format!("mul i64 {}, {}", self.n(id), v.strides[d]));
            pos = self.ins(format!("add i64 {}, {}", self.n(pos), self.n(t)));
            if d > 0 {
                rem = self.ins(format!("udiv i64 {}, {}", self.n(rem), v.shape[d]));
            }
        }
        pos
    }

    /// Scalar `x` of register type `t` in every lane of a `w`-lane vector.
    fn splat(&mut self, t: &str, x: V, w: usize) -> V {
        if w == 1 {
            return x;
        }
        let vt = ty(w, t);
        let a = self.ins(format!(
            "insertelement {vt} poison, {t} {}, i64 0",
            self.n(x)
        ));
        self.ins(format!(
            "shufflevector {vt} {}, {vt} poison, <{w} x i32> zeroinitializer",
            self.n(a)
        ))
    }

    fn load(&mut self, j: usize, dt: DType, src: &Source, i: V, w: usize) -> V {
        let base = self.bases[&src.buf.id];
        let Some(v) = &src.view else {
            return self.load_contig(dt, base, i, w);
        };
        if let Some(&x) = self.hoisted.get(&j) {
            return self.splat(reg_ty(dt), x, w);
        }
        let r = v.shape.len();
        if w == 1 {
            let pos = self.view_pos(v, i);
            return self.load_contig(dt, base, pos, 1);
        }
        // Lanes i..i+w (i a multiple of w) share their outer indices when the innermost
        // dimension's length is a multiple of w.
        if v.shape[r - 1] % w == 0 && v.strides[r - 1] <= 1 {
            let pos = self.view_pos(v, i);
            if v.strides[r - 1] == 1 {
                return self.load_contig(dt, base, pos, w);
            }
            let x = self.load_contig(dt, base, pos, 1);
            return self.splat(reg_ty(dt), x, w);
        }
        self.gather(dt, base, v, i, w)
    }

    /// Lanes `i..i+w` of view `v` of `base`: their positions computed as one `<w x i64>` vector,
    /// then one `llvm.masked.gather`.
    fn gather(&mut self, dt: DType, base: V, v: &View, i: V, w: usize) -> V {
        let vi = ty(w, "i64");
        let lanes: Vec<String> = (0..w).map(|l| format!("i64 {l}")).collect();
        let iv = self.splat("i64", i, w);
        let idx = self.ins(format!("add {vi} {}, <{}>", self.n(iv), lanes.join(", ")));
        let pos = self.view_pos_vec(v, idx, w);
        let m = mem_ty(dt);
        let ptrs = self.ins(format!(
            "getelementptr inbounds {m}, ptr {}, {vi} {}",
            self.n(base),
            self.n(pos)
        ));
        let (mt, pt) = (ty(w, m), ty(w, "ptr"));
        let align = elem_align(dt);
        // LLVM 22's gather takes the alignment as an attribute of the pointers.
        let name = format!(
            "llvm.masked.gather.{}.v{w}p0",
            suffix(w, m.replace("float", "f32").as_str())
        );
        self.declare(format!("declare {mt} @{name}({pt}, {}, {mt})", ty(w, "i1")));
        let x = self.ins(format!(
            "call {mt} @{name}({pt} align {align} {}, {} {}, {mt} poison)",
            self.n(ptrs),
            ty(w, "i1"),
            splat_lit(w, "i1", "true")
        ));
        self.register_form(dt, x, w)
    }

    /// `w` elements of `dt` as loaded (`ty(w, mem_ty(dt))`) in their register form: bf16 and
    /// i8 widened to `float`, bool bytes compared to `i1`.
    fn register_form(&mut self, dt: DType, x: V, w: usize) -> V {
        let t = ty(w, mem_ty(dt));
        match dt {
            DType::F32 | DType::I32 => x,
            DType::BF16 => self.widen_bf16(x, w),
            DType::F16 => {
                let x = self.ins(format!("zext {t} {} to {}", self.n(x), ty(w, "i32")));
                self.widen_f16(x, w)
            }
            DType::I8 => self.ins(format!("sitofp {t} {} to {}", self.n(x), ty(w, "float"))),
            _ => {
                let z = if w == 1 { "0" } else { "zeroinitializer" };
                self.ins(format!("icmp ne {t} {}, {z}", self.n(x)))
            }
        }
    }

    /// `w` bf16 bit patterns (`i16` lanes) widened to `float` lanes (exact).
    fn widen_bf16(&mut self, h: V, w: usize) -> V {
        let (ht, it, ft) = (ty(w, "i16"), ty(w, "i32"), ty(w, "float"));
        let x = self.ins(format!("zext {ht} {} to {it}", self.n(h)));
        let sixteen = splat_lit(w, "i32", "16");
        let x = self.ins(format!("shl {it} {}, {sixteen}", self.n(x)));
        self.ins(format!("bitcast {it} {} to {ft}", self.n(x)))
    }

    /// `float` lanes rounded to the nearest bfloat16, ties to even, still `float`: the runtime's
    /// `fused::round_bf16` (NaN stays NaN, made quiet).
    fn round_bf16(&mut self, x: V, w: usize) -> V {
        let (it, ft, mt) = (ty(w, "i32"), ty(w, "float"), ty(w, "i1"));
        let c = |v: u32| int_lit(w, v);
        let bits = self.ins(format!("bitcast {ft} {} to {it}", self.n(x)));
        let odd = self.ins(format!("lshr {it} {}, {}", self.n(bits), c(16)));
        let odd = self.ins(format!("and {it} {}, {}", self.n(odd), c(1)));
        let r = self.ins(format!("add {it} {}, {}", self.n(bits), c(0x7fff)));
        let r = self.ins(format!("add {it} {}, {}", self.n(r), self.n(odd)));
        let r = self.ins(format!("and {it} {}, {}", self.n(r), c(0xffff_0000)));
        let nan = self.ins(format!("or {it} {}, {}", self.n(bits), c(0x0040_0000)));
        let nan = self.ins(format!("and {it} {}, {}", self.n(nan), c(0xffff_0000)));
        let un = self.ins(format!("fcmp uno {ft} {}, {}", self.n(x), self.n(x)));
        let v = self.ins(format!(
            "select {mt} {}, {it} {}, {it} {}",
            self.n(un),
            self.n(nan),
            self.n(r)
        ));
        self.ins(format!("bitcast {it} {} to {ft}", self.n(v)))
    }

    /// `float` lanes rounded to IEEE binary16, as bit patterns in `i32` lanes: the runtime's
    /// `fused::round_f16`, step for step (no fast-math flags: the float addition must round).
    fn round_f16(&mut self, x: V, w: usize) -> V {
        let (it, ft, mt) = (ty(w, "i32"), ty(w, "float"), ty(w, "i1"));
        let c = |v: u32| int_lit(w, v);
        let bits = self.ins(format!("bitcast {ft} {} to {it}", self.n(x)));
        let sign = self.ins(format!("and {it} {}, {}", self.n(bits), c(0x8000_0000)));
        let a = self.ins(format!("xor {it} {}, {}", self.n(bits), self.n(sign)));
        let is_nan = self.ins(format!("icmp ugt {it} {}, {}", self.n(a), c(0x7f80_0000)));
        let special = self.ins(format!(
            "select {mt} {}, {it} {}, {it} {}",
            self.n(is_nan),
            c(0x7e00),
            c(0x7c00)
        ));
        let af = self.ins(format!("bitcast {it} {} to {ft}", self.n(a)));
        let half = splat_lit(w, "float", &float_lit(0.5));
        let s = self.ins(format!("fadd {ft} {}, {half}", self.n(af)));
        let s = self.ins(format!("bitcast {ft} {} to {it}", self.n(s)));
        let sub = self.ins(format!("sub {it} {}, {}", self.n(s), c(0x3f00_0000)));
        let odd = self.ins(format!("lshr {it} {}, {}", self.n(a), c(13)));
        let odd = self.ins(format!("and {it} {}, {}", self.n(odd), c(1)));
        let n = self.ins(format!("add {it} {}, {}", self.n(a), c(0xc800_0fff)));
        let n = self.ins(format!("add {it} {}, {}", self.n(n), self.n(odd)));
        let normal = self.ins(format!("lshr {it} {}, {}", self.n(n), c(13)));
        let small = self.ins(format!("icmp ult {it} {}, {}", self.n(a), c(0x3880_0000)));
        let o = self.ins(format!(
            "select {mt} {}, {it} {}, {it} {}",
            self.n(small),
            self.n(sub),
            self.n(normal)
        ));
        let big = self.ins(format!("icmp uge {it} {}, {}", self.n(a), c(0x4780_0000)));
        let o = self.ins(format!(
            "select {mt} {}, {it} {}, {it} {}",
            self.n(big),
            self.n(special),
            self.n(o)
        ));
        let sign = self.ins(format!("lshr {it} {}, {}", self.n(sign), c(16)));
        self.ins(format!("or {it} {}, {}", self.n(o), self.n(sign)))
    }

    /// f16 bit patterns in `i32` lanes widened to `float` lanes (exact): the runtime's
    /// `fused::f16_to_f32`, step for step.
    fn widen_f16(&mut self, h: V, w: usize) -> V {
        let (it, ft, mt) = (ty(w, "i32"), ty(w, "float"), ty(w, "i1"));
        let c = |v: u32| int_lit(w, v);
        let m = self.ins(format!("and {it} {}, {}", self.n(h), c(0x7fff)));
        let m = self.ins(format!("shl {it} {}, {}", self.n(m), c(13)));
        let exp = self.ins(format!("and {it} {}, {}", self.n(m), c(0x0f80_0000)));
        let o = self.ins(format!("add {it} {}, {}", self.n(m), c(0x3800_0000)));
        let inf_nan = self.ins(format!("add {it} {}, {}", self.n(o), c(0x3800_0000)));
        let s = self.ins(format!("add {it} {}, {}", self.n(o), c(0x0080_0000)));
        let s = self.ins(format!("bitcast {it} {} to {ft}", self.n(s)));
        let magic = splat_lit(w, "float", &float_lit(f32::from_bits(0x3880_0000)));
        let s = self.ins(format!("fsub {ft} {}, {magic}", self.n(s)));
        let sub = self.ins(format!("bitcast {ft} {} to {it}", self.n(s)));
        let is_special = self.ins(format!("icmp eq {it} {}, {}", self.n(exp), c(0x0f80_0000)));
        let is_zero = self.ins(format!("icmp eq {it} {}, {}", self.n(exp), c(0)));
        let r = self.ins(format!(
            "select {mt} {}, {it} {}, {it} {}",
            self.n(is_zero),
            self.n(sub),
            self.n(o)
        ));
        let r = self.ins(format!(
            "select {mt} {}, {it} {}, {it} {}",
            self.n(is_special),
            self.n(inf_nan),
            self.n(r)
        ));
        let sign = self.ins(format!("and {it} {}, {}", self.n(h), c(0x8000)));
        let sign = self.ins(format!("shl {it} {}, {}", self.n(sign), c(16)));
        let r = self.ins(format!("or {it} {}, {}", self.n(r), self.n(sign)));
        self.ins(format!("bitcast {it} {} to {ft}", self.n(r)))
    }

    /// [`Func::view_pos`] on a vector of `w` element indices.
    fn view_pos_vec(&mut self, v: &View, idx: V, w: usize) -> V {
        let vi = ty(w, "i64");
        let c = |x: usize| splat_lit(w, "i64", &x.to_string());
        let r = v.shape.len();
        let mut rem = idx;
        let mut pos = self.konst(c(v.offset));
        for d in (0..r).rev() {
            let id = if d == 0 {
                rem
            } else {
                self.ins(format!("urem {vi} {}, {}", self.n(rem), c(v.shape[d])))
            };
            let t = self.ins(format!("mul {vi} {}, {}", self.n(id), c(v.strides[d])));
            pos = self.ins(format!("add {vi} {}, {}", self.n(pos), self.n(t)));
            if d > 0 {
                rem = self.ins(format!("udiv {vi} {}, {}", self.n(rem), c(v.shape[d])));
            }
        }
        pos
    }

    fn store(&mut self, dt: DType, x: V, base: V, i: V, w: usize) {
        let m = mem_ty(dt);
        let p = self.ins(format!(
            "getelementptr inbounds {m}, ptr {}, i64 {}",
            self.n(base),
            self.n(i)
        ));
        let align = elem_align(dt);
        let val = match dt {
            DType::F32 | DType::I32 => x,
            DType::BF16 => {
                // `x` holds a bf16 value widened: its high half is the bit pattern.
                let (it, ht) = (ty(w, "i32"), ty(w, "i16"));
                let bits = self.ins(format!("bitcast {} {} to {it}", ty(w, "float"), self.n(x)));
                let sixteen = splat_lit(w, "i32", "16");
                let h = self.ins(format!("lshr {it} {}, {sixteen}", self.n(bits)));
                self.ins(format!("trunc {it} {} to {ht}", self.n(h)))
            }
            DType::F16 => {
                // `x` holds an f16 value widened: rounding it again is exact.
                let h = self.round_f16(x, w);
                self.ins(format!(
                    "trunc {} {} to {}",
                    ty(w, "i32"),
                    self.n(h),
                    ty(w, "i16")
                ))
            }
            // `x` holds an integral value in [-128, 127] (made by a cast), so this is exact.
            DType::I8 => self.ins(format!(
                "fptosi {} {} to {}",
                ty(w, "float"),
                self.n(x),
                ty(w, "i8")
            )),
            _ => self.ins(format!(
                "zext {} {} to {}",
                ty(w, "i1"),
                self.n(x),
                ty(w, "i8")
            )),
        };
        let line = format!(
            "  store {} {}, ptr {}, align {align}",
            ty(w, m),
            self.n(val),
            self.n(p)
        );
        self.out.push_str(&line);
        self.out.push('\n');
    }

    /// Calls helper `f` (float → float, or (float, float) → float) on each lane of `args`.
    fn call_lanes(&mut self, f: &str, args: &[V], w: usize) -> V {
        let params = vec!["float"; args.len()].join(", ");
        self.declare(format!("declare float @{f}({params}) nounwind"));
        let call = |s: &mut Self, lane: &[V]| {
            let a: Vec<String> = lane.iter().map(|v| format!("float {}", s.n(*v))).collect();
            s.ins(format!("call float @{f}({})", a.join(", ")))
        };
        if w == 1 {
            return call(self, args);
        }
        let vt = ty(w, "float");
        let mut out = self.konst("poison".to_string());
        for l in 0..w {
            let lane: Vec<V> = args
                .iter()
                .map(|a| self.ins(format!("extractelement {vt} {}, i64 {l}", self.n(*a))))
                .collect();
            let r = call(self, &lane);
            out = self.ins(format!(
                "insertelement {vt} {}, float {}, i64 {l}",
                self.n(out),
                self.n(r)
            ));
        }
        out
    }

    /// `op` on every group: `f(self, x_u)` for u in 0..U.
    fn map<const U: usize>(&mut self, x: [V; U], f: impl Fn(&mut Self, V) -> V) -> [V; U] {
        from_fn(|u| f(self, x[u]))
    }

    /// One iteration's program: `U` groups of `w` lanes, group `u` at element `i + u·w`; each op
    /// is written for every group before the next op.
    fn body<const U: usize>(&mut self, k: &FusedKernel, i: V, w: usize) {
        let (ft, it, mt) = (ty(w, "float"), ty(w, "i32"), ty(w, "i1"));
        let (fs, is) = (suffix(w, "f32"), suffix(w, "i32"));
        let at: [V; U] = from_fn(|u| {
            if u == 0 {
                i
            } else {
                self.ins(format!("add i64 {}, {}", self.n(i), u * w))
            }
        });
        let mut fr: Vec<Option<[V; U]>> = vec![None; k.nf];
        let mut ir: Vec<Option<[V; U]>> = vec![None; k.ni];
        let mut br: Vec<Option<[V; U]>> = vec![None; k.nb];
        let fconst = |s: &mut Self, v: f32| [s.konst(splat_lit(w, "float", &float_lit(v))); U];
        let iconst = |s: &mut Self, v: i32| [s.konst(splat_lit(w, "i32", &v.to_string())); U];
        let bconst = |s: &mut Self, v: bool| [s.konst(splat_lit(w, "i1", &v.to_string())); U];
        for (j, ins) in k.prog.iter().enumerate() {
            match ins {
                Ins::Load { dtype, dst, src } => {
                    let v = from_fn(|u| self.load(j, *dtype, src, at[u], w));
                    match dtype {
                        d if in_f32_register(*d) => fr[*dst] = Some(v),
                        DType::I32 => ir[*dst] = Some(v),
                        _ => br[*dst] = Some(v),
                    }
                }
                Ins::SplatF { dst, v } => fr[*dst] = Some(fconst(self, *v)),
                Ins::SplatI { dst, v } => ir[*dst] = Some(iconst(self, *v)),
                Ins::SplatB { dst, v } => br[*dst] = Some(bconst(self, *v)),
                Ins::UnF { op, dst, a } => {
                    let x = fr[*a].expect("defined");
                    let intr = |s: &mut Self, name: &str, x: [V; U]| {
                        s.map(x, |s, x| {
                            s.intrinsic(&format!("{name}.{fs}"), &ft, &[(ft.clone(), x)])
                        })
                    };
                    let v = match op {
                        UnaryOp::Neg => self.map(x, |s, x| s.ins(format!("fneg {ft} {}", s.n(x)))),
                        UnaryOp::Abs => intr(self, "fabs", x),
                        UnaryOp::Sqrt => intr(self, "sqrt", x),
                        UnaryOp::Floor => intr(self, "floor", x),
                        UnaryOp::Round => intr(self, "roundeven", x),
                        UnaryOp::Reciprocal => {
                            let one = float_lit(1.0);
                            let one = splat_lit(w, "float", &one);
                            self.map(x, |s, x| s.ins(format!("fdiv {ft} {one}, {}", s.n(x))))
                        }
                        UnaryOp::Relu => {
                            let z = splat_lit(w, "float", &float_lit(0.0));
                            self.map(x, |s, x| {
                                let le = s.ins(format!("fcmp ole {ft} {}, {z}", s.n(x)));
                                s.ins(format!(
                                    "select {mt} {}, {ft} {z}, {ft} {}",
                                    s.n(le),
                                    s.n(x)
                                ))
                            })
                        }
                        UnaryOp::Rsqrt => {
                            // The helper's `(1 / sqrt(x as f64)) as f32`, the same three IEEE
                            // operations in double lanes.
                            let (dt, ds) = (ty(w, "double"), suffix(w, "f64"));
                            let one = splat_lit(w, "double", "1.0");
                            self.map(x, |s, x| {
                                let d = s.ins(format!("fpext {ft} {} to {dt}", s.n(x)));
                                let q = s.intrinsic(&format!("sqrt.{ds}"), &dt, &[(dt.clone(), d)]);
                                let r = s.ins(format!("fdiv {dt} {one}, {}", s.n(q)));
                                s.ins(format!("fptrunc {dt} {} to {ft}", s.n(r)))
                            })
                        }
                        UnaryOp::Exp => vmath::exp(&mut self.lanes::<U>(w), x),
                        UnaryOp::Erf => vmath::erf(&mut self.lanes::<U>(w), x),
                        UnaryOp::Gelu => vmath::gelu(&mut self.lanes::<U>(w), x),
                        u => {
                            let (f, _) = jit::unary_helper(*u).expect("checked by `supported`");
                            self.map(x, |s, x| s.call_lanes(f, &[x], w))
                        }
                    };
                    fr[*dst] = Some(v);
                }
                Ins::UnI { op, dst, a } => {
                    let x = ir[*a].expect("defined");
                    let z = splat_lit(w, "i32", "0");
                    let v = match op {
                        UnaryOp::Neg => {
                            self.map(x, |s, x| s.ins(format!("sub {it} {z}, {}", s.n(x))))
                        }
                        UnaryOp::Abs => {
                            let f = self.konst("false".to_string());
                            self.map(x, |s, x| {
                                s.intrinsic(
                                    &format!("abs.{is}"),
                                    &it,
                                    &[(it.clone(), x), ("i1".to_string(), f)],
                                )
                            })
                        }
                        _ => {
                            let zv = self.konst(z.clone());
                            self.map(x, |s, x| {
                                s.intrinsic(
                                    &format!("smax.{is}"),
                                    &it,
                                    &[(it.clone(), x), (it.clone(), zv)],
                                )
                            })
                        }
                    };
                    ir[*dst] = Some(v);
                }
                Ins::NotB { dst, a } => {
                    let x = br[*a].expect("defined");
                    let t = splat_lit(w, "i1", "true");
                    br[*dst] = Some(self.map(x, |s, x| s.ins(format!("xor {mt} {}, {t}", s.n(x)))));
                }
                Ins::BinF { op, dst, a, b } => {
                    let (x, y) = (fr[*a].expect("defined"), fr[*b].expect("defined"));
                    let v: [V; U] = from_fn(|u| {
                        let (x, y) = (x[u], y[u]);
                        let inst = match op {
                            BinaryOp::Add => "fadd",
                            BinaryOp::Sub => "fsub",
                            BinaryOp::Mul => "fmul",
                            BinaryOp::Div => "fdiv",
                            BinaryOp::Max | BinaryOp::Min => {
                                let name = if *op == BinaryOp::Max {
                                    "maximum"
                                } else {
                                    "minimum"
                                };
                                return self.intrinsic(
                                    &format!("{name}.{fs}"),
                                    &ft,
                                    &[(ft.clone(), x), (ft.clone(), y)],
                                );
                            }
                            _ => return self.call_lanes("cleave_rt_pow", &[x, y], w),
                        };
                        self.ins(format!("{inst} {ft} {}, {}", self.n(x), self.n(y)))
                    });
                    fr[*dst] = Some(v);
                }
                Ins::BinI { op, dst, a, b } => {
                    let (x, y) = (ir[*a].expect("defined"), ir[*b].expect("defined"));
                    let v: [V; U] = from_fn(|u| {
                        let (x, y) = (x[u], y[u]);
                        let inst = match op {
                            BinaryOp::Add => "add",
                            BinaryOp::Sub => "sub",
                            BinaryOp::Mul => "mul",
                            _ => {
                                let name = if *op == BinaryOp::Max { "smax" } else { "smin" };
                                return self.intrinsic(
                                    &format!("{name}.{is}"),
                                    &it,
                                    &[(it.clone(), x), (it.clone(), y)],
                                );
                            }
                        };
                        self.ins(format!("{inst} {it} {}, {}", self.n(x), self.n(y)))
                    });
                    ir[*dst] = Some(v);
                }
                Ins::BinB { op, dst, a, b } => {
                    let (x, y) = (br[*a].expect("defined"), br[*b].expect("defined"));
                    let inst = if *op == BinaryOp::And { "and" } else { "or" };
                    let v = from_fn(|u| {
                        self.ins(format!("{inst} {mt} {}, {}", self.n(x[u]), self.n(y[u])))
                    });
                    br[*dst] = Some(v);
                }
                Ins::Cmp {
                    dtype,
                    op,
                    dst,
                    a,
                    b,
                } => {
                    let (x, y) = match dtype {
                        DType::F32 => (fr[*a], fr[*b]),
                        DType::I32 => (ir[*a], ir[*b]),
                        _ => (br[*a], br[*b]),
                    };
                    let (x, y) = (x.expect("defined"), y.expect("defined"));
                    let (inst, t) = match dtype {
                        DType::F32 => ("fcmp", &ft),
                        DType::I32 => ("icmp", &it),
                        _ => ("icmp", &mt),
                    };
                    let cc = cond(*dtype, *op);
                    let v = from_fn(|u| {
                        self.ins(format!(
                            "{inst} {cc} {t} {}, {}",
                            self.n(x[u]),
                            self.n(y[u])
                        ))
                    });
                    br[*dst] = Some(v);
                }
                Ins::Sel {
                    dtype,
                    dst,
                    c,
                    a,
                    b,
                } => {
                    let m = br[*c].expect("defined");
                    let (t, x, y) = match dtype {
                        DType::F32 => (&ft, fr[*a], fr[*b]),
                        DType::I32 => (&it, ir[*a], ir[*b]),
                        _ => (&mt, br[*a], br[*b]),
                    };
                    let (x, y) = (x.expect("defined"), y.expect("defined"));
                    let v = from_fn(|u| {
                        self.ins(format!(
                            "select {mt} {}, {t} {}, {t} {}",
                            self.n(m[u]),
                            self.n(x[u]),
                            self.n(y[u])
                        ))
                    });
                    match dtype {
                        DType::F32 => fr[*dst] = Some(v),
                        DType::I32 => ir[*dst] = Some(v),
                        _ => br[*dst] = Some(v),
                    }
                }
                Ins::Cast { from, to, dst, a } => {
                    let x = match from {
                        d if in_f32_register(*d) => fr[*a],
                        DType::I32 => ir[*a],
                        _ => br[*a],
                    }
                    .expect("defined");
                    let fz = splat_lit(w, "float", &float_lit(0.0));
                    let fone = splat_lit(w, "float", &float_lit(1.0));
                    let iz = splat_lit(w, "i32", "0");
                    let v = match (from, to) {
                        (DType::F32, DType::F32) | (DType::I32, DType::I32) => x,
                        (DType::BF16 | DType::F16 | DType::I8, DType::F32) => x,
                        (DType::F32, DType::F16) => self.map(x, |s, x| {
                            let h = s.round_f16(x, w);
                            s.widen_f16(h, w)
                        }),
                        (DType::F32, DType::I8) => self.map(x, |s, x| {
                            // Rust's `as i8`: toward zero, saturating, NaN to 0; held widened.
                            let (bt, bs) = (ty(w, "i8"), suffix(w, "i8"));
                            let q = s.intrinsic(
                                &format!("fptosi.sat.{bs}.{fs}"),
                                &bt,
                                &[(ft.clone(), x)],
                            );
                            s.ins(format!("sitofp {bt} {} to {ft}", s.n(q)))
                        }),
                        (DType::F32, DType::BF16) => self.map(x, |s, x| s.round_bf16(x, w)),
                        (DType::F32, DType::I32) => self.map(x, |s, x| {
                            s.intrinsic(&format!("fptosi.sat.{is}.{fs}"), &it, &[(ft.clone(), x)])
                        }),
                        (DType::F32, _) => {
                            self.map(x, |s, x| s.ins(format!("fcmp une {ft} {}, {fz}", s.n(x))))
                        }
                        (DType::I32, DType::F32) => {
                            self.map(x, |s, x| s.ins(format!("sitofp {it} {} to {ft}", s.n(x))))
                        }
                        (DType::I32, _) => {
                            self.map(x, |s, x| s.ins(format!("icmp ne {it} {}, {iz}", s.n(x))))
                        }
                        (_, DType::F32) => self.map(x, |s, x| {
                            s.ins(format!("select {mt} {}, {ft} {fone}, {ft} {fz}", s.n(x)))
                        }),
                        (_, DType::I32) => {
                            self.map(x, |s, x| s.ins(format!("zext {mt} {} to {it}", s.n(x))))
                        }
                        _ => x,
                    };
                    match to {
                        d if in_f32_register(*d) => fr[*dst] = Some(v),
                        DType::I32 => ir[*dst] = Some(v),
                        _ => br[*dst] = Some(v),
                    }
                }
                Ins::Dropout { .. } => unreachable!("rejected by `supported`"),
                Ins::Store { dtype, src, buf } => {
                    let x = match dtype {
                        d if in_f32_register(*d) => fr[*src],
                        DType::I32 => ir[*src],
                        _ => br[*src],
                    }
                    .expect("defined");
                    let base = self.bases[&buf.id];
                    for u in 0..U {
                        self.store(*dtype, x[u], base, at[u], w);
                    }
                }
            }
        }
    }

    fn lanes<const U: usize>(&mut self, w: usize) -> TextLanes<'_, 'a, U> {
        TextLanes {
            f: self,
            w,
            fma: vmath::has_fma(),
        }
    }
}

/// The comparison's condition code: ordered for floats except `!=` (true when either is NaN, as
/// in Rust), signed for `i32`, unsigned for `bool` (`true` is 1).
fn cond(dt: DType, op: CompareOp) -> &'static str {
    match (dt, op) {
        (DType::F32, CompareOp::Eq) => "oeq",
        (DType::F32, CompareOp::Ne) => "une",
        (DType::F32, CompareOp::Lt) => "olt",
        (DType::F32, CompareOp::Le) => "ole",
        (DType::F32, CompareOp::Gt) => "ogt",
        (DType::F32, CompareOp::Ge) => "oge",
        (_, CompareOp::Eq) => "eq",
        (_, CompareOp::Ne) => "ne",
        (DType::I32, CompareOp::Lt) => "slt",
        (DType::I32, CompareOp::Le) => "sle",
        (DType::I32, CompareOp::Gt) => "sgt",
        (DType::I32, CompareOp::Ge) => "sge",
        (_, CompareOp::Lt) => "ult",
        (_, CompareOp::Le) => "ule",
        (_, CompareOp::Gt) => "ugt",
        (_, CompareOp::Ge) => "uge",
    }
}

/// [`Lanes`] as LLVM IR text on `U` groups of `w`-lane vectors (or scalars, `w` = 1).
struct TextLanes<'f, 'a, const U: usize> {
    f: &'f mut Func<'a>,
    w: usize,
    /// Write `llvm.fma` for `mul_add` ([`vmath::has_fma`]).
    fma: bool,
}

impl<const U: usize> TextLanes<'_, '_, U> {
    fn bin(&mut self, inst: &str, t: &str, a: [V; U], b: [V; U]) -> [V; U] {
        let t = ty(self.w, t);
        from_fn(|u| {
            let f = &mut *self.f;
            f.ins(format!("{inst} {t} {}, {}", f.n(a[u]), f.n(b[u])))
        })
    }
    fn shift(&mut self, inst: &str, a: [V; U], n: u8) -> [V; U] {
        let t = ty(self.w, "i32");
        let c = splat_lit(self.w, "i32", &n.to_string());
        from_fn(|u| {
            let f = &mut *self.f;
            f.ins(format!("{inst} {t} {}, {c}", f.n(a[u])))
        })
    }
    fn cast(&mut self, from: &str, to: &str, a: [V; U]) -> [V; U] {
        let (ft, tt) = (ty(self.w, from), ty(self.w, to));
        from_fn(|u| {
            let f = &mut *self.f;
            f.ins(format!("bitcast {ft} {} to {tt}", f.n(a[u])))
        })
    }
}

impl<const U: usize> Lanes for TextLanes<'_, '_, U> {
    type F = [V; U];
    type I = [V; U];
    type M = [V; U];
    fn splat(&mut self, v: f32) -> [V; U] {
        [self.f.konst(splat_lit(self.w, "float", &float_lit(v))); U]
    }
    fn isplat(&mut self, v: i32) -> [V; U] {
        [self.f.konst(splat_lit(self.w, "i32", &v.to_string())); U]
    }
    fn add(&mut self, a: [V; U], b: [V; U]) -> [V; U] {
        self.bin("fadd", "float", a, b)
    }
    fn sub(&mut self, a: [V; U], b: [V; U]) -> [V; U] {
        self.bin("fsub", "float", a, b)
    }
    fn mul(&mut self, a: [V; U], b: [V; U]) -> [V; U] {
        self.bin("fmul", "float", a, b)
    }
    fn div(&mut self, a: [V; U], b: [V; U]) -> [V; U] {
        self.bin("fdiv", "float", a, b)
    }
    fn mul_add(&mut self, a: [V; U], x: [V; U], c: [V; U]) -> [V; U] {
        if !self.fma {
            let p = self.mul(a, x);
            return self.add(p, c);
        }
        let t = ty(self.w, "float");
        let name = format!("fma.{}", suffix(self.w, "f32"));
        from_fn(|u| {
            self.f.intrinsic(
                &name,
                &t,
                &[(t.clone(), a[u]), (t.clone(), x[u]), (t.clone(), c[u])],
            )
        })
    }
    fn abs(&mut self, a: [V; U]) -> [V; U] {
        let t = ty(self.w, "float");
        let name = format!("fabs.{}", suffix(self.w, "f32"));
        from_fn(|u| self.f.intrinsic(&name, &t, &[(t.clone(), a[u])]))
    }
    fn lt(&mut self, a: [V; U], b: [V; U]) -> [V; U] {
        self.bin("fcmp olt", "float", a, b)
    }
    fn select(&mut self, m: [V; U], a: [V; U], b: [V; U]) -> [V; U] {
        let (mt, t) = (ty(self.w, "i1"), ty(self.w, "float"));
        from_fn(|u| {
            let f = &mut *self.f;
            f.ins(format!(
                "select {mt} {}, {t} {}, {t} {}",
                f.n(m[u]),
                f.n(a[u]),
                f.n(b[u])
            ))
        })
    }
    fn to_bits(&mut self, a: [V; U]) -> [V; U] {
        self.cast("float", "i32", a)
    }
    fn of_bits(&mut self, a: [V; U]) -> [V; U] {
        self.cast("i32", "float", a)
    }
    fn iadd(&mut self, a: [V; U], b: [V; U]) -> [V; U] {
        self.bin("add", "i32", a, b)
    }
    fn isub(&mut self, a: [V; U], b: [V; U]) -> [V; U] {
        self.bin("sub", "i32", a, b)
    }
    fn iand(&mut self, a: [V; U], b: [V; U]) -> [V; U] {
        self.bin("and", "i32", a, b)
    }
    fn ior(&mut self, a: [V; U], b: [V; U]) -> [V; U] {
        self.bin("or", "i32", a, b)
    }
    fn sshr(&mut self, a: [V; U], n: u8) -> [V; U] {
        self.shift("ashr", a, n)
    }
    fn shl(&mut self, a: [V; U], n: u8) -> [V; U] {
        self.shift("shl", a, n)
    }
}

#[cfg(test)]
mod tests {
    //! LLVM's loops against the interpreted loop, bit for bit: `exp`, `erf` and GELU over every
    //! binade (through the vector loop and the scalar tail), and the IR the generator
    //! writes (vector width, CPU attributes).

    use crate::{compile_with, Codegen, CompileOptions, Plan};
    use cleave_ir::parse_function;

    /// Every 499,979th bit pattern of both signs plus the edge cases; the count is 35 mod 64, so
    /// elements reach both loops of the kernel (vectors and the scalar tail) at any width.
    fn inputs() -> Vec<f32> {
        crate::vmath::sweep(499_979, 64, 35)
    }

    fn run(xs: &[f32], jit: bool) -> (Vec<Vec<f32>>, Plan) {
        let n = xs.len();
        let text = format!(
            r#"func @f {{
  %x = input {{name = "x"}} : f32[{n}]
  %e = exp %x : f32[{n}]
  %r = erf %x : f32[{n}]
  %g = gelu %x : f32[{n}]
  %l = log %x : f32[{n}]
  %m = max %x, %e : f32[{n}]
  %q = rsqrt %x : f32[{n}]
  return %e as "exp", %r as "erf", %g as "gelu", %l as "log", %m as "max", %q as "rsqrt"
}}"#
        );
        let opts = CompileOptions {
            jit,
            codegen: Codegen::Llvm,
            ..CompileOptions::default()
        };
        crate::vmath::run_sweep(&text, xs, &opts, 6)
    }

    #[test]
    fn llvm_loops_match_the_interpreted_loop_bit_for_bit() {
        let xs = inputs();
        let (llvm, plan) = run(&xs, true);
        assert_eq!(plan.codegen(), Some(Codegen::Llvm));
        assert_eq!(plan.jit_kernels(), plan.fused_kernels());
        assert_eq!(plan.vector_math_kernels(), 0);
        let (interp, plan) = run(&xs, false);
        assert_eq!(plan.jit_kernels() + plan.vector_math_kernels(), 0);
        let names = ["exp", "erf", "gelu", "log", "max", "rsqrt"];
        for (name, (a, b)) in names.iter().zip(llvm.iter().zip(&interp)) {
            for (i, (&p, &q)) in a.iter().zip(b).enumerate() {
                let same = p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan());
                assert!(same, "{name}({:e}): LLVM {p:e}, interpreted {q:e}", xs[i]);
            }
        }
        let at = |x: f32| xs.iter().position(|&v| v.to_bits() == x.to_bits()).unwrap();
        assert_eq!(llvm[0][at(0.0)], 1.0);
        assert_eq!(llvm[1][at(f32::INFINITY)], 1.0);
        assert!((llvm[2][at(1.0)] - 0.841_344_7).abs() < 1e-6);
        assert!((llvm[3][at(0.5)] - 0.5f32.ln()).abs() < 1e-7);
    }

    #[test]
    fn the_module_is_written_for_the_host() {
        let f = parse_function(
            r#"func @f {
  %x = input {name = "x"} : f32[5,7]
  %c = input {name = "c"} : f32[7]
  %b = broadcast %c {dims = [1]} : f32[5,7]
  %y = mul %x, %b : f32[5,7]
  %e = exp %y : f32[5,7]
  return %e as "e"
}"#,
        )
        .unwrap();
        let mut plan = compile_with(
            &f,
            &CompileOptions {
                jit: false,
                ..CompileOptions::default()
            },
        )
        .unwrap();
        let kernels: Vec<&crate::fused::FusedKernel> = plan
            .steps
            .iter_mut()
            .filter_map(|s| match &s.kernel {
                crate::plan::Kernel::Fused(k) => Some(k),
                _ => None,
            })
            .collect();
        let text = super::host_module_text(&kernels).unwrap();
        let host = super::host().unwrap();
        let w = host.width;
        assert!(text.contains(&format!("load <{w} x float>")), "{text}");
        assert!(text.contains("\"target-cpu\""), "{text}");
        // One vector per iteration, then the scalar tail.
        assert!(
            text.contains(&format!("%end0 = add i64 %i0, {w}")),
            "{text}"
        );
        assert!(text.contains("%end1 = add i64 %i1, 1"), "{text}");
        // A broadcast row of 7 is not a multiple of the width: one gather per vector.
        assert!(text.contains("@llvm.masked.gather.v"), "{text}");
    }
}
