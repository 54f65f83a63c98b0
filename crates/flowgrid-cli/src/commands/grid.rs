//! `flowgrid members | shards | status`: reads the grid's members and shards buckets and
//! the backlog of its streams. Read-only: a missing bucket or stream is reported, never
//! created, so that looking at a grid cannot change it.

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use flowgrid_proto::{
    decode, shard_key, shard_of_key, Encoding, GridConfig, ShardClaim, Subjects, WorkerRecord, GRID_KEY,
    PRIORITY_DEFAULT,
};
use flowgrid_sdk::broker::{self, BrokerLimits};

use crate::args::ShardsArgs;
use crate::grid_view::{
    claim_history_table, claim_revisions, member_views, members_table, render_backlog, render_shard_summary,
    render_workers_summary, shard_lines, shard_lines_table, shard_summary, workers_table, Backlog, ClaimRevision,
    GridSnapshot, LaneBacklog, MemberView, PoolBacklog, ShardLine, ShardSummary, SubmitBacklog, TriggerBacklog,
};
use crate::output::{now_ms, out, outln, print_json};
use crate::Session;

/// How long reading one bucket or stream may take before the command gives up.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Bucket values fetched at once (one request each).
const READS_IN_FLIGHT_MAX: usize = 64;

pub(crate) async fn members(session: &Session) -> anyhow::Result<ExitCode> {
    let reader = GridReader::connect(session).await?;
    let snapshot = reader.snapshot().await?;
    let views = member_views(&snapshot);
    if session.json {
        print_json(&views)?;
    } else if views.is_empty() {
        eprintln!(
            "no coordinator is a member of this grid right now; start one with `make up` or `flowgrid coordinator`"
        );
    } else {
        out!("{}", members_table(&views).render())?;
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn workers(pool: Option<&str>, session: &Session) -> anyhow::Result<ExitCode> {
    let reader = GridReader::connect(session).await?;
    let mut workers = reader.workers().await?;
    workers.retain(|worker| pool.is_none_or(|pool| worker.pool == pool));
    let now = now_ms();
    if session.json {
        print_json(&workers)?;
    } else if workers.is_empty() {
        let which = pool.map(|pool| format!("pool {pool} has")).unwrap_or_else(|| "the grid has".to_owned());
        eprintln!(
            "{which} no live worker: start one (`flowgrid worker --pools ...`, or a worker of your own with the SDK); \
             workers written against the wire protocol are listed only if they write their record (docs/protocol.md)"
        );
    } else {
        out!("{}", workers_table(&workers, now).render())?;
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn shards(args: &ShardsArgs, session: &Session) -> anyhow::Result<ExitCode> {
    let reader = GridReader::connect(session).await?;
    let snapshot = reader.snapshot().await?;
    if let Some(shard) = args.history {
        return shard_history(&reader, &snapshot, shard, session).await;
    }
    let summary = shard_summary(&snapshot);
    if session.json {
        let claims = args.all.then(|| shard_lines(&snapshot));
        print_json(&ShardsJson { summary: &summary, all_serving: summary.all_serving(), claims })?;
    } else if args.all {
        out!("{}", shard_lines_table(&shard_lines(&snapshot), snapshot.now_ms).render())?;
    } else {
        out!("{}", render_shard_summary(&summary))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `flowgrid shards --history SHARD`.
async fn shard_history(
    reader: &GridReader,
    snapshot: &GridSnapshot,
    shard: u32,
    session: &Session,
) -> anyhow::Result<ExitCode> {
    match snapshot.shard_count() {
        0 => anyhow::bail!("this grid has no shards yet: no coordinator has claimed one"),
        shards if shard >= shards => {
            anyhow::bail!("shard {shard} does not exist: this grid has {shards} shards (0-{})", shards - 1)
        }
        _ => {}
    }
    let revisions = claim_revisions(snapshot, shard, &reader.claim_history(shard).await?);
    if session.json {
        print_json(&ShardHistoryJson { shard, revisions })?;
    } else if revisions.is_empty() {
        outln!("shard {shard} has not been claimed yet")?;
    } else {
        out!("{}", claim_history_table(&revisions, snapshot.now_ms).render())?;
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn status(session: &Session) -> anyhow::Result<ExitCode> {
    let reader = GridReader::connect(session).await?;
    // The backlog is worth showing even before any coordinator joined (durable submits).
    let (snapshot, backlog, workers) = tokio::join!(reader.snapshot(), reader.backlog(), reader.workers());
    let (backlog, workers) = (backlog?, workers?);
    let snapshot = match snapshot {
        Ok(snapshot) => Some(snapshot),
        Err(error) if error.downcast_ref::<NotJoined>().is_some() => None,
        Err(error) => return Err(error),
    };
    let unread_triggers =
        if snapshot.is_some() { unread_triggers(session, &reader, &backlog).await } else { Vec::new() };
    if session.json {
        let members = snapshot.as_ref().map(member_views).unwrap_or_default();
        let shards = snapshot.as_ref().map(shard_summary);
        print_json(&StatusJson { members, shards, backlog, workers, unread_triggers })?;
    } else {
        out!("{}", status_text(&reader, snapshot.as_ref(), &backlog, &workers))?;
        if snapshot.is_none() {
            eprintln!("hint: {}", not_joined_hint(&reader.not_joined()));
        }
        for unread in &unread_triggers {
            eprintln!("hint: {}", unread.hint());
        }
    }
    Ok(if snapshot.is_some() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// How long `status` waits for the coordinators' list of flows.
const FLOWS_WAIT: Duration = Duration::from_secs(2);

/// A deployed flow's trigger with no consumer to show in the backlog: its messages start no
/// runs for now.
#[derive(Serialize)]
struct UnreadTrigger {
    flow: String,
    stream: String,
    /// `false`: the stream was deleted or lost with NATS's store; `true`: it exists and a
    /// coordinator has not opened it yet (it looks again every few seconds).
    stream_exists: bool,
}

impl UnreadTrigger {
    fn hint(&self) -> String {
        if self.stream_exists {
            format!(
                "flow {}'s trigger on stream {} has no reader yet: a coordinator opens it within seconds of the \
                 stream appearing (if this lasts, see the coordinators' logs)",
                self.flow, self.stream
            )
        } else {
            format!(
                "flow {}'s trigger reads stream {}, which does not exist on this NATS: its messages start no runs \
                 until the stream exists again",
                self.flow, self.stream
            )
        }
    }
}

/// The triggers of deployed, unpaused flows that no coordinator reads. Best effort:
/// coordinators that do not answer in time leave them unsaid.
async fn unread_triggers(session: &Session, reader: &GridReader, backlog: &Backlog) -> Vec<UnreadTrigger> {
    let Ok(client) = session.client().await else { return Vec::new() };
    let client = client.with_retry_budget(Duration::ZERO);
    let Ok(Ok(list)) = tokio::time::timeout(FLOWS_WAIT, client.flows()).await else { return Vec::new() };
    let mut unread = Vec::new();
    for flow in list.flows.iter().filter(|flow| flow.paused.is_none()) {
        let Some(trigger) = &flow.trigger else { continue };
        if backlog.triggers.iter().any(|read| read.flow == flow.name) {
            continue;
        }
        let Ok(stream) = reader.stream(&trigger.stream).await else { continue };
        unread.push(UnreadTrigger {
            flow: flow.name.clone(),
            stream: trigger.stream.clone(),
            stream_exists: stream.is_some(),
        });
    }
    unread
}

/// What `flowgrid status` prints: members, shards, the backlog, then the live workers.
pub(crate) fn status_text(
    reader: &GridReader,
    snapshot: Option<&GridSnapshot>,
    backlog: &Backlog,
    workers: &[WorkerRecord],
) -> String {
    let mut text = String::new();
    match snapshot {
        Some(snapshot) => {
            let views = member_views(snapshot);
            let _ = writeln!(text, "members: {}", views.len());
            if !views.is_empty() {
                text.push_str(&members_table(&views).render());
            }
            text.push('\n');
            text.push_str(&render_shard_summary(&shard_summary(snapshot)));
        }
        None => {
            let _ = writeln!(text, "members: none; {}", reader.not_joined());
        }
    }
    text.push('\n');
    text.push_str(&render_backlog(backlog));
    text.push_str(&render_workers_summary(workers));
    text
}

/// `flowgrid pool limit`: sets how many of a pool's tasks may be out with its workers at
/// once (`None`: back to the default).
pub(crate) async fn pool_limit(pool: &str, max_in_flight: Option<i64>, session: &Session) -> anyhow::Result<ExitCode> {
    let limits = BrokerLimits::default();
    let max_in_flight = max_in_flight.unwrap_or(limits.pool_ack_pending_max);
    if !(1..=limits.pool_ack_pending_max).contains(&max_in_flight) {
        anyhow::bail!(
            "--max-in-flight is {max_in_flight}; use 1 to {} (or --reset for the default)",
            limits.pool_ack_pending_max
        );
    }
    if !flowgrid_model::is_name(pool) {
        anyhow::bail!("{pool:?} is not a pool name: use letters, digits, `-` and `_`");
    }
    let reader = GridReader::connect(session).await?;
    let Some(tasks) = reader.stream(&reader.subjects.tasks_stream()).await? else {
        anyhow::bail!(
            "NATS at {} has no tasks stream for prefix {:?} yet: start a coordinator first",
            reader.nats_url,
            reader.subjects.prefix()
        );
    };
    // A pool nothing has used yet gets its consumer now: maybe a misspelt name.
    let known = tasks.consumer_info(reader.subjects.lane_consumer(pool, PRIORITY_DEFAULT)).await.is_ok();
    let (previous, lanes) = broker::set_pool_max_in_flight(&tasks, &reader.subjects, pool, max_in_flight, &limits)
        .await
        .with_context(|| format!("cannot set the bound of pool {pool}"))?;
    if session.json {
        let limit =
            serde_json::json!({"pool": pool, "max_in_flight": max_in_flight, "previous": previous, "lanes": lanes});
        print_json(&limit)?;
    } else {
        outln!("pool {pool}: at most {max_in_flight} tasks out with its workers at once (it was {previous})")?;
        if !known {
            eprintln!(
                "note: pool {pool} had no task and no worker yet; the bound waits for them (`flowgrid status` lists \
                 the pools in use)"
            );
        }
        if lanes.len() > 1 {
            // Each lane is a consumer of its own, and the bound is each consumer's.
            let priorities: Vec<String> = lanes.iter().map(u8::to_string).collect();
            outln!(
                "  the bound holds per priority: the pool has {} lanes ({}), so up to {} of its tasks may be out in all",
                lanes.len(),
                priorities.join(", "),
                max_in_flight.saturating_mul(lanes.len() as i64)
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Each pool's backlog, for a hint about a run that waits; empty before the tasks stream exists.
pub(crate) async fn pool_backlogs(session: &Session) -> anyhow::Result<Vec<PoolBacklog>> {
    let reader = GridReader::connect(session).await?;
    Ok(reader.backlog().await?.pools.unwrap_or_default())
}

/// `flowgrid shards --json`: the summary, and every shard's claim with `--all`.
#[derive(Serialize)]
struct ShardsJson<'a> {
    #[serde(flatten)]
    summary: &'a ShardSummary,
    all_serving: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    claims: Option<Vec<ShardLine>>,
}

/// `flowgrid shards --history SHARD --json`.
#[derive(Serialize)]
struct ShardHistoryJson {
    shard: u32,
    revisions: Vec<ClaimRevision>,
}

/// `flowgrid status --json`; `shards` is null while no coordinator has joined.
#[derive(Serialize)]
struct StatusJson {
    members: Vec<MemberView>,
    shards: Option<ShardSummary>,
    backlog: Backlog,
    workers: Vec<WorkerRecord>,
    /// Deployed flows' triggers no coordinator reads (see `UnreadTrigger`).
    unread_triggers: Vec<UnreadTrigger>,
}

/// No members bucket under the prefix: no coordinator of this release ever started there.
#[derive(Debug)]
pub(crate) struct NotJoined {
    pub nats_url: String,
    pub prefix: String,
    pub bucket: String,
}

impl fmt::Display for NotJoined {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "no coordinator has joined this grid yet (NATS at {} has no bucket {} for prefix {:?})",
            flowgrid_sdk::redact(&self.nats_url),
            self.bucket,
            self.prefix
        )
    }
}

impl std::error::Error for NotJoined {}

/// Read access to one grid's buckets and streams.
pub(crate) struct GridReader {
    jetstream: jetstream::Context,
    subjects: Subjects,
    nats_url: String,
}

impl GridReader {
    pub(crate) async fn connect(session: &Session) -> anyhow::Result<GridReader> {
        let nats = session.nats("flowgrid-cli").await?;
        Ok(GridReader {
            jetstream: jetstream::new(nats),
            subjects: Subjects::new(session.prefix.clone()),
            nats_url: session.nats_url.clone(),
        })
    }

    fn not_joined(&self) -> NotJoined {
        NotJoined {
            nats_url: self.nats_url.clone(),
            prefix: self.subjects.prefix().to_owned(),
            bucket: self.subjects.members_bucket(),
        }
    }

    /// Members, grid settings and shard claims as of now. Fails with [`NotJoined`] when the
    /// members bucket does not exist.
    pub(crate) async fn snapshot(&self) -> anyhow::Result<GridSnapshot> {
        let members_bucket = self.subjects.members_bucket();
        let Some(members) = self.bucket(&members_bucket).await? else {
            return Err(self.not_joined().into());
        };
        let shards_bucket = self.subjects.shards_bucket();
        let (members, shards) = tokio::join!(self.values(&members, &members_bucket), async {
            match self.bucket(&shards_bucket).await? {
                Some(shards) => self.values(&shards, &shards_bucket).await,
                None => Ok(Vec::new()),
            }
        });
        let mut snapshot = GridSnapshot {
            members: members?
                .into_iter()
                .filter_map(|(key, value)| decode_record(&members_bucket, &key, &value))
                .collect(),
            ..Default::default()
        };
        for (key, value) in shards? {
            if key == GRID_KEY {
                snapshot.grid = decode_record::<GridConfig>(&shards_bucket, &key, &value);
            } else if let Some(shard) = shard_of_key(&key) {
                if let Some(claim) = decode_record::<ShardClaim>(&shards_bucket, &key, &value) {
                    snapshot.claims.insert(shard, claim);
                }
            }
        }
        // Read the clock after the records so that fresh heartbeats never look older than they are.
        snapshot.now_ms = now_ms();
        Ok(snapshot)
    }

    /// The kept revisions of `shard`'s claim, oldest first, with their bucket revisions.
    async fn claim_history(&self, shard: u32) -> anyhow::Result<Vec<(u64, ShardClaim)>> {
        let name = self.subjects.shards_bucket();
        let Some(store) = self.bucket(&name).await? else { return Ok(Vec::new()) };
        let key = shard_key(shard);
        let read = async {
            let entries: Vec<kv::Entry> = store.history(&key).await?.try_collect().await?;
            Ok::<_, async_nats::Error>(entries)
        };
        let entries = tokio::time::timeout(READ_TIMEOUT, read)
            .await
            .map_err(|_| self.read_timed_out(&name))?
            .map_err(|error| anyhow::anyhow!(error))
            .with_context(|| {
                format!(
                    "cannot read the history of {key} in bucket {name} on NATS at {}",
                    flowgrid_sdk::redact(&self.nats_url)
                )
            })?;
        Ok(entries
            .into_iter()
            .filter(|entry| entry.operation == kv::Operation::Put)
            .filter_map(|entry| Some((entry.revision, decode_record(&name, &key, &entry.value)?)))
            .collect())
    }

    /// The live workers' records, by pool then id; none when no bucket exists yet.
    pub(crate) async fn workers(&self) -> anyhow::Result<Vec<WorkerRecord>> {
        let bucket_name = self.subjects.workers_bucket();
        let Some(bucket) = self.bucket(&bucket_name).await? else { return Ok(Vec::new()) };
        let mut workers: Vec<WorkerRecord> = self
            .values(&bucket, &bucket_name)
            .await?
            .into_iter()
            .filter_map(|(key, value)| decode_record(&bucket_name, &key, &value))
            .collect();
        workers.sort_by(|left, right| (&left.pool, &left.id).cmp(&(&right.pool, &right.id)));
        Ok(workers)
    }

    /// Tasks waiting and in flight per pool, and durable submits waiting.
    pub(crate) async fn backlog(&self) -> anyhow::Result<Backlog> {
        let mut backlog = Backlog::default();
        if let Some(tasks) = self.stream(&self.subjects.tasks_stream()).await? {
            let mut pools: BTreeMap<String, PoolBacklog> = BTreeMap::new();
            for info in self.consumers(&tasks).await? {
                let Some((pool, priority)) = Subjects::parse_lane_consumer(&info.name) else { continue };
                let entry = pools.entry(pool.to_owned()).or_insert_with(|| PoolBacklog::empty(pool));
                let lane = LaneBacklog {
                    priority,
                    pending: info.num_pending,
                    in_flight: info.num_ack_pending as u64,
                    pulls_waiting: info.num_waiting as u64,
                };
                if priority == PRIORITY_DEFAULT {
                    entry.max_in_flight = info.config.max_ack_pending;
                }
                entry.add_lane(lane);
            }
            let pools: Vec<PoolBacklog> = pools.into_values().collect();
            backlog.pools = Some(pools);
        }
        if let Some(submit) = self.stream(&self.subjects.submit_stream()).await? {
            let consumer_name = self.subjects.submit_consumer();
            let consumer = self.consumers(&submit).await?.into_iter().find(|info| info.name == consumer_name);
            let refused = match self.stream(&self.subjects.submit_refused_stream()).await? {
                Some(refused) => refused.cached_info().state.messages,
                None => 0,
            };
            backlog.submit = Some(match consumer {
                Some(info) => {
                    SubmitBacklog { waiting: info.num_pending, in_flight: info.num_ack_pending as u64, refused }
                }
                // No coordinator has drained it yet: everything in it waits.
                None => SubmitBacklog { waiting: submit.cached_info().state.messages, in_flight: 0, refused },
            });
        }
        backlog.triggers = self.trigger_backlogs().await?;
        Ok(backlog)
    }

    /// The consumers of this grid's triggers, found on every stream of the server.
    async fn trigger_backlogs(&self) -> anyhow::Result<Vec<TriggerBacklog>> {
        let prefix = self.subjects.trigger_consumer_prefix();
        let names: Vec<String> = tokio::time::timeout(READ_TIMEOUT, self.jetstream.stream_names().try_collect())
            .await
            .map_err(|_| self.read_timed_out("the stream names"))?
            .with_context(|| format!("cannot list the streams on NATS at {}", flowgrid_sdk::redact(&self.nats_url)))?;
        let mut triggers = Vec::new();
        for name in names.iter().filter(|name| !name.starts_with("KV_")) {
            let Some(stream) = self.stream(name).await? else { continue };
            for info in self.consumers(&stream).await? {
                let Some(flow) = info.name.strip_prefix(&prefix) else { continue };
                let subject = Some(info.config.filter_subject.clone()).filter(|subject| !subject.is_empty());
                triggers.push(TriggerBacklog {
                    flow: flow.to_owned(),
                    stream: name.clone(),
                    subject,
                    pending: info.num_pending,
                    in_flight: info.num_ack_pending as u64,
                });
            }
        }
        triggers.sort_by(|left, right| left.flow.cmp(&right.flow));
        Ok(triggers)
    }

    /// The stream `name`, or `None` when it does not exist.
    async fn stream(&self, name: &str) -> anyhow::Result<Option<stream::Stream>> {
        let lookup = tokio::time::timeout(READ_TIMEOUT, self.jetstream.get_stream(name)).await;
        match lookup {
            Err(_) => Err(self.read_timed_out(name)),
            Ok(Ok(stream)) => Ok(Some(stream)),
            Ok(Err(error)) => match error.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(jetstream_error)
                    if jetstream_error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(None)
                }
                _ => Err(anyhow::Error::new(error).context(format!(
                    "cannot look up stream {name} on NATS at {} (is JetStream enabled, `nats-server -js`?)",
                    flowgrid_sdk::redact(&self.nats_url)
                ))),
            },
        }
    }

    /// The bucket `name`, or `None` when it does not exist.
    async fn bucket(&self, name: &str) -> anyhow::Result<Option<kv::Store>> {
        if self.stream(&format!("KV_{name}")).await?.is_none() {
            return Ok(None);
        }
        let store = tokio::time::timeout(READ_TIMEOUT, self.jetstream.get_key_value(name))
            .await
            .map_err(|_| self.read_timed_out(name))?
            .with_context(|| {
                format!("cannot open bucket {name} on NATS at {}", flowgrid_sdk::redact(&self.nats_url))
            })?;
        Ok(Some(store))
    }

    /// Every live key of `store` with its value.
    async fn values(&self, store: &kv::Store, name: &str) -> anyhow::Result<Vec<(String, Bytes)>> {
        let read = async {
            let keys: Vec<String> = store.keys().await?.try_collect().await?;
            let values: Vec<(String, Option<Bytes>)> = futures::stream::iter(keys)
                .map(|key| async move {
                    let value = store.get(key.as_str()).await?;
                    Ok::<_, async_nats::Error>((key, value))
                })
                .buffer_unordered(READS_IN_FLIGHT_MAX)
                .try_collect()
                .await?;
            // A key deleted between listing and reading is simply gone.
            Ok::<_, async_nats::Error>(
                values.into_iter().filter_map(|(key, value)| Some((key, value?))).collect::<Vec<_>>(),
            )
        };
        tokio::time::timeout(READ_TIMEOUT, read)
            .await
            .map_err(|_| self.read_timed_out(name))?
            .map_err(|error| anyhow::anyhow!(error))
            .with_context(|| format!("cannot read bucket {name} on NATS at {}", flowgrid_sdk::redact(&self.nats_url)))
    }

    /// Every consumer of `stream`.
    async fn consumers(&self, stream: &stream::Stream) -> anyhow::Result<Vec<jetstream::consumer::Info>> {
        let name = &stream.cached_info().config.name;
        tokio::time::timeout(READ_TIMEOUT, stream.consumers().try_collect::<Vec<_>>())
            .await
            .map_err(|_| self.read_timed_out(name))?
            .with_context(|| {
                format!(
                    "cannot list the consumers of stream {name} on NATS at {}",
                    flowgrid_sdk::redact(&self.nats_url)
                )
            })
    }

    fn read_timed_out(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "reading {what} on NATS at {} took longer than {}s; is the server overloaded?",
            flowgrid_sdk::redact(&self.nats_url),
            READ_TIMEOUT.as_secs()
        )
    }
}

/// Decodes one bucket value; a value that is not the expected record (a newer or older
/// release wrote it) is skipped with a warning instead of hiding everything else.
fn decode_record<T: DeserializeOwned>(bucket: &str, key: &str, value: &[u8]) -> Option<T> {
    match decode(Encoding::MsgPack, value) {
        Ok(record) => Some(record),
        Err(error) => {
            eprintln!("warning: skipping {bucket} key {key:?}: {error}");
            None
        }
    }
}

/// Hint for [`crate::failure`]: a grid nobody joined yet.
pub(crate) fn not_joined_hint(error: &NotJoined) -> String {
    format!(
        "start the grid with `make up` (or `flowgrid coordinator --prefix {}`), or check --nats-url and --prefix",
        error.prefix
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_joined_names_the_url_the_bucket_and_the_prefix() {
        let error = NotJoined {
            nats_url: "nats://127.0.0.1:4333".into(),
            prefix: "flowgrid".into(),
            bucket: "FLOWGRID_MEMBERS".into(),
        };
        assert_eq!(
            error.to_string(),
            "no coordinator has joined this grid yet (NATS at nats://127.0.0.1:4333 has no bucket FLOWGRID_MEMBERS \
             for prefix \"flowgrid\")"
        );
        assert!(not_joined_hint(&error).contains("make up"));
    }
}
