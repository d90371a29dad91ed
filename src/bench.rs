//! `paytrace bench`: the reproducible benchmark. It starts its own `paytrace provider` and
//! `paytrace serve` processes (this same binary) on free loopback ports with a temporary
//! database, drives each scenario with [`crate::load`], samples the server's peak memory and
//! thread count from `/proc`, reads the single writer's batch sizes from the server's
//! `/metrics` before and after the load, and prints one table.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};

use crate::load::{self, LoadConfig};
use crate::provider::CHARGES_PATH;

pub mod cluster;
pub mod compare;
pub(crate) mod nginx;

#[derive(Args, Clone, Debug)]
pub struct BenchConfig {
    /// How long each scenario runs, e.g. 5s.
    #[arg(long, env = "PAYTRACE_BENCH_DURATION", default_value = "5s", value_parser = crate::config::parse_positive_duration)]
    pub duration: Duration,
    /// Print the results as JSON.
    #[arg(long, env = "PAYTRACE_BENCH_JSON")]
    pub json: bool,
    /// Run only the scenarios whose name contains this text, e.g. `flood` or `--workers 8`.
    #[arg(long, env = "PAYTRACE_BENCH_ONLY")]
    pub only: Option<String>,
    /// Compare with the async twin: `paytrace serve` and `paytrace-async serve` (built with
    /// `--features async-twin`, next to this binary) against the same provider, A B A B.
    #[arg(long, env = "PAYTRACE_BENCH_COMPARE")]
    pub compare: bool,
    /// Run the PostgreSQL rows instead (`cluster::run`), on this database
    /// (`postgres://USER@HOST:PORT/DB`): one instance, then three behind nginx
    /// (`data/nginx/paytrace-cluster.conf`; needs nginx).
    #[arg(long, env = "PAYTRACE_BENCH_DB")]
    pub db: Option<String>,
}

