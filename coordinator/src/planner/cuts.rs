//! Choosing where to cut the topological order.
//!
//! A stage is a contiguous range `[a, b)` of nodes in topological order. Its memory is the
//! bytes of the weights its nodes read plus the peak of the activations live while one of its
//! nodes runs; both only grow when a range grows, so "fits the limit" is monotone, which makes
//! the fewest-stages question greedy and lets the dynamic programmes skip ranges that are
//! too big.
//!
//! The objective, in order:
//! 1. every stage fits the memory limit (when there is one);
//! 2. balance: the most expensive stage's cost is within `1 + tolerance` of the best possible
//!    bottleneck (the pipeline runs at the pace of its slowest stage);
//! 3. the fewest bytes crossing the cuts, summed (each crossing is sealed, sent and opened);
//! 4. the smallest bottleneck.
//!
//! A pure "minimise the bottleneck" objective almost never ties on estimated FLOPs, so the
//! crossing bytes would never count; the tolerance band is what lets a cut after a small
//! tensor win over a slightly better balanced cut after a big one.

/// Node-level inputs to the cut choice, all indexed by topological position.
pub(crate) struct CutProblem<'a> {
    /// Estimated FLOPs of each node.
    pub costs: &'a [u64],
    /// Bytes of every activation live while each node runs (its inputs, its outputs, and
    /// anything produced earlier and read later).
    pub live_bytes: &'a [u64],
    /// `crossing_bytes[c]`: bytes of the activations crossing a cut placed before node `c`
    /// (length `n + 1`; entries 0 and `n` are not cuts).
    pub crossing_bytes: &'a [u64],
    /// Each node's weights as `(initializer index, bytes)`, deduplicated per node.
    pub node_weights: &'a [Vec<(usize, u64)>],
    /// Per-stage memory limit, if any.
    pub memory_limit: Option<u64>,
}

/// Why no cut satisfies the constraints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CutError {
    /// This node alone needs `bytes`, over the limit.
    NodeTooLarge { node: usize, bytes: u64 },
    /// Fewer stages than this cannot fit the limit.
    TooFewStages { needed: usize },
}

