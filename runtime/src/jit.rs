//! Native code for fused loops, generated with Cranelift.
//!
//! Each fused loop program (the one [`FusedKernel::run`] interprets) becomes one function
//! `fn(bufs: *const *mut f32, start: usize, end: usize)`: `bufs` is the plan's table of buffer
//! base pointers (indexed by buffer id), and the function computes elements `start..end` (`start`
//! a multiple of 64, so that large loops can be split across threads, [`FusedKernel::run`]). The body runs 4 elements at a time in 128-bit
//! SIMD registers (`f32x4`, `i32x4`; `bool` values are lane masks, all ones or zero), then a scalar
//! tail over the remaining elements with the same program at width 1.
//!
//! - Loads: contiguous operands are vector loads; a strided view whose innermost dimension is a
//!   multiple of 4 long loads 4 neighbouring lanes at once (stride 1: one vector load; stride 0:
//!   one splat); any other view computes each lane's position and inserts it; a view of one
//!   element is loaded once, before the loop.
//! - Ops: arithmetic, min/max (NaN-propagating), neg/abs/relu/sqrt/floor/round/reciprocal,
//!   compares, select, casts between `f32`, `i32` and `bool`, `and`/`or`/`not` are native
//!   instructions. `exp`, `erf` and the exact-erf GELU are emitted inline as `f32x4` polynomial
//!   code ([`crate::vmath`], through [`ClifLanes`], with `fma` when the CPU has FMA): the same
//!   operations as the interpreted loop's versions, so bit-identical to it. Loops with such code
//!   run two vectors per iteration, interleaved op by op, so the long dependency chains overlap.
//!   The other transcendentals (log, tanh, sigmoid, sin, cos, …) and `pow` call the interpreted
//!   loop's Rust functions once per lane, so their results are bit-identical too.
//! - On a CPU with FMA, loops containing `exp`, `erf` or GELU are *not* compiled: the interpreted
//!   loop runs those ops over whole chunks through AVX-512/AVX2 slice functions (16 or 8 lanes),
//!   which measured faster than 4-lane Cranelift code (GPT block step 0.425 against 0.52 ms);
//!   [`crate::Plan::vector_math_kernels`] counts them.
//! - One code generator, two backends: [`define_kernels`] is generic over cranelift-module's
//!   `Module`; [`compile_all`] puts the loops into a `JITModule` at plan compile time, and
//!   [`crate::aot`] puts the same function bodies into an `ObjectModule` (cranelift-object) for
//!   `cleave compile`'s executables, whose loops the plan then takes by [`fingerprint`] instead
//!   of compiling them again. The per-lane helpers are exported under fixed C names
//!   (`cleave_rt_log`, …) and called as imported symbols, so the generated code holds no
//!   absolute address.
//! - Not compiled (the loop stays interpreted): integer division (it reports division by zero),
//!   integer `sign`, and dropout. [`crate::Plan::jit_kernels`] counts the loops that were compiled.
//!
//! All loads of a step happen before its stores, as in the interpreted loop, so a result may be
//! written in place of a contiguously loaded operand.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I8};
use cranelift_codegen::ir::{AbiParam, FuncRef, InstBuilder, MemFlagsData, Signature, Type, Value};
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, FuncId, Linkage, Module};

use cleave_ir::{BinaryOp, CompareOp, DType, UnaryOp};

use crate::fused::{unary_f, FusedKernel, Ins, Source, View};
use crate::vmath::{self, Lanes};

use std::array::from_fn;

/// Vectors per iteration of a loop with inline polynomial code (see [`Emitter::emit_loop`]).
const UNROLL: usize = 2;

/// Ops emitted as inline polynomial code ([`crate::vmath`]).
fn is_inline_poly(op: UnaryOp) -> bool {
    matches!(op, UnaryOp::Exp | UnaryOp::Erf | UnaryOp::Gelu)
}

fn has_inline_poly(k: &FusedKernel) -> bool {
    k.prog
        .iter()
        .any(|ins| matches!(ins, Ins::UnF { op, .. } if is_inline_poly(*op)))
}

/// True if loops with `exp`, `erf` or GELU should stay interpreted: on a CPU with FMA the
/// interpreter runs those ops through [`crate::vmath`]'s AVX2/AVX-512 slice functions, 8–16
/// lanes wide, while Cranelift's SIMD is 128 bits (GPT block step: 0.425 against 0.52 ms).
/// Unit tests can force the JIT's inline code (`FORCE_INLINE_POLY`).
fn prefer_wide_vector_math() -> bool {
    #[cfg(test)]
    if FORCE_INLINE_POLY.with(|f| f.get()) {
        return false;
    }
    vmath::has_fma()
}

