//! Unit 01, accept: the front that owns every client socket.
//!
//! ```text
//! client ──TCP──▶ front: one thread per connection, at most --max-connections of them;
//!                 reads the whole request within --socket-timeout, checks sizes and framing,
//!                 answers what it refuses itself (problem+json, Connection: close)
//!        ──private unix socket──▶ tiny_http (parse) ──▶ dispatcher ──▶ workers
//! ```
//!
//! Why a front before tiny_http: tiny_http 0.12 reads a header line without any size bound,
//! never answers some requests (an HTTP/2 preface or `HTTP/1.2` makes its connection thread wait
//! for a response writer it holds itself; an unparsable `Content-Length` swallows the rest of the
//! connection as a body), and drains an unread body on whichever thread drops the request, with
//! no total deadline. None of that can be bounded through its API, and it cannot be handed a
//! socket it did not accept itself. So this module accepts, reads and checks, and tiny_http only
//! ever sees a complete, well-formed request with an exact `Content-Length` on a unix socket in
//! a directory only this user can enter. A client can therefore never hold a worker. It holds
//! one thread and at most four descriptors of the front, and about twice
//! [`Limits::max_request_bytes`] of memory (the request, and its copy on the way to tiny_http):
//! for at most `--socket-timeout` while it sends, then while the workers answer (bounded by the
//! request's budget), then at most `--socket-timeout` more while it reads the answer.
//!
//! Every answer says `Connection: close`: one request per connection. The front writes what the
//! workers answered back to the client and closes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};
use socket2::SockRef;

use super::http;
use super::observe;
use crate::app::App;
use crate::deadline::Deadline;
use crate::error::ApiError;
use crate::flow::validate::is_visible_ascii;
use crate::server_timing::{self, Entry};
use crate::trace::{self, Unit};

/// Longest request line accepted (414 above it).
pub const MAX_REQUEST_LINE: usize = 8 * 1024;
/// Largest header block accepted, request line excluded (431 above it).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most header fields accepted (431 above it).
pub const MAX_HEADER_FIELDS: usize = 100;
/// The header that carries, from the front to the dispatcher, when the request was read off the
/// socket (µs since [`epoch`]). A client's copy of it is dropped.
pub const RECEIVED_HEADER: &str = "X-Paytrace-Received-Us";
/// Longest chunk-size line (with extensions) in a chunked body.
const MAX_CHUNK_LINE: usize = 1024;
/// How long a refused client may keep sending before the socket is closed under it.
const LINGER: Duration = Duration::from_millis(500);
/// After the listener closed, how long a connection still has to send its whole request (one
/// that has sent nothing yet is then closed without an answer; one half-way gets 408).
const GRACE_AT_SHUTDOWN: Duration = Duration::from_secs(1);
/// How often a blocked read wakes to notice that the listener closed.
const WAKE: Duration = Duration::from_millis(100);
/// How long a connection thread waits for another connection before it ends.
const IDLE_THREAD: Duration = Duration::from_secs(2);
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
    closed_at: OnceLock<Instant>,
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
        closed_at: OnceLock::new(),
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

/// Serves `stream` on a thread of its own, or refuses it if `--max-connections` are open.
fn admit(shared: &Arc<Shared>, stream: TcpStream) {
    let front = &shared.front;
    if front.open.load(Ordering::SeqCst) >= shared.limits.max_connections {
        refuse_connection(shared, stream);
        return;
    }
    front.open.fetch_add(1, Ordering::SeqCst);
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
        serve_connection(shared, stream);
        shared.front.open.fetch_sub(1, Ordering::SeqCst);
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

/// One connection over `--max-connections`: a short 503 written without blocking, then closed.
fn refuse_connection(shared: &Shared, stream: TcpStream) {
    let request_id = crate::ids::request_id();
    let reply = ApiError::Overloaded {
        detail: format!(
            "{} connections are open, the most this server serves at once (--max-connections); retry shortly",
            shared.limits.max_connections
        ),
        retry_after_s: 1,
    }
    .into_reply(&request_id)
    .header("X-Request-Id", request_id.clone())
    .header(
        "Server-Timing",
        server_timing::format(&[Entry::new("total", Duration::ZERO)]),
    );
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
        Some("connections"),
    );
}

