//! The `paytrace` binary: the command line → the chosen subcommand.

use std::io::Write;
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
            init_logging(config.log_format);
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
            init_logging(LogFormat::Text);
            match paytrace::load::run(*config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("paytrace load: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Bench(config) => {
            init_logging(LogFormat::Text);
            match paytrace::bench::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(reason) => {
                    eprintln!("paytrace bench: {reason}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Scenario(config) => {
            init_logging(LogFormat::Text);
            ExitCode::from(paytrace::scenario::run(config))
        }
        Command::Provider(config) => {
            init_logging(LogFormat::Text);
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

/// Logs to stderr, as text or one JSON object a line. Level info; `RUST_LOG` adds to that
/// (`RUST_LOG=paytrace::trace=debug` turns on the per-hop trace and keeps the rest at info;
/// `RUST_LOG=warn` lowers everything).
fn init_logging(format: LogFormat) {
    let mut builder = env_logger::Builder::new();
    builder.parse_filters("info,tiny_http=off");
    // RUST_LOG's directives replace the defaults of the same name, and add the others;
    // RUST_LOG_STYLE is read too.
    builder.parse_env(env_logger::Env::default());
    if format == LogFormat::Json {
        builder.format(|buf, record| {
            let mut line = serde_json::json!({
                "ts": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
            });
            let msg = record.args().to_string();
            // The access log's message is already a JSON object: its fields join the line.
            match serde_json::from_str::<serde_json::Value>(&msg) {
                Ok(serde_json::Value::Object(fields)) if record.target() == "access" => {
                    if let Some(o) = line.as_object_mut() {
                        o.extend(fields);
                    }
                }
                _ => line["msg"] = serde_json::Value::String(msg),
            }
            writeln!(buf, "{line}")
        });
    }
    builder.init();
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
