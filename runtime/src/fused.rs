//! Fused elementwise loops: a small register program run over the elements in chunks.
//!
//! Every register holds one chunk ([`CHUNK`] elements) of one value. Per chunk, the program loads
//! its inputs (contiguous or through a strided view), evaluates the ops register to register (each
//! a tight loop the compiler vectorises where the op allows) and stores the values later kernels
//! need. All loads of a chunk happen before its stores, so a result may be written in place of a
//! contiguously loaded operand.

use cleave_ir::{dropout_keep, BinaryOp, CompareOp, DType, UnaryOp};

use crate::kernels::{nan_max, nan_min};
use crate::plan::{BufRef, Mem};

/// Elements per chunk.
pub(crate) const CHUNK: usize = 512;

/// A strided view of a buffer, collapsed: element `i` of the view (row-major over `shape`) is
/// `src[offset + Σ idx[d]·strides[d]]`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct View {
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
    pub offset: usize,
}

impl View {
    /// Builds a view and merges dimensions that are contiguous with each other.
    pub fn new(shape: &[usize], strides: &[usize], offset: usize) -> View {
        let mut s: Vec<usize> = Vec::new();
        let mut st: Vec<usize> = Vec::new();
        for (&d, &t) in shape.iter().zip(strides) {
            if d == 1 {
                continue;
            }
            if let (Some(&ld), Some(&lt)) = (s.last(), st.last()) {
                if lt == t * d {
                    *s.last_mut().unwrap() = ld * d;
                    *st.last_mut().unwrap() = t;
                    continue;
                }
            }
            s.push(d);
            st.push(t);
        }
        View {
            shape: s,
            strides: st,
            offset,
        }
    }

    /// True if the view reads `src[offset..offset + n]` in order.
    pub fn is_contiguous(&self) -> bool {
        self.offset == 0
            && (self.shape.is_empty() || (self.shape.len() == 1 && self.strides[0] == 1))
    }

    /// Reads view elements `start..start + dst.len()` into `dst`.
    ///
    /// # Safety
    /// `src` must be valid for every position the view reaches.
    pub unsafe fn read<T: Copy>(&self, src: *const T, start: usize, dst: &mut [T]) {
        let len = dst.len();
        let r = self.shape.len();
        if r == 0 {
            dst.fill(*src.add(self.offset));
            return;
        }
        debug_assert!(r <= cleave_ir::MAX_RANK);
        let mut idx = [0usize; cleave_ir::MAX_RANK];
        let mut rem = start;
        for d in (0..r).rev() {
            idx[d] = rem % self.shape[d];
            rem /= self.shape[d];
        }
        let mut pos = self.offset
            + idx[..r]
                .iter()
                .zip(&self.strides)
                .map(|(a, b)| a * b)
                .sum::<usize>();
        let inner = self.shape[r - 1];
        let ist = self.strides[r - 1];
        let mut i = 0;
        while i < len {
            let run = (inner - idx[r - 1]).min(len - i);
            let out = &mut dst[i..i + run];
            if ist == 0 {
                out.fill(*src.add(pos));
            } else if ist == 1 {
                out.copy_from_slice(std::slice::from_raw_parts(src.add(pos), run));
            } else {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = *src.add(pos + j * ist);
                }
            }
            i += run;
            idx[r - 1] += run;
            pos += run * ist;
            if idx[r - 1] == inner {
                idx[r - 1] = 0;
                pos -= inner * ist;
                let mut d = r - 1;
                while d > 0 {
                    d -= 1;
                    idx[d] += 1;
                    pos += self.strides[d];
                    if idx[d] < self.shape[d] {
                        break;
                    }
                    idx[d] = 0;
                    pos -= self.shape[d] * self.strides[d];
                }
            }
        }
    }
}

/// Where a load reads from.
#[derive(Clone, Debug)]
pub(crate) struct Source {
    pub buf: BufRef,
    /// `None`: contiguous.
    pub view: Option<View>,
}

