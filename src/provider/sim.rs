//! `paytrace provider`: a simulated card processor, a real HTTP server on tiny_http.
//!
//! It behaves like a processor where it matters to paytrace: a charge is made at most once per
//! `Idempotency-Key`, `tok_chargeDeclined` is declined, and it can be told to be slow, to fail,
//! to hang, or to charge and then fail (the ambiguous case idempotency exists for) — from flags,
//! or at run time through `GET|PUT /_control/faults`. Fault draws come from one seeded RNG, so a
//! run with `--seed` repeats exactly.
//!
//! Slow answers do not hold a thread each: a request that must wait is parked in a timer queue
//! and answered by one timer thread when its time comes; a hung request is parked for
//! [`HANG_FOR`] and then dropped.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tiny_http::{Method, Request};

use super::CHARGES_PATH;
use crate::config::ProviderConfig;
use crate::edge::http;
use crate::listener::listen;
use crate::reply::Reply;

/// How long a hung request is held before it is dropped: longer than any sane client waits.
pub const HANG_FOR: Duration = Duration::from_secs(30);
/// Threads taking requests off tiny_http's queue; slow answers do not occupy them.
const WORKERS: usize = 4;

/// The run-time fault settings (`/_control/faults`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Faults {
    pub latency_ms: u64,
    pub jitter_ms: u64,
    pub fail_rate: f64,
    pub hang_rate: f64,
    pub ambiguous_rate: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsUpdate {
    latency_ms: Option<u64>,
    jitter_ms: Option<u64>,
    fail_rate: Option<f64>,
    hang_rate: Option<f64>,
    ambiguous_rate: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
struct Charge {
    id: String,
    object: &'static str,
    status: &'static str,
    amount: i64,
    currency: String,
    source: String,
    idempotency_key: String,
}

#[derive(Deserialize)]
struct ChargeRequest {
    amount: i64,
    currency: String,
    source: String,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    replays: AtomicU64,
}

struct State {
    faults: Mutex<Faults>,
    rng: Mutex<StdRng>,
    charges: Mutex<HashMap<String, Charge>>,
    stats: Stats,
    timer: Timer,
}

/// A running simulated provider; clones share it.
#[derive(Clone)]
pub struct SimProvider {
    addr: SocketAddr,
    state: Arc<State>,
}

impl SimProvider {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The fault settings now (what `GET /_control/faults` answers).
    pub fn faults(&self) -> Faults {
        current_faults(&self.state)
    }

    /// Changes the fault settings from a JSON update, as `PUT /_control/faults` does (for
    /// `serve`'s own controls over the provider it started in-process): the settings now, or
    /// why the update was refused.
    pub fn update_faults(&self, body: &[u8]) -> Result<Faults, String> {
        apply_update(&self.state, body)
    }
}

/// Binds `config.addr` and serves on background threads until the process exits.
pub fn start(config: &ProviderConfig) -> Result<SimProvider, String> {
    let listener = listen(config.addr).map_err(|e| format!("cannot bind {}: {e}", config.addr))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let server = tiny_http::Server::from_listener(listener, None).map_err(|e| e.to_string())?;
    let server = Arc::new(server);
    let rng = match config.seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_os_rng(),
    };
    let state = Arc::new(State {
        faults: Mutex::new(Faults {
            latency_ms: config.latency.as_millis() as u64,
            jitter_ms: config.jitter.as_millis() as u64,
            fail_rate: config.fail_rate,
            hang_rate: config.hang_rate,
            ambiguous_rate: config.ambiguous_rate,
        }),
        rng: Mutex::new(rng),
        charges: Mutex::new(HashMap::new()),
        stats: Stats::default(),
        timer: Timer::default(),
    });
    for i in 0..WORKERS {
        let server = server.clone();
        let state = state.clone();
        thread::Builder::new()
            .name(format!("provider-{i}"))
            .spawn(move || {
                while let Ok(request) = server.recv() {
                    handle(&state, request);
                }
                log::error!("provider: the accept thread stopped; no more requests are served");
            })
            .map_err(|e| e.to_string())?;
    }
    let timer_state = state.clone();
    thread::Builder::new()
        .name("provider-timer".into())
        .spawn(move || timer_state.timer.run())
        .map_err(|e| e.to_string())?;
    Ok(SimProvider { addr, state })
}

