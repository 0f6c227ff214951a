//! Pipeline schedules as data: per-device action lists, their validation, generators, the
//! simulator and timeline pictures.
//!
//! - [`action`]: [`Action`]s and their strings (`2F0`, `1B3`, `3SEND_F1`); the letter mapping to
//!   PyTorch's IR is documented there.
//! - [`Schedule`]: one action list per device plus the stage → device placement; CSV (one row per
//!   device, PyTorch's `_dump_csv` layout) and JSON import/export; [`Schedule::validate`].
//! - [`simulate`]: the reference semantics of `shared/reference/schedules.md` and the figures.
//! - [`generators`]: GPipe, 1F1B, interleaved 1F1B, ZB-H1, ZB-H2, ZB-V, and by name the
//!   schedules of [`papers`].
//! - [`papers`]: V-Min, V-Half, DualPipeV and Hanayo, built as action lists for the same
//!   validator and simulator.
//! - [`auto`]: a zero-bubble scheduler under a memory limit (greedy heuristic + exact ILP).
//! - [`svg`]: timeline and memory pictures.
//!
//! # Stages, chunks and devices
//!
//! Stages are global: with `v` chunks per device there are `p·v` stages, numbered along the
//! model, and `placement[s]` is the device of stage `s`. Dependencies always follow stage order,
//! whatever the placement (a V puts stages `p−1` and `p` on the same device).
//!
//! # Validation (what a valid schedule guarantees)
//!
//! 1. Every stage is placed on exactly one device and every action runs on its stage's device.
//! 2. Every compute action names an existing stage and a microbatch below `m`, at most once.
//! 3. Per stage and microbatch: one F, and either one BW or one B and one W.
//! 4. Per stage and microbatch, in list order: F before B or BW, B before W.
//! 5. No deadlock: the dependency simulation runs every list to its end (this also checks the
//!    cross-stage order).
//!
//! Errors name the offending action and where it is (`device 1, position 4: 1W3 before 1B3`).

pub mod action;
pub mod auto;
pub mod generators;
pub mod papers;
pub mod rounds;
pub mod search;
pub mod simulate;
pub mod svg;

pub use action::{Action, ActionKind, ActionParseError};
pub use simulate::{Costs, DeviceRun, Memory, Simulation, StageCost, StageMemory, Timed};

use std::fmt::Write;

/// Everything that can be wrong with a schedule.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    /// An action string does not parse.
    #[error("device {device}, position {position}: {source}")]
    Parse {
        /// Device (row).
        device: usize,
        /// Position in the row.
        position: usize,
        /// The parse error.
        source: ActionParseError,
    },
    /// An action is wrong where it stands.
    #[error("device {device}, position {position}: {action} {problem}")]
    Action {
        /// Device.
        device: usize,
        /// Position in the device's list.
        position: usize,
        /// The action, printed.
        action: String,
        /// What is wrong.
        problem: String,
    },
    /// A stage misses actions.
    #[error("stage {stage}: {problem}")]
    Stage {
        /// The stage.
        stage: usize,
        /// What is missing.
        problem: String,
    },
    /// The lists cannot all run to their end.
    #[error("deadlock: {waits}")]
    Deadlock {
        /// Where each stuck device waits, and for what.
        waits: String,
    },
    /// The schedule as a whole is malformed (empty, bad JSON, unknown generator …).
    #[error("{0}")]
    Malformed(String),
}

/// A pipeline schedule: one ordered action list per device.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// Action lists, one per device.
    pub devices: Vec<Vec<Action>>,
    /// `placement[s]` = the device of global stage `s`.
    pub placement: Vec<u32>,
    /// Number of microbatches m.
    pub microbatches: usize,
    /// The second direction of a bidirectional schedule (BitPipe, Chimera), where every stage
    /// has a replica; `None` for one direction.
    pub reverse: Option<Reverse>,
}

