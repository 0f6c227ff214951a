//! The `remat` pass: Korthikanti et al.'s activation memory of a GPT layer, Griewank's revolve
//! bound on a chain, infeasible limits, and plans that keep every function verified.
//!
//! # Conventions of the GPT layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in
//! Large Transformer Models", Section 4)
//!
//! `s` sequence, `b` batch, `h` hidden size, `a` heads. Activations are `f16` (2 bytes); each
//! dropout mask is a `bool` value (1 byte) made in the forward from the seeded `dropout` op
//! (`mask = dropout(ones) != 0`, applied as `select(mask, x·1/(1−p), 0)`), so the backward reads
//! the mask, as in Megatron. Layer norms have no affine parameters (the paper counts only a layer
//! norm's input: a fused kernel does not store its normalised output); the causal mask is added
//! to the scores (an addition stores nothing). With that, every tensor the paper counts is a saved
//! value of `split-bw`, and nothing else is: layer norm inputs (2·2sbh), QKV input (2sbh), Q and K
//! (4sbh), softmax output (2as²b), its dropout mask (as²b), dropout output (2as²b), V (2sbh),
//! output projection input (2sbh), its dropout mask (sbh), MLP input (2sbh), GELU input (8sbh),
//! GELU output (8sbh), MLP dropout mask (sbh): 34·sbh + 5·as²b.

use cleave_ir::cost::node_flops;
use cleave_ir::tracer::Tracer;
use cleave_ir::{CompareOp, DType, Function, Module, Phase};
use cleave_passes::partition::DeviceProfile;
use cleave_passes::remat::{Choice, ChoiceGraph, Policy};
use cleave_passes::split::split_stages;
use cleave_passes::{PassContext, PassManager};

/// One GPT layer with Korthikanti et al.'s conventions (see the module docs).
fn korthikanti_layer(s: usize, b: usize, h: usize, a: usize) -> Function {
    let dt = DType::F16;
    let p = 0.1;
    let mut t = Tracer::new("layer");
    let dh = h / a;
    let x = t.input("x", dt, [b, s, h]).unwrap();
    let dropout = |t: &mut Tracer, v, seed| {
        let shape = t.ty(v).shape.clone();
        let ones = t.constant_f(dt, shape.clone(), 1.0).unwrap();
        let kept = t.dropout(ones, p, seed).unwrap();
        let zero = t.constant_f(dt, shape.clone(), 0.0).unwrap();
        let mask = t.compare(CompareOp::Ne, kept, zero).unwrap();
        let scale = t.constant_f(dt, shape, 1.0 / (1.0 - p)).unwrap();
        let scaled = t.mul(v, scale).unwrap();
        t.select(mask, scaled, zero).unwrap()
    };
    let ln1 = t.layer_norm(x, 1e-5).unwrap();
    let heads = |t: &mut Tracer, name: &str| {
        let p = t.linear(ln1, h, h, true, name).unwrap();
        let p = t.reshape(p, [b, s, a, dh]).unwrap();
        t.transpose(p, [0, 2, 1, 3]).unwrap()
    };
    let q = heads(&mut t, "wq");
    let k = heads(&mut t, "wk");
    let v = heads(&mut t, "wv");
    let scores = t.matmul_t(q, k, false, true).unwrap();
    let full = [b, a, s, s];
    let scale = t.constant_f(dt, full, 1.0 / (dh as f64).sqrt()).unwrap();
    let scores = t.mul(scores, scale).unwrap();
    let row = t.iota(DType::I32, [s, s], 0).unwrap();
    let col = t.iota(DType::I32, [s, s], 1).unwrap();
    let causal = t.compare(CompareOp::Ge, row, col).unwrap();
    let zero = t.constant_f(dt, [s, s], 0.0).unwrap();
    let neg = t.constant_f(dt, [s, s], -3.0e4).unwrap();
    let bias = t.select(causal, zero, neg).unwrap();
    let bias = t.broadcast(bias, full, [2, 3]).unwrap();
    let scores = t.add(scores, bias).unwrap();
    let probs = t.softmax(scores, 3).unwrap();
    let probs = dropout(&mut t, probs, 1);
    let o = t.matmul(probs, v).unwrap();
    let o = t.transpose(o, [0, 2, 1, 3]).unwrap();
    let o = t.reshape(o, [b, s, h]).unwrap();
    let o = t.linear(o, h, h, true, "wo").unwrap();
    let o = dropout(&mut t, o, 2);
    let x = t.add(x, o).unwrap();
    let ln2 = t.layer_norm(x, 1e-5).unwrap();
    let m = t.linear(ln2, h, 4 * h, true, "fc").unwrap();
    let m = t.gelu(m).unwrap();
    let m = t.linear(m, 4 * h, h, true, "proj").unwrap();
    let m = dropout(&mut t, m, 3);
    let y = t.add(x, m).unwrap();
    t.output("y", y).unwrap();
    t.finish()
}

