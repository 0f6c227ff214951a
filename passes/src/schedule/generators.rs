//! Hand-written schedule orders (the reference document's "Orders" section).
//!
//! | name | placement | backward | order |
//! |---|---|---|---|
//! | `gpipe` | stage i on device i | BW | all F, then all BW, microbatches in order |
//! | `1f1b` | stage i on device i | BW | w = min(p−1−i, m) warm-up F; (F, BW) pairs; remaining BW |
//! | `interleaved` | looping: stage s on device s mod p, v chunks | BW | Megatron / PyTorch `ScheduleInterleaved1F1B` |
//! | `zb-h1` | stage i on device i | B + W | 1F1B with B; after the (k+1)-th B the next W if k ≥ i; remaining W |
//! | `zb-h2` | stage i on device i | B + W | w = min(2(p−1−i)+1, m) warm-up F; B, W if k ≥ 2i, F; remaining W |
//! | `eager` | stage i on device i | B + W | F, B, W of each microbatch in turn, no warm-up: for gradient methods whose B does not wait for a later stage (`dfa`, `local`) |
//! | `zb-v` | V: stage s on device s (s < p), else 2p−1−s | B + W | PyTorch `ScheduleZBVZeroBubble._calculate_single_rank_operations` |
//! | `v-min` | V | B + W | Qi et al. (arXiv 2405.15362), sail-sg `zbv_greedy.py`: ⌊(p+4)/3⌋ microbatches of memory ([`super::papers`]) |
//! | `v-half` | V | B + W | the same construction with ⌊(p+2)/2⌋ microbatches of memory |
//! | `dualpipev` | V | BW and B + W | deepseek-ai/DualPipe `DualPipeV.step`, one op at a time; needs m ≥ 2p |
//! | `hanayo`, `hanayo-<W>` | wave: 2W chunks per device in a zig-zag (W = 1 is the V) | BW | Hanayo (SC'23, arXiv 2308.15762), order reconstructed by greedy list scheduling |
//! | `bitpipe` | two Vs in opposite directions, stages replicated ([`super::Reverse`]); p even | BW | BitPipe (AAAI 2025, arXiv 2410.19367), order reconstructed by greedy list scheduling |
//!
//! The interleaved order groups microbatches in rounds as PyTorch does (`rounds = max(1, m / p)`,
//! `m / rounds` microbatches per round); where PyTorch rejects `m` (not a multiple of `rounds`),
//! cleave uses one round of all `m` microbatches, which is still valid. Warm-up is
//! `(v−1)·round + 2(p−1−i)` forwards, capped at `m·v`.
//!
//! ZB-V follows PyTorch's construction (which assumes m ≥ 2p−1 and drops the actions of
//! microbatches ≥ m afterwards, as PyTorch does); idle slots are not represented.
//!
//! The schedules from papers (V-Min, V-Half, DualPipeV, Hanayo, BitPipe) are built in [`super::papers`],
//! whose docs give the sources and which parts are reconstructions; their published and derived
//! bubble figures are checked in `passes/tests/schedule_papers.rs`.

use super::action::{Action, ActionKind};
use super::papers::{self, VMemory};
use super::{Schedule, ScheduleError};

pub use super::papers::wave_placement;

/// The hand-written schedules (`auto` lives in [`super::auto`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generator {
    /// GPipe.
    GPipe,
    /// 1F1B (PipeDream-flush).
    OneFOneB,
    /// Interleaved 1F1B with this many chunks per device.
    Interleaved(usize),
    /// Zero Bubble H1 (1F1B memory).
    ZbH1,
    /// Zero Bubble H2 (2p−1 microbatches of memory).
    ZbH2,
    /// Zero Bubble V (two chunks per device in a V).
    ZbV,
    /// F, B, W of each microbatch in turn (for `dfa` and `local` learning).
    Eager,
    /// V-Min: the controllable-memory V with about a third of 1F1B's activation memory.
    VMin,
    /// V-Half: the controllable-memory V with about half of 1F1B's activation memory.
    VHalf,
    /// DualPipeV: DeepSeek's DualPipe cut in half onto a V (needs m ≥ 2p).
    DualPipeV,
    /// Hanayo's wave-like pipeline with this many waves (2 chunks per wave per device).
    Hanayo(usize),
    /// BitPipe: two V pipelines in opposite directions, every stage replicated (needs p even).
    BitPipe,
}

impl Generator {
    /// Names accepted by [`Generator::parse`], for messages.
    pub const NAMES: &'static str = "gpipe, 1f1b, interleaved (or interleaved-<v>), zb-h1, zb-h2, \
         zb-v, eager, v-min, v-half, dualpipev, hanayo (or hanayo-<W>), bitpipe";

