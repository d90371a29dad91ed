//! The payment provider: the client `serve` uses ([`client`]) and the simulated provider that
//! `paytrace provider` runs ([`sim`]). They share only the wire format.

pub mod client;
pub mod sim;
