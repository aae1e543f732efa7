//! `omnibus`: the command-line tool for both services (see `omnibus --help`).

mod cli;

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli).await {
        Ok(code) => code,
        // An empty message is a closed stdout: nothing left to say.
        Err(e) if e.0.is_empty() => ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!: a closed stderr must not turn a failure into a panic.
            let _ = writeln!(std::io::stderr(), "omnibus: {e}");
            ExitCode::FAILURE
        }
    }
}