    /// Parses a name: `gpipe`, `1f1b`, `interleaved` (2 chunks), `interleaved-<v>`, `zb-h1`,
    /// `zb-h2`, `zb-v`, `eager`, `v-min`, `v-half`, `dualpipev`, `hanayo` (one wave),
    /// `hanayo-<W>`, `bitpipe` (case-insensitive; `_` is read as `-`).
    pub fn parse(name: &str) -> Option<Generator> {
        let n = name.to_ascii_lowercase().replace('_', "-");
        Some(match n.as_str() {
            "gpipe" => Generator::GPipe,
            "1f1b" => Generator::OneFOneB,
            "interleaved" | "interleaved-1f1b" => Generator::Interleaved(2),
            "zb-h1" | "zbh1" => Generator::ZbH1,
            "zb-h2" | "zbh2" => Generator::ZbH2,
            "zb-v" | "zbv" => Generator::ZbV,
            "eager" => Generator::Eager,
            "v-min" | "vmin" => Generator::VMin,
            "v-half" | "vhalf" => Generator::VHalf,
            "dualpipev" | "dualpipe-v" => Generator::DualPipeV,
            "hanayo" => Generator::Hanayo(1),
            "bitpipe" => Generator::BitPipe,
            other => {
                if let Some(w) = other.strip_prefix("hanayo-") {
                    return Some(Generator::Hanayo(w.parse().ok()?));
                }
                let v = other.strip_prefix("interleaved-")?.parse().ok()?;
                Generator::Interleaved(v)
            }
        })
    }

    /// The placement this generator uses for `p` devices.
    pub fn placement(self, p: usize) -> Vec<u32> {
        match self {
            Generator::Interleaved(v) => looping_placement(p, v),
            Generator::ZbV
            | Generator::VMin
            | Generator::VHalf
            | Generator::DualPipeV
            | Generator::BitPipe => v_placement(p),
            Generator::Hanayo(w) => wave_placement(p, w),
            _ => (0..p as u32).collect(),
        }
    }

    /// Generates the schedule for `p` devices and `m` microbatches.
    pub fn generate(self, p: usize, m: usize) -> Result<Schedule, ScheduleError> {
        if p == 0 || m == 0 {
            return Err(ScheduleError::Malformed(
                "a schedule needs at least one device and one microbatch".into(),
            ));
        }
        let devices = match self {
            Generator::GPipe => (0..p).map(|i| gpipe(i, m)).collect(),
            Generator::OneFOneB => (0..p).map(|i| one_f_one_b(p, i, m)).collect(),
            Generator::ZbH1 => (0..p).map(|i| zb_h1(p, i, m)).collect(),
            Generator::ZbH2 => (0..p).map(|i| zb_h2(p, i, m)).collect(),
            Generator::Interleaved(v) => {
                if v == 0 {
                    return Err(ScheduleError::Malformed(
                        "interleaved needs at least one chunk per device".into(),
                    ));
                }
                (0..p).map(|i| interleaved(p, v, i, m)).collect()
            }
            Generator::ZbV => (0..p).map(|i| zb_v(p, i, m)).collect(),
            Generator::Eager => (0..p)
                .map(|i| {
                    (0..m)
                        .flat_map(|j| {
                            [ActionKind::F, ActionKind::B, ActionKind::W].map(|k| act(i, k, j))
                        })
                        .collect()
                })
                .collect(),
            Generator::VMin => papers::v_controllable(p, m, VMemory::Min),
            Generator::VHalf => papers::v_controllable(p, m, VMemory::Half),
            Generator::DualPipeV => papers::dualpipev(p, m)?,
            Generator::Hanayo(w) => papers::hanayo(p, w, m)?,
            Generator::BitPipe => papers::bitpipe(p, m)?,
        };
        Ok(Schedule {
            devices,
            placement: self.placement(p),
            microbatches: m,
            reverse: (self == Generator::BitPipe).then(|| papers::bitpipe_reverse(p, m)),
        })
    }
}

/// Stage s on device s mod p (`v` chunks per device).
pub fn looping_placement(p: usize, v: usize) -> Vec<u32> {
    (0..p * v).map(|s| (s % p) as u32).collect()
}

/// Two chunks per device in a V: stage s on device s for s < p, otherwise on 2p−1−s.
pub fn v_placement(p: usize) -> Vec<u32> {
    (0..2 * p)
        .map(|s| if s < p { s } else { 2 * p - 1 - s } as u32)
        .collect()
}

fn act(stage: usize, kind: ActionKind, mb: usize) -> Action {
    Action::new(stage as u32, kind, mb as u32)
}

fn gpipe(i: usize, m: usize) -> Vec<Action> {
    let mut out: Vec<Action> = (0..m).map(|j| act(i, ActionKind::F, j)).collect();
    out.extend((0..m).map(|j| act(i, ActionKind::BW, j)));
    out
}

fn one_f_one_b(p: usize, i: usize, m: usize) -> Vec<Action> {
    let w = (p - 1 - i).min(m);
    let mut out: Vec<Action> = (0..w).map(|j| act(i, ActionKind::F, j)).collect();
    for k in 0..m - w {
        out.push(act(i, ActionKind::F, w + k));
        out.push(act(i, ActionKind::BW, k));
    }
    out.extend((m - w..m).map(|j| act(i, ActionKind::BW, j)));
    out
}

