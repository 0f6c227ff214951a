//! Loading model files into verified modules, with errors that name the file and the place.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use cleave_ir::interp::Tensor;
use cleave_ir::parser::{located_error, parse_module_with_source_map};
use cleave_ir::Module;

use crate::loss::{add_loss, LossKind};
use crate::onnx::{import_file, ImportOptions};

/// The model formats `cleave` reads, chosen by file extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    /// cleave's own IR text (`.cir`).
    Cir,
    /// An ONNX model (`.onnx`), imported by [`crate::onnx`].
    Onnx,
}

/// How a model file is turned into a module.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// The extent of symbolic batch dimensions (`.onnx` only).
    pub batch: Option<usize>,
    /// A loss to add to the first function (see [`crate::loss`]).
    pub loss: Option<LossKind>,
    /// The labels input of that loss.
    pub labels: Option<String>,
    /// The scalar output that is the loss (`--loss-output`): renamed `loss`. Without it, an
    /// `.onnx` model with no `loss` output and exactly one scalar float output (a module
    /// exported with its loss inside: `cross_entropy_loss`, `output`, `val_12`, …) has that
    /// output taken as the loss.
    pub loss_output: Option<String>,
}

/// Model text embedded in a standalone training executable (see [`crate::aot`]): a `.cir` path
/// equal to the registered one is read from this text instead of the file system.
static EMBEDDED: std::sync::OnceLock<EmbeddedModel> = std::sync::OnceLock::new();

/// A model that travels inside an executable: its name, `.cir` text and stored parameters.
type EmbeddedModel = (std::path::PathBuf, String, BTreeMap<String, Tensor>);

/// Registers the `.cir` text (and the parameters stored with the model, like an `.onnx` file's
/// initializers) that loading `path` returns (once per process; later calls are ignored). Used
/// by the executables of `cleave compile`, whose model travels inside them, and by `cleave
/// compile`, which builds their plans from the same text.
pub fn register_embedded_model(path: &Path, text: String, params: BTreeMap<String, Tensor>) {
    let _ = EMBEDDED.set((path.to_path_buf(), text, params));
}

/// Picks the format from a path's extension.
pub fn format_of(path: &Path) -> Result<ModelFormat> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("cir") => Ok(ModelFormat::Cir),
        Some("onnx") => Ok(ModelFormat::Onnx),
        Some(other) => bail!(
            "{}: unsupported model format `.{other}`; cleave reads `.cir` and `.onnx` files",
            path.display()
        ),
        None => bail!(
            "{}: no file extension; cleave reads `.cir` and `.onnx` files",
            path.display()
        ),
    }
}

/// A loaded model.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    /// The verified module.
    pub module: Module,
    /// Import warnings (export pitfalls of `.onnx` files).
    pub warnings: Vec<String>,
    /// Parameter values stored in the file (the initializers of an `.onnx` model; none for `.cir`).
    pub params: BTreeMap<String, Tensor>,
    /// The rest of a PyTorch `state_dict()` (an `.onnx` model's persistent buffers and tied
    /// aliases; empty for `.cir`).
    pub state: crate::onnx::StateDictExtras,
}

impl LoadedModel {
    /// Refuses a model that cannot be trained as exported (see
    /// [`crate::onnx::StateDictExtras::lost`]): the error names the parameters and the fix.
    pub fn check_trainable(&self, path: &Path) -> Result<()> {
        let lost = &self.state.lost;
        if lost.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = lost.iter().take(6).map(String::as_str).collect();
        bail!(
            "{}: this export does not hold {} of the model's parameters one by one under their \
             names ({}{}): torch.onnx.export's default `optimize=True` (and the TorchScript \
             exporter's default constant folding) merges equal tensors into one that several \
             layers share and folds parameters into constants, so training it would train the \
             wrong tensors; re-export with `torch.onnx.export(..., dynamo=True, \
             optimize=False)` (or `dynamo=False, do_constant_folding=False`)",
            path.display(),
            lost.len(),
            shown.join(", "),
            if lost.len() > shown.len() {
                ", …"
            } else {
                ""
            }
        )
    }
}

/// A loaded module's forward function (its first function).
pub fn forward_of(module: &Module) -> Result<cleave_ir::Function> {
    module
        .functions
        .first()
        .cloned()
        .context("the module has no functions")
}

/// Reads, parses and verifies a module, printing import warnings to stderr. Parse errors are
/// rendered with `path:line:col`, a caret and what was expected; verifier errors list every
/// broken invariant.
pub fn load_module(path: &Path, opts: &LoadOptions) -> Result<Module> {
    Ok(load_model(path, opts)?.module)
}

/// [`load_module`], also returning the parameter values the file holds; prints the warnings.
pub fn load_model(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let loaded = load_model_quiet(path, opts)?;
    for w in &loaded.warnings {
        match w.strip_prefix("note: ") {
            Some(note) => eprintln!("note: {}: {note}", path.display()),
            None => eprintln!("warning: {}: {w}", path.display()),
        }
    }
    Ok(loaded)
}

