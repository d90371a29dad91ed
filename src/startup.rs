//! Start-up: builds the collaborators once ([`App`]), binds, and serves until stopped, then
//! tears down (unit 07). The one place that knows how the parts are wired together.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::app::App;
use crate::clock::{Clock, SystemClock};
use crate::config::{LogFormat, ProviderConfig, ServeConfig};
use crate::deadline::Timeouts;
use crate::edge::auth::ApiKeys;
use crate::edge::live::board::{self, Board, Controls};
use crate::edge::ratelimit::RateLimiter;
use crate::edge::{dispatch, front};
use crate::flow::reconciler;
use crate::lifecycle::shutdown;
use crate::metrics::Metrics;
use crate::provider::client::ProviderClient;
use crate::provider::sim;
use crate::store::engine::Store;
use crate::store::writer::{BatchObserver, BatchReport};

/// Logs to stderr, as text or one JSON object a line. Level info; `RUST_LOG` adds to that
/// (`RUST_LOG=paytrace::trace=debug` turns on the per-hop trace and keeps the rest at info;
/// `RUST_LOG=warn` lowers everything).
pub fn init_logging(format: LogFormat) {
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

/// Why `serve` stopped with an error: configuration (exit 2) or at run time (exit 1).
#[derive(Debug)]
pub enum ServeError {
    Config(String),
    Runtime(String),
}

/// Builds the dependencies, binds, logs `listening on http://ADDR`, and serves until SIGTERM or
/// SIGINT.
pub fn run_serve(config: ServeConfig) -> Result<(), ServeError> {
    let Built {
        app,
        listener,
        provider_url,
    } = build(config)?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServeError::Runtime(e.to_string()))?;
    let stop = shutdown::install_signal_handlers().map_err(ServeError::Runtime)?;
    let background_stop = Arc::new(AtomicBool::new(false));
    let housekeeping =
        reconciler::spawn(app.clone(), background_stop.clone()).map_err(ServeError::Runtime)?;
    announce(&app, addr, &provider_url);
    // Runs until a signal, then performs steps 1–3 of the shutdown (src/lifecycle/shutdown.rs).
    dispatch::run(app.clone(), listener, stop).map_err(ServeError::Runtime)?;
    shutdown::teardown(&app, &background_stop, housekeeping);
    Ok(())
}

/// What [`build`] made: the collaborators, the bound listener, and the provider's URL.
pub struct Built {
    pub app: Arc<App>,
    pub listener: TcpListener,
    pub provider_url: String,
}

/// Logs the start-up line both servers write, which scripts, tests and the bench wait for.
pub fn announce(app: &App, addr: SocketAddr, provider_url: &str) {
    log::info!(
        "listening on http://{addr} (workers {}, queue {}, pool {}, connections {}, db {}); provider {}",
        app.config.workers,
        app.config.queue,
        app.config.pool_size,
        app.config.max_connections,
        app.config.db.display(),
        provider_url
    );
}