struct Scenario {
    name: String,
    path: &'static str,
    provider_latency_ms: u64,
    serve_args: Vec<String>,
    concurrency: u32,
    /// Little's law: workers / provider latency.
    little: Option<f64>,
    /// Measure the provider alone first, with this many clients and no server between: what it
    /// gives that many callers at most, on this machine (the bound Little's law meets in fact).
    provider_alone: Option<u32>,
    /// A second, light client in the same server for the same time: (path, concurrency).
    /// The flood row reads how fast its answers come while the main clients are refused.
    probe: Option<(&'static str, u32)>,
}

fn scenarios() -> Vec<Scenario> {
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["--rate-limit", "1000000/s", "--queue", "1024"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let mut list = vec![
        Scenario {
            name: "GET /healthz (ceiling)".into(),
            path: "/healthz",
            provider_latency_ms: 0,
            serve_args: base(&[]),
            concurrency: 32,
            little: None,
            provider_alone: None,
            probe: None,
        },
        Scenario {
            name: "POST /payments, provider 0 ms, --sync full".into(),
            path: "/payments",
            provider_latency_ms: 0,
            serve_args: base(&["--sync", "full"]),
            concurrency: 32,
            little: None,
            provider_alone: None,
            probe: None,
        },
        Scenario {
            name: "POST /payments, provider 0 ms, --sync normal".into(),
            path: "/payments",
            provider_latency_ms: 0,
            serve_args: base(&["--sync", "normal"]),
            concurrency: 32,
            little: None,
            provider_alone: None,
            probe: None,
        },
    ];
    for workers in [8u32, 32, 128] {
        list.push(Scenario {
            name: format!("POST /payments, provider 50 ms, --workers {workers}"),
            path: "/payments",
            provider_latency_ms: 50,
            serve_args: base(&["--sync", "normal", "--workers", &workers.to_string()]),
            // Twice as many clients as workers: a worker that finishes finds the next request
            // already queued, so the workers, not the client's reconnects, set the pace.
            concurrency: workers * 2,
            little: Some(f64::from(workers) / 0.050),
            provider_alone: Some(workers),
            probe: None,
        });
    }
    // Shedding under a flood: far more clients than 2 workers and a queue of 2 can hold, so
    // nearly every payment is refused 503 `overloaded` at admission, while a light client asks
    // /healthz of the same server. A refusal is the cheapest answer there is: its p99 should
    // stay near /healthz's, and the row says how near (`shed_to_healthz_p99`).
    list.push(Scenario {
        name: "POST /payments flood, provider 50 ms, --workers 2 --queue 2".into(),
        path: "/payments",
        provider_latency_ms: 50,
        serve_args: [
            "--rate-limit",
            "1000000/s",
            "--sync",
            "normal",
            "--workers",
            "2",
            "--queue",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        concurrency: 64,
        little: Some(2.0 / 0.050),
        provider_alone: None,
        probe: Some(("/healthz", 2)),
    });
    list
}

/// The flood row's own fields, from the flood's load summary and the /healthz probe's: the
/// refusals' (503) latency, /healthz's latency whatever its status, and their ratio.
fn flood_fields(flood: &Value, probe: &Value) -> Value {
    let shed = &flood["latency_by_status_ms"]["503"];
    let count = |summary: &Value, status: &str| summary["status"][status].as_u64().unwrap_or(0);
    let healthz_requests = probe["requests"].as_u64().unwrap_or(0);
    let (healthz_200, healthz_503) = (count(probe, "200"), count(probe, "503"));
    let shed_p99 = shed["p99"].as_f64();
    let healthz_p99 = probe["latency_ms"]["p99"].as_f64();
    let ratio = match (shed_p99, healthz_p99) {
        (Some(s), Some(h)) if h > 0.0 => Some((s / h * 100.0).round() / 100.0),
        _ => None,
    };
    json!({
        "sheds": count(flood, "503"),
        "shed_p50_ms": shed["p50"].as_f64(),
        "shed_p99_ms": shed_p99,
        "healthz_requests": healthz_requests,
        "healthz_200": healthz_200,
        "healthz_503": healthz_503,
        "healthz_other": healthz_requests - healthz_200 - healthz_503,
        "healthz_p50_ms": probe["latency_ms"]["p50"].as_f64(),
        "healthz_p99_ms": healthz_p99,
        "shed_to_healthz_p99": ratio,
    })
}

/// The `_sum` and `_count` of the histogram `name` in a Prometheus text exposition.
fn histogram_totals(exposition: &str, name: &str) -> Option<(f64, u64)> {
    let sample = |suffix: &str| -> Option<&str> {
        let metric = format!("{name}_{suffix}");
        exposition.lines().find_map(|l| {
            let (key, value) = l.split_once(' ')?;
            (key == metric).then_some(value.trim())
        })
    };
    let sum = sample("sum")?.parse::<f64>().ok()?;
    let count = sample("count")?.parse::<f64>().ok()?;
    Some((sum, count as u64))
}

/// The writer's `paytrace_db_batch_size` totals, scraped from `url`'s `/metrics`; `None` when
/// the server does not export them or cannot be asked.
fn batch_totals(url: &str) -> Option<(f64, u64)> {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent();
    let body = agent
        .get(format!("{url}/metrics"))
        .call()
        .ok()?
        .into_body()
        .read_to_string()
        .ok()?;
    histogram_totals(&body, "paytrace_db_batch_size")
}

/// The batch fields of a row from the totals before and after the load: `commits` (how many
/// transactions the writer committed) and, when there was at least one, `batch_mean` (writes
/// per commit, one decimal). Neither field is ever null: a field without a value is left out.
fn batch_fields(before: Option<(f64, u64)>, after: Option<(f64, u64)>) -> Value {
    let (Some((sum0, count0)), Some((sum1, count1))) = (before, after) else {
        return json!({});
    };
    let commits = count1.saturating_sub(count0);
    if commits == 0 {
        return json!({ "commits": 0 });
    }
    let mean = (sum1 - sum0) / commits as f64;
    json!({ "commits": commits, "batch_mean": (mean * 10.0).round() / 10.0 })
}

/// A child process, killed when dropped.
/// The most threads a process had, sampled every 100 ms on a thread of its own until stopped.
pub(crate) struct ThreadPeak {
    sampling: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    sampler: thread::JoinHandle<()>,
}

impl ThreadPeak {
    pub(crate) fn watch(pid: u32) -> ThreadPeak {
        let sampling = Arc::new(AtomicBool::new(true));
        let peak = Arc::new(AtomicU64::new(0));
        let sampler = {
            let (sampling, peak) = (sampling.clone(), peak.clone());
            thread::spawn(move || {
                while sampling.load(Ordering::Relaxed) {
                    if let Some((_, threads)) = proc_status(pid) {
                        peak.fetch_max(threads, Ordering::Relaxed);
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            })
        };
        ThreadPeak {
            sampling,
            peak,
            sampler,
        }
    }

    /// Stops sampling; the peak seen.
    pub(crate) fn stop(self) -> u64 {
        self.sampling.store(false, Ordering::Relaxed);
        let _ = self.sampler.join();
        self.peak.load(Ordering::Relaxed)
    }
}

pub(crate) struct Proc(pub(crate) Child, pub(crate) String);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts this binary with `args` and waits for its `listening on http://ADDR` line.
pub(crate) fn spawn(args: &[String]) -> Result<Proc, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    spawn_exe(&exe, args)
}

/// Starts `exe` with `args` and waits for its `listening on http://ADDR` line.
pub(crate) fn spawn_exe(exe: &std::path::Path, args: &[String]) -> Result<Proc, String> {
    let mut child = Command::new(exe)
        .args(args)
        .env(
            "RUST_LOG",
            "warn,paytrace::startup=info,paytrace::provider=info",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {args:?}: {e}"))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    break format!("http://{}", rest.split_whitespace().next().unwrap_or(""));
                }
            }
            _ => {
                let _ = child.kill();
                return Err(format!("{args:?} exited before listening"));
            }
        }
    };
    // Keep draining its log so it never blocks on a full pipe.
    thread::spawn(move || lines.for_each(drop));
    Ok(Proc(child, url))
}

/// (peak RSS in KiB, threads) of `pid`, from /proc.
pub(crate) fn proc_status(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmHWM:")?, field("Threads:")?))
}

/// (busy, total) jiffies of all CPUs, from /proc/stat.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    // idle and iowait are the 4th and 5th fields.
    let idle = fields.get(3)? + fields.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// Runs the bench's scenarios against this binary's `serve` (`--compare`: [`compare::run`];
/// `--db postgres://…`: [`cluster::run`]; `main` calls those instead).
pub fn run(config: BenchConfig) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("paytrace-bench-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let chosen: Vec<Scenario> = scenarios()
        .into_iter()
        .filter(|s| {
            config
                .only
                .as_ref()
                .is_none_or(|o| s.name.contains(o.as_str()))
        })
        .collect();
    if chosen.is_empty() {
        let names: Vec<String> = scenarios().into_iter().map(|s| s.name).collect();
        return Err(format!(
            "--only {:?} names no scenario; the scenarios are: {}",
            config.only.as_deref().unwrap_or(""),
            names.join("; ")
        ));
    }
    let mut rows = Vec::new();
    for (i, s) in chosen.iter().enumerate() {
        eprintln!("bench: {} …", s.name);
        let provider = spawn(&[
            "provider".into(),
            "--addr".into(),
            "127.0.0.1:0".into(),
            "--latency".into(),
            format!("{}ms", s.provider_latency_ms),
        ])?;
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--addr".into(),
            "127.0.0.1:0".into(),
            "--db".into(),
            dir.join(format!("bench-{i}.db")).display().to_string(),
            "--provider-url".into(),
            provider.1.clone(),
        ];
        args.extend(s.serve_args.iter().cloned());
        // Before the server starts, so that nothing else runs beside it.
        let provider_alone = match s.provider_alone {
            Some(clients) => {
                let alone = closed_loop(&provider.1, CHARGES_PATH, clients, config.duration);
                let summary = load::execute(&alone, false)
                    .map_err(|e| format!("{}: the provider alone: {e}", s.name))?;
                // A bound is only a bound if every call was a charge.
                let requests = summary["requests"].as_u64().unwrap_or(0);
                let charged = summary["status"]["200"].as_u64().unwrap_or(0);
                if charged < requests {
                    return Err(format!(
                        "{}: the provider alone answered {} of {requests} calls without a charge: {}",
                        s.name,
                        requests - charged,
                        summary["status"]
                    ));
                }
                Some(summary["throughput"].clone())
            }
            None => None,
        };
        let serve = spawn(&args)?;
        let pid = serve.0.id();
        let threads = ThreadPeak::watch(pid);
        let load_config = |path: &str, concurrency: u32| {
            closed_loop(&serve.1, path, concurrency, config.duration)
        };
        let batches_before = batch_totals(&serve.1);
        let cpu_before = cpu_jiffies();
        let probe = s.probe.map(|(path, concurrency)| {
            let probe_config = load_config(path, concurrency);
            thread::spawn(move || load::execute(&probe_config, false))
        });
        let summary = load::execute(&load_config(s.path, s.concurrency), false)
            .map_err(|e| format!("{}: {e}", s.name))?;
        let probe = match probe {
            Some(handle) => Some(
                handle
                    .join()
                    .map_err(|_| format!("{}: the probe's load panicked", s.name))?
                    .map_err(|e| format!("{}: probe: {e}", s.name))?,
            ),
            None => None,
        };
        let cpu_busy = match (cpu_before, cpu_jiffies()) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                ((b1 - b0) as f64 / (t1 - t0) as f64 * 100.0).round()
            }
            _ => f64::NAN,
        };
        let batches_after = batch_totals(&serve.1);
        let peak_threads = threads.stop();
        let rss_kib = proc_status(pid).map(|(rss, _)| rss).unwrap_or(0);
        let requests = summary["requests"].as_u64().unwrap_or(0);
        let ok = summary["status"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| k.starts_with('2'))
                    .map(|(_, v)| v.as_u64().unwrap_or(0))
                    .sum::<u64>()
            })
            .unwrap_or(0);
        let mut row = json!({
            "scenario": s.name,
            "throughput": summary["throughput"],
            "little_bound": s.little,
            "provider_alone": provider_alone,
            "p50_ms": summary["latency_ms"]["p50"],
            "p99_ms": summary["latency_ms"]["p99"],
            "p999_ms": summary["latency_ms"]["p99.9"],
            "peak_rss_mib": (rss_kib as f64 / 1024.0 * 10.0).round() / 10.0,
            "peak_threads": peak_threads,
            "requests": requests,
            "non_2xx": requests - ok,
            "cpu_busy_pct": cpu_busy,
        });
        if let (Some(fields), Value::Object(batch)) = (
            row.as_object_mut(),
            batch_fields(batches_before, batches_after),
        ) {
            fields.extend(batch);
        }
        if let (Some(probe), Some(fields)) = (&probe, row.as_object_mut())
            && let Value::Object(flood) = flood_fields(&summary, probe)
        {
            fields.extend(flood);
        }
        rows.push(row);
        drop(serve);
        drop(provider);
    }
    let _ = std::fs::remove_dir_all(&dir);
    if config.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&Value::Array(rows)).unwrap_or_default()
        );
    } else {
        print!("{}", render_table(&rows, config.duration));
    }
    Ok(())
}

