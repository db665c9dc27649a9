//! Which positions rollbacks have superseded.
//!
//! A rollback record at position `R` naming target `P` supersedes every position in `(P, R)`.
//! Superseded events stay in the log (nothing acknowledged is ever deleted) but are not part of
//! the live log any more: reads skip them unless asked, subscriptions never deliver them again.
//! Ranges of successive rollbacks may nest or overlap; they are kept merged.

/// One rollback: the record's position and its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollbackEntry {
    /// Position of the `lockstep.rollback` record.
    pub at: u64,
    /// The position replicas return to.
    pub target: u64,
}

/// The rollbacks in the log and the merged ranges of positions they supersede.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Superseded {
    rollbacks: Vec<RollbackEntry>,
    /// Disjoint inclusive ranges `[first, last]`, sorted, not adjacent.
    ranges: Vec<(u64, u64)>,
}

impl Superseded {
    /// The rollbacks in the order of their records.
    pub fn from_rollbacks(rollbacks: impl IntoIterator<Item = RollbackEntry>) -> Self {
        let mut out = Self::default();
        for rollback in rollbacks {
            out.add(rollback);
        }
        out
    }

    /// Every rollback, oldest first.
    pub fn rollbacks(&self) -> &[RollbackEntry] {
        &self.rollbacks
    }

    /// Whether nothing is superseded (no rollback yet, or only empty ones).
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether `position` is superseded.
    pub fn contains(&self, position: u64) -> bool {
        self.range_of(position).is_some()
    }

    /// The merged range `[first, last]` holding `position`, if it is superseded.
    pub fn range_of(&self, position: u64) -> Option<(u64, u64)> {
        let index = self.ranges.partition_point(|&(_, last)| last < position);
        self.ranges
            .get(index)
            .copied()
            .filter(|&(first, _)| first <= position)
    }

    /// How many positions are superseded.
    pub fn count(&self) -> u64 {
        self.ranges
            .iter()
            .map(|(first, last)| last - first + 1)
            .sum()
    }

    /// How many positions in `(after, up_to]` are superseded.
    pub fn count_between(&self, after: u64, up_to: u64) -> u64 {
        self.ranges
            .iter()
            .map(|&(first, last)| {
                let (lo, hi) = (first.max(after + 1), last.min(up_to));
                if hi >= lo { hi - lo + 1 } else { 0 }
            })
            .sum()
    }

    /// The first live position after `after`.
    pub fn next_live(&self, after: u64) -> u64 {
        match self.range_of(after + 1) {
            Some((_, last)) => last + 1,
            None => after + 1,
        }
    }

    /// Whether a rollback record appended at `at` may name `target`: the target must be before
    /// the record and on the live log (a superseded position never had a live state).
    pub fn check_target(&self, target: u64, at: u64) -> Result<(), String> {
        if target >= at {
            return Err(format!(
                "cannot roll back to position {target}: the head is {}",
                at - 1
            ));
        }
        if target + 1 == at {
            return Err(format!(
                "nothing to roll back: position {target} is the head of the log"
            ));
        }
        if let Some((first, last)) = self.range_of(target) {
            return Err(format!(
                "cannot roll back to position {target}: it was superseded by an earlier \
                 rollback (positions {first}..={last}); pick a live position"
            ));
        }
        Ok(())
    }

    /// Adds a rollback (its record is after every earlier one).
    pub fn add(&mut self, rollback: RollbackEntry) {
        self.rollbacks.push(rollback);
        if rollback.target + 1 >= rollback.at {
            return;
        }
        let (first, last) = (rollback.target + 1, rollback.at - 1);
        // Every existing range ends before `at`: drop those inside, merge those touching.
        let keep_from = self.ranges.partition_point(|&(_, l)| l + 1 < first);
        let mut merged = (first, last);
        for &(f, l) in &self.ranges[keep_from..] {
            merged = (merged.0.min(f), merged.1.max(l));
        }
        self.ranges.truncate(keep_from);
        self.ranges.push(merged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rb(target: u64, at: u64) -> RollbackEntry {
        RollbackEntry { at, target }
    }

    #[test]
    fn ranges_merge_and_nest() {
        let mut s = Superseded::default();
        s.add(rb(10, 20));
        assert_eq!(s.range_of(11), Some((11, 19)));
        assert!(!s.contains(10) && !s.contains(20));
        assert_eq!(s.count(), 9);
        s.add(rb(30, 40));
        assert_eq!(s.count(), 18);
        // A rollback to before both covers them and their records.
        s.add(rb(5, 50));
        assert_eq!(s.range_of(20), Some((6, 49)));
        assert_eq!(s.count(), 44);
        s.add(rb(50, 52));
        assert_eq!(s.range_of(51), Some((51, 51)));
        assert_eq!(s.rollbacks().len(), 4);
    }

    #[test]
    fn targets_must_be_live_and_before_the_record() {
        let s = Superseded::from_rollbacks([rb(10, 20)]);
        assert!(s.check_target(15, 30).is_err());
        assert!(s.check_target(30, 30).is_err());
        assert!(s.check_target(29, 30).is_err());
        assert!(s.check_target(20, 30).is_ok());
        assert!(s.check_target(10, 30).is_ok());
        assert!(s.check_target(0, 30).is_ok());
    }

    #[test]
    fn merging_matches_a_position_by_position_model() {
        let cases: &[&[(u64, u64)]] = &[
            &[(3, 9), (1, 12), (12, 15)],
            &[(5, 8), (9, 14), (2, 20)],
            &[(0, 4), (4, 7), (10, 12), (6, 13)],
        ];
        for rollbacks in cases {
            let s = Superseded::from_rollbacks(rollbacks.iter().map(|&(t, a)| rb(t, a)));
            let mut model = [false; 32];
            for &(t, a) in *rollbacks {
                for slot in model.iter_mut().take(a as usize).skip(t as usize + 1) {
                    *slot = true;
                }
            }
            for (p, &superseded) in model.iter().enumerate() {
                assert_eq!(s.contains(p as u64), superseded, "{rollbacks:?} at {p}");
            }
            assert_eq!(s.count(), model.iter().filter(|&&x| x).count() as u64);
            for after in 0..32u64 {
                for up_to in after..32u64 {
                    let expected = (after + 1..=up_to).filter(|&p| model[p as usize]).count();
                    assert_eq!(s.count_between(after, up_to), expected as u64);
                }
                let next = (after + 1..)
                    .find(|&p| p >= 32 || !model[p as usize])
                    .unwrap();
                assert_eq!(s.next_live(after), next, "{rollbacks:?} after {after}");
            }
        }
    }
}
