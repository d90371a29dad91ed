//! The accept loop: one task per connection, each served by hyper (HTTP/1.1, keep-alive), and
//! the connection half of the drain.
//!
//! axum's own `serve` would do, but its graceful shutdown closes every idle connection at once —
//! also one accepted just before the close whose request is still on its way. The sync server
//! serves every connection it accepted, and answers a further request on a kept-alive one with
//! 503 `shutting-down`; so here each connection, after the close, gets one more second to start
//! a request unless one is already in flight, and only then is told to shut down gracefully
//! (hyper finishes the request in flight, then closes).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use paytrace::app::App;
use paytrace::edge::{front, http, observe};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a connection accepted before the close has to start its request.
const GRACE: Duration = Duration::from_secs(1);

/// Which request of its connection this one is (1 for the first): a request after the first,
/// arriving once the listener closed, is refused like on the sync server.
#[derive(Clone, Copy, Debug)]
pub struct NthOnConnection(pub u64);

/// What the drain needs to know of one connection.
#[derive(Default)]
struct Connection {
    /// Requests started on it.
    started: AtomicU64,
    /// Requests whose answer is not ready yet.
    active: AtomicUsize,
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
    let socket_timeout = app.config.socket_timeout;
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
        if open.load(Ordering::SeqCst) >= max {
            refuse_connection(&app, stream);
            continue;
        }
        open.fetch_add(1, Ordering::SeqCst);
        let (router, close, open) = (router.clone(), close.clone(), open.clone());
        connections.spawn(async move {
            serve(stream, router, close, socket_timeout).await;
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// One connection over `--max-connections`: a short 503 written without waiting, then closed,
/// and counted and logged like any refusal (as the sync server's front does).
fn refuse_connection(app: &App, stream: tokio::net::TcpStream) {
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
    stream: tokio::net::TcpStream,
    router: Router,
    close: CancellationToken,
    socket_timeout: Duration,
) {
    let state = Arc::new(Connection::default());
    let service = {
        let (inner, state) = (TowerToHyperService::new(router), state.clone());
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let nth = state.started.fetch_add(1, Ordering::SeqCst) + 1;
            state.active.fetch_add(1, Ordering::SeqCst);
            request.extensions_mut().insert(NthOnConnection(nth));
            let (answer, state) = (inner.call(request), state.clone());
            async move {
                let answered = answer.await;
                state.active.fetch_sub(1, Ordering::SeqCst);
                answered
            }
        })
    };
    // Header names as the sync server writes them (`Content-Type`, not `content-type`): the
    // same bytes for clients that compare them as text.
    let connection = http1::Builder::new()
        .title_case_headers(true)
        // A client that stalls inside a request head is cut off (hyper closes the connection;
        // the sync front answers 408 first).
        .timer(TokioTimer::new())
        .header_read_timeout(socket_timeout)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => return log_end(served),
        _ = close.cancelled() => {}
    }
    let seen = state.started.load(Ordering::SeqCst);
    let until = Instant::now() + GRACE;
    while state.active.load(Ordering::SeqCst) == 0
        && state.started.load(Ordering::SeqCst) == seen
        && Instant::now() < until
    {
        tokio::select! {
            served = connection.as_mut() => return log_end(served),
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    connection.as_mut().graceful_shutdown();
    log_end(connection.await);
}

fn log_end(served: Result<(), hyper::Error>) {
    if let Err(e) = served {
        log::debug!("connection ended: {e}");
    }
}
