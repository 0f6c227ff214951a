//! The `Pass` trait, pass options, and the errors passes report.

use std::collections::BTreeMap;
use std::fmt;

use cleave_ir::Module;

/// Options given to a pass in a pipeline: `name{key=value,flag}` (a bare key means `true`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassOptions {
    /// The pass the options belong to (for error messages).
    pub pass: String,
    /// Key → value text, in key order.
    pub values: BTreeMap<String, String>,
}

impl PassOptions {
    /// Takes an option's raw text.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.values.remove(key)
    }

    /// Takes an option parsed as `T`, or the default when absent.
    pub fn take_parsed<T: std::str::FromStr>(
        &mut self,
        key: &str,
        default: T,
    ) -> Result<T, PassError>
    where
        T::Err: fmt::Display,
    {
        match self.values.remove(key) {
            None => Ok(default),
            Some(text) => text.parse().map_err(|e: T::Err| PassError::BadOption {
                pass: self.pass.clone(),
                key: key.to_string(),
                message: format!("`{text}`: {e}"),
            }),
        }
    }

    /// Fails if any option was not taken by the pass.
    pub fn finish(self) -> Result<(), PassError> {
        match self.values.into_keys().next() {
            None => Ok(()),
            Some(key) => Err(PassError::BadOption {
                pass: self.pass,
                key,
                message: "the pass has no such option".into(),
            }),
        }
    }
}

/// What can go wrong while building or running a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// A pipeline names a pass that does not exist.
    #[error("unknown pass `{name}`; valid passes: {valid}")]
    UnknownPass {
        /// The unknown name.
        name: String,
        /// The registered names, comma separated.
        valid: String,
    },
    /// A pipeline string does not parse.
    #[error("bad pass pipeline at character {position}: {message}")]
    BadPipeline {
        /// 0-based character offset.
        position: usize,
        /// What is wrong.
        message: String,
    },
    /// A pass option is unknown or malformed.
    #[error("pass `{pass}`, option `{key}`: {message}")]
    BadOption {
        /// The pass.
        pass: String,
        /// The option key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A pass cannot handle its input.
    #[error("pass `{pass}`: {message}")]
    Failed {
        /// The pass.
        pass: &'static str,
        /// What is wrong, naming the function and node.
        message: String,
    },
    /// The module does not verify after a pass (under `--verify-each`).
    #[error("the module does not verify after pass `{pass}`:\n  {}", errors.join("\n  "))]
    VerifyFailed {
        /// The pass after which verification failed.
        pass: String,
        /// The verifier's messages.
        errors: Vec<String>,
    },
}

/// Messages a pass wants the user to see, collected by the pass manager: warnings, and notes
/// (what the pass did, e.g. e-graph stop reasons) that IR dumps print after the pass's banner.
#[derive(Debug, Default)]
pub struct PassContext {
    /// Warnings, in order, each prefixed by the pass name.
    pub warnings: Vec<String>,
    /// Notes of the pass that ran last, each prefixed by the pass name (cleared before each pass).
    pub notes: Vec<String>,
    /// The result of the last `plan` pass (the schedule, per-stage plans, costs, memory and
    /// simulation), for the commands and libraries that run it.
    pub planned: Option<Box<crate::plan::Planned>>,
}

impl PassContext {
    /// Records a note about what the running pass did.
    pub fn note(&mut self, pass: &str, message: impl Into<String>) {
        self.notes.push(format!("{pass}: {}", message.into()));
    }

    /// Records a warning.
    pub fn warn(&mut self, pass: &str, message: impl Into<String>) {
        self.warnings.push(format!("{pass}: {}", message.into()));
    }
}

/// A module-to-module transformation.
///
/// Each pass states in its docs what must hold on entry and what holds on exit. On exit the
/// module must verify (`cleave_ir::verify_module`); the pass manager checks it under
/// `--verify-each`, and the tests always do.
pub trait Pass {
    /// The kebab-case name used in pipelines, on the command line and in test file names.
    fn name(&self) -> &'static str;

    /// Runs the pass.
    fn run(&self, module: &mut Module, ctx: &mut PassContext) -> Result<(), PassError>;
}
