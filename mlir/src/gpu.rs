//! Kernel groups → PTX through MLIR's GPU pipeline, plus the launch descriptors the CUDA runtime
//! needs ([`GpuKernelGroup`]).
//!
//! Each group is lowered on its own (so a failure names the group and its ops). After the
//! pipeline, the host function of the group holds only `arith.constant`s, `memref.alloc`s
//! (temporaries), `gpu.launch_func`s with constant grid and block sizes whose arguments are
//! buffers, and maybe `memref.copy`s; the `gpu.binary` ops hold the PTX. The descriptors are read
//! from the printed module: anything else in the host code is an error, since the CUDA runtime
//! could not run it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use cleave_ir::{Function, Value};
use cleave_runtime::gpu_kernel::{
    ArgRole, GemmSpec, GpuFunction, GpuKernel, GpuKernelGroup, KernelArg,
};

use crate::context::{Mlir, MlirError};
use crate::emit::{constant_data, emit_function, module_text, EmitError, EmittedKernel};
use crate::partition::value_names;
use crate::pipeline::check_nvvm_target;

/// Why a function could not be compiled for the GPU.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// An op has no lowering.
    #[error(transparent)]
    Emit(#[from] EmitError),
    /// MLIR failed.
    #[error(transparent)]
    Mlir(#[from] MlirError),
    /// A pipeline that would abort LLVM.
    #[error("{0}")]
    Target(String),
}

/// The result of compiling one function for the GPU.
#[derive(Clone, Debug)]
pub struct GpuProgram {
    /// The function's name.
    pub function: String,
    /// The function's arguments (role input), in order.
    pub args: Vec<KernelArg>,
    /// The function's outputs: `(output name, buffer name)`.
    pub outputs: Vec<(String, String)>,
    /// One entry per kernel group, in execution order.
    pub groups: Vec<GpuKernelGroup>,
    /// The emitted MLIR (linalg on tensors) of each group, as `(group name, module text)`.
    pub mlir: Vec<(String, String)>,
}

/// Compiles every kernel group of `func` to PTX with `pipeline` (see
/// [`crate::pipeline::default_gpu_pipeline`]).
///
/// The groups are independent, so they are lowered in parallel: one worker thread per available
/// core (at most one per group), each with its own MLIR context, taking the next group from a
/// shared counter. The result does not depend on the thread count: groups keep their execution
/// order, and an error is the one of the first failing group in that order.
pub fn compile_gpu(func: &Function, pipeline: &str) -> Result<GpuProgram, GpuError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    compile_gpu_threads(func, pipeline, threads)
}

/// [`compile_gpu`] on at most `threads` worker threads (at least one).
pub fn compile_gpu_threads(
    func: &Function,
    pipeline: &str,
    threads: usize,
) -> Result<GpuProgram, GpuError> {
    check_nvvm_target(pipeline).map_err(GpuError::Target)?;
    let kernels = emit_function(func)?;
    let names = value_names(func);
    let threads = threads.min(kernels.len()).max(1);
    let results = compile_groups(func, &kernels, &names, pipeline, threads);
    let mut groups = Vec::with_capacity(kernels.len());
    let mut texts = Vec::with_capacity(kernels.len());
    for (k, r) in kernels.iter().zip(results) {
        groups.push(r?);
        texts.push((k.group.name.clone(), module_text(&[&k.func])));
    }
    let args = func
        .args()
        .map(|a| KernelArg {
            name: a.name.to_string(),
            role: ArgRole::Input,
            dtype: a.ty.dtype.name().to_string(),
            shape: a.ty.shape.clone(),
            data: Vec::new(),
        })
        .collect();
    let outputs = func
        .outputs
        .iter()
        .map(|o| (o.name.clone(), names[&o.value].clone()))
        .collect();
    Ok(GpuProgram {
        function: func.name.clone(),
        args,
        outputs,
        groups,
        mlir: texts,
    })
}