fn serve_connection(shared: &Shared, stream: TcpStream) {
    let limits = &shared.limits;
    let accepted = Instant::now();
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(limits.socket_timeout));
    let mut conn = Conn {
        stream,
        buf: Vec::with_capacity(1024),
        deadline: accepted + limits.socket_timeout,
        front: shared.front.clone(),
    };
    if !conn.wait_for_first_byte() {
        return;
    }
    match read_request(&mut conn, limits, accepted) {
        Ok(request) => forward(shared, &mut conn, request),
        Err(refusal) => {
            let Refusal {
                error,
                request_id,
                method,
                path,
            } = refusal;
            let request_id = request_id.unwrap_or_else(crate::ids::request_id);
            let total = accepted.elapsed();
            let reply = (*error)
                .into_reply(&request_id)
                .header("X-Request-Id", request_id.clone())
                .header(
                    "Server-Timing",
                    server_timing::format(&[Entry::new("total", total)]),
                );
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
    }
}

/// A complete, checked request, ready for tiny_http.
struct Incoming {
    method: String,
    target: String,
    /// End-to-end headers as received (hop-by-hop ones and framing removed).
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The client's `X-Request-Id` when it is sane, else a fresh one: tiny_http gets this one.
    request_id: String,
    /// When the first byte of it arrived, and when the last.
    accepted: Instant,
    read_at: Instant,
}

/// Why the front answers a request itself.
struct Refusal {
    error: Box<ApiError>,
    request_id: Option<String>,
    method: String,
    path: String,
}

impl Refusal {
    fn bare(error: ApiError) -> Refusal {
        Refusal {
            error: Box::new(error),
            request_id: None,
            method: "-".into(),
            path: String::new(),
        }
    }
}

/// The client socket, what has been read from it and not yet used, and the moment by which the
/// whole request must have arrived.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    deadline: Instant,
    /// To notice the listener's close: the deadline then shrinks to [`GRACE_AT_SHUTDOWN`].
    front: Arc<Front>,
}

enum Fill {
    More,
    Eof,
    TimedOut,
}

impl Conn {
    /// Reads whatever arrives next, waiting at most until the deadline (and at most `cap`).
    fn fill(&mut self, cap: Duration) -> io::Result<Fill> {
        if let Some(closed) = self.front.closed_at.get() {
            self.deadline = self.deadline.min(*closed + GRACE_AT_SHUTDOWN);
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Fill::TimedOut);
        }
        self.stream
            .set_read_timeout(Some(left.min(cap).max(Duration::from_millis(1))))?;
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk) {
            Ok(0) => Ok(Fill::Eof),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(Fill::More)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() >= self.deadline {
                    Ok(Fill::TimedOut)
                } else {
                    Ok(Fill::More)
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Fill::More),
            Err(e) => Err(e),
        }
    }

    /// Waits for the request's first byte; false if none came before the deadline. The whole
    /// request must arrive by the same deadline, counted from the accept.
    fn wait_for_first_byte(&mut self) -> bool {
        loop {
            match self.fill(WAKE) {
                Ok(Fill::More) if !self.buf.is_empty() => return true,
                Ok(Fill::More) => {}
                Ok(Fill::Eof | Fill::TimedOut) | Err(_) => return false,
            }
        }
    }

    /// After a refusal: stop writing, then read (and discard) what the client is still sending
    /// for a short while, so closing does not reset the connection before it read the answer.
    fn linger(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
        self.deadline = Instant::now() + LINGER;
        let mut discarded = 0usize;
        while discarded < 1 << 20 {
            self.buf.clear();
            match self.fill(LINGER) {
                Ok(Fill::More) => discarded += self.buf.len().max(1),
                _ => break,
            }
        }
    }
}

