//! A small builder of MLIR text for the bodies of `linalg.generic` ops and `scf.for` loops:
//! fresh SSA names, constants and arithmetic, with one line per op.

use cleave_ir::DType;

/// The MLIR element type of a cleave dtype (`bool` is `i1`).
pub fn elem_ty(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::I8 => "i8",
        DType::I32 => "i32",
        DType::I64 => "i64",
        DType::Bool => "i1",
    }
}

/// A float literal MLIR parses for `ty` (hexadecimal bit patterns for infinities and NaN).
pub fn float_lit(x: f64, ty: &str) -> String {
    if x.is_finite() {
        return format!("{x:.17e}");
    }
    let bits: u64 = match ty {
        "f64" => x.to_bits(),
        "f32" => (x as f32).to_bits() as u64,
        "f16" => half::f16::from_f64(x).to_bits() as u64,
        _ => half::bf16::from_f64(x).to_bits() as u64,
    };
    format!("{bits:#x}")
}

/// Lines of MLIR text with fresh SSA names `%t0`, `%t1`, … shared across one function.
pub struct Body<'a> {
    /// The emitted lines.
    pub lines: Vec<String>,
    counter: &'a mut usize,
    depth: usize,
}

impl<'a> Body<'a> {
    /// A builder whose names come from `counter` (shared with the enclosing function).
    pub fn new(counter: &'a mut usize, depth: usize) -> Self {
        Body {
            lines: Vec::new(),
            counter,
            depth,
        }
    }

    /// A fresh SSA name.
    pub fn fresh(&mut self) -> String {
        let n = format!("%t{}", *self.counter);
        *self.counter += 1;
        n
    }

    /// Appends a raw line at the current depth.
    pub fn line(&mut self, s: impl AsRef<str>) {
        let pad = "  ".repeat(self.depth);
        self.lines.push(format!("{pad}{}", s.as_ref()));
    }

    /// Emits `%tN = rhs` and returns `%tN`.
    pub fn op(&mut self, rhs: impl AsRef<str>) -> String {
        let n = self.fresh();
        self.line(format!("{n} = {}", rhs.as_ref()));
        n
    }

    /// An `index` constant.
    pub fn idx(&mut self, v: i64) -> String {
        self.op(format!("arith.constant {v} : index"))
    }

    /// A float constant of type `ty`.
    pub fn fc(&mut self, v: f64, ty: &str) -> String {
        self.op(format!("arith.constant {} : {ty}", float_lit(v, ty)))
    }

    /// An integer constant of type `ty` (`i1` takes 0 or 1).
    pub fn ic(&mut self, v: i64, ty: &str) -> String {
        if ty == "i1" {
            let b = if v != 0 { "true" } else { "false" };
            return self.op(format!("arith.constant {b}"));
        }
        self.op(format!("arith.constant {v} : {ty}"))
    }

    /// A constant of element type `ty` holding `v` (floats, ints and `i1`).
    pub fn constant(&mut self, v: f64, ty: &str) -> String {
        if is_float(ty) {
            self.fc(v, ty)
        } else {
            self.ic(v as i64, ty)
        }
    }

    /// `op a, b : ty`.
    pub fn bin(&mut self, op: &str, a: &str, b: &str, ty: &str) -> String {
        self.op(format!("{op} {a}, {b} : {ty}"))
    }

    /// `op a : ty` (an LLVM intrinsic or a unary arith op).
    pub fn un(&mut self, op: &str, a: &str, ty: &str) -> String {
        if let Some(name) = op.strip_prefix("llvm.intr.") {
            // Through `llvm.call_intrinsic`: `convert-gpu-to-nvvm` marks `llvm.intr.sqrt` & co.
            // illegal (to route them to libdevice), while NVPTX lowers the intrinsics natively.
            self.op(format!(
                "llvm.call_intrinsic \"llvm.{name}.{ty}\"({a}) : ({ty}) -> {ty}"
            ))
        } else {
            self.op(format!("{op} {a} : {ty}"))
        }
    }

    /// `arith.select c, a, b : ty`.
    pub fn select(&mut self, c: &str, a: &str, b: &str, ty: &str) -> String {
        self.op(format!("arith.select {c}, {a}, {b} : {ty}"))
    }