#[cfg(test)]
thread_local! {
    /// Tests only: JIT-compile loops with `exp`/`erf`/GELU even on a CPU with FMA.
    static FORCE_INLINE_POLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A compiled fused loop.
pub(crate) type JitFn = unsafe extern "C" fn(*const *mut f32, usize, usize);

/// The executable memory of a plan's compiled loops; freed when dropped.
pub(crate) struct JitCode {
    module: Option<JITModule>,
}

impl Drop for JitCode {
    fn drop(&mut self) {
        if let Some(m) = self.module.take() {
            // SAFETY: the plan that owns this code is being dropped, so no function pointer into
            // it is called again.
            unsafe { m.free_memory() };
        }
    }
}

// SAFETY: the module is only touched at compile time and on drop, never shared between threads.
unsafe impl Send for JitCode {}

/// Fused loops this process compiled with the JIT (all plans together).
static JIT_COMPILED: AtomicUsize = AtomicUsize::new(0);

/// Fused loops this process compiled with the JIT so far.
pub(crate) fn jit_compiled() -> usize {
    JIT_COMPILED.load(Ordering::Relaxed)
}

// The Rust helpers that compiled loops call per lane. They are exported under fixed C names
// so that a JIT module (which is given their addresses) and an object file written ahead of
// time (whose calls the system linker resolves against the runtime's static library) call the
// same functions.
macro_rules! unary_helpers {
    ($($name:ident => $op:expr),* $(,)?) => {
        $(
            #[doc = concat!("Per-lane helper of compiled fused loops: `", stringify!($op), "`.")]
            #[no_mangle]
            pub extern "C" fn $name(x: f32) -> f32 { unary_f($op, x) }
        )*
        /// The helper a unary float op calls (its C name and address), if it has no native
        /// instruction.
        pub(crate) fn unary_helper(u: UnaryOp) -> Option<(&'static str, *const u8)> {
            $(if u == $op {
                return Some((stringify!($name), $name as *const u8));
            })*
            None
        }
        /// Every helper's C name and address.
        pub(crate) fn helper_symbols() -> Vec<(&'static str, *const u8)> {
            vec![
                $((stringify!($name), $name as *const u8),)*
                ("cleave_rt_pow", cleave_rt_pow as *const u8),
            ]
        }
    };
}

unary_helpers! {
    cleave_rt_log => UnaryOp::Log,
    cleave_rt_rsqrt => UnaryOp::Rsqrt,
    cleave_rt_tanh => UnaryOp::Tanh,
    cleave_rt_sigmoid => UnaryOp::Sigmoid,
    cleave_rt_gelu_tanh => UnaryOp::GeluTanh,
    cleave_rt_silu => UnaryOp::Silu,
    cleave_rt_sin => UnaryOp::Sin,
    cleave_rt_cos => UnaryOp::Cos,
    cleave_rt_sign => UnaryOp::Sign,
}

/// Per-lane helper of compiled fused loops: `pow`.
#[no_mangle]
pub extern "C" fn cleave_rt_pow(a: f32, b: f32) -> f32 {
    (a as f64).powf(b as f64) as f32
}

/// True if, on this CPU, the loop runs interpreted over wide vector-math slices instead of
/// being compiled (CPUs with FMA, loops with inline polynomials; see the module docs).
pub(crate) fn runs_as_vector_math(k: &FusedKernel) -> bool {
    prefer_wide_vector_math() && has_inline_poly(k)
}

/// True if every instruction of the program has a native translation.
pub(crate) fn supported(k: &FusedKernel) -> bool {
    k.prog.iter().all(|ins| match ins {
        Ins::UnI { op, .. } => matches!(op, UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu),
        Ins::BinI { op, .. } => matches!(
            op,
            BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Max | BinaryOp::Min
        ),
        Ins::UnF { op, .. } => *op != UnaryOp::Not,
        Ins::BinF { op, .. } => !matches!(op, BinaryOp::And | BinaryOp::Or),
        Ins::Dropout { .. } => false,
        _ => true,
    })
}

/// Bumped whenever the code generated for a program changes, so fingerprints of kernels
/// compiled ahead of time by another version never match.
const CODEGEN_VERSION: &str = "cleave-fused-codegen-3";

/// A 128-bit fingerprint of everything the generated code of `k` depends on (the program with
/// its buffer ids, views and constants, and the register counts), FNV-1a over its debug text.
/// An ahead-of-time kernel is only ever used for a loop with the same fingerprint.
pub(crate) fn fingerprint(k: &FusedKernel) -> u128 {
    let text = format!("{CODEGEN_VERSION};{};{};{};{:?}", k.nf, k.ni, k.nb, k.prog);
    fnv128(text.as_bytes())
}

/// FNV-1a, 128 bits.
pub(crate) fn fnv128(bytes: &[u8]) -> u128 {
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for &b in bytes {
        h ^= b as u128;
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    h
}

/// The host's instruction set with the kernels' settings. `pic`: position-independent code
/// (an object file linked into a PIE); the JIT uses absolute addresses.
pub(crate) fn host_isa(pic: bool) -> Result<OwnedTargetIsa, String> {
    let mut flags = settings::builder();
    let set = |flags: &mut settings::Builder, k: &str, v: &str| {
        flags
            .set(k, v)
            .map_err(|e| format!("cranelift setting {k}={v}: {e}"))
    };
    set(&mut flags, "opt_level", "speed")?;
    set(&mut flags, "use_colocated_libcalls", "false")?;
    set(&mut flags, "is_pic", if pic { "true" } else { "false" })?;
    cranelift_native::builder()
        .map_err(|e| format!("this host has no Cranelift backend: {e}"))?
        .finish(settings::Flags::new(flags))
        .map_err(|e| format!("cranelift: {e}"))
}

/// Declares and defines one function per kernel in `module`, named `{prefix}{i}` with
/// `linkage`: the one code generator behind both the JIT ([`compile_all`]) and the object files
/// of `cleave compile` ([`crate::aot`]). Returns each kernel's function, `None` where Cranelift
/// rejected it (that loop stays interpreted).
pub(crate) fn define_kernels<M: Module>(
    module: &mut M,
    kernels: &[&FusedKernel],
    prefix: &str,
    linkage: Linkage,
) -> Result<Vec<Option<FuncId>>, String> {
    let ptr = module.target_config().pointer_type();
    let mut ctx = module.make_context();
    let mut fctx = FunctionBuilderContext::new();
    let mut helpers: HashMap<&'static str, FuncId> = HashMap::new();
    let mut ids = Vec::with_capacity(kernels.len());
    for (i, k) in kernels.iter().enumerate() {
        ctx.func.signature.params.push(AbiParam::new(ptr));
        ctx.func.signature.params.push(AbiParam::new(ptr));
        ctx.func.signature.params.push(AbiParam::new(ptr));
        let refs = import_helpers(module, &mut ctx, k, &mut helpers)?;
        {
            let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
            Emitter::build(&mut b, k, ptr, refs);
            b.finalize(module.target_config());
        }
        let id = module
            .declare_function(&format!("{prefix}{i}"), linkage, &ctx.func.signature)
            .map_err(|e| format!("cranelift: {e}"))?;
        let defined = module.define_function(id, &mut ctx).is_ok();
        module.clear_context(&mut ctx);
        ids.push(defined.then_some(id));
    }
    Ok(ids)
}

/// Declares the helpers `k` calls in `module` (once) and in the function being built.
fn import_helpers<M: Module>(
    module: &mut M,
    ctx: &mut Context,
    k: &FusedKernel,
    declared: &mut HashMap<&'static str, FuncId>,
) -> Result<HashMap<&'static str, FuncRef>, String> {
    let call_conv = module.target_config().default_call_conv;
    let mut refs = HashMap::new();
    for ins in &k.prog {
        let (name, arity) = match ins {
            Ins::UnF { op, .. } => match unary_helper(*op) {
                Some((name, _)) => (name, 1),
                None => continue,
            },
            Ins::BinF {
                op: BinaryOp::Pow, ..
            } => ("cleave_rt_pow", 2),
            _ => continue,
        };
        if refs.contains_key(name) {
            continue;
        }
        let id = match declared.get(name) {
            Some(&id) => id,
            None => {
                let mut sig = Signature::new(call_conv);
                for _ in 0..arity {
                    sig.params.push(AbiParam::new(F32));
                }
                sig.returns.push(AbiParam::new(F32));
                let id = module
                    .declare_function(name, Linkage::Import, &sig)
                    .map_err(|e| format!("cranelift: {e}"))?;
                declared.insert(name, id);
                id
            }
        };
        refs.insert(name, module.declare_func_in_func(id, &mut ctx.func));
    }
    Ok(refs)
}

/// Compiles every supported fused loop of `kernels` into one module; sets each compiled
/// kernel's `jit`. Loops whose code was compiled ahead of time ([`crate::aot`]) take that code
/// and are not compiled again. Returns the module (None if nothing was compiled or the host
/// has no ISA).
pub(crate) fn compile_all<'a>(
    kernels: impl Iterator<Item = &'a mut FusedKernel>,
) -> Option<JitCode> {
    let mut kernels: Vec<&mut FusedKernel> = kernels
        .filter(|k| supported(k))
        .filter_map(|k| {
            if runs_as_vector_math(k) {
                k.vector_math = true;
                None
            } else {
                Some(k)
            }
        })
        .collect();
    crate::aot::attach(&mut kernels);
    kernels.retain(|k| k.jit.is_none());
    if kernels.is_empty() {
        return None;
    }
    let isa = host_isa(false).ok()?;
    let mut builder = JITBuilder::with_isa(isa, default_libcall_names());
    builder.symbols(helper_symbols());
    let mut module = JITModule::new(builder);
    let ids = {
        let refs: Vec<&FusedKernel> = kernels.iter().map(|k| &**k).collect();
        define_kernels(&mut module, &refs, "fused", Linkage::Local).ok()?
    };
    module.finalize_definitions().ok()?;
    for (k, id) in kernels.iter_mut().zip(ids) {
        if let Some(id) = id {
            let p = module.get_finalized_function(id);
            // SAFETY: the function was built with exactly this signature.
            k.jit = Some(unsafe { std::mem::transmute::<*const u8, JitFn>(p) });
            JIT_COMPILED.fetch_add(1, Ordering::Relaxed);
        }
    }
    Some(JitCode {
        module: Some(module),
    })
}

