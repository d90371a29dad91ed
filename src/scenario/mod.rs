//! `paytrace scenario`: watch the units fail together. Each scenario starts its own
//! `paytrace provider` and `paytrace serve` (this same binary, free loopback ports, a temporary
//! database), drives closed-loop load with fresh idempotency keys, injects one failure at a
//! fixed moment — through the provider's run-time fault control (`PUT /_control/faults`), a
//! signal to the server, or slow clients — removes it later, and prints what happened three
//! ways:
//!
//! - a **timeline** ([`timeline::Row`]), one row per 250 ms: what the clients were answered and
//!   what `/metrics` said at that moment;
//! - the **story** ([`story::story`]): which unit reacted first and how its reaction became
//!   the next unit's input, read off the timeline;
//! - the **invariants** ([`invariants::check_invariants`]), checked against the provider's
//!   `/v1/stats` and the SQLite file (read-only, after the server stopped).
//!
//! Where the runs happen: [`drive`]. The catalogue is [`catalogue`]; `list` prints it.

mod drive;
mod invariants;
mod model;
mod report;
mod story;
mod timeline;

use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};

use model::{Fault, Run};

#[derive(Args, Clone, Debug)]
pub struct ScenarioConfig {
    /// `list`, or the scenario to run (see `paytrace scenario list`).
    #[arg(env = "PAYTRACE_SCENARIO")]
    pub name: String,
    /// How long the load runs (each half, for a scenario with two halves) [default: the
    /// scenario's own, at most 12s]. The failure starts at 20% of it and ends at 60%.
    #[arg(long, env = "PAYTRACE_SCENARIO_DURATION", value_parser = crate::config::parse_positive_duration)]
    pub duration: Option<Duration>,
    /// Seeds the provider's fault draws and the clients' amounts and keys.
    #[arg(long, env = "PAYTRACE_SCENARIO_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Print the timeline, the story and the invariants as one JSON object.
    #[arg(long, env = "PAYTRACE_SCENARIO_JSON")]
    pub json: bool,
}

pub(crate) struct Scenario {
    pub name: &'static str,
    pub summary: &'static str,
    pub default_duration: Duration,
    pub runs: Vec<Run>,
}

