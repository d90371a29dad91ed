//! Unit 01, accept: the front that owns every client socket.
//!
//! ```text
//! client ──TCP──▶ front: one thread per connection, at most --max-connections of them;
//!                 reads the whole request within --socket-timeout, checks sizes and framing,
//!                 answers what it refuses itself (problem+json, Connection: close);
//!                 keeps the connection for the next request when the policy allows
//!        ──private unix socket──▶ tiny_http (parse) ──▶ dispatcher ──▶ workers
//! ```
//!
//! Why a front before tiny_http: tiny_http 0.12 reads a header line without any size bound,
//! never answers some requests (an HTTP/2 preface or `HTTP/1.2` makes its connection thread wait
//! for a response writer it holds itself; an unparsable `Content-Length` swallows the rest of the
//! connection as a body), and drains an unread body on whichever thread drops the request, with
//! no total deadline. None of that can be bounded through its API, and it cannot be handed a
//! socket it did not accept itself. So this module accepts, reads and checks (the reading and
//! checking of one request is [`request`]), and tiny_http only
//! ever sees a complete, well-formed request with an exact `Content-Length` on a unix socket in
//! a directory only this user can enter. A client can therefore never hold a worker. It holds
//! one thread and at most four descriptors of the front, and about twice
//! [`Limits::max_request_bytes`] of memory (the request, and its copy on the way to tiny_http):
//! for at most `--socket-timeout` while it sends, then while the workers answer (bounded by the
//! request's budget), then at most `--socket-timeout` more while it reads the answer; a kept
//! connection, the same for each further request (at most [`MAX_REQUESTS_PER_CONNECTION`]),
//! with at most `--socket-timeout` idle between two.
//!
//! Connections are kept alive under a policy that cannot starve anyone (see [`keep_alive`]):
//! an HTTP/1.1 client that did not pipeline gets `Connection: keep-alive` while at most half of
//! `--max-connections` are open and the server is not draining; past half, every answer says
//! `Connection: close`, so idle connections never hold the slots new clients need. A kept
//! connection may stay idle for `--socket-timeout`, and each request on it has the same limits
//! as the first. Toward tiny_http it is always one request per unix-socket connection.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};
use socket2::SockRef;

use self::request::{
    Conn, Incoming, MAX_CHUNK_LINE, MAX_HEADER_BYTES, MAX_REQUEST_LINE, Refusal, read_request,
};
use super::http;
use super::observe;
use crate::app::App;
use crate::deadline::Deadline;
use crate::error::ApiError;
use crate::reply::Reply;
use crate::server_timing::{self, Entry};
use crate::trace::{self, Unit};

/// Reading one request within its limits: the head, the framing, the body.
pub mod request;
pub use self::request::{LINGER, LINGER_BYTES, RECEIVED_HEADER};

/// How long a connection thread waits for another connection before it ends.
const IDLE_THREAD: Duration = Duration::from_secs(2);
/// Requests one connection may send before an answer closes it.
pub const MAX_REQUESTS_PER_CONNECTION: usize = 1000;
/// Largest answer head the front rewrites to keep a connection alive; a larger one is passed
/// through and closes the connection.
const MAX_ANSWER_HEAD: usize = 16 * 1024;
/// Stack of a connection thread: the buffers live on the heap.
const CONNECTION_STACK: usize = 256 * 1024;
/// File descriptors one connection can hold at once: the client socket, the front's end of the
/// unix socket to tiny_http, and tiny_http's end (which it duplicates for a body it reads lazily).
pub const FDS_PER_CONNECTION: u64 = 4;

/// The bounds one client lives within.
#[derive(Clone, Debug)]
pub struct Limits {
    /// A client has this long, in total, to send its whole request; each write of the answer
    /// may block this long.
    pub socket_timeout: Duration,
    pub max_body: u64,
    /// Connections served at once; one more is answered 503 `overloaded` and closed.
    pub max_connections: usize,
    /// How long the workers may take to answer a forwarded request (request timeout + margin):
    /// past it the front gives up on the answer.
    pub answer_timeout: Duration,
}