fn split(f: Function) -> Module {
    let mut m = Module::with_function(f);
    let mut pm = PassManager::from_pipeline("autodiff{mode=stage},split-bw").unwrap();
    pm.verify_each = true;
    pm.run(&mut m, &mut PassContext::default(), &mut |_| {})
        .unwrap();
    m
}

/// Saved bytes (kept from F, and recomputed in B for W), bytes handed from B to W, and
/// recomputed FLOPs of a policy's plan.
fn graph_figures(m: &Module, policy: Policy) -> (u64, u64, u64) {
    let st = &split_stages(m)[0];
    let profile = DeviceProfile::load("h100-sxm").unwrap();
    let g = ChoiceGraph::new(st.f, st.b, st.w, &profile);
    let plan = g.plan(policy, None, 1).unwrap();
    let sum = g.summary(&plan, 1);
    (
        sum.kept_bytes + sum.handed_bytes,
        sum.handed_bytes,
        sum.recompute_flops,
    )
}

fn forward_flops(f: &Function) -> u64 {
    f.body.iter().map(|&n| node_flops(f, n).total()).sum()
}

#[test]
fn korthikanti_saved_bytes() {
    for (s, b, h, a) in [(16, 2, 32, 4), (8, 3, 24, 2)] {
        let m = split(korthikanti_layer(s, b, h, a));
        let (none, none_handed, _) = graph_figures(&m, Policy::None);
        let (sel, handed, _) = graph_figures(&m, Policy::Selective);
        let (sbh, as2b) = ((s * b * h) as u64, (a * s * s * b) as u64);
        assert_eq!(none, 34 * sbh + 5 * as2b, "none, s={s} b={b} h={h} a={a}");
        assert_eq!(none_handed, 0);
        assert_eq!(sel, 34 * sbh, "selective, s={s} b={b} h={h} a={a}");
        // The recomputed context (the output projection's input, 2sbh) goes from B to W.
        assert_eq!(
            handed,
            2 * sbh,
            "selective hand-off, s={s} b={b} h={h} a={a}"
        );
    }
}

#[test]
fn selective_hands_the_context_from_b_to_w() {
    let m = split(korthikanti_layer(8, 2, 16, 2));
    let st = &split_stages(&m)[0];
    let profile = DeviceProfile::load("h100-sxm").unwrap();
    let g = ChoiceGraph::new(st.f, st.b, st.w, &profile);
    let plan = g.plan(Policy::Selective, None, 1).unwrap();
    let handed: Vec<_> = plan
        .choices
        .iter()
        .filter(|(_, &c)| c == Choice::Handoff)
        .collect();
    assert_eq!(handed.len(), 1, "{:?}", plan.choices);
    let (nf, nb, nw) = g.apply(&plan);
    // B returns the recomputed context, W takes it, F no longer does.
    let names = |f: &Function| -> Vec<String> {
        f.outputs
            .iter()
            .map(|o| o.name.clone())
            .filter(|n| n.starts_with("stash.h."))
            .collect()
    };
    assert!(names(&nf).is_empty());
    let from_b = names(&nb);
    assert_eq!(from_b.len(), 1);
    assert!(nw.data_inputs().any(|a| a.name == from_b[0]));
    // The context is one product and its transpose, recomputed in B only.
    let recomputed = |f: &Function, op: &str| {
        f.body
            .iter()
            .filter(|&&n| f.nodes[n].phase == Phase::Recompute && f.nodes[n].op.name() == op)
            .count()
    };
    assert_eq!(recomputed(&nb, "matmul"), 2, "q·kᵀ and probs·v in B");
    assert_eq!(recomputed(&nw, "matmul"), 0, "W recomputes no product");
    let mut out = Module::with_function(nf);
    out.functions.push(nb);
    out.functions.push(nw);
    cleave_ir::verify_module(&out).unwrap();
}

