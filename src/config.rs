//! Flags and environment variables → [`ServeConfig`] / [`ProviderConfig`].
//!
//! Every flag has an env var (clap's `env`), and each env var means one thing: `serve`'s flags
//! are `PAYTRACE_<FLAG>`; the tools' flags carry their subcommand, `PAYTRACE_PROVIDER_<FLAG>`,
//! `PAYTRACE_LOAD_<FLAG>`, `PAYTRACE_BENCH_<FLAG>`, so that a provider started from the same
//! shell does not take the server's `PAYTRACE_ADDR`. The one variable two subcommands read is
//! `PAYTRACE_API_KEY`, with one meaning: the keys the server accepts (`load` sends the first).
//! Durations are written like `250ms` / `3s` / `24h` (humantime) and sizes like `16KiB`. The one piece of judgement here
//! is [`ServeConfig::validate`]: the nested-budget check that refuses a configuration whose
//! inner timeouts cannot fit inside the request's budget.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// SQLite's `synchronous` pragma, the durability/throughput trade-off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SyncMode {
    /// Durable on power loss: every commit waits for fsync of the WAL.
    Full,
    /// Durable against a process crash, not against power loss; several times faster.
    Normal,
}

/// How the access log and other log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A rate such as `100/s` or `6000/m`: `quota` requests per `window`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub quota: u32,
    pub window: Duration,
}

impl Rate {
    pub fn per_second(&self) -> f64 {
        f64::from(self.quota) / self.window.as_secs_f64()
    }
}

pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let (n, unit) = s
        .split_once('/')
        .ok_or_else(|| format!("rate `{s}` must look like 100/s"))?;
    let quota: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("rate `{s}`: `{n}` is not a whole number"))?;
    let window = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        other => return Err(format!("rate `{s}`: unit `{other}` is not s, m or h")),
    };
    if quota == 0 {
        return Err(format!("rate `{s}` must allow at least one request"));
    }
    Ok(Rate { quota, window })
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|_| format!("`{s}` is not a duration like 250ms or 3s"))
}

/// A duration that must be longer than zero (how long to run, a client timeout).
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("`{s}` must be longer than zero, like 250ms or 3s"));
    }
    Ok(d)
}

