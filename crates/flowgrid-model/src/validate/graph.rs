//! The step graph: edges from `after`, choice targets and catch targets; their checks,
//! cycle detection and upstream sets.
//!
//! Invariant: [`Graph`] is built only from edges that passed [`check_edges`] (every name
//! resolves, no self edge, unique ids), so its adjacency lists hold valid positions.

use std::collections::{BTreeSet, HashMap};

use crate::definition::Step;
use crate::error::Issue;

use super::{catches, push_issue, step_path};

/// Cycles a refused definition reports at most: an author fixes a few and checks again.
const CYCLES_REPORTED_MAX: usize = 10;

/// Checks ids for uniqueness and every edge for a known target other than its source.
/// Returns whether the edges are sound enough to build a [`Graph`].
pub(super) fn check_edges(steps: &[Step], issues: &mut Vec<Issue>) -> bool {
    let issues_before = issues.len();
    let mut first_position: HashMap<&str, usize> = HashMap::new();
    for (position, step) in steps.iter().enumerate() {
        match first_position.get(step.id()) {
            Some(&first) => push_issue(
                issues,
                format!("{}.id", step_path(position, step.id())),
                format!(
                    "step id `{}` is used by steps[{first}] and steps[{position}]: give each step its own id",
                    step.id()
                ),
            ),
            None => {
                first_position.insert(step.id(), position);
            }
        }
    }
    let known = |name: &str| first_position.contains_key(name);
    for (position, step) in steps.iter().enumerate() {
        let path = step_path(position, step.id());
        let mut seen = BTreeSet::new();
        for (entry, after) in step.after().iter().enumerate() {
            let entry_path = format!("{path}.after[{entry}]");
            check_target(&entry_path, step.id(), after, known(after), "run after", issues);
            if !seen.insert(after.as_str()) {
                push_issue(issues, entry_path, format!("lists `{after}` twice: remove the repeated entry"));
            }
        }
        if let Step::Choice(choice) = step {
            for (rule, choice_rule) in choice.choices.iter().enumerate() {
                let rule_path = format!("{path}.choices[{rule}].next");
                check_target(&rule_path, step.id(), &choice_rule.next, known(&choice_rule.next), "branch to", issues);
            }
            if let Some(default) = &choice.default {
                check_target(&format!("{path}.default"), step.id(), default, known(default), "branch to", issues);
            }
        }
        for (rule, catch) in catches(step).iter().enumerate() {
            let rule_path = format!("{path}.catch[{rule}].next");
            check_target(&rule_path, step.id(), &catch.next, known(&catch.next), "catch into", issues);
        }
    }
    issues.len() == issues_before
}

fn check_target(path: &str, own_id: &str, target: &str, known: bool, relation: &str, issues: &mut Vec<Issue>) {
    if !known {
        push_issue(
            issues,
            path,
            format!("names step `{target}`, which does not exist: use the id of a step of this flow"),
        );
    } else if target == own_id {
        push_issue(issues, path, format!("a step cannot {relation} itself: name another step"));
    }
}

/// Adjacency of the full edge set, by step position.
pub(super) struct Graph {
    successors: Vec<Vec<usize>>,
    /// Each step's dependencies, once each: `after` entries first, then the choices and
    /// catches that name it, in step order.
    predecessors: Vec<Vec<usize>>,
}

impl Graph {
    /// Builds the graph; names that do not resolve are left out.
    pub(super) fn new(steps: &[Step]) -> Graph {
        let position_of: HashMap<&str, usize> =
            steps.iter().enumerate().rev().map(|(position, step)| (step.id(), position)).collect();
        let mut successors = vec![Vec::new(); steps.len()];
        let mut predecessors = vec![Vec::new(); steps.len()];
        let mut add = |from: usize, to: usize| {
            if !successors[from].contains(&to) {
                successors[from].push(to);
            }
            if !predecessors[to].contains(&from) {
                predecessors[to].push(from);
            }
        };
        for (position, step) in steps.iter().enumerate() {
            for after in step.after() {
                if let Some(&from) = position_of.get(after.as_str()) {
                    add(from, position);
                }
            }
        }
        for (position, step) in steps.iter().enumerate() {
            for target in branch_targets(step) {
                if let Some(&to) = position_of.get(target) {
                    add(position, to);
                }
            }
        }
        Graph { successors, predecessors }
    }

