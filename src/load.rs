//! `paytrace load`: a load generator a course can use without other tools. A client only: it
//! imports nothing of the server and speaks plain HTTP.
//!
//! Closed loop (`--concurrency` threads, each sending as soon as its last answer came) or open
//! loop (`--rate`: request *i* is due at start + i/rate, and its latency is measured from that
//! intended time, so a stalled server cannot hide its stalls by slowing the client down —
//! coordinated omission).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::{Value, json};

use crate::config::{parse_fraction, parse_positive_duration};
use crate::provider::CHARGES_PATH;

#[derive(Args, Clone, Debug)]
pub struct LoadConfig {
    /// The server's base URL, with its scheme: http://127.0.0.1:8080.
    #[arg(long, env = "PAYTRACE_LOAD_URL", default_value = "http://127.0.0.1:8080", value_parser = parse_base_url)]
    pub url: String,
    /// Bearer key to send. PAYTRACE_API_KEY is the server's comma-separated list: the first is sent.
    #[arg(
        long = "api-key",
        env = "PAYTRACE_API_KEY",
        default_value = "sk_test_paytrace",
        value_parser = first_key
    )]
    pub api_key: String,
    /// Threads sending at once (closed loop), or at most in flight (open loop).
    #[arg(long, env = "PAYTRACE_LOAD_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// How long to run, e.g. 10s (default 10s unless --requests is given).
    #[arg(long, env = "PAYTRACE_LOAD_DURATION", value_parser = parse_positive_duration)]
    pub duration: Option<Duration>,
    /// How many requests to send in all.
    #[arg(long, env = "PAYTRACE_LOAD_REQUESTS", value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
    /// Open loop: requests per second, sent on schedule whatever the answers.
    #[arg(long, env = "PAYTRACE_LOAD_RATE", value_parser = parse_rate_per_second)]
    pub rate: Option<f64>,
    /// Share of requests that repeat an earlier key with the same body (replays), 0..=1.
    #[arg(
        long = "replay-fraction",
        env = "PAYTRACE_LOAD_REPLAY_FRACTION",
        default_value_t = 0.0,
        value_parser = parse_fraction
    )]
    pub replay_fraction: f64,
    /// The path to load: /payments is POSTed with a fresh Idempotency-Key, and so is
    /// /v1/charges (the simulated provider's charge, to measure the provider alone); any other
    /// is a GET.
    #[arg(long, env = "PAYTRACE_LOAD_PATH", default_value = "/payments")]
    pub path: String,
    /// Client timeout of one request.
    #[arg(long, env = "PAYTRACE_LOAD_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub timeout: Duration,
    /// Print the summary as JSON.
    #[arg(long, env = "PAYTRACE_LOAD_JSON")]
    pub json: bool,
}

/// Why a run could not be done: the command line was wrong (exit 2), or nothing answered
/// (exit 1).
#[derive(Debug, PartialEq, Eq)]
pub enum LoadError {
    Usage(String),
    Unreachable(String),
}

impl LoadError {
    pub fn exit_code(&self) -> u8 {
        match self {
            LoadError::Usage(_) => 2,
            LoadError::Unreachable(_) => 1,
        }
    }
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Usage(m) | LoadError::Unreachable(m) => f.write_str(m),
        }
    }
}

