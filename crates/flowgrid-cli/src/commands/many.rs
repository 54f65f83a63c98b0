//! Commands that act on many runs at once (`run redrive`, `run pause`, `run resume`):
//! finding the runs, and sending one request per run a few at a time with progress.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};

use flowgrid_model::RunId;
use flowgrid_proto::{ListRuns, RunSummary};
use flowgrid_sdk::Client;

use crate::output::{outln, print_json};
use crate::Session;

/// Requests in flight at once.
const IN_FLIGHT: usize = 16;

/// The ids of the runs that `query` lists (its page size and cursor aside) and `keep`
/// keeps, newest first, at most `limit`.
pub(super) async fn matching_runs(
    client: &Client,
    mut query: ListRuns,
    limit: Option<u64>,
    keep: impl Fn(&RunSummary) -> bool,
) -> anyhow::Result<Vec<RunId>> {
    crate::ensure_usage!(limit != Some(0), "--limit 0 selects no run; give at least 1, or leave it out for every run");
    if let Some(flow) = &query.flow {
        // A misspelt flow matches no run, which would read as if every run were done.
        client.flow(flow, None).await?;
    }
    let limit = limit.unwrap_or(u64::MAX) as usize;
    let mut runs = Vec::new();
    query.limit = Some(1_000);
    while runs.len() < limit {
        let page = client.list(query.clone()).await?;
        runs.extend(page.runs.into_iter().filter(&keep).map(|run| run.run_id).take(limit - runs.len()));
        match page.next_cursor {
            Some(next) => query.cursor = Some(next),
            None => break,
        }
    }
    Ok(runs)
}

/// How a command on many runs speaks of what it does: `redriving`, `redrove`, and the
/// JSON key of the count (`redriven`).
pub(super) struct Verb {
    pub doing: &'static str,
    pub did: &'static str,
    pub key: &'static str,
}

/// The runs whose request [`for_each_run`] sent was refused, in the order the refusals came.
pub(super) struct Refused(pub Vec<RunId>);

impl Refused {
    /// Exit 1 if any run was refused.
    pub fn exit_code(&self) -> ExitCode {
        if self.0.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

/// Sends `act` for every run of `runs`, a few at a time, with a progress line every
/// second; prints how many it changed (`act` answers whether it did), how many it left as
/// they were, and every refusal; returns the runs refused.
pub(super) async fn for_each_run<F, Fut>(
    runs: Vec<RunId>,
    verb: Verb,
    detail: &str,
    session: &Session,
    act: F,
) -> anyhow::Result<Refused>
where
    F: Fn(RunId) -> Fut,
    Fut: Future<Output = (RunId, flowgrid_sdk::Result<bool>)>,
{
    use futures::StreamExt;

    let total = runs.len();
    let mut requests = futures::stream::iter(runs).map(act).buffer_unordered(IN_FLIGHT);
    let (mut changed, mut unchanged, mut refused) = (0usize, 0usize, Vec::new());
    let mut progress = tokio::time::interval(Duration::from_secs(1));
    progress.tick().await;
    loop {
        tokio::select! {
            next = requests.next() => match next {
                Some((_, Ok(true))) => changed += 1,
                Some((_, Ok(false))) => unchanged += 1,
                Some((run_id, Err(error))) => refused.push((run_id, error)),
                None => break,
            },
            _ = progress.tick() => eprintln!(
                "{}: {}/{total} done, {} refused",
                verb.doing,
                changed + unchanged + refused.len(),
                refused.len()
            ),
        }
    }
    if session.json {
        let refused: Vec<Value> = refused
            .iter()
            .map(|(run_id, error)| match error.api() {
                Some(api) => json!({"run_id": run_id, "code": api.code, "message": api.message}),
                None => json!({"run_id": run_id, "message": error.to_string()}),
            })
            .collect();
        print_json(&json!({"matched": total, (verb.key): changed, "unchanged": unchanged, "refused": refused}))?;
    } else {
        let unchanged = if unchanged > 0 { format!(" ({unchanged} as they were)") } else { String::new() };
        outln!("{} {changed} of {total} run(s){detail}{unchanged}; {} refused", verb.did, refused.len())?;
        for (run_id, error) in &refused {
            outln!("{run_id}: {error}")?;
        }
    }
    Ok(Refused(refused.into_iter().map(|(run_id, _)| run_id).collect()))
}
