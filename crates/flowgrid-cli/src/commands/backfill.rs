//! `flowgrid flow backfill`: the runs a flow's schedule would have started in a past span.
//!
//! Each slot's run is started as the schedule itself starts it
//! ([`StartRun::for_schedule_slot`]: its input, labels and idempotency key), so its run id
//! is the one the schedule gives that slot: a slot
//! that has its run (started by the schedule, or by an earlier backfill) is not started
//! again, and a backfill cut short is finished by running it again. Its starts go a
//! hundred a request, in smaller requests where those would not fit a NATS message (a
//! large schedule input). A flow whose concurrency limit cancels the runs past it is
//! refused: the backfill's runs all start at once.

use std::process::ExitCode;

use anyhow::{bail, Context};
use serde_json::json;

use flowgrid_model::schedule::Timetable;
use flowgrid_model::{Millis, WhenFull};
use flowgrid_sdk::{Client, ErrorCode, RunStarted, StartRun};

use crate::output::{now_ms, outln, print_json, utc_time};
use crate::Session;

/// The most slots one backfill starts: every slot is a run the grid keeps, so a span of
/// more (a year of minutes) is more likely a mistake than a wish; a wider span is
/// backfilled a part at a time.
pub(super) const BACKFILL_SLOTS_MAX: usize = 10_000;
/// Starts sent in one request: well under `START_MANY_RUNS_MAX`, so that a progress line
/// follows every hundred slots.
const STARTS_PER_REQUEST: usize = 100;

/// What a backfill asks for: the flow, and its span of slots.
pub(super) struct Backfill<'a> {
    pub flow: &'a str,
    pub since_ms: Millis,
    /// `None`: now.
    pub until_ms: Option<Millis>,
    pub dry_run: bool,
}

