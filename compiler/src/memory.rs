//! `cleave inspect --memory` and the joint choice of schedule and plan: the planner lives in
//! cleave-passes ([`cleave_passes::plan`], the `plan{…}` pass); this module re-exports it under
//! the name the commands, benches and tests have used.

pub use cleave_passes::plan::*;
