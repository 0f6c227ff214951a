//! Adding a training loss to a model that was exported without one (`--loss`, `--labels`).
//!
//! The loss reads the function's first output (the predictions) and a labels input, and is
//! returned as a new scalar output `loss`, so `autodiff` finds it:
//!
//! - `cross-entropy`: predictions are logits `[B…, C]`; labels are class indices `i32[B…]`
//!   (cleave's index type, which every backend supports; PyTorch's int64 labels convert
//!   losslessly for any realistic class count); `loss = mean(cross_entropy(logits, labels))`.
//! - `mse`: labels have the predictions' type; `loss = mean((pred - labels)²)` over every
//!   element (PyTorch's `MSELoss()`).
//!
//! If the function already has a data input named like the labels, it is used (its type must
//! fit); otherwise a new input is added.

use cleave_ir::tracer::Tracer;
use cleave_ir::{DType, Function, TensorType};

/// The losses `--loss` adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LossKind {
    /// Mean softmax cross-entropy of logits against class indices.
    CrossEntropy,
    /// Mean squared error against targets of the output's shape.
    Mse,
}

/// Adds a `loss` output to `func` (see the module docs).
pub fn add_loss(func: Function, kind: LossKind, labels: &str) -> Result<Function, String> {
    if func.output("loss").is_some() {
        return Err(format!(
            "@{} already has a `loss` output; drop --loss",
            func.name
        ));
    }
    let pred = func
        .outputs
        .first()
        .ok_or_else(|| format!("@{} has no output to put a loss on", func.name))?;
    let (pred_name, pred) = (pred.name.clone(), pred.value);
    let pty = func.ty(pred).clone();
    if !pty.dtype.is_float() {
        return Err(format!("output `{pred_name}` is {pty}, not a float tensor"));
    }
    let want = match kind {
        LossKind::CrossEntropy => {
            if pty.rank() == 0 {
                return Err(format!(
                    "cross-entropy needs logits [batch…, classes]; output `{pred_name}` is {pty}"
                ));
            }
            TensorType::new(DType::I32, pty.shape[..pty.rank() - 1].to_vec())
        }
        LossKind::Mse => pty.clone(),
    };
    let existing = func
        .data_inputs()
        .find(|a| a.name == labels)
        .map(|a| a.value);
    let mut t = Tracer::from_function(func);
    let labels_v = match existing {
        Some(v) => {
            let ty = t.ty(v).clone();
            let ok = match kind {
                LossKind::CrossEntropy => ty.dtype.is_int() && ty.shape == want.shape,
                LossKind::Mse => ty == want,
            };
            if !ok {
                return Err(format!(
                    "labels input `{labels}` is {ty}; the {kind:?} loss on `{pred_name}` \
                     ({pty}) needs {want}"
                ));
            }
            v
        }
        None => t
            .input(labels, want.dtype, want.shape.clone())
            .map_err(|e| e.to_string())?,
    };
    let per_elem = match kind {
        LossKind::CrossEntropy => t.cross_entropy(pred, labels_v),
        LossKind::Mse => t.sub(pred, labels_v).and_then(|d| t.mul(d, d)),
    }
    .map_err(|e| e.to_string())?;
    let loss = t.mean_all(per_elem).map_err(|e| e.to_string())?;
    t.output("loss", loss).map_err(|e| e.to_string())?;
    let mut func = t.finish();
    // Put `loss` first, as the model builders do.
    let last = func.outputs.pop().expect("just added");
    func.outputs.insert(0, last);
    Ok(func)
}