    /// `arith.cmpf pred, a, b : ty`.
    pub fn cmpf(&mut self, pred: &str, a: &str, b: &str, ty: &str) -> String {
        self.op(format!("arith.cmpf {pred}, {a}, {b} : {ty}"))
    }

    /// `arith.cmpi pred, a, b : ty`.
    pub fn cmpi(&mut self, pred: &str, a: &str, b: &str, ty: &str) -> String {
        self.op(format!("arith.cmpi {pred}, {a}, {b} : {ty}"))
    }

    /// `a + b` on `index`.
    pub fn add(&mut self, a: &str, b: &str) -> String {
        self.bin("arith.addi", a, b, "index")
    }

    /// `a - b` on `index`.
    pub fn sub(&mut self, a: &str, b: &str) -> String {
        self.bin("arith.subi", a, b, "index")
    }

    /// `a · b` on `index`.
    pub fn mul(&mut self, a: &str, b: &str) -> String {
        self.bin("arith.muli", a, b, "index")
    }

    /// `a · c + b` on `index` with a constant `c` (skips trivial parts).
    pub fn mul_add(&mut self, a: &str, c: usize, b: Option<&str>) -> String {
        let prod = if c == 1 {
            a.to_string()
        } else {
            let cc = self.idx(c as i64);
            self.mul(a, &cc)
        };
        match b {
            Some(b) => self.add(&prod, b),
            None => prod,
        }
    }

    /// `a / c` (floor for non-negative `a`) on `index`.
    pub fn divc(&mut self, a: &str, c: usize) -> String {
        if c == 1 {
            return a.to_string();
        }
        let cc = self.idx(c as i64);
        self.bin("arith.divsi", a, &cc, "index")
    }

    /// `a mod c` (for non-negative `a`) on `index`.
    pub fn remc(&mut self, a: &str, c: usize) -> String {
        let cc = self.idx(c as i64);
        self.bin("arith.remsi", a, &cc, "index")
    }

    /// The row-major multi-index of flat index `p` in `shape`.
    pub fn decompose(&mut self, p: &str, shape: &[usize]) -> Vec<String> {
        let st = strides(shape);
        (0..shape.len())
            .map(|i| {
                let q = self.divc(p, st[i]);
                if i == 0 {
                    q
                } else {
                    self.remc(&q, shape[i])
                }
            })
            .collect()
    }

    /// The flat row-major index of multi-index `idx` in `shape`.
    pub fn compose(&mut self, idx: &[String], shape: &[usize]) -> String {
        let st = strides(shape);
        let mut acc: Option<String> = None;
        for (i, v) in idx.iter().enumerate() {
            acc = Some(self.mul_add(v, st[i], acc.as_deref()));
        }
        match acc {
            Some(a) => a,
            None => self.idx(0),
        }
    }

    /// `tensor.extract t[i]` from a flat tensor of `n` elements of `ty`.
    pub fn extract(&mut self, t: &str, i: &str, n: usize, ty: &str) -> String {
        self.op(format!("tensor.extract {t}[{i}] : tensor<{n}x{ty}>"))
    }

    /// `index` → integer of type `ty`.
    pub fn index_to(&mut self, i: &str, ty: &str) -> String {
        self.op(format!("arith.index_cast {i} : index to {ty}"))
    }

    /// Integer of type `ty` → `index`.
    pub fn to_index(&mut self, v: &str, ty: &str) -> String {
        self.op(format!("arith.index_cast {v} : {ty} to index"))
    }