/// Parses `16KiB`, `1MiB`, `512B`, `16384`, `16kb` into bytes (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 16KiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        "g" | "gb" | "gib" => 1024 * 1024 * 1024,
        other => return Err(format!("`{s}`: unknown size unit `{other}`")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// `paytrace serve`: every flag of the server.
#[derive(Args, Clone, Debug)]
pub struct ServeConfig {
    /// Listen address; port 0 picks a free port.
    #[arg(long, env = "PAYTRACE_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// SQLite database file; parent directories are created, the schema migrated on start.
    #[arg(long, env = "PAYTRACE_DB", default_value = "data/paytrace.db")]
    pub db: PathBuf,
    /// Worker threads: at most this many requests run at once.
    #[arg(long, env = "PAYTRACE_WORKERS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub workers: u32,
    /// Bounded queue in front of the workers; when it is full requests get 503 overloaded.
    #[arg(long, env = "PAYTRACE_QUEUE", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub queue: u32,
    /// r2d2 SQLite connections.
    #[arg(long = "pool-size", env = "PAYTRACE_POOL_SIZE", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub pool_size: u32,
    /// Request body limit (413 above it), e.g. 16KiB.
    #[arg(long = "max-body", env = "PAYTRACE_MAX_BODY", default_value = "16KiB", value_parser = parse_size)]
    pub max_body: u64,
    /// How long a client has, in total, to send its whole request (and how long one write of the
    /// answer may block): a client that stalls or trickles is cut off.
    #[arg(long = "socket-timeout", env = "PAYTRACE_SOCKET_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub socket_timeout: Duration,
    /// Client connections served at once; one more is answered 503 and closed. Lowered at
    /// start-up, with a warning, if the file-descriptor limit cannot hold this many.
    #[arg(
        long = "max-connections",
        env = "PAYTRACE_MAX_CONNECTIONS",
        default_value_t = 512
    )]
    pub max_connections: u32,
    /// The whole request's budget, from the moment it is read off the socket.
    #[arg(long = "request-timeout", env = "PAYTRACE_REQUEST_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Pool acquisition timeout, each time a connection is borrowed.
    #[arg(long = "acquire-timeout", env = "PAYTRACE_ACQUIRE_TIMEOUT", default_value = "250ms", value_parser = parse_duration)]
    pub acquire_timeout: Duration,
    /// Timeout of one provider call.
    #[arg(long = "provider-timeout", env = "PAYTRACE_PROVIDER_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub provider_timeout: Duration,
    /// Timeout of one write transaction (SQLite busy wait).
    #[arg(long = "write-timeout", env = "PAYTRACE_WRITE_TIMEOUT", default_value = "250ms", value_parser = parse_duration)]
    pub write_timeout: Duration,
    /// Payment provider base URL; without it the simulated provider runs in-process.
    #[arg(long = "provider-url", env = "PAYTRACE_PROVIDER_URL")]
    pub provider_url: Option<String>,
    /// Accepted bearer keys (repeatable; env comma-separated). None: the dev key sk_test_paytrace.
    #[arg(long = "api-key", env = "PAYTRACE_API_KEY", value_delimiter = ',')]
    pub api_key: Vec<String>,
    /// Per API key rate, token bucket with a burst of one second's worth, e.g. 100/s.
    #[arg(long = "rate-limit", env = "PAYTRACE_RATE_LIMIT", default_value = "100/s", value_parser = parse_rate)]
    pub rate_limit: Rate,
    /// SQLite synchronous mode: full (durable on power loss) or normal.
    #[arg(long, env = "PAYTRACE_SYNC", value_enum, default_value_t = SyncMode::Full)]
    pub sync: SyncMode,
    /// Longest graceful drain [default: request timeout + 2s].
    #[arg(long = "drain-timeout", env = "PAYTRACE_DRAIN_TIMEOUT", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// After a signal: keep serving (readiness failing) this long before closing the listener.
    #[arg(long = "shutdown-delay", env = "PAYTRACE_SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
    /// How long a finished idempotency key is kept.
    #[arg(long = "idempotency-ttl", env = "PAYTRACE_IDEMPOTENCY_TTL", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_ttl: Duration,
    /// Breaker: how many of the last provider calls are judged.
    #[arg(long = "breaker-window", env = "PAYTRACE_BREAKER_WINDOW", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub breaker_window: u32,
    /// Breaker: calls recorded before the window is judged at all.
    #[arg(long = "breaker-min-calls", env = "PAYTRACE_BREAKER_MIN_CALLS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub breaker_min_calls: u32,
    /// Breaker: opens when at least this share of the window failed, e.g. 50%.
    #[arg(long = "breaker-failure-rate", env = "PAYTRACE_BREAKER_FAILURE_RATE", default_value = "50%", value_parser = parse_percent)]
    pub breaker_failure_rate: f64,
    /// Breaker: a call slower than this counts as slow.
    #[arg(long = "breaker-slow-call", env = "PAYTRACE_BREAKER_SLOW_CALL", default_value = "500ms", value_parser = parse_duration)]
    pub breaker_slow_call: Duration,
    /// Breaker: opens when at least this share of the window was slow, e.g. 80%.
    #[arg(long = "breaker-slow-rate", env = "PAYTRACE_BREAKER_SLOW_RATE", default_value = "80%", value_parser = parse_percent)]
    pub breaker_slow_rate: f64,
    /// Breaker: how long it stays open, rejecting at once.
    #[arg(long = "breaker-open", env = "PAYTRACE_BREAKER_OPEN", default_value = "5s", value_parser = parse_duration)]
    pub breaker_open: Duration,
    /// Breaker: trial calls let through when half-open.
    #[arg(long = "breaker-half-open-calls", env = "PAYTRACE_BREAKER_HALF_OPEN_CALLS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub breaker_half_open_calls: u32,
    /// For `paytrace scenario unnested-budget` only: start even when the budgets do not nest
    /// (e.g. provider-timeout = request-timeout), to watch what goes wrong. Off by default;
    /// never use it in production.
    #[arg(long = "unnested-budget", env = "PAYTRACE_UNNESTED_BUDGET")]
    pub unnested_budget: bool,
    /// A fault, for `paytrace scenario slow-database` and experiments only: every write takes
    /// this much longer, holding the write transaction as a slow disk would; SIGUSR1 switches
    /// it off and on. Off (0s) by default; never use it in production.
    #[arg(long = "write-delay", env = "PAYTRACE_WRITE_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub write_delay: Duration,
    /// Log format: text or json; the level comes from RUST_LOG (default info).
    #[arg(long = "log-format", env = "PAYTRACE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The API key used when none is configured; a warning says so at start-up.
