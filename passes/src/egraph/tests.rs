//! Rule tests (`A => B` and "must not prove", read from `rule_cases.cir`), the tidy test that every rule is tested, the
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

/// One case of `rule_cases.cir`.
struct RuleCase<'a> {
    name: &'a str,
    rules: Vec<&'a str>,
    equal: bool,
    text: &'a str,
}

/// The cases of `rule_cases.cir`: blocks headed `# case:`, `# rules:` and `# expect:`.
fn rule_cases() -> Vec<RuleCase<'static>> {
    let file = include_str!("rule_cases.cir");
    let mut cases = Vec::new();
    for block in file.split("# case: ").skip(1) {
        let (name, rest) = block.split_once('\n').expect("case header");
        let rest = rest.strip_prefix("# rules: ").expect("`# rules:` line");
        let (rules, rest) = rest.split_once('\n').expect("rules line");
        let rest = rest.strip_prefix("# expect: ").expect("`# expect:` line");
        let (expect, text) = rest.split_once('\n').expect("expect line");
        assert!(
            matches!(expect, "equal" | "distinct"),
            "case {name}: expect `{expect}`"
        );
        cases.push(RuleCase {
            name: name.trim(),
            rules: rules.split(',').map(str::trim).collect(),
            equal: expect == "equal",
            text: text.trim(),
        });
    }
    cases
}

#[test]
fn rule_cases_hold() {
    let cases = rule_cases();
    assert!(cases.len() >= 30, "only {} cases read", cases.len());
    let wrong: Vec<String> = cases
        .iter()
        .filter(|c| proves(&c.rules, c.text) != c.equal)
        .map(|c| {
            let want = if c.equal { "equal" } else { "distinct" };
            format!("{} (rules {:?}): expected {want}", c.name, c.rules)
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "rule cases that fail:\n{}",
        wrong.join("\n")
    );
}

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
    // A rule is tested when some case expects it to prove an equality.
    let tested: BTreeSet<String> = rule_cases()
        .iter()
        .filter(|c| c.equal)
        .flat_map(|c| c.rules.iter().map(|r| r.to_string()))
        .collect();
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