/// [`load_model`] without printing the warnings.
pub fn load_model_quiet(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let mut state = crate::onnx::StateDictExtras::default();
    let format = format_of(path)?;
    let (mut module, warnings, params) = match format {
        ModelFormat::Cir => {
            if opts.batch.is_some() {
                bail!("--batch applies to `.onnx` models; `.cir` shapes are static");
            }
            let (text, params) = match EMBEDDED.get() {
                Some((p, text, params)) if p == path => (text.clone(), params.clone()),
                _ => (
                    std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                    BTreeMap::new(),
                ),
            };
            (
                parse_and_verify(&text, &path.display().to_string())?,
                vec![],
                params,
            )
        }
        ModelFormat::Onnx => {
            let imported = import_file(path, &ImportOptions { batch: opts.batch })
                .with_context(|| format!("importing {}", path.display()))?;
            state = imported.state;
            (imported.module, imported.warnings, imported.params)
        }
    };
    match (opts.loss, &opts.labels) {
        (Some(kind), Some(labels)) => {
            let func = module
                .functions
                .first_mut()
                .context("the module has no functions")?;
            let f = std::mem::replace(func, cleave_ir::Function::new(""));
            *func = add_loss(f, kind, labels)
                .map_err(|e| anyhow::anyhow!("{}: --loss: {e}", path.display()))?;
        }
        (Some(_), None) => bail!("--loss needs --labels NAME (the labels input)"),
        (None, Some(_)) => bail!("--labels is only used with --loss"),
        (None, None) => {}
    }
    let mut warnings = warnings;
    if let Some(func) = module.functions.first_mut() {
        pick_loss_output(func, opts, format == ModelFormat::Onnx, &mut warnings)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    verify(&module, &path.display().to_string())?;
    Ok(LoadedModel {
        module,
        warnings,
        params,
        state,
    })
}

/// The scalar float outputs of `func`, by name.
fn scalar_outputs(func: &cleave_ir::Function) -> Vec<String> {
    func.outputs
        .iter()
        .filter(|o| {
            let t = func.ty(o.value);
            t.shape.is_empty() && t.dtype.is_float()
        })
        .map(|o| o.name.clone())
        .collect()
}

/// Names the loss output (see [`LoadOptions::loss_output`]).
fn pick_loss_output(
    func: &mut cleave_ir::Function,
    opts: &LoadOptions,
    onnx: bool,
    warnings: &mut Vec<String>,
) -> std::result::Result<(), String> {
    let list = |names: &[String]| {
        names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let outputs: Vec<String> = func.outputs.iter().map(|o| o.name.clone()).collect();
    if let Some(name) = &opts.loss_output {
        if opts.loss.is_some() {
            return Err(
                "--loss-output names a loss the model has; --loss adds one: give one of them"
                    .into(),
            );
        }
        let scalars = scalar_outputs(func);
        if !outputs.contains(name) {
            return Err(format!(
                "--loss-output {name}: @{} has no such output; its outputs are {}",
                func.name,
                list(&outputs)
            ));
        }
        if !scalars.contains(name) {
            return Err(format!(
                "--loss-output {name}: the loss must be a scalar float, and `{name}` is {}; \
                 scalar float outputs: {}",
                func.ty(func.output(name).expect("listed")),
                if scalars.is_empty() {
                    "none".to_string()
                } else {
                    list(&scalars)
                }
            ));
        }
        if name != "loss" && outputs.iter().any(|o| o == "loss") {
            return Err(format!(
                "--loss-output {name}: @{} already has an output named `loss`",
                func.name
            ));
        }
        if func.args().any(|a| a.name == "loss") {
            return Err(format!(
                "--loss-output {name}: @{} has an input named `loss`",
                func.name
            ));
        }
        rename_output(func, name);
        return Ok(());
    }
    if !onnx || opts.loss.is_some() || func.output("loss").is_some() {
        return Ok(());
    }
    match &scalar_outputs(func)[..] {
        [] => {}
        [one] if func.args().all(|a| a.name != "loss") => {
            warnings.push(format!(
                "@{}: the scalar output `{one}` is taken as the loss (renamed `loss`; \
                 --loss-output NAME picks another)",
                func.name
            ));
            let one = one.clone();
            rename_output(func, &one);
        }
        several => warnings.push(format!(
            "@{}: no output is named `loss` and several are scalars ({}): training and `cleave \
             grad` need one loss; pick it with --loss-output NAME",
            func.name,
            list(several)
        )),
    }
    Ok(())
}

fn rename_output(func: &mut cleave_ir::Function, name: &str) {
    for o in &mut func.outputs {
        if o.name == name {
            o.name = "loss".to_string();
        }
    }
}

fn verify(module: &Module, origin: &str) -> Result<()> {
    if let Err(errors) = cleave_ir::verify_module(module) {
        let msgs: Vec<String> = errors
            .iter()
            .map(|e| format!("{origin}: error: {e}"))
            .collect();
        bail!(msgs.join("\n"));
    }
    Ok(())
}

/// Parses and verifies IR text; `origin` names the text in errors (a path, or `<stdin>`).
pub fn parse_and_verify(text: &str, origin: &str) -> Result<Module> {
    let (module, map) =
        parse_module_with_source_map(text).map_err(|e| anyhow::anyhow!("{}", e.render(origin)))?;
    if let Err(errors) = cleave_ir::verify_module(&module) {
        let mut msg = String::new();
        for e in &errors {
            let index = module.functions.iter().position(|f| f.name == e.function);
            let span = index.and_then(|i| match e.node {
                Some(node) => map.span(i, node),
                None => map.names.get(i).copied(),
            });
            let message = e.to_string();
            match span {
                Some(span) => msg.push_str(&located_error(text, span, message).render(origin)),
                None => msg.push_str(&format!("{origin}: error: {message}")),
            }
            msg.push('\n');
        }
        bail!(msg.trim_end().to_string());
    }
    Ok(module)
}