pub const DEV_API_KEY: &str = "sk_test_paytrace";

impl ServeConfig {
    /// The breaker's thresholds from the `--breaker-*` flags.
    pub fn breaker(&self) -> crate::provider::breaker::BreakerConfig {
        crate::provider::breaker::BreakerConfig {
            window: self.breaker_window as usize,
            min_calls: self.breaker_min_calls as usize,
            failure_rate: self.breaker_failure_rate,
            slow_call: self.breaker_slow_call,
            slow_rate: self.breaker_slow_rate,
            open_for: self.breaker_open,
            half_open_calls: self.breaker_half_open_calls as usize,
        }
    }

    /// The graceful drain limit: `--drain-timeout`, or the request timeout plus 2 s.
    pub fn drain_timeout(&self) -> Duration {
        self.drain_timeout
            .unwrap_or(self.request_timeout + Duration::from_secs(2))
    }

    /// The accepted API keys, and whether they are the dev default.
    pub fn api_keys(&self) -> (Vec<String>, bool) {
        let keys: Vec<String> = self
            .api_key
            .iter()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect();
        if keys.is_empty() {
            (vec![DEV_API_KEY.to_string()], true)
        } else {
            (keys, false)
        }
    }

    /// Refuses a configuration whose budgets do not nest:
    /// `2 × (acquire + write) + provider < request`. The claim phase and the persist phase
    /// each borrow a connection and write once; the provider call sits between them.
    pub fn validate(&self) -> Result<(), String> {
        let ms = |d: Duration| d.as_millis();
        let needed = 2 * (self.acquire_timeout + self.write_timeout) + self.provider_timeout;
        if needed >= self.request_timeout && !self.unnested_budget {
            return Err(format!(
                "budgets do not nest: 2 × (acquire-timeout {}ms + write-timeout {}ms) + provider-timeout {}ms = {}ms, \
                 which must be less than request-timeout {}ms",
                ms(self.acquire_timeout),
                ms(self.write_timeout),
                ms(self.provider_timeout),
                ms(needed),
                ms(self.request_timeout)
            ));
        }
        if self.breaker_min_calls > self.breaker_window {
            return Err(format!(
                "breaker-min-calls {} cannot be more than breaker-window {}: the window would never be judged",
                self.breaker_min_calls, self.breaker_window
            ));
        }
        if self.socket_timeout.is_zero() {
            return Err("socket-timeout must be greater than 0".into());
        }
        if self.max_connections == 0 {
            return Err("max-connections must be greater than 0".into());
        }
        if self.max_body == 0 {
            return Err("max-body must be greater than 0".into());
        }
        if let Some(url) = &self.provider_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(format!(
                "provider-url `{url}` must start with http:// or https://"
            ));
        }
        Ok(())
    }
}