/// One instruction. Registers are indices into the bank of their element type.
#[derive(Clone, Debug)]
pub(crate) enum Ins {
    Load {
        dtype: DType,
        dst: usize,
        src: Source,
    },
    SplatF {
        dst: usize,
        v: f32,
    },
    SplatI {
        dst: usize,
        v: i32,
    },
    SplatB {
        dst: usize,
        v: bool,
    },
    UnF {
        op: UnaryOp,
        dst: usize,
        a: usize,
    },
    UnI {
        op: UnaryOp,
        dst: usize,
        a: usize,
    },
    NotB {
        dst: usize,
        a: usize,
    },
    BinF {
        op: BinaryOp,
        dst: usize,
        a: usize,
        b: usize,
    },
    BinI {
        op: BinaryOp,
        dst: usize,
        a: usize,
        b: usize,
    },
    BinB {
        op: BinaryOp,
        dst: usize,
        a: usize,
        b: usize,
    },
    Cmp {
        dtype: DType,
        op: CompareOp,
        dst: usize,
        a: usize,
        b: usize,
    },
    Sel {
        dtype: DType,
        dst: usize,
        c: usize,
        a: usize,
        b: usize,
    },
    Cast {
        from: DType,
        to: DType,
        dst: usize,
        a: usize,
    },
    Dropout {
        dst: usize,
        a: usize,
        rate: f64,
        seed: u64,
        scale: f32,
    },
    Store {
        dtype: DType,
        src: usize,
        buf: BufRef,
    },
}

/// A fused loop over `n` elements.
#[derive(Clone, Debug)]
pub(crate) struct FusedKernel {
    pub n: usize,
    pub prog: Vec<Ins>,
    pub nf: usize,
    pub ni: usize,
    pub nb: usize,
    /// The loop compiled to native code ([`crate::jit`]), if it was.
    pub jit: Option<crate::jit::JitFn>,
    /// Left to this interpreted loop by the JIT because it contains `exp`, `erf` or GELU and the
    /// CPU has FMA: here those ops run over whole chunks 8 or 16 lanes wide
    /// ([`crate::vmath`]'s slice functions), faster than the JIT's 4-lane inline code.
    pub vector_math: bool,
    /// The elements from which the compiled loop is split across the pool ([`split_from`]).
    pub split_from: usize,
}

/// Register banks, reused across kernels.
#[derive(Default)]
pub(crate) struct Regs {
    f: Vec<f32>,
    i: Vec<i32>,
    b: Vec<u8>,
}

fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

pub(crate) fn unary_f(u: UnaryOp, x: f32) -> f32 {
    match u {
        UnaryOp::Neg => -x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Exp => crate::vmath::exp_f32(x),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => (1.0 / (x as f64).sqrt()) as f32,
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => sigmoid(x),
        UnaryOp::Relu => {
            if x.is_nan() || x > 0.0 {
                x
            } else {
                0.0
            }
        }
        UnaryOp::Gelu => crate::vmath::gelu_f32(x),
        UnaryOp::GeluTanh => {
            let x64 = x as f64;
            let k = (2.0 / std::f64::consts::PI).sqrt();
            (0.5 * x64 * (1.0 + (k * (x64 + 0.044715 * x64 * x64 * x64)).tanh())) as f32
        }
        UnaryOp::Silu => x * sigmoid(x),
        UnaryOp::Sin => x.sin(),
        UnaryOp::Cos => x.cos(),
        UnaryOp::Erf => crate::vmath::erf_f32(x),
        UnaryOp::Reciprocal => 1.0 / x,
        UnaryOp::Sign => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
        UnaryOp::Floor => x.floor(),
        UnaryOp::Round => x.round_ties_even(),
        UnaryOp::Not => unreachable!("`not` on floats is rejected by the verifier"),
    }
}

/// `d ← a` unless they are the same register.
fn copy_operand(a: &[f32], d: &mut [f32]) {
    if a.as_ptr() != d.as_ptr() {
        d.copy_from_slice(a);
    }
}

fn unary_f_slice(u: UnaryOp, a: &[f32], d: &mut [f32]) {
    match u {
        UnaryOp::Neg => d.iter_mut().zip(a).for_each(|(d, &a)| *d = -a),
        UnaryOp::Abs => d.iter_mut().zip(a).for_each(|(d, &a)| *d = a.abs()),
        UnaryOp::Relu => d
            .iter_mut()
            .zip(a)
            .for_each(|(d, &a)| *d = if a > 0.0 || a.is_nan() { a } else { 0.0 }),
        UnaryOp::Sqrt => d.iter_mut().zip(a).for_each(|(d, &a)| *d = a.sqrt()),
        UnaryOp::Reciprocal => d.iter_mut().zip(a).for_each(|(d, &a)| *d = 1.0 / a),
        UnaryOp::Exp => {
            copy_operand(a, d);
            crate::vmath::exp_in_place(d)
        }
        UnaryOp::Erf => {
            copy_operand(a, d);
            crate::vmath::erf_in_place(d)
        }
        UnaryOp::Gelu => {
            copy_operand(a, d);
            crate::vmath::gelu_in_place(d)
        }
        _ => d.iter_mut().zip(a).for_each(|(d, &a)| *d = unary_f(u, a)),
    }
}

