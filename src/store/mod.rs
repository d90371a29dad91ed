//! Storage: the SQLite pool and schema ([`db`], unit 04) and the idempotency table
//! ([`idempotency`], unit 05); the same on PostgreSQL ([`pg`]), for several instances on one
//! database; and [`engine::Store`], which the flow calls whichever `--db` names. None knows
//! about HTTP.

pub mod db;
pub mod engine;
pub mod error;
pub mod idempotency;
pub mod pg;
pub mod writer;
