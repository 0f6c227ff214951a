//! `rounds`: a round-based greedy with lookahead, after the Zero Bubble paper's automatic
//! scheduler (reference: `docs/reference/zero-bubble-tables.md` §5, written from its
//! `auto_schedule.py`; this is cleave's own implementation, with per-stage costs and memory).
//!
//! Where [`super::auto::greedy`] advances devices in time order and decides one action at a
//! time, this builder decides a whole *round* at once, one microbatch per round, with an estimate
//! of when the next gradient reaches each stage:
//!
//! 1. **Warm-up.** Every stage runs F0. Going from the last stage to the first, the arrival time
//!    of B0's gradient at each stage is estimated, and the stage gets as many extra F as fit in
//!    memory before it (with [`RoundFlags::bubble_before_first_b`], stop before an F that would
//!    end after the arrival: a bubble smaller than T_F, B0 not delayed; without it, keep adding
//!    while the clock is before the arrival). Counts then decrease strictly from the first stage
//!    to the last, all stages place their F, then B0 from the last stage to the first.
//! 2. **Rounds.** Each stage decides whether to start an F (with [`RoundFlags::prioritize_b`], a
//!    stage two or more F ahead of the next skips it when the next gradient arrives before that F
//!    and the W that make room for it would end, unless waiting would raise the largest
//!    accumulated bubble); a stage starts an F only if the next stage does. F are placed from the
//!    first stage to the last, then one B per stage from the last to the first. Before each F or
//!    B, pending W fill the wait for its input: every W that ends by the arrival, then one more
//!    that overruns it when the remaining gap would raise the largest accumulated bubble (or
//!    always, with [`RoundFlags::fill_any_gap`]). W also run whenever memory blocks the next F
//!    or B. On the first stage, once its F are done, all pending W run before each B (nothing
//!    waits for that B).
//! 3. The remaining W close every list.
//!
//! A stage's *accumulated bubble* is the idle time it has met since its first F. The builder's
//! times are estimates of the same rules the simulator applies; candidates are always judged by
//! the simulator.

use super::action::{Action, ActionKind};
use super::simulate::{Costs, Memory};
use super::Schedule;

const EPS: f64 = 1e-9;

/// The switches of the round-based greedy (all 8 combinations are tried by `auto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundFlags {
    /// In warm-up, stop before an F that would end after the first gradient arrives.
    pub bubble_before_first_b: bool,
    /// Let a stage far enough ahead skip an F to run the next B sooner.
    pub prioritize_b: bool,
    /// Fill every remaining gap with one more W, even one that does not raise the worst bubble.
    pub fill_any_gap: bool,
}

impl RoundFlags {
    /// The candidate's name in `auto`'s report, e.g. `rounds[TFT]`.
    pub fn tag(self) -> String {
        let b = |x: bool| if x { 'T' } else { 'F' };
        format!(
            "rounds[{}{}{}]",
            b(self.bubble_before_first_b),
            b(self.prioritize_b),
            b(self.fill_any_gap)
        )
    }

    /// The 8 combinations, in a fixed order.
    pub fn all() -> impl Iterator<Item = RoundFlags> {
        (0..8u8).map(|bits| RoundFlags {
            bubble_before_first_b: bits & 1 == 0,
            prioritize_b: bits & 2 == 0,
            fill_any_gap: bits & 4 == 0,
        })
    }
}

/// One stage's state while the lists are built.
struct Stage {
    clock: f64,
    bubble: f64,
    started: bool,
    nf: usize,
    nb: usize,
    nw: usize,
    mem: f64,
    end_f: Vec<f64>,
    end_b: Vec<f64>,
    list: Vec<Action>,
}

struct Builder<'a> {
    p: usize,
    m: usize,
    costs: &'a Costs,
    memory: &'a Memory,
    limit: f64,
    flags: RoundFlags,
    st: Vec<Stage>,
}

/// Builds the round-based greedy schedule for `p` stages (one per device) and `m` microbatches;
/// `None` when memory cannot hold what the rounds need (the limit is too small).
pub fn rounds(
    p: usize,
    m: usize,
    costs: &Costs,
    memory: &Memory,
    limit: f64,
    flags: RoundFlags,
) -> Option<Schedule> {
    rounds_with(p, m, costs, memory, limit, flags, None).map(|(s, _)| s)
}