impl Limits {
    /// The most memory one connection's request can occupy.
    pub fn max_request_bytes(&self) -> u64 {
        (MAX_REQUEST_LINE + MAX_HEADER_BYTES) as u64 + self.max_body + MAX_CHUNK_LINE as u64
    }
}

/// What the rest of the server sees of the front.
pub struct Front {
    /// Connections accepted and not yet closed.
    open: AtomicUsize,
    /// Set when the listener closes: connections still reading get [`GRACE_AT_SHUTDOWN`].
    closing: AtomicBool,
    /// Cleared when the accept loop returns.
    accepting: AtomicBool,
    closed_at: Arc<OnceLock<Instant>>,
    /// Why the accept loop stopped, if it stopped on its own.
    died: Mutex<Option<String>>,
    /// A clone of the listener, to close it from the dispatcher.
    control: TcpListener,
    /// What connection threads need, to serve the backlog at close.
    shared: OnceLock<Weak<Shared>>,
}

impl Front {
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// False once the accept loop has returned: no connection can be admitted any more.
    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    /// Stops accepting: new connections are refused from now on. Connections the kernel had
    /// already completed (waiting in the listen backlog) are taken and served first: for their
    /// clients they were accepted before the close.
    pub fn close_listener(&self) {
        if self.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = self.closed_at.set(Instant::now());
        if let Some(shared) = self.shared.get().and_then(Weak::upgrade)
            && self.control.set_nonblocking(true).is_ok()
        {
            while let Ok((stream, _)) = self.control.accept() {
                let _ = stream.set_nonblocking(false);
                admit(&shared, stream);
            }
        }
        let _ = SockRef::from(&self.control).shutdown(Shutdown::Both);
    }

