//! The `paytrace` binary: the command line → the chosen subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use paytrace::config::{LogFormat, ProviderConfig, ServeConfig};

#[derive(Parser)]
#[command(
    name = "paytrace",
    version,
    about = "A synchronous, thread-per-request payments server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the payments server.
    Serve(Box<ServeConfig>),
    /// Run the simulated payment provider.
    Provider(ProviderConfig),
    /// Send load to a running server and summarize what came back.
    Load(Box<paytrace::load::LoadConfig>),
    /// Run the reproducible benchmark (starts its own provider and servers) and print a table.
    Bench(paytrace::bench::BenchConfig),
    /// Run a failure scenario (starts its own provider and server): timeline, story, invariants.
    Scenario(paytrace::scenario::ScenarioConfig),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            paytrace::startup::init_logging(config.log_format);
            match paytrace::startup::run_serve(*config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(paytrace::startup::ServeError::Config(reason)) => {
                    eprintln!("paytrace: invalid configuration: {reason}");
                    ExitCode::from(2)
                }
                Err(paytrace::startup::ServeError::Runtime(reason)) => {
                    log::error!("{reason}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Load(config) => {
            paytrace::startup::init_logging(LogFormat::Text);
            match paytrace::load::run(*config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("paytrace load: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Bench(config) => {
            paytrace::startup::init_logging(LogFormat::Text);
            let ran = if config.compare {
                paytrace::bench::compare::run(&config)
            } else if let Some(db) = &config.db {
                paytrace::bench::cluster::run(&config, db)
            } else {
                paytrace::bench::run(config)
            };
            match ran {
                Ok(()) => ExitCode::SUCCESS,
                Err(reason) => {
                    eprintln!("paytrace bench: {reason}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Scenario(config) => {
            paytrace::startup::init_logging(LogFormat::Text);
            ExitCode::from(paytrace::scenario::run(config))
        }
        Command::Provider(config) => {
            paytrace::startup::init_logging(LogFormat::Text);
            match paytrace::provider::sim::run(&config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(reason) => {
                    log::error!("{reason}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::collections::BTreeMap;

    /// Each env var means one thing: no two flags read the same variable, except
    /// `PAYTRACE_API_KEY`, which is the server's keys for both `serve` and `load`.
    #[test]
    fn every_env_var_belongs_to_one_flag() {
        let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for sub in Cli::command().get_subcommands() {
            for arg in sub.get_arguments() {
                if let Some(env) = arg.get_env() {
                    seen.entry(env.to_string_lossy().into_owned())
                        .or_default()
                        .push(format!("{} --{}", sub.get_name(), arg.get_id()));
                }
            }
        }
        for (env, users) in &seen {
            if env == "PAYTRACE_API_KEY" {
                assert_eq!(users, &["serve --api_key", "load --api_key"], "{env}");
            } else {
                assert_eq!(users.len(), 1, "{env} is read by {users:?}");
            }
        }
        assert_eq!(seen["PAYTRACE_ADDR"], ["serve --addr"]);
        assert_eq!(seen["PAYTRACE_PROVIDER_ADDR"], ["provider --addr"]);
        // Every flag of every subcommand has one (help and version are clap's own).
        for sub in Cli::command().get_subcommands() {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" {
                    assert!(
                        arg.get_env().is_some(),
                        "{} --{id} has no env var",
                        sub.get_name()
                    );
                }
            }
        }
    }
}