/// [`rounds`] with the warm-up's extra F per stage given (`warm_up[s]` F after F0 before B0 on
/// stage `s`, at most what is left) instead of estimated; also returns the counts used, so that
/// a search can start from the estimate and move them.
pub fn rounds_with(
    p: usize,
    m: usize,
    costs: &Costs,
    memory: &Memory,
    limit: f64,
    flags: RoundFlags,
    warm_up: Option<&[usize]>,
) -> Option<(Schedule, Vec<usize>)> {
    if p == 0 || m == 0 || costs.stages.len() != p || memory.stages.len() != p {
        return None;
    }
    let st = (0..p)
        .map(|_| Stage {
            clock: 0.0,
            bubble: 0.0,
            started: false,
            nf: 0,
            nb: 0,
            nw: 0,
            mem: 0.0,
            end_f: vec![f64::NAN; m],
            end_b: vec![f64::NAN; m],
            list: Vec::with_capacity(3 * m),
        })
        .collect();
    let mut b = Builder {
        p,
        m,
        costs,
        memory,
        limit,
        flags,
        st,
    };
    let counts = b.warm_up(warm_up)?;
    // Each round places at least one action while F or B remain; a round without progress
    // means the rules are stuck (it cannot happen with consistent inputs, but never loop).
    while b.st.iter().any(|s| s.nb < m) {
        let before: usize = b.st.iter().map(|s| s.list.len()).sum();
        b.round()?;
        let after: usize = b.st.iter().map(|s| s.list.len()).sum();
        if after == before {
            return None;
        }
    }
    for s in 0..p {
        while b.st[s].nw < m {
            b.place(s, ActionKind::W);
        }
    }
    let schedule = Schedule {
        devices: b.st.into_iter().map(|s| s.list).collect(),
        placement: (0..p as u32).collect(),
        microbatches: m,
        reverse: None,
    };
    Some((schedule, counts))
}