impl CutProblem<'_> {
    fn node_count(&self) -> usize {
        self.costs.len()
    }

    /// `reach[a]`: the largest `b` such that stage `[a, b)` fits the memory limit.
    fn reach(&self) -> Result<Vec<usize>, CutError> {
        let n = self.node_count();
        let Some(limit) = self.memory_limit else {
            return Ok(vec![n; n]);
        };
        for node in 0..n {
            let bytes = self.node_memory(node);
            if bytes > limit {
                return Err(CutError::NodeTooLarge { node, bytes });
            }
        }
        // Two pointers over [a, b): weights are counted once per stage however many of its
        // nodes read them, hence the reference counts.
        let peaks = RangeMax::new(self.live_bytes);
        let mut readers = std::collections::HashMap::<usize, usize>::new();
        let mut weight_bytes = 0u64;
        let mut reach = Vec::with_capacity(n);
        let mut b = 0;
        for a in 0..n {
            if a > 0 {
                for &(id, bytes) in &self.node_weights[a - 1] {
                    if let Some(count) = readers.get_mut(&id) {
                        *count -= 1;
                        if *count == 0 {
                            readers.remove(&id);
                            weight_bytes -= bytes;
                        }
                    }
                }
            }
            if b < a {
                b = a;
            }
            while b < n {
                let added: u64 = self.node_weights[b]
                    .iter()
                    .filter(|(id, _)| !readers.contains_key(id))
                    .map(|&(_, bytes)| bytes)
                    .sum();
                let total = weight_bytes
                    .saturating_add(added)
                    .saturating_add(peaks.max(a, b + 1));
                if total > limit && b > a {
                    break;
                }
                for &(id, _) in &self.node_weights[b] {
                    *readers.entry(id).or_insert(0) += 1;
                }
                weight_bytes += added;
                b += 1;
            }
            reach.push(b);
        }
        Ok(reach)
    }

    /// What a stage holding only this node needs.
    pub(crate) fn node_memory(&self, node: usize) -> u64 {
        let weights: u64 = self.node_weights[node]
            .iter()
            .map(|&(_, bytes)| bytes)
            .sum();
        weights.saturating_add(self.live_bytes[node])
    }

    /// The fewest stages that each fit the memory limit (1 without a limit). Greedy is optimal
    /// because fitting is monotone: taking as many nodes as fit never hurts later stages.
    pub(crate) fn fewest_stages(&self) -> Result<usize, CutError> {
        let reach = self.reach()?;
        let mut stages = 0;
        let mut a = 0;
        while a < self.node_count() {
            a = reach[a];
            stages += 1;
        }
        Ok(stages)
    }

    /// Stage boundaries `[0, c1, ..., n]` for `stages` stages, by the objective in the module
    /// doc. `stages` must be between 1 and the node count.
    pub(crate) fn choose(&self, stages: usize, tolerance: f64) -> Result<Vec<usize>, CutError> {
        let n = self.node_count();
        let reach = self.reach()?;
        let mut fewest = 0;
        let mut a = 0;
        while a < n {
            a = reach[a];
            fewest += 1;
        }
        if stages < fewest {
            return Err(CutError::TooFewStages { needed: fewest });
        }
        let mut prefix = vec![0u64; n + 1];
        for (i, &cost) in self.costs.iter().enumerate() {
            prefix[i + 1] = prefix[i].saturating_add(cost);
        }
        let cost = |a: usize, b: usize| prefix[b] - prefix[a];

        // Pass 1: the smallest achievable bottleneck.
        let bottleneck = self.layered_min(
            stages,
            &reach,
            |_, _| true,
            |best: u64, a, b| best.max(cost(a, b)),
        );
        let Some((best_bottleneck, _)) = bottleneck else {
            return Err(CutError::TooFewStages { needed: fewest });
        };

        // Pass 2: within the balance band, fewest crossing bytes, then smallest bottleneck.
        let slack = (best_bottleneck as f64 * tolerance).min(u64::MAX as f64) as u64;
        let bound = best_bottleneck.saturating_add(slack);
        let chosen = self.layered_min(
            stages,
            &reach,
            |a, b| cost(a, b) <= bound,
            |(crossing, worst): (u64, u64), a, b| {
                let cut = if a > 0 { self.crossing_bytes[a] } else { 0 };
                (crossing.saturating_add(cut), worst.max(cost(a, b)))
            },
        );
        match chosen {
            Some((_, boundaries)) => Ok(boundaries),
            // Unreachable in practice: the pass-1 optimum lies within the band.
            None => Err(CutError::TooFewStages { needed: fewest }),
        }
    }

    /// Dynamic programme over "first `j` stages end at `b`". `extend(score, a, b)` scores
    /// adding stage `[a, b)` to a prefix scored `score`; it must be monotone in `score` for
    /// the result to be optimal. Returns the best score and its boundaries.
    fn layered_min<S: Copy + Ord + Default>(
        &self,
        stages: usize,
        reach: &[usize],
        allowed: impl Fn(usize, usize) -> bool,
        extend: impl Fn(S, usize, usize) -> S,
    ) -> Option<(S, Vec<usize>)> {
        let n = self.node_count();
        // best[j][b]: best score for nodes [0, b) in j stages; parent[j][b]: where stage j began.
        let mut best: Vec<Vec<Option<S>>> = vec![vec![None; n + 1]; stages + 1];
        let mut parent = vec![vec![0usize; n + 1]; stages + 1];
        best[0][0] = Some(S::default());
        for j in 1..=stages {
            // Leave at least one node for each later stage.
            let last_end = n - (stages - j);
            for a in (j - 1)..last_end {
                let Some(score) = best[j - 1][a] else {
                    continue;
                };
                for b in (a + 1)..=reach[a].min(last_end) {
                    if !allowed(a, b) {
                        continue;
                    }
                    let candidate = extend(score, a, b);
                    if best[j][b].is_none_or(|current| candidate < current) {
                        best[j][b] = Some(candidate);
                        parent[j][b] = a;
                    }
                }
            }
        }
        let score = best[stages][n]?;
        let mut boundaries = vec![n];
        let mut b = n;
        for j in (1..=stages).rev() {
            b = parent[j][b];
            boundaries.push(b);
        }
        boundaries.reverse();
        Some((score, boundaries))
    }
}