struct Emitter {
    /// Base pointer of each buffer id used (loaded once in the entry block).
    bases: std::collections::HashMap<usize, Value>,
    /// Scalars loaded once: one-element views, by instruction index.
    hoisted: std::collections::HashMap<usize, Value>,
    /// The per-lane helpers this loop calls, by C name.
    helpers: HashMap<&'static str, FuncRef>,
    ptr: Type,
}

fn flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

fn elem_bytes(dt: DType) -> i64 {
    match dt {
        DType::F32 | DType::I32 => 4,
        DType::BF16 | DType::F16 => 2,
        // i8 and bool.
        _ => 1,
    }
}

/// Whether a value of `dt` lives in an f32 register (bf16, f16 and i8 are held widened).
fn in_f32_register(dt: DType) -> bool {
    matches!(dt, DType::F32 | DType::BF16 | DType::F16 | DType::I8)
}

/// The integer constant `v` as an `i32` (`w` = 1) or an `i32x4` splat.
fn int_lanes(b: &mut FunctionBuilder, w: usize, v: u32) -> Value {
    let k = b.ins().iconst(I32, v as i32 as i64);
    if w == 1 {
        k
    } else {
        b.ins().splat(I32X4, k)
    }
}

/// The float constant with bits `v` as an `f32` or an `f32x4` splat.
fn float_lanes(b: &mut FunctionBuilder, w: usize, v: u32) -> Value {
    let k = b.ins().f32const(f32::from_bits(v));
    if w == 1 {
        k
    } else {
        b.ins().splat(F32X4, k)
    }
}

/// The lane mask of `x cc k` (`x` an `i32` or `i32x4`).
fn int_mask(b: &mut FunctionBuilder, w: usize, cc: IntCC, x: Value, k: u32) -> Value {
    let k = int_lanes(b, w, k);
    let c = b.ins().icmp(cc, x, k);
    if w == 1 {
        mask_from_i8(b, c)
    } else {
        c
    }
}

/// `x` (`f32` or `f32x4`) rounded to IEEE binary16, as bit patterns in `i32` lanes: the
/// runtime's `fused::round_f16`, step for step.
fn round_f16(b: &mut FunctionBuilder, x: Value, w: usize) -> Value {
    let (fty, ity) = if w == 1 { (F32, I32) } else { (F32X4, I32X4) };
    let bits = b.ins().bitcast(ity, MemFlagsData::new(), x);
    let sign_bit = int_lanes(b, w, 0x8000_0000);
    let sign = b.ins().band(bits, sign_bit);
    let a = b.ins().bxor(bits, sign);
    // ∞ or NaN (`|x|` ≥ 2¹⁶, `a` < 2³¹ so signed comparisons hold).
    let is_nan = int_mask(b, w, IntCC::SignedGreaterThan, a, 0x7f80_0000);
    let (qnan, inf) = (int_lanes(b, w, 0x7e00), int_lanes(b, w, 0x7c00));
    let special = select(b, w, is_nan, qnan, inf, ity);
    // A subnormal or zero: `|x| + 0.5` puts the rounded mantissa in the low bits.
    let af = b.ins().bitcast(fty, MemFlagsData::new(), a);
    let half = float_lanes(b, w, 0x3f00_0000);
    let s = b.ins().fadd(af, half);
    let s = b.ins().bitcast(ity, MemFlagsData::new(), s);
    let magic = int_lanes(b, w, 0x3f00_0000);
    let sub = b.ins().isub(s, magic);
    // A normal value: rebias, round the 13 dropped bits to even.
    let odd = b.ins().ushr_imm_u(a, 13);
    let one = int_lanes(b, w, 1);
    let odd = b.ins().band(odd, one);
    let bias = int_lanes(b, w, 0xc800_0fff);
    let n = b.ins().iadd(a, bias);
    let n = b.ins().iadd(n, odd);
    let normal = b.ins().ushr_imm_u(n, 13);
    let small = int_mask(b, w, IntCC::SignedLessThan, a, 0x3880_0000);
    let o = select(b, w, small, sub, normal, ity);
    let big = int_mask(b, w, IntCC::SignedGreaterThanOrEqual, a, 0x4780_0000);
    let o = select(b, w, big, special, o, ity);
    let sign = b.ins().ushr_imm_u(sign, 16);
    b.ins().bor(o, sign)
}

/// f16 bit patterns in the low half of `i32` lanes widened to `f32` lanes (exact): the
/// runtime's `fused::f16_to_f32`, step for step.
fn widen_f16(b: &mut FunctionBuilder, h: Value, w: usize) -> Value {
    let (fty, ity) = if w == 1 { (F32, I32) } else { (F32X4, I32X4) };
    let low = int_lanes(b, w, 0x7fff);
    let m = b.ins().band(h, low);
    let m = b.ins().ishl_imm_u(m, 13);
    let exp_bits = int_lanes(b, w, 0x0f80_0000);
    let exp = b.ins().band(m, exp_bits);
    let rebias = int_lanes(b, w, 0x3800_0000);
    let o = b.ins().iadd(m, rebias);
    let inf_nan = b.ins().iadd(o, rebias);
    let unit = int_lanes(b, w, 0x0080_0000);
    let s = b.ins().iadd(o, unit);
    let s = b.ins().bitcast(fty, MemFlagsData::new(), s);
    let magic = float_lanes(b, w, 0x3880_0000);
    let s = b.ins().fsub(s, magic);
    let sub = b.ins().bitcast(ity, MemFlagsData::new(), s);
    let is_special = int_mask(b, w, IntCC::Equal, exp, 0x0f80_0000);
    let is_zero = int_mask(b, w, IntCC::Equal, exp, 0);
    let r = select(b, w, is_zero, sub, o, ity);
    let r = select(b, w, is_special, inf_nan, r, ity);
    let sign_bit = int_lanes(b, w, 0x8000);
    let sign = b.ins().band(h, sign_bit);
    let sign = b.ins().ishl_imm_u(sign, 16);
    let r = b.ins().bor(r, sign);
    b.ins().bitcast(fty, MemFlagsData::new(), r)
}