fn unary_i(u: UnaryOp, x: i32) -> i32 {
    match u {
        UnaryOp::Neg => x.wrapping_neg(),
        UnaryOp::Abs => x.wrapping_abs(),
        UnaryOp::Relu => x.max(0),
        UnaryOp::Sign => x.signum(),
        _ => unreachable!("rejected by the verifier"),
    }
}

fn bin_f_slice(op: BinaryOp, a: &[f32], b: &[f32], d: &mut [f32]) {
    let it = d.iter_mut().zip(a.iter().zip(b));
    match op {
        BinaryOp::Add => it.for_each(|(d, (&a, &b))| *d = a + b),
        BinaryOp::Sub => it.for_each(|(d, (&a, &b))| *d = a - b),
        BinaryOp::Mul => it.for_each(|(d, (&a, &b))| *d = a * b),
        BinaryOp::Div => it.for_each(|(d, (&a, &b))| *d = a / b),
        BinaryOp::Max => it.for_each(|(d, (&a, &b))| *d = nan_max(a, b)),
        BinaryOp::Min => it.for_each(|(d, (&a, &b))| *d = nan_min(a, b)),
        BinaryOp::Pow => it.for_each(|(d, (&a, &b))| *d = (a as f64).powf(b as f64) as f32),
        BinaryOp::And | BinaryOp::Or => unreachable!("rejected by the verifier"),
    }
}

fn cmp<T: PartialOrd>(op: CompareOp, a: T, b: T) -> bool {
    match op {
        CompareOp::Eq => a == b,
        CompareOp::Ne => a != b,
        CompareOp::Lt => a < b,
        CompareOp::Le => a <= b,
        CompareOp::Gt => a > b,
        CompareOp::Ge => a >= b,
    }
}

/// Elements from which a compiled loop of [`PAR_BASE_COST`] instructions is split across the
/// pool's threads: below it the hand-off (a few microseconds) costs about what the second core
/// saves. Costlier loops split sooner ([`split_from`]).
pub(crate) const PAR_MIN_ELEMENTS: usize = 1 << 16;
/// The per-element cost [`PAR_MIN_ELEMENTS`] is for: a load or two, an op and a store.
const PAR_BASE_COST: usize = 8;
/// What one `exp`, `erf`, `tanh`, GELU or other transcendental adds to a loop's per-element
/// cost: each is a polynomial of some twenty to thirty vector operations (or a call per lane).
const TRANSCENDENTAL_COST: usize = 24;

/// The elements from which a compiled loop with program `prog` is split across the pool:
/// [`PAR_MIN_ELEMENTS`] scaled down by the program's per-element cost (one per instruction,
/// [`TRANSCENDENTAL_COST`] more per transcendental), never below 4096. The GPT block's GELU
/// loop (21 instructions, three of them `gelu`, `erf` and `exp`) takes 2.8 ns an element: at
/// its 32,768 elements one core spends 90 µs on it.
pub(crate) fn split_from(prog: &[Ins]) -> usize {
    let cost: usize = prog
        .iter()
        .map(|ins| match ins {
            Ins::UnF { op, .. } if transcendental(*op) => 1 + TRANSCENDENTAL_COST,
            _ => 1,
        })
        .sum();
    (PAR_MIN_ELEMENTS * PAR_BASE_COST / cost.max(1)).clamp(4096, PAR_MIN_ELEMENTS)
}

fn transcendental(op: UnaryOp) -> bool {
    use UnaryOp::*;
    matches!(
        op,
        Exp | Log | Tanh | Sigmoid | Gelu | GeluTanh | Silu | Sin | Cos | Erf
    )
}

/// The table of buffer pointers, shared by the parts of one split loop.
#[derive(Clone, Copy)]
struct Table(*const *mut f32);