/// Reads the head, checks it, then reads the body; any violation is a [`Refusal`].
fn read_request(conn: &mut Conn, limits: &Limits, accepted: Instant) -> Result<Incoming, Refusal> {
    let head_len = read_head(conn)?;
    let head = conn.buf[..head_len].to_vec();
    conn.buf.drain(..head_len);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADER_FIELDS];
    let mut parsed = httparse::Request::new(&mut headers);
    // read_head already parsed it completely; a second parse of the same bytes cannot differ.
    if let Err(e) = parsed.parse(&head) {
        return Err(Refusal::bare(head_error(e)));
    }
    let method = parsed.method.unwrap_or("-").to_string();
    let target = parsed.path.unwrap_or("").to_string();
    let http11 = parsed.version == Some(1);
    let path: String = http::split_target(&target).0.chars().take(200).collect();
    let mut request_id = None;
    if !target.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        // tiny_http reads only ASCII lines; percent-encode anything else.
        return Err(Refusal {
            error: Box::new(ApiError::invalid(
                "the request target must be visible ASCII (percent-encode the rest)",
            )),
            request_id,
            method,
            path,
        });
    }
    let mut framing = Framing::default();
    let mut forwarded = Vec::with_capacity(parsed.headers.len());
    let refuse = |error: ApiError, request_id: &Option<String>| Refusal {
        error: Box::new(error),
        request_id: request_id.clone(),
        method: method.clone(),
        path: path.clone(),
    };
    for h in parsed.headers.iter() {
        // tiny_http accepts only ASCII; a value with a control character (NUL above all) is
        // refused here rather than passed on.
        let Some(value) = header_value(h.value) else {
            return Err(refuse(
                ApiError::invalid(format!(
                    "header `{}` has a value that is not printable ASCII",
                    h.name
                )),
                &request_id,
            ));
        };
        let name = h.name;
        if name.eq_ignore_ascii_case("X-Request-Id") && is_visible_ascii(value, 128) {
            request_id.get_or_insert_with(|| value.to_string());
        }
        match framing.observe(name, value) {
            Ok(true) => continue,
            Ok(false) => {}
            Err(error) => return Err(refuse(error, &request_id)),
        }
        if is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(RECEIVED_HEADER)
            || name.eq_ignore_ascii_case("X-Request-Id")
        {
            continue;
        }
        forwarded.push((name.to_string(), value.to_string()));
    }
    let body = match framing.body(limits.max_body) {
        Err(e) => return Err(refuse(e, &request_id)),
        Ok(BodyFraming::None) => Vec::new(),
        Ok(framed) => {
            if framing.expect_continue && http11 {
                // The client waits for this before sending the body.
                let _ = conn.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            match framed {
                BodyFraming::Length(n) => read_exact_body(conn, n as usize),
                _ => read_chunked_body(conn, limits.max_body),
            }
            .map_err(|e| refuse(e, &request_id))?
        }
    };
    Ok(Incoming {
        method,
        target,
        headers: forwarded,
        body,
        request_id: request_id.unwrap_or_else(crate::ids::request_id),
        accepted,
        read_at: Instant::now(),
    })
}

/// Reads until the head is complete; returns its length.
fn read_head(conn: &mut Conn) -> Result<usize, Refusal> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADER_FIELDS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&conn.buf) {
            Ok(httparse::Status::Complete(n)) => {
                let line = conn.buf.iter().position(|&b| b == b'\n').unwrap_or(n);
                if line > MAX_REQUEST_LINE {
                    return Err(Refusal::bare(ApiError::UriTooLong));
                }
                if n - line > MAX_HEADER_BYTES {
                    return Err(Refusal::bare(headers_too_large()));
                }
                return Ok(n);
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(Refusal::bare(head_error(e))),
        }
        // Bounds before reading more: the request line, then the header block.
        match conn.buf.iter().position(|&b| b == b'\n') {
            None if conn.buf.len() > MAX_REQUEST_LINE => {
                return Err(Refusal::bare(ApiError::UriTooLong));
            }
            Some(line) if line > MAX_REQUEST_LINE => {
                return Err(Refusal::bare(ApiError::UriTooLong));
            }
            Some(line) if conn.buf.len() - line > MAX_HEADER_BYTES + 4 => {
                return Err(Refusal::bare(headers_too_large()));
            }
            _ => {}
        }
        match conn.fill(WAKE) {
            Ok(Fill::More) => {}
            Ok(Fill::TimedOut) => return Err(Refusal::bare(ApiError::RequestTimeout)),
            Ok(Fill::Eof) | Err(_) => {
                return Err(Refusal::bare(ApiError::invalid(
                    "the connection ended inside the request head",
                )));
            }
        }
    }
}

fn headers_too_large() -> ApiError {
    ApiError::HeadersTooLarge(format!(
        "the header block is over {MAX_HEADER_BYTES} bytes or {MAX_HEADER_FIELDS} fields"
    ))
}

fn head_error(e: httparse::Error) -> ApiError {
    match e {
        httparse::Error::Version => ApiError::VersionNotSupported,
        httparse::Error::TooManyHeaders => headers_too_large(),
        httparse::Error::HeaderName | httparse::Error::HeaderValue | httparse::Error::NewLine => {
            ApiError::invalid(format!("malformed header: {e}"))
        }
        _ => ApiError::invalid(format!("malformed request line: {e}")),
    }
}

/// Printable ASCII, space and tab only.
fn header_value(raw: &[u8]) -> Option<&str> {
    raw.iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        .then(|| std::str::from_utf8(raw).ok())
        .flatten()
}

/// Headers that describe this connection, not the request: the front speaks for itself to
/// tiny_http (`Connection: close`, an exact `Content-Length`).
fn is_hop_by_hop(name: &str) -> bool {
    [
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Content-Length",
        "Expect",
    ]
    .iter()
    .any(|h| h.eq_ignore_ascii_case(name))
}