/// The second direction of a bidirectional schedule: stage `s` of a microbatch marked in
/// `microbatches` runs on `placement[s]` (the stage's replica, holding the same weights),
/// every other microbatch on the schedule's own placement. Dependencies still follow stage
/// order within each microbatch; the replicas' weight gradients are summed before the update.
#[derive(Clone, Debug, PartialEq)]
pub struct Reverse {
    /// `placement[s]` = the device of stage `s`'s replica.
    pub placement: Vec<u32>,
    /// `microbatches[j]`: whether microbatch `j` runs through the replicas.
    pub microbatches: Vec<bool>,
}

impl Schedule {
    /// Builds a schedule from its lists, inferring the placement from where each stage's actions
    /// are and m from the largest microbatch.
    pub fn from_lists(devices: Vec<Vec<Action>>) -> Result<Schedule, ScheduleError> {
        let n_stages = devices
            .iter()
            .flatten()
            .map(|a| a.stage as usize + 1)
            .max()
            .ok_or_else(|| ScheduleError::Malformed("the schedule has no actions".into()))?;
        let microbatches = devices
            .iter()
            .flatten()
            .filter(|a| a.kind.is_compute())
            .map(|a| a.microbatch as usize + 1)
            .max()
            .unwrap_or(0);
        // Per stage, the device of its lowest microbatch; a stage seen on a second device is
        // replicated (a bidirectional schedule), and the microbatches there run in reverse.
        let mut placement: Vec<Option<(u32, u32)>> = vec![None; n_stages];
        for (d, list) in devices.iter().enumerate() {
            for a in list.iter().filter(|a| a.kind.is_compute()) {
                let slot = &mut placement[a.stage as usize];
                if slot.is_none_or(|(_, mb)| a.microbatch < mb) {
                    *slot = Some((d as u32, a.microbatch));
                }
            }
        }
        let mut reverse_at: Vec<Option<u32>> = vec![None; n_stages];
        let mut reverse_mbs = vec![false; microbatches];
        for (d, list) in devices.iter().enumerate() {
            for (i, a) in list.iter().enumerate() {
                let s = a.stage as usize;
                let home = match placement[s] {
                    Some((home, _)) => home,
                    // Stages with only non-compute actions are placed where they appear.
                    None => {
                        placement[s] = Some((d as u32, 0));
                        d as u32
                    }
                };
                if home as usize == d {
                    continue;
                }
                match reverse_at[s] {
                    None => reverse_at[s] = Some(d as u32),
                    Some(other) if other as usize != d => {
                        return Err(ScheduleError::Action {
                            device: d,
                            position: i,
                            action: a.to_string(),
                            problem: format!(
                                "runs stage {s} on device {d}, but the stage also runs on \
                                 devices {home} and {other}",
                            ),
                        })
                    }
                    Some(_) => {}
                }
                if a.kind.is_compute() {
                    reverse_mbs[a.microbatch as usize] = true;
                }
            }
        }
        let placement: Vec<u32> = placement
            .into_iter()
            .enumerate()
            .map(|(s, d)| {
                d.map(|(d, _)| d).ok_or_else(|| ScheduleError::Stage {
                    stage: s,
                    problem: "has no actions".into(),
                })
            })
            .collect::<Result<_, _>>()?;
        let reverse = reverse_at.iter().any(Option::is_some).then(|| Reverse {
            placement: reverse_at
                .iter()
                .zip(&placement)
                .map(|(r, &p)| r.unwrap_or(p))
                .collect(),
            microbatches: reverse_mbs,
        });
        Ok(Schedule {
            devices,
            placement,
            microbatches,
            reverse,
        })
    }

    /// The device that runs stage `stage` for microbatch `microbatch`.
    pub fn device_of(&self, stage: u32, microbatch: u32) -> u32 {
        match &self.reverse {
            Some(r) if r.microbatches.get(microbatch as usize) == Some(&true) => {
                r.placement[stage as usize]
            }
            _ => self.placement[stage as usize],
        }
    }

    /// Number of devices p.
    pub fn p(&self) -> usize {
        self.devices.len()
    }

    /// Number of microbatches m.
    pub fn m(&self) -> usize {
        self.microbatches
    }

