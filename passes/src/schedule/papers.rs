//! Schedules from recent papers, expressed as data for the same engine: V-Min, V-Half,
//! DualPipeV, Hanayo and BitPipe.
//!
//! Each construction here only produces per-device action lists; the placement, the validator
//! and the simulator are the ones every other schedule uses. That is the point of this module:
//! a published schedule is judged by exactly the semantics that judge 1F1B or ZB-V, so the
//! figures in `passes/tests/schedule_papers.rs` compare like with like.
//!
//! | schedule | source | placement | backward | how the order is built |
//! |---|---|---|---|---|
//! | V-Min, V-Half | Qi et al., "Pipeline Parallelism with Controllable Memory", arXiv 2405.15362; sail-sg/zero-bubble-pipeline-parallelism `zbv_greedy.py` | V ([`super::generators::v_placement`]) | B + W | a stable slot pattern, two greedy reordering passes under a memory cap, then W placed in the free slots ([`v_controllable`]) |
//! | DualPipeV | DeepSeek's DualPipe cut in half; deepseek-ai/DualPipe `dualpipe/dualpipev.py` | V | BW and B + W | the eight phases of `DualPipeV.step`, run one op at a time ([`dualpipev`]) |
//! | Hanayo | Liu et al., SC'23, arXiv 2308.15762 | wave with 2W chunks per device ([`wave_placement`]) | BW | deterministic greedy list scheduling with unit costs ([`hanayo`]) |
//! | BitPipe | Wu, Chen and Yu, AAAI 2025, arXiv 2410.19367; wuhouming/BitPipe `bitpipe_schedule.py` | two Vs in opposite directions, every stage replicated ([`bitpipe_reverse`]) | BW | the authors' per-rank order, re-derived as a rule over units of p microbatches ([`bitpipe`]) |
//!
//! All orders are built without looking at the real costs (unit slots, as the reference code
//! does), so a schedule is a fixed function of `(p, m)` and the simulator alone decides how good
//! it is for given T_F, T_B, T_W.

use super::action::{Action, ActionKind};
use super::ScheduleError;
use std::collections::VecDeque;

/// Which of the two controllable-memory V schedules to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VMemory {
    /// V-Min: about a third of 1F1B's activation memory (⌊(p+4)/3⌋ microbatches).
    Min,
    /// V-Half: about half of 1F1B's activation memory (⌊(p+2)/2⌋ microbatches).
    Half,
}

// Op types of the V construction, per device (the reference code's F, f, B, b, W, w).
/// Forward of chunk 0 (stage i).
const T_F0: usize = 0;
/// Forward of chunk 1 (stage 2p−1−i).
const T_F1: usize = 1;
/// Input gradient of chunk 1.
const T_B1: usize = 2;
/// Input gradient of chunk 0.
const T_B0: usize = 3;
/// Weight gradient of chunk 1 (or of either chunk while W is not split by chunk); type 5 is
/// the weight gradient of chunk 0.
const T_W1: usize = 4;
/// What each op type runs: its action kind and its chunk (0 = stage i, 1 = stage 2p−1−i).
const TYPE_ACTION: [(ActionKind, usize); 6] = [
    (ActionKind::F, 0),
    (ActionKind::F, 1),
    (ActionKind::B, 1),
    (ActionKind::B, 0),
    (ActionKind::W, 1),
    (ActionKind::W, 0),
];
/// Memory change of each op type, in chunk activations (W frees what F allocated).
const DELTA: [i64; 6] = [1, 1, 0, 0, -1, -1];

/// One device's ops: `slots[type][j]` is the time slot of the j-th op of that type.
type Slots = Vec<Vec<i64>>;

/// The highest slot a device uses (−1 when it has none).
fn last_slot(d: &[Vec<i64>]) -> i64 {
    d.iter().flatten().copied().max().unwrap_or(-1)
}

