//! The flowgrid wire protocol.
//!
//! Every message is MessagePack (maps with field names, so any language can read it)
//! unless it carries the header `Content-Type: application/json`, in which case it is
//! JSON. A reply uses the encoding of its request. Subjects live under one prefix
//! (default `flowgrid`); see [`Subjects`]. The JSON Schemas in `schemas/` are generated
//! from these types by [`schemas`].

mod cluster;
mod codec;
mod messages;
mod subjects;

pub use cluster::{shard_key, shard_of_key, GridConfig, MemberRecord, ShardClaim, ShardState, WorkerRecord, GRID_KEY};
pub use codec::{decode, encode, Encoding, ProtoError, CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE};
pub use messages::*;
pub use subjects::{
    subject_matches, Subjects, API_QUEUE_GROUP, DEFAULT_PREFIX, PRIORITY_DEFAULT, PRIORITY_MAX, REFUSAL_CODE_HEADER,
    REFUSAL_HEADER, SUBMIT_SEQUENCE_HEADER,
};

/// Every wire message type with its schema file name, for `flowgrid schemas`.
pub fn schemas() -> Vec<(&'static str, schemars::Schema)> {
    use schemars::schema_for;
    vec![
        ("flow-definition.json", schema_for!(flowgrid_model::FlowDefinition)),
        ("deploy-flow.json", schema_for!(DeployFlow)),
        ("flow-deployed.json", schema_for!(Reply<FlowDeployed>)),
        ("list-flows.json", schema_for!(ListFlows)),
        ("flow-list.json", schema_for!(Reply<FlowList>)),
        ("get-flow.json", schema_for!(GetFlow)),
        ("flow-info.json", schema_for!(Reply<FlowInfo>)),
        ("start-run.json", schema_for!(StartRun)),
        ("run-started.json", schema_for!(Reply<RunStarted>)),
        ("start-runs.json", schema_for!(StartRuns)),
        ("runs-started.json", schema_for!(Reply<RunsStarted>)),
        ("get-run.json", schema_for!(GetRun)),
        ("run-view.json", schema_for!(Reply<flowgrid_engine::RunView>)),
        ("get-run-history.json", schema_for!(GetRunHistory)),
        ("run-history.json", schema_for!(Reply<RunHistory>)),
        ("list-runs.json", schema_for!(ListRuns)),
        ("run-list.json", schema_for!(Reply<RunList>)),
        ("cancel-run.json", schema_for!(CancelRun)),
        ("run-cancelled.json", schema_for!(Reply<RunCancelled>)),
        ("redrive-run.json", schema_for!(RedriveRun)),
        ("run-redriven.json", schema_for!(Reply<RunRedriven>)),
        ("pause-flow.json", schema_for!(PauseFlow)),
        ("flow-paused.json", schema_for!(Reply<FlowPaused>)),
        ("pause-run.json", schema_for!(PauseRun)),
        ("run-paused.json", schema_for!(Reply<RunPaused>)),
        ("signal-run.json", schema_for!(SignalRun)),
        ("run-signalled.json", schema_for!(Reply<RunSignalled>)),
        ("run-ended.json", schema_for!(RunEnded)),
        ("start-child-run.json", schema_for!(StartChildRun)),
        ("child-run-ended.json", schema_for!(ChildRunEnded)),
        ("child-end-taken.json", schema_for!(Reply<ChildEndTaken>)),
        ("list-limits.json", schema_for!(ListLimits)),
        ("limit-list.json", schema_for!(Reply<LimitList>)),
        ("gate-message.json", schema_for!(GateMessage)),
        ("gate-taken.json", schema_for!(Reply<GateTaken>)),
        ("task-message.json", schema_for!(TaskMessage)),
        ("task-result.json", schema_for!(TaskResult)),
        ("live-output.json", schema_for!(LiveOutput)),
        ("worker-record.json", schema_for!(WorkerRecord)),
        ("tasks-cancelled.json", schema_for!(TasksCancelled)),
        ("result-ack.json", schema_for!(Reply<ResultAck>)),
    ]
}
