//! The accept loop: one task per connection, each served by hyper (HTTP/1.1, keep-alive), and
//! the connection half of the drain.
//!
//! axum's own `serve` would do, but its graceful shutdown closes every idle connection at once —
//! also one accepted just before the close whose request is still on its way. The sync server
//! serves every connection it accepted, and answers a further request on a kept-alive one with
//! 503 `shutting-down`; so here each connection, after the close, gets one more second to start
//! a request unless one is already in flight, and only then is told to shut down gracefully
//! (hyper finishes the request in flight, then closes). A client still half-way through a
//! request head then — or at `--socket-timeout`, when hyper stops waiting for it — gets the
//! sync front's 408 from the socket hyper hands back.
//!
//! When every `--max-connections` slot is taken, the kept-alive connection that has waited
//! longest for its client's next request is closed to make room, as the sync front does: an idle
//! connection never costs a new client its turn. Only when none is idle is the new one refused.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use paytrace::app::App;
use paytrace::edge::{front, http, observe};
use paytrace::error::ApiError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a connection accepted before the close has to start its request.
const GRACE: Duration = Duration::from_secs(1);

/// A connection's socket as hyper sees it, telling whether hyper's last write or flush is still
/// waiting for the client to read: an answer not yet sent, which the drain must not cut off
/// and a 408 must never follow.
struct Watched {
    io: TokioIo<TcpStream>,
    unsent: Arc<AtomicBool>,
}

impl hyper::rt::Read for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.unsent.store(polled.is_pending(), Ordering::SeqCst);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.unsent.store(polled.is_pending(), Ordering::SeqCst);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.unsent.store(polled.is_pending(), Ordering::SeqCst);
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Which request of its connection this one is (1 for the first): a request after the first,
/// arriving once the listener closed, is refused like on the sync server.
#[derive(Clone, Copy, Debug)]
pub struct NthOnConnection(pub u64);

/// What the drain and the accept loop need to know of one connection.
#[derive(Default)]
struct Connection {
    /// Requests started on it.
    started: AtomicU64,
    /// Requests whose answer is not ready yet.
    active: AtomicUsize,
    /// When its last answer was ready: with `active` 0 and a request served, it is a kept-alive
    /// connection waiting for its client.
    idle_since: Mutex<Option<Instant>>,
    /// Cancelled to close it gracefully, to give its slot to a new client.
    evict: CancellationToken,
}

/// The open connections, for the accept loop to find an idle kept-alive one to close.
#[derive(Default)]
struct Open {
    next: AtomicU64,
    by_id: Mutex<HashMap<u64, Arc<Connection>>>,
}

impl Open {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Connection>>> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the kept-alive connection that has waited longest for its client, if one does:
    /// like the sync front, a connection kept alive never takes the slot a new client needs.
    fn evict_longest_idle(&self) -> bool {
        let open = self.lock();
        let idlest = open
            .values()
            .filter(|c| {
                !c.evict.is_cancelled()
                    && c.active.load(Ordering::SeqCst) == 0
                    && c.started.load(Ordering::SeqCst) > 0
            })
            .filter_map(|c| {
                let since = *c.idle_since.lock().unwrap_or_else(|e| e.into_inner());
                since.map(|since| (since, c))
            })
            .min_by_key(|(since, _)| *since);
        match idlest {
            Some((_, c)) => {
                c.evict.cancel();
                true
            }
            None => false,
        }
    }
}