    /// Number of global stages (p × chunks).
    pub fn n_stages(&self) -> usize {
        self.placement.len()
    }

    /// Chunks (stages) per device, when every device holds the same number.
    pub fn chunks(&self) -> usize {
        self.n_stages() / self.p().max(1)
    }

    /// The action strings, one list per device.
    pub fn action_strings(&self) -> Vec<Vec<String>> {
        self.devices
            .iter()
            .map(|l| l.iter().map(|a| a.to_string()).collect())
            .collect()
    }

    /// CSV: one row per device, one cell per action (PyTorch's `_dump_csv` layout, cleave's
    /// letters).
    pub fn to_csv(&self) -> String {
        let mut out = String::new();
        for list in self.action_strings() {
            let _ = writeln!(out, "{}", list.join(","));
        }
        out
    }

    /// Reads CSV as written by [`Schedule::to_csv`] (empty cells are idle slots and skipped;
    /// `I` is read as B). The placement is inferred; `microbatches` overrides the inferred m.
    pub fn from_csv(text: &str) -> Result<Schedule, ScheduleError> {
        let mut devices = Vec::new();
        for (d, line) in text.lines().enumerate() {
            let mut list = Vec::new();
            for (i, cell) in line.split(',').map(str::trim).enumerate() {
                if cell.is_empty() {
                    continue;
                }
                let a = Action::parse(cell).map_err(|source| ScheduleError::Parse {
                    device: d,
                    position: i,
                    source,
                })?;
                list.push(a);
            }
            devices.push(list);
        }
        Schedule::from_lists(devices)
    }

    /// JSON: `{"microbatches": m, "placement": [...], "actions": [["0F0", ...], ...]}`, and for
    /// a bidirectional schedule `"reverse": {"placement": [...], "microbatches": [j, ...]}` (the
    /// replicas' devices and the microbatches that run through them).
    pub fn to_json(&self) -> String {
        let mut v = serde_json::json!({
            "microbatches": self.microbatches,
            "placement": self.placement,
            "actions": self.action_strings(),
        });
        if let Some(r) = &self.reverse {
            let mbs: Vec<usize> = (0..r.microbatches.len())
                .filter(|&j| r.microbatches[j])
                .collect();
            v["reverse"] = serde_json::json!({"placement": r.placement, "microbatches": mbs});
        }
        v.to_string()
    }

