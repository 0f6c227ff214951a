//! Round trips through the text format: `parse(print(m)) == m` and `print(parse(print(m))) ==
//! print(m)` for random well-formed modules, and the parser never panics.
//!
//! Modules are built from a *choice sequence* (a `Vec<u64>` that proptest generates and shrinks):
//! every random decision of the builder reads the next word, and an exhausted sequence reads 0, so
//! shrinking the sequence shrinks the module.

use cleave_ir::{
    infer, parse_function, parse_module, BinaryOp, CompareOp, DType, Function, Literal, Module, Op,
    Output, Phase, PoolKind, ReduceKind, SteOp, TensorType, UnaryOp, Value,
};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

struct Choices<'a> {
    words: &'a [u64],
    next: usize,
}

impl Choices<'_> {
    fn word(&mut self) -> u64 {
        let w = self.words.get(self.next).copied().unwrap_or(0);
        self.next += 1;
        w
    }

    /// A number in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.word() % n as u64) as usize
    }

    fn range(&mut self, lo: usize, hi_inclusive: usize) -> usize {
        lo + self.below(hi_inclusive - lo + 1)
    }

    fn flag(&mut self) -> bool {
        self.below(2) == 1
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }

    fn dtype(&mut self) -> DType {
        self.pick(&DType::ALL)
    }

    fn float_dtype(&mut self) -> DType {
        self.pick(&[DType::F32, DType::F64, DType::F16, DType::BF16])
    }

    fn shape(&mut self, max_rank: usize) -> Vec<usize> {
        let rank = self.range(0, max_rank);
        (0..rank)
            .map(|_| {
                // Mostly 1..=4, sometimes an empty dimension.
                if self.below(16) == 0 {
                    0
                } else {
                    self.range(1, 4)
                }
            })
            .collect()
    }

    fn float(&mut self) -> f64 {
        const SPECIAL: [f64; 16] = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            1e-7,
            -2.5e-3,
            3.4e38,
            -3.4e38,
            1e20,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            f64::MIN_POSITIVE,
            5e-324,
            0.1,
        ];
        match self.below(4) {
            0 | 1 => self.pick(&SPECIAL),
            // Any bit pattern (NaN payloads and signs print as `nan`, which reads back as NaN).
            2 => f64::from_bits(self.word()),
            _ => (self.word() % 2001) as f64 / 8.0 - 125.0,
        }
    }

    fn int(&mut self) -> i64 {
        match self.below(3) {
            0 => self.pick(&[0, 1, -1, i64::MIN, i64::MAX, 42]),
            1 => self.word() as i64,
            _ => (self.word() % 200) as i64 - 100,
        }
    }

    /// A string that needs escapes now and then.
    fn name(&mut self) -> String {
        const PIECES: [&str; 16] = [
            "x",
            "w",
            "fc1.weight",
            "a b",
            "\"",
            "\\",
            "\n",
            "\t",
            "\u{1}",
            "\u{7f}",
            "é",
            "→",
            "日本",
            "//",
            "{}",
            "\u{1F600}",
        ];
        let n = self.range(0, 4);
        (0..n).map(|_| self.pick(&PIECES)).collect()
    }

    fn increasing_subset(&mut self, n: usize) -> Vec<usize> {
        (0..n).filter(|_| self.flag()).collect()
    }

    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i + 1);
            p.swap(i, j);
        }
        p
    }
}

struct Builder<'c, 'w> {
    c: &'c mut Choices<'w>,
    f: Function,
    /// Every value defined so far, in definition order.
    values: Vec<Value>,
    arg_count: usize,
}

impl Builder<'_, '_> {
    fn ty(&self, v: Value) -> TensorType {
        self.f.ty(v).clone()
    }

    /// Pushes a node if its types infer; returns its results.
    fn try_push(&mut self, op: Op, operands: Vec<Value>) -> Option<Vec<Value>> {
        let types: Vec<TensorType> = operands.iter().map(|&v| self.ty(v)).collect();
        let refs: Vec<&TensorType> = types.iter().collect();
        let results = infer(&op, &refs).ok()?;
        let node = self.f.push_node(op, operands, results);
        let data = &mut self.f.nodes[node];
        if self.c.below(3) == 0 {
            data.phase = self.c.pick(&Phase::ALL);
        }
        data.stage = match self.c.below(4) {
            0 => Some(self.c.below(8) as u32),
            1 if self.c.flag() => Some(self.c.word() as u32),
            _ => None,
        };
        let results = data.results.clone();
        self.values.extend(&results);
        Some(results)
    }

