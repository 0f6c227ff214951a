//! What a pipeline device holds, as the plan accounts for it: the `--memory-limit` of
//! `cleave train` is a limit on this whole figure, not on saved activations alone.
//!
//! # The accounting of one device
//!
//! The sum over the stages placed on the device of
//!
//! - **parameters**: the stage's copy of every parameter its F, B or W reads;
//! - **gradients**: its `grad.*` accumulators (f32, one per parameter it owns the gradient of);
//! - **updated parameters**: the optimizer's new values, made after the stage's last W;
//! - **optimizer state**: per parameter whose gradient the stage owns, momentum's velocity or
//!   AdamW's two moments (plain SGD has none). Charged here as a device holding its stages'
//!   state would; the training loop keeps it in its own memory for now, so the allocator's
//!   per-device measurement below does not see it (the plan is the larger of the two);
//! - **workspace**: the buffers of the stage's compiled F, B and W plans (each plan owns its
//!   buffers for the whole run, so the three add up), measured on the compiled plans;
//! - **kernel scratch**: what the kernels allocate while they run (the `gemm` crate's packing
//!   buffers, whose size depends on its cache blocking), measured by running each plan once
//!   under its own allocator tag ([`kernel_scratch`]);
//! - **values crossing devices**: every value the stage receives from another stage (`act.*`,
//!   `dgrad.*`) and every copy it sends, for all M microbatches — a bound, since the executor
//!   keeps a received value until the microbatch's W and a sender may run ahead of its consumer;
//! - **saved values**: the remat pass's `need` of the stage's plan (kept `stash.*` values times
//!   their microbatches in flight at every moment of the schedule, B→W values, and three device
//!   copies of one microbatch's offloaded values for offload and reload staging; see
//!   `cleave_passes::remat`).
//!
//! The first five are the device's **reserved** bytes; the remat pass shares what the limit
//! leaves among the device's stages ([`cleave_passes::remat::plan_stages_reserved`]).
//! Recomputation adds values to B and W, so the workspace after the rewrite can be larger than
//! before: `cleave train` plans with the reserved bytes of the unrewritten plans, compiles,
//! measures, and plans again with the excess added until the total fits (a few rounds).
//!
//! The runtime measures the same thing with the instrumented allocator
//! ([`cleave_runtime::alloc`]): every tensor buffer a device's thread allocates, or receives, is
//! charged to the device (`cleave train --memory-report`).

use std::collections::BTreeSet;

use anyhow::Result;
use cleave_ir::Function;
use cleave_passes::split::SplitStage;
use cleave_runtime::alloc::{self, TagBlock, TagGuard};
use cleave_runtime::{compile_with, CompileOptions, Plan};

/// The reserved bytes of one stage (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageResident {
    /// Parameter copies.
    pub params: u64,
    /// Gradient accumulators.
    pub grads: u64,
    /// Updated parameters (the optimizer's output).
    pub updated: u64,
    /// The optimizer's state for the parameters the stage owns the gradients of.
    pub optimizer: u64,
    /// Buffers of the compiled F, B and W plans.
    pub workspace: u64,
    /// What the kernels allocate while they run (GEMM packing buffers), measured.
    pub scratch: u64,
    /// Values received from and sent to other stages, for every microbatch.
    pub boundary: u64,
}

impl StageResident {
    /// The sum.
    pub fn total(&self) -> u64 {
        self.params
            + self.grads
            + self.updated
            + self.optimizer
            + self.workspace
            + self.scratch
            + self.boundary
    }
}

/// A device's accounting: reserved bytes (by kind) and the saved values' need.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceAccount {
    /// Summed over the device's stages.
    pub resident: StageResident,
    /// The remat pass's `need` of the device's stages.
    pub saved: u64,
}

impl DeviceAccount {
    /// Everything the device holds at most.
    pub fn total(&self) -> u64 {
        self.resident.total() + self.saved
    }
}

fn bytes(f: &Function, v: cleave_ir::Value) -> u64 {
    f.ty(v).size_bytes() as u64
}

/// Buffer bytes of a stage's compiled plans (`F + B + W`).
pub fn plans_workspace(plans: &[&Plan]) -> u64 {
    plans.iter().map(|p| p.buffer_bytes() as u64).sum()
}

/// The most bytes the kernels of `plans` allocate while they run (one run each, in a fresh
/// thread, so no thread-local cache of an earlier run hides them), measured with the
/// instrumented allocator; 0 when it is not installed.
pub fn kernel_scratch(plans: &mut [&mut Plan]) -> u64 {
    let Some(block) = TagBlock::reserve(1) else {
        return 0;
    };
    let tag = block.tag(0);
    std::thread::scope(|s| {
        let _ = s
            .spawn(|| {
                let _g = TagGuard::new(tag);
                for p in plans.iter_mut() {
                    // The inputs are whatever the buffers hold; only the allocations matter.
                    let _ = p.run();
                }
            })
            .join();
    });
    alloc::peak(tag)
}