fn zb_h1(p: usize, i: usize, m: usize) -> Vec<Action> {
    let w = (p - 1 - i).min(m);
    let mut out: Vec<Action> = (0..w).map(|j| act(i, ActionKind::F, j)).collect();
    let mut next_w = 0;
    let mut push_b = |out: &mut Vec<Action>, k: usize| {
        out.push(act(i, ActionKind::B, k));
        if k >= i {
            out.push(act(i, ActionKind::W, next_w));
            next_w += 1;
        }
    };
    for k in 0..m - w {
        out.push(act(i, ActionKind::F, w + k));
        push_b(&mut out, k);
    }
    for k in m - w..m {
        push_b(&mut out, k);
    }
    out.extend((next_w..m).map(|j| act(i, ActionKind::W, j)));
    out
}

fn zb_h2(p: usize, i: usize, m: usize) -> Vec<Action> {
    let w = (2 * (p - 1 - i) + 1).min(m);
    let mut out: Vec<Action> = (0..w).map(|j| act(i, ActionKind::F, j)).collect();
    let (mut next_f, mut next_w) = (w, 0);
    for k in 0..m {
        out.push(act(i, ActionKind::B, k));
        if k >= 2 * i {
            out.push(act(i, ActionKind::W, next_w));
            next_w += 1;
        }
        if next_f < m {
            out.push(act(i, ActionKind::F, next_f));
            next_f += 1;
        }
    }
    out.extend((next_w..m).map(|j| act(i, ActionKind::W, j)));
    out
}

fn interleaved(p: usize, v: usize, i: usize, m: usize) -> Vec<Action> {
    let rounds = (m / p).max(1);
    let per_round = if m.is_multiple_of(rounds) {
        m / rounds
    } else {
        m
    };
    // The forward and backward (chunk, microbatch) sequences of every device.
    let mut forward = Vec::with_capacity(m * v);
    let mut backward = Vec::with_capacity(m * v);
    for start in (0..m).step_by(per_round) {
        let group = start..(start + per_round).min(m);
        for c in 0..v {
            forward.extend(group.clone().map(|j| (c, j)));
        }
        for c in (0..v).rev() {
            backward.extend(group.clone().map(|j| (c, j)));
        }
    }
    let stage = |c: usize| c * p + i;
    let total = m * v;
    let warmup = ((v - 1) * per_round + 2 * (p - 1 - i)).min(total);
    let mut out: Vec<Action> = forward[..warmup]
        .iter()
        .map(|&(c, j)| act(stage(c), ActionKind::F, j))
        .collect();
    for k in 0..total - warmup {
        let (c, j) = forward[warmup + k];
        out.push(act(stage(c), ActionKind::F, j));
        let (c, j) = backward[k];
        out.push(act(stage(c), ActionKind::BW, j));
    }
    for &(c, j) in &backward[total - warmup..] {
        out.push(act(stage(c), ActionKind::BW, j));
    }
    out
}

/// PyTorch's ZB-V rank order, transcribed (chunk 0 = stage i, chunk 1 = stage 2p−1−i).
fn zb_v(p: usize, i: usize, m: usize) -> Vec<Action> {
    let n_micro = m.max(2 * p - 1);
    let (s0, s1) = (i, 2 * p - 1 - i);
    let mut out = Vec::new();
    let (mut f0, mut f1, mut b0, mut b1) = (0, 0, 0, 0);
    for _ in 0..2 * (p - i) - 1 {
        out.push(act(s0, ActionKind::F, f0));
        f0 += 1;
    }
    for _ in 0..i {
        out.push(act(s1, ActionKind::F, f1));
        f1 += 1;
        out.push(act(s0, ActionKind::F, f0));
        f0 += 1;
    }
    for _ in 0..p - i {
        out.push(act(s1, ActionKind::F, f1));
        f1 += 1;
        out.push(act(s1, ActionKind::B, b1));
        out.push(act(s1, ActionKind::W, b1));
        b1 += 1;
    }
    while f1 < f0 || f0 < n_micro {
        if f0 < n_micro {
            out.push(act(s0, ActionKind::F, f0));
            f0 += 1;
        }
        out.push(act(s0, ActionKind::B, b0));
        out.push(act(s0, ActionKind::W, b0));
        b0 += 1;
        out.push(act(s1, ActionKind::F, f1));
        f1 += 1;
        out.push(act(s1, ActionKind::B, b1));
        out.push(act(s1, ActionKind::W, b1));
        b1 += 1;
    }
    let (mut w0, mut w1) = (b0, b1);
    for _ in 0..i {
        out.push(act(s0, ActionKind::B, b0));
        b0 += 1;
        out.push(act(s1, ActionKind::B, b1));
        b1 += 1;
    }
    for _ in 0..p - i {
        out.push(act(s0, ActionKind::B, b0));
        b0 += 1;
        out.push(act(s0, ActionKind::W, w0));
        w0 += 1;
    }
    while w1 < b1 {
        out.push(act(s1, ActionKind::W, w1));
        w1 += 1;
    }
    while w0 < b0 {
        out.push(act(s0, ActionKind::W, w0));
        w0 += 1;
    }
    debug_assert!(w0 == b0 && b0 == f0 && w1 == b1 && b1 == f1);
    out.retain(|a| (a.microbatch as usize) < m);
    out
}