    /// A fresh `input` or `param` of the given type.
    fn arg(&mut self, ty: TensorType) -> Value {
        self.arg_count += 1;
        let name = format!("{}{}", self.c.name(), self.arg_count);
        let op = if self.c.flag() {
            Op::Input { name, ty }
        } else {
            Op::Param { name, ty }
        };
        self.try_push(op, vec![]).expect("argument types are valid")[0]
    }

    fn any_value(&mut self) -> Value {
        let i = self.c.below(self.values.len());
        self.values[i]
    }

    /// A value of the same type as `v`: an existing one or `v` itself.
    fn same_type(&mut self, v: Value) -> Value {
        let ty = self.ty(v);
        let candidates: Vec<Value> = self
            .values
            .iter()
            .copied()
            .filter(|&w| *self.f.ty(w) == ty)
            .collect();
        self.c.pick(&candidates)
    }

    fn constant(&mut self) {
        let dtype = self.c.dtype();
        let shape = self.c.shape(2);
        let ty = TensorType::new(dtype, shape);
        let n = if self.c.flag() { 1 } else { ty.num_elements() };
        let value = if dtype.is_float() {
            Literal::Float((0..n).map(|_| self.c.float()).collect())
        } else if dtype.is_int() {
            Literal::Int((0..n).map(|_| self.c.int()).collect())
        } else {
            Literal::Bool((0..n).map(|_| self.c.flag()).collect())
        };
        self.try_push(Op::Constant { ty, value }, vec![]);
    }

