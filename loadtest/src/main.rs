//! flowgrid-loadtest: drives a flowgrid grid with simulated workers and measures it
//! against the broker floor. See docs/performance.md for the method and the figures.
//! `chaos` instead runs several coordinators under load while it kills, pauses, adds and
//! removes them, and checks that no accepted run is lost (see `chaos/mod.rs`).

// The run summary is one `json!` of some forty keys, past the macro's default depth.
#![recursion_limit = "256"]

mod args;
mod chaos;
mod driver;
mod floor;
mod flows;
mod grid;
mod latency_floor;
mod memory;
mod overload;
mod profile;
mod report;
mod run;
mod service_time;
mod targets;
mod tracker;
mod worker;

use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command};

/// The simulated workers and the tracker allocate small buffers for every message; with
/// glibc's allocator that was a fifth of the harness's CPU, taken from the grid it measures
/// and from the broker floor alike.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The exit status of a process stopped by SIGTERM (128 + 15), as a shell reports it.
const EXIT_TERMINATED: u8 = 143;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = async {
        match cli.command {
            Command::Run(args) => run::run(args).await,
            Command::Memory(args) => memory::memory(args).await,
            Command::Overload(args) => overload::overload(args).await,
            Command::Chaos(args) => chaos::chaos(args).await,
            Command::Targets(args) => targets::targets(args).await,
        }
    };
    // On ctrl-c or SIGTERM (what `timeout`, CI runners and service managers send) the
    // command is dropped, and with it the grid it started.
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(error) => {
            eprintln!("error: cannot listen for SIGTERM: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = tokio::select! {
        outcome = command => outcome,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted; stopping what was started");
            return ExitCode::from(130);
        }
        _ = terminate.recv() => {
            eprintln!("terminated; stopping what was started");
            return ExitCode::from(EXIT_TERMINATED);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
