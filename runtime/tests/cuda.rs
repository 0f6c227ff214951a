//! The CUDA runtime against the CPU. Needs `--features cuda`; without a CUDA driver the GPU
//! tests print that they skipped and check the no-driver error instead.
#![cfg(feature = "cuda")]

use cleave_ir::{DType, Tensor, TensorData};
use cleave_runtime::cuda::{self, CudaError, Device, GemmOperand};
use cleave_runtime::gpu_kernel::{ArgRole, GpuKernel, KernelArg};

fn device(test: &str) -> Option<Device> {
    if !cuda::driver_present() {
        eprintln!("SKIPPED {test}: no CUDA driver (libcuda.so) on this machine");
        return None;
    }
    Some(Device::new(0).expect("a present driver opens device 0"))
}

fn f32_tensor(shape: &[usize], f: impl Fn(usize) -> f64) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor {
        dtype: DType::F32,
        shape: shape.to_vec(),
        data: TensorData::Float((0..n).map(|i| (f(i) as f32) as f64).collect()),
    }
}

fn floats(t: &Tensor) -> &[f64] {
    match &t.data {
        TensorData::Float(v) => v,
        _ => panic!("not a float tensor"),
    }
}

#[test]
fn no_driver_is_a_clear_error() {
    if cuda::driver_present() {
        eprintln!("SKIPPED no_driver_is_a_clear_error: a CUDA driver is present");
        return;
    }
    let Err(e) = Device::new(0) else {
        panic!("Device::new succeeded without a driver")
    };
    assert!(matches!(e, CudaError::NoDriver { what: "driver", .. }));
    assert!(e.to_string().contains("libcuda.so"), "{e}");
}

const ELEMENTWISE: &str = r#"
extern "C" __global__ void add_relu(const float* a, const float* b, float* out) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < 1000) { float s = a[i] + b[i]; out[i] = s > 0.0f ? s : 0.0f; }
}
"#;

#[test]
fn nvrtc_kernel_matches_cpu() {
    let Some(dev) = device("nvrtc_kernel_matches_cpu") else {
        return;
    };
    let ptx = cuda::compile_cuda_c(ELEMENTWISE).unwrap();
    let k = GpuKernel {
        name: "add_relu".into(),
        entry: "add_relu".into(),
        ptx,
        block: [128, 1, 1],
        grid: [8, 1, 1],
        args: ["a", "b", "out"]
            .iter()
            .map(|n| KernelArg {
                name: n.to_string(),
                role: if *n == "out" {
                    ArgRole::Output
                } else {
                    ArgRole::Input
                },
                dtype: "f32".into(),
                shape: vec![1000],
                data: Vec::new(),
            })
            .collect(),
    };
    let k = dev.load(&k).unwrap();
    let a = f32_tensor(&[1000], |i| (i as f64 * 0.37).sin());
    let b = f32_tensor(&[1000], |i| (i as f64 * 0.11).cos() - 0.5);
    let (da, db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
    let out = dev.zeros(DType::F32, &[1000]).unwrap();
    dev.launch(&k, &[&da, &db, &out]).unwrap();
    let got = dev.download(&out).unwrap();
    for (i, g) in floats(&got).iter().enumerate() {
        let want = ((floats(&a)[i] as f32 + floats(&b)[i] as f32).max(0.0)) as f64;
        assert_eq!(*g, want, "element {i}");
    }
    // A wrong argument is an error naming the kernel and the argument.
    let small = dev.zeros(DType::F32, &[10]).unwrap();
    let e = dev.launch(&k, &[&da, &db, &small]).unwrap_err().to_string();
    assert!(e.contains("add_relu") && e.contains("`out`"), "{e}");
}

/// Row-major reference: c[i][j] (+)= Σ_p a(i,p)·b(p,j) with the operands' strides.
#[allow(clippy::too_many_arguments)]
fn gemm_ref(
    (m, k, n): (usize, usize, usize),
    a: &[f64],
    (ars, acs): (usize, usize),
    b: &[f64],
    (brs, bcs): (usize, usize),
    c: &mut [f64],
    acc: bool,
) {
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|p| a[i * ars + p * acs] * b[p * brs + j * bcs])
                .sum();
            c[i * n + j] = if acc { c[i * n + j] + s } else { s };
        }
    }
}

