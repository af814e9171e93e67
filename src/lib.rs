//! # bos — the Batch Orchestrator Service
//!
//! A background worker that decides, exactly once per consumed event, which
//! essay-processing command to send next for a batch.
//!
//! Data flows one way:
//!
//! ```text
//! Kafka ─▶ consumer (a task per partition) ─▶ apply: decode, load (one read),
//!          inbox look-up (one read), decide (domain, pure), commit (one
//!          transaction: batch rows version-checked + inbox + outbox rows)
//!       ─▶ store the offset;            outbox relay ─▶ Kafka
//! ```
//!
//! - [`contracts`]: wire types only, with the exact names other services use,
//!   and the checks the platform's own models make.
//! - [`domain`]: the rules as a pure function of state, event, clock, ids and
//!   credit answers.
//! - [`apply`]: planning a poll's records (pure) and committing them, with
//!   error classification and isolation of records the database refuses.
//! - [`store`]: the repository trait, with PostgreSQL and in-memory
//!   implementations that share one contract test suite.
//! - [`consumer`], [`outbox`], [`kafka`]: Kafka in (with dead letters), Kafka
//!   out (the relay and housekeeping), and how the clients are configured.
//! - [`http`], [`health`], [`metrics`], [`credits`], [`config`], [`telemetry`],
//!   [`app`]: the edges; [`app::Application`] wires them for every entry point.
//! - [`ops`]: operator commands (batch, outbox and dead-letter inspection,
//!   replay).
//! - [`legacy`]: replacing the original service: the import of its in-flight
//!   state and the comparison of a shadow run with it.
//! - [`sim`]: the demo, the benchmark and the simulated upstream services —
//!   not part of the worker.

pub mod app;
pub mod apply;
pub mod config;
pub mod consumer;
pub mod contracts;
pub mod credits;
pub mod domain;
pub mod health;
pub mod http;
pub mod kafka;
pub mod legacy;
pub mod metrics;
pub mod ops;
pub mod outbox;
pub mod signal;
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod throttle;