/// The type held by each slot from 0 to the last one (`None` = empty slot).
fn timeline(d: &[Vec<i64>]) -> Vec<Option<usize>> {
    let mut out = vec![None; (last_slot(d) + 1) as usize];
    for (t, list) in d.iter().enumerate() {
        for &s in list {
            out[s as usize] = Some(t);
        }
    }
    out
}

/// The stable pattern: slot of microbatch 0 for each of the four F/B types, plus 6 per
/// microbatch (six ops per microbatch per device).
fn pattern(p: usize, m: usize, kind: VMemory) -> Vec<Slots> {
    let p = p as i64;
    (0..p)
        .map(|i| {
            let first = match kind {
                VMemory::Min => {
                    let g = if p % 3 == 0 { 2 } else { 0 };
                    [i, 2 * p - 1 - i, 2 * p + g + i, 4 * p + g - 1 - i]
                }
                VMemory::Half => {
                    let g = if p % 2 == 0 { 3 } else { 0 };
                    [
                        2 * i,
                        3 * p - i - 2,
                        3 * p + g + 2 * i - 1,
                        6 * p + g - i - 2,
                    ]
                }
            };
            first
                .iter()
                .map(|&x| (0..m as i64).map(|j| x + 6 * j).collect())
                .collect()
        })
        .collect()
}

/// Adds the weight gradients to a device's four F/B lists: each empty slot takes a pending W
/// (one whose B has run), and the W's left at the end follow the last slot. With `split`, the
/// chunk-1 and chunk-0 W's get their own lists (chunk 1 first when both are pending);
/// otherwise there is one W list.
fn put_w(d: &[Vec<i64>], split: bool) -> Slots {
    let line = timeline(&d[..4]);
    let mut out: Slots = d[..4].to_vec();
    out.push(Vec::new());
    out.push(Vec::new());
    let mut pending = [0usize; 2];
    for (i, slot) in line.iter().enumerate() {
        match *slot {
            Some(t) if t == T_B1 || t == T_B0 => {
                pending[if split { t - T_B1 } else { 0 }] += 1;
            }
            Some(_) => {}
            None => {
                if let Some(w) = (0..2).find(|&w| pending[w] > 0) {
                    out[T_W1 + w].push(i as i64);
                    pending[w] -= 1;
                }
            }
        }
    }
    let mut i = line.len() as i64 - 1;
    for w in 0..2 {
        for _ in 0..pending[w] {
            i += 1;
            out[T_W1 + w].push(i);
        }
    }
    if !split {
        out.truncate(5);
    }
    out
}

/// Peak activation of a device, in chunk activations. Without W lists, every empty slot after
/// a backward counts as the W that frees it.
fn peak(d: &[Vec<i64>]) -> i64 {
    let has_w = d.len() > 4;
    let (mut pending, mut cur, mut best) = (0i64, 0i64, 0i64);
    for slot in timeline(d) {
        match slot {
            Some(t) => {
                cur += DELTA[t];
                if t == T_B1 || t == T_B0 {
                    pending += 1;
                }
            }
            None if !has_w && pending > 0 => {
                cur -= 1;
                pending -= 1;
            }
            None => {}
        }
        best = best.max(cur);
    }
    best
}

/// Every op of every device as `(slot, device, type, index)`, sorted: the order in which the
/// reference code visits ops (it always takes the smallest unvisited slot).
fn visit_order(res: &[Slots]) -> Vec<(i64, usize, usize, usize)> {
    let mut ops: Vec<_> = res
        .iter()
        .enumerate()
        .flat_map(|(s, d)| {
            d.iter()
                .enumerate()
                .flat_map(move |(t, list)| list.iter().enumerate().map(move |(j, &v)| (v, s, t, j)))
        })
        .collect();
    ops.sort_unstable();
    ops
}

