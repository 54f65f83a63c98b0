//! One module per command group; each returns the exit code or an error for
//! [`crate::failure::report`].

mod audit;
mod backfill;
mod flow;
mod grid;
mod many;
mod run;
mod schemas;
mod serve;
mod simulate;
mod tail;
mod watch;

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use flowgrid_sdk::Client;

use crate::args::{Command, FlowCommand, PoolCommand};
use crate::Session;

pub(crate) use grid::{not_joined_hint, status_text, GridReader, NotJoined};
pub(crate) use serve::interrupted;
pub(crate) use tail::{follow as follow_live_output, piece_json};

pub(crate) async fn dispatch(command: Command, session: &Session) -> anyhow::Result<ExitCode> {
    match command {
        Command::Coordinator(config) => serve::coordinator(*config).await,
        Command::Worker(args) => serve::worker(args, session).await,
        Command::HttpWorker(args) => serve::http_worker(args, session).await,
        Command::Flow(FlowCommand::Check { files }) => flow::check(&files, session),
        Command::Flow(FlowCommand::Test { definition, cases }) => simulate::test(&definition, &cases, session),
        Command::Flow(command) => {
            let diff = matches!(command, FlowCommand::Diff { .. });
            match connect(session).await {
                Ok(client) => flow::dispatch(command, &client, session).await,
                // As diff(1): 1 says they differ, so a grid out of reach exits 2.
                Err(error) if diff => {
                    crate::failure::report(&error, session);
                    Ok(ExitCode::from(crate::failure::EXIT_INVALID))
                }
                Err(error) => Err(error),
            }
        }
        Command::Run(command) => run::dispatch(command, &connect(session).await?, session).await,
        Command::Schemas(args) => schemas::schemas(&args),
        Command::Members => grid::members(session).await,
        Command::Workers { pool } => grid::workers(pool.as_deref(), session).await,
        Command::Shards(args) => grid::shards(&args, session).await,
        Command::Status => grid::status(session).await,
        Command::Pool(PoolCommand::Limit { pool, max_in_flight, reset: _ }) => {
            grid::pool_limit(&pool, max_in_flight, session).await
        }
        Command::Task(command) => run::complete_task(command, &connect(session).await?, session).await,
        Command::Audit(args) => audit::audit(&args, session).await,
        Command::Ui(args) => crate::ui::serve(args, session).await,
    }
}

async fn connect(session: &Session) -> anyhow::Result<Client> {
    Ok(session.client().await?)
}

/// The text of a file, or of stdin for `-`.
fn read_text(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("cannot read stdin")?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}