    /// Reads JSON as written by [`Schedule::to_json`]; `placement` and `microbatches` are optional
    /// (inferred when absent).
    pub fn from_json(text: &str) -> Result<Schedule, ScheduleError> {
        let bad = |m: &str| ScheduleError::Malformed(format!("schedule JSON: {m}"));
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(&e.to_string()))?;
        let rows = v
            .get("actions")
            .and_then(|a| a.as_array())
            .ok_or_else(|| bad("expected an `actions` array of arrays"))?;
        let mut devices = Vec::new();
        for (d, row) in rows.iter().enumerate() {
            let cells = row
                .as_array()
                .ok_or_else(|| bad("each device's actions must be an array"))?;
            let mut list = Vec::new();
            for (i, cell) in cells.iter().enumerate() {
                let Some(s) = cell.as_str() else {
                    if cell.is_null() {
                        continue;
                    }
                    return Err(bad("actions must be strings"));
                };
                list.push(Action::parse(s).map_err(|source| ScheduleError::Parse {
                    device: d,
                    position: i,
                    source,
                })?);
            }
            devices.push(list);
        }
        let mut s = Schedule::from_lists(devices)?;
        if let Some(m) = v.get("microbatches").and_then(|m| m.as_u64()) {
            s.microbatches = m as usize;
        }
        if let Some(p) = v.get("placement").and_then(|p| p.as_array()) {
            let placement: Option<Vec<u32>> =
                p.iter().map(|x| x.as_u64().map(|x| x as u32)).collect();
            s.placement = placement.ok_or_else(|| bad("placement must be device numbers"))?;
        }
        if let Some(r) = v.get("reverse") {
            let numbers = |key: &str| -> Result<Vec<u64>, ScheduleError> {
                r.get(key)
                    .and_then(|x| x.as_array())
                    .and_then(|x| x.iter().map(|x| x.as_u64()).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| bad(&format!("reverse.{key} must be an array of numbers")))
            };
            let placement = numbers("placement")?
                .into_iter()
                .map(|d| d as u32)
                .collect();
            let mut microbatches = vec![false; s.microbatches];
            for j in numbers("microbatches")? {
                *microbatches.get_mut(j as usize).ok_or_else(|| {
                    bad(&format!(
                        "reverse.microbatches names microbatch {j}, but m = {}",
                        s.microbatches
                    ))
                })? = true;
            }
            s.reverse = Some(Reverse {
                placement,
                microbatches,
            });
        }
        Ok(s)
    }

    /// Checks the structural rules 1–4 of the module docs (everything but deadlock freedom).
    fn check_structure(&self) -> Result<(), ScheduleError> {
        let (n_stages, m) = (self.n_stages(), self.microbatches);
        if self.devices.is_empty() {
            return Err(ScheduleError::Malformed(
                "the schedule has no devices".into(),
            ));
        }
        if let Some(r) = &self.reverse {
            if r.placement.len() != n_stages || r.microbatches.len() != m {
                return Err(ScheduleError::Malformed(format!(
                    "the reverse direction places {} stages and marks {} microbatches; the \
                     schedule has {n_stages} stages and {m} microbatches",
                    r.placement.len(),
                    r.microbatches.len()
                )));
            }
            if let Some(s) = r
                .placement
                .iter()
                .position(|&d| d as usize >= self.devices.len())
            {
                return Err(ScheduleError::Stage {
                    stage: s,
                    problem: format!(
                        "its replica is placed on device {}, but there are {} devices",
                        r.placement[s],
                        self.devices.len()
                    ),
                });
            }
        }
        // Per (stage, class, microbatch): (device, position) of the action, for order checks.
        const NONE: (u32, u32) = (u32::MAX, u32::MAX);
        let slot = |stage: u32, kind: ActionKind, mb: u32| -> usize {
            let class = match kind {
                ActionKind::F => 0,
                ActionKind::B => 1,
                ActionKind::W => 2,
                _ => 3,
            };
            (stage as usize * 4 + class) * m + mb as usize
        };
        let mut seen = vec![NONE; n_stages * 4 * m];
        let act_err = |d: usize, i: usize, a: &Action, problem: String| ScheduleError::Action {
            device: d,
            position: i,
            action: a.to_string(),
            problem,
        };
        for (d, list) in self.devices.iter().enumerate() {
            for (i, a) in list.iter().enumerate() {
                if a.stage as usize >= n_stages {
                    return Err(act_err(
                        d,
                        i,
                        a,
                        format!("names stage {}, but there are {n_stages} stages", a.stage),
                    ));
                }
                let home = if a.kind == ActionKind::Opt {
                    // A replicated stage steps its optimizer on both of its devices.
                    match &self.reverse {
                        Some(r) if r.placement[a.stage as usize] as usize == d => d as u32,
                        _ => self.placement[a.stage as usize],
                    }
                } else if a.microbatch as usize >= m {
                    self.placement[a.stage as usize]
                } else {
                    self.device_of(a.stage, a.microbatch)
                };
                if home as usize != d {
                    return Err(act_err(
                        d,
                        i,
                        a,
                        format!(
                            "runs on device {d}, but stage {} is placed on device {home}{}",
                            a.stage,
                            if self.reverse.is_some() && a.kind != ActionKind::Opt {
                                format!(" for microbatch {}", a.microbatch)
                            } else {
                                String::new()
                            }
                        ),
                    ));
                }
                if !a.kind.is_compute() {
                    if a.kind != ActionKind::Opt && a.microbatch as usize >= m {
                        return Err(act_err(
                            d,
                            i,
                            a,
                            format!("names microbatch {}, but m = {m}", a.microbatch),
                        ));
                    }
                    continue;
                }
                if a.microbatch as usize >= m {
                    return Err(act_err(
                        d,
                        i,
                        a,
                        format!("names microbatch {}, but m = {m}", a.microbatch),
                    ));
                }
                let k = slot(a.stage, a.kind, a.microbatch);
                if seen[k] != NONE {
                    return Err(act_err(
                        d,
                        i,
                        a,
                        format!("appears twice (first at position {})", seen[k].1),
                    ));
                }
                let earlier = |kind: ActionKind| seen[slot(a.stage, kind, a.microbatch)] != NONE;
                let name = |kind: ActionKind| Action::new(a.stage, kind, a.microbatch).to_string();
                match a.kind {
                    ActionKind::B | ActionKind::BW if !earlier(ActionKind::F) => {
                        return Err(act_err(d, i, a, format!("before {}", name(ActionKind::F))));
                    }
                    ActionKind::B if earlier(ActionKind::BW) => {
                        return Err(act_err(d, i, a, format!("after {}", name(ActionKind::BW))));
                    }
                    ActionKind::BW if earlier(ActionKind::B) || earlier(ActionKind::W) => {
                        return Err(act_err(
                            d,
                            i,
                            a,
                            "with a split backward of the same microbatch".into(),
                        ));
                    }
                    ActionKind::W if earlier(ActionKind::BW) => {
                        return Err(act_err(d, i, a, format!("after {}", name(ActionKind::BW))));
                    }
                    ActionKind::W if !earlier(ActionKind::B) => {
                        return Err(act_err(d, i, a, format!("before {}", name(ActionKind::B))));
                    }
                    _ => {}
                }
                seen[k] = (d as u32, i as u32);
            }
        }
        for stage in 0..n_stages as u32 {
            for mb in 0..m as u32 {
                let has = |kind| seen[slot(stage, kind, mb)] != NONE;
                let missing = if !has(ActionKind::F) {
                    Some(ActionKind::F)
                } else if has(ActionKind::BW) {
                    None
                } else if !has(ActionKind::B) {
                    Some(ActionKind::B)
                } else if !has(ActionKind::W) {
                    Some(ActionKind::W)
                } else {
                    None
                };
                if let Some(kind) = missing {
                    let count = (0..m as u32)
                        .filter(|&j| seen[slot(stage, kind, j)] != NONE)
                        .count();
                    return Err(ScheduleError::Stage {
                        stage: stage as usize,
                        problem: format!(
                            "{count} {} action(s), expected {m}: {} is missing",
                            kind.name(),
                            Action::new(stage, kind, mb)
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks every rule of the module docs, deadlock freedom included.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        self.check_structure()?;
        let n = self.n_stages();
        simulate::run(
            self,
            &Costs::uniform(n, 1.0, 1.0, 1.0, 0.0),
            &Memory::uniform(n, 0.0, 0.0),
            simulate::BackwardDependency::NextStage,
        )
        .map(|_| ())
    }

    /// Validates, then simulates with the given per-stage costs and memory.
    pub fn simulate(&self, costs: &Costs, memory: &Memory) -> Result<Simulation, ScheduleError> {
        self.simulate_with(costs, memory, simulate::BackwardDependency::NextStage)
    }

    /// [`Schedule::simulate`] under a dependency mode (what B waits for). A schedule that
    /// validates runs under every mode: the other modes only drop dependencies that backprop's
    /// implies transitively.
    pub fn simulate_with(
        &self,
        costs: &Costs,
        memory: &Memory,
        backward: simulate::BackwardDependency,
    ) -> Result<Simulation, ScheduleError> {
        self.check_structure()?;
        if costs.stages.len() != self.n_stages() || memory.stages.len() != self.n_stages() {
            return Err(ScheduleError::Malformed(format!(
                "costs for {} and memory for {} stages, but the schedule has {}",
                costs.stages.len(),
                memory.stages.len(),
                self.n_stages()
            )));
        }
        simulate::run(self, costs, memory, backward)
    }
}