/// Lowers every kernel on `threads` worker threads; the results are in `kernels`' order. A
/// worker stops taking groups once any group has failed (the groups before the first failure
/// are still all compiled, so the reported error is deterministic).
fn compile_groups(
    func: &Function,
    kernels: &[EmittedKernel],
    names: &HashMap<Value, String>,
    pipeline: &str,
    threads: usize,
) -> Vec<Result<GpuKernelGroup, GpuError>> {
    let next = AtomicUsize::new(0);
    // The index of the first failed group so far (usize::MAX: none).
    let failed = AtomicUsize::new(usize::MAX);
    let mut slots: Vec<Option<Result<GpuKernelGroup, GpuError>>> =
        (0..kernels.len()).map(|_| None).collect();
    let done: Vec<Vec<(usize, Result<GpuKernelGroup, GpuError>)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mlir = Mlir::new();
                    // The workers already use every core.
                    mlir.context.enable_multi_threading(false);
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= kernels.len() || i > failed.load(Ordering::Relaxed) {
                            break;
                        }
                        let r = compile_group(&mlir, func, &kernels[i], names, pipeline);
                        if r.is_err() {
                            failed.fetch_min(i, Ordering::Relaxed);
                        }
                        out.push((i, r));
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| match w.join() {
                Ok(out) => out,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    });
    for (i, r) in done.into_iter().flatten() {
        slots[i] = Some(r);
    }
    // Groups after the first failure may not have been compiled; they are never reached.
    let first_failed = failed.into_inner();
    slots
        .into_iter()
        .enumerate()
        .map_while(|(i, r)| if i > first_failed { None } else { r })
        .collect()
}

/// Lowers one kernel group to PTX and reads its launches.
fn compile_group(
    mlir: &Mlir,
    func: &Function,
    k: &EmittedKernel,
    names: &HashMap<Value, String>,
    pipeline: &str,
) -> Result<GpuKernelGroup, GpuError> {
    let g = &k.group;
    let text = module_text(&[&k.func]);
    let ops: Vec<String> = g
        .nodes
        .iter()
        .map(|&n| func.node(n).op.name().to_string())
        .collect();
    let what = format!("kernel {} ({})", g.name, ops.join(", "));
    let module = mlir.lower(&what, &text, pipeline)?;
    let lowered = module.as_operation().to_string();
    // Parameters of the group's function, in order: inputs, outputs, constants.
    let mut params: Vec<KernelArg> = Vec::new();
    let arg = |v: Value, role: ArgRole| {
        let ty = func.ty(v);
        // A constant that is also an output has two buffers: its data and the output.
        let name = if role == ArgRole::Constant {
            format!("{}.const", names[&v])
        } else {
            names[&v].clone()
        };
        KernelArg {
            name,
            role: role.clone(),
            dtype: ty.dtype.name().to_string(),
            shape: ty.shape.clone(),
            data: if role == ArgRole::Constant {
                constant_data(func, v)
            } else {
                Vec::new()
            },
        }
    };
    params.extend(g.inputs.iter().map(|&v| arg(v, ArgRole::Input)));
    params.extend(g.outputs.iter().map(|&v| arg(v, ArgRole::Output)));
    params.extend(k.constants.iter().map(|&v| arg(v, ArgRole::Constant)));
    let mut group = read_program(&what, &g.name, ops, &lowered, &params)?;
    group.gemm = gemm_spec(func, g, names);
    Ok(group)
}

impl GpuProgram {
    /// The descriptor of the whole function (what `kernels.json` holds).
    pub fn descriptor(&self) -> GpuFunction {
        GpuFunction {
            function: self.function.clone(),
            args: self.args.clone(),
            outputs: self.outputs.clone(),
            groups: self.groups.clone(),
        }
    }
}