/// A bf16 bit pattern in the low half of an `i32` (or `i32x4`) widened to `f32` (`f32x4`).
fn widen_bf16(b: &mut FunctionBuilder, h: Value, fty: Type) -> Value {
    let x = b.ins().ishl_imm_u(h, 16);
    b.ins().bitcast(fty, MemFlagsData::new(), x)
}

/// `x` (`f32` or `f32x4`) rounded to the nearest bfloat16, ties to even, still as `f32`: the
/// runtime's `fused::round_bf16` (NaN stays NaN, made quiet).
fn round_bf16(b: &mut FunctionBuilder, x: Value, w: usize) -> Value {
    let (fty, ity) = if w == 1 { (F32, I32) } else { (F32X4, I32X4) };
    let c = |b: &mut FunctionBuilder, v: u32| int_lanes(b, w, v);
    let bits = b.ins().bitcast(ity, MemFlagsData::new(), x);
    let odd = b.ins().ushr_imm_u(bits, 16);
    let one = c(b, 1);
    let odd = b.ins().band(odd, one);
    let bias = c(b, 0x7fff);
    let r = b.ins().iadd(bits, bias);
    let r = b.ins().iadd(r, odd);
    let high = c(b, 0xffff_0000);
    let r = b.ins().band(r, high);
    let quiet = c(b, 0x0040_0000);
    let nan = b.ins().bor(bits, quiet);
    let nan = b.ins().band(nan, high);
    let un = b.ins().fcmp(FloatCC::Unordered, x, x);
    let m = if w == 1 { mask_from_i8(b, un) } else { un };
    let v = select(b, w, m, nan, r, ity);
    b.ins().bitcast(fty, MemFlagsData::new(), v)
}

impl Emitter {
    fn build(
        b: &mut FunctionBuilder,
        k: &FusedKernel,
        ptr: Type,
        helpers: HashMap<&'static str, FuncRef>,
    ) {
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let table = b.block_params(entry)[0];
        let start = b.block_params(entry)[1];
        let n = b.block_params(entry)[2];
        let mut e = Emitter {
            bases: Default::default(),
            hoisted: Default::default(),
            helpers,
            ptr,
        };
        for (j, ins) in k.prog.iter().enumerate() {
            let buf = match ins {
                Ins::Load { src, .. } => src.buf,
                Ins::Store { buf, .. } => *buf,
                _ => continue,
            };
            if let std::collections::hash_map::Entry::Vacant(v) = e.bases.entry(buf.id) {
                let p = b
                    .ins()
                    .load(ptr, MemFlagsData::trusted(), table, (buf.id * 8) as i32);
                v.insert(p);
            }
            if let Ins::Load { dtype, src, .. } = ins {
                if let Some(v) = &src.view {
                    if v.shape.is_empty() {
                        let base = e.bases[&src.buf.id];
                        let x = e.load_scalar(b, *dtype, base, v.offset as i64);
                        e.hoisted.insert(j, x);
                    }
                }
            }
        }
        let i = b.declare_var(ptr);
        b.def_var(i, start);
        // Loops with polynomial code (long dependency chains) run UNROLL vectors per iteration,
        // their instructions interleaved op by op, so the chains overlap; then one vector at a
        // time; then the scalar tail.
        if k.prog
            .iter()
            .any(|ins| matches!(ins, Ins::UnF { op, .. } if is_inline_poly(*op)))
        {
            e.emit_loop::<UNROLL>(b, k, i, n, 4);
        }
        e.emit_loop::<1>(b, k, i, n, 4);
        e.emit_loop::<1>(b, k, i, n, 1);
        let exit = b.create_block();
        b.ins().jump(exit, &[]);
        b.switch_to_block(exit);
        b.ins().return_(&[]);
        b.seal_all_blocks();
    }

    /// A loop over the elements from the current `i` while at least `U·w` remain, `U` groups of
    /// `w` lanes per iteration; continues in a new block after it.
    fn emit_loop<const U: usize>(
        &self,
        b: &mut FunctionBuilder,
        k: &FusedKernel,
        i: Variable,
        n: Value,
        w: usize,
    ) {
        let head = b.create_block();
        let body = b.create_block();
        let after = b.create_block();
        let step = (U * w) as i64;
        b.ins().jump(head, &[]);
        b.switch_to_block(head);
        let iv = b.use_var(i);
        let end = b.ins().iadd_imm_s(iv, step);
        let c = b.ins().icmp(IntCC::UnsignedLessThanOrEqual, end, n);
        b.ins().brif(c, body, &[], after, &[]);
        b.switch_to_block(body);
        let iv = b.use_var(i);
        self.body::<U>(b, k, iv, w);
        let next = b.ins().iadd_imm_s(iv, step);
        b.def_var(i, next);
        b.ins().jump(head, &[]);
        b.switch_to_block(after);
    }

    /// Loads one element at byte `base + pos * size` (pos a value) or `base + off`.
    fn load_scalar(&self, b: &mut FunctionBuilder, dt: DType, base: Value, off: i64) -> Value {
        let addr = b.ins().iadd_imm_s(base, off * elem_bytes(dt));
        self.load_at(b, dt, addr)
    }

    fn load_at(&self, b: &mut FunctionBuilder, dt: DType, addr: Value) -> Value {
        match dt {
            DType::F32 => b.ins().load(F32, flags(), addr, 0),
            DType::I32 => b.ins().load(I32, flags(), addr, 0),
            DType::BF16 => {
                let h = b.ins().uload16(I32, flags(), addr, 0);
                widen_bf16(b, h, F32)
            }
            DType::F16 => {
                let h = b.ins().uload16(I32, flags(), addr, 0);
                widen_f16(b, h, 1)
            }
            DType::I8 => {
                let q = b.ins().sload8(I32, flags(), addr, 0);
                b.ins().fcvt_from_sint(F32, q)
            }
            _ => {
                let x = b.ins().uload8(I32, flags(), addr, 0);
                let nz = b.ins().icmp_imm_s(IntCC::NotEqual, x, 0);
                mask_from_i8(b, nz)
            }
        }
    }

    fn elem_addr(&self, b: &mut FunctionBuilder, dt: DType, base: Value, pos: Value) -> Value {
        let off = b.ins().imul_imm_s(pos, elem_bytes(dt));
        b.ins().iadd(base, off)
    }

