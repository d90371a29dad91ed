//! Integration tests: the real `paytrace` binary over real sockets, one module per feature.

mod helpers;

mod backpressure;
mod guards;
mod payments;
mod provider_faults;
mod slow_clients;