/// Reads the launches of host function `@name` and the PTX of the `gpu.binary` ops from a
/// lowered module's text.
fn read_program(
    what: &str,
    name: &str,
    ops: Vec<String>,
    text: &str,
    params: &[KernelArg],
) -> Result<GpuKernelGroup, MlirError> {
    let bad = |message: String| MlirError::Unexpected {
        what: what.to_string(),
        message,
        mlir: text.to_string(),
    };
    let mut binaries: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        let l = line.trim_start();
        if let Some(rest) = l.strip_prefix("gpu.binary @") {
            let module = rest.split_whitespace().next().unwrap_or("").to_string();
            let at = rest
                .find("assembly = \"")
                .ok_or_else(|| bad(format!("gpu.binary @{module} holds no PTX assembly")))?;
            binaries.insert(module, unescape(&rest[at + "assembly = \"".len()..]));
        }
    }
    let header = format!("func.func @{name}(");
    let start = text
        .lines()
        .position(|l| l.trim_start().starts_with(&header))
        .ok_or_else(|| bad(format!("no host function @{name} after the pipeline")))?;
    let head = text.lines().nth(start).expect("found above");
    // `%argI` → parameter I.
    let mut buffers: HashMap<String, KernelArg> = HashMap::new();
    for (i, p) in params.iter().enumerate() {
        buffers.insert(format!("%arg{i}"), p.clone());
    }
    let n_params = head.matches("%arg").count();
    if n_params != params.len() {
        return Err(bad(format!(
            "host function has {n_params} parameters, expected {}",
            params.len()
        )));
    }
    let mut consts: HashMap<String, u32> = HashMap::new();
    let mut scratch = Vec::new();
    let mut launches = Vec::new();
    let mut copies = Vec::new();
    for line in text.lines().skip(start + 1) {
        let l = line.trim();
        if l == "return" || l == "}" {
            break;
        }
        if let Some((lhs, rhs)) = l.split_once(" = ") {
            if let Some(c) = rhs.strip_prefix("arith.constant ") {
                if let Some(v) = c.strip_suffix(" : index") {
                    if let Ok(v) = v.parse() {
                        consts.insert(lhs.to_string(), v);
                    }
                }
                continue;
            }
            if rhs.starts_with("memref.alloc()") {
                let ty = rhs.rsplit(" : ").next().unwrap_or("");
                let (n, dtype) = parse_memref(ty).ok_or_else(|| bad(format!("temporary `{l}`")))?;
                let a = KernelArg {
                    name: format!("scratch{}", scratch.len()),
                    role: ArgRole::Scratch,
                    dtype,
                    shape: vec![n],
                    data: Vec::new(),
                };
                scratch.push(a.clone());
                buffers.insert(lhs.to_string(), a);
                continue;
            }
            return Err(bad(format!(
                "unexpected host code after the pipeline: `{l}`"
            )));
        }
        if let Some(rest) = l.strip_prefix("gpu.launch_func") {
            launches.push(
                read_launch(
                    rest.trim(),
                    name,
                    launches.len(),
                    &consts,
                    &buffers,
                    &binaries,
                )
                .map_err(&bad)?,
            );
            continue;
        }
        if let Some(rest) = l.strip_prefix("memref.copy ") {
            let operands = rest.split(" : ").next().unwrap_or("");
            let mut it = operands.split(", ");
            let (Some(a), Some(b)) = (it.next(), it.next()) else {
                return Err(bad(format!("cannot read `{l}`")));
            };
            let get = |s: &str| {
                buffers
                    .get(s)
                    .map(|a| a.name.clone())
                    .ok_or_else(|| bad(format!("`{l}`: unknown buffer {s}")))
            };
            copies.push((get(a)?, get(b)?));
            continue;
        }
        if l.starts_with("memref.dealloc ") {
            continue;
        }
        return Err(bad(format!(
            "unexpected host code after the pipeline: `{l}`"
        )));
    }
    Ok(GpuKernelGroup {
        name: name.to_string(),
        ops,
        launches,
        scratch,
        gemm: None,
        copies,
    })
}

/// The GEMM of a group that is exactly one `matmul` whose result is a group output.
fn gemm_spec(
    func: &Function,
    g: &crate::partition::KernelGroup,
    names: &HashMap<Value, String>,
) -> Option<GemmSpec> {
    let [node] = g.nodes[..] else { return None };
    let data = func.node(node);
    let cleave_ir::Op::MatMul {
        transpose_lhs,
        transpose_rhs,
    } = data.op
    else {
        return None;
    };
    let out = data.results[0];
    if !g.outputs.contains(&out) {
        return None;
    }
    let shape = &func.ty(out).shape;
    let r = shape.len();
    let lhs_shape = &func.ty(data.operands[0]).shape;
    Some(GemmSpec {
        lhs: names[&data.operands[0]].clone(),
        rhs: names[&data.operands[1]].clone(),
        out: names[&out].clone(),
        dtype: func.ty(out).dtype.name().to_string(),
        batch: shape[..r - 2].iter().product(),
        m: shape[r - 2],
        n: shape[r - 1],
        k: if transpose_lhs {
            lhs_shape[r - 2]
        } else {
            lhs_shape[r - 1]
        },
        transpose_lhs,
        transpose_rhs,
    })
}

