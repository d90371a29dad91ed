//! `paytrace bench`: the reproducible benchmark. It starts its own `paytrace provider` and
//! `paytrace serve` processes (this same binary) on free loopback ports with a temporary
//! database, drives each scenario with [`crate::load`], samples the server's peak memory and
//! thread count from `/proc`, and prints one table.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};

use crate::load::{self, LoadConfig};

#[derive(Args, Clone, Debug)]
pub struct BenchConfig {
    /// How long each scenario runs, e.g. 5s.
    #[arg(long, env = "PAYTRACE_BENCH_DURATION", default_value = "5s", value_parser = crate::config::parse_positive_duration)]
    pub duration: Duration,
    /// Print the results as JSON.
    #[arg(long, env = "PAYTRACE_BENCH_JSON")]
    pub json: bool,
}

struct Scenario {
    name: String,
    path: &'static str,
    provider_latency_ms: u64,
    serve_args: Vec<String>,
    concurrency: u32,
    /// Little's law: workers / provider latency.
    little: Option<f64>,
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
        },
        Scenario {
            name: "POST /payments, provider 0 ms, --sync full".into(),
            path: "/payments",
            provider_latency_ms: 0,
            serve_args: base(&["--sync", "full"]),
            concurrency: 32,
            little: None,
        },
        Scenario {
            name: "POST /payments, provider 0 ms, --sync normal".into(),
            path: "/payments",
            provider_latency_ms: 0,
            serve_args: base(&["--sync", "normal"]),
            concurrency: 32,
            little: None,
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
        });
    }
    list
}

/// A child process, killed when dropped.
struct Proc(Child, String);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts this binary with `args` and waits for its `listening on http://ADDR` line.
fn spawn(args: &[String]) -> Result<Proc, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
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
fn proc_status(pid: u32) -> Option<(u64, u64)> {
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

pub fn run(config: BenchConfig) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("paytrace-bench-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for (i, s) in scenarios().iter().enumerate() {
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
        let serve = spawn(&args)?;
        let pid = serve.0.id();
        let sampling = Arc::new(AtomicBool::new(true));
        let peak_threads = Arc::new(AtomicU64::new(0));
        let sampler = {
            let (sampling, peak_threads) = (sampling.clone(), peak_threads.clone());
            thread::spawn(move || {
                while sampling.load(Ordering::Relaxed) {
                    if let Some((_, threads)) = proc_status(pid) {
                        peak_threads.fetch_max(threads, Ordering::Relaxed);
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            })
        };
        let cpu_before = cpu_jiffies();
        let summary = load::execute(
            &LoadConfig {
                url: serve.1.clone(),
                api_key: crate::config::DEV_API_KEY.into(),
                concurrency: s.concurrency,
                duration: Some(config.duration),
                requests: None,
                rate: None,
                replay_fraction: 0.0,
                path: s.path.into(),
                timeout: Duration::from_secs(10),
                json: true,
            },
            false,
        )
        .map_err(|e| format!("{}: {e}", s.name))?;
        let cpu_busy = match (cpu_before, cpu_jiffies()) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                ((b1 - b0) as f64 / (t1 - t0) as f64 * 100.0).round()
            }
            _ => f64::NAN,
        };
        sampling.store(false, Ordering::Relaxed);
        let _ = sampler.join();
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
        rows.push(json!({
            "scenario": s.name,
            "throughput": summary["throughput"],
            "little_bound": s.little,
            "p50_ms": summary["latency_ms"]["p50"],
            "p99_ms": summary["latency_ms"]["p99"],
            "p999_ms": summary["latency_ms"]["p99.9"],
            "peak_rss_mib": (rss_kib as f64 / 1024.0 * 10.0).round() / 10.0,
            "peak_threads": peak_threads.load(Ordering::Relaxed),
            "requests": requests,
            "non_2xx": requests - ok,
            "cpu_busy_pct": cpu_busy,
        }));
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
        print_table(&rows, config.duration);
    }
    Ok(())
}

fn print_table(rows: &[Value], duration: Duration) {
    println!(
        "| scenario ({} each, closed loop) | req/s | workers/latency | p50 ms | p99 ms | p99.9 ms | peak RSS MiB | threads | CPU busy % | non-2xx |",
        humantime::format_duration(duration)
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let little = r["little_bound"]
            .as_f64()
            .map(|l| format!("{l:.0}"))
            .unwrap_or_else(|| "—".into());
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r["scenario"].as_str().unwrap_or(""),
            r["throughput"],
            little,
            r["p50_ms"],
            r["p99_ms"],
            r["p999_ms"],
            r["peak_rss_mib"],
            r["peak_threads"],
            r["cpu_busy_pct"],
            r["non_2xx"]
        );
    }
}
