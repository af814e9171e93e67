//! # bos — the Batch Orchestrator Service
//!
//! A background worker that decides, exactly once per consumed event, which
//! essay-processing command to send next for a batch.
//!
//! Data flows one way:
//!
//! ```text
//! Kafka ─▶ decode (contracts) ─▶ load (store) ─▶ decide (domain, pure)
//!       ─▶ one transaction: state + outbox rows + inbox row (store)
//!       ─▶ commit offset;           outbox relay ─▶ Kafka
//! ```
//!
//! - [`contracts`]: wire types only, with the exact names other services use.
//! - [`domain`]: the rules as a pure function of state, event, clock and ids.
//! - [`store`]: the repository trait, with PostgreSQL and in-memory implementations
//!   that share one contract test suite.

pub mod app;
pub mod bench;
pub mod config;
pub mod consumer;
pub mod contracts;
pub mod demo;
pub mod dlq;
pub mod domain;
pub mod embedded;
pub mod http;
pub mod metrics;
pub mod outbox;
pub mod store;
pub mod telemetry;
pub mod upstream;
