//! Rule tests (`A => B` and "must not prove"), the tidy test that every rule is tested, the
//! adversarial node-limit test and the ILP-versus-tree extraction test.
//!
//! Each case is a small function in IR text with outputs `lhs` and `rhs`; [`proves`] saturates it
//! with the named rules only and says whether the two outputs ended up in one e-class.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use cleave_ir::{parse_function, Function, Value};
use egg::Id;

use super::convert::{build_region, RegionGraph};
use super::rules::{algebra, all_rule_names, reassociate, Rule};
use super::*;

/// Every rule named in a test below, collected for the tidy test.
const TESTED: &[&str] = &[
    "transpose-transpose",
    "transpose-identity",
    "matmul-absorb-transpose-lhs",
    "matmul-absorb-transpose-rhs",
    "reshape-reshape",
    "reshape-identity",
    "broadcast-identity",
    "reduce-empty-axes",
    "mul-one",
    "one-mul",
    "add-zero",
    "zero-add",
    "neg-neg",
    "add-assoc",
    "add-comm",
    "mul-assoc",
    "mul-comm",
];

fn region_of(func: &Function) -> RegionGraph {
    let live_out: HashMap<Value, bool> = func.outputs.iter().map(|o| (o.value, true)).collect();
    build_region(func, 0..func.body.len(), &live_out, &HashMap::new())
}

/// The class of an output (arguments are leaves, added on demand: hash-consing finds them).
fn output_class(region: &mut RegionGraph, func: &Function, name: &str) -> Id {
    let v = func.output(name).expect("output");
    if let Some(&(_, c)) = region.roots.iter().find(|(r, _)| *r == v) {
        return c;
    }
    let r = region.egraph.analysis.leaves.value(v, func.ty(v), false);
    let r = region.egraph.add(CirLang::Ref(r));
    region
        .egraph
        .add(CirLang::Other(vec![r].into_boxed_slice()))
}

/// Saturates `text` with the rules named `names` and says whether `lhs` and `rhs` are equal.
fn proves(names: &[&str], text: &str) -> bool {
    let func = parse_function(text).expect("test function parses");
    cleave_ir::verify_function(&func).expect("test function verifies");
    let rules: Vec<Rule> = algebra::rules()
        .into_iter()
        .chain(reassociate::rules())
        .filter(|r| names.contains(&r.name.as_str()))
        .collect();
    assert_eq!(rules.len(), names.len(), "unknown rule name in {names:?}");
    let mut region = region_of(&func);
    let lhs = output_class(&mut region, &func, "lhs");
    let rhs = output_class(&mut region, &func, "rhs");
    let runner = egg::Runner::<CirLang, CirAnalysis, ()>::new(CirAnalysis::default())
        .with_node_limit(10_000)
        .with_iter_limit(30)
        .with_time_limit(Duration::from_secs(5))
        .with_egraph(region.egraph)
        .run(&rules);
    assert!(
        matches!(runner.stop_reason, Some(egg::StopReason::Saturated)),
        "unexpected stop: {:?}",
        runner.stop_reason
    );
    runner.egraph.find(lhs) == runner.egraph.find(rhs)
}

macro_rules! rule_test {
    ($name:ident, [$($rule:literal),+], $text:literal) => {
        #[test]
        fn $name() {
            assert!(proves(&[$($rule),+], $text), "expected lhs == rhs");
        }
    };
    ($name:ident, [$($rule:literal),+], $text:literal, must_not) => {
        #[test]
        #[should_panic(expected = "must not prove")]
        fn $name() {
            assert!(proves(&[$($rule),+], $text), "must not prove");
        }
    };
}

rule_test!(
    transpose_transpose,
    ["transpose-transpose"],
    r#"func @f {
  %x = input {name = "x"} : f32[2,3,4]
  %a = transpose %x {perm = [1, 2, 0]} : f32[3,4,2]
  %b = transpose %a {perm = [1, 0, 2]} : f32[4,3,2]
  %c = transpose %x {perm = [2, 1, 0]} : f32[4,3,2]
  return %b as "lhs", %c as "rhs"
}"#
);

