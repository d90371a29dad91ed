//! The payment provider: the client `serve` uses ([`client`]) behind the circuit breaker
//! ([`breaker`], unit 06), and the simulated provider that `paytrace provider` runs ([`sim`]).
//! The client and the simulation share only the wire format.

/// Where charges are made (`POST`) and looked up by key (`GET`): the one path of the wire
/// format the client and the simulation both name.
pub const CHARGES_PATH: &str = "/v1/charges";

pub mod breaker;
pub mod client;
pub mod sim;