/// A closed-loop load of `concurrency` clients on `url` + `path` for `duration`.
fn closed_loop(url: &str, path: &str, concurrency: u32, duration: Duration) -> LoadConfig {
    LoadConfig {
        url: url.into(),
        api_key: crate::config::DEV_API_KEY.into(),
        concurrency,
        duration: Some(duration),
        requests: None,
        rate: None,
        replay_fraction: 0.0,
        path: path.into(),
        timeout: Duration::from_secs(10),
        json: true,
    }
}

/// The bench's table (and the flood's, when a flood row ran) as Markdown.
fn render_table(rows: &[Value], duration: Duration) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| scenario ({} each, closed loop) | req/s | workers/latency | provider alone | p50 ms | p99 ms | p99.9 ms | peak RSS MiB | threads | CPU busy % | non-2xx | batch |",
        humantime::format_duration(duration)
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let little = r["little_bound"]
            .as_f64()
            .map(|l| format!("{l:.0}"))
            .unwrap_or_else(|| "—".into());
        let batch = r["batch_mean"]
            .as_f64()
            .map_or_else(|| "—".into(), |b| format!("{b:.1}"));
        let alone = r["provider_alone"]
            .as_f64()
            .map_or_else(|| "—".into(), |a| format!("{a:.0}"));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r["scenario"].as_str().unwrap_or(""),
            r["throughput"],
            little,
            alone,
            r["p50_ms"],
            r["p99_ms"],
            r["p999_ms"],
            r["peak_rss_mib"],
            r["peak_threads"],
            r["cpu_busy_pct"],
            r["non_2xx"],
            batch
        );
    }
    let floods: Vec<&Value> = rows.iter().filter(|r| r.get("sheds").is_some()).collect();
    if floods.is_empty() {
        return out;
    }
    let num = |v: &Value| v.as_f64().map_or_else(|| "—".into(), |n| n.to_string());
    out.push('\n');
    let _ = writeln!(
        out,
        "| flood (same run as its row above) | 503 sheds | shed p50 ms | shed p99 ms | /healthz 200 / 503 / other | /healthz p50 ms | /healthz p99 ms | shed p99 / /healthz p99 |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for r in floods {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} / {} / {} | {} | {} | {} |",
            r["scenario"].as_str().unwrap_or(""),
            r["sheds"],
            num(&r["shed_p50_ms"]),
            num(&r["shed_p99_ms"]),
            r["healthz_200"],
            r["healthz_503"],
            r["healthz_other"],
            num(&r["healthz_p50_ms"]),
            num(&r["healthz_p99_ms"]),
            num(&r["shed_to_healthz_p99"]),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flood_row_compares_the_refusals_p99_with_healthz_p99() {
        let flood = json!({
            "requests": 1000,
            "status": {"201": 40, "503": 960},
            "latency_ms": {"p50": 1.5, "p99": 60.0},
            "latency_by_status_ms": {
                "201": {"p50": 100.0, "p99": 140.0},
                "503": {"p50": 1.5, "p99": 96.0},
            },
        });
        let probe = json!({
            "requests": 500,
            "status": {"200": 480, "503": 18, "error": 2},
            "latency_ms": {"p50": 1.0, "p99": 6.0},
        });
        let f = flood_fields(&flood, &probe);
        assert_eq!(f["sheds"], 960);
        // The refusals' own latency, not the run's (which the payments pull up or down).
        assert_eq!(f["shed_p50_ms"], 1.5);
        assert_eq!(f["shed_p99_ms"], 96.0);
        // /healthz: every answer counts, whatever its status.
        assert_eq!(f["healthz_p99_ms"], 6.0);
        assert_eq!(f["healthz_p50_ms"], 1.0);
        assert_eq!(
            (
                &f["healthz_requests"],
                &f["healthz_200"],
                &f["healthz_503"],
                &f["healthz_other"]
            ),
            (&json!(500), &json!(480), &json!(18), &json!(2))
        );
        assert_eq!(f["shed_to_healthz_p99"], 16.0);
    }

    const EXPOSITION: &str = "\
# HELP paytrace_db_batch_size Writes committed together in one transaction by the single writer.
# TYPE paytrace_db_batch_size histogram
paytrace_db_batch_size_bucket{le=\"1\"} 3
paytrace_db_batch_size_bucket{le=\"+Inf\"} 10
paytrace_db_batch_size_sum 85
paytrace_db_batch_size_count 10
paytrace_db_batch_size_other 99
";

    #[test]
    fn the_batch_totals_are_read_from_the_exposition() {
        assert_eq!(
            histogram_totals(EXPOSITION, "paytrace_db_batch_size"),
            Some((85.0, 10))
        );
        assert_eq!(histogram_totals(EXPOSITION, "paytrace_db_commit"), None);
        assert_eq!(histogram_totals("", "paytrace_db_batch_size"), None);
    }

    #[test]
    fn the_mean_batch_is_the_windows_writes_over_its_commits() {
        // 200 writes in 25 commits during the window, whatever came before it.
        let f = batch_fields(Some((85.0, 10)), Some((285.0, 35)));
        assert_eq!(f, json!({"commits": 25, "batch_mean": 8.0}));
        let f = batch_fields(Some((0.0, 0)), Some((10.0, 3)));
        assert_eq!(f["batch_mean"], 3.3);
    }

    #[test]
    fn no_commits_or_no_metric_leave_the_mean_out_instead_of_null() {
        assert_eq!(
            batch_fields(Some((85.0, 10)), Some((85.0, 10))),
            json!({"commits": 0})
        );
        assert_eq!(batch_fields(None, Some((85.0, 10))), json!({}));
        assert_eq!(batch_fields(Some((85.0, 10)), None), json!({}));
    }

    #[test]
    fn the_table_shows_the_mean_batch_or_a_dash_never_null() {
        let row = |scenario: &str, batch: Value| {
            let mut r = json!({
                "scenario": scenario, "throughput": 100.0, "little_bound": null,
                "p50_ms": 1.0, "p99_ms": 2.0, "p999_ms": 3.0, "peak_rss_mib": 9.5,
                "peak_threads": 12, "requests": 500, "non_2xx": 0, "cpu_busy_pct": 50.0,
            });
            if let (Some(r), Value::Object(b)) = (r.as_object_mut(), batch) {
                r.extend(b);
            }
            r
        };
        let rows = [
            row(
                "GET /healthz (ceiling)",
                batch_fields(Some((0.0, 0)), Some((0.0, 0))),
            ),
            row(
                "POST /payments, x",
                batch_fields(Some((0.0, 0)), Some((57.0, 10))),
            ),
            row("from an older server", batch_fields(None, None)),
        ];
        let table = render_table(&rows, Duration::from_secs(5));
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].ends_with("| non-2xx | batch |"), "{table}");
        assert_eq!(lines[1].matches('|').count(), lines[0].matches('|').count());
        assert!(lines[2].ends_with("| 0 | — |"), "{table}");
        assert!(lines[3].ends_with("| 0 | 5.7 |"), "{table}");
        assert!(lines[4].ends_with("| 0 | — |"), "{table}");
        assert!(!table.contains("null"), "{table}");
    }

    #[test]
    fn the_table_puts_the_provider_alone_beside_littles_bound() {
        let row = |little: Value, alone: Value| {
            json!({
                "scenario": "POST /payments, x", "throughput": 595.8, "little_bound": little,
                "provider_alone": alone, "p50_ms": 1.0, "p99_ms": 2.0, "p999_ms": 3.0,
                "peak_rss_mib": 9.5, "peak_threads": 12, "requests": 500, "non_2xx": 0,
                "cpu_busy_pct": 50.0,
            })
        };
        let rows = [
            row(json!(640.0), json!(611.6)),
            row(Value::Null, Value::Null),
        ];
        let table = render_table(&rows, Duration::from_secs(5));
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].contains("| req/s | workers/latency | provider alone | p50 ms |"),
            "{table}"
        );
        assert!(lines[2].contains("| 595.8 | 640 | 612 | 1.0 |"), "{table}");
        assert!(lines[3].contains("| 595.8 | — | — | 1.0 |"), "{table}");
        assert_eq!(lines[1].matches('|').count(), lines[2].matches('|').count());
    }

    #[test]
    fn a_flood_without_refusals_or_healthz_answers_has_no_ratio() {
        let flood = json!({"requests": 3, "status": {"201": 3},
            "latency_by_status_ms": {"201": {"p50": 1.0, "p99": 2.0}}});
        let probe = json!({"requests": 0, "status": {}, "latency_ms": {"p50": 0.0, "p99": 0.0}});
        let f = flood_fields(&flood, &probe);
        assert_eq!(f["sheds"], 0);
        assert!(
            f["shed_p99_ms"].is_null() && f["shed_to_healthz_p99"].is_null(),
            "{f}"
        );
    }
}