rule_test!(
    transpose_transpose_folds,
    ["transpose-transpose", "transpose-identity"],
    r#"func @f {
  %x = input {name = "x"} : f32[2,3]
  %a = transpose %x {perm = [1, 0]} : f32[3,2]
  %b = transpose %a {perm = [1, 0]} : f32[2,3]
  return %b as "lhs", %x as "rhs"
}"#
);

rule_test!(
    transpose_transpose_not_inverse,
    ["transpose-transpose", "transpose-identity"],
    r#"func @f {
  %x = input {name = "x"} : f32[2,2,2]
  %a = transpose %x {perm = [1, 0, 2]} : f32[2,2,2]
  %b = transpose %a {perm = [0, 2, 1]} : f32[2,2,2]
  return %b as "lhs", %x as "rhs"
}"#,
    must_not
);

rule_test!(
    transpose_identity,
    ["transpose-identity"],
    r#"func @f {
  %x = input {name = "x"} : f32[2,3]
  %a = transpose %x {perm = [0, 1]} : f32[2,3]
  return %a as "lhs", %x as "rhs"
}"#
);

rule_test!(
    transpose_identity_not_swap,
    ["transpose-identity"],
    r#"func @f {
  %x = input {name = "x"} : f32[2,2]
  %a = transpose %x {perm = [1, 0]} : f32[2,2]
  return %a as "lhs", %x as "rhs"
}"#,
    must_not
);

rule_test!(
    matmul_absorb_lhs,
    ["matmul-absorb-transpose-lhs"],
    r#"func @f {
  %x = input {name = "x"} : f32[5,4,2]
  %w = input {name = "w"} : f32[5,4,3]
  %xt = transpose %x {perm = [0, 2, 1]} : f32[5,2,4]
  %a = matmul %xt, %w : f32[5,2,3]
  %b = matmul %x, %w {transpose_lhs = true} : f32[5,2,3]
  return %a as "lhs", %b as "rhs"
}"#
);

rule_test!(
    matmul_absorb_lhs_batch_dim,
    ["matmul-absorb-transpose-lhs"],
    r#"func @f {
  %x = input {name = "x"} : f32[3,3,3]
  %w = input {name = "w"} : f32[3,3,3]
  %xt = transpose %x {perm = [1, 0, 2]} : f32[3,3,3]
  %a = matmul %xt, %w : f32[3,3,3]
  %b = matmul %x, %w {transpose_lhs = true} : f32[3,3,3]
  return %a as "lhs", %b as "rhs"
}"#,
    must_not
);

rule_test!(
    matmul_absorb_rhs,
    ["matmul-absorb-transpose-rhs"],
    r#"func @f {
  %x = input {name = "x"} : f32[2,4]
  %w = input {name = "w"} : f32[3,4]
  %wt = transpose %w {perm = [1, 0]} : f32[4,3]
  %a = matmul %x, %wt : f32[2,3]
  %b = matmul %x, %w {transpose_rhs = true} : f32[2,3]
  return %a as "lhs", %b as "rhs"
}"#
);

rule_test!(
    matmul_absorb_rhs_already_flagged,
    ["matmul-absorb-transpose-rhs"],
    r#"func @f {
  %x = input {name = "x"} : f32[2,4]
  %w = input {name = "w"} : f32[4,3]
  %wt = transpose %w {perm = [1, 0]} : f32[3,4]
  %a = matmul %x, %wt {transpose_rhs = true} : f32[2,3]
  %b = matmul %x, %w : f32[2,3]
  return %a as "lhs", %b as "rhs"
}"#
);

