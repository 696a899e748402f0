//! The `capsule` binary: the command-line front door to Capsule sessions.
//!
//! # Layout
//!
//! * `main.rs` (this file): argument parsing (clap), logging, exit codes, dispatch.
//! * [`settings`]: the effective [`capsule_session::SessionConfig`] from flags, `CAPSULE_*`
//!   environment and an optional TOML file (explicit flag > environment > file > defaults).
//! * [`model`]: the client event model v1 as serde DTOs (`docs/api.md`). The session types are
//!   deliberately not `Serialize`; this is the edge where they become JSON.
//! * [`exec`]: `capsule exec CODE` and `capsule run FILE` (one cell, streamed to the console).
//! * [`stdio`]: `capsule stdio`, JSON lines per the client event model.
//! * [`repl`]: `capsule repl`, an interactive Python-like prompt (rustyline).
//! * [`front`]: the session of `stdio` and `repl`, taken from a session pool with warm spares
//!   (`--pool-size`), so a crashed worker is replaced without a cold start.
//! * [`doctor`]: `capsule doctor`, what this machine offers.
//! * [`pool`]: every pool configuration of the binary, and `capsule pool status`.
//!
//! **Architecture invariant:** this crate is glue. It never talks to a worker except through
//! `capsule-session`'s public API, and it is the only crate in the workspace allowed `anyhow`.
//!
//! Tests: unit tests beside the code; end-to-end tests spawning the built binary in
//! `tests/cli/` (one test binary, one module per command).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};

mod doctor;
mod exec;
mod front;
mod model;
mod pool;
mod repl;
mod settings;
mod stdio;

/// Exit codes of `capsule exec`/`run` (and the start/usage codes of every command).
pub mod code {
    /// The cell ended `ok` (or the command succeeded).
    pub const OK: u8 = 0;
    /// The cell ended `error` (or another runtime failure, reported on stderr).
    pub const ERROR: u8 = 1;
    /// Bad usage or configuration (flags, config file, `CAPSULE_*` environment).
    pub const USAGE: u8 = 2;
    /// The cell ended `cancelled` or `timed_out`.
    pub const STOPPED: u8 = 3;
    /// The cell ended `worker_lost` or `killed`.
    pub const LOST: u8 = 4;
    /// No session could be started (interpreter missing, worker failed to start, ...).
    pub const START: u8 = 5;
}

const EXIT_CODES_HELP: &str = "\
Exit codes (exec, run):
  0  the cell ended ok
  1  the cell raised (outcome error), or another runtime failure
  2  usage or configuration error
  3  the cell was cancelled or timed out
  4  the worker was lost or killed
  5  no session could be started

Configuration precedence: flags > CAPSULE_* environment > --config FILE > defaults.
Logging: -v/-vv/-vvv or CAPSULE_LOG / RUST_LOG (to stderr).";