#[test]
fn korthikanti_gpt3_recompute_flops() {
    // GPT-3 175B's layer: s=2048, h=12288, a=96 (b=1; shapes only, nothing runs).
    let (s, b, h, a) = (2048u64, 1u64, 12288u64, 96u64);
    let f = korthikanti_layer(s as usize, b as usize, h as usize, a as usize);
    let fwd = forward_flops(&f);
    // The layer's matmul FLOPs are 24·bsh² + 4·bs²h.
    let m = split(f);
    let (_, _, rc) = graph_figures(&m, Policy::Selective);
    let share = rc as f64 / fwd as f64;
    // The checkpointed core attention's two products are 4·bs²h of the layer's
    // 24·bsh² + 4·bs²h matmul FLOPs: 2.70 % (Korthikanti et al.'s figure); the elementwise core
    // (scale, mask, softmax, dropout) adds a little.
    let products = (4 * b * s * s * h) as f64 / (24 * b * s * h * h + 4 * b * s * s * h) as f64;
    assert!((products - 0.027).abs() < 0.0005, "{products}");
    assert!(
        share >= products - 0.001 && share < 0.029,
        "selective recomputes {share}"
    );
    eprintln!(
        "selective recomputation: {:.2} % of forward FLOPs",
        share * 100.0
    );
}

/// Griewank's minimal number of forward steps, beyond the first sweep, to reverse `n` steps
/// with `c` checkpoints (Griewank & Walther 2000, "Algorithm 799: revolve"):
/// `t(n, c) = r·n − β(c+1, r−1)` with `β(c, r) = C(c+r, c)` and `β(c, r−1) < n ≤ β(c, r)`; the
/// first sweep is `n − 1` of those steps.
fn revolve_recomputations(n: u64, c: u64) -> u64 {
    fn binom(n: u64, k: u64) -> u64 {
        (0..k).fold(1u64, |acc, i| acc * (n - i) / (i + 1))
    }
    let beta = |c: u64, r: u64| binom(c + r, c);
    let mut r = 1;
    while beta(c, r) < n {
        r += 1;
    }
    let t = r * n - beta(c + 1, r - 1);
    t - (n - 1)
}

/// `n` equal layers `u_i = x_i + w_i`, `x_{i+1} = sin(u_i)`: each layer saves one value (`u_i`,
/// the input of `sin`) of `bytes` bytes.
fn chain(n: usize, width: usize) -> Function {
    let mut t = Tracer::new("chain");
    let mut x = t.input("x", DType::F32, [width]).unwrap();
    for i in 0..n {
        let w = t.param(&format!("w{i}"), DType::F32, [width]).unwrap();
        let u = t.add(x, w).unwrap();
        x = t.sin(u).unwrap();
    }
    t.output("y", x).unwrap();
    t.finish()
}

#[test]
fn auto_never_recomputes_more_than_revolve() {
    assert_eq!(revolve_recomputations(2, 1), 0);
    assert_eq!(revolve_recomputations(3, 1), 1); // 2·3 − 3 − 2
    let width = 64;
    let bytes = (width * 4) as u64;
    let profile = DeviceProfile::load("cpu-epyc-2core").unwrap();
    for n in [4usize, 6, 9] {
        let m = split(chain(n, width));
        let st = &split_stages(&m)[0];
        let g = ChoiceGraph::new(st.f, st.b, st.w, &profile);
        for c in 1..n as u64 {
            // c checkpoints plus the tape of the step being reversed, as revolve holds.
            let limit = (c + 1) * bytes;
            let plan = g.plan(Policy::Auto, Some(limit), 1).unwrap();
            let (nf, nb, nw) = g.apply(&plan);
            let steps = [&nb, &nw]
                .iter()
                .flat_map(|f| f.body.iter().map(move |&x| &f.nodes[x]))
                .filter(|d| d.phase == Phase::Recompute && d.op.name() == "sin")
                .count() as u64;
            let offloaded = plan
                .choices
                .values()
                .filter(|&&x| x == Choice::Offload)
                .count();
            assert!(
                steps <= revolve_recomputations(n as u64, c),
                "n={n} c={c}: {steps} steps, revolve {} ({offloaded} offloaded)",
                revolve_recomputations(n as u64, c)
            );
            let mut out = Module::with_function(nf);
            out.functions.push(nb);
            out.functions.push(nw);
            cleave_ir::verify_module(&out).unwrap();
        }
    }
}

