//! The integration suite, one binary: contracts, the repository contract suite,
//! the HTTP surface, the worker through Kafka, liveness, the fault matrix,
//! parity with the platform, operator commands and deployment files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod contracts;
mod deployment;
mod faults;
mod http;
mod liveness;
mod ops;
mod parity;
mod relay;
mod repository;
mod switchover;
mod worker;