/// Run Python cells in persistent, isolated worker processes.
#[derive(Debug, Parser)]
#[command(name = "capsule", version, after_help = EXIT_CODES_HELP)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Options shared by every command that starts a session.
#[derive(Clone, Debug, Default, Args)]
pub struct GlobalArgs {
    /// Python interpreter: a binary, a venv directory or a venv's python.
    #[arg(long, global = true, value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// Default deadline for each cell in milliseconds (0 = none).
    #[arg(long, global = true, value_name = "N")]
    pub timeout_ms: Option<u64>,
    /// TOML config file whose keys mirror the session settings (see docs/api.md).
    #[arg(long, global = true, value_name = "FILE", env = "CAPSULE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log to stderr (default: errors only; -v info, -vv debug, -vvv trace); CAPSULE_LOG /
    /// RUST_LOG also work.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one cell and print its output and value, like a REPL would.
    Exec {
        /// The cell's Python source.
        code: String,
        /// Print one JSON object (output and outcome) at the end instead of streaming.
        #[arg(long)]
        json: bool,
    },
    /// Run a Python file as one cell.
    Run {
        /// The file to run.
        file: PathBuf,
        /// Print one JSON object (output and outcome) at the end instead of streaming.
        #[arg(long)]
        json: bool,
    },
    /// Interactive prompt with line editing, history and multi-line cells.
    Repl {
        #[command(flatten)]
        pool: FrontPoolArgs,
    },
    /// JSON lines on stdin/stdout: the client event model v1 (docs/api.md).
    Stdio {
        #[command(flatten)]
        pool: FrontPoolArgs,
    },
    /// Session pool tools (`capsule pool status [--json]`).
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// Report the interpreter, the worker cache and what the sandbox can use here.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The session pool behind `repl` and `stdio`.
#[derive(Clone, Debug, Default, Args)]
pub struct FrontPoolArgs {
    /// Warm spare sessions kept beside the one in use, so a crashed worker is replaced without
    /// a cold start (default 1, or CAPSULE_POOL_MIN_IDLE; 0: a crash restarts cold).
    #[arg(long, value_name = "N")]
    pub pool_size: Option<usize>,
    /// Announce `ready` (the repl: show the prompt) only once the spares are warm too, so even
    /// a crash in the very first cell finds one. By default `ready` follows the first session
    /// and the spares warm in the background.
    #[arg(long)]
    pub wait_spares: bool,
}

impl FrontPoolArgs {
    /// The pool configuration for `session` (flag > `CAPSULE_POOL_*` environment > defaults).
    fn resolve(
        &self,
        session: capsule_session::SessionConfig,
    ) -> Result<capsule_pool::PoolConfig, Failure> {
        pool::front_door(session, self.pool_size, |k| std::env::var(k).ok()).map_err(Failure::usage)
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("CAPSULE_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .filter(|_| verbose == 0)
        .unwrap_or_else(|| {
            // Quiet by default: per-invocation warnings such as a best-effort sandbox layer that
            // is missing would repeat on every `capsule exec`; `capsule doctor` reports them,
            // and `-v` shows them.
            match verbose {
                0 => "error",
                1 => "info",
                2 => "debug",
                _ => "trace",
            }
            .to_string()
        });
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("capsule: failed to start the async runtime: {e}");
            return ExitCode::from(code::ERROR);
        }
    };
    let result = runtime.block_on(dispatch(cli));
    // Do not wait for blocking readers of stdin (tokio's stdin uses a blocking thread).
    runtime.shutdown_background();
    match result {
        Ok(c) => ExitCode::from(c),
        Err(failure) => {
            eprintln!("capsule: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    /// Exit code (see [`code`]).
    pub code: u8,
    /// What went wrong.
    pub error: anyhow::Error,
}

impl Failure {
    /// A usage or configuration error (exit 2).
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Failure {
            code: code::USAGE,
            error: error.into(),
        }
    }

    /// No session could be started (exit 5).
    pub fn start(error: impl Into<anyhow::Error>) -> Self {
        Failure {
            code: code::START,
            error: error.into(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure {
            code: code::ERROR,
            error,
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Self {
        Failure {
            code: code::ERROR,
            error: error.into(),
        }
    }
}

async fn dispatch(cli: Cli) -> Result<u8, Failure> {
    let global = cli.global;
    match cli.command {
        Some(Command::Exec { code, json }) => {
            let config = settings::resolve(&global)?;
            exec::run_cell(config, code, json).await
        }
        Some(Command::Run { file, json }) => {
            let code = std::fs::read_to_string(&file).map_err(|e| {
                Failure::usage(anyhow::anyhow!("cannot read {}: {e}", file.display()))
            })?;
            let config = settings::resolve(&global)?;
            exec::run_cell(config, code, json).await
        }
        Some(Command::Repl { pool }) => {
            let config = pool.resolve(settings::resolve(&global)?)?;
            repl::run(config, pool.wait_spares).await
        }
        Some(Command::Stdio { pool }) => {
            let config = pool.resolve(settings::resolve(&global)?)?;
            stdio::run(config, pool.wait_spares).await
        }
        Some(Command::Pool(cmd)) => {
            let config = settings::resolve(&global)?;
            pool::run(config, cmd).await
        }
        Some(Command::Doctor { json }) => {
            let config = settings::resolve(&global)?;
            doctor::run(config, json).await
        }
        None => {
            if std::io::stdin().is_terminal() {
                let config = FrontPoolArgs::default().resolve(settings::resolve(&global)?)?;
                repl::run(config, false).await
            } else {
                let _ = Cli::command().print_help();
                Ok(code::OK)
            }
        }
    }
}