/// One greedy reordering pass: ops after the steady phase (and, with `consider_w`, before it)
/// move to the earliest free slot their dependencies allow, as long as the device's peak does
/// not exceed the pattern's. The result is re-timed as soon as possible with unit costs, with
/// one W list per device.
fn reorder(res: Vec<Slots>, consider_w: bool, m: usize) -> Vec<Slots> {
    let mut res: Vec<Slots> = if consider_w {
        res.iter().map(|d| put_w(d, false)).collect()
    } else {
        res
    };
    let cap = res.iter().map(|d| peak(d)).max().unwrap_or(0);
    let ns = res.len();
    let mut occupied: Vec<Vec<bool>> = res
        .iter()
        .map(|d| vec![false; (last_slot(d) + 1) as usize])
        .collect();
    // Phase 0 runs until device 0's first chunk-0 backward, phase 1 (the steady state, never
    // moved) until the forward of the last microbatch, phase 2 is the cool-down.
    let mut phase = 0;
    for (v, s, t, j) in visit_order(&res) {
        if t == T_B0 && s == 0 && phase == 0 {
            phase = 1;
        }
        let fixed = phase == 1 || (phase == 0 && !consider_w);
        if phase == 1 && t == T_F0 && j + 1 == m {
            phase = 2;
        }
        if fixed {
            occupied[s][v as usize] = true;
            continue;
        }
        let mut lb = -1;
        if (t == T_F0 || t == T_B1) && s > 0 {
            lb = lb.max(res[s - 1][t][j]);
        }
        if (t == T_F1 || t == T_B0) && s + 1 < ns {
            lb = lb.max(res[s + 1][t][j]);
        }
        if (1..4).contains(&t) {
            lb = lb.max(res[s][t - 1][j]);
        }
        if t == T_W1 {
            let mut backward: Vec<i64> =
                res[s][T_B1].iter().chain(&res[s][T_B0]).copied().collect();
            backward.sort_unstable();
            lb = lb.max(backward[j]);
        }
        if j > 0 {
            lb = lb.max(res[s][t][j - 1]);
        }
        let mut placed = false;
        for slot in (lb + 1)..v {
            if !occupied[s][slot as usize] {
                res[s][t][j] = slot;
                if peak(&res[s]) <= cap {
                    placed = true;
                    break;
                }
            }
        }
        if !placed {
            res[s][t][j] = v;
        }
        occupied[s][res[s][t][j] as usize] = true;
    }
    if !consider_w {
        res = res.iter().map(|d| put_w(d, false)).collect();
    }
    retime(&res)
}

/// Re-times every op as soon as possible with unit costs, keeping each device's slot order;
/// returns the start slots. The dependencies are those of the reordering pass without the W rule
/// (a W only follows the previous W of its list and its device's previous op).
fn retime(res: &[Slots]) -> Vec<Slots> {
    let ns = res.len();
    let mut end: Vec<Slots> = res
        .iter()
        .map(|d| d.iter().map(|l| vec![0; l.len()]).collect())
        .collect();
    let mut device_free = vec![0i64; ns];
    for (_, s, t, j) in visit_order(res) {
        let mut at = device_free[s];
        if (t == T_F0 || t == T_B1) && s > 0 {
            at = at.max(end[s - 1][t][j]);
        }
        if (t == T_F1 || t == T_B0) && s + 1 < ns {
            at = at.max(end[s + 1][t][j]);
        }
        if (1..4).contains(&t) {
            at = at.max(end[s][t - 1][j]);
        }
        if j > 0 {
            at = at.max(end[s][t][j - 1]);
        }
        end[s][t][j] = at + 1;
        device_free[s] = at + 1;
    }
    for d in &mut end {
        for list in d.iter_mut() {
            for e in list.iter_mut() {
                *e -= 1;
            }
        }
    }
    end
}