impl Builder<'_> {
    fn m_b(&self, s: usize) -> f64 {
        self.memory.stages[s].m_b
    }

    fn m_w(&self, s: usize) -> f64 {
        self.memory.stages[s].m_w
    }

    /// When the input of stage `s`'s next action of `kind` is available (NaN: not placed yet).
    fn input_ready(&self, s: usize, kind: ActionKind) -> f64 {
        let st = &self.st[s];
        let comm = self.costs.comm;
        match kind {
            ActionKind::F if s == 0 => 0.0,
            ActionKind::F => self.st[s - 1]
                .end_f
                .get(st.nf)
                .map_or(f64::NAN, |e| e + comm),
            ActionKind::B if s + 1 == self.p => st.end_f.get(st.nb).copied().unwrap_or(f64::NAN),
            ActionKind::B => self.st[s + 1]
                .end_b
                .get(st.nb)
                .map_or(f64::NAN, |e| e + comm),
            _ => st.end_b.get(st.nw).copied().unwrap_or(f64::NAN),
        }
    }

    /// Whether stage `s` can place its next action of `kind` now.
    fn can_place(&self, s: usize, kind: ActionKind) -> bool {
        let st = &self.st[s];
        let left = match kind {
            ActionKind::F => st.nf < self.m,
            ActionKind::B => st.nb < st.nf,
            _ => st.nw < st.nb,
        };
        left && !self.input_ready(s, kind).is_nan()
    }

    /// Places stage `s`'s next action of `kind` (its input must be placed).
    fn place(&mut self, s: usize, kind: ActionKind) {
        let ready = self.input_ready(s, kind);
        let c = self.costs.stages[s];
        let (m_b, m_w) = (self.m_b(s), self.m_w(s));
        let st = &mut self.st[s];
        let start = st.clock.max(ready);
        if st.started && start > st.clock {
            st.bubble += start - st.clock;
        }
        let (j, end) = match kind {
            ActionKind::F => {
                st.started = true;
                st.mem += m_b;
                st.nf += 1;
                (st.nf - 1, start + c.f)
            }
            ActionKind::B => {
                st.mem += m_w - m_b;
                st.nb += 1;
                (st.nb - 1, start + c.b)
            }
            _ => {
                st.mem -= m_w;
                st.nw += 1;
                (st.nw - 1, start + c.w)
            }
        };
        match kind {
            ActionKind::F => st.end_f[j] = end,
            ActionKind::B => st.end_b[j] = end,
            _ => {}
        }
        st.clock = end;
        st.list.push(Action::new(s as u32, kind, j as u32));
    }

    fn max_bubble(&self) -> f64 {
        self.st.iter().map(|s| s.bubble).fold(0.0, f64::max)
    }

    /// Runs pending W on stage `s` until an action adding `delta` fits; false if it cannot.
    fn make_room(&mut self, s: usize, delta: f64) -> bool {
        while self.st[s].mem + delta > self.limit + EPS {
            if !self.can_place(s, ActionKind::W) {
                return false;
            }
            self.place(s, ActionKind::W);
        }
        true
    }

    /// Fills stage `s`'s wait until `arrival` with pending W (module docs, step 2).
    fn fill_gap(&mut self, s: usize, arrival: f64) {
        let t_w = self.costs.stages[s].w;
        while self.can_place(s, ActionKind::W) && self.st[s].clock + t_w <= arrival + EPS {
            self.place(s, ActionKind::W);
        }
        let gap = arrival - self.st[s].clock;
        if gap > EPS
            && self.can_place(s, ActionKind::W)
            && (self.flags.fill_any_gap || gap > self.max_bubble() - self.st[s].bubble + EPS)
        {
            self.place(s, ActionKind::W);
        }
    }

    fn warm_up(&mut self, given: Option<&[usize]>) -> Option<Vec<usize>> {
        let (p, m) = (self.p, self.m);
        let comm = self.costs.comm;
        for s in 0..p {
            if !self.make_room(s, self.m_b(s)) {
                return None;
            }
            self.place(s, ActionKind::F);
        }
        // Extra F per stage, estimated from the last stage to the first.
        let mut extra = vec![0usize; p];
        let mut b0_end = self.st[p - 1].clock + self.costs.stages[p - 1].b;
        for s in (0..p - 1).rev() {
            let arrival = b0_end + comm;
            let t_f = self.costs.stages[s].f;
            let (mut clock, mut mem, mut k) = (self.st[s].clock, self.st[s].mem, 0usize);
            while 1 + k < m && mem + self.m_b(s) <= self.limit + EPS {
                let stop = if self.flags.bubble_before_first_b {
                    clock + t_f > arrival + EPS
                } else {
                    clock >= arrival - EPS
                };
                if stop {
                    break;
                }
                clock += t_f;
                mem += self.m_b(s);
                k += 1;
            }
            extra[s] = k;
            b0_end = clock.max(arrival) + self.costs.stages[s].b;
        }
        for s in 1..p {
            if extra[s] >= extra[s - 1] {
                extra[s] = extra[s - 1].saturating_sub(1);
            }
        }
        if let Some(given) = given {
            for (e, &g) in extra.iter_mut().zip(given) {
                *e = g.min(m - 1);
            }
        }
        for (s, k) in extra.iter_mut().enumerate() {
            for placed in 0..*k {
                if !self.can_place(s, ActionKind::F) {
                    *k = placed;
                    break;
                }
                if !self.make_room(s, self.m_b(s)) {
                    return None;
                }
                self.place(s, ActionKind::F);
            }
        }
        for s in (0..p).rev() {
            if !self.make_room(s, self.m_w(s) - self.m_b(s)) {
                return None;
            }
            self.place(s, ActionKind::B);
        }
        Some(extra)
    }

    /// One round: at most one F and one B per stage.
    fn round(&mut self) -> Option<()> {
        let p = self.p;
        let comm = self.costs.comm;
        let mut take: Vec<bool> = self.st.iter().map(|s| s.nf < self.m).collect();
        if self.flags.prioritize_b {
            let worst = self.max_bubble();
            for (s, t) in take.iter_mut().enumerate().take(p - 1) {
                let (me, next) = (&self.st[s], &self.st[s + 1]);
                if !*t || me.nf < next.nf + 2 {
                    continue;
                }
                let cn = self.costs.stages[s + 1];
                let next_f = if next.nf < self.m { cn.f } else { 0.0 };
                let x = next.clock + next_f + cn.b + comm;
                if me.clock >= x - EPS {
                    *t = false;
                    continue;
                }
                let c = self.costs.stages[s];
                let over = me.mem + self.m_b(s) - self.limit;
                let ws = if over <= EPS {
                    0.0
                } else if self.m_w(s) > 0.0 {
                    (over / self.m_w(s) - EPS).ceil()
                } else {
                    f64::INFINITY
                };
                if me.clock + c.f + ws * c.w <= x + EPS {
                    continue;
                }
                if x - me.clock <= worst - me.bubble + EPS {
                    *t = false;
                }
            }
        }
        for s in (0..p - 1).rev() {
            take[s] = take[s] && take[s + 1];
        }
        for (s, &t) in take.iter().enumerate() {
            if !t || !self.can_place(s, ActionKind::F) {
                continue;
            }
            if !self.make_room(s, self.m_b(s)) {
                return None;
            }
            if s > 0 {
                let arrival = self.input_ready(s, ActionKind::F);
                self.fill_gap(s, arrival);
            }
            self.place(s, ActionKind::F);
        }
        for s in (0..p).rev() {
            if !self.can_place(s, ActionKind::B) {
                continue;
            }
            if !self.make_room(s, self.m_w(s) - self.m_b(s)) {
                return None;
            }
            if s + 1 < p {
                let arrival = self.input_ready(s, ActionKind::B);
                self.fill_gap(s, arrival);
            }
            if s == 0 && self.st[0].nf == self.m {
                while self.can_place(0, ActionKind::W) {
                    self.place(0, ActionKind::W);
                }
            }
            self.place(s, ActionKind::B);
        }
        Some(())
    }
}