rule_test!(
    matmul_absorb_rhs_wrong_flag,
    ["matmul-absorb-transpose-rhs"],
    r#"func @f {
  %x = input {name = "x"} : f32[3,3]
  %w = input {name = "w"} : f32[3,3]
  %wt = transpose %w {perm = [1, 0]} : f32[3,3]
  %a = matmul %x, %wt : f32[3,3]
  %b = matmul %x, %w : f32[3,3]
  return %a as "lhs", %b as "rhs"
}"#,
    must_not
);

rule_test!(
    reshape_reshape,
    ["reshape-reshape"],
    r#"func @f {
  %x = input {name = "x"} : f32[2,6]
  %a = reshape %x : f32[3,4]
  %b = reshape %a : f32[12]
  %c = reshape %x : f32[12]
  return %b as "lhs", %c as "rhs"
}"#
);

rule_test!(
    reshape_reshape_not_identity,
    ["reshape-reshape"],
    r#"func @f {
  %x = input {name = "x"} : f32[2,6]
  %a = reshape %x : f32[3,4]
  %b = reshape %a : f32[2,6]
  return %b as "lhs", %x as "rhs"
}"#,
    must_not
);

rule_test!(
    reshape_identity,
    ["reshape-identity"],
    r#"func @f {
  %x = input {name = "x"} : f32[2,6]
  %a = reshape %x : f32[2,6]
  return %a as "lhs", %x as "rhs"
}"#
);

rule_test!(
    reshape_identity_other_shape,
    ["reshape-identity"],
    r#"func @f {
  %x = input {name = "x"} : f32[2,6]
  %a = reshape %x : f32[6,2]
  %b = reshape %a : f32[2,6]
  return %b as "lhs", %x as "rhs"
}"#,
    must_not
);

rule_test!(
    broadcast_identity,
    ["broadcast-identity"],
    r#"func @f {
  %x = input {name = "x"} : f32[2,1]
  %a = broadcast %x {dims = [0, 1]} : f32[2,1]
  return %a as "lhs", %x as "rhs"
}"#
);

rule_test!(
    broadcast_identity_real_broadcast,
    ["broadcast-identity"],
    r#"func @f {
  %x = input {name = "x"} : f32[1,3]
  %a = broadcast %x {dims = [0, 1]} : f32[3,3]
  %b = reduce_max %a {axes = [0]} : f32[3]
  %c = reshape %x : f32[3]
  return %b as "lhs", %c as "rhs"
}"#,
    must_not
);

rule_test!(
    reduce_empty_axes,
    ["reduce-empty-axes"],
    r#"func @f {
  %x = input {name = "x"} : f32[2,3]
  %a = reduce_mean %x {axes = []} : f32[2,3]
  return %a as "lhs", %x as "rhs"
}"#
);

rule_test!(
    reduce_empty_axes_real_axis,
    ["reduce-empty-axes"],
    r#"func @f {
  %x = input {name = "x"} : f32[1,3]
  %a = reduce_sum %x {axes = [0]} : f32[3]
  %b = reshape %x : f32[3]
  return %a as "lhs", %b as "rhs"
}"#,
    must_not
);

rule_test!(
    mul_one,
    ["mul-one"],
    r#"func @f {
  %x = input {name = "x"} : f32[3]
  %c = constant {value = 1.0} : f32[]
  %o = broadcast %c {dims = []} : f32[3]
  %a = mul %x, %o : f32[3]
  return %a as "lhs", %x as "rhs"
}"#
);

rule_test!(
    mul_one_by_two,
    ["mul-one", "one-mul"],
    r#"func @f {
  %x = input {name = "x"} : f32[3]
  %c = constant {value = 2.0} : f32[3]
  %a = mul %x, %c : f32[3]
  return %a as "lhs", %x as "rhs"
}"#,
    must_not
);

rule_test!(
    one_mul,
    ["one-mul"],
    r#"func @f {
  %x = input {name = "x"} : i32[3]
  %c = constant {value = [1, 1, 1]} : i32[3]
  %a = mul %c, %x : i32[3]
  return %a as "lhs", %x as "rhs"
}"#
);

