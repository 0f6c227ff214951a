//! Fusion groups and the kernel order, as graph questions answered with `petgraph`.
//!
//! The input is the plan's kernels-to-be in body order ([`Cand`]s: one per elementwise node,
//! single kernel or folded update), each with the candidates it reads. Elementwise nodes of one
//! element count are merged into groups greedily in body order, not only when they are
//! consecutive: a node joins the group of one of its producers (across other kernels, when all
//! else it reads is made before the group's last member, so the node moves up into the group
//! and holds nothing back), or the group just before it, when that keeps the kernel graph
//! acyclic, i.e. when no path leads from the group to the node through a kernel outside the
//! group (then the group would have to run both before and after that kernel). The kernel graph
//! is a `DiGraph` whose groups are made strongly connected (an edge each way between a new
//! member and the group's first), so acyclicity is one reachability search backwards from the
//! node's outside producers (a `Dfs` on the `Reversed` graph).
//!
//! The kernel order is then a topological order of the `condensation` of that graph (each
//! strongly connected component one kernel), by Kahn's algorithm with a kernel's first member's
//! body position as priority, so kernels keep their body order where dependences allow. That the
//! components are exactly the groups is checked (a component holding two kernels would mean the
//! greedy check let a cycle through).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use cleave_ir::Value;
use petgraph::algo::condensation;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, Reversed};
use petgraph::Direction;

/// One kernel-to-be: an elementwise node that may join a group, or a kernel of its own.
#[derive(Clone, Debug)]
pub(crate) struct Cand {
    /// Position in the function body (a topological order).
    pub pos: usize,
    /// `Some(n)`: an elementwise node over `n` elements, which may be fused.
    pub fusible: Option<usize>,
    /// The candidates whose results this one reads, or that must run before it.
    pub deps: Vec<usize>,
    /// The value a fusible candidate computes.
    pub result: Option<Value>,
    /// Values that must not be computed in the same group (read through a strided view: the
    /// group would load positions it has not stored yet).
    pub avoid: Vec<Value>,
}

/// The kernels in execution order, each the indices of its candidates in body order.
/// `fuse`: merge elementwise nodes at all; `max_group`: the most nodes one group takes.
pub(crate) fn kernels(cands: &[Cand], fuse: bool, max_group: usize) -> Vec<Vec<usize>> {
    let n = cands.len();
    // Node weights: candidate indices (they survive the condensation).
    let mut g: DiGraph<usize, ()> = DiGraph::with_capacity(n, n * 2);
    for i in 0..n {
        g.add_node(i);
    }
    for (c, cand) in cands.iter().enumerate() {
        for &d in &cand.deps {
            debug_assert!(d < c, "dependences follow the body order");
            g.add_edge(NodeIndex::new(d), NodeIndex::new(c), ());
        }
    }
    // The group of each candidate, named by its first member.
    let mut group_of: Vec<usize> = (0..n).collect();
    let mut members: Vec<Vec<usize>> = (0..n).map(|i| vec![i]).collect();
    let mut values: HashMap<usize, HashSet<Value>> = HashMap::new();
    let mut latest: HashMap<usize, usize> = HashMap::new();
    for x in 0..n {
        let Some(nx) = cands[x].fusible.filter(|_| fuse) else {
            continue;
        };
        // Producers' groups first (the value then never leaves registers), latest first; then
        // the latest group of this element count.
        let mut options: Vec<usize> = Vec::new();
        let mut deps: Vec<usize> = cands[x].deps.clone();
        deps.sort_by_key(|&d| Reverse(cands[d].pos));
        for d in deps {
            let r = group_of[d];
            if cands[r].fusible == Some(nx)
                && !options.contains(&r)
                && hoistable(cands, &group_of, &members[r], r, x)
            {
                options.push(r);
            }
        }
        // An unrelated group only when nothing came between: joining it across other kernels
        // would hold its inputs live until this node's place (it would undo the memory saving
        // of a chunked output layer, whose K chunks run the same elementwise ops one after
        // the other).
        if let Some(&r) = latest.get(&nx) {
            if x > 0 && group_of[x - 1] == r && !options.contains(&r) {
                options.push(r);
            }
        }
        let chosen = options.into_iter().find(|&r| {
            members[r].len() < max_group
                && !conflicts(&cands[x], values.get(&r))
                && !reaches_outside(&g, &group_of, &cands[x].deps, r)
        });
        let r = match chosen {
            Some(r) => {
                members[r].push(x);
                group_of[x] = r;
                g.add_edge(NodeIndex::new(x), NodeIndex::new(r), ());
                g.add_edge(NodeIndex::new(r), NodeIndex::new(x), ());
                r
            }
            None => x,
        };
        if let Some(v) = cands[x].result {
            values.entry(r).or_default().insert(v);
        }
        latest.insert(nx, r);
    }
    order(g, cands, &group_of, &members)
}