#[test]
fn cublas_gemm_matches_cpu_with_transposes_accumulate_and_batches() {
    let Some(dev) = device("cublas_gemm_matches_cpu") else {
        return;
    };
    let (m, k, n, batch) = (5, 7, 3, 2);
    for (ta, tb, acc) in [
        (false, false, false),
        (true, false, true),
        (false, true, false),
        (true, true, true),
    ] {
        let a_str = if ta { (1, m) } else { (k, 1) };
        let b_str = if tb { (1, k) } else { (n, 1) };
        let a = f32_tensor(&[batch, m * k], |i| ((i * 7 % 11) as f64 - 5.0) / 4.0);
        let b = f32_tensor(&[batch, k * n], |i| ((i * 5 % 13) as f64 - 6.0) / 8.0);
        let c0 = f32_tensor(&[batch, m * n], |i| i as f64 / 16.0);
        let (da, db, dc) = (
            dev.upload(&a).unwrap(),
            dev.upload(&b).unwrap(),
            dev.upload(&c0).unwrap(),
        );
        let s = dev.compute_stream();
        let op = |ptr, (rs, cs)| GemmOperand { ptr, rs, cs };
        unsafe {
            dev.sgemm(
                (m, k, n),
                op(da.ptr(s), a_str),
                op(db.ptr(s), b_str),
                dc.ptr(s),
                n,
                acc,
                (batch, m * k, k * n, m * n),
            )
            .unwrap();
        }
        let got = dev.download(&dc).unwrap();
        let mut want = floats(&c0).to_vec();
        for bi in 0..batch {
            gemm_ref(
                (m, k, n),
                &floats(&a)[bi * m * k..],
                a_str,
                &floats(&b)[bi * k * n..],
                b_str,
                &mut want[bi * m * n..(bi + 1) * m * n],
                acc,
            );
        }
        for (i, (g, w)) in floats(&got).iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "ta={ta} tb={tb} acc={acc} [{i}]: {g} vs {w}"
            );
        }
    }
}

/// `--precision bf16|f16`'s GEMMs on cuBLAS: 16-bit operands, f32 accumulation, each result
/// rounded once, so within one 16-bit rounding of the exact product of the rounded operands.
#[test]
fn cublas_gemm_in_bf16_and_f16_rounds_each_result_once() {
    let Some(dev) = device("cublas_gemm_in_bf16_and_f16") else {
        return;
    };
    let (m, k, n, batch) = (6, 40, 5, 2);
    for (dtype, ulp) in [(DType::BF16, 2f64.powi(-8)), (DType::F16, 2f64.powi(-11))] {
        for tb in [false, true] {
            let narrow =
                |t: Tensor| Tensor::from_float(dtype, t.shape.clone(), floats(&t).to_vec());
            let a = narrow(f32_tensor(&[batch, m * k], |i| {
                ((i * 7 % 11) as f64 - 5.0) / 3.0
            }));
            let b = narrow(f32_tensor(&[batch, k * n], |i| {
                ((i * 5 % 13) as f64 - 6.0) / 7.0
            }));
            let (da, db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
            let dc = dev.zeros(dtype, &[batch, m * n]).unwrap();
            let b_str = if tb { (1, k) } else { (n, 1) };
            let s = dev.compute_stream();
            let op = |ptr, (rs, cs)| GemmOperand { ptr, rs, cs };
            unsafe {
                dev.gemm(
                    dtype,
                    (m, k, n),
                    op(da.ptr(s), (k, 1)),
                    op(db.ptr(s), b_str),
                    dc.ptr(s),
                    n,
                    false,
                    (batch, m * k, k * n, m * n),
                )
                .unwrap();
            }
            let got = dev.download(&dc).unwrap();
            assert_eq!(got.dtype, dtype);
            let mut want = vec![0.0; batch * m * n];
            for bi in 0..batch {
                gemm_ref(
                    (m, k, n),
                    &floats(&a)[bi * m * k..],
                    (k, 1),
                    &floats(&b)[bi * k * n..],
                    b_str,
                    &mut want[bi * m * n..(bi + 1) * m * n],
                    false,
                );
            }
            for (i, (g, w)) in floats(&got).iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= ulp * w.abs() + 1e-6,
                    "{dtype} tb={tb} [{i}]: {g} vs {w}"
                );
            }
        }
    }
}

#[test]
fn events_time_a_copy() {
    let Some(dev) = device("events_time_a_copy") else {
        return;
    };
    let src = dev.alloc_bytes(1 << 20).unwrap();
    let mut dst = dev.alloc_bytes(1 << 20).unwrap();
    let (e0, e1) = (dev.event().unwrap(), dev.event().unwrap());
    dev.record(&e0).unwrap();
    dev.copy_d2d(&src, &mut dst).unwrap();
    dev.record(&e1).unwrap();
    let ms = dev.elapsed_ms(&e0, &e1).unwrap();
    assert!(ms >= 0.0, "{ms}");
}

/// `out[b] = lhs[b]ᵀ · rhs[b]ᵀ` for batch 2, lhs stored 4×3 (k×m), rhs stored 5×4 (n×k): the
/// group's "MLIR" kernel, written here in CUDA C.
const BATCHED_TT: &str = r#"
extern "C" __global__ void mm(const float* l, const float* r, float* o) {
    unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= 30) return;
    unsigned b = t / 15, i = (t / 5) % 3, j = t % 5;
    float s = 0.0f;
    for (unsigned p = 0; p < 4; p++) s += l[b * 12 + p * 3 + i] * r[b * 20 + j * 4 + p];
    o[t] = s;
}
extern "C" __global__ void acc(const float* w, const float* g, float* o) {
    unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < 30) o[t] = w[t] - 0.5f * g[t];
}
"#;

fn karg(name: &str, role: ArgRole, shape: &[usize]) -> KernelArg {
    KernelArg {
        name: name.into(),
        role,
        dtype: "f32".into(),
        shape: shape.to_vec(),
        data: Vec::new(),
    }
}

