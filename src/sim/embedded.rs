//! An in-process Kafka: librdkafka's mock cluster, speaking the real protocol on loopback.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::contracts::topics;

pub struct EmbeddedKafka {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedKafka {
    pub fn start() -> rdkafka::error::KafkaResult<Self> {
        Ok(Self {
            cluster: MockCluster::new(1)?,
        })
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// The mock cluster itself: broker down/up, injected request errors, topics.
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }

    /// Every consumed, dead-letter and published topic, under `prefix`.
    pub fn create_topics(&self, prefix: &str, partitions: i32) -> rdkafka::error::KafkaResult<()> {
        for (topic, dead_letters) in topics::every_topic() {
            let n = if dead_letters { 1 } else { partitions };
            self.cluster
                .create_topic(&format!("{prefix}{topic}"), n, 1)?;
        }
        Ok(())
    }
}
