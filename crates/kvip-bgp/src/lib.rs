//! kvip-bgp: an announce-only BGP speaker. kvip opens the sessions, announces its host routes
//! and withdraws them; it accepts no routes. One task per peer runs the session state machine
//! (RFC 4271) over TCP, with TCP MD5 signatures (RFC 2385) where a password is set, and BFD
//! (RFC 5880/5881) where asked.

pub mod bfd;
pub mod session;
pub mod socket;
pub mod speaker;
pub mod wire;

pub use session::{Local, Peer, State, Status};
pub use speaker::{PeerView, Speaker};