/// V-Min or V-Half (Qi et al., arXiv 2405.15362), following the construction of
/// sail-sg/zero-bubble-pipeline-parallelism `zbv_greedy.py`: the stable pattern, a reordering
/// pass that also moves W's and the warm-up, a second pass that moves only the cool-down, then
/// the W's of each chunk in the free slots. Device i holds chunk 0 = stage i and chunk 1 =
/// stage 2p−1−i; each device's list is its ops in slot order.
pub fn v_controllable(p: usize, m: usize, kind: VMemory) -> Vec<Vec<Action>> {
    let strip = |res: Vec<Slots>| -> Vec<Slots> {
        res.into_iter()
            .map(|mut d| {
                d.truncate(4);
                d
            })
            .collect()
    };
    let first = strip(reorder(pattern(p, m, kind), true, m));
    let second = strip(reorder(first, false, m));
    second
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let (s0, s1) = (i, 2 * p - 1 - i);
            let full = put_w(d, true);
            let mut ops: Vec<(i64, usize, usize)> = full
                .iter()
                .enumerate()
                .flat_map(|(t, list)| list.iter().enumerate().map(move |(j, &v)| (v, t, j)))
                .collect();
            ops.sort_unstable();
            ops.into_iter()
                .map(|(_, t, j)| {
                    let (kind, chunk) = TYPE_ACTION[t];
                    act([s0, s1][chunk], kind, j)
                })
                .collect()
        })
        .collect()
}

fn act(stage: usize, kind: ActionKind, mb: usize) -> Action {
    Action::new(stage as u32, kind, mb as u32)
}

/// One rank of DualPipeV while its list is built: per-chunk counters and the FIFO of deferred
/// weight gradients.
struct DualRank {
    stages: [usize; 2],
    forward: [usize; 2],
    backward: [usize; 2],
    deferred: VecDeque<(usize, usize)>,
    out: Vec<Action>,
}

impl DualRank {
    fn f(&mut self, chunk: usize) {
        self.out
            .push(act(self.stages[chunk], ActionKind::F, self.forward[chunk]));
        self.forward[chunk] += 1;
    }

    /// The next backward of `chunk`: split (W deferred to the FIFO) when `zero_bubble`, whole
    /// otherwise.
    fn b(&mut self, chunk: usize, zero_bubble: bool) {
        let (stage, mb) = (self.stages[chunk], self.backward[chunk]);
        if zero_bubble {
            self.out.push(act(stage, ActionKind::B, mb));
            self.deferred.push_back((stage, mb));
        } else {
            self.out.push(act(stage, ActionKind::BW, mb));
        }
        self.backward[chunk] += 1;
    }

    fn w(&mut self) {
        if let Some((stage, mb)) = self.deferred.pop_front() {
            self.out.push(act(stage, ActionKind::W, mb));
        }
    }
}

/// DualPipeV (deepseek-ai/DualPipe `dualpipe/dualpipev.py`, `DualPipeV.step`): the phases of
/// rank r with P = p ranks and m ≥ 2p microbatches, each overlapped F&B pair of the reference
/// runtime emitted as its two ops in turn. Chunk 0 is stage r and chunk 1 stage 2p−1−r, so the
/// loss is on device 0.
pub fn dualpipev(p: usize, m: usize) -> Result<Vec<Vec<Action>>, ScheduleError> {
    if m < 2 * p {
        return Err(ScheduleError::Malformed(format!(
            "dualpipev needs at least 2p microbatches (m ≥ 2p = {}), got m = {m} for p = {p}",
            2 * p
        )));
    }
    Ok((0..p).map(|r| dualpipev_rank(p, r, m)).collect())
}

