//! `paytrace bench --compare`: the sync server and its async twin (`paytrace-async`), one
//! scenario at a time, against the same simulated provider, alternating A B A B so that a
//! machine that gets busier during the run weighs on both sides alike; each side's two runs
//! are averaged into one side-by-side table.
//!
//! The twin is built only with the `async-twin` feature; it is looked for next to this binary.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use super::{BenchConfig, ThreadPeak, proc_status, spawn_exe};
use crate::load::{self, LoadConfig};

/// One row of the comparison: the same server flags and load for both sides.
struct Case {
    name: String,
    path: &'static str,
    provider_latency_ms: u64,
    serve_args: Vec<String>,
    clients: u32,
}

fn cases() -> Vec<Case> {
    let args = |extra: &[&str]| -> Vec<String> {
        ["--rate-limit", "1000000/s", "--queue", "2048"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let mut list = vec![
        Case {
            name: "GET /healthz".into(),
            path: "/healthz",
            provider_latency_ms: 0,
            serve_args: args(&[]),
            clients: 32,
        },
        Case {
            name: "POST /payments, provider 0 ms, --sync full".into(),
            path: "/payments",
            provider_latency_ms: 0,
            serve_args: args(&["--sync", "full"]),
            clients: 32,
        },
        Case {
            name: "POST /payments, provider 0 ms, --sync normal".into(),
            path: "/payments",
            provider_latency_ms: 0,
            serve_args: args(&["--sync", "normal"]),
            clients: 32,
        },
    ];
    // Many slow calls in flight: where an async server should win. Both sides may run 512 at
    // once (the sync server's workers, the twin's worker permits) and hold 1,100 connections.
    for clients in [32u32, 256, 1024] {
        list.push(Case {
            name: format!("POST /payments, provider 50 ms, {clients} clients"),
            path: "/payments",
            provider_latency_ms: 50,
            serve_args: args(&[
                "--sync",
                "normal",
                "--workers",
                "512",
                "--max-connections",
                "1100",
            ]),
            clients,
        });
    }
    list
}

/// Where the twin is expected: next to this binary.
fn twin_exe(this: &Path) -> PathBuf {
    this.with_file_name("paytrace-async")
}

pub fn run(config: &BenchConfig) -> Result<(), String> {
    let sync = std::env::current_exe().map_err(|e| e.to_string())?;
    let twin = twin_exe(&sync);
    if !twin.is_file() {
        return Err(format!(
            "--compare needs the async twin at {}: build it next to this binary with \
             `cargo build --release --features async-twin` (both binaries land in target/release/)",
            twin.display()
        ));
    }
    let chosen: Vec<Case> = cases()
        .into_iter()
        .filter(|c| {
            config
                .only
                .as_ref()
                .is_none_or(|o| c.name.contains(o.as_str()))
        })
        .collect();
    if chosen.is_empty() {
        return Err("--only names no --compare scenario".into());
    }
    let dir = std::env::temp_dir().join(format!("paytrace-compare-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for (i, case) in chosen.iter().enumerate() {
        let provider = spawn_exe(
            &sync,
            &[
                "provider".into(),
                "--addr".into(),
                "127.0.0.1:0".into(),
                "--latency".into(),
                format!("{}ms", case.provider_latency_ms),
            ],
        )?;
        let mut runs: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
        for (round, side) in [0usize, 1, 0, 1].into_iter().enumerate() {
            let (exe, label) = if side == 0 {
                (&sync, "sync")
            } else {
                (&twin, "async")
            };
            eprintln!(
                "bench --compare: {} ({label}, run {}) …",
                case.name,
                round / 2 + 1
            );
            let mut args: Vec<String> = vec![
                "serve".into(),
                "--addr".into(),
                "127.0.0.1:0".into(),
                "--db".into(),
                dir.join(format!("compare-{i}-{round}.db"))
                    .display()
                    .to_string(),
                "--provider-url".into(),
                provider.1.clone(),
            ];
            args.extend(case.serve_args.iter().cloned());
            let serve = spawn_exe(exe, &args)?;
            runs[side].push(measure(&serve, case, config.duration)?);
        }
        rows.push(json!({
            "scenario": case.name,
            "clients": case.clients,
            "sync": mean(&runs[0]),
            "async": mean(&runs[1]),
        }));
    }
    let _ = std::fs::remove_dir_all(&dir);
    if config.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&Value::Array(rows)).unwrap_or_default()
        );
    } else {
        print!("{}", render(&rows, config.duration));
    }
    Ok(())
}