    /// `width` elements read contiguously from element position `pos`.
    fn load_contig(
        &self,
        b: &mut FunctionBuilder,
        dt: DType,
        base: Value,
        pos: Value,
        width: usize,
    ) -> Value {
        let addr = self.elem_addr(b, dt, base, pos);
        if width == 1 {
            return self.load_at(b, dt, addr);
        }
        match dt {
            DType::F32 => b.ins().load(F32X4, flags(), addr, 0),
            DType::I32 => b.ins().load(I32X4, flags(), addr, 0),
            DType::BF16 => {
                let z = b.ins().iconst(I32, 0);
                let mut v = b.ins().splat(I32X4, z);
                for l in 0..4u8 {
                    let h = b.ins().uload16(I32, flags(), addr, 2 * l as i32);
                    v = b.ins().insertlane(v, h, l);
                }
                widen_bf16(b, v, F32X4)
            }
            DType::F16 => {
                let z = b.ins().iconst(I32, 0);
                let mut v = b.ins().splat(I32X4, z);
                for l in 0..4u8 {
                    let h = b.ins().uload16(I32, flags(), addr, 2 * l as i32);
                    v = b.ins().insertlane(v, h, l);
                }
                widen_f16(b, v, 4)
            }
            DType::I8 => {
                let z = b.ins().iconst(I32, 0);
                let mut v = b.ins().splat(I32X4, z);
                for l in 0..4u8 {
                    let q = b.ins().sload8(I32, flags(), addr, l as i32);
                    v = b.ins().insertlane(v, q, l);
                }
                b.ins().fcvt_from_sint(F32X4, v)
            }
            _ => {
                let z = b.ins().iconst(I32, 0);
                let mut v = b.ins().splat(I32X4, z);
                for l in 0..4u8 {
                    let x = b.ins().uload8(I32, flags(), addr, l as i32);
                    v = b.ins().insertlane(v, x, l);
                }
                let zv = b.ins().splat(I32X4, z);
                b.ins().icmp(IntCC::NotEqual, v, zv)
            }
        }
    }

    /// The element position of view element `idx` (a value).
    fn view_pos(&self, b: &mut FunctionBuilder, v: &View, idx: Value) -> Value {
        let r = v.shape.len();
        let mut rem = idx;
        let mut pos = b.ins().iconst(self.ptr, v.offset as i64);
        for d in (0..r).rev() {
            let id = if d == 0 {
                rem
            } else {
                b.ins().urem_imm_s(rem, v.shape[d] as i64)
            };
            let t = b.ins().imul_imm_s(id, v.strides[d] as i64);
            pos = b.ins().iadd(pos, t);
            if d > 0 {
                rem = b.ins().udiv_imm_s(rem, v.shape[d] as i64);
            }
        }
        pos
    }

    fn splat(&self, b: &mut FunctionBuilder, dt: DType, x: Value, width: usize) -> Value {
        if width == 1 {
            return x;
        }
        let ty = if in_f32_register(dt) { F32X4 } else { I32X4 };
        b.ins().splat(ty, x)
    }

    fn load(
        &self,
        b: &mut FunctionBuilder,
        j: usize,
        dt: DType,
        src: &Source,
        i: Value,
        width: usize,
    ) -> Value {
        let base = self.bases[&src.buf.id];
        let Some(v) = &src.view else {
            return self.load_contig(b, dt, base, i, width);
        };
        if let Some(&x) = self.hoisted.get(&j) {
            return self.splat(b, dt, x, width);
        }
        let r = v.shape.len();
        if width == 1 {
            let pos = self.view_pos(b, v, i);
            return self.load_contig(b, dt, base, pos, 1);
        }
        // Lanes i..i+4 (i a multiple of 4) share their outer indices when the innermost
        // dimension's length is a multiple of 4.
        if v.shape[r - 1] % 4 == 0 && (v.strides[r - 1] <= 1) {
            let pos = self.view_pos(b, v, i);
            if v.strides[r - 1] == 1 {
                return self.load_contig(b, dt, base, pos, 4);
            }
            let x = self.load_contig(b, dt, base, pos, 1);
            return self.splat(b, dt, x, 4);
        }
        let ty = if in_f32_register(dt) { F32X4 } else { I32X4 };
        let zero = if in_f32_register(dt) {
            b.ins().f32const(0.0)
        } else {
            b.ins().iconst(I32, 0)
        };
        let mut out = b.ins().splat(ty, zero);
        for l in 0..4u8 {
            let il = b.ins().iadd_imm_s(i, l as i64);
            let pos = self.view_pos(b, v, il);
            let x = self.load_contig(b, dt, base, pos, 1);
            out = b.ins().insertlane(out, x, l);
        }
        out
    }

    fn store(&self, b: &mut FunctionBuilder, dt: DType, x: Value, base: Value, i: Value, w: usize) {
        let addr = self.elem_addr(b, dt, base, i);
        match dt {
            DType::F32 | DType::I32 => {
                b.ins().store(flags(), x, addr, 0);
            }
            DType::BF16 => {
                // `x` holds a bf16 value widened: its high half is the bit pattern.
                for l in 0..w as u8 {
                    let e = if w == 1 { x } else { b.ins().extractlane(x, l) };
                    let bits = b.ins().bitcast(I32, MemFlagsData::new(), e);
                    let h = b.ins().ushr_imm_u(bits, 16);
                    b.ins().istore16(flags(), h, addr, 2 * l as i32);
                }
            }
            DType::F16 => {
                // `x` holds an f16 value widened: rounding it again is exact.
                let h = round_f16(b, x, w);
                for l in 0..w as u8 {
                    let e = if w == 1 { h } else { b.ins().extractlane(h, l) };
                    b.ins().istore16(flags(), e, addr, 2 * l as i32);
                }
            }
            DType::I8 => {
                // `x` holds an integral value in [-128, 127] (made by a cast): exact.
                for l in 0..w as u8 {
                    let e = if w == 1 { x } else { b.ins().extractlane(x, l) };
                    let q = b.ins().fcvt_to_sint_sat(I32, e);
                    b.ins().istore8(flags(), q, addr, l as i32);
                }
            }
            _ => {
                if w == 1 {
                    let one = b.ins().band_imm_s(x, 1);
                    b.ins().istore8(flags(), one, addr, 0);
                } else {
                    for l in 0..4u8 {
                        let e = b.ins().extractlane(x, l);
                        let one = b.ins().band_imm_s(e, 1);
                        b.ins().istore8(flags(), one, addr, l as i32);
                    }
                }
            }
        }
    }

    /// Calls `f` on each lane of `args` (all f32 of width `w`).
    fn call_lanes(&self, b: &mut FunctionBuilder, f: &str, args: &[Value], w: usize) -> Value {
        let callee = self.helpers[f];
        if w == 1 {
            let c = b.ins().call(callee, args);
            return b.inst_results(c)[0];
        }
        let mut out = args[0];
        for l in 0..4u8 {
            let lane: Vec<Value> = args.iter().map(|&a| b.ins().extractlane(a, l)).collect();
            let c = b.ins().call(callee, &lane);
            let r = b.inst_results(c)[0];
            out = b.ins().insertlane(out, r, l);
        }
        out
    }

