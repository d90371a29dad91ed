//! The HTTP edge: everything that knows about sockets and tiny_http, in the order a request
//! meets it.
//!
//! - [`front`] (unit 01): owns the client sockets; reads a whole request within a deadline,
//!   checks sizes and framing, forwards it to tiny_http.
//! - [`dispatch`]: gives the request its identity and offers it to the worker pool (unit 03);
//!   [`liveness`] checks that tiny_http still accepts.
//! - [`routes`]: the routing table and the adapters to the payment flow.
//! - [`middleware`] (unit 02), with [`auth`] and [`ratelimit`]: the chain in front of `/payments`.
//! - [`observe`]: response headers, metrics and the access line of every request.
//! - [`http`]: reading a tiny_http request, writing a reply.
//! - [`live`]: the live page of the seven units (`GET /`) and the state it refreshes from.

pub mod auth;
pub mod dispatch;
pub mod front;
pub mod http;
pub mod live;
pub mod liveness;
pub mod middleware;
pub mod observe;
pub mod ratelimit;
pub mod routes;
