//! The life of the process around the requests: what is in flight ([`inflight`]) and graceful
//! shutdown ([`shutdown`], unit 07).

pub mod inflight;
pub mod shutdown;