    /// One iteration's program: `U` groups of `w` lanes, group `u` at element `i + u·w`; each op
    /// is emitted for every group before the next op.
    fn body<const U: usize>(&self, b: &mut FunctionBuilder, k: &FusedKernel, i: Value, w: usize) {
        let (fty, ity) = if w == 1 { (F32, I32) } else { (F32X4, I32X4) };
        let fma = vmath::has_fma();
        let at: [Value; U] = from_fn(|u| {
            if u == 0 {
                i
            } else {
                b.ins().iadd_imm_s(i, (u * w) as i64)
            }
        });
        let mut fr: Vec<Option<[Value; U]>> = vec![None; k.nf];
        let mut ir: Vec<Option<[Value; U]>> = vec![None; k.ni];
        let mut br: Vec<Option<[Value; U]>> = vec![None; k.nb];
        // Constants are shared by the groups.
        let fz = |b: &mut FunctionBuilder, v: f32| -> [Value; U] {
            let c = b.ins().f32const(v);
            [if w == 1 { c } else { b.ins().splat(F32X4, c) }; U]
        };
        let iz = |b: &mut FunctionBuilder, v: i64| -> [Value; U] {
            let c = b.ins().iconst(I32, v);
            [if w == 1 { c } else { b.ins().splat(I32X4, c) }; U]
        };
        // Masks from compare results: vector compares give lane masks already.
        let to_mask = |b: &mut FunctionBuilder, c: Value| {
            if w == 1 {
                mask_from_i8(b, c)
            } else {
                c
            }
        };
        let set = |fr: &mut Vec<Option<[Value; U]>>,
                   ir: &mut Vec<Option<[Value; U]>>,
                   br: &mut Vec<Option<[Value; U]>>,
                   dt: DType,
                   d: usize,
                   v: [Value; U]| match dt {
            t if in_f32_register(t) => fr[d] = Some(v),
            DType::I32 => ir[d] = Some(v),
            _ => br[d] = Some(v),
        };
        for (j, ins) in k.prog.iter().enumerate() {
            match ins {
                Ins::Load { dtype, dst, src } => {
                    let v = from_fn(|u| self.load(b, j, *dtype, src, at[u], w));
                    set(&mut fr, &mut ir, &mut br, *dtype, *dst, v);
                }
                Ins::SplatF { dst, v } => fr[*dst] = Some(fz(b, *v)),
                Ins::SplatI { dst, v } => ir[*dst] = Some(iz(b, *v as i64)),
                Ins::SplatB { dst, v } => br[*dst] = Some(iz(b, if *v { -1 } else { 0 })),
                Ins::UnF { op, dst, a } => {
                    let x = fr[*a].expect("defined");
                    let v = match op {
                        UnaryOp::Neg => from_fn(|u| b.ins().fneg(x[u])),
                        UnaryOp::Abs => from_fn(|u| b.ins().fabs(x[u])),
                        UnaryOp::Sqrt => from_fn(|u| b.ins().sqrt(x[u])),
                        UnaryOp::Floor => from_fn(|u| b.ins().floor(x[u])),
                        UnaryOp::Round => from_fn(|u| b.ins().nearest(x[u])),
                        UnaryOp::Reciprocal => {
                            let one = fz(b, 1.0);
                            from_fn(|u| b.ins().fdiv(one[u], x[u]))
                        }
                        UnaryOp::Relu => {
                            let z = fz(b, 0.0);
                            from_fn(|u| {
                                let le = b.ins().fcmp(FloatCC::LessThanOrEqual, x[u], z[u]);
                                let m = to_mask(b, le);
                                select(b, w, m, z[u], x[u], fty)
                            })
                        }
                        UnaryOp::Exp => vmath::exp(&mut ClifLanes::<U> { b, w, fma }, x),
                        UnaryOp::Erf => vmath::erf(&mut ClifLanes::<U> { b, w, fma }, x),
                        UnaryOp::Gelu => vmath::gelu(&mut ClifLanes::<U> { b, w, fma }, x),
                        u => {
                            let (f, _) = unary_helper(*u).expect("checked by `supported`");
                            from_fn(|g| self.call_lanes(b, f, &[x[g]], w))
                        }
                    };
                    fr[*dst] = Some(v);
                }
                Ins::UnI { op, dst, a } => {
                    let x = ir[*a].expect("defined");
                    let v = match op {
                        UnaryOp::Neg => from_fn(|u| b.ins().ineg(x[u])),
                        UnaryOp::Abs => from_fn(|u| b.ins().iabs(x[u])),
                        _ => {
                            let z = iz(b, 0);
                            from_fn(|u| b.ins().smax(x[u], z[u]))
                        }
                    };
                    ir[*dst] = Some(v);
                }
                Ins::NotB { dst, a } => {
                    let x = br[*a].expect("defined");
                    br[*dst] = Some(from_fn(|u| b.ins().bnot(x[u])));
                }
                Ins::BinF { op, dst, a, b: c } => {
                    let (x, y) = (fr[*a].expect("defined"), fr[*c].expect("defined"));
                    let v = from_fn(|u| {
                        let (x, y) = (x[u], y[u]);
                        match op {
                            BinaryOp::Add => b.ins().fadd(x, y),
                            BinaryOp::Sub => b.ins().fsub(x, y),
                            BinaryOp::Mul => b.ins().fmul(x, y),
                            BinaryOp::Div => b.ins().fdiv(x, y),
                            BinaryOp::Max => b.ins().fmax(x, y),
                            BinaryOp::Min => b.ins().fmin(x, y),
                            _ => self.call_lanes(b, "cleave_rt_pow", &[x, y], w),
                        }
                    });
                    fr[*dst] = Some(v);
                }
                Ins::BinI { op, dst, a, b: c } => {
                    let (x, y) = (ir[*a].expect("defined"), ir[*c].expect("defined"));
                    let v = from_fn(|u| {
                        let (x, y) = (x[u], y[u]);
                        match op {
                            BinaryOp::Add => b.ins().iadd(x, y),
                            BinaryOp::Sub => b.ins().isub(x, y),
                            BinaryOp::Mul => b.ins().imul(x, y),
                            BinaryOp::Max => b.ins().smax(x, y),
                            _ => b.ins().smin(x, y),
                        }
                    });
                    ir[*dst] = Some(v);
                }
                Ins::BinB { op, dst, a, b: c } => {
                    let (x, y) = (br[*a].expect("defined"), br[*c].expect("defined"));
                    let v = from_fn(|u| match op {
                        BinaryOp::And => b.ins().band(x[u], y[u]),
                        _ => b.ins().bor(x[u], y[u]),
                    });
                    br[*dst] = Some(v);
                }
                Ins::Cmp {
                    dtype,
                    op,
                    dst,
                    a,
                    b: c,
                } => {
                    let (x, y) = match dtype {
                        DType::F32 => (fr[*a], fr[*c]),
                        DType::I32 => (ir[*a], ir[*c]),
                        _ => (br[*a], br[*c]),
                    };
                    let (x, y) = (x.expect("defined"), y.expect("defined"));
                    let v = from_fn(|u| {
                        let (x, y) = (x[u], y[u]);
                        let v = match dtype {
                            DType::F32 => {
                                let cc = match op {
                                    CompareOp::Eq => FloatCC::Equal,
                                    CompareOp::Ne => FloatCC::NotEqual,
                                    CompareOp::Lt => FloatCC::LessThan,
                                    CompareOp::Le => FloatCC::LessThanOrEqual,
                                    CompareOp::Gt => FloatCC::GreaterThan,
                                    CompareOp::Ge => FloatCC::GreaterThanOrEqual,
                                };
                                b.ins().fcmp(cc, x, y)
                            }
                            DType::I32 => b.ins().icmp(int_cc(*op, true), x, y),
                            // Masks: true (all ones) is the larger unsigned value.
                            _ => b.ins().icmp(int_cc(*op, false), x, y),
                        };
                        to_mask(b, v)
                    });
                    br[*dst] = Some(v);
                }
                Ins::Sel {
                    dtype,
                    dst,
                    c,
                    a,
                    b: e,
                } => {
                    let m = br[*c].expect("defined");
                    let (ty, x, y) = match dtype {
                        DType::F32 => (fty, fr[*a], fr[*e]),
                        DType::I32 => (ity, ir[*a], ir[*e]),
                        _ => (ity, br[*a], br[*e]),
                    };
                    let (x, y) = (x.expect("defined"), y.expect("defined"));
                    let v = from_fn(|u| select(b, w, m[u], x[u], y[u], ty));
                    set(&mut fr, &mut ir, &mut br, *dtype, *dst, v);
                }
                Ins::Cast { from, to, dst, a } => {
                    let x = match from {
                        d if in_f32_register(*d) => fr[*a],
                        DType::I32 => ir[*a],
                        _ => br[*a],
                    }
                    .expect("defined");
                    let v = match (from, to) {
                        (DType::F32, DType::F32) | (DType::I32, DType::I32) => x,
                        (DType::BF16 | DType::F16 | DType::I8, DType::F32) => x,
                        (DType::F32, DType::F16) => from_fn(|u| {
                            let h = round_f16(b, x[u], w);
                            widen_f16(b, h, w)
                        }),
                        (DType::F32, DType::I8) => from_fn(|u| {
                            // Rust's `as i8`: toward zero, saturating, NaN to 0; held widened.
                            let q = b.ins().fcvt_to_sint_sat(ity, x[u]);
                            let (lo, hi) = (iz(b, -128), iz(b, 127));
                            let q = b.ins().smax(q, lo[u]);
                            let q = b.ins().smin(q, hi[u]);
                            b.ins().fcvt_from_sint(fty, q)
                        }),
                        (DType::F32, DType::BF16) => from_fn(|u| round_bf16(b, x[u], w)),
                        (DType::F32, DType::I32) => {
                            from_fn(|u| b.ins().fcvt_to_sint_sat(ity, x[u]))
                        }
                        (DType::F32, _) => {
                            let z = fz(b, 0.0);
                            from_fn(|u| {
                                let c = b.ins().fcmp(FloatCC::NotEqual, x[u], z[u]);
                                to_mask(b, c)
                            })
                        }
                        (DType::I32, DType::F32) => from_fn(|u| b.ins().fcvt_from_sint(fty, x[u])),
                        (DType::I32, _) => {
                            let z = iz(b, 0);
                            from_fn(|u| {
                                let c = b.ins().icmp(IntCC::NotEqual, x[u], z[u]);
                                to_mask(b, c)
                            })
                        }
                        (_, DType::F32) => {
                            let one = fz(b, 1.0);
                            let z = fz(b, 0.0);
                            from_fn(|u| select(b, w, x[u], one[u], z[u], fty))
                        }
                        (_, DType::I32) => from_fn(|u| b.ins().ineg(x[u])),
                        _ => x,
                    };
                    set(&mut fr, &mut ir, &mut br, *to, *dst, v);
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
                        self.store(b, *dtype, x[u], base, at[u], w);
                    }
                }
            }
        }
    }
}