/// Constant-time maximum over any range of a fixed slice (a sparse table).
pub(crate) struct RangeMax {
    levels: Vec<Vec<u64>>,
}

impl RangeMax {
    pub(crate) fn new(values: &[u64]) -> Self {
        let mut levels = vec![values.to_vec()];
        let mut width = 1;
        while width * 2 <= values.len() {
            let previous = &levels[levels.len() - 1];
            let next = (0..=values.len() - width * 2)
                .map(|i| previous[i].max(previous[i + width]))
                .collect();
            levels.push(next);
            width *= 2;
        }
        Self { levels }
    }

    /// The maximum of `values[a..b]`, 0 for an empty range.
    pub(crate) fn max(&self, a: usize, b: usize) -> u64 {
        if b <= a {
            return 0;
        }
        let level = (usize::BITS - 1 - (b - a).leading_zeros()) as usize;
        let row = &self.levels[level];
        row[a].max(row[b - (1 << level)])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests may unwrap.
mod tests {
    use super::*;

    fn problem<'a>(
        costs: &'a [u64],
        live: &'a [u64],
        crossing: &'a [u64],
        weights: &'a [Vec<(usize, u64)>],
        limit: Option<u64>,
    ) -> CutProblem<'a> {
        CutProblem {
            costs,
            live_bytes: live,
            crossing_bytes: crossing,
            node_weights: weights,
            memory_limit: limit,
        }
    }

    #[test]
    fn range_max_matches_a_scan() {
        let values = [3, 9, 1, 4, 4, 7, 0, 2, 8, 5, 6];
        let table = RangeMax::new(&values);
        for a in 0..values.len() {
            for b in a..=values.len() {
                let scan = values[a..b].iter().copied().max().unwrap_or(0);
                assert_eq!(table.max(a, b), scan, "range {a}..{b}");
            }
        }
    }

    #[test]
    fn balance_wins_when_crossing_bytes_are_equal() {
        let costs = [10, 10, 10, 10];
        let live = [0; 4];
        let crossing = [0, 5, 5, 5, 0];
        let weights = vec![Vec::new(); 4];
        let p = problem(&costs, &live, &crossing, &weights, None);
        assert_eq!(p.choose(2, 0.1).unwrap(), vec![0, 2, 4]);
    }

    #[test]
    fn within_the_band_the_smaller_crossing_wins_and_outside_it_balance_wins() {
        // Cutting before node 2 is perfectly balanced (20/21) but 1000 bytes cross;
        // before node 3 is 30/11 with 10 bytes crossing.
        let costs = [10, 10, 10, 11];
        let live = [0; 4];
        let crossing = [0, 1000, 1000, 10, 0];
        let weights = vec![Vec::new(); 4];
        let p = problem(&costs, &live, &crossing, &weights, None);
        assert_eq!(p.choose(2, 0.5).unwrap(), vec![0, 3, 4]);
        assert_eq!(p.choose(2, 0.1).unwrap(), vec![0, 2, 4]);
    }

    #[test]
    fn shared_weights_count_once_per_stage() {
        // Nodes 0 and 1 share a 60-byte weight: together they need 60, not 120.
        let costs = [1, 1, 1];
        let live = [0; 3];
        let crossing = [0; 4];
        let weights = vec![vec![(0, 60)], vec![(0, 60)], vec![(1, 60)]];
        let p = problem(&costs, &live, &crossing, &weights, Some(100));
        assert_eq!(p.fewest_stages().unwrap(), 2);
        assert_eq!(p.choose(2, 0.1).unwrap(), vec![0, 2, 3]);
        assert_eq!(p.choose(1, 0.1), Err(CutError::TooFewStages { needed: 2 }));
    }

    #[test]
    fn a_node_over_the_limit_is_named() {
        let costs = [1, 1];
        let live = [10, 500];
        let crossing = [0; 3];
        let weights = vec![Vec::new(), vec![(0, 20)]];
        let p = problem(&costs, &live, &crossing, &weights, Some(100));
        assert_eq!(
            p.fewest_stages(),
            Err(CutError::NodeTooLarge {
                node: 1,
                bytes: 520
            })
        );
    }
}