// SAFETY: the parts only read the table; each writes its own range of elements.
unsafe impl Sync for Table {}

impl Table {
    /// The pointer (a method, so that a closure captures the whole `Sync` table).
    fn ptr(self) -> *const *mut f32 {
        self.0
    }
}

/// Runs compiled loop `f` over elements `0..n`: in one call, or, from `from` elements on
/// ([`split_from`]), in one range per thread of the pool (multiples of 64 elements, so every vector of every
/// width starts where it would in one call). A loop writes element `i` of its outputs only from
/// element `i` of its inputs and never writes what it reads through a view, so the ranges are
/// independent and the results the same bits as one call.
///
/// # Safety
/// As [`FusedKernel::run`].
unsafe fn run_compiled(f: crate::jit::JitFn, table: *const *mut f32, n: usize, from: usize) {
    // Small loops never touch the pool (its first use starts its threads).
    if n < from {
        f(table, 0, n);
        return;
    }
    let pool = crate::pool::Pool::global();
    let parts = pool.threads().min(n / (from / 8)).max(1);
    if parts < 2 {
        f(table, 0, n);
        return;
    }
    let per = n.div_ceil(parts).next_multiple_of(64);
    let t = Table(table);
    pool.run(parts, &|p| {
        let (a, b) = ((p * per).min(n), ((p + 1) * per).min(n));
        if a < b {
            // SAFETY: the caller's guarantee, over a range of its elements.
            unsafe { f(t.ptr(), a, b) };
        }
    });
}

