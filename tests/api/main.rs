//! Integration tests: the real `paytrace` binary over real sockets, one module per feature.

mod helpers;

mod backpressure;
mod breaker;
mod budget;
mod cli;
mod compare;
mod guards;
mod hostile;
mod idempotency;
mod layout;
mod live;
mod middleware;
mod nginx;
mod observability;
mod openapi;
mod payments;
mod postgres;
mod provider_answers;
mod provider_faults;
mod readme;
mod scenario;
mod shutdown;
mod slow_clients;
mod storage;
mod trace;
mod writer;