fn dualpipev_rank(p: usize, r: usize, m: usize) -> Vec<Action> {
    let mut k = DualRank {
        stages: [r, 2 * p - 1 - r],
        forward: [0; 2],
        backward: [0; 2],
        deferred: VecDeque::new(),
        out: Vec::with_capacity(6 * m),
    };
    // 1. Chunk-0 warm-up.
    for _ in 0..2 * (p - r - 1) {
        k.f(0);
    }
    // 2. Both chunks.
    for _ in 0..r + 1 {
        k.f(0);
        k.f(1);
    }
    // 3. Chunk-1 backward with its W right away (a zero-bubble start).
    for _ in 0..p - r - 1 {
        k.b(1, true);
        k.w();
        k.f(1);
    }
    // 4. Steady state: the two overlapped pairs (F0 & BW1), (F1 & BW0).
    for _ in 0..m + r + 1 - 2 * p {
        k.f(0);
        k.b(1, false);
        k.f(1);
        k.b(0, false);
    }
    // 5. Chunk 0's forwards have run out.
    for _ in 0..p - r - 1 {
        k.b(1, false);
        k.f(1);
        k.b(0, false);
    }
    // 6. Backward only; halfway through it switches to split backwards, deferring r+1 W's.
    // On an odd rank both backwards of iteration (r+1)/2 are split; on an even rank only its
    // chunk-0 backward is, and chunk 1 follows from the next iteration.
    let half = r.div_ceil(2);
    let odd = !r.is_multiple_of(2);
    let mut zero_bubble = false;
    for i in 0..r + 1 {
        if i == half && odd {
            zero_bubble = true;
        }
        k.b(1, zero_bubble);
        if i == half && !odd {
            zero_bubble = true;
        }
        k.b(0, zero_bubble);
    }
    // 7. Chunk-0 backwards interleaved with the deferred W's.
    for _ in 0..p - r - 1 {
        k.w();
        k.b(0, true);
    }
    // 8. The remaining W's.
    for _ in 0..r + 1 {
        k.w();
    }
    debug_assert!(k.deferred.is_empty() && k.forward == [m, m] && k.backward == [m, m]);
    k.out
}

/// The wave placement of Hanayo with `waves` waves: 2·waves·p stages in a zig-zag, chunk
/// c = s div p going down the devices when c is even and back up when c is odd. Each device
/// holds 2·waves chunks; one wave is the V ([`super::generators::v_placement`]).
pub fn wave_placement(p: usize, waves: usize) -> Vec<u32> {
    (0..2 * waves * p)
        .map(|s| {
            let (c, k) = (s / p, s % p);
            if c % 2 == 0 {
                k as u32
            } else {
                (p - 1 - k) as u32
            }
        })
        .collect()
}

/// The greedy's priority of a candidate op, smallest first: (start, 0 for BW / 1 for F,
/// −stage, device).
type Priority = (i64, u8, i64, usize);