impl FusedKernel {
    /// Runs the loop. An integer division by zero stops it with the element's flat index.
    ///
    /// # Safety
    /// Every buffer the program names must be live in `mem` with at least `n` elements (or the
    /// positions its view reaches), and stores must not overlap non-contiguous loads.
    pub unsafe fn run(&self, mem: &Mem, regs: &mut Regs) -> Result<(), String> {
        if let Some(f) = self.jit {
            run_compiled(f, mem.table(), self.n, self.split_from);
            return Ok(());
        }
        grow(&mut regs.f, self.nf, 0.0f32);
        grow(&mut regs.i, self.ni, 0i32);
        grow(&mut regs.b, self.nb, 0u8);
        let fp = regs.f.as_mut_ptr();
        let ip = regs.i.as_mut_ptr();
        let bp = regs.b.as_mut_ptr();
        let rf = |r: usize, len: usize| std::slice::from_raw_parts_mut(fp.add(r * CHUNK), len);
        let ri = |r: usize, len: usize| std::slice::from_raw_parts_mut(ip.add(r * CHUNK), len);
        let rb = |r: usize, len: usize| std::slice::from_raw_parts_mut(bp.add(r * CHUNK), len);
        let mut regs_h = [0u16; CHUNK];
        let mut regs_q = [0i8; CHUNK];
        let mut start = 0;
        while start < self.n {
            let len = CHUNK.min(self.n - start);
            for ins in &self.prog {
                match ins {
                    Ins::Load { dtype, dst, src } => match dtype {
                        DType::F32 => load(mem.ptr_f(src.buf), src, start, rf(*dst, len)),
                        DType::BF16 => {
                            let d = rf(*dst, len);
                            let h = &mut regs_h[..len];
                            load(mem.ptr_b(src.buf) as *mut u16, src, start, h);
                            for (d, &x) in d.iter_mut().zip(h.iter()) {
                                *d = bf16_to_f32(x);
                            }
                        }
                        DType::F16 => {
                            let d = rf(*dst, len);
                            let h = &mut regs_h[..len];
                            load(mem.ptr_b(src.buf) as *mut u16, src, start, h);
                            for (d, &x) in d.iter_mut().zip(h.iter()) {
                                *d = f16_to_f32(x);
                            }
                        }
                        DType::I8 => {
                            // i8 values are held widened, in f32 registers.
                            let d = rf(*dst, len);
                            let q = &mut regs_q[..len];
                            load(mem.ptr_b(src.buf) as *mut i8, src, start, q);
                            for (d, &x) in d.iter_mut().zip(q.iter()) {
                                *d = x as f32;
                            }
                        }
                        DType::I32 => load(mem.ptr_i(src.buf), src, start, ri(*dst, len)),
                        _ => load(mem.ptr_b(src.buf), src, start, rb(*dst, len)),
                    },
                    Ins::SplatF { dst, v } => rf(*dst, len).fill(*v),
                    Ins::SplatI { dst, v } => ri(*dst, len).fill(*v),
                    Ins::SplatB { dst, v } => rb(*dst, len).fill(*v as u8),
                    Ins::UnF { op, dst, a } => unary_f_slice(*op, rf(*a, len), rf(*dst, len)),
                    Ins::UnI { op, dst, a } => {
                        let a = ri(*a, len);
                        for (d, &x) in ri(*dst, len).iter_mut().zip(a.iter()) {
                            *d = unary_i(*op, x);
                        }
                    }
                    Ins::NotB { dst, a } => {
                        let a = rb(*a, len);
                        for (d, &x) in rb(*dst, len).iter_mut().zip(a.iter()) {
                            *d = (x == 0) as u8;
                        }
                    }
                    Ins::BinF { op, dst, a, b } => {
                        bin_f_slice(*op, rf(*a, len), rf(*b, len), rf(*dst, len))
                    }
                    Ins::BinI { op, dst, a, b } => {
                        let (a, b, d) = (ri(*a, len), ri(*b, len), ri(*dst, len));
                        if *op == BinaryOp::Div {
                            if let Some(p) = b.iter().position(|&x| x == 0) {
                                return Err(format!(
                                    "integer division by zero at flat element {}",
                                    start + p
                                ));
                            }
                        }
                        for j in 0..len {
                            d[j] = match op {
                                BinaryOp::Add => a[j].wrapping_add(b[j]),
                                BinaryOp::Sub => a[j].wrapping_sub(b[j]),
                                BinaryOp::Mul => a[j].wrapping_mul(b[j]),
                                BinaryOp::Div => a[j].wrapping_div(b[j]),
                                BinaryOp::Max => a[j].max(b[j]),
                                BinaryOp::Min => a[j].min(b[j]),
                                _ => unreachable!("rejected by the verifier"),
                            };
                        }
                    }
                    Ins::BinB { op, dst, a, b } => {
                        let (a, b, d) = (rb(*a, len), rb(*b, len), rb(*dst, len));
                        for j in 0..len {
                            d[j] = match op {
                                BinaryOp::And => a[j] & b[j],
                                _ => a[j] | b[j],
                            };
                        }
                    }
                    Ins::Cmp {
                        dtype,
                        op,
                        dst,
                        a,
                        b,
                    } => {
                        let d = rb(*dst, len);
                        match dtype {
                            DType::F32 => {
                                let (a, b) = (rf(*a, len), rf(*b, len));
                                for j in 0..len {
                                    d[j] = cmp(*op, a[j], b[j]) as u8;
                                }
                            }
                            DType::I32 => {
                                let (a, b) = (ri(*a, len), ri(*b, len));
                                for j in 0..len {
                                    d[j] = cmp(*op, a[j], b[j]) as u8;
                                }
                            }
                            _ => {
                                let (a, b) = (rb(*a, len), rb(*b, len));
                                for j in 0..len {
                                    d[j] = cmp(*op, a[j], b[j]) as u8;
                                }
                            }
                        }
                    }
                    Ins::Sel {
                        dtype,
                        dst,
                        c,
                        a,
                        b,
                    } => {
                        let c = rb(*c, len);
                        match dtype {
                            DType::F32 => {
                                let (a, b, d) = (rf(*a, len), rf(*b, len), rf(*dst, len));
                                for j in 0..len {
                                    d[j] = if c[j] != 0 { a[j] } else { b[j] };
                                }
                            }
                            DType::I32 => {
                                let (a, b, d) = (ri(*a, len), ri(*b, len), ri(*dst, len));
                                for j in 0..len {
                                    d[j] = if c[j] != 0 { a[j] } else { b[j] };
                                }
                            }
                            _ => {
                                let (a, b, d) = (rb(*a, len), rb(*b, len), rb(*dst, len));
                                for j in 0..len {
                                    d[j] = if c[j] != 0 { a[j] } else { b[j] };
                                }
                            }
                        }
                    }
                    Ins::Cast { from, to, dst, a } => match (from, to) {
                        (DType::BF16 | DType::F16 | DType::I8, DType::F32) => {
                            rf(*dst, len).copy_from_slice(rf(*a, len))
                        }
                        (DType::F32, DType::F16) => {
                            for (d, &x) in rf(*dst, len).iter_mut().zip(rf(*a, len).iter()) {
                                *d = f16_to_f32(round_f16(x));
                            }
                        }
                        (DType::F32, DType::I8) => {
                            for (d, &x) in rf(*dst, len).iter_mut().zip(rf(*a, len).iter()) {
                                *d = x as i8 as f32;
                            }
                        }
                        (DType::F32, DType::BF16) => {
                            for (d, &x) in rf(*dst, len).iter_mut().zip(rf(*a, len).iter()) {
                                *d = round_bf16(x);
                            }
                        }
                        (DType::F32, DType::F32)
                        | (DType::BF16, DType::BF16)
                        | (DType::F16, DType::F16)
                        | (DType::I8, DType::I8) => rf(*dst, len).copy_from_slice(rf(*a, len)),
                        (DType::F32, DType::I32) => {
                            for (d, &x) in ri(*dst, len).iter_mut().zip(rf(*a, len).iter()) {
                                *d = x as i32;
                            }
                        }
                        (DType::F32, _) => {
                            for (d, &x) in rb(*dst, len).iter_mut().zip(rf(*a, len).iter()) {
                                *d = (x != 0.0) as u8;
                            }
                        }
                        (DType::I32, DType::F32) => {
                            for (d, &x) in rf(*dst, len).iter_mut().zip(ri(*a, len).iter()) {
                                *d = x as f32;
                            }
                        }
                        (DType::I32, DType::I32) => ri(*dst, len).copy_from_slice(ri(*a, len)),
                        (DType::I32, _) => {
                            for (d, &x) in rb(*dst, len).iter_mut().zip(ri(*a, len).iter()) {
                                *d = (x != 0) as u8;
                            }
                        }
                        (_, DType::F32) => {
                            for (d, &x) in rf(*dst, len).iter_mut().zip(rb(*a, len).iter()) {
                                *d = x as f32;
                            }
                        }
                        (_, DType::I32) => {
                            for (d, &x) in ri(*dst, len).iter_mut().zip(rb(*a, len).iter()) {
                                *d = x as i32;
                            }
                        }
                        _ => rb(*dst, len).copy_from_slice(rb(*a, len)),
                    },
                    Ins::Dropout {
                        dst,
                        a,
                        rate,
                        seed,
                        scale,
                    } => {
                        let a = rf(*a, len);
                        for (j, d) in rf(*dst, len).iter_mut().enumerate() {
                            *d = if dropout_keep(*seed, (start + j) as u64, *rate) {
                                a[j] * scale
                            } else {
                                0.0
                            };
                        }
                    }
                    Ins::Store { dtype, src, buf } => match dtype {
                        DType::I8 => {
                            let p = (mem.ptr_b(*buf) as *mut i8).add(start);
                            for (j, &x) in rf(*src, len).iter().enumerate() {
                                *p.add(j) = x as i8;
                            }
                        }
                        DType::BF16 => {
                            let p = (mem.ptr_b(*buf) as *mut u16).add(start);
                            for (j, &x) in rf(*src, len).iter().enumerate() {
                                *p.add(j) = (x.to_bits() >> 16) as u16;
                            }
                        }
                        DType::F16 => {
                            // The register holds an f16 value widened: rounding is exact.
                            let p = (mem.ptr_b(*buf) as *mut u16).add(start);
                            for (j, &x) in rf(*src, len).iter().enumerate() {
                                *p.add(j) = round_f16(x);
                            }
                        }
                        DType::F32 => std::ptr::copy_nonoverlapping(
                            fp.add(src * CHUNK),
                            mem.ptr_f(*buf).add(start),
                            len,
                        ),
                        DType::I32 => std::ptr::copy_nonoverlapping(
                            ip.add(src * CHUNK),
                            mem.ptr_i(*buf).add(start),
                            len,
                        ),
                        _ => std::ptr::copy_nonoverlapping(
                            bp.add(src * CHUNK),
                            mem.ptr_b(*buf).add(start),
                            len,
                        ),
                    },
                }
            }
            start += len;
        }
        Ok(())
    }
}

