//! Authentication and authorization: the token format and the pure decision
//! that says whether a request may pass.

pub mod decide;
pub mod token;

pub use decide::{decide, Deny};
pub use token::{TokenFormat, TokenHash};