/// `memref<N x T>` → (N, cleave dtype name).
fn parse_memref(ty: &str) -> Option<(usize, String)> {
    let inner = ty.trim().strip_prefix("memref<")?.strip_suffix('>')?;
    let (n, t) = inner.split_once('x')?;
    let dtype = match t {
        "i1" => "bool",
        other => other,
    };
    Some((n.parse().ok()?, dtype.to_string()))
}

fn read_launch(
    rest: &str,
    group: &str,
    index: usize,
    consts: &HashMap<String, u32>,
    buffers: &HashMap<String, KernelArg>,
    binaries: &HashMap<String, String>,
) -> Result<GpuKernel, String> {
    // `@M::@F blocks in (a, b, c) threads in (d, e, f)  args(%x : memref<…>, …)`
    let sym = rest.split_whitespace().next().unwrap_or("");
    let (module, entry) = sym
        .split_once("::")
        .ok_or_else(|| format!("cannot read launch `{rest}`"))?;
    let (module, entry) = (
        module.trim_start_matches('@'),
        entry.trim_start_matches('@'),
    );
    let triple = |key: &str| -> Result<[u32; 3], String> {
        let at = rest
            .find(key)
            .ok_or_else(|| format!("launch `{rest}` has no `{key}`"))?;
        let s = &rest[at + key.len()..];
        let end = s.find(')').ok_or_else(|| format!("cannot read `{rest}`"))?;
        let vals: Result<Vec<u32>, String> = s[..end]
            .split(", ")
            .map(|v| {
                consts
                    .get(v.trim())
                    .copied()
                    .ok_or_else(|| format!("launch size {v} is not a constant"))
            })
            .collect();
        let vals = vals?;
        <[u32; 3]>::try_from(vals).map_err(|_| format!("cannot read `{rest}`"))
    };
    let grid = triple("blocks in (")?;
    let block = triple("threads in (")?;
    let mut args = Vec::new();
    if let Some(at) = rest.find("args(") {
        let s = &rest[at + 5..];
        let s = &s[..s.rfind(')').unwrap_or(s.len())];
        for a in s.split(", ") {
            let (v, ty) = a.split_once(" : ").unwrap_or((a, ""));
            let buf = buffers.get(v.trim()).ok_or_else(|| {
                format!("kernel parameter {v} : {ty} is not a buffer (only buffers can be passed)")
            })?;
            args.push(buf.clone());
        }
    }
    let ptx = binaries
        .get(module)
        .ok_or_else(|| format!("no gpu.binary @{module} for launch of @{entry}"))?
        .clone();
    Ok(GpuKernel {
        name: format!("{group}_{index}"),
        entry: entry.to_string(),
        ptx,
        block,
        grid,
        args,
    })
}

/// Undoes MLIR's string escapes (`\0A`, `\22`, `\\`, …) up to the closing quote.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => break,
            b'\\' if i + 1 < bytes.len() => {
                let c = bytes[i + 1];
                if c == b'\\' || c == b'"' {
                    out.push(c);
                    i += 2;
                } else if c == b'n' {
                    out.push(b'\n');
                    i += 2;
                } else if c == b't' {
                    out.push(b'\t');
                    i += 2;
                } else if i + 2 < bytes.len() {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                    match u8::from_str_radix(hex, 16) {
                        Ok(b) => out.push(b),
                        Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                    }
                    i += 3;
                } else {
                    i += 1;
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn unescape_mlir_strings() {
        assert_eq!(super::unescape("a\\0Ab\\22c\\\\d\" rest"), "a\nb\"c\\d");
    }
}
