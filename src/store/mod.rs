//! Storage: the SQLite pool and schema ([`db`], unit 04) and the idempotency table
//! ([`idempotency`], unit 05). Neither knows about HTTP.

pub mod db;
pub mod error;
pub mod idempotency;
pub mod writer;