/// Validates the configuration, builds the collaborators once (metrics, the pool and its
/// writer, the provider — the simulated one in-process without `--provider-url`), and binds.
pub fn build(mut config: ServeConfig) -> Result<Built, ServeError> {
    config.validate().map_err(ServeError::Config)?;
    // Descriptors besides the connections': SQLite keeps three per pooled connection (database,
    // WAL, shared memory); each worker's provider connection costs one here and, with the
    // simulated provider in-process, up to three on its side; a margin for the rest.
    let reserved = 64 + 3 * u64::from(config.pool_size) + 4 * u64::from(config.workers);
    let fit = front::fit_connections(config.max_connections as usize, reserved)
        .map_err(ServeError::Runtime)?;
    config.max_connections = u32::try_from(fit).unwrap_or(u32::MAX);
    let (keys, dev) = config.api_keys();
    if dev {
        log::warn!(
            "no --api-key configured: accepting only the development key `{}`",
            crate::config::DEV_API_KEY
        );
    }
    let metrics = Arc::new(
        Metrics::new()
            .map_err(|e| ServeError::Runtime(format!("cannot build the metrics registry: {e}")))?,
    );
    let observer: BatchObserver = {
        let metrics = metrics.clone();
        Arc::new(move |batch: BatchReport| {
            metrics.db_batch_size.observe(batch.size as f64);
            metrics
                .db_commit_seconds
                .observe(batch.commit.as_secs_f64());
            metrics.db_writer_queue.set(batch.queued as i64);
        })
    };
    let db = Store::open(
        &config.db,
        config.pool_size,
        config.sync,
        config.write_timeout,
        observer,
    )
    .map_err(ServeError::Runtime)?;

    let mut simulated = None;
    let provider_url = match &config.provider_url {
        Some(url) => url.clone(),
        None => {
            let sim = sim::start(&ProviderConfig {
                addr: "127.0.0.1:0".parse().expect("a literal address"),
                latency: Duration::ZERO,
                jitter: Duration::ZERO,
                fail_rate: 0.0,
                hang_rate: 0.0,
                ambiguous_rate: 0.0,
                seed: None,
            })
            .map_err(ServeError::Runtime)?;
            log::info!("no --provider-url: started the simulated provider in-process");
            let url = sim.url();
            simulated = Some(sim);
            url
        }
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let provider = ProviderClient::new(
        &provider_url,
        config.workers as usize,
        (config.provider_timeout / 2).max(Duration::from_millis(1)),
        config.breaker(),
        clock.clone(),
        metrics.clone(),
    );
    let listener = crate::listener::listen(config.addr)
        .map_err(|e| ServeError::Runtime(format!("cannot bind {}: {e}", config.addr)))?;
    let target = listener.local_addr().ok().and_then(board::burst_target);
    let controls = simulated.map(|sim| Controls {
        sim,
        target,
        burst: Default::default(),
    });
    let app = Arc::new(App {
        timeouts: Timeouts {
            acquire: config.acquire_timeout,
            write: config.write_timeout,
            provider: config.provider_timeout,
        },
        lock_ttl: config.request_timeout + Duration::from_secs(1),
        keys: ApiKeys::new(&keys),
        limiter: RateLimiter::new(config.rate_limit),
        clock,
        db,
        provider,
        draining: AtomicBool::new(false),
        inflight: Default::default(),
        metrics,
        board: Board::new(std::time::Instant::now(), controls),
        config,
    });
    if !app.config.write_delay.is_zero() {
        inject_write_delay(&app).map_err(ServeError::Runtime)?;
    }
    Ok(Built {
        app,
        listener,
        provider_url,
    })
}

/// `--write-delay`: arms the fault (every write that much slower), and lets SIGUSR1 switch it
/// off and on, for `paytrace scenario slow-database` and for experiments by hand. Without the
/// flag SIGUSR1 keeps its default action.
fn inject_write_delay(app: &Arc<App>) -> Result<(), String> {
    let delay = app.config.write_delay;
    let Some(slow) = app.db.slow_writes() else {
        return Err(
            "--write-delay slows the SQLite writer; there is none with --db postgres://…".into(),
        );
    };
    slow.arm(delay);
    app.metrics.db_write_delay.set(delay.as_secs_f64());
    log::warn!(
        "fault injected: every write takes {} ms longer (--write-delay); SIGUSR1 switches it off and on",
        delay.as_millis()
    );
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1])
        .map_err(|e| format!("cannot register SIGUSR1: {e}"))?;
    // Holds the app weakly: the thread waits for signals until the process ends, and must not
    // keep the pool alive past the shutdown.
    let app = Arc::downgrade(app);
    std::thread::Builder::new()
        .name("write-delay".into())
        .spawn(move || {
            for _ in signals.forever() {
                let Some(app) = app.upgrade() else { return };
                let Some(slow) = app.db.slow_writes() else {
                    return;
                };
                let now = slow.toggle();
                app.metrics.db_write_delay.set(now.as_secs_f64());
                log::warn!("write delay now {} ms (SIGUSR1)", now.as_millis());
            }
        })
        .map_err(|e| format!("cannot start the write-delay thread: {e}"))?;
    Ok(())
}