fn int_cc(op: CompareOp, signed: bool) -> IntCC {
    match (op, signed) {
        (CompareOp::Eq, _) => IntCC::Equal,
        (CompareOp::Ne, _) => IntCC::NotEqual,
        (CompareOp::Lt, true) => IntCC::SignedLessThan,
        (CompareOp::Le, true) => IntCC::SignedLessThanOrEqual,
        (CompareOp::Gt, true) => IntCC::SignedGreaterThan,
        (CompareOp::Ge, true) => IntCC::SignedGreaterThanOrEqual,
        (CompareOp::Lt, false) => IntCC::UnsignedLessThan,
        (CompareOp::Le, false) => IntCC::UnsignedLessThanOrEqual,
        (CompareOp::Gt, false) => IntCC::UnsignedGreaterThan,
        (CompareOp::Ge, false) => IntCC::UnsignedGreaterThanOrEqual,
    }
}

/// A scalar `i8` truth value (0 or 1) as an `i32` mask (0 or all ones).
fn mask_from_i8(b: &mut FunctionBuilder, c: Value) -> Value {
    let x = if b.func.dfg.value_type(c) == I8 {
        b.ins().uextend(I32, c)
    } else {
        c
    };
    b.ins().ineg(x)
}

/// `m ? x : y` per lane, `m` a mask (an `i32` or `i32x4`), `x` and `y` of type `ty`.
fn select(b: &mut FunctionBuilder, w: usize, m: Value, x: Value, y: Value, ty: Type) -> Value {
    if w == 1 {
        return b.ins().select(m, x, y);
    }
    if ty == F32X4 {
        let mf = b.ins().bitcast(F32X4, MemFlagsData::new(), m);
        b.ins().bitselect(mf, x, y)
    } else {
        b.ins().bitselect(m, x, y)
    }
}

/// [`Lanes`] as Cranelift instructions on `U` groups of `f32x4`/`i32x4` registers (`w` = 4) or
/// of scalars (`w` = 1, the loop's tail); each operation is emitted for every group in turn, so
/// the groups' dependency chains interleave. Masks are the results of `fcmp`: `i32x4` lane masks
/// or an `i8`.
struct ClifLanes<'a, 'b, const U: usize> {
    b: &'a mut FunctionBuilder<'b>,
    w: usize,
    /// Emit `fma` for `mul_add` ([`vmath::has_fma`]).
    fma: bool,
}

impl<const U: usize> ClifLanes<'_, '_, U> {
    fn map1(
        &mut self,
        a: [Value; U],
        f: impl Fn(&mut FunctionBuilder, Value) -> Value,
    ) -> [Value; U] {
        from_fn(|u| f(self.b, a[u]))
    }
    fn map2(
        &mut self,
        a: [Value; U],
        c: [Value; U],
        f: impl Fn(&mut FunctionBuilder, Value, Value) -> Value,
    ) -> [Value; U] {
        from_fn(|u| f(self.b, a[u], c[u]))
    }
}