    /// Adds one random node (or nothing, when the chosen op does not type-check).
    fn node(&mut self) {
        let x = self.any_value();
        let tx = self.ty(x);
        let r = tx.rank();
        match self.c.below(30) {
            0 => self.constant(),
            1 => {
                let ty = TensorType::new(self.c.dtype(), self.c.shape(3));
                let dim = self.c.below(ty.rank().max(1));
                self.try_push(Op::Iota { ty, dim }, vec![]);
            }
            2 | 3 => {
                let u = self.c.pick(&UnaryOp::ALL);
                self.try_push(Op::Unary(u), vec![x]);
            }
            4 | 5 => {
                let b = self.c.pick(&BinaryOp::ALL);
                let y = self.same_type(x);
                self.try_push(Op::Binary(b), vec![x, y]);
            }
            6 => {
                let cmp = self.c.pick(&CompareOp::ALL);
                let y = self.same_type(x);
                self.try_push(Op::Compare(cmp), vec![x, y]);
            }
            7 => {
                let cond = self.arg(TensorType::new(DType::Bool, tx.shape.clone()));
                let y = self.same_type(x);
                self.try_push(Op::Select, vec![cond, x, y]);
            }
            8 => {
                let to = self.c.dtype();
                self.try_push(Op::Cast { to }, vec![x]);
            }
            9 => {
                let out_rank = self.c.range(r, (r + 2).min(5));
                let mut dims = self.c.increasing_subset(out_rank);
                dims.truncate(r);
                let mut shape: Vec<usize> = (0..out_rank).map(|_| self.c.range(1, 3)).collect();
                for (i, &d) in dims.iter().enumerate() {
                    if tx.shape[i] != 1 || self.c.flag() {
                        shape[d] = tx.shape[i];
                    }
                }
                self.try_push(Op::Broadcast { shape, dims }, vec![x]);
            }
            10 => {
                let kind = self.c.pick(&ReduceKind::ALL);
                let axes = self.c.increasing_subset(r);
                self.try_push(Op::Reduce { kind, axes }, vec![x]);
            }
            11 => {
                let n = tx.num_elements();
                let shape = match self.c.below(3) {
                    0 => vec![n],
                    1 => vec![1, n],
                    _ => tx.shape.iter().rev().copied().collect(),
                };
                self.try_push(Op::Reshape { shape }, vec![x]);
            }
            12 => {
                let perm = self.c.permutation(r);
                self.try_push(Op::Transpose { perm }, vec![x]);
            }
            13 => {
                let mut start = vec![];
                let mut limit = vec![];
                let mut stride = vec![];
                for &d in &tx.shape {
                    let s = self.c.range(0, d);
                    start.push(s);
                    limit.push(self.c.range(s, d));
                    stride.push(self.c.range(1, 3));
                }
                self.try_push(
                    Op::Slice {
                        start,
                        limit,
                        stride,
                    },
                    vec![x],
                );
            }
            14 => {
                let axis = self.c.below(r.max(1));
                let n = self.c.range(1, 3);
                let mut operands = vec![x];
                for _ in 1..n {
                    if r > 0 && self.c.flag() {
                        let mut shape = tx.shape.clone();
                        shape[axis] = self.c.range(0, 3);
                        operands.push(self.arg(TensorType::new(tx.dtype, shape)));
                    } else {
                        operands.push(self.same_type(x));
                    }
                }
                self.try_push(Op::Concat { axis }, operands);
            }
            15 => {
                let axis = self.c.below(r.max(1));
                let extent = tx.shape.get(axis).copied().unwrap_or(0);
                let mut sizes = vec![];
                let mut left = extent;
                while left > 0 && self.c.flag() {
                    let s = self.c.range(0, left);
                    sizes.push(s);
                    left -= s;
                }
                sizes.push(left);
                self.try_push(Op::Split { axis, sizes }, vec![x]);
            }
            16 => {
                let low = (0..r).map(|_| self.c.range(0, 2)).collect();
                let high = (0..r).map(|_| self.c.range(0, 2)).collect();
                let value = self.c.float();
                self.try_push(Op::Pad { low, high, value }, vec![x]);
            }
            17 | 18 => {
                let (transpose_lhs, transpose_rhs) = (self.c.flag(), self.c.flag());
                if r >= 2 {
                    let k = if transpose_lhs {
                        tx.shape[r - 2]
                    } else {
                        tx.shape[r - 1]
                    };
                    let n = self.c.range(1, 4);
                    let mut shape = tx.shape[..r - 2].to_vec();
                    if transpose_rhs {
                        shape.extend([n, k]);
                    } else {
                        shape.extend([k, n]);
                    }
                    let w = self.arg(TensorType::new(tx.dtype, shape));
                    self.try_push(
                        Op::MatMul {
                            transpose_lhs,
                            transpose_rhs,
                        },
                        vec![x, w],
                    );
                }
            }
            19 => {
                let axis = self.c.below(r.max(1));
                let op = if self.c.flag() {
                    Op::Softmax { axis }
                } else {
                    Op::LogSoftmax { axis }
                };
                self.try_push(op, vec![x]);
            }
            20 => {
                let eps = self.c.float();
                let op = if self.c.flag() {
                    Op::LayerNorm { eps }
                } else {
                    Op::RmsNorm { eps }
                };
                self.try_push(op, vec![x]);
            }
            21 => {
                let axis = self.c.below(r.max(1));
                let idx_ty =
                    TensorType::new(self.c.pick(&[DType::I32, DType::I64]), self.c.shape(2));
                let idx = self.arg(idx_ty.clone());
                if self.c.flag() {
                    self.try_push(Op::Gather { axis }, vec![x, idx]);
                } else if r > 0 {
                    let mut shape = tx.shape[..axis].to_vec();
                    shape.extend(&idx_ty.shape);
                    shape.extend(&tx.shape[axis + 1..]);
                    // The updates' rank is `r − 1 + rank(idx)`, which may pass MAX_RANK.
                    if shape.len() <= cleave_ir::MAX_RANK {
                        let upd = self.arg(TensorType::new(tx.dtype, shape));
                        self.try_push(Op::ScatterAdd { axis }, vec![x, idx, upd]);
                    }
                }
            }
            22 => {
                let depth = self.c.range(0, 5);
                let dtype = self.c.dtype();
                let idx = if tx.dtype.is_int() {
                    x
                } else {
                    let ty = TensorType::new(DType::I32, self.c.shape(3));
                    self.arg(ty)
                };
                self.try_push(Op::OneHot { depth, dtype }, vec![idx]);
            }
            23 => {
                let rate = match self.c.below(3) {
                    0 => 0.0,
                    1 => 0.1,
                    _ => (self.c.word() % 1000) as f64 / 1000.0,
                };
                let seed = self.c.word();
                self.try_push(Op::Dropout { rate, seed }, vec![x]);
            }
            24 => {
                let dtype = self.c.float_dtype();
                let groups = self.c.range(1, 2);
                let (n, cin, h, w) = (
                    self.c.range(1, 2),
                    groups * self.c.range(1, 2),
                    self.c.range(3, 6),
                    self.c.range(3, 6),
                );
                let o = groups * self.c.range(1, 2);
                let input = self.arg(TensorType::new(dtype, vec![n, cin, h, w]));
                let kh = self.c.range(1, 3);
                let kw = self.c.range(1, 3);
                let weight = self.arg(TensorType::new(dtype, vec![o, cin / groups, kh, kw]));
                let (stride, padding, dilation) = (
                    [self.c.range(1, 2), self.c.range(1, 2)],
                    [0; 4].map(|_| self.c.range(0, 1)),
                    [self.c.range(1, 2), self.c.range(1, 2)],
                );
                let op = Op::Conv2d {
                    stride,
                    padding,
                    dilation,
                    groups,
                };
                if let Some(out) = self.try_push(op, vec![input, weight]) {
                    // The two gradient ops, fed the output in place of an incoming gradient.
                    let x_shape = self.ty(input).shape;
                    let w_shape = self.ty(weight).shape;
                    let grad = if self.c.flag() {
                        Op::Conv2dGradInput {
                            stride,
                            padding,
                            dilation,
                            groups,
                            shape: x_shape,
                        }
                    } else {
                        Op::Conv2dGradWeight {
                            stride,
                            padding,
                            dilation,
                            groups,
                            shape: w_shape,
                        }
                    };
                    let operands = if matches!(grad, Op::Conv2dGradInput { .. }) {
                        vec![out[0], weight]
                    } else {
                        vec![input, out[0]]
                    };
                    self.try_push(grad, operands);
                }
            }
            25 => {
                let input = if r == 4 && tx.dtype.is_float() {
                    x
                } else {
                    let dtype = self.c.float_dtype();
                    let shape = vec![
                        1,
                        self.c.range(1, 3),
                        self.c.range(2, 6),
                        self.c.range(2, 6),
                    ];
                    self.arg(TensorType::new(dtype, shape))
                };
                let kind = if self.c.flag() {
                    PoolKind::Max
                } else {
                    PoolKind::Avg
                };
                let (window, stride, padding) = (
                    [self.c.range(1, 3), self.c.range(1, 3)],
                    [self.c.range(1, 2), self.c.range(1, 2)],
                    [0; 4].map(|_| self.c.range(0, 1)),
                );
                // Only `avg_pool2d` prints (and reads back) the flag.
                let count_include_pad = kind == PoolKind::Avg && self.c.flag();
                let op = Op::Pool2d {
                    kind,
                    window,
                    stride,
                    padding,
                    count_include_pad,
                };
                if let Some(out) = self.try_push(op, vec![input]) {
                    if kind == PoolKind::Max {
                        let grad = Op::MaxPool2dGrad {
                            window,
                            stride,
                            padding,
                        };
                        self.try_push(grad, vec![input, out[0]]);
                    } else {
                        let shape = self.ty(input).shape;
                        let grad = Op::AvgPool2dGrad {
                            window,
                            stride,
                            padding,
                            count_include_pad,
                            shape,
                        };
                        self.try_push(grad, vec![out[0]]);
                    }
                }
            }
            26 => {
                if r >= 1 {
                    let labels_ty = TensorType::new(
                        self.c.pick(&[DType::I32, DType::I64]),
                        tx.shape[..r - 1].to_vec(),
                    );
                    let labels = self.arg(labels_ty);
                    self.try_push(Op::CrossEntropy, vec![x, labels]);
                }
            }
            27 => {
                let rank = self.c.below(3) + 1;
                let axis = self.c.below(rank);
                let op = match self.c.below(5) {
                    0 => Op::StopGradient,
                    1 => Op::Ste(SteOp::Round),
                    2 => Op::Ste(SteOp::Sign),
                    3 => Op::Ste(SteOp::ArgmaxOneHot { axis }),
                    _ => Op::GradReverse {
                        lambda: self.c.float(),
                    },
                };
                self.try_push(op, vec![x]);
            }
            _ => {
                let ty = TensorType::new(self.c.dtype(), self.c.shape(4));
                self.arg(ty);
            }
        }
    }
}