rule_test!(
    one_mul_mixed_literal,
    ["one-mul"],
    r#"func @f {
  %x = input {name = "x"} : f32[3]
  %c = constant {value = [1.0, 1.0, 2.0]} : f32[3]
  %a = mul %c, %x : f32[3]
  return %a as "lhs", %x as "rhs"
}"#,
    must_not
);

rule_test!(
    add_zero,
    ["add-zero"],
    r#"func @f {
  %x = input {name = "x"} : f32[3]
  %c = constant {value = -0.0} : f32[3]
  %a = add %x, %c : f32[3]
  return %a as "lhs", %x as "rhs"
}"#
);

rule_test!(
    add_zero_positive_zero,
    ["add-zero", "zero-add"],
    r#"func @f {
  %x = input {name = "x"} : f32[3]
  %c = constant {value = 0.0} : f32[3]
  %a = add %x, %c : f32[3]
  return %a as "lhs", %x as "rhs"
}"#,
    must_not
);

rule_test!(
    zero_add,
    ["zero-add"],
    r#"func @f {
  %x = input {name = "x"} : i64[3]
  %c = constant {value = 0} : i64[3]
  %a = add %c, %x : i64[3]
  return %a as "lhs", %x as "rhs"
}"#
);

rule_test!(
    zero_add_nonzero,
    ["zero-add"],
    r#"func @f {
  %x = input {name = "x"} : i64[3]
  %c = constant {value = 1} : i64[3]
  %a = add %c, %x : i64[3]
  return %a as "lhs", %x as "rhs"
}"#,
    must_not
);

rule_test!(
    neg_neg,
    ["neg-neg"],
    r#"func @f {
  %x = input {name = "x"} : f32[3]
  %a = neg %x : f32[3]
  %b = neg %a : f32[3]
  return %b as "lhs", %x as "rhs"
}"#
);

rule_test!(
    neg_neg_single,
    ["neg-neg"],
    r#"func @f {
  %x = input {name = "x"} : f32[3]
  %a = neg %x : f32[3]
  %b = abs %a : f32[3]
  %c = abs %x : f32[3]
  return %b as "lhs", %c as "rhs"
}"#,
    must_not
);

rule_test!(
    add_assoc,
    ["add-assoc"],
    r#"func @f {
  %a = input {name = "a"} : f32[3]
  %b = input {name = "b"} : f32[3]
  %c = input {name = "c"} : f32[3]
  %ab = add %a, %b : f32[3]
  %l = add %ab, %c : f32[3]
  %bc = add %b, %c : f32[3]
  %r = add %a, %bc : f32[3]
  return %l as "lhs", %r as "rhs"
}"#
);

rule_test!(
    add_assoc_not_comm,
    ["add-assoc"],
    r#"func @f {
  %a = input {name = "a"} : f32[3]
  %b = input {name = "b"} : f32[3]
  %l = add %a, %b : f32[3]
  %r = add %b, %a : f32[3]
  return %l as "lhs", %r as "rhs"
}"#,
    must_not
);

rule_test!(
    add_comm,
    ["add-comm"],
    r#"func @f {
  %a = input {name = "a"} : f32[3]
  %b = input {name = "b"} : f32[3]
  %l = add %a, %b : f32[3]
  %r = add %b, %a : f32[3]
  return %l as "lhs", %r as "rhs"
}"#
);

rule_test!(
    add_comm_not_sub,
    ["add-comm"],
    r#"func @f {
  %a = input {name = "a"} : f32[3]
  %b = input {name = "b"} : f32[3]
  %l = sub %a, %b : f32[3]
  %r = sub %b, %a : f32[3]
  return %l as "lhs", %r as "rhs"
}"#,
    must_not
);

