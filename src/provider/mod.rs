//! The payment provider: the client `serve` uses ([`client`]) behind the circuit breaker
//! ([`breaker`], unit 06), and the simulated provider that `paytrace provider` runs ([`sim`]).
//! The client and the simulation share only the wire format.

pub mod breaker;
pub mod client;
pub mod sim;