fn build_function(c: &mut Choices<'_>, name: String) -> Function {
    let mut b = Builder {
        c,
        f: Function::new(name),
        values: vec![],
        arg_count: 0,
    };
    for _ in 0..b.c.range(1, 4) {
        let ty = TensorType::new(b.c.dtype(), b.c.shape(4));
        b.arg(ty);
    }
    for _ in 0..b.c.range(0, 24) {
        b.node();
    }
    for i in 0..b.c.range(0, 3) {
        let value = b.any_value();
        let name = format!("{}{i}", b.c.name());
        b.f.outputs.push(Output { name, value });
    }
    b.f
}

fn build_module(words: &[u64]) -> Module {
    let mut c = Choices { words, next: 0 };
    let mut m = Module::new();
    const CHARS: &[u8] = b"abcXYZ019_.$-";
    for i in 0..c.range(1, 3) {
        let len = c.range(0, 6);
        let mut name: String = (0..len)
            .map(|_| CHARS[c.below(CHARS.len())] as char)
            .collect();
        name.push_str(&format!("f{i}"));
        let f = build_function(&mut c, name);
        m.functions.push(f);
    }
    m
}

fn has_nan(m: &Module) -> bool {
    m.functions.iter().any(|f| {
        f.body.iter().any(|&n| match &f.nodes[n].op {
            Op::Constant {
                value: Literal::Float(v),
                ..
            } => v.iter().any(|x| x.is_nan()),
            Op::Pad { value, .. } => value.is_nan(),
            Op::LayerNorm { eps } | Op::RmsNorm { eps } => eps.is_nan(),
            Op::Dropout { rate, .. } => rate.is_nan(),
            Op::GradReverse { lambda } => lambda.is_nan(),
            _ => false,
        })
    })
}