/// Compiles every stage's F, B and W (without the JIT: the buffers are the same) and returns
/// their workspace bytes and their kernels' scratch.
pub fn workspace_of(split: &[SplitStage<'_>]) -> Result<Vec<(u64, u64)>> {
    let opts = CompileOptions {
        fuse: true,
        preserve_args: false,
        jit: false,
        ..CompileOptions::default()
    };
    let mut out = Vec::new();
    for s in split {
        let mut f = compile_with(s.f, &opts)?;
        let mut b = compile_with(s.b, &opts)?;
        let mut w = compile_with(s.w, &opts)?;
        let ws = plans_workspace(&[&f, &b, &w]);
        out.push((ws, kernel_scratch(&mut [&mut f, &mut b, &mut w])));
    }
    Ok(out)
}

/// The reserved bytes of every stage of a split module; `workspace[s]` (buffers, kernel scratch)
/// from [`workspace_of`], `forward` the unsplit model (its parameters and data inputs), `m`
/// microbatches per step, `state_copies` the optimizer's state per parameter
/// ([`crate::train::OptimizerArg::state_copies`]).
pub fn stage_resident(
    split: &[SplitStage<'_>],
    workspace: &[(u64, u64)],
    forward: &Function,
    m: usize,
    state_copies: u64,
) -> Vec<StageResident> {
    let params: BTreeSet<&str> = forward.params().map(|a| a.name).collect();
    let data: BTreeSet<&str> = forward.data_inputs().map(|a| a.name).collect();
    // The names each stage's functions take.
    let takes: Vec<BTreeSet<&str>> = split
        .iter()
        .map(|s| {
            [s.f, s.b, s.w]
                .iter()
                .flat_map(|f| f.args().map(|a| a.name))
                .collect()
        })
        .collect();
    let mut out = Vec::new();
    for (i, s) in split.iter().enumerate() {
        let mut r = StageResident {
            workspace: workspace.get(i).map_or(0, |w| w.0),
            scratch: workspace.get(i).map_or(0, |w| w.1),
            ..StageResident::default()
        };
        let own_outputs: BTreeSet<&str> = [s.f, s.b, s.w]
            .iter()
            .flat_map(|f| f.outputs.iter().map(|o| o.name.as_str()))
            .collect();
        let mut seen = BTreeSet::new();
        for f in [s.f, s.b, s.w] {
            for a in f.args() {
                if !seen.insert(a.name) {
                    continue;
                }
                let b = bytes(f, a.value);
                if params.contains(a.name) {
                    r.params += b;
                } else if std::ptr::eq(f, s.w) && a.name.starts_with("grad.") {
                    // An accumulator (the executor's rule), and the parameter's new value.
                    r.grads += b;
                    if params.contains(&a.name["grad.".len()..]) {
                        r.updated += b;
                        r.optimizer += state_copies * b;
                    }
                } else if data.contains(a.name)
                    || a.name.starts_with("stash.")
                    || own_outputs.contains(a.name)
                {
                    // Data columns are the host's; saved values and B→W values are in `need`.
                } else {
                    r.boundary += m as u64 * b;
                }
            }
        }
        // Copies sent to other stages (one per consumer stage).
        for f in [s.f, s.b, s.w] {
            for o in &f.outputs {
                if o.name.starts_with("stash.") || o.name == "loss" {
                    continue;
                }
                let consumers = takes
                    .iter()
                    .enumerate()
                    .filter(|&(t, names)| t != i && names.contains(o.name.as_str()))
                    .count() as u64;
                r.boundary += m as u64 * consumers * bytes(f, o.value);
            }
        }
        out.push(r);
    }
    out
}

/// Sums stages' reserved bytes and needs per device.
pub fn per_device(
    resident: &[StageResident],
    saved: &[u64],
    placement: &[usize],
    n_devices: usize,
) -> Vec<DeviceAccount> {
    let mut out = vec![DeviceAccount::default(); n_devices];
    for (s, &d) in placement.iter().enumerate() {
        let r = resident.get(s).copied().unwrap_or_default();
        let a = &mut out[d].resident;
        a.params += r.params;
        a.grads += r.grads;
        a.updated += r.updated;
        a.optimizer += r.optimizer;
        a.workspace += r.workspace;
        a.scratch += r.scratch;
        a.boundary += r.boundary;
        out[d].saved += saved.get(s).copied().unwrap_or(0);
    }
    out
}