/// True if everything `x` needs from outside group `r` is made before the group's last member,
/// so that `x` can move up into the group without holding the group (and the kernels reading
/// it) back: joining a group further away would keep the group's inputs live until `x`'s place
/// (measured: it undid the memory saving of a chunked output layer).
fn hoistable(cands: &[Cand], group_of: &[usize], members: &[usize], r: usize, x: usize) -> bool {
    let last = members.iter().map(|&m| cands[m].pos).max().unwrap_or(0);
    cands[x]
        .deps
        .iter()
        .all(|&d| group_of[d] == r || cands[d].pos <= last)
}

/// True if `x` reads through a view a value that group `r` computes.
fn conflicts(x: &Cand, computed: Option<&HashSet<Value>>) -> bool {
    computed.is_some_and(|vals| x.avoid.iter().any(|v| vals.contains(v)))
}

/// True if a path leads from group `r` to `x` through a candidate outside `r`: searched backwards
/// from `x`'s producers outside `r`. The search is not bounded by body positions: a group's
/// edges run both ways, so a path may step back to a group's earlier members.
fn reaches_outside(g: &DiGraph<usize, ()>, group_of: &[usize], deps: &[usize], r: usize) -> bool {
    let reversed = Reversed(g);
    let mut starts = deps.iter().copied().filter(|&d| group_of[d] != r);
    let Some(first) = starts.next() else {
        return false;
    };
    let mut dfs = Dfs::new(reversed, NodeIndex::new(first));
    dfs.stack.extend(starts.map(NodeIndex::new));
    while let Some(i) = dfs.next(reversed) {
        if group_of[i.index()] == r {
            return true;
        }
    }
    false
}

