//! GPU figures for `scripts/gpu-check.sh`: device-to-device copy bandwidth, elementwise kernel
//! bandwidth (NVRTC-compiled, launched through a `GpuKernel` descriptor) as a fraction of it, and
//! cuBLAS SGEMM throughput. Prints one JSON object per figure. Median of `ITERS` event-timed runs.
//! Each further argument is a `kernels.json` (`cleave compile F.cir --target cuda --emit ptx`) of
//! an elementwise function: its MLIR kernels are timed with `GpuRunner` and their bandwidth
//! (every distinct buffer the launches touch, read or written once) is set against the copy's.
//!
//!     cargo run --example gpu_bench --features cuda [-- KERNELS_JSON...]

use cleave_ir::DType;
use cleave_runtime::cuda::{self, Device, GemmOperand};
use cleave_runtime::gpu_kernel::{ArgRole, GpuKernel, KernelArg};

const ITERS: usize = 20;

fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time(dev: &Device, mut f: impl FnMut()) -> f32 {
    f(); // warm-up
    let mut t = Vec::new();
    for _ in 0..ITERS {
        let (e0, e1) = (dev.event().unwrap(), dev.event().unwrap());
        dev.record(&e0).unwrap();
        f();
        dev.record(&e1).unwrap();
        t.push(dev.elapsed_ms(&e0, &e1).unwrap());
    }
    median(t)
}

const KERNELS: &str = r#"
extern "C" __global__ void add(const float* a, const float* b, float* out) {
    unsigned long i = (unsigned long)blockIdx.x * blockDim.x + threadIdx.x;
    out[i] = a[i] + b[i];
}
extern "C" __global__ void scale_relu(const float* a, float* out) {
    unsigned long i = (unsigned long)blockIdx.x * blockDim.x + threadIdx.x;
    float v = 2.0f * a[i];
    out[i] = v > 0.0f ? v : 0.0f;
}
"#;

fn main() {
    if !cuda::driver_present() {
        eprintln!("gpu_bench: no CUDA driver (libcuda.so) found; nothing to measure");
        std::process::exit(2);
    }
    let dev = Device::new(0).unwrap_or_else(|e| {
        eprintln!("gpu_bench: {e}");
        std::process::exit(2)
    });
    let name = dev.name().unwrap();
    println!("{}", serde_json::json!({"figure": "device", "name": name}));

    // Device-to-device copy: 256 MiB, read + write counted.
    let n: usize = 64 << 20; // floats
    let bytes = n * 4;
    let src = dev.alloc_bytes(bytes).unwrap();
    let mut dst = dev.alloc_bytes(bytes).unwrap();
    let ms = time(&dev, || dev.copy_d2d(&src, &mut dst).unwrap());
    let copy_gbs = 2.0 * bytes as f64 / (ms as f64 * 1e-3) / 1e9;
    println!(
        "{}",
        serde_json::json!({"figure": "d2d_copy", "bytes": bytes, "median_ms": ms, "gb_per_s": copy_gbs})
    );

    // Elementwise kernels through descriptors.
    let ptx = cuda::compile_cuda_c(KERNELS).unwrap();
    let block = 256u32;
    let grid = (n / block as usize) as u32;
    let desc = |entry: &str, nargs: usize| GpuKernel {
        name: entry.into(),
        entry: entry.into(),
        ptx: ptx.clone(),
        block: [block, 1, 1],
        grid: [grid, 1, 1],
        args: (0..nargs)
            .map(|i| KernelArg {
                name: format!("a{i}"),
                role: if i + 1 == nargs {
                    ArgRole::Output
                } else {
                    ArgRole::Input
                },
                dtype: "f32".into(),
                shape: vec![n],
                data: Vec::new(),
            })
            .collect(),
    };
    let a = dev.zeros(DType::F32, &[n]).unwrap();
    let b = dev.zeros(DType::F32, &[n]).unwrap();
    let out = dev.zeros(DType::F32, &[n]).unwrap();
    for (entry, args) in [("add", vec![&a, &b, &out]), ("scale_relu", vec![&a, &out])] {
        let k = dev.load(&desc(entry, args.len())).unwrap();
        let ms = time(&dev, || dev.launch(&k, &args).unwrap());
        let gbs = (args.len() * bytes) as f64 / (ms as f64 * 1e-3) / 1e9;
        println!(
            "{}",
            serde_json::json!({"figure": "elementwise", "kernel": entry, "median_ms": ms,
                "gb_per_s": gbs, "fraction_of_copy": gbs / copy_gbs})
        );
    }

    // cleave's MLIR elementwise kernels (kernels.json files given on the command line).
    for path in std::env::args().skip(1) {
        let r = (|| -> Result<serde_json::Value, String> {
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
            let func: cleave_runtime::gpu_kernel::GpuFunction =
                serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
            let mut bufs = std::collections::BTreeMap::new();
            for g in &func.groups {
                for k in &g.launches {
                    for a in &k.args {
                        let n: usize = a.shape.iter().product();
                        let size = if a.dtype == "bool" { 1 } else { 4 };
                        bufs.insert(a.name.clone(), n * size);
                    }
                }
            }
            let moved: usize = bufs.values().sum();
            let launches: usize = func.groups.iter().map(|g| g.launches.len()).sum();
            let name = func.function.clone();
            let mut runner = cuda::GpuRunner::new(&dev, func).map_err(|e| e.to_string())?;
            let ms = time(&dev, || runner.run_resident().unwrap());
            let gbs = moved as f64 / (ms as f64 * 1e-3) / 1e9;
            Ok(
                serde_json::json!({"figure": "mlir_elementwise", "function": name,
                "launches": launches, "bytes": moved, "median_ms": ms, "gb_per_s": gbs,
                "fraction_of_copy": gbs / copy_gbs}),
            )
        })();
        match r {
            Ok(v) => println!("{v}"),
            Err(e) => {
                println!(
                    "{}",
                    serde_json::json!({"figure": "mlir_elementwise", "error": e})
                );
                std::process::exit(1);
            }
        }
    }

    // cuBLAS SGEMM, row-major, 4096³ and a batched GPT-small-like attention product.
    for (m, k, nn, batch, tb) in [(4096, 4096, 4096, 1, false), (256, 64, 256, 96, true)] {
        let ga = dev.zeros(DType::F32, &[batch * m * k]).unwrap();
        let gb = dev.zeros(DType::F32, &[batch * k * nn]).unwrap();
        let gc = dev.zeros(DType::F32, &[batch * m * nn]).unwrap();
        let s = dev.compute_stream();
        let (pa, pb, pc) = (ga.ptr(s), gb.ptr(s), gc.ptr(s));
        let opb = if tb {
            GemmOperand {
                ptr: pb,
                rs: 1,
                cs: k,
            }
        } else {
            GemmOperand {
                ptr: pb,
                rs: nn,
                cs: 1,
            }
        };
        let ms = time(&dev, || unsafe {
            dev.sgemm(
                (m, k, nn),
                GemmOperand {
                    ptr: pa,
                    rs: k,
                    cs: 1,
                },
                opb,
                pc,
                nn,
                false,
                (batch, m * k, k * nn, m * nn),
            )
            .unwrap()
        });
        let tflops = 2.0 * (batch * m * k * nn) as f64 / (ms as f64 * 1e-3) / 1e12;
        println!(
            "{}",
            serde_json::json!({"figure": "sgemm", "m": m, "k": k, "n": nn, "batch": batch,
                "b_transposed": tb, "median_ms": ms, "tflop_per_s": tflops})
        );
    }
}