rule_test!(
    mul_assoc,
    ["mul-assoc"],
    r#"func @f {
  %a = input {name = "a"} : f32[3]
  %b = input {name = "b"} : f32[3]
  %c = input {name = "c"} : f32[3]
  %ab = mul %a, %b : f32[3]
  %l = mul %ab, %c : f32[3]
  %bc = mul %b, %c : f32[3]
  %r = mul %a, %bc : f32[3]
  return %l as "lhs", %r as "rhs"
}"#
);

rule_test!(
    mul_assoc_not_distributive,
    ["mul-assoc"],
    r#"func @f {
  %a = input {name = "a"} : f32[3]
  %b = input {name = "b"} : f32[3]
  %c = input {name = "c"} : f32[3]
  %bc = add %b, %c : f32[3]
  %l = mul %a, %bc : f32[3]
  %ab = mul %a, %b : f32[3]
  %ac = mul %a, %c : f32[3]
  %r = add %ab, %ac : f32[3]
  return %l as "lhs", %r as "rhs"
}"#,
    must_not
);

rule_test!(
    mul_comm,
    ["mul-comm"],
    r#"func @f {
  %a = input {name = "a"} : f32[3]
  %b = input {name = "b"} : f32[3]
  %l = mul %a, %b : f32[3]
  %r = mul %b, %a : f32[3]
  return %l as "lhs", %r as "rhs"
}"#
);

rule_test!(
    mul_comm_not_add,
    ["mul-comm"],
    r#"func @f {
  %a = input {name = "a"} : f32[3]
  %b = input {name = "b"} : f32[3]
  %l = mul %a, %b : f32[3]
  %r = add %b, %a : f32[3]
  return %l as "lhs", %r as "rhs"
}"#,
    must_not
);

#[test]
fn equal_constants_merge() {
    assert!(proves(
        &["neg-neg"],
        r#"func @f {
  %c1 = constant {value = 1.5} : f32[3]
  %c2 = constant {value = 1.5} : f32[3]
  %a = exp %c1 : f32[3]
  %b = exp %c2 : f32[3]
  return %a as "lhs", %b as "rhs"
}"#
    ));
    assert!(!proves(
        &["neg-neg"],
        r#"func @f {
  %c1 = constant {value = 0.0} : f32[3]
  %c2 = constant {value = -0.0} : f32[3]
  return %c1 as "lhs", %c2 as "rhs"
}"#
    ));
}

#[test]
fn every_rule_has_a_test() {
    let names: BTreeSet<String> = all_rule_names().into_iter().collect();
    let tested: BTreeSet<String> = TESTED.iter().map(|s| s.to_string()).collect();
    assert_eq!(names, tested, "rules and tested rules differ");
    for n in &names {
        assert!(
            n.chars().all(|c| c.is_ascii_lowercase() || c == '-'),
            "rule `{n}` is not kebab-case"
        );
    }
}

/// A chain `x0 + x1 + … + x{n}` over distinct inputs.
fn add_chain(n: usize) -> Function {
    let mut text = String::from("func @chain {\n");
    for i in 0..=n {
        text.push_str(&format!("  %x{i} = input {{name = \"x{i}\"}} : f32[4]\n"));
    }
    text.push_str("  %s0 = add %x0, %x1 : f32[4]\n");
    for i in 1..n {
        text.push_str(&format!(
            "  %s{i} = add %s{}, %x{} : f32[4]\n",
            i - 1,
            i + 1
        ));
    }
    text.push_str(&format!("  return %s{} as \"sum\"\n}}\n", n - 1));
    parse_function(&text).unwrap()
}

fn inputs(func: &Function, seed: u64) -> Vec<cleave_ir::Tensor> {
    let mut state = seed;
    func.args()
        .map(|a| {
            let data = (0..a.ty.num_elements())
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) as f64 / (1u64 << 31) as f64) * 2.0 - 1.0
                })
                .collect();
            cleave_ir::Tensor::from_float(a.ty.dtype, a.ty.shape.clone(), data)
        })
        .collect()
}

