//! After its first run, a plan allocates nothing (counted by the instrumented allocator over
//! every thread, so this binary holds this one test alone).

use cleave_runtime::alloc::{self, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// After its first run, a plan's kernels allocate nothing: fused loops, reductions over
/// trailing, leading and middle axes, softmax, transposes, broadcasts, gathers and scatter-adds
/// run in the buffers planned at compile time, and GEMMs (row-major and transposed operands,
/// edge tiles, `k` over several blocks, products split across the pool's threads) pack into
/// buffers that the first run sized, one for every pool thread (whichever part each claims). (Without AVX-512 the GEMMs run on the `gemm`
/// crate, which allocates on every call: there the plan leaves them out.)
#[test]
fn a_plan_allocates_nothing_after_its_first_run() {
    // The default GEMM kernel (`CLEAVE_GEMM=library` picks the `gemm` crate; read once, at
    // the first GEMM): this binary holds this one test, so it clears the variable here.
    std::env::remove_var("CLEAVE_GEMM");
    #[cfg(target_arch = "x86_64")]
    let own_gemm = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let own_gemm = false;
    let gemms = if own_gemm {
        "
  %20 = input {name = \"p\"} : f32[150,300]
  %21 = input {name = \"q\"} : f32[300,130]
  %22 = matmul %20, %21 : f32[150,130]
  %23 = matmul %22, %21 {transpose_rhs = true} : f32[150,300]
  %24 = matmul %20, %22 {transpose_lhs = true} : f32[300,130]
  %25 = matmul %21, %20 {transpose_lhs = true, transpose_rhs = true} : f32[130,150]
  %26 = matmul %5, %5 {transpose_rhs = true} : f32[4,5,5]
  return %2 as \"a\", %4 as \"b\", %6 as \"c\", %9 as \"d\", %13 as \"e\", %23 as \"g\", %24 as \"h\", %25 as \"i\", %26 as \"j\""
    } else {
        "
  return %2 as \"a\", %4 as \"b\", %6 as \"c\", %9 as \"d\", %13 as \"e\""
    };
    let text = format!(
        "func @f {{
  %0 = input {{name = \"x\"}} : f32[4,5,6]
  %1 = exp %0 : f32[4,5,6]
  %2 = reduce_sum %1 {{axes = [2]}} : f32[4,5]
  %3 = reduce_sum %1 {{axes = [0]}} : f32[5,6]
  %4 = reduce_max %1 {{axes = [1]}} : f32[4,6]
  %5 = softmax %0 {{axis = 2}} : f32[4,5,6]
  %6 = transpose %5 {{perm = [2, 0, 1]}} : f32[6,4,5]
  %7 = broadcast %3 {{dims = [1, 2]}} : f32[4,5,6]
  %8 = add %7, %1 : f32[4,5,6]
  %9 = tanh %8 : f32[4,5,6]
  %10 = reshape %0 : f32[20,6]
  %11 = input {{name = \"idx\"}} : i32[7]
  %12 = gather %10, %11 {{axis = 0}} : f32[7,6]
  %13 = scatter_add %10, %11, %12 {{axis = 0}} : f32[20,6]{gemms}
}}"
    );
    let f = cleave_ir::parse_function(&text).unwrap();
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
    let data = |n: usize| -> Vec<f32> { (0..n).map(|i| (i as f32 * 0.37).sin()).collect() };
    let x = data(120);
    plan.set_input_named("x", cleave_runtime::HostSlice::F32(&x))
        .unwrap();
    let idx: Vec<i32> = vec![3, 0, 19, 3, 7, 11, 2];
    plan.set_input_named("idx", cleave_runtime::HostSlice::I32(&idx))
        .unwrap();
    if own_gemm {
        let (p, q) = (data(150 * 300), data(300 * 130));
        plan.set_input_named("p", cleave_runtime::HostSlice::F32(&p))
            .unwrap();
        plan.set_input_named("q", cleave_runtime::HostSlice::F32(&q))
            .unwrap();
    }
    plan.run().unwrap();
    alloc::start_counting();
    for _ in 0..5 {
        plan.run().unwrap();
    }
    assert_eq!(alloc::stop_counting(), 0);
}
