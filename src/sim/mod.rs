//! Not part of the worker: the demo, the benchmark, the simulated upstream
//! services and the in-process Kafka they run against.

pub mod bench;
pub mod demo;
pub mod embedded;
pub mod upstream;