/// `x` rounded to the nearest bfloat16 (ties to even), as an `f32`; NaN stays NaN (quiet).
pub(crate) fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    if x.is_nan() {
        return f32::from_bits((b | 0x0040_0000) & 0xffff_0000);
    }
    let r = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    f32::from_bits(r & 0xffff_0000)
}

/// A bfloat16 bit pattern widened to `f32` (exact).
pub(crate) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` rounded to the nearest IEEE binary16 (ties to even; overflow to ±∞, gradual underflow),
/// as a bit pattern; every NaN becomes the quiet NaN `0x7e00` with its sign. Branch-free integer
/// steps (after F. Giesen's `float_to_half_fast3_rtne`), which the Cranelift and LLVM loops
/// repeat lane by lane: `|x|` at or above 2¹⁶ is ∞ or NaN; below 2⁻¹⁴ (an f16 subnormal or zero)
/// the float addition `|x| + 0.5` rounds the mantissa into place; otherwise the exponent is
/// rebiased and the 13 dropped bits rounded with the lowest kept bit as the tie-breaker.
pub fn round_f16(x: f32) -> u16 {
    let f = x.to_bits();
    let sign = f & 0x8000_0000;
    let a = f ^ sign;
    let special = if a > 0x7f80_0000 { 0x7e00 } else { 0x7c00 };
    let sub = (f32::from_bits(a) + 0.5)
        .to_bits()
        .wrapping_sub(0x3f00_0000);
    let normal = a.wrapping_add(0xc800_0fff).wrapping_add((a >> 13) & 1) >> 13;
    let o = if a >= 0x4780_0000 {
        special
    } else if a < 0x3880_0000 {
        sub
    } else {
        normal
    };
    (o | (sign >> 16)) as u16
}

/// An IEEE binary16 bit pattern widened to `f32` (exact; NaN payloads kept). Branch-free: the
/// exponent rebiased, ∞/NaN moved to f32's top exponent, and a subnormal renormalised by one
/// exact float subtraction (the steps the generated loops repeat).
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let m = (h & 0x7fff) << 13;
    let exp = m & 0x0f80_0000;
    let o = m.wrapping_add(0x3800_0000);
    let inf_nan = o.wrapping_add(0x3800_0000);
    let sub = (f32::from_bits(o.wrapping_add(0x0080_0000)) - f32::from_bits(0x3880_0000)).to_bits();
    let o = if exp == 0x0f80_0000 {
        inf_nan
    } else if exp == 0 {
        sub
    } else {
        o
    };
    f32::from_bits(o | ((h & 0x8000) << 16))
}

fn grow<T: Copy>(v: &mut Vec<T>, regs: usize, zero: T) {
    if v.len() < regs * CHUNK {
        v.resize(regs * CHUNK, zero);
    }
}

unsafe fn load<T: Copy>(p: *mut T, src: &Source, start: usize, dst: &mut [T]) {
    match &src.view {
        None => std::ptr::copy_nonoverlapping(p.add(start), dst.as_mut_ptr(), dst.len()),
        Some(v) => v.read(p, start, dst),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costlier_loops_split_sooner() {
        let un = |op| Ins::UnF { op, dst: 0, a: 0 };
        let splat = Ins::SplatF { dst: 0, v: 1.0 };
        // A plain loop of the base cost splits at PAR_MIN_ELEMENTS.
        let plain: Vec<Ins> = (0..PAR_BASE_COST).map(|_| splat.clone()).collect();
        assert_eq!(split_from(&plain), PAR_MIN_ELEMENTS);
        // Shorter loops never later than that.
        assert_eq!(split_from(&plain[..2]), PAR_MIN_ELEMENTS);
        // GELU's loop (three transcendentals in 21 instructions) splits about 8× sooner.
        let mut gelu: Vec<Ins> = (0..18).map(|_| splat.clone()).collect();
        gelu.extend([un(UnaryOp::Gelu), un(UnaryOp::Erf), un(UnaryOp::Exp)]);
        let from = split_from(&gelu);
        assert!((4096..PAR_MIN_ELEMENTS / 4).contains(&from), "{from}");
        // A cheap unary op is one instruction; the floor is 4096 elements.
        assert_eq!(split_from(&[un(UnaryOp::Neg)]), PAR_MIN_ELEMENTS);
        let heavy: Vec<Ins> = (0..40).map(|_| un(UnaryOp::Exp)).collect();
        assert_eq!(split_from(&heavy), 4096);
    }
}
