//! The pure state machine: `(batch, event, now, ids) -> (batch, messages)`.
//! Nothing here does I/O; Kafka, SQL and HTTP are plumbing around it.

pub mod batch;
pub mod message;
pub mod policy;
pub mod rules;

pub use batch::*;
pub use message::{MessageContext, OutboundMessage};
pub use policy::{AllowAll, CreditPolicy, CreditVerdict, FixedBalance, PhaseGraph};
pub use rules::{
    Decision, Env, EventMeta, FieldError, IdSource, RandomIds, RegistrationRequest, Resolution,
    Rules, SequentialIds, Verdict,
};

#[cfg(test)]
mod tests;
