//! Loading model files into verified modules, with errors that name the file and the place.

use std::path::Path;

use anyhow::{bail, Context, Result};
use cleave_ir::parser::{located_error, parse_module_with_source_map};
use cleave_ir::Module;

/// The model formats `cleave` reads, chosen by file extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    /// cleave's own IR text (`.cir`).
    Cir,
}

/// Picks the format from a path's extension.
pub fn format_of(path: &Path) -> Result<ModelFormat> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("cir") => Ok(ModelFormat::Cir),
        Some(other) => bail!(
            "{}: unsupported model format `.{other}`; cleave reads `.cir` files",
            path.display()
        ),
        None => bail!(
            "{}: no file extension; cleave reads `.cir` files",
            path.display()
        ),
    }
}

/// Reads, parses and verifies a module. Parse errors are rendered with `path:line:col`, a caret
/// and what was expected; verifier errors list every broken invariant.
pub fn load_module(path: &Path) -> Result<Module> {
    match format_of(path)? {
        ModelFormat::Cir => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            parse_and_verify(&text, &path.display().to_string())
        }
    }
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
