//! The `flowgrid` command: run coordinators and demo workers, deploy flows, start and
//! inspect runs, and keep the wire schemas in sync.
//!
//! Data goes to stdout (tables by default, JSON with `--json`); logs and diagnostics go
//! to stderr. Exit codes: 0 success, 1 failure (including a run that did not succeed
//! under `run start --wait`), 2 bad usage or an invalid flow definition.

mod args;
mod commands;
pub mod demo_workers;
mod failure;
mod grid_view;
mod history;
pub mod http_worker;
mod output;
mod ui;

use std::ffi::{OsStr, OsString};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use tracing_subscriber::EnvFilter;

pub use args::{Cli, Command};
use flowgrid_proto::{ApiError, ErrorCode, Reply};
use flowgrid_sdk::{Client, NatsOptions};

/// How long leftover background work may delay the exit once a command is done.
const RUNTIME_SHUTDOWN_GRACE: Duration = Duration::from_millis(200);

/// What every command needs from the global flags.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    pub nats_url: String,
    /// Credentials and TLS for NATS.
    pub nats_options: NatsOptions,
    pub prefix: String,
    pub json: bool,
}

impl Session {
    /// A NATS connection named `name` (shown in the server's connection list).
    pub(crate) async fn nats(&self, name: &str) -> flowgrid_sdk::Result<async_nats::Client> {
        self.nats_options.connect(&self.nats_url, name).await
    }

    /// A client of the grid.
    pub(crate) async fn client(&self) -> flowgrid_sdk::Result<Client> {
        Client::connect_with(&self.nats_url, self.prefix.clone(), &self.nats_options).await
    }
}

/// The exit status a shell gives a process whose output pipe closed (128 + SIGPIPE).
pub(crate) const EXIT_PIPE_CLOSED: i32 = 141;

/// `flowgrid run list | head`: once the reader has gone, printing to stdout or stderr
/// fails; the command then ends quietly with [`EXIT_PIPE_CLOSED`], as other Unix tools do,
/// instead of a panic and its message.
fn end_quietly_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload.downcast_ref::<String>().map(String::as_str).or(payload.downcast_ref::<&str>().copied());
        if message
            .is_some_and(|message| message.starts_with("failed printing to std") && message.contains("Broken pipe"))
        {
            std::process::exit(EXIT_PIPE_CLOSED);
        }
        default(info);
    }));
}

/// Parses the command line, runs the command and returns the process exit code.
pub fn main() -> ExitCode {
    end_quietly_on_closed_pipe();
    let matches = match Cli::command().try_get_matches() {
        Ok(matches) => matches,
        Err(error) => return refuse_usage(&error),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => return refuse_usage(&error),
    };
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let session = Session {
        nats_url: cli.nats_url.clone(),
        nats_options: cli.nats.clone(),
        prefix: cli.prefix.clone(),
        json: cli.json,
    };
    let mut command = cli.command;
    // `flowgrid --nats-url X coordinator`: the flag before the subcommand wins over the
    // coordinator's own default.
    if let Command::Coordinator(config) = &mut command {
        if given("nats_url") {
            config.nats_url = session.nats_url.clone();
        }
        if given("prefix") {
            config.prefix = session.prefix.clone();
        }
        config.nats = session.nats_options.clone();
    }
    let serving = matches!(command, Command::Coordinator(_) | Command::Worker(_) | Command::HttpWorker(_));
    // A command that cannot connect says why in its error; the client's own log of the
    // same failure would only repeat it.
    init_tracing(if serving { "info" } else { "warn,async_nats::connector=off" });

    // Blocking work (opening shard files, scanning them) is short; a bounded pool keeps a
    // coordinator that opens hundreds of shards at once from starting hundreds of threads.
    // Shard actors evaluate flows' expressions on the runtime's threads.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .thread_stack_size(flowgrid_model::expr::EVALUATION_STACK_BYTES)
        .max_blocking_threads(BLOCKING_THREADS_MAX)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(commands::dispatch(command, &session));
    // Work still pending here (a detached blocking call) must not delay the exit.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_GRACE);
    match outcome {
        Ok(code) => code,
        Err(error) => failure::report(&error, &session),
    }
}