/// Hanayo's wave-like pipeline (Liu et al., SC'23, arXiv 2308.15762) with `waves` waves and an
/// unsplit backward. No reference implementation is public, so the order is a reconstruction:
/// deterministic greedy list scheduling with unit costs (F = BW = 1). Each step takes, over all
/// devices and stages, the ready op that can start earliest; ties go to BW before F, then to the
/// deeper stage, then to the lower device. An F is ready when the previous stage's F has ended;
/// a BW when its own F and the next stage's BW have.
pub fn hanayo(p: usize, waves: usize, m: usize) -> Result<Vec<Vec<Action>>, ScheduleError> {
    if waves == 0 {
        return Err(ScheduleError::Malformed(
            "hanayo needs at least one wave (hanayo-<W> with W ≥ 1)".into(),
        ));
    }
    let placement = wave_placement(p, waves);
    let n = placement.len();
    let mut stages_of: Vec<Vec<usize>> = vec![Vec::new(); p];
    for (s, &d) in placement.iter().enumerate() {
        stages_of[d as usize].push(s);
    }
    let mut next_f = vec![0usize; n];
    let mut next_b = vec![0usize; n];
    let mut f_end: Vec<Vec<Option<i64>>> = vec![vec![None; m]; n];
    let mut b_end: Vec<Vec<Option<i64>>> = vec![vec![None; m]; n];
    let mut free = vec![0i64; p];
    let mut out: Vec<Vec<Action>> = vec![Vec::with_capacity(4 * waves * m); p];
    for _ in 0..2 * n * m {
        let mut best: Option<(Priority, ActionKind, usize, usize)> = None;
        let mut offer = |key: Priority, kind, s, j| {
            if best.is_none_or(|b| key < b.0) {
                best = Some((key, kind, s, j));
            }
        };
        for (d, stages) in stages_of.iter().enumerate() {
            for &s in stages {
                let j = next_f[s];
                if j < m {
                    let dep = if s == 0 { Some(0) } else { f_end[s - 1][j] };
                    if let Some(dep) = dep {
                        let start = free[d].max(dep);
                        offer((start, 1, -(s as i64), d), ActionKind::F, s, j);
                    }
                }
                let j = next_b[s];
                if j < m && f_end[s][j].is_some() {
                    let dep = if s + 1 == n {
                        f_end[s][j]
                    } else {
                        b_end[s + 1][j]
                    };
                    if let Some(dep) = dep {
                        let start = free[d].max(dep);
                        offer((start, 0, -(s as i64), d), ActionKind::BW, s, j);
                    }
                }
            }
        }
        let Some(((start, _, _, d), kind, s, j)) = best else {
            return Err(ScheduleError::Malformed(format!(
                "hanayo-{waves}: the greedy order got stuck at p = {p}, m = {m}"
            )));
        };
        let finish = start + 1;
        if kind == ActionKind::F {
            f_end[s][j] = Some(finish);
            next_f[s] += 1;
        } else {
            b_end[s][j] = Some(finish);
            next_b[s] += 1;
        }
        free[d] = finish;
        out[d].push(act(s, kind, j));
    }
    Ok(out)
}

/// BitPipe's second direction (Wu, Chen and Yu, "BitPipe: Bidirectional Interleaved Pipeline
/// Parallelism for Accelerating Large Models Training", AAAI 2025, arXiv 2410.19367; the
/// authors' Megatron-LM fork wuhouming/BitPipe): the model is cut into 2p stages; the down
/// pipeline holds stages s and 2p−1−s on device s (the V of
/// [`super::generators::v_placement`]), the up pipeline the replicas of stages p−1−s and p+s, so
/// every device holds four chunks, two of each direction. Microbatches alternate direction in
/// groups of p/2 (the first p/2 go down).
pub fn bitpipe_reverse(p: usize, m: usize) -> super::Reverse {
    let half = (p / 2).max(1);
    super::Reverse {
        placement: (0..2 * p)
            .map(|s| if s < p { p - 1 - s } else { s - p } as u32)
            .collect(),
        microbatches: (0..m).map(|j| (j / half) % 2 == 1).collect(),
    }
}