/// The kernels (groups) in a topological order of the condensed graph, by Kahn's algorithm
/// with each kernel's first body position as priority.
fn order(
    g: DiGraph<usize, ()>,
    cands: &[Cand],
    group_of: &[usize],
    members: &[Vec<usize>],
) -> Vec<Vec<usize>> {
    let cond = condensation(g, true);
    let mut indegree: Vec<usize> = cond
        .node_indices()
        .map(|c| cond.neighbors_directed(c, Direction::Incoming).count())
        .collect();
    let key = |c: NodeIndex| -> usize { cond[c].iter().map(|&i| cands[i].pos).min().unwrap_or(0) };
    let mut ready: BinaryHeap<Reverse<(usize, usize)>> = cond
        .node_indices()
        .filter(|c| indegree[c.index()] == 0)
        .map(|c| Reverse((key(c), c.index())))
        .collect();
    let mut out = Vec::with_capacity(cond.node_count());
    while let Some(Reverse((_, c))) = ready.pop() {
        let c = NodeIndex::new(c);
        let first = group_of[cond[c][0]];
        assert!(
            cond[c].len() == members[first].len() && cond[c].iter().all(|&i| group_of[i] == first),
            "fusion made a cycle through kernels outside a group"
        );
        out.push(members[first].clone());
        for s in cond.neighbors_directed(c, Direction::Outgoing) {
            indegree[s.index()] -= 1;
            if indegree[s.index()] == 0 {
                ready.push(Reverse((key(s), s.index())));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{kernels, Cand};

    fn ew(pos: usize, deps: &[usize]) -> Cand {
        Cand {
            pos,
            fusible: Some(8),
            deps: deps.to_vec(),
            result: None,
            avoid: Vec::new(),
        }
    }

    fn single(pos: usize, deps: &[usize]) -> Cand {
        Cand {
            fusible: None,
            ..ew(pos, deps)
        }
    }

    #[test]
    fn elementwise_nodes_fuse_across_an_unrelated_kernel() {
        // 0 → 2, with 1 (a GEMM reading only the input) in between: one group {0, 2}, then 1.
        let c = [ew(0, &[]), single(1, &[]), ew(2, &[0])];
        // 2 moves up into 0's group, before the GEMM.
        assert_eq!(kernels(&c, true, 48), vec![vec![0, 2], vec![1]]);
        // Not when it also reads the GEMM: the group would wait for the GEMM.
        let c = [ew(0, &[]), single(1, &[]), ew(2, &[0, 1])];
        assert_eq!(kernels(&c, true, 48), vec![vec![0], vec![1], vec![2]]);
        // An unrelated node after another kernel starts a group of its own.
        let c = [ew(0, &[]), single(1, &[]), ew(2, &[])];
        assert_eq!(kernels(&c, true, 48), vec![vec![0], vec![1], vec![2]]);
        // Without fusion every candidate is its own kernel, in body order.
        assert_eq!(kernels(&c, false, 48), vec![vec![0], vec![1], vec![2]]);
    }

    #[test]
    fn a_path_through_another_kernel_keeps_the_groups_apart() {
        // 0 → 1 (GEMM) → 2: fusing 0 and 2 would need the group before and after the GEMM.
        let c = [ew(0, &[]), single(1, &[0]), ew(2, &[1, 0])];
        assert_eq!(kernels(&c, true, 48), vec![vec![0], vec![1], vec![2]]);
        // Also when the path runs through a group: 0 → 1 (GEMM) → 3, 2 → 3 joined to 3's
        // group.
        let c = [
            ew(0, &[]),
            single(1, &[0]),
            ew(2, &[1]),
            ew(3, &[0]),
            single(4, &[2, 3]),
        ];
        let k = kernels(&c, true, 48);
        let pos = |i: usize| k.iter().position(|g| g.contains(&i)).unwrap();
        assert!(pos(0) < pos(1) && pos(1) < pos(2) && pos(2) <= pos(4));
        assert_ne!(pos(0), pos(2), "{k:?}");
    }

    #[test]
    fn a_path_back_through_a_group_is_found() {
        // 0 a = exp; 1 GEMM; 2 r = neg (its own group, after the GEMM); 3 b = log a and
        // 4 c = add b, r join a's group; 5 x = mul r, a must not join r's group: a path leads
        // from r through a's group (4 reads r) back to x (x reads a).
        let c = [
            ew(0, &[]),
            single(1, &[]),
            ew(2, &[]),
            ew(3, &[0]),
            ew(4, &[3, 2]),
            ew(5, &[2, 0]),
        ];
        let k = kernels(&c, true, 48);
        let at = |i: usize| k.iter().position(|g| g.contains(&i)).unwrap();
        assert_eq!(k.iter().map(Vec::len).sum::<usize>(), 6, "{k:?}");
        assert!(at(2) <= at(4) && at(0) <= at(5), "{k:?}");
    }

    #[test]
    fn views_and_group_sizes_limit_a_group() {
        let mut v = ew(1, &[0]);
        v.avoid = vec![cleave_ir::Value::from_u32(0)];
        let mut a = ew(0, &[]);
        a.result = Some(cleave_ir::Value::from_u32(0));
        assert_eq!(kernels(&[a, v], true, 48), vec![vec![0], vec![1]]);
        let c: Vec<Cand> = (0..5).map(|i| ew(i, &[])).collect();
        assert_eq!(kernels(&c, true, 2), vec![vec![0, 1], vec![2, 3], vec![4]]);
    }
}