/// Reports bad usage clap found (or prints the help or version asked for) and returns
/// clap's exit code: 2 for bad usage. Under `--json` bad usage is also one JSON answer on
/// stdout, `invalid_request` with clap's message, as every other failure is.
fn refuse_usage(error: &clap::Error) -> ExitCode {
    if error.use_stderr() && json_asked(&Cli::command(), std::env::args_os(), |name| std::env::var_os(name)) {
        // Rendered as plain text: the colours are for the terminal, on stderr.
        let rendered = error.render().to_string();
        let message = rendered.trim().strip_prefix("error: ").unwrap_or(rendered.trim());
        let _ = output::print_json(&Reply::<()>::Error(ApiError::new(ErrorCode::InvalidRequest, message)));
    }
    let _ = error.print();
    ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(failure::EXIT_INVALID))
}

/// Whether an invocation clap refused asks for JSON answers, as `--json` is declared: the
/// flag anywhere before `--` (also past the argument clap stopped at), or its variable set
/// to `true` (the value clap takes as on). `args` starts with the program's name.
fn json_asked(
    command: &clap::Command,
    args: impl IntoIterator<Item = OsString>,
    env: impl Fn(&OsStr) -> Option<OsString>,
) -> bool {
    let Some(json) = command.get_arguments().find(|arg| arg.get_id() == "json") else { return false };
    let flag = json.get_long().map(|long| format!("--{long}"));
    let given = args
        .into_iter()
        .skip(1)
        .take_while(|arg| arg != "--")
        .any(|arg| flag.as_deref().is_some_and(|flag| arg == flag));
    given || json.get_env().and_then(env).is_some_and(|value| value == "true")
}

/// Threads for blocking work: shard files opened and scanned at once.
const BLOCKING_THREADS_MAX: usize = 64;

/// Logs go to stderr, filtered by `FLOWGRID_LOG`, else `RUST_LOG`, else `default_level`.
fn init_tracing(default_level: &str) {
    let directives = std::env::var("FLOWGRID_LOG").or_else(|_| std::env::var("RUST_LOG")).ok();
    let filter = directives
        .as_deref()
        .and_then(|directives| match EnvFilter::try_new(directives) {
            Ok(filter) => Some(filter),
            Err(error) => {
                eprintln!("warning: ignoring the log filter {directives:?}: {error}");
                None
            }
        })
        .unwrap_or_else(|| EnvFilter::new(default_level));
    let colored = std::io::stderr().is_terminal();
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colored).init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_asked_by_the_flag_anywhere_before_a_double_dash_or_by_its_variable_set_to_true() {
        let asked = |args: &[&str], variable: Option<&str>| {
            let args = std::iter::once("flowgrid").chain(args.iter().copied()).map(OsString::from);
            json_asked(&Cli::command(), args, |name| {
                assert_eq!(name, "FLOWGRID_JSON");
                variable.map(OsString::from)
            })
        };
        assert!(asked(&["--json", "shards", "--all", "--history", "5"], None));
        assert!(asked(&["run", "list", "--status", "done", "--json"], None), "past the bad value");
        assert!(asked(&["run", "list", "--status", "done"], Some("true")));
        assert!(!asked(&["run", "list", "--status", "done"], None));
        assert!(!asked(&["run", "list", "--status", "done"], Some("1")), "clap refuses 1 for it");
        assert!(!asked(&["run", "list", "--status", "done"], Some("false")));
        assert!(!asked(&["run", "signal", "r", "s", "--", "--json"], None), "a value after --");
        assert!(!asked(&["run", "list", "--json=true"], None), "clap refuses a value for the flag");
    }
}