    /// Why the accept loop stopped by itself, if it did (it never should).
    pub fn death(&self) -> Option<String> {
        self.died.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Raises the soft limit on open files to the hard limit (logging both), and returns how many
/// of the `wanted` connections fit beside the `reserved` descriptors the rest of the server
/// needs. Fewer than wanted is logged as a warning; none at all is an error.
pub fn fit_connections(wanted: usize, reserved: u64) -> Result<usize, String> {
    let (soft, hard) = rlimit::Resource::NOFILE
        .get()
        .map_err(|e| format!("cannot read the open-files limit: {e}"))?;
    let raised = rlimit::increase_nofile_limit(hard).unwrap_or(soft);
    if raised != soft {
        log::info!("open-files limit raised from {soft} to {raised} (the hard limit)");
    }
    let room = raised.saturating_sub(reserved) / FDS_PER_CONNECTION;
    if room == 0 {
        return Err(format!(
            "the open-files limit {raised} (hard {hard}) leaves no room for a single connection: \
             the server itself needs about {reserved}; raise it (ulimit -n)"
        ));
    }
    let fit = usize::try_from(room).unwrap_or(usize::MAX).min(wanted);
    if fit < wanted {
        log::warn!(
            "the open-files limit {raised} holds {fit} connections, not --max-connections {wanted} \
             ({FDS_PER_CONNECTION} descriptors each beside {reserved} for the server): serving at most {fit}"
        );
    }
    Ok(fit)
}

/// The process-wide zero point of [`RECEIVED_HEADER`].
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The instant a [`RECEIVED_HEADER`] value names, if it is one.
pub fn received_at(value: &str) -> Option<Instant> {
    let micros: u64 = value.parse().ok()?;
    epoch().checked_add(Duration::from_micros(micros))
}

/// Starts the accept loop on `listener`; forwarded requests go to tiny_http on `backend`.
pub fn start(
    app: Arc<App>,
    listener: TcpListener,
    backend: PathBuf,
    limits: Limits,
) -> io::Result<(Arc<Front>, JoinHandle<()>)> {
    epoch();
    let front = Arc::new(Front {
        open: AtomicUsize::new(0),
        accepting: AtomicBool::new(true),
        closing: AtomicBool::new(false),
        closed_at: Arc::new(OnceLock::new()),
        died: Mutex::new(None),
        control: listener.try_clone()?,
        shared: OnceLock::new(),
    });
    let shared = Arc::new(Shared {
        app,
        front: front.clone(),
        backend,
        limits,
        idle: AtomicUsize::new(0),
        handoff: crossbeam::channel::unbounded(),
        kept_idle: Mutex::new(VecDeque::new()),
        next_kept: AtomicU64::new(0),
    });
    let _ = front.shared.set(Arc::downgrade(&shared));
    let handle = thread::Builder::new()
        .name("accept".into())
        .spawn(move || accept_loop(&shared, &listener))?;
    Ok((front, handle))
}

/// What every connection thread needs.
struct Shared {
    app: Arc<App>,
    front: Arc<Front>,
    backend: PathBuf,
    limits: Limits,
    /// Connection threads waiting for another connection, not yet promised one.
    idle: AtomicUsize,
    /// How [`admit`] hands a connection to an idle thread.
    handoff: (Sender<TcpStream>, Receiver<TcpStream>),
    /// Kept-alive connections waiting for their next request, oldest first: when every slot is
    /// taken, a new connection takes the oldest one's (see [`admit`]).
    kept_idle: Mutex<VecDeque<KeptIdle>>,
    next_kept: AtomicU64,
}

/// A kept-alive connection between two requests: a handle to its socket, to close it.
struct KeptIdle {
    id: u64,
    socket: TcpStream,
}

impl Shared {
    /// Registers `stream` as idle between two requests; `None` if it cannot be (then it cannot
    /// be evicted either, which only costs a new client its slot).
    fn park(&self, stream: &TcpStream) -> Option<u64> {
        let socket = stream.try_clone().ok()?;
        let id = self.next_kept.fetch_add(1, Ordering::SeqCst);
        self.kept_idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(KeptIdle { id, socket });
        Some(id)
    }

    /// Ends the idle wait of `id`; false if [`Shared::evict_oldest`] took its slot meanwhile.
    fn unpark(&self, id: Option<u64>) -> bool {
        let Some(id) = id else { return true };
        let mut idle = self.kept_idle.lock().unwrap_or_else(|e| e.into_inner());
        match idle.iter().position(|k| k.id == id) {
            Some(at) => {
                idle.remove(at);
                true
            }
            None => false,
        }
    }

    /// Closes the longest-idle kept-alive connection, whose slot passes to the caller; false
    /// if no connection is idle.
    fn evict_oldest(&self) -> bool {
        let oldest = self
            .kept_idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        match oldest {
            Some(k) => {
                let _ = k.socket.shutdown(Shutdown::Both);
                true
            }
            None => false,
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    accept_until_closed(shared, listener);
    shared.front.accepting.store(false, Ordering::SeqCst);
}

fn accept_until_closed(shared: &Arc<Shared>, listener: &TcpListener) {
    let front = &shared.front;
    let mut last_warning: Option<Instant> = None;
    loop {
        match listener.accept() {
            // Taken from the backlog: served even if the close began meanwhile.
            Ok((stream, _)) => admit(shared, stream),
            Err(_) if front.closing.load(Ordering::SeqCst) => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            // Out of file descriptors or memory: the connection waits in the kernel's backlog
            // until something is freed. Say so once a second, never die of it.
            Err(e) if is_resource_exhaustion(&e) => {
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    log::warn!(
                        "accept: {e}; {} connections open; new connections wait",
                        front.open_connections()
                    );
                    last_warning = Some(Instant::now());
                }
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                *front.died.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                return;
            }
        }
    }
}

/// Serves `stream` on a thread of its own. With `--max-connections` open, it takes the slot of
/// the longest-idle kept-alive connection (closed for it), or is refused if none is idle.
fn admit(shared: &Arc<Shared>, stream: TcpStream) {
    let front = &shared.front;
    if front.open.load(Ordering::SeqCst) >= shared.limits.max_connections {
        if !shared.evict_oldest() {
            refuse_connection(shared, stream);
            return;
        }
    } else {
        front.open.fetch_add(1, Ordering::SeqCst);
    }
    // A thread that finished its last connection takes this one if there is one: reserving it
    // first makes sure some idle thread is still there to receive it.
    if take_one(&shared.idle) {
        if shared.handoff.0.send(stream).is_err() {
            front.open.fetch_sub(1, Ordering::SeqCst);
        }
        return;
    }
    let for_thread = shared.clone();
    let spawned = thread::Builder::new()
        .name("conn".into())
        .stack_size(CONNECTION_STACK)
        .spawn(move || connection_thread(&for_thread, stream));
    if let Err(e) = spawned {
        front.open.fetch_sub(1, Ordering::SeqCst);
        log::warn!("cannot start a connection thread: {e}");
    }
}

/// Serves connections one after another: the first it was started for, then whatever
/// [`admit`] hands it while it waits idle, until it has been idle for [`IDLE_THREAD`].
fn connection_thread(shared: &Shared, first: TcpStream) {
    let mut stream = first;
    loop {
        if serve_connection(shared, stream) == Slot::Own {
            shared.front.open.fetch_sub(1, Ordering::SeqCst);
        }
        shared.idle.fetch_add(1, Ordering::SeqCst);
        stream = loop {
            match shared.handoff.1.recv_timeout(IDLE_THREAD) {
                Ok(next) => break next,
                // Leave, unless every idle thread is already promised to a connection on its
                // way: then this one must stay to take it.
                Err(RecvTimeoutError::Timeout) if take_one(&shared.idle) => return,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
    }
}

/// Decrements `n` unless it is 0; true if it did.
fn take_one(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// The shed reason a connection over `--max-connections` is counted under.
pub const CONNECTIONS_SHED: &str = "connections";

/// The answer to a connection over `--max-connections` (503 `overloaded`), with its request id:
/// the same from both servers.
pub fn connections_refusal(max_connections: usize) -> (String, Reply) {
    let request_id = crate::ids::request_id();
    let error = ApiError::Overloaded {
        detail: format!(
            "{max_connections} connections are open, the most this server serves at once (--max-connections); retry shortly"
        ),
        retry_after_s: 1,
    };
    let reply = refusal_reply(error, &request_id, Duration::ZERO);
    (request_id, reply)
}

/// The answer to a request refused before any route saw it (a limit, a stalled head): its
/// problem, its request id, and how long it took as `Server-Timing: total`. The same from both
/// servers.
pub fn refusal_reply(error: ApiError, request_id: &str, total: Duration) -> Reply {
    error
        .into_reply(request_id)
        .header("X-Request-Id", request_id.to_string())
        .header(
            "Server-Timing",
            server_timing::format(&[Entry::new("total", total)]),
        )
}

/// One connection over `--max-connections`: a short 503 written without blocking, then closed.
fn refuse_connection(shared: &Shared, stream: TcpStream) {
    let (request_id, reply) = connections_refusal(shared.limits.max_connections);
    let _ = stream.set_nonblocking(true);
    let _ = (&stream).write_all(&http::encode(&reply, false));
    let _ = stream.shutdown(Shutdown::Write);
    observe::refusal(
        &shared.app,
        &request_id,
        "-",
        "",
        reply.status,
        Duration::ZERO,
        Some(CONNECTIONS_SHED),
    );
}

/// Whose slot in the count of open connections a finished connection held.
#[derive(Debug, PartialEq)]
enum Slot {
    /// Its own: it is given back now.
    Own,
    /// Passed to a new connection that evicted this one while it was idle.
    Given,
}

fn serve_connection(shared: &Shared, stream: TcpStream) -> Slot {
    let limits = &shared.limits;
    let mut started = Instant::now();
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(limits.socket_timeout));
    let mut conn = Conn {
        stream,
        buf: Vec::with_capacity(1024),
        deadline: started + limits.socket_timeout,
        closed_at: shared.front.closed_at.clone(),
    };
    if !conn.wait_for_first_byte() {
        return Slot::Own;
    }
    for served in 1.. {
        // A previous answer may have left the write timeout at the end of its own budget.
        let _ = conn.stream.set_write_timeout(Some(limits.socket_timeout));
        let request = match read_request(&mut conn, limits.max_body, started) {
            Ok(request) => request,
            Err(refusal) => {
                refuse(shared, &mut conn, refusal, started);
                return Slot::Own;
            }
        };
        // A further request on a kept-alive connection after the listener closed: the drain
        // serves only what was in flight, and this one was not.
        if served > 1 && shared.front.closing.load(Ordering::SeqCst) {
            let refusal = Refusal {
                error: Box::new(ApiError::ShuttingDown),
                request_id: Some(request.request_id),
                method: request.method,
                path: http::split_target(&request.target).0.to_string(),
            };
            refuse(shared, &mut conn, refusal, started);
            return Slot::Own;
        }
        let keep = keep_alive(shared, &conn, &request, served);
        if !forward(shared, &mut conn, request, keep) {
            return Slot::Own;
        }
        // Kept alive: wait up to --socket-timeout for the next request, which then has a
        // deadline of its own. Meanwhile a new connection may take this one's slot: then its
        // socket is shut and the wait ends (a request that arrived at that very moment is
        // lost with the connection, as with any server that closes idle connections).
        conn.deadline = Instant::now() + limits.socket_timeout;
        let parked = shared.park(&conn.stream);
        let woken = conn.wait_for_first_byte();
        if !shared.unpark(parked) {
            return Slot::Given;
        }
        if !woken {
            return Slot::Own;
        }
        started = Instant::now();
        conn.deadline = started + limits.socket_timeout;
    }
    Slot::Own
}

/// Whether the answer to `request` keeps its connection open for another. Only while that
/// cannot starve anyone: at most half of `--max-connections` are open (so idle kept-alive
/// connections never hold the slots a new client needs: past half, every answer closes), the
/// server is not draining, the client did not pipeline (one request in flight per connection,
/// nothing buffered behind it), and the connection has not served [`MAX_REQUESTS_PER_CONNECTION`].
fn keep_alive(shared: &Shared, conn: &Conn, request: &Incoming, served: usize) -> bool {
    request.keep_alive
        && conn.buf.is_empty()
        && served < MAX_REQUESTS_PER_CONNECTION
        && !shared.app.is_draining()
        && !shared.front.closing.load(Ordering::SeqCst)
        && shared.front.open_connections() <= shared.limits.max_connections / 2
}

/// Answers a request the front refuses itself, and closes the connection.
fn refuse(shared: &Shared, conn: &mut Conn, refusal: Refusal, started: Instant) {
    let Refusal {
        error,
        request_id,
        method,
        path,
    } = refusal;
    let request_id = request_id.unwrap_or_else(crate::ids::request_id);
    let total = started.elapsed();
    let reply = refusal_reply(*error, &request_id, total);
    let _ = conn
        .stream
        .write_all(&http::encode(&reply, method == "HEAD"));
    observe::refusal(
        &shared.app,
        &request_id,
        &method,
        &path,
        reply.status,
        total,
        None,
    );
    log::debug!("{request_id}: refused {method} {path}: {}", reply.status);
    conn.linger();
}

/// Hands the request to tiny_http and copies its answer back to the client; true if the
/// connection stays open for another request (`keep` was asked and the answer was whole).
fn forward(shared: &Shared, conn: &mut Conn, request: Incoming, keep: bool) -> bool {
    let stamp = request
        .read_at
        .saturating_duration_since(epoch())
        .as_micros();
    let mut out = Vec::with_capacity(512 + request.body.len());
    out.extend_from_slice(format!("{} {} HTTP/1.1\r\n", request.method, request.target).as_bytes());
    for (name, value) in &request.headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "X-Request-Id: {}\r\n{RECEIVED_HEADER}: {stamp}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            request.request_id,
            request.body.len()
        )
        .as_bytes(),
    );
    if trace::enabled() {
        trace::hop(
            &request.request_id,
            &Deadline::new(request.read_at, shared.app.config.request_timeout),
            Unit::Accept,
            "read",
            Some(shared.limits.socket_timeout),
            format_args!(
                "{} {}: {} body bytes in {:.1} ms",
                request.method,
                request.target.chars().take(200).collect::<String>(),
                request.body.len(),
                request
                    .read_at
                    .duration_since(request.accepted)
                    .as_secs_f64()
                    * 1000.0
            ),
        );
    }
    out.extend_from_slice(&request.body);
    // Whether draining began is asked again once the answer is here: an answer to a request
    // that was in flight when it began says `Connection: close`.
    let not_draining = || !shared.app.is_draining() && !shared.front.closing.load(Ordering::SeqCst);
    let mut relay = Relay {
        client: &mut conn.stream,
        not_draining: &not_draining,
        write_by: None,
        write_time: shared.limits.socket_timeout,
        sent: 0,
    };
    let relayed = UnixStream::connect(&shared.backend).and_then(|mut backend| {
        backend.set_read_timeout(Some(shared.limits.answer_timeout))?;
        backend.set_write_timeout(Some(shared.limits.answer_timeout))?;
        backend.write_all(&out)?;
        relay.answer(&mut backend, keep, request.method == "HEAD")
    });
    let sent = relay.sent;
    match relayed {
        Ok(true) => return true,
        Ok(false) if sent > 0 => {
            // Bytes the client sent after its request are not read: the answer said close.
            let _ = conn.stream.shutdown(Shutdown::Write);
            if !conn.buf.is_empty() {
                conn.linger();
            }
        }
        // Nothing reached the client: it still gets an answer.
        Ok(_) | Err(_) if sent == 0 => {
            let cause = relayed
                .err()
                .map_or_else(|| "no answer".into(), |e| e.to_string());
            log::error!(
                "{} {}: the server behind the front did not answer ({cause})",
                request.method,
                request.target
            );
            let reply = ApiError::Internal(cause)
                .into_reply(&request.request_id)
                .header("X-Request-Id", request.request_id.clone());
            let _ = conn
                .stream
                .write_all(&http::encode(&reply, request.method == "HEAD"));
            let _ = conn.stream.shutdown(Shutdown::Write);
        }
        Ok(_) | Err(_) => log::debug!(
            "{} {}: the client stopped reading the answer after {sent} bytes",
            request.method,
            request.target
        ),
    }
    false
}

/// Copies one answer from tiny_http to the client; writing it all may take `write_time` in
/// total, however slowly the client reads.
struct Relay<'a> {
    client: &'a mut TcpStream,
    /// Asked when the answer's head is here, before it is written.
    not_draining: &'a dyn Fn() -> bool,
    write_by: Option<Instant>,
    write_time: Duration,
    sent: usize,
}

impl Relay<'_> {
    /// Relays the answer; true if the connection stays open. tiny_http always says
    /// `Connection: close` (the front asked it to); to keep the connection, that header is
    /// replaced by `Connection: keep-alive`, which needs an answer framed by `Content-Length`
    /// that arrives whole. Anything else is passed through as it came, and the connection closes.
    fn answer(
        &mut self,
        backend: &mut UnixStream,
        keep: bool,
        head_only: bool,
    ) -> io::Result<bool> {
        let mut chunk = [0u8; 8192];
        let mut buf = Vec::new();
        if keep {
            // Read the head (a few hundred bytes, usually in one read).
            let head = loop {
                let n = backend.read(&mut chunk)?;
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(end + 4);
                }
                if n == 0 || buf.len() > MAX_ANSWER_HEAD {
                    break None;
                }
            };
            let kept = head
                .filter(|_| (self.not_draining)())
                .and_then(|end| kept_alive_head(&buf[..end], head_only).map(|h| (end, h)));
            if let Some((head, body_len)) = kept {
                let (mut rewritten, expected) = body_len;
                // Never more than the head announced: surplus bytes would reach the client as the
                // start of its next answer. An answer that breaks its framing closes. The head
                // goes out with the first part of the body, in one write.
                let rest = &buf[head..];
                let first = rest.len().min(expected);
                rewritten.extend_from_slice(&rest[..first]);
                self.write(&rewritten)?;
                if rest.len() > expected {
                    return Ok(false);
                }
                let mut body = first;
                loop {
                    let n = backend.read(&mut chunk)?;
                    if n == 0 {
                        return Ok(body == expected);
                    }
                    let allowed = expected - body;
                    self.write(&chunk[..n.min(allowed)])?;
                    if n > allowed {
                        return Ok(false);
                    }
                    body += n;
                }
            }
        }
        self.write(&buf)?;
        loop {
            let n = backend.read(&mut chunk)?;
            if n == 0 {
                return Ok(false);
            }
            self.write(&chunk[..n])?;
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let by = *self
            .write_by
            .get_or_insert_with(|| Instant::now() + self.write_time);
        let left = by.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.client.set_write_timeout(Some(left))?;
        self.client.write_all(bytes)?;
        self.sent += bytes.len();
        Ok(())
    }
}

/// The answer's head with `Connection: keep-alive` in place of `Connection: close`, and the
/// body length it announces; `None` if it cannot be kept alive (no `Content-Length`, a
/// `Transfer-Encoding`, or a head that does not parse).
fn kept_alive_head(head: &[u8], head_only: bool) -> Option<(Vec<u8>, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = parsed.parse(head) else {
        return None;
    };
    let code = parsed.code?;
    let mut out = Vec::with_capacity(head.len() + 16);
    out.extend_from_slice(
        format!("HTTP/1.1 {code} {}\r\n", parsed.reason.unwrap_or("")).as_bytes(),
    );
    let mut length = None;
    for h in parsed.headers.iter() {
        if h.name.eq_ignore_ascii_case("Transfer-Encoding") {
            return None;
        }
        if h.name.eq_ignore_ascii_case("Content-Length") {
            length = Some(
                std::str::from_utf8(h.value)
                    .ok()?
                    .trim()
                    .parse::<usize>()
                    .ok()?,
            );
        }
        if h.name.eq_ignore_ascii_case("Connection") {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: keep-alive\r\n\r\n");
    let body = if head_only || code < 200 || code == 204 || code == 304 {
        0
    } else {
        length?
    };
    Some((out, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(head: &str, head_only: bool) -> Option<(String, usize)> {
        kept_alive_head(head.as_bytes(), head_only).map(|(h, n)| (String::from_utf8(h).unwrap(), n))
    }

    #[test]
    fn only_an_answer_framed_by_content_length_is_kept_alive() {
        let ok = "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 12\r\nX-Request-Id: r1\r\nConnection: close\r\n\r\n";
        let (head, body) = kept(ok, false).unwrap();
        assert_eq!(
            head,
            "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 12\r\nX-Request-Id: r1\r\nConnection: keep-alive\r\n\r\n"
        );
        assert_eq!(body, 12);
        // A HEAD answer, 204 and 304 carry no body whatever they announce.
        assert_eq!(kept(ok, true).unwrap().1, 0);
        let no_content = "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n";
        assert_eq!(kept(no_content, false).unwrap().1, 0);
        // No length, a transfer coding, or a head that does not parse: passed through, closed.
        assert!(kept("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", false).is_none());
        assert!(
            kept(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                false
            )
            .is_none()
        );
        assert!(kept("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false).is_none());
        assert!(kept("garbage\r\n\r\n", false).is_none());
    }

    #[test]
    fn the_received_stamp_round_trips() {
        epoch();
        let now = Instant::now();
        let micros = now.saturating_duration_since(epoch()).as_micros();
        let back = received_at(&micros.to_string()).unwrap();
        assert!(back <= now && now - back < Duration::from_micros(2));
        assert!(received_at("soon").is_none());
    }
}
