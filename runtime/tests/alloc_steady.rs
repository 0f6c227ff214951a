//! After its first run, a plan's own kernels allocate nothing (counted by the instrumented
//! allocator over every thread, so this binary holds this one test alone).

use cleave_runtime::alloc::{self, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// After its first run, a plan's own kernels allocate nothing: fused loops, reductions over
/// trailing, leading and middle axes, softmax, transposes and broadcasts run in the buffers
/// planned at compile time (the GEMM library's per-call packing buffers are the exception, so
/// this plan has no matmul; `cleave bench` reports a whole step's count).
#[test]
fn a_plan_allocates_nothing_after_its_first_run() {
    let f = cleave_ir::parse_function(
        "func @f {
  %0 = input {name = \"x\"} : f32[4,5,6]
  %1 = exp %0 : f32[4,5,6]
  %2 = reduce_sum %1 {axes = [2]} : f32[4,5]
  %3 = reduce_sum %1 {axes = [0]} : f32[5,6]
  %4 = reduce_max %1 {axes = [1]} : f32[4,6]
  %5 = softmax %0 {axis = 2} : f32[4,5,6]
  %6 = transpose %5 {perm = [2, 0, 1]} : f32[6,4,5]
  %7 = broadcast %3 {dims = [1, 2]} : f32[4,5,6]
  %8 = add %7, %1 : f32[4,5,6]
  %9 = tanh %8 : f32[4,5,6]
  return %2 as \"a\", %4 as \"b\", %6 as \"c\", %9 as \"d\"
}",
    )
    .unwrap();
    let mut plan = cleave_runtime::compile_with(
        &f,
        &cleave_runtime::CompileOptions {
            fuse: true,
            preserve_args: true,
            jit: true,
            ..Default::default()
        },
    )
    .unwrap();
    let x: Vec<f32> = (0..120).map(|i| (i as f32 * 0.37).sin()).collect();
    plan.set_input_named("x", cleave_runtime::HostSlice::F32(&x))
        .unwrap();
    plan.run().unwrap();
    alloc::start_counting();
    for _ in 0..5 {
        plan.run().unwrap();
    }
    assert_eq!(alloc::stop_counting(), 0);
}