fn args(list: &[&str]) -> Vec<String> {
    // No rate limit in the way, and `--sync normal` so fsyncs do not set the pace on a small
    // machine: these scenarios are about the provider and the budget.
    let mut v: Vec<String> = ["--rate-limit", "1000000/s", "--sync", "normal"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(list.iter().map(|s| s.to_string()));
    v
}

/// Every scenario that exists, in the order `list` prints them.
pub(crate) fn catalogue() -> Vec<Scenario> {
    let secs = Duration::from_secs;
    vec![
        Scenario {
            name: "provider-outage",
            summary: "the provider fails every call for a while: 502s, the breaker opens (503 at once), half-opens, closes after recovery",
            default_duration: secs(12),
            runs: vec![Run::new(
                "outage",
                // A 1 s open period instead of 5 s, so one run shows several half-open trials.
                args(&["--breaker-open", "1s"]),
                20,
                Fault::Provider {
                    on: json!({"fail_rate": 1.0}),
                    off: json!({"fail_rate": 0.0}),
                },
                "provider fails every call (500)".into(),
            )],
        },
        Scenario {
            name: "provider-brownout",
            summary: "provider latency x20 (40 ms -> 800 ms) for a while, then recovery: slow calls open the breaker",
            default_duration: secs(12),
            runs: vec![Run::new(
                "brownout",
                args(&["--breaker-open", "2s"]),
                40,
                Fault::Provider {
                    on: json!({"latency_ms": 800}),
                    off: json!({"latency_ms": 40}),
                },
                "provider latency x20 (40 ms -> 800 ms)".into(),
            )],
        },
        Scenario {
            name: "unnested-budget",
            summary: "the same deep brownout twice: nested budgets (provider 1s in a 3s request) vs provider timeout = request timeout",
            default_duration: secs(10),
            runs: vec![
                Run::new(
                    "nested",
                    args(&["--request-timeout", "3s", "--provider-timeout", "1s"]),
                    40,
                    Fault::Provider {
                        on: json!({"latency_ms": 5000}),
                        off: json!({"latency_ms": 40}),
                    },
                    "provider latency 40 ms -> 5 s".into(),
                ),
                Run::new(
                    "unnested",
                    args(&[
                        "--request-timeout",
                        "3s",
                        "--provider-timeout",
                        "3s",
                        "--unnested-budget",
                    ]),
                    40,
                    Fault::Provider {
                        on: json!({"latency_ms": 5000}),
                        off: json!({"latency_ms": 40}),
                    },
                    "provider latency 40 ms -> 5 s".into(),
                ),
            ],
        },
        Scenario {
            name: "retry-storm",
            summary: "the provider fails for a while and clients resend every refusal at once with the same key: breaker, rate limit and idempotency meet",
            default_duration: secs(12),
            runs: vec![Run {
                clients: 3,
                retry: true,
                ..Run::new(
                    "storm",
                    // The default rate limit (100/s for the one API key) is what the storm
                    // meets; three clients stay under it while the provider is well.
                    vec![
                        "--sync".into(),
                        "normal".into(),
                        "--breaker-open".into(),
                        "2s".into(),
                    ],
                    40,
                    Fault::Provider {
                        on: json!({"fail_rate": 1.0}),
                        off: json!({"fail_rate": 0.0}),
                    },
                    "provider fails every call (500), clients retry at once".into(),
                )
            }],
        },
        Scenario {
            name: "sigterm-under-load",
            summary: "SIGTERM while payments are in flight on a slow provider: readiness fails, the listener closes, in-flight payments finish, exit 0",
            default_duration: secs(8),
            runs: vec![Run::new(
                "sigterm",
                args(&[]),
                300,
                Fault::Sigterm,
                "SIGTERM to the server".into(),
            )],
        },
        Scenario {
            name: "crash-and-restart",
            summary: "kill -9 under load, restart on the same database; clients resend what they did not see answered, with the same key",
            default_duration: secs(8),
            runs: vec![Run {
                retry: true,
                ..Run::new(
                    "crash",
                    // `--sync full` (the default): a commit survives the crash of the process.
                    vec!["--rate-limit".into(), "1000000/s".into()],
                    100,
                    Fault::CrashAndRestart,
                    "kill -9 of the server".into(),
                )
            }],
        },
        Scenario {
            name: "slow-database",
            summary: "every write 60 ms slower for a while: the writer falls behind, writes wait past their acquire slice, 503s; the provider is never called for a payment whose claim was not written",
            default_duration: secs(12),
            runs: vec![Run {
                clients: 16,
                ..Run::new(
                    "slow-writes",
                    args(&["--write-delay", "60ms"]),
                    20,
                    Fault::SlowWrites,
                    "every write 60 ms slower (--write-delay, SIGUSR1)".into(),
                )
            }],
        },
        Scenario {
            name: "slow-clients",
            summary: "64 clients send their bodies a byte every 200 ms, straight to the server (its front cuts each off at --socket-timeout), then through the shipped nginx config (which holds them): the payments beside them do not notice",
            default_duration: secs(10),
            runs: [("direct", false), ("nginx", true)]
                .into_iter()
                .map(|(label, via_nginx)| Run {
                    via_nginx,
                    ..Run::new(
                        label,
                        args(&["--socket-timeout", "2s"]),
                        40,
                        Fault::SlowClients { n: 64 },
                        format!(
                            "64 clients sending a byte every 200 ms{}",
                            if via_nginx { ", through nginx" } else { "" }
                        ),
                    )
                })
                .collect(),
        },
    ]
}

/// Runs `paytrace scenario …`; the exit code: 0 when every invariant held, 1 when one failed or
/// the run could not be made, 2 for an unknown name.
pub fn run(config: ScenarioConfig) -> u8 {
    let all = catalogue();
    if config.name == "list" {
        let width = all.iter().map(|s| s.name.len()).max().unwrap_or(0);
        for s in &all {
            println!("{:width$}  {}", s.name, s.summary);
        }
        return 0;
    }
    let Some(scenario) = all.into_iter().find(|s| s.name == config.name) else {
        eprintln!(
            "paytrace scenario: unknown scenario {:?}; `paytrace scenario list` names them",
            config.name
        );
        return 2;
    };
    let duration = config.duration.unwrap_or(scenario.default_duration);
    let mut results = Vec::new();
    for (i, run) in scenario.runs.iter().enumerate() {
        if run.via_nginx && !crate::bench::nginx::installed() {
            eprintln!(
                "paytrace scenario {}: run {} skipped: it needs nginx on PATH (the other runs go on)",
                scenario.name, run.label
            );
            continue;
        }
        if !config.json {
            eprintln!(
                "paytrace scenario {}: run {} ({}), {:.1}s ...",
                scenario.name,
                run.label,
                run.fault_text,
                duration.as_secs_f64()
            );
        }
        match drive::execute(run, duration, config.seed.wrapping_add(i as u64)) {
            Ok(result) => results.push(result),
            Err(e) => {
                eprintln!("paytrace scenario {}: {e}", scenario.name);
                return 1;
            }
        }
    }
    let all_held = results.iter().all(|r| r.invariants.iter().all(|i| i.held));
    if config.json {
        let runs: Vec<Value> = results.iter().map(report::to_json).collect();
        println!(
            "{}",
            json!({
                "scenario": scenario.name,
                "duration_s": duration.as_secs_f64(),
                "seed": config.seed,
                "runs": runs,
                "comparison": story::comparison(&results),
                "invariants_held": all_held,
            })
        );
    } else {
        for r in &results {
            report::print(scenario.name, r);
        }
        if let Some(lines) = story::comparison(&results).as_array()
            && !lines.is_empty()
        {
            println!("side by side:");
            for l in lines {
                println!("  {}", l.as_str().unwrap_or_default());
            }
        }
    }
    if all_held { 0 } else { 1 }
}