/// `paytrace provider`: runs until killed.
pub fn run(config: &ProviderConfig) -> Result<(), String> {
    let sim = start(config)?;
    log::info!("provider listening on {}", sim.url());
    loop {
        thread::park();
    }
}

/// The largest body tiny_http may drain when a request is dropped: it allocates the whole
/// declared length at once, and an absurd one aborts the process that embeds this provider.
const DRAINABLE: usize = 16 * 1024 * 1024;

fn handle(state: &State, mut request: Request) {
    if request.body_length().is_some_and(|n| n > DRAINABLE) {
        // Never dropped, so never drained: the connection and tiny_http's thread for it stay
        // until the process exits. The provider is a loopback test tool; `serve` itself never
        // lets such a request reach tiny_http.
        log::warn!(
            "provider: a request declaring {} body bytes is left unanswered",
            request.body_length().unwrap_or_default()
        );
        std::mem::forget(request);
        return;
    }
    let (path, query) = http::split_target(request.url());
    let (path, query) = (path.to_string(), query.to_string());
    let reply = match (request.method(), path.as_str()) {
        (Method::Post, CHARGES_PATH) => {
            state.stats.requests.fetch_add(1, Ordering::Relaxed);
            return create_charge(state, request);
        }
        (Method::Get, CHARGES_PATH) => {
            state.stats.requests.fetch_add(1, Ordering::Relaxed);
            let key = http::query_pairs(&query)
                .into_iter()
                .find(|(k, _)| k == "idempotency_key")
                .map(|(_, v)| v);
            let charges = state.charges.lock().unwrap_or_else(|e| e.into_inner());
            let data: Vec<&Charge> = key.and_then(|k| charges.get(&k)).into_iter().collect();
            Reply::json(200, &json!({ "data": data }))
        }
        (Method::Get, "/v1/stats") => Reply::json(200, &stats(state)),
        (Method::Get, "/_control/faults") => Reply::json(200, &current_faults(state)),
        (Method::Put, "/_control/faults") => update_faults(state, &mut request),
        (_, CHARGES_PATH | "/v1/stats" | "/_control/faults") => error(405, "method_not_allowed"),
        _ => error(404, "not_found"),
    };
    let _ = http::send(request, &reply);
}

fn current_faults(state: &State) -> Faults {
    *state.faults.lock().unwrap_or_else(|e| e.into_inner())
}

fn stats(state: &State) -> serde_json::Value {
    let charges = state.charges.lock().unwrap_or_else(|e| e.into_inner());
    let succeeded = charges.values().filter(|c| c.status == "succeeded").count();
    json!({
        "requests": state.stats.requests.load(Ordering::Relaxed),
        "charges": charges.len(),
        "succeeded": succeeded,
        "declined": charges.len() - succeeded,
        "replays": state.stats.replays.load(Ordering::Relaxed),
    })
}

fn error(status: u16, code: &str) -> Reply {
    Reply::json(status, &json!({"error": {"code": code}}))
}

fn update_faults(state: &State, request: &mut Request) -> Reply {
    let body = match http::read_body(request, 16 * 1024) {
        Ok(b) => b,
        Err(e) => return error(e.status(), e.code()),
    };
    match apply_update(state, &body) {
        Ok(faults) => Reply::json(200, &faults),
        Err(message) => Reply::json(
            400,
            &json!({"error": {"code": "invalid_request", "message": message}}),
        ),
    }
}

/// Applies a partial update (`{"fail_rate": 1}`): the settings now, or why it was refused.
fn apply_update(state: &State, body: &[u8]) -> Result<Faults, String> {
    let update: FaultsUpdate = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    for rate in [update.fail_rate, update.hang_rate, update.ambiguous_rate]
        .into_iter()
        .flatten()
    {
        if !(0.0..=1.0).contains(&rate) {
            return Err("rates are between 0 and 1".into());
        }
    }
    let mut f = state.faults.lock().unwrap_or_else(|e| e.into_inner());
    f.latency_ms = update.latency_ms.unwrap_or(f.latency_ms);
    f.jitter_ms = update.jitter_ms.unwrap_or(f.jitter_ms);
    f.fail_rate = update.fail_rate.unwrap_or(f.fail_rate);
    f.hang_rate = update.hang_rate.unwrap_or(f.hang_rate);
    f.ambiguous_rate = update.ambiguous_rate.unwrap_or(f.ambiguous_rate);
    log::info!("provider faults now {:?}", *f);
    Ok(*f)
}

