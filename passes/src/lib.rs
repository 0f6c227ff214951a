//! cleave-passes: the pass infrastructure and the passes.
//!
//! - [`pass`]: the [`Pass`] trait, options and errors.
//! - [`pipeline`]: textual pipelines `a,b{key=value},c`.
//! - [`manager`]: the registry of every pass and the [`PassManager`] (verify-each, IR dumps).
//! - [`simple`]: `verify` and `dce`.
//! - [`partition`]: stage assignment under a device cost model.
//! - [`split`]: `split-bw`, the per-stage F/B/W cut with explicit stash sets.
//! - [`remat`]: recomputation and activation offload of the stash sets under a memory budget.
//! - [`schedule`]: pipeline schedules as data, generators, `auto`, the simulator, SVG timelines.
//! - [`autodiff`]: reverse-mode differentiation with dgrad/wgrad tags at birth.
//! - [`jvp`]: forward-mode differentiation.
//! - [`compress`]: stash compression per value as a planner choice (candidates, the search).
//! - [`chunk`]: the output layer and its cross-entropy in row chunks, exactly (StreamBP).
//! - [`optimizer`]: SGD, momentum and AdamW updates as IR.
//! - [`egraph`]: equality saturation with egg (the only module that uses egg).
//! - [`simplify`]: the `simplify` pass on top of [`egraph`].
#![warn(missing_docs)]

pub mod autodiff;
pub mod chunk;
pub mod compress;
pub mod egraph;
pub mod jvp;
pub mod manager;
pub mod optimizer;
pub mod partition;
pub mod pass;
pub mod pipeline;
pub mod plan;
pub mod precision;
pub mod remat;
pub mod schedule;
pub mod simple;
pub mod simplify;
pub mod split;

pub use manager::{registry, valid_pass_names, PassManager, PrintOptions};
pub use pass::{Pass, PassContext, PassError, PassOptions};
