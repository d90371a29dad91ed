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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            init_logging(config.log_format);
            match paytrace::app::run_serve(*config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(paytrace::app::ServeError::Config(reason)) => {
                    eprintln!("paytrace: invalid configuration: {reason}");
                    ExitCode::from(2)
                }
                Err(paytrace::app::ServeError::Runtime(reason)) => {
                    log::error!("{reason}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Load(config) => {
            init_logging(LogFormat::Text);
            match paytrace::load::run(*config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(reason) => {
                    eprintln!("paytrace load: {reason}");
                    ExitCode::from(2)
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

/// Logs to stderr, level from `RUST_LOG` (default info), as text or one JSON object a line.
fn init_logging(format: LogFormat) {
    let mut builder = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,tiny_http=off"),
    );
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
