//! The descriptor of one GPU kernel: what the MLIR lowering hands the CUDA runtime.
//!
//! A kernel is PTX text with one `.entry` symbol, launched on `grid` × `block` threads with exactly
//! one device pointer per buffer argument, in the order of `args` (the bare-pointer memref
//! convention), and nothing else. Plain data with a JSON form, so it needs no CUDA to build.

use serde::{Deserialize, Serialize};

/// One GPU kernel, ready to load and launch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuKernel {
    /// A readable name (the fused group or step it implements).
    pub name: String,
    /// The PTX `.entry` symbol to launch.
    pub entry: String,
    /// The PTX module text.
    pub ptx: String,
    /// Threads per block (x, y, z).
    pub block: [u32; 3],
    /// Blocks per grid (x, y, z).
    pub grid: [u32; 3],
    /// One entry per pointer argument, in launch order: buffer name, element type name
    /// (`f32`, `i32`, `bool`, as [`cleave_ir::DType::name`] prints it) and shape.
    pub args: Vec<(String, String, Vec<usize>)>,
}

impl GpuKernel {
    /// The descriptor as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a GpuKernel always serialises")
    }

    /// Reads a descriptor from JSON; the error names the problem.
    pub fn from_json(text: &str) -> Result<GpuKernel, String> {
        serde_json::from_str(text).map_err(|e| format!("GPU kernel descriptor: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let k = GpuKernel {
            name: "add".into(),
            entry: "add_kernel".into(),
            ptx: ".version 8.0".into(),
            block: [256, 1, 1],
            grid: [4, 1, 1],
            args: vec![("x".into(), "f32".into(), vec![1024])],
        };
        assert_eq!(GpuKernel::from_json(&k.to_json()).unwrap(), k);
        assert!(GpuKernel::from_json("{}")
            .unwrap_err()
            .contains("missing field"));
    }
}
