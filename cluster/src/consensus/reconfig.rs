//! Configuration changes towards a target set of voters, shared by the
//! metadata group ([`crate::meta::replica::MetaReplica`]) and queue groups
//! ([`crate::replicated::ReplicatedQueue::change_voters`]).
//!
//! The procedure (docs/cluster.md, "Membership change"): every missing
//! member is added as a learner; once each has acknowledged the leader's
//! commit index, one joint-consensus change promotes them all and removes
//! the members not in the target (raft-rs leaves the joint configuration on
//! its own; [`Step::LeaveJoint`] finishes one a leader change interrupted).
//! A leader that is not in the target is never removed by itself: the
//! change keeps it, and it then hands leadership to a target voter (which
//! removes it on its next call). [`next_step`] is pure: it looks at the
//! applied configuration only, so calling it again after a failure, a
//! restart or a leader change resumes where the group is.

use raft::eraftpb::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState};

/// A configuration change of one member.
pub fn single_change(kind: ConfChangeType, id: u64) -> ConfChangeV2 {
    let mut change = ConfChangeSingle::default();
    change.set_change_type(kind);
    change.node_id = id;
    let mut cc = ConfChangeV2::default();
    cc.changes.push(change);
    cc
}

/// One change promoting `promote` (learners) to voters and removing
/// `remove`: a simple change if it is one member, else joint consensus with
/// an automatic leave.
pub fn joint_change(promote: &[u64], remove: &[u64]) -> ConfChangeV2 {
    let mut cc = ConfChangeV2::default();
    for (kind, ids) in [(ConfChangeType::AddNode, promote), (ConfChangeType::RemoveNode, remove)] {
        for id in ids {
            let mut change = ConfChangeSingle::default();
            change.set_change_type(kind);
            change.node_id = *id;
            cc.changes.push(change);
        }
    }
    cc.set_transition(ConfChangeTransition::Auto);
    cc
}

/// What the leader does next to reach a target set of voters.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// The voters are the target (and no learner is left over).
    Done,
    /// A joint configuration is still in force: leave it.
    LeaveJoint,
    /// Add this member as a learner.
    AddLearner(u64),
    /// Wait until these learners have caught up.
    CatchUp(Vec<u64>),
    /// Propose this change (promotions and removals).
    Change(ConfChangeV2),
    /// Everything else is done but this leader is not in the target: hand
    /// leadership to one of these voters.
    TransferTo(Vec<u64>),
}

/// The next step from the applied configuration `conf` towards `target`,
/// on leader `me`; `caught_up` says whether a learner has acknowledged the
/// commit index.
pub fn next_step(conf: &ConfState, target: &[u64], me: u64, mut caught_up: impl FnMut(u64) -> bool) -> Step {
    if !conf.voters_outgoing.is_empty() {
        return Step::LeaveJoint;
    }
    let mut target = target.to_vec();
    target.sort_unstable();
    target.dedup();
    let (voters, learners) = (&conf.voters, &conf.learners);
    if let Some(missing) = target.iter().find(|id| !voters.contains(id) && !learners.contains(id)) {
        return Step::AddLearner(*missing);
    }
    let promote: Vec<u64> = target.iter().copied().filter(|id| !voters.contains(id)).collect();
    let lagging: Vec<u64> = promote.iter().copied().filter(|id| !caught_up(*id)).collect();
    if !lagging.is_empty() {
        return Step::CatchUp(lagging);
    }
    let mut remove: Vec<u64> =
        voters.iter().chain(learners.iter()).copied().filter(|id| *id != me && !target.contains(id)).collect();
    remove.sort_unstable();
    remove.dedup();
    if !promote.is_empty() || !remove.is_empty() {
        return Step::Change(joint_change(&promote, &remove));
    }
    if !target.contains(&me) {
        return Step::TransferTo(target);
    }
    Step::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(voters: &[u64], learners: &[u64]) -> ConfState {
        ConfState { voters: voters.to_vec(), learners: learners.to_vec(), ..Default::default() }
    }

    #[test]
    fn steps_towards_the_target() {
        let all = |_| true;
        assert_eq!(next_step(&conf(&[1, 2, 3], &[]), &[3, 2, 1], 1, all), Step::Done);
        assert_eq!(next_step(&conf(&[1, 2, 3], &[]), &[1, 2, 4], 1, all), Step::AddLearner(4));
        assert_eq!(next_step(&conf(&[1, 2, 3], &[4]), &[1, 2, 4], 1, |_| false), Step::CatchUp(vec![4]));
        assert_eq!(next_step(&conf(&[1, 2, 3], &[4]), &[1, 2, 4], 1, all), Step::Change(joint_change(&[4], &[3])));
        // The leader is kept, then hands over.
        assert_eq!(next_step(&conf(&[1, 2, 3], &[4]), &[2, 3, 4], 1, all), Step::Change(joint_change(&[4], &[])));
        assert_eq!(next_step(&conf(&[1, 2, 3, 4], &[]), &[2, 3, 4], 1, all), Step::TransferTo(vec![2, 3, 4]));
        // Left-over learners are removed.
        assert_eq!(next_step(&conf(&[1, 2, 3], &[5]), &[1, 2, 3], 1, all), Step::Change(joint_change(&[], &[5])));
        let mut joint = conf(&[1, 2, 4], &[]);
        joint.voters_outgoing = vec![1, 2, 3];
        assert_eq!(next_step(&joint, &[1, 2, 4], 1, all), Step::LeaveJoint);
    }
}