/// `http://host:port` (or https), nothing else: a URL without its scheme is refused here
/// rather than failing every request later.
pub fn parse_base_url(s: &str) -> Result<String, String> {
    let example = "like http://127.0.0.1:8080";
    if !(s.starts_with("http://") || s.starts_with("https://")) {
        return Err(format!(
            "`{s}` is not a URL {example}: it must start with http:// or https://"
        ));
    }
    let uri: ureq::http::Uri = s
        .parse()
        .map_err(|_| format!("`{s}` is not a URL {example}"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{s}` has no host: write a URL {example}"));
    }
    Ok(s.trim_end_matches('/').to_string())
}

/// The key `load` sends: the argument itself, or the first of a comma-separated list (the
/// server's `PAYTRACE_API_KEY` may hold several).
pub fn first_key(s: &str) -> Result<String, String> {
    s.split(',')
        .map(str::trim)
        .find(|k| !k.is_empty())
        .map(str::to_string)
        .ok_or_else(|| "the API key is empty".to_string())
}

fn parse_rate_per_second(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
        _ => Err(format!(
            "`{s}` is not a positive number of requests per second, like 500"
        )),
    }
}

/// What one sender saw.
struct Tally {
    /// The latency of each answer, by its status ("201", "503", or "error" when no HTTP answer
    /// came): a refusal and a payment take different paths through the server, and one
    /// histogram of both would hide how long either takes. Their sum is the run's latency, and
    /// each histogram's length is that status's count.
    latency_us: BTreeMap<String, Histogram<u64>>,
    codes: BTreeMap<String, u64>,
    steps: BTreeMap<String, (f64, u64)>,
}

/// 1 µs .. 1 h, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

impl Tally {
    fn new() -> Tally {
        Tally {
            latency_us: BTreeMap::new(),
            codes: BTreeMap::new(),
            steps: BTreeMap::new(),
        }
    }

    /// Counts one answer of `status` that took `latency`.
    fn answered(&mut self, status: &str, latency: Duration) {
        let _ = self
            .latency_us
            .entry(status.to_string())
            .or_insert_with(histogram)
            .record((latency.as_micros() as u64).clamp(1, 3_600_000_000));
    }

    /// How many answers of each status.
    fn statuses(&self) -> BTreeMap<String, u64> {
        self.latency_us
            .iter()
            .map(|(k, h)| (k.clone(), h.len()))
            .collect()
    }

    /// Every answer's latency, whatever its status.
    fn latency_all(&self) -> Histogram<u64> {
        let mut all = histogram();
        for h in self.latency_us.values() {
            let _ = all.add(h);
        }
        all
    }

    fn merge(&mut self, other: Tally) {
        for (k, h) in other.latency_us {
            match self.latency_us.entry(k) {
                Entry::Vacant(e) => {
                    e.insert(h);
                }
                Entry::Occupied(mut e) => {
                    let _ = e.get_mut().add(&h);
                }
            }
        }
        for (k, v) in other.codes {
            *self.codes.entry(k).or_default() += v;
        }
        for (k, (sum, n)) in other.steps {
            let e = self.steps.entry(k).or_default();
            e.0 += sum;
            e.1 += n;
        }
    }
}

/// Shared between the senders.
struct Plan {
    config: LoadConfig,
    start: Instant,
    end: Option<Instant>,
    issued: AtomicU64,
    stop: AtomicBool,
    /// Keys that were answered, with their amounts: replays pick from these.
    used: Mutex<Vec<(String, u32)>>,
    run_id: String,
    done: AtomicU64,
    /// Answers that arrived before the end of a `--duration` run: the throughput counts these
    /// over the duration, so requests still finishing after it do not stretch the window.
    done_in_window: AtomicU64,
}

impl Plan {
    /// The next request's number and, in open loop, when it is due; `None` when the run is over.
    fn next(&self) -> Option<(u64, Option<Instant>)> {
        if self.stop.load(Ordering::Relaxed) {
            return None;
        }
        let i = self.issued.fetch_add(1, Ordering::Relaxed);
        if self.config.requests.is_some_and(|n| i >= n) {
            return None;
        }
        let due = self
            .config
            .rate
            .map(|r| self.start + Duration::from_secs_f64(i as f64 / r));
        let at = due.unwrap_or_else(Instant::now);
        if self.end.is_some_and(|end| at >= end) {
            return None;
        }
        Some((i, due))
    }
}

/// `paytrace load`: runs, then prints the summary as a table or JSON.
pub fn run(config: LoadConfig) -> Result<(), LoadError> {
    let summary = execute(&config, true)?;
    if config.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).unwrap_or_default()
        );
    } else {
        print_table(&summary);
    }
    Ok(())
}

/// Connects once to the URL's host and port before any load is sent, so that a wrong port or
/// host is one clear error instead of a run of failed requests.
fn preflight(config: &LoadConfig) -> Result<(), LoadError> {
    use std::net::{TcpStream, ToSocketAddrs};
    let url = &config.url;
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|_| LoadError::Usage(format!("--url `{url}` is not a URL")))?;
    let host = uri.host().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| LoadError::Unreachable(format!("cannot resolve {host} (--url {url}): {e}")))?
        .collect();
    let wait = config.timeout.min(Duration::from_secs(3));
    let mut last = String::from("no address");
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, wait) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(LoadError::Unreachable(format!(
        "cannot connect to --url {url} ({last}); is the server running?"
    )))
}

/// Runs the load and returns the summary (the JSON shape `--json` prints).
pub fn execute(config: &LoadConfig, show_progress: bool) -> Result<Value, LoadError> {
    if let Some(r) = config.rate
        && !(r > 0.0 && r.is_finite())
    {
        return Err(LoadError::Usage(
            "--rate must be a positive number of requests per second".into(),
        ));
    }
    if !(0.0..=1.0).contains(&config.replay_fraction) {
        return Err(LoadError::Usage(
            "--replay-fraction must be between 0 and 1".into(),
        ));
    }
    preflight(config)?;
    let duration = match (config.duration, config.requests) {
        (None, None) => Some(Duration::from_secs(10)),
        (d, _) => d,
    };
    let start = Instant::now();
    let plan = Arc::new(Plan {
        end: duration.map(|d| start + d),
        start,
        issued: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        used: Mutex::new(Vec::new()),
        run_id: format!("{:08x}", rand::random::<u32>()),
        done: AtomicU64::new(0),
        done_in_window: AtomicU64::new(0),
        config: config.clone(),
    });
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(config.timeout))
        .max_idle_connections(config.concurrency as usize)
        .max_idle_connections_per_host(config.concurrency as usize)
        .build()
        .new_agent();
    let senders: Vec<_> = (0..config.concurrency)
        .map(|_| {
            let (plan, agent) = (plan.clone(), agent.clone());
            thread::spawn(move || send_loop(&plan, &agent))
        })
        .collect();
    let progress = show_progress.then(|| {
        let plan = plan.clone();
        thread::spawn(move || progress_loop(&plan))
    });
    let mut total = Tally::new();
    for s in senders {
        total.merge(
            s.join()
                .map_err(|_| LoadError::Unreachable("a sender thread panicked".into()))?,
        );
    }
    plan.stop.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        let _ = p.join();
    }
    let (window, answered) = match plan.end {
        Some(end) => (end - start, plan.done_in_window.load(Ordering::Relaxed)),
        None => (start.elapsed(), plan.done.load(Ordering::Relaxed)),
    };
    let statuses = total.statuses();
    let transport_errors = statuses.get("error").copied().unwrap_or(0);
    let requests: u64 = statuses.values().sum();
    if requests > 0 && transport_errors == requests {
        let causes: Vec<String> = total
            .codes
            .iter()
            .map(|(k, v)| format!("{v} × {k}"))
            .collect();
        return Err(LoadError::Unreachable(format!(
            "no request got an answer from {}: {}",
            config.url,
            causes.join(", ")
        )));
    }
    Ok(summarize(
        config,
        &total,
        start.elapsed(),
        answered as f64 / window.as_secs_f64(),
    ))
}

fn send_loop(plan: &Plan, agent: &ureq::Agent) -> Tally {
    let mut tally = Tally::new();
    let mut rng = rand::rng();
    let cfg = &plan.config;
    // What a new charge is answered with: a payment is created (201), a provider's charge made
    // (200); `None` for a path that is only read.
    let created = match cfg.path.as_str() {
        "/payments" => Some(201),
        CHARGES_PATH => Some(200),
        _ => None,
    };
    while let Some((i, due)) = plan.next() {
        if let Some(due) = due {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
        }
        let sent = due.unwrap_or_else(Instant::now);
        let url = format!("{}{}", cfg.url.trim_end_matches('/'), cfg.path);
        let result = if let Some(created) = created {
            let replay = if rng.random_bool(cfg.replay_fraction) {
                let used = plan.used.lock().unwrap_or_else(|e| e.into_inner());
                (!used.is_empty()).then(|| used[rng.random_range(0..used.len())].clone())
            } else {
                None
            };
            let (key, amount) = replay.unwrap_or_else(|| {
                (
                    format!("load-{}-{i}", plan.run_id),
                    rng.random_range(100..100_000),
                )
            });
            let body = format!(r#"{{"amount":{amount},"currency":"usd","source":"tok_visa"}}"#);
            let r = agent
                .post(&url)
                .header("Authorization", format!("Bearer {}", cfg.api_key))
                .header("Idempotency-Key", &key)
                .header("Content-Type", "application/json")
                .send(body.as_bytes());
            if matches!(&r, Ok(resp) if resp.status().as_u16() == created) {
                plan.used
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((key, amount));
            }
            r
        } else {
            agent
                .get(&url)
                .header("Authorization", format!("Bearer {}", cfg.api_key))
                .call()
        };
        record(&mut tally, result, sent);
        plan.done.fetch_add(1, Ordering::Relaxed);
        if plan.end.is_none_or(|end| Instant::now() <= end) {
            plan.done_in_window.fetch_add(1, Ordering::Relaxed);
        }
    }
    tally
}

fn record(
    tally: &mut Tally,
    result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    sent: Instant,
) {
    let latency = sent.elapsed();
    let mut response = match result {
        Ok(r) => r,
        Err(e) => {
            tally.answered("error", latency);
            *tally
                .codes
                .entry(format!("transport: {}", short_error(&e)))
                .or_default() += 1;
            return;
        }
    };
    let status = response.status().as_u16();
    tally.answered(&status.to_string(), latency);
    if let Some(timing) = response
        .headers()
        .get("Server-Timing")
        .and_then(|v| v.to_str().ok())
    {
        for entry in crate::server_timing::parse(timing) {
            let e = tally.steps.entry(entry.name).or_default();
            e.0 += entry.dur_ms;
            e.1 += 1;
        }
    }
    let body = response.body_mut().read_to_string().unwrap_or_default();
    if status >= 400
        && let Ok(v) = serde_json::from_str::<Value>(&body)
        && let Some(code) = v["code"].as_str()
    {
        *tally.codes.entry(format!("{status} {code}")).or_default() += 1;
    }
}

fn short_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(_) => "timeout".into(),
        ureq::Error::Io(io) => format!("{:?}", io.kind()),
        other => other.to_string().chars().take(60).collect(),
    }
}

fn progress_loop(plan: &Plan) {
    let tty = std::io::stderr().is_terminal();
    let mut last = 0;
    let mut tick = Instant::now();
    while !plan.stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(100));
        if tick.elapsed() < Duration::from_secs(1) {
            continue;
        }
        tick = Instant::now();
        let done = plan.done.load(Ordering::Relaxed);
        let line = format!(
            "[{:>4.0}s] {done} requests, {} in the last second",
            plan.start.elapsed().as_secs_f64(),
            done - last
        );
        last = done;
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }
    if tty {
        eprintln!();
    }
}

/// The percentiles of one histogram of µs, in ms.
fn percentiles_ms(h: &Histogram<u64>) -> Value {
    let ms = |us: u64| us as f64 / 1000.0;
    json!({
        "p50": ms(h.value_at_quantile(0.5)),
        "p90": ms(h.value_at_quantile(0.9)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p99.9": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
        "mean": (h.mean() / 10.0).round() / 100.0,
    })
}

fn summarize(config: &LoadConfig, t: &Tally, elapsed: Duration, throughput: f64) -> Value {
    let statuses = t.statuses();
    let requests: u64 = statuses.values().sum();
    let by_status: BTreeMap<&str, Value> = t
        .latency_us
        .iter()
        .map(|(k, h)| (k.as_str(), percentiles_ms(h)))
        .collect();
    let steps: BTreeMap<&str, f64> = t
        .steps
        .iter()
        .map(|(k, (sum, n))| (k.as_str(), (sum / *n as f64 * 100.0).round() / 100.0))
        .collect();
    let mut limits = Vec::new();
    for (code, n) in &t.codes {
        let hint = if code.starts_with("429") {
            "the per-key rate limit: raise `serve --rate-limit`"
        } else if code == "503 overloaded" {
            "the worker queue was full or the pool timed out: raise `serve --workers` / `--queue` (or `--pool-size`, `--acquire-timeout`)"
        } else if code == "503 provider-unavailable" {
            "the provider failed and the breaker opened, or it was unreachable: see `--provider-url` and `--breaker-*`"
        } else if code.starts_with("504") {
            "the request budget ran out: `--request-timeout`, `--provider-timeout`"
        } else if code == "503 shutting-down" {
            "the server was shutting down"
        } else {
            continue;
        };
        limits.push(json!({"code": code, "count": n, "limit": hint}));
    }
    json!({
        "url": config.url,
        "path": config.path,
        "mode": if config.rate.is_some() { "open" } else { "closed" },
        "concurrency": config.concurrency,
        "rate": config.rate,
        "requests": requests,
        "duration_s": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        "throughput": (throughput * 10.0).round() / 10.0,
        "status": statuses,
        "codes": t.codes,
        "latency_ms": percentiles_ms(&t.latency_all()),
        "latency_by_status_ms": by_status,
        "server_timing_mean_ms": steps,
        "limits_hit": limits,
    })
}

fn print_table(s: &Value) {
    println!(
        "{} requests in {} s ({} loop, concurrency {}): {} requests/s",
        s["requests"],
        s["duration_s"],
        s["mode"].as_str().unwrap_or(""),
        s["concurrency"],
        s["throughput"]
    );
    let statuses: Vec<String> = s["status"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}: {v}")).collect())
        .unwrap_or_default();
    println!("status      {}", statuses.join(", "));
    let transport: Vec<String> = s["codes"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix("transport: ")
                        .map(|cause| format!("{v} × {cause}"))
                })
                .collect()
        })
        .unwrap_or_default();
    if !transport.is_empty() {
        println!("errors      {} (no HTTP answer)", transport.join(", "));
    }
    let l = &s["latency_ms"];
    println!(
        "latency ms  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        l["p50"], l["p90"], l["p99"], l["p99.9"], l["max"]
    );
    // With more than one status, each one's own latency: a fast refusal and a slow payment
    // mixed in one line say little about either.
    if let Some(by_status) = s["latency_by_status_ms"]
        .as_object()
        .filter(|m| m.len() > 1)
    {
        for (status, l) in by_status {
            println!(
                "  {status:<9} p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                l["p50"], l["p90"], l["p99"], l["p99.9"], l["max"]
            );
        }
    }
    if let Some(steps) = s["server_timing_mean_ms"]
        .as_object()
        .filter(|m| !m.is_empty())
    {
        let order = ["queue", "acquire", "claim", "provider", "persist", "total"];
        let line: Vec<String> = order
            .iter()
            .filter_map(|k| steps.get(*k).map(|v| format!("{k} {v}")))
            .collect();
        println!("server ms   {} (means of Server-Timing)", line.join("  "));
    }
    if let Some(limits) = s["limits_hit"].as_array() {
        for l in limits {
            println!(
                "limit hit   {} × {}: {}",
                l["count"],
                l["code"].as_str().unwrap_or(""),
                l["limit"].as_str().unwrap_or("")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_needs_its_scheme_and_a_host() {
        assert_eq!(
            parse_base_url("http://127.0.0.1:8080/"),
            Ok("http://127.0.0.1:8080".to_string())
        );
        let err = parse_base_url("127.0.0.1:8080").unwrap_err();
        assert!(err.contains("must start with http://"), "{err}");
        assert!(parse_base_url("http://").is_err());
        assert!(parse_base_url("http:// spaces").is_err());
    }

    #[test]
    fn the_first_of_the_servers_keys_is_sent() {
        assert_eq!(first_key("sk_a"), Ok("sk_a".to_string()));
        assert_eq!(first_key(" sk_a , sk_b"), Ok("sk_a".to_string()));
        assert!(first_key(" , ").is_err());
    }

    #[test]
    fn each_status_has_its_own_percentiles_and_together_they_make_the_runs() {
        let config = LoadConfig {
            url: "http://127.0.0.1:1".into(),
            api_key: "sk".into(),
            concurrency: 2,
            duration: None,
            requests: Some(300),
            rate: None,
            replay_fraction: 0.0,
            path: "/payments".into(),
            timeout: Duration::from_secs(1),
            json: true,
        };
        // Two senders: one saw 100 refusals of 1 ms; the other 198 payments of 50 ms, two
        // refusals of 90 ms and no answer once.
        let mut a = Tally::new();
        for _ in 0..100 {
            a.answered("503", Duration::from_millis(1));
        }
        let mut b = Tally::new();
        for _ in 0..198 {
            b.answered("201", Duration::from_millis(50));
        }
        for _ in 0..2 {
            b.answered("503", Duration::from_millis(90));
        }
        b.answered("error", Duration::from_millis(7));
        a.merge(b);
        let s = summarize(&config, &a, Duration::from_secs(1), 301.0);

        assert_eq!(s["requests"], 301);
        assert_eq!(s["status"], json!({"201": 198, "503": 102, "error": 1}));
        let p = |status: &str, q: &str| s["latency_by_status_ms"][status][q].as_f64().unwrap();
        // Within the histogram's 3 significant digits.
        let near = |got: f64, want: f64| (got - want).abs() <= want / 500.0;
        assert!(near(p("503", "p50"), 1.0), "{s}");
        // 2 of 102 refusals are slow: more than 1 %, so the refusals' p99 is theirs.
        assert!(near(p("503", "p99"), 90.0), "{s}");
        assert!(near(p("503", "max"), 90.0), "{s}");
        assert!(near(p("201", "p50"), 50.0), "{s}");
        assert!(near(p("201", "p99"), 50.0), "{s}");
        assert!(near(p("error", "p50"), 7.0), "{s}");
        // The run's own percentiles mix all of them: the median is a payment.
        let all = |q: &str| s["latency_ms"][q].as_f64().unwrap();
        assert!(near(all("p50"), 50.0), "{s}");
        assert!(near(all("p99"), 50.0), "{s}");
        assert!(near(all("max"), 90.0), "{s}");
        assert!(
            near(all("mean"), (100.0 + 198.0 * 50.0 + 180.0 + 7.0) / 301.0),
            "{s}"
        );
    }

    #[test]
    fn rates_must_be_positive() {
        assert_eq!(parse_rate_per_second("500"), Ok(500.0));
        for bad in ["0", "-1", "banana", "inf", "NaN"] {
            assert!(parse_rate_per_second(bad).is_err(), "{bad}");
        }
    }
}