/// Starts the run of every slot of the flow's schedule from `since_ms` to `until_ms`
/// (default now), oldest first, with the schedule's input and labels; exit 1 if any start
/// was refused.
pub(super) async fn backfill(client: &Client, request: Backfill<'_>, session: &Session) -> anyhow::Result<ExitCode> {
    let now = now_ms();
    let until_ms = request.until_ms.unwrap_or(now);
    if until_ms > now {
        bail!(
            "--until {} is ahead: the schedule starts the runs of the slots to come by itself; give a time past, or \
             leave --until out for now",
            utc_time(until_ms)
        );
    }
    if request.since_ms >= until_ms {
        bail!("--since {} is not before --until {}", utc_time(request.since_ms), utc_time(until_ms));
    }
    let info = client.flow(request.flow, None).await?;
    let Some(schedule) = info.definition.schedule.clone() else {
        bail!(
            "flow `{}` (version {}) has no schedule: a backfill starts the runs of a schedule's slots (start runs \
             with `flowgrid run start` or `run submit` instead)",
            info.name,
            info.version
        );
    };
    refuse_a_limit_that_cancels(&info)?;
    let timetable = Timetable::of(&schedule).map_err(|error| anyhow::anyhow!("the flow's schedule: {error}"))?;
    let Ok(slots) = timetable.slots_between(request.since_ms, until_ms, BACKFILL_SLOTS_MAX) else {
        bail!("the span holds more than {BACKFILL_SLOTS_MAX} slots of the schedule: backfill a shorter span at a time");
    };
    if request.dry_run {
        if session.json {
            print_json(&json!({"flow": info.name, "slots": slots}))?;
        } else {
            for slot in &slots {
                outln!("{}", utc_time(*slot))?;
            }
            eprintln!("{} slots; nothing started (--dry-run)", slots.len());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (mut started, mut existed, mut refused) = (0_usize, 0_usize, Vec::new());
    for chunk in slots.chunks(STARTS_PER_REQUEST) {
        let starts: Vec<StartRun> =
            chunk.iter().map(|slot| StartRun::for_schedule_slot(info.name.clone(), &schedule, *slot)).collect();
        let outcomes = start_in_requests_that_fit(client, &starts).await.with_context(|| {
            format!(
                "starting the runs of the slots from {} ({started} started so far): run the same backfill again to \
                 go on, the slots that have a run are not started twice",
                utc_time(chunk[0])
            )
        })?;
        for (slot, outcome) in chunk.iter().zip(outcomes) {
            match outcome {
                Ok(run) if run.created => started += 1,
                Ok(_) => existed += 1,
                Err(error) => refused.push((*slot, error.to_string())),
            }
        }
        if !session.json {
            eprintln!(
                "backfill: {} of {} slots ({started} started, {existed} had a run)",
                started + existed,
                slots.len()
            );
        }
    }
    if session.json {
        let refused: Vec<_> = refused.iter().map(|(slot, error)| json!({"slot_ms": slot, "error": error})).collect();
        print_json(&json!({"flow": info.name, "slots": slots.len(), "started": started, "existed": existed,
                           "refused": refused}))?;
    } else {
        let span = match (slots.first(), slots.last()) {
            (Some(first), Some(last)) => format!(" from {} to {}", utc_time(*first), utc_time(*last)),
            _ => String::new(),
        };
        outln!(
            "{} slots of flow {}{span}: {started} runs started, {existed} had a run already, {} refused",
            slots.len(),
            info.name,
            refused.len()
        )?;
        for (slot, error) in &refused {
            outln!("  slot {}: {error}", utc_time(*slot))?;
        }
        if !refused.is_empty() {
            eprintln!("run the same backfill again to start the refused slots: the others are not started twice");
        }
    }
    Ok(if refused.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Refuses a backfill of a flow whose concurrency limit cancels the runs it has no room for
/// (`when_full: cancel_new` or `cancel_oldest`): the backfill starts its slots at once, so
/// all but the first few runs would be cancelled, and each slot would keep its cancelled run
/// (a backfill does not start a slot that has one again).
fn refuse_a_limit_that_cancels(info: &flowgrid_sdk::FlowInfo) -> anyhow::Result<()> {
    let Some(concurrency) = info.definition.concurrency.as_ref() else { return Ok(()) };
    if concurrency.when_full == WhenFull::Queue {
        return Ok(());
    }
    let when_full = concurrency.when_full.as_str();
    bail!(
        "flow `{}` (version {}) has a concurrency limit with `when_full: {when_full}`: a backfill starts all its \
         slots at once, so the limit would cancel the runs past it, and those slots would keep their cancelled runs \
         (a backfill does not start a slot that has a run again); deploy a version with `when_full: queue` for the \
         backfill (its runs then wait their turn), and the version with `when_full: {when_full}` again once those \
         runs have ended",
        info.name,
        info.version
    )
}

/// Starts `starts` in one request or, when that request would be over what one message may
/// carry (a large schedule input), in halves, and so on down to one start a request, as
/// [`flowgrid_sdk::StartBatcher`] does. The outcomes are in the order of `starts`; a start
/// too large on its own fails the whole call.
async fn start_in_requests_that_fit(
    client: &Client,
    starts: &[StartRun],
) -> flowgrid_sdk::Result<Vec<flowgrid_sdk::Result<RunStarted>>> {
    let mut outcomes = Vec::with_capacity(starts.len());
    // The parts still to send, the next one last.
    let mut parts = vec![starts];
    while let Some(part) = parts.pop() {
        match client.start_many(part).await {
            Ok(started) => outcomes.extend(started),
            Err(error) if part.len() > 1 && is_too_large(&error) => {
                let (first, second) = part.split_at(part.len() / 2);
                parts.extend([second, first]);
            }
            Err(error) => return Err(error),
        }
    }
    Ok(outcomes)
}

/// Whether a whole request was refused for its size (the client's check against the NATS
/// server's `max_payload`, or the grid's own).
fn is_too_large(error: &flowgrid_sdk::Error) -> bool {
    error.api().is_some_and(|refusal| refusal.code == ErrorCode::PayloadTooLarge)
}