/// `paytrace provider`: the simulated payment provider. Its env vars are
/// `PAYTRACE_PROVIDER_<FLAG>`: `PAYTRACE_ADDR` is the server's.
#[derive(Args, Clone, Debug)]
pub struct ProviderConfig {
    /// Listen address; port 0 picks a free port.
    #[arg(long, env = "PAYTRACE_PROVIDER_ADDR", default_value = "127.0.0.1:9090")]
    pub addr: SocketAddr,
    /// Added to every answer of POST /v1/charges.
    #[arg(long, env = "PAYTRACE_PROVIDER_LATENCY", default_value = "0ms", value_parser = parse_duration)]
    pub latency: Duration,
    /// Uniform random extra latency, 0..=jitter.
    #[arg(long, env = "PAYTRACE_PROVIDER_JITTER", default_value = "0ms", value_parser = parse_duration)]
    pub jitter: Duration,
    /// Fraction of charge requests answered 500 without charging (0.0..=1.0).
    #[arg(long = "fail-rate", env = "PAYTRACE_PROVIDER_FAIL_RATE", default_value_t = 0.0, value_parser = parse_fraction)]
    pub fail_rate: f64,
    /// Fraction of charge requests never answered until the client gives up.
    #[arg(long = "hang-rate", env = "PAYTRACE_PROVIDER_HANG_RATE", default_value_t = 0.0, value_parser = parse_fraction)]
    pub hang_rate: f64,
    /// Fraction of charge requests that charge, then answer 500 or hang.
    #[arg(long = "ambiguous-rate", env = "PAYTRACE_PROVIDER_AMBIGUOUS_RATE", default_value_t = 0.0, value_parser = parse_fraction)]
    pub ambiguous_rate: f64,
    /// Seed for the fault draws, so a run can be repeated exactly.
    #[arg(long, env = "PAYTRACE_PROVIDER_SEED")]
    pub seed: Option<u64>,
}

/// `50%` or `50` → 0.5 (percent, 0 to 100).
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("`{s}` is not a percentage like 50%"))?;
    if (0.0..=100.0).contains(&v) {
        Ok(v / 100.0)
    } else {
        Err(format!("`{s}` is not between 0% and 100%"))
    }
}

pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number between 0 and 1"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("`{s}` is not between 0 and 1"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        serve: ServeConfig,
    }

    fn serve(args: &[&str]) -> ServeConfig {
        let mut all = vec!["x"];
        all.extend_from_slice(args);
        Wrap::try_parse_from(all).expect("parses").serve
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("16KiB"), Ok(16 * 1024));
        assert_eq!(parse_size("1MiB"), Ok(1024 * 1024));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }

    #[test]
    fn rates_parse_with_a_window() {
        let r = parse_rate("100/s").unwrap();
        assert_eq!((r.quota, r.window), (100, Duration::from_secs(1)));
        assert_eq!(parse_rate("60/m").unwrap().per_second(), 1.0);
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("100").is_err());
    }

    #[test]
    fn defaults_nest() {
        let c = serve(&[]);
        assert_eq!(c.request_timeout, Duration::from_secs(3));
        assert_eq!(c.max_body, 16 * 1024);
        assert_eq!(c.drain_timeout(), Duration::from_secs(5));
        assert!(c.validate().is_ok());
        assert_eq!(
            c.breaker(),
            crate::provider::breaker::BreakerConfig::default()
        );
        assert_eq!(parse_percent("50"), Ok(0.5));
        assert!(parse_percent("150%").is_err());
        assert_eq!(c.api_keys(), (vec![DEV_API_KEY.to_string()], true));
    }

    #[test]
    fn budgets_that_do_not_nest_are_refused_naming_the_numbers() {
        let c = serve(&["--request-timeout", "1s", "--provider-timeout", "1s"]);
        let err = c.validate().unwrap_err();
        assert!(err.contains("request-timeout 1000ms"), "{err}");
        assert!(err.contains("provider-timeout 1000ms"), "{err}");
    }
}
