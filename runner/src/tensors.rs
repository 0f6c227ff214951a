//! Reading and writing named tensors as safetensors files.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use cleave_ir::interp::Tensor;
use cleave_ir::DType;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn to_st(dtype: DType) -> Dtype {
    match dtype {
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I8 => Dtype::I8,
        DType::I32 => Dtype::I32,
        DType::I64 => Dtype::I64,
        DType::Bool => Dtype::BOOL,
    }
}

fn from_st(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I8 => DType::I8,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        Dtype::BOOL => DType::Bool,
        _ => return None,
    })
}

/// Reads every tensor of a safetensors file.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let Some(dtype) = from_st(view.dtype()) else {
            bail!(
                "{}: tensor \"{name}\" has element type {:?}, which cleave does not support",
                path.display(),
                view.dtype()
            );
        };
        let tensor = Tensor::from_le_bytes(dtype, view.shape(), view.data())
            .map_err(|e| anyhow::anyhow!("{}: tensor \"{name}\": {e}", path.display()))?;
        out.insert(name, tensor);
    }
    Ok(out)
}

/// Writes tensors to a safetensors file atomically (a temporary file, then a rename), so that an
/// interrupted write never leaves a truncated file behind.
pub fn write_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let buffers: Vec<(String, DType, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dtype, t.shape.clone(), t.to_le_bytes()))
        .collect();
    let views = buffers
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(to_st(*d), s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| anyhow::anyhow!("tensor \"{n}\": {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| anyhow::anyhow!("cannot serialize tensors: {e}"))?;
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