#[test]
fn reassociating_a_long_add_chain_hits_the_node_limit() {
    let func = add_chain(200);
    let opts = SimplifyOptions {
        reassociate: true,
        node_limit: 2_000,
        ..SimplifyOptions::default()
    };
    let (out, report) = simplify_function(&func, &opts).expect("simplifies");
    let warnings = report.warnings(&func.name, &opts);
    assert!(
        warnings.iter().any(|w| w.contains("node_limit=2000")),
        "{warnings:?}"
    );
    assert_eq!(
        func.args().map(|a| a.name).collect::<Vec<_>>(),
        out.args().map(|a| a.name).collect::<Vec<_>>()
    );
    let args = inputs(&func, 7);
    let p = cleave_ir::Precision::F32;
    let before = cleave_ir::run_function(&func, &args, p).unwrap()[0].to_f64_vec();
    let after = cleave_ir::run_function(&out, &args, p).unwrap()[0].to_f64_vec();
    for (b, a) in before.iter().zip(&after) {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
    }
}

#[test]
fn default_rules_saturate_a_long_add_chain() {
    let func = add_chain(200);
    let (out, report) = simplify_function(&func, &SimplifyOptions::default()).unwrap();
    assert!(report
        .warnings(&func.name, &SimplifyOptions::default())
        .is_empty());
    assert_eq!(out.to_string(), func.to_string());
}

/// Two roots share an expensive matmul `s = x·w`: `exp(s)` and `neg(s)`. Each root is also (in
/// this constructed e-graph) equal to a private matmul of leaves, which is cheaper than `s` plus
/// the elementwise op by tree cost. Tree-cost extraction therefore picks two private matmuls; the
/// DAG optimum computes `s` once and pays two cheap elementwise ops.
#[test]
fn ilp_counts_shared_work_once() {
    let mut egraph = CirGraph::new(CirAnalysis::default());
    let ty = cleave_ir::TensorType::new(cleave_ir::DType::F32, vec![64, 64]);
    let leaf = |egraph: &mut CirGraph, i: u32| {
        let r = egraph.analysis.leaves.value(Value::from_u32(i), &ty, false);
        let r = egraph.add(CirLang::Ref(r));
        egraph.add(CirLang::Other(vec![r].into_boxed_slice()))
    };
    let (x, w, w2, w3) = (
        leaf(&mut egraph, 0),
        leaf(&mut egraph, 1),
        leaf(&mut egraph, 2),
        leaf(&mut egraph, 3),
    );
    let f = egraph.add(CirLang::Flag(false));
    let s = egraph.add(CirLang::MatMul([f, f, x, w]));
    let exp_ref = egraph
        .analysis
        .leaves
        .op(&cleave_ir::Op::Unary(cleave_ir::UnaryOp::Exp), 0);
    let exp_ref = egraph.add(CirLang::Ref(exp_ref));
    let r1 = egraph.add(CirLang::Other(vec![exp_ref, s].into_boxed_slice()));
    let r2 = egraph.add(CirLang::Neg([s]));
    let alt1 = egraph.add(CirLang::MatMul([f, f, x, w2]));
    let alt2 = egraph.add(CirLang::MatMul([f, f, x, w3]));
    egraph.union(r1, alt1);
    egraph.union(r2, alt2);
    egraph.rebuild();
    let roots = [r1, r2];
    let greedy = extract::extract_greedy(&egraph, &roots);
    let ilp = extract::extract_ilp(&egraph, &roots, ILP_NODE_LIMIT).expect("ILP solves");
    let n_matmuls = |e: &Extraction| {
        e.choice
            .values()
            .filter(|n| matches!(n, CirLang::MatMul(_)))
            .count()
    };
    assert_eq!(n_matmuls(&greedy), 2, "tree cost picks the private matmuls");
    assert_eq!(n_matmuls(&ilp), 1, "the ILP shares one matmul");
    assert!(ilp.dag_cost < greedy.dag_cost);
}
