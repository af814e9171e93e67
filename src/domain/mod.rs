//! The pure state machine: `(batch, event, now, ids, credit answers) -> decision`.
//! Nothing here does I/O; Kafka, SQL and HTTP are plumbing around it.

pub mod batch;
pub mod message;
pub mod policy;
pub mod rules;

pub use batch::*;
pub use message::{MessageContext, OutboundMessage, RawRecord};
pub use policy::{
    credit_breakdown, CreditAnswers, CreditQuery, CreditVerdict, GraphError, PhaseGraph, PhaseNode,
};
pub use rules::{
    denial, transitions, valid_prompt_reference, Decision, Effects, Env, EventMeta, FieldError,
    IdSource, PhaseTransition, RandomIds, RegistrationRequest, Resolution, Rules, SequentialIds,
};

#[cfg(test)]
mod tests;