/// `%0 = matmul lhs, rhs {transpose_lhs, transpose_rhs}; w' = w − 0.5·%0`, the update carried
/// into `w` on the device.
fn gemm_function(ptx: &str) -> cleave_runtime::gpu_kernel::GpuFunction {
    use cleave_runtime::gpu_kernel::{GemmSpec, GpuFunction, GpuKernelGroup};
    let launch = |name: &str, entry: &str, args: Vec<KernelArg>| GpuKernel {
        name: name.into(),
        entry: entry.into(),
        ptx: ptx.to_string(),
        block: [32, 1, 1],
        grid: [1, 1, 1],
        args,
    };
    GpuFunction {
        function: "step".into(),
        args: vec![
            karg("lhs", ArgRole::Input, &[2, 4, 3]),
            karg("rhs", ArgRole::Input, &[2, 5, 4]),
            karg("w", ArgRole::Input, &[2, 3, 5]),
        ],
        outputs: vec![("prod".into(), "%0".into()), ("w".into(), "%1".into())],
        groups: vec![
            GpuKernelGroup {
                name: "k0".into(),
                ops: vec!["matmul".into()],
                launches: vec![launch(
                    "k0_0",
                    "mm",
                    vec![
                        karg("lhs", ArgRole::Input, &[2, 4, 3]),
                        karg("rhs", ArgRole::Input, &[2, 5, 4]),
                        karg("%0", ArgRole::Output, &[2, 3, 5]),
                    ],
                )],
                scratch: Vec::new(),
                gemm: Some(GemmSpec {
                    lhs: "lhs".into(),
                    rhs: "rhs".into(),
                    out: "%0".into(),
                    dtype: "f32".into(),
                    batch: 2,
                    m: 3,
                    n: 5,
                    k: 4,
                    transpose_lhs: true,
                    transpose_rhs: true,
                }),
                copies: Vec::new(),
            },
            GpuKernelGroup {
                name: "k1".into(),
                ops: vec!["mul".into(), "sub".into()],
                launches: vec![launch(
                    "k1_0",
                    "acc",
                    vec![
                        karg("w", ArgRole::Input, &[2, 3, 5]),
                        karg("%0", ArgRole::Input, &[2, 3, 5]),
                        karg("%1", ArgRole::Output, &[2, 3, 5]),
                    ],
                )],
                scratch: Vec::new(),
                gemm: None,
                copies: Vec::new(),
            },
        ],
    }
}

#[test]
fn gpu_runner_gemm_groups_on_cublas_and_mlir_with_resident_carried_state() {
    use cleave_runtime::cuda::{GemmMode, GpuRunner};
    let Some(dev) = device("gpu_runner_gemm_groups_on_cublas_and_mlir") else {
        return;
    };
    let ptx = cuda::compile_cuda_c(BATCHED_TT).unwrap();
    let lhs = f32_tensor(&[2, 4, 3], |i| (i as f64 * 0.31).sin());
    let rhs = f32_tensor(&[2, 5, 4], |i| (i as f64 * 0.17).cos());
    let w0 = f32_tensor(&[2, 3, 5], |i| i as f64 * 0.01);
    // Reference product: batch b, lhs (i,p) at 12b + 3p + i, rhs (p,j) at 20b + 4j + p.
    let mut prod = vec![0.0; 30];
    for b in 0..2 {
        gemm_ref(
            (3, 4, 5),
            &floats(&lhs)[12 * b..],
            (1, 3),
            &floats(&rhs)[20 * b..],
            (1, 4),
            &mut prod[15 * b..15 * b + 15],
            false,
        );
    }
    for mode in [GemmMode::Cublas, GemmMode::Mlir] {
        let mut r = GpuRunner::with_gemm(&dev, gemm_function(&ptx), mode).unwrap();
        assert_eq!(r.cublas_groups(), (mode == GemmMode::Cublas) as usize);
        r.set_arg("lhs", &lhs).unwrap();
        r.set_arg("rhs", &rhs).unwrap();
        r.set_arg("w", &w0).unwrap();
        for _ in 0..3 {
            r.run_resident().unwrap();
            r.carry().unwrap();
        }
        let got = r.output("prod").unwrap();
        for (i, (g, want)) in floats(&got).iter().zip(&prod).enumerate() {
            assert!(
                (g - want).abs() <= 1e-5,
                "{mode:?}: product element {i}: {g} vs {want}"
            );
        }
        // Three steps of w ← w − 0.5·prod, carried on the device.
        let w = r.arg("w").unwrap();
        for (i, (g, w0)) in floats(&w).iter().zip(floats(&w0)).enumerate() {
            let want = w0 - 1.5 * prod[i];
            assert!(
                (g - want).abs() <= 1e-5,
                "{mode:?}: w element {i}: {g} vs {want}"
            );
        }
        // A wrong argument is an error naming it.
        let e = r.set_arg("w", &lhs).unwrap_err().to_string();
        assert!(e.contains("argument `w`"), "{e}");
    }
}