    /// A counted loop `for k in 0..n` carrying `inits` (name, type); `body` gets the builder, the
    /// induction variable and the carried values and returns the next carried values. Returns the
    /// final carried values.
    pub fn for_loop(
        &mut self,
        n: usize,
        inits: &[(String, String)],
        body: impl FnOnce(&mut Body, &str, &[String]) -> Vec<String>,
    ) -> Vec<String> {
        let c0 = self.idx(0);
        let cn = self.idx(n as i64);
        let c1 = self.idx(1);
        let k = self.fresh();
        let res = self.fresh();
        let accs: Vec<String> = inits.iter().map(|_| self.fresh()).collect();
        let iter_args: Vec<String> = inits
            .iter()
            .zip(&accs)
            .map(|((init, _), a)| format!("{a} = {init}"))
            .collect();
        let tys: Vec<&str> = inits.iter().map(|(_, t)| t.as_str()).collect();
        let head = if inits.len() == 1 {
            res.clone()
        } else {
            format!("{res}:{}", inits.len())
        };
        self.line(format!(
            "{head} = scf.for {k} = {c0} to {cn} step {c1} iter_args({}) -> ({}) {{",
            iter_args.join(", "),
            tys.join(", ")
        ));
        let (lines, next) = {
            let mut inner = Body::new(self.counter, self.depth + 1);
            let next = body(&mut inner, &k, &accs);
            inner.line(format!(
                "scf.yield {} : {}",
                next.join(", "),
                tys.join(", ")
            ));
            (inner.lines, next)
        };
        debug_assert_eq!(next.len(), inits.len());
        self.lines.extend(lines);
        self.line("}");
        if inits.len() == 1 {
            vec![res]
        } else {
            (0..inits.len()).map(|i| format!("{res}#{i}")).collect()
        }
    }
}

impl Body<'_> {
    /// `scf.while` carrying `inits` (name, type): `cond` gets the carried values and returns
    /// whether to run `body` again; `body` returns the next carried values. Returns the final
    /// carried values.
    pub fn while_loop(
        &mut self,
        inits: &[(String, String)],
        cond: impl FnOnce(&mut Body, &[String]) -> String,
        body: impl FnOnce(&mut Body, &[String]) -> Vec<String>,
    ) -> Vec<String> {
        let res = self.fresh();
        let before: Vec<String> = inits.iter().map(|_| self.fresh()).collect();
        let after: Vec<String> = inits.iter().map(|_| self.fresh()).collect();
        let tys: Vec<&str> = inits.iter().map(|(_, t)| t.as_str()).collect();
        let tys = tys.join(", ");
        let args: Vec<String> = inits
            .iter()
            .zip(&before)
            .map(|((init, _), a)| format!("{a} = {init}"))
            .collect();
        self.line(format!(
            "{res}:{} = scf.while ({}) : ({tys}) -> ({tys}) {{",
            inits.len(),
            args.join(", ")
        ));
        let lines = {
            let mut inner = Body::new(self.counter, self.depth + 1);
            let c = cond(&mut inner, &before);
            inner.line(format!("scf.condition({c}) {} : {tys}", before.join(", ")));
            inner.lines
        };
        self.lines.extend(lines);
        let block: Vec<String> = after
            .iter()
            .zip(inits)
            .map(|(a, (_, t))| format!("{a}: {t}"))
            .collect();
        self.line("} do {");
        self.line(format!("^bb0({}):", block.join(", ")));
        let lines = {
            let mut inner = Body::new(self.counter, self.depth + 1);
            let next = body(&mut inner, &after);
            debug_assert_eq!(next.len(), inits.len());
            inner.line(format!("scf.yield {} : {tys}", next.join(", ")));
            inner.lines
        };
        self.lines.extend(lines);
        self.line("}");
        (0..inits.len()).map(|i| format!("{res}#{i}")).collect()
    }

    /// `scf.if cond -> (ty)`: `then` builds the taken branch and returns its value; otherwise
    /// the value is `otherwise`. Returns the result.
    pub fn if_else(
        &mut self,
        cond: &str,
        ty: &str,
        then: impl FnOnce(&mut Body) -> String,
        otherwise: &str,
    ) -> String {
        let res = self.fresh();
        self.line(format!("{res} = scf.if {cond} -> ({ty}) {{"));
        let lines = {
            let mut inner = Body::new(self.counter, self.depth + 1);
            let v = then(&mut inner);
            inner.line(format!("scf.yield {v} : {ty}"));
            inner.lines
        };
        self.lines.extend(lines);
        self.line("} else {");
        self.depth += 1;
        self.line(format!("scf.yield {otherwise} : {ty}"));
        self.depth -= 1;
        self.line("}");
        res
    }
}

/// Whether an MLIR element type is a float type.
pub fn is_float(ty: &str) -> bool {
    matches!(ty, "f32" | "f64" | "f16" | "bf16")
}

/// Row-major strides of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        st[i] = st[i + 1] * shape[i + 1];
    }
    st
}
