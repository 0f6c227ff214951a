//! Compiled loops of at least `PAR_MIN_ELEMENTS` elements run in one range per pool thread: the
//! results are the same bits as the interpreted loop's, with views whose rows are not a multiple
//! of any vector width, a transpose, polynomials, per-lane helpers, compares and a scalar tail.

use cleave_ir::parse_function;
use cleave_runtime::{compile_with, Codegen, CompileOptions, HostData};

fn run(jit: bool, codegen: Codegen) -> (Vec<Vec<u32>>, usize) {
    // 9363·21 = 196,623 elements: three ranges of 65,600 on 3 threads, two on 2.
    let f = parse_function(
        r#"func @f {
  %x = input {name = "x"} : f32[9363,21]
  %c = input {name = "c"} : f32[21]
  %b = broadcast %c {dims = [1]} : f32[9363,21]
  %m = mul %x, %b : f32[9363,21]
  %e = exp %m : f32[9363,21]
  %z = constant {value = 0} : f32[9363,21]
  %p = gt %x, %z : bool[9363,21]
  %r = relu %x : f32[9363,21]
  %s = select %p, %e, %r : f32[9363,21]
  %t = transpose %x {perm = [1, 0]} : f32[21,9363]
  %v = add %t, %t : f32[21,9363]
  %y = input {name = "y"} : f32[10007,13]
  %d = input {name = "d"} : f32[13]
  %db = broadcast %d {dims = [1]} : f32[10007,13]
  %w = mul %y, %db : f32[10007,13]
  %u = tanh %w : f32[10007,13]
  return %s as "s", %v as "v", %u as "u"
}"#,
    )
    .unwrap();
    let mut plan = compile_with(
        &f,
        &CompileOptions {
            jit,
            codegen,
            ..CompileOptions::default()
        },
    )
    .unwrap();
    let x: Vec<f32> = (0..9363 * 21)
        .map(|i| ((i as f32) * 0.013).sin() * 3.0)
        .collect();
    let c: Vec<f32> = (0..21).map(|i| i as f32 * 0.25 - 2.0).collect();
    plan.set_input_named("x", HostData::F32(x).as_slice())
        .unwrap();
    plan.set_input_named("c", HostData::F32(c).as_slice())
        .unwrap();
    plan.run().unwrap();
    let outs = (0..3)
        .map(|i| {
            plan.output_f32(i)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        })
        .collect();
    (outs, plan.jit_kernels())
}

#[test]
fn split_compiled_loops_give_the_interpreted_bits() {
    let (want, none) = run(false, Codegen::Cranelift);
    assert_eq!(none, 0);
    for codegen in Codegen::ALL.into_iter().filter(|c| c.available()) {
        let (have, compiled) = run(true, codegen);
        assert!(compiled > 0, "{codegen}: nothing compiled");
        for (o, (w, h)) in want.iter().zip(&have).enumerate() {
            let diff = w.iter().zip(h).filter(|(a, b)| a != b).count();
            assert_eq!(diff, 0, "{codegen}: output {o}: {diff} elements differ");
        }
    }
}