/// BitPipe's order (see [`bitpipe_reverse`] for the placement and the directions): the
/// authors' per-device order, re-derived from their schedule code as a rule, with an unsplit
/// backward (BW) as theirs. For p devices (even), m a multiple of p, and rank r:
///
/// - `ν = p/2`, `U = ν − min(r, p−1−r)`, `W = 2p − U` (warm-up forwards).
/// - The rank's own direction is down for r < ν, up otherwise; `A1`/`A2` are the first/second
///   chunk of its own direction on the device, `B1`/`B2` those of the other direction.
/// - Per unit of p microbatches, with `a[i]` and `b[i]` the unit's i-th microbatch of its own
///   and of the other direction, the forward sequence is `A1 a[0..U]`, then `B1 b[i], A1 a[i+U]`
///   for `i < ν−U`, then `B1 b[i+ν−U], B2 b[i]` for `i < U`, then `A2 a[i], B2 b[i+U]` for
///   `i < ν−U`, then `A2 a[i+ν−U]` for `i < U`; the backward sequence is the same with each
///   chunk swapped for the other chunk of its direction (second half first).
/// - The sequences are consumed in the pattern `F^W (F BW)^U`, then per further unit
///   `BW^(W−U+1) (F BW)^(U−1) F^(W−U+1) (F BW)^U`, then `BW^(2p−U)`.
///
/// At m = p its bubble at T_B = 2·T_F is (p−2)/(3m+p−2) (`passes/tests/schedule_papers.rs`);
/// later units are concatenated as in the authors' code, so larger m drain only partly between
/// units.
pub fn bitpipe(p: usize, m: usize) -> Result<Vec<Vec<Action>>, ScheduleError> {
    if p < 2 || !p.is_multiple_of(2) {
        return Err(ScheduleError::Malformed(format!(
            "bitpipe pairs each device with its mirror: it needs an even number of devices, got p = {p}"
        )));
    }
    if !m.is_multiple_of(p) {
        return Err(ScheduleError::Malformed(format!(
            "bitpipe runs units of p microbatches: m must be a multiple of p = {p}, got m = {m}"
        )));
    }
    Ok((0..p).map(|r| bitpipe_rank(p, r, m)).collect())
}

fn bitpipe_rank(p: usize, r: usize, m: usize) -> Vec<Action> {
    let nu = p / 2;
    let u = nu - r.min(p - 1 - r);
    let w = 2 * p - u;
    // Chunks on this device: [direction][half] → stage (direction 0 = down).
    let chunk = [[r, 2 * p - 1 - r], [p - 1 - r, p + r]];
    let own = usize::from(r >= nu);
    let oth = 1 - own;
    // (direction, half, microbatch) per forward, unit by unit.
    let mut fwd: Vec<(usize, usize, usize)> = Vec::with_capacity(2 * m);
    for unit in 0..m / p {
        let dir_mbs = |d: usize| -> Vec<usize> {
            (unit * p..(unit + 1) * p)
                .filter(|&j| usize::from(j % p >= nu) == d)
                .collect()
        };
        let (a, b) = (dir_mbs(own), dir_mbs(oth));
        for &x in &a[..u] {
            fwd.push((own, 0, x));
        }
        for i in 0..nu - u {
            fwd.push((oth, 0, b[i]));
            fwd.push((own, 0, a[i + u]));
        }
        for i in 0..u {
            fwd.push((oth, 0, b[i + nu - u]));
            fwd.push((oth, 1, b[i]));
        }
        for i in 0..nu - u {
            fwd.push((own, 1, a[i]));
            fwd.push((oth, 1, b[i + u]));
        }
        for i in 0..u {
            fwd.push((own, 1, a[i + nu - u]));
        }
    }
    let bwd: Vec<(usize, usize, usize)> = fwd.iter().map(|&(d, h, j)| (d, 1 - h, j)).collect();
    let mut out = Vec::with_capacity(4 * m);
    let (mut fi, mut bi) = (0, 0);
    let mut f = |out: &mut Vec<Action>, n: usize| {
        for _ in 0..n {
            let (d, h, j) = fwd[fi];
            out.push(act(chunk[d][h], ActionKind::F, j));
            fi += 1;
        }
    };
    let mut b = |out: &mut Vec<Action>, n: usize| {
        for _ in 0..n {
            let (d, h, j) = bwd[bi];
            out.push(act(chunk[d][h], ActionKind::BW, j));
            bi += 1;
        }
    };
    f(&mut out, w);
    for _ in 0..u {
        f(&mut out, 1);
        b(&mut out, 1);
    }
    for _ in 1..m / p {
        b(&mut out, w - u + 1);
        for _ in 0..u - 1 {
            f(&mut out, 1);
            b(&mut out, 1);
        }
        f(&mut out, w - u + 1);
        for _ in 0..u {
            f(&mut out, 1);
            b(&mut out, 1);
        }
    }
    b(&mut out, 2 * p - u);
    out
}