/// Accepts until `close` is cancelled, then drops the listener (new connections are refused);
/// each connection is a task of `connections`, which the drain waits for.
pub async fn run(
    app: Arc<App>,
    listener: TcpListener,
    router: Router,
    close: CancellationToken,
    connections: TaskTracker,
    open: Arc<AtomicUsize>,
) {
    let max = app.config.max_connections as usize;
    let registry = Arc::new(Open::default());
    loop {
        let stream = tokio::select! {
            _ = close.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was accepted: the
                    // listener itself is fine; wait a moment rather than spin.
                    log::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // Full: an idle kept-alive connection gives up its slot (it closes at once; the count
        // falls when its task ends), or the new one is refused.
        if open.load(Ordering::SeqCst) >= max && !registry.evict_longest_idle() {
            refuse_connection(&app, stream);
            continue;
        }
        open.fetch_add(1, Ordering::SeqCst);
        let id = registry.next.fetch_add(1, Ordering::SeqCst);
        let state = Arc::new(Connection::default());
        registry.lock().insert(id, state.clone());
        let (app, router, close, open, registry) = (
            app.clone(),
            router.clone(),
            close.clone(),
            open.clone(),
            registry.clone(),
        );
        connections.spawn(async move {
            serve(stream, router, close, app, state).await;
            registry.lock().remove(&id);
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// One connection over `--max-connections`: a short 503 written without waiting, then closed,
/// and counted and logged like any refusal (as the sync server's front does).
fn refuse_connection(app: &App, stream: TcpStream) {
    let (request_id, reply) = front::connections_refusal(app.config.max_connections as usize);
    let _ = stream.try_write(&http::encode(&reply, false));
    drop(stream);
    observe::refusal(
        app,
        &request_id,
        "-",
        "",
        reply.status,
        Duration::ZERO,
        Some(front::CONNECTIONS_SHED),
    );
}

async fn serve(
    stream: TcpStream,
    router: Router,
    close: CancellationToken,
    app: Arc<App>,
    state: Arc<Connection>,
) {
    let accepted = Instant::now();
    let socket_timeout = app.config.socket_timeout;
    let service = {
        let (inner, state) = (TowerToHyperService::new(router), state.clone());
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let nth = state.started.fetch_add(1, Ordering::SeqCst) + 1;
            state.active.fetch_add(1, Ordering::SeqCst);
            request.extensions_mut().insert(NthOnConnection(nth));
            let (answer, state) = (inner.call(request), state.clone());
            async move {
                let answered = answer.await;
                *state.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                state.active.fetch_sub(1, Ordering::SeqCst);
                answered
            }
        })
    };
    let unsent = Arc::new(AtomicBool::new(false));
    // Header names as the sync server writes them (`Content-Type`, not `content-type`): the
    // same bytes for clients that compare them as text.
    let mut connection = http1::Builder::new()
        .title_case_headers(true)
        // A client that stalls inside a request head is cut off: hyper ends the connection,
        // and below it gets the sync front's 408 if its head had begun.
        .timer(TokioTimer::new())
        .header_read_timeout(socket_timeout)
        .serve_connection(
            Watched {
                io: TokioIo::new(stream),
                unsent: unsent.clone(),
            },
            service,
        );
    // Polled by reference, not pinned in place (the connection is `Unpin`), so that once hyper
    // or the drain is done with it, it can be taken apart for its socket and unparsed bytes.
    let ended = tokio::select! {
        served = &mut connection => Some(served),
        _ = state.evict.cancelled() => {
            // Between requests: hyper closes it at once (a request that just started is
            // finished first).
            Pin::new(&mut connection).graceful_shutdown();
            Some((&mut connection).await)
        }
        _ = close.cancelled() => {
            // The listener closed: one more second to start a request, unless one is in
            // flight. Then a request started, or an answer not yet sent, is finished (the
            // sending within `--socket-timeout`, as the sync front writes) and the connection
            // closed; one with neither is taken back here (`None`).
            let seen = state.started.load(Ordering::SeqCst);
            let until = Instant::now() + GRACE;
            let mut served = None;
            while served.is_none()
                && state.active.load(Ordering::SeqCst) == 0
                && state.started.load(Ordering::SeqCst) == seen
                && Instant::now() < until
            {
                tokio::select! {
                    done = &mut connection => served = Some(done),
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            }
            match served {
                Some(done) => Some(done),
                None if state.active.load(Ordering::SeqCst) == 0
                    && state.started.load(Ordering::SeqCst) == seen
                    && !unsent.load(Ordering::SeqCst) => None,
                None => {
                    Pin::new(&mut connection).graceful_shutdown();
                    match tokio::time::timeout(socket_timeout, &mut connection).await {
                        Ok(done) => Some(done),
                        // A client that reads nothing of its answer is cut off.
                        Err(_) => return,
                    }
                }
            }
        }
    };
    match ended {
        // hyper gave up waiting for a head (`--socket-timeout`) with its last answer sent, or
        // the drain took back a connection with nothing in flight.
        Some(Err(e)) if e.is_timeout() && !unsent.load(Ordering::SeqCst) => {}
        None => {}
        Some(Err(e)) => return log::debug!("connection ended: {e}"),
        Some(Ok(())) => return,
    }
    let since = state
        .idle_since
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or(accepted);
    stalled(&app, connection.into_parts(), since).await;
}

/// A connection hyper no longer serves: a client that had begun a request head (bytes hyper
/// read but could not parse yet) gets the sync front's 408, counted and logged like it; one
/// that sent nothing is closed without an answer.
async fn stalled<S>(app: &App, parts: http1::Parts<Watched, S>, since: Instant) {
    let mut stream = parts.io.io.into_inner();
    if parts.read_buf.is_empty() {
        return;
    }
    let request_id = paytrace::ids::request_id();
    let total = since.elapsed();
    let reply = front::refusal_reply(ApiError::RequestTimeout, &request_id, total);
    let bytes = http::encode(&reply, false);
    // The client is stalled already: the answer gets the socket timeout, no more.
    let _ = tokio::time::timeout(app.config.socket_timeout, stream.write_all(&bytes)).await;
    let _ = stream.shutdown().await;
    observe::refusal(app, &request_id, "-", "", reply.status, total, None);
    // Closing with unread bytes from the client would reset the connection and could destroy
    // the 408 before it is read: what still arrives is read and dropped for a moment first,
    // as the sync front does.
    let mut discard = [0u8; 4096];
    let mut dropped = 0usize;
    let until = Instant::now() + front::LINGER;
    while dropped < front::LINGER_BYTES {
        match tokio::time::timeout_at(until, stream.read(&mut discard)).await {
            Ok(Ok(n)) if n > 0 => dropped += n,
            _ => break,
        }
    }
}