fn words() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(any::<u64>(), 0..400)
}

fn check_round_trip(m: &Module) {
    let text = m.to_string();
    let parsed = parse_module(&text).unwrap_or_else(|e| panic!("{e}\n--- text ---\n{text}"));
    assert_eq!(parsed.to_string(), text);
    if !has_nan(m) {
        // NaN != NaN; the textual comparison above covers those modules.
        assert_eq!(&parsed, m, "\n{text}");
    }
    if let [f] = m.functions.as_slice() {
        let g = parse_function(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(g.to_string(), f.to_string());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, rng_seed: RngSeed::Fixed(0x5eed_0001), ..ProptestConfig::default() })]

    #[test]
    fn print_parse_print(words in words()) {
        check_round_trip(&build_module(&words));
    }

    #[test]
    fn arbitrary_strings_never_panic(s in "\\PC*") {
        let _ = parse_module(&s);
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, rng_seed: RngSeed::Fixed(0x5eed_0002), ..ProptestConfig::default() })]

    #[test]
    fn format_like_strings_never_panic(
        s in "(func|@f|%[0-9a-z.]{0,3}|=|,|:|\\{|\\}|\\[|\\]|\\(|\\)|-|[0-9]{1,3}|1\\.5e-3|inf|nan|\"[a-z\\\\\"]{0,3}\"?|input|add|f32|phase|stage|return|as|//|\n| ){0,60}"
    ) {
        let _ = parse_module(&s);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, rng_seed: RngSeed::Fixed(0x5eed_0003), ..ProptestConfig::default() })]

    /// Every prefix of a valid module parses or fails cleanly, and errors point inside the text.
    #[test]
    fn truncations_never_panic(words in words()) {
        let text = build_module(&words).to_string();
        for (i, _) in text.char_indices() {
            if let Err(e) = parse_module(&text[..i]) {
                let _ = e.to_string();
                prop_assert!(e.line >= 1 && e.column >= 1);
            }
        }
    }

    /// Single-character edits of valid text never panic.
    #[test]
    fn edits_never_panic(words in words(), edits in prop::collection::vec((any::<usize>(), any::<char>(), 0u8..3), 1..20)) {
        let text = build_module(&words).to_string();
        for (pos, ch, kind) in edits {
            let chars: Vec<char> = text.chars().collect();
            let at = pos % (chars.len() + 1);
            let mut edited: Vec<char> = chars.clone();
            match kind {
                0 => edited.insert(at, ch),
                1 if at < edited.len() => { edited.remove(at); }
                _ if at < edited.len() => edited[at] = ch,
                _ => {}
            }
            let s: String = edited.into_iter().collect();
            if let Err(e) = parse_module(&s) {
                let _ = e.with_path("edit.cir").to_string();
            }
        }
    }
}

#[test]
fn generator_covers_many_ops() {
    // The generator must actually produce a wide range of ops (guards against a builder bug that
    // makes most nodes fail to type-check).
    let mut seen = std::collections::BTreeSet::new();
    let mut rng = 0x1234_5678_9abc_def0u64;
    for _ in 0..300 {
        let words: Vec<u64> = (0..400)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            })
            .collect();
        let m = build_module(&words);
        for f in &m.functions {
            for &n in &f.body {
                seen.insert(f.nodes[n].op.name());
            }
        }
    }
    let all = Op::all_names();
    let missing: Vec<&str> = all.iter().copied().filter(|n| !seen.contains(n)).collect();
    assert!(missing.is_empty(), "never generated: {missing:?}");
}