    /// The steps `position` waits for (see [`Graph::predecessors`]).
    pub(super) fn deps(&self, position: usize) -> Vec<usize> {
        self.predecessors[position].clone()
    }

    /// Which steps run before `position` (its transitive dependencies).
    pub(super) fn upstream(&self, position: usize) -> Vec<bool> {
        let mut reached = vec![false; self.predecessors.len()];
        let mut pending = self.predecessors[position].clone();
        while let Some(step) = pending.pop() {
            if !reached[step] {
                reached[step] = true;
                pending.extend(&self.predecessors[step]);
            }
        }
        reached
    }

    /// One issue per distinct cycle found, or `None` when the graph is acyclic.
    pub(super) fn cycle_issues(&self, steps: &[Step]) -> Option<Vec<Issue>> {
        let cycles = self.cycles();
        if cycles.is_empty() {
            return None;
        }
        let issues = cycles
            .into_iter()
            .map(|cycle| {
                let names: Vec<&str> = cycle.iter().chain(cycle.first()).map(|&position| steps[position].id()).collect();
                Issue {
                    path: step_path(cycle[0], steps[cycle[0]].id()),
                    message: format!(
                        "cycle: {}: a flow must be acyclic over `after`, choice and catch targets; remove one of these edges",
                        names.join(" -> ")
                    ),
                }
            })
            .collect();
        Some(issues)
    }

    /// Cycles found by a depth-first search, each as the positions along it, without
    /// reporting the same set of steps twice; at most [`CYCLES_REPORTED_MAX`] (a graph
    /// within the step limit can hold millions, and each costs its length to report).
    fn cycles(&self) -> Vec<Vec<usize>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            OnPath,
            Done,
        }
        let mut marks = vec![Mark::New; self.successors.len()];
        let mut cycles = Vec::new();
        let mut reported: BTreeSet<Vec<usize>> = BTreeSet::new();
        for root in 0..self.successors.len() {
            if marks[root] != Mark::New {
                continue;
            }
            // (step, next successor to visit); `path` mirrors the stack's steps.
            let mut stack = vec![(root, 0usize)];
            let mut path = vec![root];
            marks[root] = Mark::OnPath;
            while let Some((step, next)) = stack.last_mut() {
                let step = *step;
                if let Some(&successor) = self.successors[step].get(*next) {
                    *next += 1;
                    match marks[successor] {
                        Mark::New => {
                            marks[successor] = Mark::OnPath;
                            stack.push((successor, 0));
                            path.push(successor);
                        }
                        Mark::OnPath => {
                            let start = path.iter().position(|&on_path| on_path == successor).expect("on the path");
                            let cycle = path[start..].to_vec();
                            let mut members = cycle.clone();
                            members.sort_unstable();
                            if reported.insert(members) {
                                cycles.push(cycle);
                                if cycles.len() == CYCLES_REPORTED_MAX {
                                    return cycles;
                                }
                            }
                        }
                        Mark::Done => {}
                    }
                } else {
                    marks[step] = Mark::Done;
                    stack.pop();
                    path.pop();
                }
            }
        }
        cycles
    }
}

/// The steps a choice branches to and a task, map or signal step catches into.
fn branch_targets(step: &Step) -> Vec<&str> {
    let mut targets: Vec<&str> = catches(step).iter().map(|catch| catch.next.as_str()).collect();
    if let Step::Choice(choice) = step {
        targets.extend(choice.choices.iter().map(|rule| rule.next.as_str()));
        targets.extend(choice.default.as_deref());
    }
    targets
}