/// One run against one server: its answers per second (2xx only), latency, peak memory and
/// threads, and the server's CPU time per 2xx answer.
fn measure(serve: &super::Proc, case: &Case, duration: Duration) -> Result<Value, String> {
    let pid = serve.0.id();
    let threads = ThreadPeak::watch(pid);
    let cpu_before = cpu_ticks(pid);
    let summary = load::execute(
        &LoadConfig {
            url: serve.1.clone(),
            api_key: crate::config::DEV_API_KEY.into(),
            concurrency: case.clients,
            duration: Some(duration),
            requests: None,
            rate: None,
            replay_fraction: 0.0,
            path: case.path.into(),
            timeout: Duration::from_secs(10),
            json: true,
        },
        false,
    )
    .map_err(|e| format!("{}: {e}", case.name))?;
    let cpu = cpu_ticks(pid)
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    let peak_threads = threads.stop();
    let rss_kib = proc_status(pid).map_or(0, |(rss, _)| rss);
    let requests = summary["requests"].as_u64().unwrap_or(0);
    let ok: u64 = summary["status"].as_object().map_or(0, |m| {
        m.iter()
            .filter(|(k, _)| k.starts_with('2'))
            .filter_map(|(_, v)| v.as_u64())
            .sum()
    });
    let throughput = summary["throughput"].as_f64().unwrap_or(0.0);
    let ok_per_s = if requests > 0 {
        throughput * ok as f64 / requests as f64
    } else {
        0.0
    };
    // Clock ticks are 1/100 s on Linux (USER_HZ).
    let cpu_us_per_ok = match (cpu, ok) {
        (Some(ticks), ok) if ok > 0 => Some(ticks as f64 * 10_000.0 / ok as f64),
        _ => None,
    };
    Ok(json!({
        "ok_per_s": ok_per_s,
        "p50_ms": summary["latency_ms"]["p50"],
        "p99_ms": summary["latency_ms"]["p99"],
        "peak_rss_mib": rss_kib as f64 / 1024.0,
        "peak_threads": peak_threads,
        "cpu_us_per_ok": cpu_us_per_ok,
        "non_2xx": requests - ok.min(requests),
    }))
}

/// utime + stime of `pid` in clock ticks, from /proc/PID/stat.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields after it start past the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The mean of each numeric field over `runs`, one decimal (null when no run had it).
fn mean(runs: &[Value]) -> Value {
    let mut out = serde_json::Map::new();
    let Some(first) = runs.first().and_then(Value::as_object) else {
        return Value::Object(out);
    };
    for key in first.keys() {
        let values: Vec<f64> = runs.iter().filter_map(|r| r[key].as_f64()).collect();
        let value = if values.is_empty() {
            Value::Null
        } else {
            let m = values.iter().sum::<f64>() / values.len() as f64;
            json!((m * 10.0).round() / 10.0)
        };
        out.insert(key.clone(), value);
    }
    Value::Object(out)
}

/// One Markdown table: per scenario, each measure for sync and async side by side.
fn render(rows: &[Value], duration: Duration) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "sync = paytrace serve, async = paytrace-async serve; same flags, same provider; A B A B, {} each, means of 2 runs",
        humantime::format_duration(duration)
    );
    let _ = writeln!(
        out,
        "| scenario | 2xx/s sync | 2xx/s async | p50 ms sync | p50 ms async | p99 ms sync | p99 ms async | peak RSS MiB sync | peak RSS MiB async | threads sync | threads async | CPU µs/2xx sync | CPU µs/2xx async | non-2xx sync | non-2xx async |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let cell = |v: &Value| match v.as_f64() {
        Some(n) => format!("{n}"),
        None => "—".into(),
    };
    for r in rows {
        let mut line = format!("| {} |", r["scenario"].as_str().unwrap_or(""));
        for key in [
            "ok_per_s",
            "p50_ms",
            "p99_ms",
            "peak_rss_mib",
            "peak_threads",
            "cpu_us_per_ok",
            "non_2xx",
        ] {
            let _ = write!(
                line,
                " {} | {} |",
                cell(&r["sync"][key]),
                cell(&r["async"][key])
            );
        }
        let _ = writeln!(out, "{line}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_side_is_the_mean_of_its_runs_and_a_missing_measure_stays_empty() {
        let runs = [
            json!({"ok_per_s": 100.0, "p99_ms": 10.0, "cpu_us_per_ok": null}),
            json!({"ok_per_s": 200.0, "p99_ms": 15.0, "cpu_us_per_ok": null}),
        ];
        let m = mean(&runs);
        assert_eq!(m["ok_per_s"], 150.0);
        assert_eq!(m["p99_ms"], 12.5);
        assert_eq!(m["cpu_us_per_ok"], Value::Null);
        let table = render(
            &[json!({"scenario": "x", "sync": m, "async": {"ok_per_s": 300.0}})],
            Duration::from_secs(5),
        );
        let row = table.lines().find(|l| l.starts_with("| x |")).unwrap();
        assert!(
            row.starts_with("| x | 150 | 300 | — | — | 12.5 | — |"),
            "{row}"
        );
    }

    #[test]
    fn the_twin_is_looked_for_next_to_this_binary() {
        assert_eq!(
            twin_exe(Path::new("/x/target/release/paytrace")),
            Path::new("/x/target/release/paytrace-async")
        );
    }

    #[test]
    fn cpu_time_is_read_past_a_command_name_with_spaces() {
        // The fields of /proc/self/stat are read the same way for any process.
        assert!(cpu_ticks(std::process::id()).is_some());
    }
}