/// A GPT-like module of about 20k lines parses quickly and round-trips.
#[test]
fn large_module() {
    let (b, t, d, v) = (4, 128, 256, 1000);
    let mut f = Function::new("gpt");
    let f32t = |s: &[usize]| TensorType::new(DType::F32, s.to_vec());
    let push = |f: &mut Function, op: Op, operands: Vec<Value>| -> Value {
        let types: Vec<TensorType> = operands.iter().map(|&v| f.ty(v).clone()).collect();
        let refs: Vec<&TensorType> = types.iter().collect();
        let results = infer(&op, &refs).unwrap();
        let n = f.push_node(op, operands, results);
        f.result(n)
    };
    let param = |f: &mut Function, name: String, shape: &[usize]| {
        push(
            f,
            Op::Param {
                name,
                ty: f32t(shape),
            },
            vec![],
        )
    };
    let tokens = push(
        &mut f,
        Op::Input {
            name: "tokens".into(),
            ty: TensorType::new(DType::I32, vec![b, t]),
        },
        vec![],
    );
    let wte = param(&mut f, "wte".into(), &[v, d]);
    let mut x = push(&mut f, Op::Gather { axis: 0 }, vec![wte, tokens]);
    for layer in 0..96 {
        let ln = push(&mut f, Op::LayerNorm { eps: 1e-5 }, vec![x]);
        let g = param(&mut f, format!("h.{layer}.ln.weight"), &[d]);
        let gb = push(
            &mut f,
            Op::Broadcast {
                shape: vec![b, t, d],
                dims: vec![2],
            },
            vec![g],
        );
        let mut h = push(&mut f, Op::Binary(BinaryOp::Mul), vec![ln, gb]);
        for (j, width) in [(0, 4 * d), (1, d)] {
            let k = h_dim(&f, h);
            let w = param(&mut f, format!("h.{layer}.mlp.{j}.weight"), &[b, k, width]);
            h = push(
                &mut f,
                Op::MatMul {
                    transpose_lhs: false,
                    transpose_rhs: false,
                },
                vec![h, w],
            );
            if j == 0 {
                h = push(&mut f, Op::Unary(UnaryOp::GeluTanh), vec![h]);
            }
        }
        let parts = {
            let ty = f.ty(h).clone();
            let results = infer(
                &Op::Split {
                    axis: 2,
                    sizes: vec![d / 2, d / 2],
                },
                &[&ty],
            )
            .unwrap();
            let n = f.push_node(
                Op::Split {
                    axis: 2,
                    sizes: vec![d / 2, d / 2],
                },
                vec![h],
                results,
            );
            f.nodes[n].results.clone()
        };
        let c = push(&mut f, Op::Concat { axis: 2 }, parts);
        for k in 0..190 {
            // Pad the layer out to ~200 lines with cheap elementwise nodes.
            let op = if k % 2 == 0 {
                Op::Unary(UnaryOp::Tanh)
            } else {
                Op::StopGradient
            };
            let y = push(&mut f, op, vec![c]);
            let last = *f.body.last().unwrap();
            f.nodes[last].phase = Phase::Dgrad;
            f.nodes[last].stage = Some(layer / 24);
            let _ = y;
        }
        x = push(&mut f, Op::Binary(BinaryOp::Add), vec![x, c]);
    }
    f.outputs.push(Output {
        name: "logits".into(),
        value: x,
    });
    let m = Module::with_function(f);
    let text = m.to_string();
    let lines = text.lines().count();
    assert!(lines > 19_000, "{lines} lines");
    let start = std::time::Instant::now();
    let parsed = parse_module(&text).unwrap();
    let elapsed = start.elapsed();
    eprintln!("parsed {lines} lines ({} bytes) in {elapsed:?}", text.len());
    assert_eq!(parsed, m);
    // Debug builds are ~10-30x slower than release; this bound still catches quadratic blowups.
    assert!(elapsed.as_secs_f64() < 10.0, "{elapsed:?}");
}

/// The last extent of a value (the contraction size of the next matmul).
fn h_dim(f: &Function, v: Value) -> usize {
    *f.ty(v).shape.last().unwrap()
}