impl<const U: usize> Lanes for ClifLanes<'_, '_, U> {
    type F = [Value; U];
    type I = [Value; U];
    type M = [Value; U];
    fn splat(&mut self, v: f32) -> [Value; U] {
        let c = self.b.ins().f32const(v);
        [if self.w == 1 {
            c
        } else {
            self.b.ins().splat(F32X4, c)
        }; U]
    }
    fn isplat(&mut self, v: i32) -> [Value; U] {
        let c = self.b.ins().iconst(I32, v as i64);
        [if self.w == 1 {
            c
        } else {
            self.b.ins().splat(I32X4, c)
        }; U]
    }
    fn add(&mut self, a: [Value; U], c: [Value; U]) -> [Value; U] {
        self.map2(a, c, |b, x, y| b.ins().fadd(x, y))
    }
    fn sub(&mut self, a: [Value; U], c: [Value; U]) -> [Value; U] {
        self.map2(a, c, |b, x, y| b.ins().fsub(x, y))
    }
    fn mul(&mut self, a: [Value; U], c: [Value; U]) -> [Value; U] {
        self.map2(a, c, |b, x, y| b.ins().fmul(x, y))
    }
    fn div(&mut self, a: [Value; U], c: [Value; U]) -> [Value; U] {
        self.map2(a, c, |b, x, y| b.ins().fdiv(x, y))
    }
    fn mul_add(&mut self, a: [Value; U], x: [Value; U], c: [Value; U]) -> [Value; U] {
        let fma = self.fma;
        from_fn(|u| {
            if fma {
                self.b.ins().fma(a[u], x[u], c[u])
            } else {
                let p = self.b.ins().fmul(a[u], x[u]);
                self.b.ins().fadd(p, c[u])
            }
        })
    }
    fn abs(&mut self, a: [Value; U]) -> [Value; U] {
        self.map1(a, |b, x| b.ins().fabs(x))
    }
    fn lt(&mut self, a: [Value; U], c: [Value; U]) -> [Value; U] {
        self.map2(a, c, |b, x, y| b.ins().fcmp(FloatCC::LessThan, x, y))
    }
    fn select(&mut self, m: [Value; U], a: [Value; U], c: [Value; U]) -> [Value; U] {
        let w = self.w;
        from_fn(|u| {
            if w == 1 {
                self.b.ins().select(m[u], a[u], c[u])
            } else {
                select(self.b, 4, m[u], a[u], c[u], F32X4)
            }
        })
    }
    fn to_bits(&mut self, a: [Value; U]) -> [Value; U] {
        let ty = if self.w == 1 { I32 } else { I32X4 };
        self.map1(a, |b, x| b.ins().bitcast(ty, MemFlagsData::new(), x))
    }
    fn of_bits(&mut self, a: [Value; U]) -> [Value; U] {
        let ty = if self.w == 1 { F32 } else { F32X4 };
        self.map1(a, |b, x| b.ins().bitcast(ty, MemFlagsData::new(), x))
    }
    fn iadd(&mut self, a: [Value; U], c: [Value; U]) -> [Value; U] {
        self.map2(a, c, |b, x, y| b.ins().iadd(x, y))
    }
    fn isub(&mut self, a: [Value; U], c: [Value; U]) -> [Value; U] {
        self.map2(a, c, |b, x, y| b.ins().isub(x, y))
    }
    fn iand(&mut self, a: [Value; U], c: [Value; U]) -> [Value; U] {
        self.map2(a, c, |b, x, y| b.ins().band(x, y))
    }
    fn ior(&mut self, a: [Value; U], c: [Value; U]) -> [Value; U] {
        self.map2(a, c, |b, x, y| b.ins().bor(x, y))
    }
    fn sshr(&mut self, a: [Value; U], n: u8) -> [Value; U] {
        self.map1(a, |b, x| b.ins().sshr_imm_s(x, n as i64))
    }
    fn shl(&mut self, a: [Value; U], n: u8) -> [Value; U] {
        self.map1(a, |b, x| b.ins().ishl_imm_s(x, n as i64))
    }
}

#[cfg(test)]
mod tests {
    //! The JIT's inline `exp`, `erf` and GELU (f32x4 polynomial code) against the interpreted
    //! fused loop's versions of the same approximations: bit-identical results on a sweep over
    //! every binade of `f32` (denormals, ±0, ±∞, NaN, both signs), through the unrolled body, the
    //! one-vector loop and the scalar tail. The accuracy of the approximations themselves is
    //! tested in `vmath.rs`.

    use super::FORCE_INLINE_POLY;
    use crate::{CompileOptions, Plan};
    use cleave_ir::parse_function;

    /// Every 499,979th bit pattern of both signs plus the edge cases; the count is 3 mod 8, so
    /// elements reach every loop of the kernel.
    fn inputs() -> Vec<f32> {
        crate::vmath::sweep(499_979, 8, 3)
    }

    /// The default options with Cranelift (the default code generator is LLVM where the `llvm`
    /// feature is built).
    fn cranelift() -> CompileOptions {
        CompileOptions {
            codegen: crate::Codegen::Cranelift,
            ..CompileOptions::default()
        }
    }

    /// Runs exp, erf and GELU over `xs`; returns the outputs and the plan.
    fn run(xs: &[f32], jit: bool) -> (Vec<Vec<f32>>, Plan) {
        let n = xs.len();
        let text = format!(
            r#"func @f {{
  %x = input {{name = "x"}} : f32[{n}]
  %e = exp %x : f32[{n}]
  %r = erf %x : f32[{n}]
  %g = gelu %x : f32[{n}]
  return %e as "exp", %r as "erf", %g as "gelu"
}}"#
        );
        let opts = CompileOptions {
            jit,
            codegen: crate::Codegen::Cranelift,
            ..CompileOptions::default()
        };
        crate::vmath::run_sweep(&text, xs, &opts, 3)
    }

    #[test]
    fn inline_transcendentals_match_the_interpreted_loop_bit_for_bit() {
        let xs = inputs();
        FORCE_INLINE_POLY.with(|f| f.set(true));
        let (jit, plan) = run(&xs, true);
        FORCE_INLINE_POLY.with(|f| f.set(false));
        assert!(plan.jit_kernels() > 0, "the loop was not JIT-compiled");
        assert_eq!(plan.jit_kernels(), plan.fused_kernels());
        let (interp, plan) = run(&xs, false);
        assert_eq!(plan.jit_kernels() + plan.vector_math_kernels(), 0);
        for (name, (a, b)) in ["exp", "erf", "gelu"].iter().zip(jit.iter().zip(&interp)) {
            for (i, (&p, &q)) in a.iter().zip(b).enumerate() {
                let same = p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan());
                assert!(same, "{name}({:e}): JIT {p:e}, interpreted {q:e}", xs[i]);
            }
        }
        // Both compute the functions, not merely the same thing.
        let at = |x: f32| xs.iter().position(|&v| v.to_bits() == x.to_bits()).unwrap();
        assert_eq!(jit[0][at(0.0)], 1.0);
        assert_eq!(jit[1][at(f32::INFINITY)], 1.0);
        assert!((jit[2][at(1.0)] - 0.841_344_7).abs() < 1e-6);
        assert!((jit[1][at(0.5)] - 0.520_499_9).abs() < 1e-6);
    }

    #[test]
    fn loops_with_transcendentals_follow_the_cpu_policy() {
        let xs = inputs();
        let (_, plan) = run(&xs, true);
        assert_eq!(plan.fused_kernels(), 1);
        if super::vmath::has_fma() {
            assert_eq!((plan.jit_kernels(), plan.vector_math_kernels()), (0, 1));
        } else {
            assert_eq!((plan.jit_kernels(), plan.vector_math_kernels()), (1, 0));
        }
        // A loop without them is compiled either way.
        let f = parse_function(
            r#"func @f {
  %x = input {name = "x"} : f32[37]
  %y = mul %x, %x : f32[37]
  return %y as "y"
}"#,
        )
        .unwrap();
        let plan = crate::compile_with(&f, &cranelift()).unwrap();
        assert_eq!((plan.jit_kernels(), plan.vector_math_kernels()), (1, 0));
    }
}