/// What the draw decided for one charge request.
enum Fate {
    Normal,
    Fail,
    Hang,
    /// Charge, then answer 500 (`true`) or hang (`false`).
    ChargeThenFail(bool),
}

fn draw(state: &State, faults: &Faults) -> (Fate, Duration) {
    let mut rng = state.rng.lock().unwrap_or_else(|e| e.into_inner());
    let roll: f64 = rng.random();
    let fate = if roll < faults.hang_rate {
        Fate::Hang
    } else if roll < faults.hang_rate + faults.fail_rate {
        Fate::Fail
    } else if roll < faults.hang_rate + faults.fail_rate + faults.ambiguous_rate {
        Fate::ChargeThenFail(rng.random_bool(0.5))
    } else {
        Fate::Normal
    };
    let jitter = if faults.jitter_ms > 0 {
        rng.random_range(0..=faults.jitter_ms)
    } else {
        0
    };
    (fate, Duration::from_millis(faults.latency_ms + jitter))
}

fn create_charge(state: &State, mut request: Request) {
    let key = http::header(&request, "Idempotency-Key").map(str::to_string);
    let body = http::read_body(&mut request, 16 * 1024);
    let parsed = body
        .ok()
        .and_then(|b| serde_json::from_slice::<ChargeRequest>(&b).ok());
    let (Some(key), Some(input)) = (key, parsed) else {
        let _ = http::send(request, &error(400, "invalid_request"));
        return;
    };
    let faults = current_faults(state);
    let (fate, delay) = draw(state, &faults);
    let reply = match fate {
        Fate::Hang => return state.timer.park(request, None, HANG_FOR),
        Fate::Fail => error(500, "processing_error"),
        Fate::Normal | Fate::ChargeThenFail(_) => {
            let charge = charge_once(state, &key, input);
            match fate {
                Fate::ChargeThenFail(true) => error(500, "processing_error"),
                Fate::ChargeThenFail(false) => return state.timer.park(request, None, HANG_FOR),
                // The whole charge, like a 200, so the client can check it is its own.
                _ if charge.status == "declined" => {
                    let mut body = serde_json::to_value(&charge).unwrap_or_default();
                    body["error"] = json!({"code": "card_declined"});
                    Reply::json(402, &body)
                }
                _ => Reply::json(200, &charge),
            }
        }
    };
    if delay.is_zero() {
        let _ = http::send(request, &reply);
    } else {
        state.timer.park(request, Some(reply), delay);
    }
}

/// The charge for `key`: made now if the key is new, else the one made before.
fn charge_once(state: &State, key: &str, input: ChargeRequest) -> Charge {
    let mut charges = state.charges.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(existing) = charges.get(key) {
        state.stats.replays.fetch_add(1, Ordering::Relaxed);
        return existing.clone();
    }
    let charge = Charge {
        id: crate::ids::charge_id(),
        object: "charge",
        status: if input.source == "tok_chargeDeclined" {
            "declined"
        } else {
            "succeeded"
        },
        amount: input.amount,
        currency: input.currency,
        source: input.source,
        idempotency_key: key.to_string(),
    };
    charges.insert(key.to_string(), charge.clone());
    charge
}

/// Requests waiting to be answered (or, with no reply, dropped) at a given time.
#[derive(Default)]
struct Timer {
    queue: Mutex<TimerQueue>,
    wake: Condvar,
}

#[derive(Default)]
struct TimerQueue {
    /// (due, sequence number), earliest first.
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    parked: HashMap<u64, (Request, Option<Reply>)>,
    next: u64,
}

impl Timer {
    fn park(&self, request: Request, reply: Option<Reply>, after: Duration) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let seq = q.next;
        q.next += 1;
        q.due.push(Reverse((Instant::now() + after, seq)));
        q.parked.insert(seq, (request, reply));
        self.wake.notify_one();
    }

    fn run(&self) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            match q.due.peek().copied() {
                Some(Reverse((at, seq))) if at <= now => {
                    q.due.pop();
                    let parked = q.parked.remove(&seq);
                    drop(q);
                    match parked {
                        Some((request, Some(reply))) => {
                            let _ = http::send(request, &reply);
                        }
                        // A hung request is dropped unanswered by us; tiny_http closes it.
                        Some((request, None)) => drop(request),
                        None => {}
                    }
                    q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                }
                Some(Reverse((at, _))) => {
                    q = self
                        .wake
                        .wait_timeout(q, at - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                None => q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}
