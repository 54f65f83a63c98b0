//! Tests of the run state machine: events in, effects out, no I/O.

mod attempts;
mod cache;
mod conditions;
mod flows;
mod loops;
mod map;
mod on_failure;
mod pause;
mod properties;
mod queue;
mod redrive;
mod replay;
mod signals;
mod subflows;
mod support;
mod wait;

/// A two-step chain shared by several test files.
fn flows_chain() -> &'static str {
    r##"
name: chain
steps:
  - { kind: task, id: a, pool: cpu, task: first }
  - { kind: task, id: b, after: [a], pool: cpu, task: second, input: "steps.a.output.n + 1" }
"##
}