/// What the framing headers said, checked strictly: a request whose length two parties could
/// read differently is refused (RFC 9112 §6.3).
#[derive(Default, Debug)]
struct Framing {
    content_length: Option<u64>,
    chunked: bool,
    expect_continue: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

impl Framing {
    /// Takes one header; `Ok(true)` if it was a framing header (consumed), an error naming the
    /// problem if it makes the framing ambiguous.
    fn observe(&mut self, name: &str, value: &str) -> Result<bool, ApiError> {
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("Content-Length") {
            if self.content_length.is_some() {
                return Err(ApiError::invalid("Content-Length is sent more than once"));
            }
            let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
            let n = value
                .parse::<u64>()
                .ok()
                .filter(|_| digits)
                .ok_or_else(|| {
                    ApiError::invalid(format!("Content-Length `{value}` is not a decimal length"))
                })?;
            self.content_length = Some(n);
            Ok(true)
        } else if name.eq_ignore_ascii_case("Transfer-Encoding") {
            if self.chunked || !value.eq_ignore_ascii_case("chunked") {
                return Err(ApiError::invalid(format!(
                    "Transfer-Encoding `{value}` is not supported; send Content-Length or chunked once"
                )));
            }
            self.chunked = true;
            Ok(true)
        } else if name.eq_ignore_ascii_case("Expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err(ApiError::ExpectationFailed);
            }
            self.expect_continue = true;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    fn body(&self, limit: u64) -> Result<BodyFraming, ApiError> {
        match (self.content_length, self.chunked) {
            (Some(_), true) => Err(ApiError::invalid(
                "Content-Length and Transfer-Encoding together make the body's length ambiguous",
            )),
            (Some(n), false) if n > limit => Err(ApiError::BodyTooLarge { limit }),
            (Some(0), false) | (None, false) => Ok(BodyFraming::None),
            (Some(n), false) => Ok(BodyFraming::Length(n)),
            (None, true) => Ok(BodyFraming::Chunked),
        }
    }
}

fn read_exact_body(conn: &mut Conn, n: usize) -> Result<Vec<u8>, ApiError> {
    while conn.buf.len() < n {
        match conn.fill(WAKE) {
            Ok(Fill::More) => {}
            Ok(Fill::TimedOut) => return Err(ApiError::RequestTimeout),
            Ok(Fill::Eof) | Err(_) => {
                return Err(ApiError::invalid(
                    "the connection ended before the declared Content-Length arrived",
                ));
            }
        }
    }
    let body = conn.buf[..n].to_vec();
    conn.buf.drain(..n);
    Ok(body)
}

/// Decodes a chunked body, refusing it as soon as it passes `limit`.
fn read_chunked_body(conn: &mut Conn, limit: u64) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    loop {
        let size = loop {
            match httparse::parse_chunk_size(&conn.buf) {
                Ok(httparse::Status::Complete((used, size))) => {
                    conn.buf.drain(..used);
                    break size;
                }
                Ok(httparse::Status::Partial) if conn.buf.len() > MAX_CHUNK_LINE => {
                    return Err(ApiError::invalid("a chunk-size line is too long"));
                }
                Ok(httparse::Status::Partial) => more(conn)?,
                Err(_) => return Err(ApiError::invalid("malformed chunked body")),
            }
        };
        if size == 0 {
            // Trailers are read and dropped, up to the empty line, within the same bound.
            loop {
                if let Some(end) = find(&conn.buf, b"\r\n") {
                    let empty = end == 0;
                    conn.buf.drain(..end + 2);
                    if empty {
                        return Ok(body);
                    }
                } else if conn.buf.len() > MAX_CHUNK_LINE {
                    return Err(ApiError::invalid("a chunked trailer is too long"));
                } else {
                    more(conn)?;
                }
            }
        }
        if body.len() as u64 + size > limit {
            return Err(ApiError::BodyTooLarge { limit });
        }
        let size = size as usize;
        while conn.buf.len() < size + 2 {
            more(conn)?;
        }
        if &conn.buf[size..size + 2] != b"\r\n" {
            return Err(ApiError::invalid("malformed chunked body"));
        }
        body.extend_from_slice(&conn.buf[..size]);
        conn.buf.drain(..size + 2);
    }
}

fn more(conn: &mut Conn) -> Result<(), ApiError> {
    match conn.fill(WAKE) {
        Ok(Fill::More) => Ok(()),
        Ok(Fill::TimedOut) => Err(ApiError::RequestTimeout),
        Ok(Fill::Eof) | Err(_) => Err(ApiError::invalid(
            "the connection ended inside the chunked body",
        )),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Hands the request to tiny_http and copies its answer back to the client.
fn forward(shared: &Shared, conn: &mut Conn, request: Incoming) {
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
    out.extend_from_slice(&request.body);
    let mut sent = 0;
    let relayed = UnixStream::connect(&shared.backend).and_then(|mut backend| {
        backend.set_read_timeout(Some(shared.limits.answer_timeout))?;
        backend.set_write_timeout(Some(shared.limits.answer_timeout))?;
        backend.write_all(&out)?;
        relay(
            &mut backend,
            &mut conn.stream,
            shared.limits.socket_timeout,
            &mut sent,
        )
    });
    match relayed {
        Ok(()) if sent > 0 => {
            // Bytes the client sent after its request are not read: the answer said close.
            let _ = conn.stream.shutdown(Shutdown::Write);
            if !conn.buf.is_empty() {
                conn.linger();
            }
        }
        // Nothing reached the client: it still gets an answer.
        Ok(()) | Err(_) if sent == 0 => {
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
        Ok(()) | Err(_) => log::debug!(
            "{} {}: the client stopped reading the answer after {sent} bytes",
            request.method,
            request.target
        ),
    }
}

/// Copies the answer to the client; writing it all may take `write_time` in total, however
/// slowly the client reads.
fn relay(
    backend: &mut UnixStream,
    client: &mut TcpStream,
    write_time: Duration,
    sent: &mut usize,
) -> io::Result<()> {
    let mut chunk = [0u8; 8192];
    let mut write_by = None;
    loop {
        let n = backend.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        let by = *write_by.get_or_insert_with(|| Instant::now() + write_time);
        let left = by.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        client.set_write_timeout(Some(left))?;
        client.write_all(&chunk[..n])?;
        *sent += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(headers: &[(&str, &str)]) -> Result<Framing, ApiError> {
        let mut f = Framing::default();
        for (n, v) in headers {
            f.observe(n, v)?;
        }
        Ok(f)
    }

    #[test]
    fn content_length_must_be_one_plain_decimal() {
        for bad in [
            "abc",
            "-1",
            "+52",
            "99999999999999999999",
            "",
            "1 2",
            "0x10",
        ] {
            assert!(framing(&[("Content-Length", bad)]).is_err(), "{bad}");
        }
        assert!(framing(&[("Content-Length", "5"), ("content-length", "5")]).is_err());
        let f = framing(&[("Content-Length", " 52 ")]).unwrap();
        assert_eq!(f.body(100).unwrap(), BodyFraming::Length(52));
        assert!(matches!(
            f.body(10),
            Err(ApiError::BodyTooLarge { limit: 10 })
        ));
        assert_eq!(
            framing(&[("Content-Length", "0")])
                .unwrap()
                .body(1)
                .unwrap(),
            BodyFraming::None
        );
    }

    #[test]
    fn length_and_chunked_together_are_ambiguous() {
        let f = framing(&[("Content-Length", "5"), ("Transfer-Encoding", "chunked")]).unwrap();
        assert!(matches!(f.body(100), Err(ApiError::InvalidRequest { .. })));
        assert!(framing(&[("Transfer-Encoding", "gzip, chunked")]).is_err());
        assert!(
            framing(&[
                ("Transfer-Encoding", "chunked"),
                ("Transfer-Encoding", "chunked")
            ])
            .is_err()
        );
        assert_eq!(
            framing(&[("Transfer-Encoding", "Chunked")])
                .unwrap()
                .body(1)
                .unwrap(),
            BodyFraming::Chunked
        );
    }

    #[test]
    fn only_100_continue_is_an_acceptable_expectation() {
        assert!(
            framing(&[("Expect", "100-continue")])
                .unwrap()
                .expect_continue
        );
        assert!(framing(&[("Expect", "200-ok")]).is_err());
    }

    #[test]
    fn header_values_must_be_printable_ascii() {
        assert_eq!(header_value(b"a b\tc"), Some("a b\tc"));
        assert_eq!(header_value(b"a\0b"), None);
        assert_eq!(header_value("é".as_bytes()), None);
    }

    #[test]
    fn http2_and_unknown_versions_are_505() {
        for line in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"GET / HTTP/1.2\r\n\r\n",
            b"GET / HTTP/3.0\r\n\r\n",
        ] {
            let mut h = [httparse::EMPTY_HEADER; 4];
            let e = httparse::Request::new(&mut h).parse(line).unwrap_err();
            assert_eq!(head_error(e).status(), 505);
        }
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
