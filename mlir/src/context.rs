//! An MLIR context with every dialect, pass and LLVM translation registered, and a runner that
//! parses MLIR text and applies a textual pass pipeline, collecting MLIR's diagnostics as errors.

use std::cell::RefCell;
use std::rc::Rc;

use melior::dialect::DialectRegistry;
use melior::ir::Module;
use melior::pass::PassManager;
use melior::utility::{
    parse_pass_pipeline, register_all_dialects, register_all_llvm_translations, register_all_passes,
};
use melior::Context;

/// An MLIR failure, with the diagnostics MLIR reported.
#[derive(Debug, thiserror::Error)]
pub enum MlirError {
    /// The MLIR text did not parse (an emitter bug, or a user edit).
    #[error("{what}: MLIR does not parse:\n{diagnostics}")]
    Parse {
        /// Which kernel or module.
        what: String,
        /// MLIR's messages.
        diagnostics: String,
        /// The text.
        mlir: String,
    },
    /// The pass pipeline text is not valid.
    #[error("invalid MLIR pass pipeline `{pipeline}`: {message}")]
    Pipeline {
        /// The pipeline.
        pipeline: String,
        /// MLIR's message.
        message: String,
    },
    /// A pass failed.
    #[error("{what}: the MLIR pipeline failed:\n{diagnostics}")]
    Pass {
        /// Which kernel or module.
        what: String,
        /// MLIR's messages.
        diagnostics: String,
        /// The MLIR the pipeline ran on (for a dump).
        mlir: String,
    },
    /// The lowered module is not what the backend can use.
    #[error("{what}: {message}")]
    Unexpected {
        /// Which kernel or module.
        what: String,
        /// What is wrong.
        message: String,
        /// The module after the pipeline.
        mlir: String,
    },
}

/// A context plus the diagnostics its handler collects.
pub(crate) struct Mlir {
    pub(crate) context: Context,
    diagnostics: Rc<RefCell<Vec<String>>>,
}

impl MlirError {
    /// The MLIR that failed (the input of a failed parse or pass, or the module after the
    /// pipeline when it is unusable), to dump next to the error.
    pub fn source(&self) -> Option<&str> {
        match self {
            MlirError::Parse { mlir, .. }
            | MlirError::Pass { mlir, .. }
            | MlirError::Unexpected { mlir, .. } => Some(mlir),
            _ => None,
        }
    }
}

impl Mlir {
    pub(crate) fn new() -> Self {
        let registry = DialectRegistry::new();
        register_all_dialects(&registry);
        let context = Context::new();
        context.append_dialect_registry(&registry);
        context.load_all_available_dialects();
        register_all_llvm_translations(&context);
        // The pass registry is global: register once, before contexts on several threads
        // (`crate::gpu::compile_gpu`) parse pipelines.
        static PASSES: std::sync::Once = std::sync::Once::new();
        PASSES.call_once(register_all_passes);
        let diagnostics = Rc::new(RefCell::new(Vec::new()));
        let sink = diagnostics.clone();
        context.attach_diagnostic_handler(move |d| {
            sink.borrow_mut().push(d.to_string());
            true
        });
        Mlir {
            context,
            diagnostics,
        }
    }

    fn take_diagnostics(&self) -> String {
        std::mem::take(&mut *self.diagnostics.borrow_mut()).join("\n")
    }

    /// Parses `text` and runs `pipeline` on it.
    pub(crate) fn lower(
        &self,
        what: &str,
        text: &str,
        pipeline: &str,
    ) -> Result<Module<'_>, MlirError> {
        self.take_diagnostics();
        let mut module = Module::parse(&self.context, text).ok_or_else(|| MlirError::Parse {
            what: what.to_string(),
            diagnostics: self.take_diagnostics(),
            mlir: text.to_string(),
        })?;
        let pm = PassManager::new(&self.context);
        pm.enable_verifier(true);
        parse_pass_pipeline(pm.as_operation_pass_manager(), pipeline).map_err(|e| {
            MlirError::Pipeline {
                pipeline: pipeline.to_string(),
                message: format!("{e} {}", self.take_diagnostics()),
            }
        })?;
        pm.run(&mut module).map_err(|_| MlirError::Pass {
            what: what.to_string(),
            diagnostics: self.take_diagnostics(),
            mlir: text.to_string(),
        })?;
        Ok(module)
    }
}