#[test]
fn infeasible_limit_names_the_smallest_feasible_one() {
    let m = split(chain(5, 16));
    let pipeline = "remat{policy=auto,memory-limit=8}";
    let mut m2 = m.clone();
    let err = PassManager::from_pipeline(pipeline)
        .unwrap()
        .run(&mut m2, &mut PassContext::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("smallest feasible limit is"), "{err}");
    let min: u64 = err
        .rsplit("smallest feasible limit is ")
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(min > 8);
    // The named limit works.
    let mut m3 = m.clone();
    PassManager::from_pipeline(&format!("remat{{policy=auto,memory-limit={min}}}"))
        .unwrap()
        .run(&mut m3, &mut PassContext::default(), &mut |_| {})
        .unwrap();
}

#[test]
fn full_keeps_the_inputs_of_every_layer() {
    use cleave_ir::models::{gpt, GptConfig};
    let cfg = GptConfig {
        layers: 3,
        ..GptConfig::default()
    };
    let m = split(gpt(&cfg).unwrap());
    let st = &split_stages(&m)[0];
    let profile = DeviceProfile::load("cpu-epyc-2core").unwrap();
    let g = ChoiceGraph::new(st.f, st.b, st.w, &profile);
    let layers = g.layer_inputs();
    assert_eq!(layers.len(), 3, "one input per layer");
    // The first layer's input is the embedding sum `tok + pos`.
    assert!(layers
        .iter()
        .any(|&v| st.f.nodes[st.f.values[v].def].op.name() == "add"));
    let plan = g.plan(Policy::Full, None, 1).unwrap();
    for (&v, &c) in &plan.choices {
        if c == Choice::Keep {
            let op = st.f.nodes[st.f.values[v].def].op.name();
            assert!(
                op == "input" || layers.contains(&v),
                "`full` keeps a {op} that is not a layer input"
            );
        }
    }
    for &v in &layers {
        assert_eq!(plan.choices.get(&v), Some(&Choice::Keep));
    }
}

/// `auto` finds a plan within every limit from its smallest need up to keeping everything, with
/// several moments in flight (in debug builds the greedy's vector form is checked against
/// `ChoiceGraph::summary` on every call), and a plan never adds time as the limit grows.
#[test]
fn auto_fits_every_limit_from_the_smallest_to_keeping_everything() {
    use cleave_passes::remat::InFlight;
    let m = split(korthikanti_layer(64, 2, 64, 4));
    let st = &split_stages(&m)[0];
    let profile = DeviceProfile::load("h100-sxm").unwrap();
    let g = ChoiceGraph::new(st.f, st.b, st.w, &profile);
    let in_flight = InFlight {
        saved: 4,
        b_to_w: 2,
        f_to_b: 3,
        points: vec![[3, 4, 0], [1, 3, 2]],
    };
    let keep = g.plan(Policy::None, None, &in_flight).unwrap();
    let all = g.summary(&keep, &in_flight).need_bytes;
    let min = g.min_need(&in_flight).unwrap();
    assert!(min < all, "{min} {all}");
    let mut last = f64::INFINITY;
    for k in 0..=8 {
        let limit = min + (all - min) * k / 8;
        let plan = g.plan(Policy::Auto, Some(limit), &in_flight).unwrap();
        let s = g.summary(&plan, &in_flight);
        assert!(
            s.need_bytes <= limit,
            "limit {limit}: needs {}",
            s.need_bytes
        );
        assert!(
            s.added_seconds <= last * (1.0 + 0.02),
            "limit {limit}: {} s added, {last} s at a smaller limit",
            s.added_seconds
        );
        last = s.added_seconds;
    }
    assert_eq!(last, 0.0, "keeping everything fits at the largest limit");
}
